from tformer_cli.entry import main

main()
