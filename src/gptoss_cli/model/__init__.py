"""The gpt-oss model: a leaf package that imports only torch and its own config."""

from .config import ModelConfig, ModelConfigError
from .kv_cache import KVCache
from .transformer import ModelOutput, Transformer, attention_mask

__all__ = ["KVCache", "ModelConfig", "ModelConfigError", "ModelOutput", "Transformer", "attention_mask"]
