"""`python -m gptoss_cli` (and `torchrun -m gptoss_cli`) run the CLI."""

from .cli import main

main()
