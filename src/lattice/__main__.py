"""`python -m lattice` is the `lattice` command."""

from lattice.cli import main

main()
