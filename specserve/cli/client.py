"""Clients of a running server: `specserve chat`, `specserve bench-server`, `specserve loadtest`.

Each takes --address and --token (default $SPECSERVE_TOKEN, for a server with `auth_token`).
"""

from __future__ import annotations

from .common import UsageError, add_client_flags, split_modes, write_json


def register(sub) -> None:
    c = sub.add_parser("chat", help="interactive streaming chat with a running server")
    add_client_flags(c)
    c.add_argument("--session", default="", help="continue this session (default: start a new one)")
    c.add_argument("--session-token", default=None,
                   help="the session_token of --session when it was started elsewhere (its first reply gave it)")
    c.add_argument("--system", default="", help="system prompt of a new session")
    c.add_argument("--max-tokens", type=int, default=None, help="new tokens per reply (default: the server's)")
    c.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's, greedy)")
    c.add_argument("--mode", default=None, choices=["ar", "sd", "ssd"], help="speculation mode (default: the server's)")
    c.set_defaults(func=cmd_chat)

    bs = sub.add_parser("bench-server", help="the bench's prompts through a running server's gRPC API")
    add_client_flags(bs)
    bs.add_argument("--prompts", default="humaneval", help="humaneval | chat | FILE.jsonl (default humaneval)")
    bs.add_argument("--n", type=int, default=5, help="number of prompts (default 5)")
    bs.add_argument("--modes", default="ar,sd,ssd", help="comma-separated, of ar, sd, ssd (default all three)")
    bs.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request (default 128)")
    bs.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; checks exactness)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--out", default=None, help="write the full results as JSON")
    bs.add_argument("--no-warmup", action="store_true")
    bs.set_defaults(func=cmd_bench_server)

    lt = sub.add_parser("loadtest", help="concurrent streaming clients against a running server, for a while")
    add_client_flags(lt)
    lt.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients (default 8)")
    lt.add_argument("--duration", type=float, default=30.0, help="seconds to send requests for (default 30)")
    lt.add_argument("--max-requests", type=int, default=None, help="stop after this many requests (default: none)")
    lt.add_argument("--prompts", default="chat", help="chat | humaneval | FILE.jsonl (default chat)")
    lt.add_argument("--n", type=int, default=20, help="prompts to cycle through (default 20)")
    lt.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    lt.add_argument("--mode", default=None, choices=["ar", "sd", "ssd"], help="speculation mode (default: the server's)")
    lt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; replies are checked for exactness)")
    lt.add_argument("--out", default=None, help="write the summary as JSON")
    lt.set_defaults(func=cmd_loadtest)


def _prompts(spec: str, n: int):
    from ..tools.bench import load_prompts

    try:
        return load_prompts(spec, n)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_chat(args) -> int:
    from ..client import Client
    from ..client.chat import run_chat

    if args.session_token and not args.session:
        raise UsageError("--session-token: give the session it belongs to with --session ID")
    with Client(args.address, token=args.token) as client:
        if args.session_token:
            client.session_tokens[args.session] = args.session_token
        return run_chat(client, args.session, args.system, max_tokens=args.max_tokens,
                        temperature=args.temperature, mode=args.mode)


def cmd_bench_server(args) -> int:
    from ..client import Client, ClientError
    from ..tools.bench import format_table
    from ..tools.bench_server import run_server_bench

    prompts = _prompts(args.prompts, args.n)
    with Client(args.address, token=args.token) as client:
        try:
            result = run_server_bench(client, prompts, split_modes(args.modes), args.max_new_tokens,
                                      args.temperature, args.seed, warmup=not args.no_warmup)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except ClientError as e:
            raise UsageError(f"--address {args.address}: {e}") from None
    print(format_table(result))
    print("stack overhead per request (ms, median): " + ", ".join(
        f"{m} {d['stack_overhead_ms']}" for m, d in result["summary"].items()))
    write_json(args.out, result)
    return 0


def cmd_loadtest(args) -> int:
    from ..tools.loadtest import format_load, run_load

    prompts = [p.text for p in _prompts(args.prompts, args.n)]
    try:
        res = run_load(args.address, prompts, args.concurrency, args.duration, args.max_tokens, args.mode,
                       args.temperature, args.max_requests, args.token)
    except ValueError as e:
        raise UsageError(str(e)) from None
    summary = res.summary()
    print(format_load(summary))
    write_json(args.out, summary)
    return 0 if res.requests and not res.errors and not res.mismatches else 1
