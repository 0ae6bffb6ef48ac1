"""`python -m receiver`, the same as the `receiver` command."""

from receiver.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
