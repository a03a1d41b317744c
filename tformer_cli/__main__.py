from tformer_cli.app import main

main()
