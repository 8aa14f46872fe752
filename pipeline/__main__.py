"""`python -m pipeline …` (and `torchrun -m pipeline train …`) runs the CLI."""

from pipeline.cli import main

main()
