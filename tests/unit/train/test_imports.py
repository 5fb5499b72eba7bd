"""Importing the trainer stays close to importing torch: torch.distributed.checkpoint (seconds of import
on its own) is loaded only when a checkpoint is gathered or an optimizer state is restored."""

from __future__ import annotations

import subprocess
import sys


def test_trainer_import_defers_torch_distributed_checkpoint():
    code = (
        "import sys, gptoss_cli.cli, gptoss_cli.commands.train, gptoss_cli.train.loop; "
        "print('torch' in sys.modules, 'torch.distributed.checkpoint' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
