import sys

from qatcli.cli import main

sys.exit(main())
