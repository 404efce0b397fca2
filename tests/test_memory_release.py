"""Loading a model gives the heap's freed temporaries back to the OS (glibc's malloc_trim)."""

import pytest

from specserve.engine import lm
from specserve.engine.lm import load_model, release_free_memory
from specserve.serving.replica import rss_mb


def test_freed_heap_pages_leave_the_resident_set():
    if not release_free_memory():
        pytest.skip("the C library is not glibc: nothing to release")
    before = rss_mb()
    blocks = [bytearray(8192) for _ in range(25000)]  # ~200 MiB of heap blocks, under the mmap threshold
    kept = blocks[9::10]  # every tenth stays, the last one too: the freed ones are holes, not the heap's top
    assert rss_mb() - before > 150
    del blocks
    assert rss_mb() - before > 150  # freed, yet still resident
    assert release_free_memory()
    assert rss_mb() - before < 80  # the kept tenth (~20 MiB) and what shares their pages
    del kept

def test_load_model_releases_what_loading_freed(tiny_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(lm, "release_free_memory", lambda: calls.append(1) or True)
    load_model(str(tiny_dir / "target"), tokenizer=False)
    load_model(str(tiny_dir / "draft-random"), quantize="int8", tokenizer=False)
    assert len(calls) == 2
