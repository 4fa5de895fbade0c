from capcli.cli import main

main()
