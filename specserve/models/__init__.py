"""Model packaging: which models specserve knows, how they are prepared, where they live.

The public names are re-exported here lazily, so ``import specserve.models`` costs nothing:
torch and transformers load only when a tiny model is built or a GGUF is converted.  This
package knows nothing about decoding, sampling, Ray or gRPC; the engine loads what it resolves.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("GGUFCheckError", "INSTALL_HINT", "PREPARE_HINT", "PrepareError"), "errors"),
    **dict.fromkeys(("check_gguf", "find_parts", "join_parts", "sort_parts"), "gguf_files"),
    **dict.fromkeys(("prepare", "prepare_model"), "preparation"),
    **dict.fromkeys(
        ("KNOWN_MODELS", "METADATA_FILE", "ModelSpec", "PAIRS", "list_prepared", "model_dir", "resolve_model",
         "specserve_home"),
        "registry",
    ),
    **dict.fromkeys(("TINY_NAMES", "build_tiny", "tiny_config", "tiny_model", "train_tokenizer"), "tiny"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
