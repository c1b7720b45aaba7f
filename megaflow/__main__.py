from megaflow.cli.main import main

main()
