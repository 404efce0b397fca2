"""`specserve generate`: one prompt through a one-slot engine in this process (ar, sd, or ssd with a draft worker)."""

from __future__ import annotations

import json
import sys

from .common import (UsageError, add_model_flags, add_sampling_flags, add_ssd_flags, check_k, draft_client,
                     load_pair, parse_fanout, read_prompt, sampling, draft_worker_or_address)


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt (ar, sd or ssd)")
    add_model_flags(g)
    g.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--mode", default=None, choices=["ar", "sd", "ssd"],
                   help="ar = target alone; sd = speculative, draft in this process; ssd = draft in its own "
                        "process over gRPC, pre-drafting likely outcomes (default: sd when --draft is given, else ar)")
    g.add_argument("--k", type=int, default=None,
                   help="draft length: the most tokens a round drafts (default: the engine's policy chooses k "
                        "in 0-8 every round, for ssd too); a draft ends early after a token the draft "
                        "doubts (< 0.5 probability; sd on the CPU, and ssd)")
    add_ssd_flags(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    mode = args.mode or ("sd" if args.draft else "ar")
    if mode == "sd" and not args.draft:
        raise UsageError("--draft: mode sd needs a draft model; pass --draft PATH or use --mode ar")
    if mode == "ssd" and not (args.draft or args.draft_address):
        raise UsageError("--draft: mode ssd needs --draft PATH (a local worker is started) or --draft-address")
    fanout = parse_fanout(args.fanout)
    check_k(args.k)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    sp = sampling(args)
    prompt = read_prompt(args.prompt)
    worker, threads, address = draft_worker_or_address(args, mode == "ssd")
    try:
        return _generate(args, mode, sp, prompt, fanout, threads, address)
    finally:
        if worker is not None:
            worker.close()


def _generate(args, mode, sp, prompt, fanout, threads, address) -> int:
    from ..engine.single import generate
    from ..engine.speculative import SpecConfig, Stats
    from ..pipeline.drafters import make_drafter

    # ssd drafts in the worker: no draft model in this process
    target, draft = load_pair(args, args.draft if mode == "sd" else None, threads, quiet=args.json)
    ids = target.encode(prompt, args.chat)
    st = Stats()
    spec = SpecConfig(mode=mode, k=args.k)
    out_ids: list[int] = []
    text = []
    client = draft_client(address, args.draft_timeout, target.vocab_size) if mode == "ssd" else None
    try:
        drafter = make_drafter(mode, ids, target.vocab_size, sp, spec, draft=draft, client=client, fanout=fanout,
                               speculate=not args.no_speculate, seed=args.seed, max_new_tokens=args.max_new_tokens)
        for chunk in generate(target, drafter, ids, args.max_new_tokens, sp, spec, args.seed, args.stop, st):
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
        draft_info = draft.describe() if draft is not None else ({"address": address} if mode == "ssd" else None)
        print(json.dumps({"text": "".join(text), "token_ids": out_ids, "mode": mode,
                          "target": target.describe(), "draft": draft_info, "stats": st.to_dict()}))
    else:
        sys.stdout.write("\n")
        extra = (f", cache hits {st.cache_hit_rate:.2f} ({st.late_hits} late), hit answer "
                 f"{1000 * st.hit_wait_s / max(1, st.cache_hits):.1f} ms" if mode == "ssd" else "")
        extra += f", fallback: {st.fallback}" if st.fallback else ""
        print(f"[{mode}] {st.new_tokens} tokens in {st.elapsed_s:.2f}s ({st.tokens_per_s:.1f} tok/s), "
              f"{st.rounds} rounds, acceptance {st.acceptance_rate:.2f}{extra}", file=sys.stderr)
    return 0
