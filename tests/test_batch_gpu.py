"""GPU readiness of the batching engine, checked on the CPU: a round does nothing that would sync on CUDA.

No CUDA here, so the test traces what a round asks of torch instead. `RoundAudit` records, while
`Engine.step()` runs:
  * host reads of a tensor's value (`aten._local_scalar_dense`: `.item()`, `int(t)`, `bool(t)`,
    `if t:`) - each one a sync on CUDA;
  * `multinomial` (it reads its input back with `.item()` on CUDA);
  * tensors made from host data (`aten.lift_fresh`: `torch.tensor(list)`) outside `device.to_device`
    - on CUDA a blocking pageable copy, which waits for the stream;
  * factory calls (`torch.arange/zeros/...`) from engine code without an explicit `device=` equal to
    the engine's - a CPU tensor mixed with device tensors;
  * reads back to the host (`.tolist()`, `.cpu()`, `.numpy()`) from engine code: exactly one a round.
What it cannot see: CUDA itself (pinned-memory copies, events, generator placement are reasoned,
and scripts/gpu_check.sh runs them).
"""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from specserve.engine import device as devmod
from specserve.engine.engine import Engine
from specserve.engine.sampling import SamplingParams
from specserve.engine.scheduler import CostModel, LinearCost
from specserve.engine.sequence import Request, SpeculationParams

ENGINE_DIR = devmod.__file__.rsplit("/", 1)[0] + "/"
FACTORIES = ("arange", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "tensor", "as_tensor")
READS = ("tolist", "cpu", "numpy")
aten = torch.ops.aten


def _caller(skip: int = 2):
    f = sys._getframe(skip)
    return f.f_code.co_filename, f.f_lineno


def _inside_to_device() -> bool:
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "to_device" and f.f_code.co_filename == devmod.__file__:
            return True
        f = f.f_back
    return False


class RoundAudit(TorchDispatchMode):
    def __init__(self, device, watched=(ENGINE_DIR,)):
        super().__init__()
        self.device, self.watched = torch.device(device), watched
        self.syncs, self.untracked, self.reads = [], [], []

    def _watched(self, filename):
        return any(filename.startswith(w) for w in self.watched) and filename != devmod.__file__

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            self.syncs.append(("host read of a tensor value", _where()))
        elif func is aten.multinomial.default:
            self.syncs.append(("multinomial", _where()))
        elif func is aten.lift_fresh.default and not _inside_to_device():
            self.untracked.append(("torch.tensor(host data) outside to_device", _where()))
        return func(*args, **(kwargs or {}))

    def patch(self, monkeypatch):
        for name in FACTORIES:
            orig = getattr(torch, name)

            def wrapped(*a, _orig=orig, _name=name, **kw):
                file, line = _caller()
                if self._watched(file) and ("device" not in kw or torch.device(kw["device"]) != self.device):
                    self.untracked.append((f"torch.{_name} without device={self.device}", f"{file}:{line}"))
                return _orig(*a, **kw)
            monkeypatch.setattr(torch, name, wrapped)
        for name in READS:
            orig = getattr(torch.Tensor, name)

            def read(t, *a, _orig=orig, _name=name, **kw):
                file, line = _caller()
                if self._watched(file):
                    self.reads.append(f"{_name} at {file}:{line}")
                return _orig(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, read)


def _where():
    f = sys._getframe(2)
    while f is not None and not f.f_code.co_filename.startswith(ENGINE_DIR):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


def test_rejection_with_point_mass_drafts_takes_no_host_data(monkeypatch):
    """draft_probs None (every drafting row greedy, or n-gram drafts): the residual of a rejected
    row is built on the device. A round of that kind was rare in the engine test below, so that
    test caught it only now and then."""
    from specserve.engine.sampling import batched_rejection_sample

    V = 6
    p = torch.softmax(torch.arange(2 * 3 + 2, dtype=torch.float32)[:, None] * torch.ones(V), -1)  # [N + B, V]
    draft_ids = torch.tensor([1, 2, 0, 3, 4, 5])  # row 0 drafts 2, row 1 drafts 4
    audit = RoundAudit("cpu")
    audit.patch(monkeypatch)
    with audit:
        batched_rejection_sample(draft_ids, [2, 4], None, p, [None, None], greedy=[True, True])
    assert audit.syncs == [] and audit.untracked == [], (audit.syncs, audit.untracked)


