"""`python -m ternary.server MODEL ...` is `ternary-serve MODEL ...`."""

from ternary.server.cli import main

main()
