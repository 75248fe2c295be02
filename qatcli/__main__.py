from qatcli.entry import run

run()
