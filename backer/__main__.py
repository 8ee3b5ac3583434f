from backer.entry import main

main()
