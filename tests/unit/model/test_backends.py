"""The backend registry (model/backends.py) is the one list config validation, the model and `gptoss env`
read; every cache the model is given implements KVCacheProtocol."""

from __future__ import annotations

import pytest
import torch

from gptoss_cli.model import KVCache, KVCacheProtocol, ModelConfigError, StaticKVCache, backends
from gptoss_cli.model.attention import AttentionBlock
from gptoss_cli.serve.slots import SlotKVCache
from tests.unit.model.references import small_config


def test_every_registered_kernel_resolves_to_a_callable():
    for table in (backends.ATTENTION, backends.MOE):
        for backend in table.values():
            if backend.kernel is not None:
                assert callable(backends.kernel(backend)), backend.name


@pytest.mark.parametrize("key,table", [("attention_backend", backends.ATTENTION), ("moe_backend", backends.MOE)])
def test_config_validation_reads_the_registry(key, table, monkeypatch):
    for name in table:
        small_config(**{key: name})
    with pytest.raises(ModelConfigError, match=f"must be one of {', '.join(table)}"):
        small_config(**{key: "flash9"})
    monkeypatch.setitem(table, "flash9", backends.Backend("flash9", "a new one", "attention:eager_attention"))
    assert getattr(small_config(**{key: "flash9"}), key) == "flash9"  # one entry is all it takes


def test_the_model_takes_its_attention_kernel_from_the_registry(monkeypatch):
    calls = []

    def counting(q, k, v, sinks, mask, scale):
        calls.append(q.shape)
        return backends.kernel(backends.ATTENTION["eager"])(q, k, v, sinks, mask, scale)

    monkeypatch.setattr("gptoss_cli.model.attention.counting_attention", counting, raising=False)
    monkeypatch.setitem(
        backends.ATTENTION, "counting", backends.Backend("counting", "test", "attention:counting_attention")
    )
    block = AttentionBlock(small_config(attention_backend="counting"), layer_idx=1)
    assert block.kernel is counting


def test_env_lists_every_attention_and_moe_backend():
    from gptoss_cli.envinfo import collect

    info = collect()
    assert list(info["attention_backends"]) == list(backends.ATTENTION)
    assert all(info["attention_backends"].values())  # every one runs on this CPU
    assert list(info["moe_backends"]) == list(backends.MOE)


def test_every_cache_implements_the_protocol_and_the_slot_cache_wants_positions():
    cfg = small_config()
    caches = [
        KVCache(cfg, 2, 16, torch.float32, "cpu"),
        StaticKVCache(cfg, 2, 16, torch.float32, "cpu"),
        SlotKVCache(cfg, 2, 16, torch.float32, "cpu").select(0, 2, 1),
    ]
    assert all(isinstance(c, KVCacheProtocol) for c in caches)
    assert caches[0].positions(2, 3, torch.device("cpu")).tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="own positions"):
        caches[2].positions(2, 1, torch.device("cpu"))
