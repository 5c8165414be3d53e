"""`python -m flows.cli`: the `distillery` command (torchrun starts it this way: `torchrun ... -m flows.cli train`)."""

from flows.cli import main

main()
