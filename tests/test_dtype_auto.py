"""dtype "auto": bfloat16 where the device multiplies it natively, float32 elsewhere and for int8."""

import pytest
import torch

from specserve.engine import lm
from specserve.engine.kernels import native_bf16
from specserve.engine.lm import load_model, resolve_dtype


def test_auto_follows_the_cpu_and_the_gpu(monkeypatch):
    assert resolve_dtype("float16", "cpu") == "float16"  # an explicit dtype is kept
    monkeypatch.setattr(lm, "native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu", quantize="int8") == "float32"  # int8 quantizes a float32 model
    monkeypatch.setattr(lm, "native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == "float32"


def test_load_model_with_auto_records_the_dtype_it_chose(tiny_dir):
    m = load_model(str(tiny_dir / "target"), dtype="auto", tokenizer=False)
    want = "bfloat16" if native_bf16() else "float32"
    assert m.dtype == want and next(m.model.parameters()).dtype == getattr(torch, want)
    assert m.extra["kernels"] == "packed"  # float32, or bf16 on a CPU that has the instructions
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        load_model(str(tiny_dir / "target"), dtype="fp8")
