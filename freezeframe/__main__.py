from freezeframe.cli.main import main

main()
