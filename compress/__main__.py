"""`python -m compress`: the same command line as the `compress` script."""

from compress.cli.main import main

if __name__ == "__main__":
    main()
