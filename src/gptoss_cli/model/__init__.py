"""The gpt-oss model: a leaf package that imports only torch and its own config.

ModelConfig loads without torch (the CLI validates configs before importing it); the torch modules are
imported on first use.
"""

from .config import ModelConfig, ModelConfigError

__all__ = [
    "KVCache",
    "KVCacheProtocol",
    "ModelConfig",
    "ModelConfigError",
    "ModelOutput",
    "StaticKVCache",
    "Transformer",
    "attention_mask",
]


def __getattr__(name: str):
    if name in ("KVCache", "KVCacheProtocol", "StaticKVCache"):
        from . import kv_cache

        return getattr(kv_cache, name)
    if name in ("ModelOutput", "Transformer", "attention_mask"):
        from . import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
