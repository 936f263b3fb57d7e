from ldm.serve.cli import main

main()
