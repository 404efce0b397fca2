"""`specserve bench` (the modes on the same prompts, in this process) and `specserve simulate`
(bench traces replayed under a cost model)."""

from __future__ import annotations

import contextlib
import sys

from .common import (UsageError, add_model_flags, add_sampling_flags, add_ssd_flags, check_k, draft_client,
                     load_pair, parse_fanout, sampling, split_modes, draft_worker_or_address, write_json)


def register(sub) -> None:
    b = sub.add_parser("bench", help="compare ar, hf-assisted, sd and ssd on the same prompts")
    add_model_flags(b, draft_required=True)
    b.add_argument("--prompts", default="humaneval", help="humaneval | chat | FILE.jsonl (default humaneval)")
    b.add_argument("--n", type=int, default=20, help="number of prompts (default 20)")
    b.add_argument("--modes", default="ar,hf-assisted,sd", help="comma-separated (default ar,hf-assisted,sd)")
    b.add_argument("--k", type=int, default=None, help="the most draft tokens a round drafts (default: adaptive)")
    b.add_argument("--out", default=None, help="write the full results (records, traces) as JSON")
    b.add_argument("--plot", default=None, help="write a PNG: tokens/s per mode and the acceptance histogram")
    b.add_argument("--no-warmup", action="store_true")
    b.add_argument("--concurrency", default=None,
                   help="comma-separated levels, e.g. 1,8: run ar and sd (and hf-assisted, one request after "
                        "another) with C prompts at a time through the batching engine; the summary gets "
                        "mode@C entries (plain mode entries are then the C = 1 ones)")
    add_ssd_flags(b)
    add_sampling_flags(b)
    b.set_defaults(seed=0, func=cmd_bench)

    si = sub.add_parser("simulate", help="replay bench traces under a cost model (e.g. separate GPUs)")
    si.add_argument("results", help="a `specserve bench --out` JSON file")
    si.add_argument("--verify-ms", type=float, default=20.0, help="target forward, ms (default 20)")
    si.add_argument("--draft-ms", type=float, default=1.5, help="draft step, ms (default 1.5)")
    si.add_argument("--net-ms", type=float, default=0.1, help="target <-> draft round trip, ms (default 0.1)")
    si.add_argument("--spec-factor", type=float, default=1.2,
                    help="cost of a batched branch step relative to a plain draft step (default 1.2)")
    si.add_argument("--costs", default=None, metavar="FILE",
                    help="a measured cost table (scripts/gpu_check.sh writes one): step times by rows x tokens, "
                         "instead of --verify-ms/--draft-ms/--spec-factor")
    si.add_argument("--batch", type=int, default=None,
                    help="with --costs: rows per forward, every row drafting like the trace (default 1)")
    si.add_argument("--branches", type=int, default=None,
                    help="with --costs: candidate outcomes ssd pre-drafts per round (default 8)")
    si.set_defaults(func=cmd_simulate)


def cmd_bench(args) -> int:
    from ..tools.bench import format_table, load_prompts, plot, run_bench

    check_k(args.k)
    sp = sampling(args)
    try:
        prompts = load_prompts(args.prompts, args.n)
    except ValueError as e:
        raise UsageError(str(e)) from None
    modes = split_modes(args.modes)
    if args.concurrency is not None:
        return _bench_levels(args, sp, prompts, modes)
    fanout = parse_fanout(args.fanout)
    with _models_and_link(args, any(m.startswith("ssd") for m in modes)) as (target, draft, client):
        result = run_bench(target, draft, prompts, modes, args.max_new_tokens, sp, args.k, args.seed,
                           warmup=not args.no_warmup, client=client, fanout=fanout)
    return _report(args, result, format_table(result), plot)


@contextlib.contextmanager
def _models_and_link(args, ssd: bool):
    """(target, draft, client) for a bench run: the models of the flags and, for ssd, a DraftClient to
    --draft-address or to a local worker on its own core (then every mode gets the target's cores
    only: a fair split). The link and the worker are closed afterwards; a ValueError is a UsageError."""
    worker, threads, address = draft_worker_or_address(args, ssd)
    client = None
    try:
        target, draft = load_pair(args, args.draft, threads)
        client = draft_client(address, args.draft_timeout, target.vocab_size) if ssd else None
        yield target, draft, client
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            worker.close()


def _report(args, result: dict, table: str, plot) -> int:
    """Print the table and any mismatch, write --out and --plot."""
    print(table)
    for m, d in result["summary"].items():
        if d.get("mismatches"):
            print(f"MISMATCH {m}: {d['mismatch_detail']}", file=sys.stderr)
    write_json(args.out, result)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--concurrency: give comma-separated levels like 1,8, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise UsageError(f"--concurrency: levels must be >= 1, got {text!r}")
    return levels


def _bench_levels(args, sp, prompts, modes) -> int:
    """`bench --concurrency`: the batched modes at each level, through one engine."""
    from ..tools.bench_batch import format_levels, plot_levels, run_levels

    levels = _levels(args.concurrency)
    with _models_and_link(args, "ssd" in modes) as (target, draft, client):
        encoded = [(p, target.encode(p.text, p.chat)) for p in prompts]
        result = run_levels(target, draft, encoded, modes, levels, args.max_new_tokens, sp, args.k, args.seed,
                            warmup=not args.no_warmup, client=client, fanout=parse_fanout(args.fanout))
    return _report(args, result, format_levels(result["summary"]), plot_levels)


def cmd_simulate(args) -> int:
    from ..tools.cost_table import CostTable
    from ..tools.simulate import CostModel, TableCost, format_simulation, load, simulate

    if args.costs is None:
        for flag in ("batch", "branches"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} needs --costs FILE (a measured cost table): add it, or drop --{flag}")
    try:
        if args.costs is not None:
            try:
                table = CostTable.load(args.costs)
            except ValueError as e:
                raise UsageError(f"--costs: {e}") from None
            cost = TableCost(table, args.batch or 1, args.branches or 8, args.net_ms)
        else:
            cost = CostModel(args.verify_ms, args.draft_ms, args.net_ms, args.spec_factor)
        sim = simulate(load(args.results), cost)
    except ValueError as e:
        msg = str(e)
        for name in ("verify_ms", "draft_ms", "net_ms", "spec_factor", "batch", "branches"):
            msg = msg.replace(f"{name} must", f"--{name.replace('_', '-')} must")
        if msg.startswith("the cost table"):
            msg = f"--costs {args.costs}: {msg}"
        raise UsageError(msg) from None
    print(format_simulation(sim, cost))
    return 0
