from tunegate.cli import main

main()
