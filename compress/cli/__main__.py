"""`python -m compress.cli ...`: the same as the installed `compress` command."""

from compress.cli.main import main

main()
