"""Every transformers version the project supports reads an export as the same model.

transformers 4.x ignores config.json's `rope_parameters` and, without the legacy `rope_scaling`, builds
GptOssConfig's default YaRN x32 at theta 150000: another model, whose logits differ. The oldest supported
release (the lower bound of the dev dependency, and what llama.cpp's converter pins) is installed from PyPI
into a folder of its own and run in a subprocess; the installed (newest) one runs here. Both must give our
logits on the same export, for a YaRN model (the released layout) and a plain-RoPE one (compact).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_close, rtol_for
from tests.integration.test_hf_interop import logits, make_run, ok, tokens

transformers = pytest.importorskip("transformers")

OLDEST = "4.57.6"  # keep in step with pyproject.toml's dev dependency `transformers>=...`
# what that release requires of its dependencies beyond this environment (hub 0.x still uses requests)
PEERS = (
    "huggingface-hub>=0.34,<1.0",
    "tokenizers>=0.22,<0.23",
    "requests",
    "urllib3",
    "idna",
    "charset-normalizer",
    "certifi",
)

# Reads an export with whatever transformers PYTHONPATH puts first and saves its fp32 logits (no pickle).
SCRIPT = """
import sys, torch, transformers
from safetensors.torch import save_file
hf = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
ids = torch.tensor(eval(sys.argv[3]))
with torch.no_grad():
    save_file({"logits": hf(input_ids=ids, use_cache=False).logits.contiguous()}, sys.argv[2])
print(transformers.__version__)
"""


@pytest.fixture(scope="module")
def oldest(tmp_path_factory) -> Path:
    """transformers OLDEST and its pinned peers in a folder of their own (uv's cache makes a rerun instant)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed: it installs the oldest transformers beside the newest")
    target = tmp_path_factory.mktemp("transformers-oldest")
    cmd = [uv, "pip", "install", "--quiet", "--python", sys.executable, "--target", str(target), "--no-deps"]
    proc = subprocess.run([*cmd, f"transformers=={OLDEST}", *PEERS], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"could not install transformers {OLDEST} from PyPI: {proc.stderr.strip()[:200]}")
    return target


def logits_with(target: Path, export: Path, out: Path, ids: torch.Tensor) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(export), str(out), repr(ids.tolist())],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_pyproject_pins_the_oldest_version_this_test_installs():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"transformers>={OLDEST}"' in pyproject


@pytest.mark.parametrize("layout", ["released", "compact"])
def test_the_oldest_and_the_newest_transformers_read_the_export_as_the_same_model(oldest, tmp_path, layout):
    run, model = make_run(tmp_path, layout)
    ok("export", "--run", run, "--out", tmp_path / "hf", "--dtype", "fp32")
    ids = tokens()
    ours = logits(model, ids)
    rtol = rtol_for(torch.float32, model.config.hidden_size, 8 * model.config.num_hidden_layers)
    version = logits_with(oldest, tmp_path / "hf", tmp_path / "old.safetensors", ids)
    assert version == OLDEST
    assert_close(load_file(str(tmp_path / "old.safetensors"))["logits"], ours, rtol=rtol, what=f"transformers {OLDEST}")
    newest = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_close(logits(newest, ids), ours, rtol=rtol, what=f"transformers {transformers.__version__}")