def test_the_audit_sees_each_kind_of_sync(monkeypatch):
    """The audit itself can fail: every pattern it is meant to catch, caught (watching this file)."""
    audit = RoundAudit("cpu", watched=(__file__,))
    audit.patch(monkeypatch)
    p = torch.softmax(torch.ones(4, device="cpu"), -1)
    with audit:
        int(p.argmax())
        torch.multinomial(p, 1)
        torch.tensor([1, 2], device="cpu")
        torch.arange(3)
        p.tolist()
    assert [s[0] for s in audit.syncs] == ["host read of a tensor value", "multinomial"]
    assert [u[0] for u in audit.untracked] == ["torch.tensor(host data) outside to_device",
                                               "torch.arange without device=cpu"]
    assert len(audit.reads) == 1
    clean = RoundAudit("cpu", watched=(__file__,))
    with clean:
        devmod.to_device([1, 2], "cpu")
    assert not clean.syncs and not clean.untracked


def test_a_round_has_one_host_read_and_no_other_sync(tiny, monkeypatch):
    """sd at batch 4 with greedy and sampled rows, ragged prompts, drafts and a prefill beside them."""
    cheap = CostModel(LinearCost(1.0, 0.0), LinearCost(0.01, 0.0))  # drafting always pays: k > 0
    eng = Engine(tiny["target"], tiny["draft-random"], max_num_seqs=4, max_model_len=512, cost=cheap,
                 stop_prob=0.0)  # the CPU-only early stop reads confidences: this round stands for a CUDA one
    warm = SamplingParams(temperature=0.8, top_k=20)
    reqs = [Request([5, 6, 7], 12, seed=1), Request(list(range(3, 40)), 12, sampling=warm, seed=2),
            Request([9] * 5, 12, sampling=SamplingParams(temperature=1.0, top_p=0.9), seed=3,
                    spec=SpeculationParams(mode="sd", k=3)),
            Request([11, 12], 12, spec=SpeculationParams(mode="ar"))]
    for r in reqs[:3]:
        eng.add(r)
    audit = RoundAudit(eng.device)
    audit.patch(monkeypatch)
    rounds = 0
    while eng.has_work():
        if rounds == 2:
            eng.add(reqs[3])  # a prefill beside the others' verification
        audit.reads.clear()
        with audit:
            eng.step()
        assert audit.syncs == [] and audit.untracked == [], (audit.syncs, audit.untracked)
        assert len(audit.reads) == 1, audit.reads  # the round's one host read
        rounds += 1
    assert eng.stats.draft_tokens > 0 and eng.stats.row_rounds > rounds


def test_draw_is_multinomial_draw_for_draw():
    for seed, V in [(0, 7), (1, 1000), (2, 32000)]:
        p = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3, -1)
        p[::3] = 0.0
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        a = [int(torch.multinomial(p, 1, generator=g1)[0]) for _ in range(50)]
        b = [int(devmod.draw(p, g2)) for _ in range(50)]
        assert a == b and torch.equal(g1.get_state(), g2.get_state())


def test_to_device_and_clock_on_the_cpu():
    t = devmod.to_device([3, 1, 2], "cpu")
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2] and t.device.type == "cpu"
    assert devmod.to_device(torch.tensor([1.5]), "cpu", dtype=torch.float32).dtype == torch.float32
    clock = devmod.Clock("cpu")
    a = clock.mark()
    b = clock.mark()
    assert clock.seconds(a, b) >= 0 and not clock.cuda
    devmod.synchronize("cpu")  # a no-op off CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs this there)")
def test_to_device_on_cuda_is_non_blocking_from_pinned_memory():
    t = devmod.to_device(list(range(1000)), "cuda")
    assert t.is_cuda and t.tolist() == list(range(1000))
