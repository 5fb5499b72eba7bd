"""`python -m gptoss_cli` (and `torchrun -m gptoss_cli`) run the CLI."""

from .cli import main

if __name__ == "__main__":  # not when a spawned tokenizer worker re-imports this module
    main()
