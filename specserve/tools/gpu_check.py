"""The GPU check: greedy exactness in every mode on a device, round syncs, then the cost table.

    python -m specserve.tools.gpu_check [--device cuda] [--quick] [--out gpu_costs.json]

(scripts/gpu_check.sh runs it with a time limit.) Part (a), tiny random models (built offline
into a temp dir, fp32 on the device): `generate()` in ar, sd and ssd (a draft worker served in this
process over gRPC, its draft on the same device) and the batching `Engine` at batch 1 and 4 in ar
and sd, with prompts prefilled in chunks, and in ssd at batch 4 (the batched draft worker on the
device), every sequence equal to its own ar run, plus a seeded sampled engine run at batch 1 and 4
(the same tokens: per-row generators); on CUDA every engine round runs under
`torch.cuda.set_sync_debug_mode("warn")`, which must report at most one sync a round. Part (b),
tools/costs.py: random-weight models of the real pair's shapes in bf16, `NativeRunner.forward`
timed by rows x tokens (the draft also at the branch rows of an ssd speculation step at those
batches), written as a cost table for `specserve simulate --costs [--batch 8 | 32]`. `--quick` (tiny
shapes, fewer tokens) runs the same code on the CPU in seconds. Prints one PASS/FAIL line per
check and a summary; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

__all__ = ["main", "exactness_checks"]


class Report:
    def __init__(self):
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, fn) -> None:
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # a check's failure must not stop the others
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
        self.results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)

    def summary(self) -> int:
        failed = [n for n, ok, _ in self.results if not ok]
        print(f"\nSUMMARY: {len(self.results) - len(failed)} passed, {len(failed)} failed"
              + (f" ({', '.join(failed)})" if failed else ""), flush=True)
        return 1 if failed else 0


def _same(got: list[int], ref: list[int], what: str, target=None, prompt=None) -> None:
    """Raise naming the first differing token; with the target, say how close its top two logits were there
    (a gap near 1e-6 is a near-tie that kernels of other shapes may break either way, not a logic error)."""
    if got != ref:
        i = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        gap = ""
        if target is not None:
            top = target.new_cache().forward(list(prompt) + ref[:i], keep=1)[-1].topk(2).values
            gap = f"; the target's top-2 logit gap there is {float(top[0] - top[1]):.2e}"
        raise AssertionError(f"{what}: differs from its ar run at new token {i} (got {got[i:i + 4]}, "
                             f"ar {ref[i:i + 4]}; {len(got)} vs {len(ref)} tokens{gap})")


def _count_syncs(engine, device: str, requests: list) -> tuple[list[int], dict]:
    """Run `requests` through the engine, counting CUDA sync warnings per round (CPU: no counting)."""
    from ..engine.engine import run_to_completion

    per_round: list[int] = []
    if torch.device(device).type != "cuda":
        return per_round, run_to_completion(engine, requests)
    step = engine.step

    def counted():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_round.append(sum("synchroniz" in str(w.message) for w in caught))
        return out
    engine.step = counted
    return per_round, run_to_completion(engine, requests)


def exactness_checks(report: Report, device: str, quick: bool, workdir: Path) -> None:
    from ..engine.engine import Engine, run_to_completion
    from ..engine.lm import load_model
    from ..engine.sampling import SamplingParams
    from ..engine.sequence import Request, SpeculationParams
    from ..engine.single import generate
    from ..engine.speculative import SpecConfig, Stats
    from ..models.tiny import build_tiny
    from ..pipeline.draft_server import serve
    from ..pipeline.drafters import make_drafter
    from ..pipeline.remote_drafter import DraftClient

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: exactness compares argmaxes
    n_new = 12 if quick else 32
    build_tiny(workdir, seed=0)
    lms = {name: load_model(str(workdir / name), dtype="float32", device=device)
           for name in ("target", "draft-same", "draft-random")}
    target, draft = lms["target"], lms["draft-random"]
    tok = target.tokenizer
    prompts = [tok("def add(a, b):\n    return a + b\n")["input_ids"], tok("The quick brown fox")["input_ids"],
               [5], list(range(3, 60))]

    def run(drafter, p, mode, **kw):
        return [t for c in generate(target, drafter, p, n_new, spec=SpecConfig(mode=mode), **kw) for t in c.token_ids]

    refs = [run(None, p, "ar") for p in prompts]

    @contextlib.contextmanager
    def draft_link():
        """A draft worker for the perfect draft, served in this process over gRPC, and a client of it."""
        server = serve(lms["draft-same"], port=0)
        try:
            with DraftClient(server.address, timeout=60) as client:
                yield server, client
        finally:
            server.stop(grace=None)

    def engine_exact(eng, reqs, what: str, count_syncs: bool = True) -> tuple[list[int], dict]:
        """Run `reqs` (one per prompt) through `eng`: every row equal to its ar run, at most one CUDA
        sync a round (when counted); (syncs per round, results)."""
        syncs, res = _count_syncs(eng, device, reqs) if count_syncs else ([], run_to_completion(eng, reqs))
        for i, ((ids, _, _), r, p) in enumerate(zip(res.values(), refs, prompts)):
            _same(ids, r, f"{what} row {i}", target, p)
        if syncs and max(syncs[1:] or [0]) > 1:  # the first round may allocate pinned memory
            raise AssertionError(f"CUDA syncs per round {syncs}: a round must make one host read")
        return syncs, res

    def sd():
        for name in ("draft-random", "draft-same"):
            for i, (p, r) in enumerate(zip(prompts, refs)):
                _same(run(lms[name], p, "sd"), r, f"sd ({name}) prompt {i}", target, p)
    report.check("generate sd == ar (greedy)", sd)

    def ssd():
        with draft_link() as (server, client):
            for i, (p, r) in enumerate(zip(prompts, refs)):
                st = Stats()
                drafter = make_drafter("ssd", p, target.vocab_size, SamplingParams(), client=client,
                                       max_new_tokens=n_new, timeout=60)
                _same(run(drafter, p, "ssd", stats=st), r, f"ssd prompt {i}", target, p)
                if st.fallback:
                    raise AssertionError(f"ssd prompt {i} fell back to ar ({st.fallback}): "
                                         "the ssd path did not run")
            return f"speculation cache hits {server.servicer.stats()['hits']}"
    report.check("generate ssd == ar (greedy, in-process draft worker)", ssd)

    for mode in ("ar", "sd"):
        for batch in (1, 4):
            def engine_case(mode=mode, batch=batch):
                eng = Engine(target, draft if mode == "sd" else None, max_num_seqs=batch, max_model_len=512,
                             k_init=3)
                reqs = [Request(p, n_new, spec=SpeculationParams(mode=mode, k=3 if mode == "sd" else None))
                        for p in prompts]
                syncs, _ = engine_exact(eng, reqs, f"engine {mode}@{batch}")
                if syncs and sum(syncs) == 0:
                    raise AssertionError("set_sync_debug_mode reported no sync at all, not even the round's "
                                         "host read: the count did not work")
                st = eng.stats.to_dict(eng)
                return (f"mean batch {st['mean_batch']}, drafts/row {st['mean_drafts_per_row']}"
                        + (f", syncs per round max {max(syncs)}" if syncs else ""))
            report.check(f"engine {mode} batch {batch} == ar (greedy)", engine_case)

    def chunked():
        eng = Engine(target, draft, max_num_seqs=4, max_model_len=512, k_init=3, max_prefill_tokens=8)
        reqs = [Request(p, n_new, spec=SpeculationParams(mode="sd", k=3)) for p in prompts]
        engine_exact(eng, reqs, "engine sd@4, chunked prefill,")
        if eng.stats.prefill_chunks == 0:
            raise AssertionError("no prompt was prefilled in chunks: the check did not test chunking")
        return f"{eng.stats.prefill_chunks} prefill chunks"
    report.check("engine sd batch 4, prompts prefilled 8 tokens a round, == ar (greedy)", chunked)

    def ssd_batch():
        from ..pipeline.remote_drafter import RemoteDrafter

        with draft_link() as (server, client):  # the batched draft service: a DraftScheduler on the device
            if not server.servicer.batched:
                raise AssertionError("the draft worker did not pick the batched service for a native draft")
            eng = Engine(target, None, max_num_seqs=4, max_model_len=512)
            reqs = [Request(p, n_new, spec=SpeculationParams("ssd", 3), drafter=RemoteDrafter(
                client, p, target.vocab_size, k=3, max_new_tokens=n_new, timeout=60)) for p in prompts]
            _, res = engine_exact(eng, reqs, "engine ssd@4", count_syncs=False)
            for i, (_, _, seq) in enumerate(res.values()):
                if seq.stats.fallback:
                    raise AssertionError(f"ssd row {i} fell back to ar ({seq.stats.fallback})")
            st = server.servicer.stats()
        rate = st["hits"] / max(st["hits"] + st["misses"], 1)
        if rate < 0.9:
            raise AssertionError(f"a draft equal to the target hit its speculation cache {rate:.2f} of the time "
                                 "(>= 0.9 expected): the batched speculation drafts the wrong branches here")
        return f"cache hit rate {rate:.2f}, {st['branches_per_speculation']} branches per speculation"
    report.check("engine ssd batch 4 == ar (greedy, batched draft worker on the device)", ssd_batch)

    def sampled():
        outs = []
        for batch in (1, 4):
            eng = Engine(target, draft, max_num_seqs=batch, max_model_len=512, k_init=3)
            reqs = [Request(p, n_new, sampling=SamplingParams(temperature=0.8, top_k=50), seed=10 + j,
                            spec=SpeculationParams(mode="sd", k=2)) for j, p in enumerate(prompts)]
            outs.append([v[0] for v in _count_syncs(eng, device, reqs)[1].values()])
        if outs[0] != outs[1]:
            raise AssertionError("a seeded sampled sequence changed with its batch companions")
        return f"{sum(map(len, outs[0]))} tokens"
    report.check("engine sd sampled: seeded rows equal at batch 1 and 4", sampled)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specserve.tools.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and fewer tokens (CPU, seconds)")
    ap.add_argument("--out", default="gpu_costs.json", help="where to write the cost table (default gpu_costs.json)")
    ap.add_argument("--dtype", default=None, help="cost-table dtype (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--rows", default="1,8,32", help="rows per forward to time (default 1,8,32)")
    ap.add_argument("--draft-rows", default=None,
                    help="the draft's rows to time (default: --rows and 8 x each, the branch rows of an ssd "
                         "speculation step at those batches: 1,8,32,64,256)")
    ap.add_argument("--tokens", default="1,5", help="new tokens per row to time (default 1,5)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per point, median kept (default 10)")
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--skip-costs", action="store_true")
    a = ap.parse_args(argv)
    from .costs import DTYPES, measure_pair

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"FAIL --device {a.device}: torch {torch.__version__} sees no CUDA GPU (use --device cpu --quick "
              "for the CPU smoke run)")
        return 1
    dtype = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        ap.error(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        rows, tokens = ([int(x) for x in s.split(",")] for s in (a.rows, a.tokens))
        draft_rows = [int(x) for x in a.draft_rows.split(",")] if a.draft_rows else None
    except ValueError:
        ap.error(f"--rows, --draft-rows and --tokens are comma-separated ints, got {a.rows!r}, {a.draft_rows!r} "
                 f"and {a.tokens!r}")
    report = Report()
    print(f"gpu_check: torch {torch.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "") + (", quick" if a.quick else ""))
    if not a.skip_exactness:
        with tempfile.TemporaryDirectory(prefix="specserve-gpu-check-") as tmp:
            exactness_checks(report, a.device, a.quick, Path(tmp))

    def costs():
        table = measure_pair(a.device, dtype, quick=a.quick, rows=rows, tokens=tokens,
                             ctx=16 if a.quick else 128, reps=a.reps, draft_rows=draft_rows)
        table.save(a.out)
        return f"wrote {a.out} ({len(table.target)} target + {len(table.draft)} draft points)"
    if not a.skip_costs:
        report.check(f"cost table ({dtype})", costs)
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
