from qatcli.cli import main

main()
