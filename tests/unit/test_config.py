"""The strict run config: YAML and `--set` overrides are type-checked field by field, unknown keys and
sections are named with their file, values are range-checked, and shipped configs resolve by bare name from
any working directory.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gptoss_cli.config import (
    SEED_MAX,
    SEED_MIN,
    ConfigError,
    InferConfig,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
    seed64,
    shipped_configs,
)

SHIPPED = {"compact", "tiny", "gpt-oss-20b", "gpt-oss-120b"}


def write_yaml(tmp_path: Path, text: str, name: str = "my.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(name, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(name, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ---- keys and sections ----------------------------------------------------------------------------


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write_yaml(tmp_path, "model:\n  hidden_sise: 64\n")
    message = error(path)
    assert message.startswith("my.yaml: model.hidden_sise: unknown key (known: ")
    assert "hidden_size" in message
    assert error("tiny", ["train.learning_rate=1e-3"]).startswith("tiny.yaml: train.learning_rate: unknown key")


def test_unknown_section(tmp_path):
    assert error(write_yaml(tmp_path, "modle:\n  hidden_size: 64\n")).startswith("my.yaml: modle: unknown section")
    assert error("tiny", ["optim.lr=1"]) == (
        "--set 'optim.lr=1': unknown section 'optim' (known: model, data, train, infer, lora)"
    )
    assert "expected a mapping" in error(write_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "model: expected a mapping of keys" in error(write_yaml(tmp_path, "model: 3\n", "scalar.yaml"))


def test_empty_file_is_refused_not_all_defaults(tmp_path):
    # All defaults would be the 1.4B compact model: an empty file is a mistake, not a request for it.
    with pytest.raises(ConfigError, match=r"^empty.yaml: the config is empty; give at least one section"):
        load_config(write_yaml(tmp_path, "# nothing\n", "empty.yaml"))


# ---- types ----------------------------------------------------------------------------------------


def test_bool_and_int_are_not_interchangeable():
    assert error("tiny", ["model.tie_word_embeddings=1"]) == (
        "tiny.yaml: model.tie_word_embeddings: expected true or false, got 1"
    )
    assert error("tiny", ["train.batch_size=true"]) == "tiny.yaml: train.batch_size: expected an integer, got True"
    assert "expected true or false, got 'true'" in error("tiny", ["train.compile='true'"])
    assert load_config("tiny", ["train.compile=true"]).train.compile is True


def test_float_fields(tmp_path):
    cfg = load_config("tiny", ["train.lr=3e-4"])  # YAML 1.1 reads 3e-4 as a string
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert load_config(write_yaml(tmp_path, "train:\n  lr: 3e-4\n  weight_decay: 0\n")).train.lr == 3e-4
    assert isinstance(load_config(write_yaml(tmp_path, "train:\n  weight_decay: 0\n")).train.weight_decay, float)
    assert error("tiny", ["train.lr=abc"]) == "tiny.yaml: train.lr: expected a number, got 'abc'"
    assert error("tiny", ["train.lr=true"]) == "tiny.yaml: train.lr: expected a number, got True"


def test_int_fields():
    assert error("tiny", ["train.batch_size=1.5"]) == "tiny.yaml: train.batch_size: expected an integer, got 1.5"
    assert error("tiny", ["train.batch_size=eight"]) == "tiny.yaml: train.batch_size: expected an integer, got 'eight'"
    cfg = load_config("tiny", ["train.batch_size=4.0"])  # an integral float is that integer
    assert cfg.train.batch_size == 4 and type(cfg.train.batch_size) is int


def test_literal_choices():
    assert error("tiny", ["train.device=tpu"]) == (
        "tiny.yaml: train.device: expected one of 'auto', 'cpu', 'cuda', got 'tpu'"
    )
    assert "expected one of 'ddp', 'fsdp'" in error("tiny", ["train.parallel=zero3"])
    assert load_config("tiny", ["train.precision=bf16-mixed"]).train.precision == "bf16-mixed"
    # model backends are plain strings validated by ModelConfig
    assert error("tiny", ["model.moe_backend=fast"]).startswith("tiny.yaml: model.moe_backend: must be one of")


def test_null_only_for_optional_fields():
    cfg = load_config("tiny", ["train.max_steps=null", "infer.seed=~", "data.tokenizer=null"])
    assert cfg.train.max_steps is None and cfg.infer.seed is None and cfg.data.tokenizer is None
    assert load_config("tiny", ["train.max_steps=7"]).train.max_steps == 7
    assert error("tiny", ["train.lr=null"]) == "tiny.yaml: train.lr: expected a number, got None"
    assert "train.max_steps: expected an integer or null" in error("tiny", ["train.max_steps=many"])


def test_data_paths_is_a_list_of_strings(tmp_path):
    assert load_config("tiny", ["data.paths=[a.txt, 'dir/*.jsonl']"]).data.paths == ["a.txt", "dir/*.jsonl"]
    assert load_config("tiny", ["data.paths=corpus.txt"]).data.paths == ["corpus.txt"]  # one path
    assert load_config("tiny").data.paths == []
    assert error("tiny", ["data.paths=[a.txt, 3]"]) == "tiny.yaml: data.paths[1]: expected a string, got 3"
    assert "data.paths: expected a list of a string" in error(write_yaml(tmp_path, "data:\n  paths: {a: 1}\n"))


def test_name_must_be_a_string(tmp_path):
    assert error(write_yaml(tmp_path, "name: 3\n")) == "my.yaml: name: expected a string, got 3"
    assert load_config(write_yaml(tmp_path, "train:\n  lr: 1.0e-3\n", "named-by-file.yaml")).name == "named-by-file"


# ---- values and consistency -----------------------------------------------------------------------


def test_inconsistent_model_dims_name_the_field():
    assert error("tiny", ["model.num_attention_heads=5"]) == (
        "tiny.yaml: model.num_attention_heads: 5 is not a multiple of num_key_value_heads=2"
    )
    assert error("tiny", ["model.experts_per_token=9"]) == (
        "tiny.yaml: model.experts_per_token: 9 exceeds num_experts=8"
    )
    assert error("tiny", ["model.head_dim=33"]).startswith("tiny.yaml: model.head_dim: must be even")


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("train.batch_size=0", "train.batch_size: must be > 0, got 0"),
        ("train.max_steps=0", "train.max_steps: must be > 0 (or null), got 0"),
        ("train.lr=0", "train.lr: out of range, got 0.0"),
        ("train.beta2=1", "train.beta2: out of range, got 1.0"),
        ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio: must be in [0, 1], got 1.5"),
        ("data.val_fraction=1", "data.val_fraction: must be in [0, 1), got 1.0"),
        ("train.seq_len=257", "train.seq_len: 257 exceeds model.max_context_length=256"),
        ("infer.top_p=0", "infer.top_p: must be in (0, 1], got 0.0"),
    ],
)
def test_out_of_range_values(override, problem):
    assert error("tiny", [override]).startswith(f"tiny.yaml: {problem}")


@pytest.mark.parametrize(
    "override",
    [
        "train.grad_clip=nan",
        "train.weight_decay=.nan",
        "train.aux_loss_coef=NaN",
        "train.z_loss_coef=.nan",
        "infer.temperature=nan",
        "train.lr=.inf",
        "model.rope_theta=-.inf",
    ],
)
def test_non_finite_floats_are_rejected(override):
    """NaN would pass every `< 0` range check (NaN < 0 is False) and reach the weights."""
    key, value = override.split("=")
    message = error("tiny", [override])
    assert message.startswith(f"tiny.yaml: {key}: must be a finite number, got ")
    assert message.endswith(("nan", "inf")), value


# ---- overrides ------------------------------------------------------------------------------------


def test_override_syntax():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], "3e-4")
    assert parse_override("data.paths=[a, b]") == (["data", "paths"], ["a", "b"])
    assert parse_override("model.hidden_size=64") == (["model", "hidden_size"], 64)
    assert parse_override("data.tokenizer=a=b.json") == (["data", "tokenizer"], "a=b.json")  # first '=' splits
    for bad in ("trainlr", "train.lr", "lr=3", "a.b.c=1", ".lr=1", "train.=1"):
        with pytest.raises(ConfigError, match="expected section.key=value"):
            parse_override(bad)


def test_overrides_apply_in_order_and_are_type_checked():
    cfg = load_config("tiny", ["train.lr=1e-3", "train.lr=2e-3", "model.hidden_size=64"])
    assert cfg.train.lr == 2e-3 and cfg.model.hidden_size == 64
    assert cfg.model.num_experts == 8  # untouched keys keep the file's values
    assert error("tiny", ["model.hidden_size=big"]) == "tiny.yaml: model.hidden_size: expected an integer, got 'big'"


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.lr=1e-3", "data.paths=[x.txt]", "train.max_steps=null"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


# ---- locating configs -----------------------------------------------------------------------------


def test_bare_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").name == "tiny"
    assert load_config("compact.yaml").model.hidden_size == 1536
    assert load_config("gpt-oss-20b").model.num_experts == 32
    write_yaml(tmp_path, "name: mine\n", "mine.yaml")
    assert load_config("mine.yaml").name == "mine"  # a file in the working directory
    message = error("nosuch")
    assert message.startswith("config not found: nosuch (not a file, and not a shipped config: ")
    assert all(name in message for name in SHIPPED)
    assert error(tmp_path / "sub" / "tiny.yaml").startswith("config not found")  # a path is not a bare name


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  hidden_size: 64\n  num_experts: [4, 8\ntrain:\n  lr: 1\n", "bad.yaml")
    message = error(path)
    assert message.startswith("bad.yaml: YAML syntax error at line ") and "column" in message


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_loads(name):
    assert SHIPPED <= set(shipped_configs())
    cfg = load_config(name)
    assert cfg.name == name and cfg.train.seq_len <= cfg.model.max_context_length
    assert cfg.model.vocab_size > 0 and cfg.model.num_experts >= cfg.model.experts_per_token


@pytest.mark.parametrize("key", ["train.seed", "infer.seed"])
def test_seeds_are_checked_against_torchs_range(key):
    """A seed torch.Generator.manual_seed cannot take is refused with the config, not deep inside a step."""
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        load_config("tiny", [f"{key}={seed}"])
        torch.Generator().manual_seed(seed)  # the range is torch's
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 10**30):
        assert error("tiny", [f"{key}={seed}"]) == (
            f"tiny.yaml: {key}: must be a 64-bit seed (from -2^63 to 2^64-1), got {seed}"
        )
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.Generator().manual_seed(seed)


def test_sampling_overrides_are_finite_and_seeded_in_range():
    base = InferConfig()
    for key in ("temperature", "top_p", "repetition_penalty"):
        for value in (math.inf, math.nan):
            with pytest.raises(ConfigError, match=f"infer.{key}: must be a finite number"):
                base.with_overrides(**{key: value})
    with pytest.raises(ConfigError, match="infer.seed: must be a 64-bit seed"):
        base.with_overrides(seed=2**64)
    assert seed64(SEED_MAX + 3) == 2 and seed64(-1) == SEED_MAX


def test_temperature_and_penalty_keep_float32_logits_finite():
    """Below these bounds logits / temperature (or * penalty) overflow float32 and sampling fails as if the
    weights were damaged: refused up front instead."""
    base = InferConfig()
    assert base.with_overrides(temperature=1e-6).temperature == 1e-6
    assert base.with_overrides(repetition_penalty=1e6).repetition_penalty == 1e6
    with pytest.raises(ConfigError, match=r"infer.temperature: must be 0 \(greedy\) or at least 1e-06, got 1e-30"):
        base.with_overrides(temperature=1e-30)
    for penalty in (1e-7, 1e7):
        with pytest.raises(ConfigError, match=r"infer.repetition_penalty: must be in \[1e-06, 1e\+06\]"):
            base.with_overrides(repetition_penalty=penalty)
