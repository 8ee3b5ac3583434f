from backer.cli import main

main()
