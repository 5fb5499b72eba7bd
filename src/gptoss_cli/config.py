"""The run config: YAML -> typed dataclasses (model, data, train, infer, lora), strict and checked before work.

Every key is checked against the dataclass fields and their type hints: an unknown key, a wrong type
or an inconsistent value raises `ConfigError` with one line naming the file, the dotted key and what
is wrong. `--set section.key=value` overrides go through the same checks. Bare names such as
`compact.yaml` or `tiny` find the configs shipped with the package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .atomic import write_atomic
from .model.config import ModelConfig
from .strict import ConfigError, build_section, coerce

# data/tokenizer.py's 256 byte tokens + its SPECIAL_TOKENS (a test keeps the two in step; importing the
# tokenizer here would load `tokenizers` for every config read).
TOKENIZER_MIN_VOCAB = 256 + 7

# The seeds torch.Generator.manual_seed takes (a negative one counts modulo 2^64); every seed a config or a
# request gives is checked against this range before any work, not deep inside a decode step.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MIN_TEMPERATURE = 1e-6  # below it (but above 0) logits / temperature can overflow float32
MAX_PENALTY = 1e6  # repetition_penalty in [1 / MAX_PENALTY, MAX_PENALTY], for the same reason


# Each section checks itself (validate, naming the key) once its types are right; RunConfig.validate adds
# what spans sections. The meaning of every field is in docs/configs.md, which a test keeps in step with
# these dataclasses (every field documented with its default, none invented).

Label = Callable[[str], str]  # field name -> how an error names it ("train.lr", or a CLI flag)


def _require(ok: bool, label: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{label}: {message}")


def _require_seed(seed: int | None, label: str) -> None:
    _require(
        seed is None or SEED_MIN <= seed <= SEED_MAX,
        label,
        f"must be a 64-bit seed (from -2^63 to 2^64-1), got {seed}",
    )


def seed64(value: int) -> int:
    """A seed derived by arithmetic (seed + choice, seed * k + epoch) brought back into torch's range."""
    return value & SEED_MAX


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # files (see docs/training.md), directories, globs; [] = built-in
    val_fraction: float = 0.05  # share of documents held out for validation
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    text_field: str = "text"  # the field (.jsonl/.json) or column (.parquet) holding each document's text
    tokenizer_sample_bytes: int = 64 * 2**20  # the tokenizer trains on a seeded sample of about this much text
    prepared: str | None = None  # a directory written by `gptoss prepare`: train on its shards (not data.paths)
    invalid_utf8: Literal["error", "replace", "skip"] = "error"  # bytes that are not UTF-8: stop, U+FFFD, drop

    def validate(self) -> None:
        _require(0 <= self.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _require(bool(self.text_field), "data.text_field", "must not be empty")
        _require(
            self.tokenizer_sample_bytes > 0,
            "data.tokenizer_sample_bytes",
            f"must be > 0, got {self.tokenizer_sample_bytes}",
        )
        _require(
            self.prepared is None or not self.paths,
            "data.prepared",
            "a prepared dataset already holds its text; leave data.paths empty",
        )
        _require(self.prepared is None or bool(self.prepared), "data.prepared", "must be a directory (or null)")


@dataclass
class TrainConfig:
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    batch_size: int = 8  # sequences per micro-batch (per process)
    seq_len: int = 256
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # sequences per optimizer step; set it to derive grad_accum_steps
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    aux_loss_coef: float = 0.01  # MoE load-balancing loss; 0 disables it
    z_loss_coef: float = 0.0  # router z-loss; 0 disables it
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 3
    compile: bool = False
    activation_checkpointing: bool = False
    fused_loss: bool = True  # unembedding + cross-entropy chunk by chunk, no (B, T, V) logits
    parallel: Literal["ddp", "fsdp"] = "ddp"  # used under torchrun only
    loggers: list[Literal["tensorboard", "wandb", "csv"]] = field(default_factory=list)  # metrics.jsonl always
    wandb_project: str = "gptoss"
    wandb_name: str | None = None  # the W&B run name; null = the run directory's name

    def validate(self) -> None:
        for key in (
            "batch_size",
            "seq_len",
            "grad_accum_steps",
            "epochs",
            "log_every",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_checkpoints",
        ):
            _require(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.global_batch_size is not None:
            _require(
                self.grad_accum_steps == 1,
                "train.grad_accum_steps",
                f"{self.grad_accum_steps} would be ignored: train.global_batch_size={self.global_batch_size} "
                "derives it; set one of the two",
            )
            _require(
                self.global_batch_size > 0 and self.global_batch_size % self.batch_size == 0,
                "train.global_batch_size",
                f"must be a positive multiple of train.batch_size={self.batch_size}, got {self.global_batch_size}",
            )
        _require(
            self.max_steps is None or self.max_steps > 0,
            "train.max_steps",
            f"must be > 0 (or null), got {self.max_steps}",
        )
        _require(self.lr > 0, "train.lr", f"out of range, got {self.lr}")
        for key in ("beta1", "beta2"):
            _require(0 < getattr(self, key) < 1, f"train.{key}", f"out of range, got {getattr(self, key)}")
        for key in ("warmup_steps", "weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef"):
            _require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(bool(self.wandb_project.strip()), "train.wandb_project", "must not be empty")
        _require_seed(self.seed, "train.seed")


@dataclass
class InferConfig:
    """Generation settings: the run's defaults, and (with CLI or API overrides) what one generation uses."""

    max_new_tokens: int = 50
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # CTRL-style: seen tokens' logits divided (if > 0) or multiplied by it
    seed: int | None = None  # None = a fresh random seed
    stop: list[str] = field(default_factory=list)  # generation ends before any of these strings

    def validate(self, label: Label = lambda key: f"infer.{key}") -> None:
        for key in ("temperature", "top_p", "repetition_penalty"):  # a NaN passes every range check below
            value = getattr(self, key)
            _require(math.isfinite(value), label(key), f"must be a finite number, got {value}")
        _require(self.max_new_tokens > 0, label("max_new_tokens"), f"must be > 0, got {self.max_new_tokens}")
        # The float32 logits are divided by the temperature and multiplied or divided by the penalty: these
        # bounds keep any finite logit finite (sampling would fail on an infinity), with room to spare.
        _require(
            self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
            label("temperature"),
            f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature}",
        )
        _require(self.top_k >= 0, label("top_k"), f"must be >= 0 (0 = off), got {self.top_k}")
        _require(0 < self.top_p <= 1, label("top_p"), f"must be in (0, 1], got {self.top_p}")
        _require(
            1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY,
            label("repetition_penalty"),
            f"must be in [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}], got {self.repetition_penalty}",
        )
        _require(all(self.stop), label("stop"), "stop strings must not be empty")
        _require_seed(self.seed, label("seed"))

    def with_overrides(self, label: Label | None = None, **overrides: Any) -> InferConfig:
        """A copy with every override that is not None applied, validated (errors named by `label`)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown infer settings: {', '.join(sorted(unknown))}")
        out = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        out.stop = list(out.stop)
        out.validate(label or (lambda key: f"infer.{key}"))
        return out


LoraTarget = Literal["attention", "qkv", "out", "router", "experts", "mlp1", "mlp2"]
# The group names a target list may use, and the projections each stands for.
LORA_GROUPS = {"attention": ("qkv", "out"), "experts": ("mlp1", "mlp2")}


@dataclass
class LoraConfig:
    """Low-rank adapters trained on a frozen model (model/lora.py): rank 0 trains every weight instead."""

    rank: int = 0  # r of every adapter; 0 = no adapters (full training)
    alpha: float = 16.0  # the update is (alpha / rank) B A
    dropout: float = 0.0  # dropout on an adapter's input (training only)
    targets: list[LoraTarget] = field(default_factory=lambda: ["attention", "experts"])
    layers: list[int] | None = None  # the blocks adapted; null = all

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def projections(self) -> tuple[str, ...]:
        """The targets with the groups spelled out, in model order: qkv, out, router, mlp1, mlp2."""
        named = {p for t in self.targets for p in LORA_GROUPS.get(t, (t,))}
        return tuple(p for p in ("qkv", "out", "router", "mlp1", "mlp2") if p in named)

    def validate(self) -> None:
        _require(self.rank >= 0, "lora.rank", f"must be >= 0 (0 = no adapters), got {self.rank}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(
            bool(self.targets),
            "lora.targets",
            "must name at least one of attention, qkv, out, router, experts, mlp1, mlp2",
        )
        _require(
            self.layers is None or len(set(self.layers)) == len(self.layers),
            "lora.layers",
            f"lists a layer twice: {self.layers}",
        )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    name: str = "run"  # used for the default run directory name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every section, then what spans sections (the model validated itself when it was built)."""
        self.data.validate()
        self.train.validate()
        self.infer.validate()
        self.lora.validate()
        layers = self.model.num_hidden_layers
        bad = [i for i in self.lora.layers or () if not 0 <= i < layers]
        _require(
            not bad,
            "lora.layers",
            f"layer {bad[0] if bad else 0} does not exist (the model has {layers}: 0..{layers - 1})",
        )
        _require(
            self.train.seq_len <= self.model.max_context_length,
            "train.seq_len",
            f"{self.train.seq_len} exceeds model.max_context_length={self.model.max_context_length}",
        )
        _require(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain name (it names the run directory runs/NAME-DATE), got {self.name!r}",
        )

    def validate_for_training(self) -> None:
        """What only training needs (other stages, e.g. bench, run any model shape): the byte-level tokenizer
        it trains holds every byte plus the special tokens, so the vocabulary must have room for them."""
        need = TOKENIZER_MIN_VOCAB
        _require(
            self.model.vocab_size >= need,
            "model.vocab_size",
            f"{self.model.vocab_size} is too small for the byte-level tokenizer: it needs at least {need} "
            f"(256 bytes + {need - 256} special tokens)",
        )


# ---- locating configs ----------------------------------------------------------------------------


def shipped_config_dirs() -> list[Path]:
    """Where bare config names are looked up: inside an installed wheel, then the source checkout."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "configs", here.parents[1] / "configs") if d.is_dir()]


def shipped_configs() -> list[str]:
    names = {p.stem for d in shipped_config_dirs() for p in d.glob("*.yaml")}
    return sorted(names)


def resolve_config_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.parent == Path("."):
        for d in shipped_config_dirs():
            for candidate in (d / name, d / f"{name}.yaml"):
                if candidate.is_file():
                    return candidate
    known = ", ".join(shipped_configs()) or "none"
    raise ConfigError(f"config not found: {name} (not a file, and not a shipped config: {known})")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "infer": InferConfig,
    "lora": LoraConfig,
}


def config_from_dict(raw: Any, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig; errors are prefixed with `source` (usually the file name)."""
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping with sections {', '.join(SECTIONS)}, got {raw!r}")
        unknown = set(raw) - set(SECTIONS) - {"name"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{key}: unknown section (known: name, {', '.join(SECTIONS)})")
        sections = {k: build_section(cls, raw.get(k), k) for k, cls in SECTIONS.items()}
        name = coerce(raw.get("name", "run"), str, "name")
        cfg = RunConfig(name=name, **sections)
        cfg.validate()
        return cfg
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], '3e-4' parsed as YAML)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][key] = value
    return raw


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path.name}: YAML syntax error{where}: {problem}") from None


def load_config(name: str | Path = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """Load a config by path or shipped name, apply `--set` overrides, validate everything."""
    path = resolve_config_path(str(name))
    raw = read_yaml(path)
    if raw == {}:  # an empty file would silently mean every default: the 1.4B compact model
        raise ConfigError(
            f"{path.name}: the config is empty; give at least one section (model, data, train, "
            f"infer) or a shipped config: {', '.join(shipped_configs())}"
        )
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
        raw.setdefault("name", path.stem)
    return config_from_dict(raw, path.name)


def save_config(cfg: RunConfig, path: Path) -> None:
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # a resume rewrites a run's config
