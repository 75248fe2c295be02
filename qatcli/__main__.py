import sys

from qatcli.cli import main

# main() returns the exit status where the command line ends without raising it (typer turns Ctrl-C into 130).
sys.exit(main())
