"""`specserve serve` (local Ray, the Serve application, the public gRPC API) and
`specserve draft-worker` (an SSD draft model on the gRPC speculation stream)."""

from __future__ import annotations

from ..engine.defaults import DRAFT_MAX_LEN, DRAFT_SLOTS
from .common import DTYPE_CHOICES, QUANTIZE_CHOICES, UsageError, add_fanout_budget_flag


def register(sub) -> None:
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
    sv.set_defaults(func=cmd_serve)

    w = sub.add_parser("draft-worker", help="serve a draft model on the gRPC speculation stream (SSD)")
    w.add_argument("--model", required=True, help="draft model: a directory, a prepared name or a hub id")
    w.add_argument("--port", type=int, default=50061, help="port to listen on (0 = any free port; default 50061)")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    w.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    w.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    w.add_argument("--quantize", default="int8", choices=QUANTIZE_CHOICES,
                   help="dynamic int8 quantization (default int8: a draft's dtype never changes the output)")
    add_fanout_budget_flag(w)
    w.add_argument("--max-seqs", type=int, default=DRAFT_SLOTS,
                   help=f"sequences each speculation stream (one per target replica) holds at once; slots a "
                        f"chat's ended turns keep for the next are given up when a new sequence needs one "
                        f"(default {DRAFT_SLOTS})")
    w.add_argument("--max-model-len", type=int, default=DRAFT_MAX_LEN,
                   help=f"longest sequence (prompt + output) a slot holds; longer ones finish without the draft "
                        f"(default {DRAFT_MAX_LEN})")
    w.set_defaults(func=cmd_draft_worker)


def _config(args):
    """The Serve config file with the flags' overrides applied (validated again): (AppConfig, raw dict)."""
    from pathlib import Path

    from pydantic import ValidationError

    try:
        import deployments.config as dconfig
        from deployments.config import DraftConfig, load_serve_config
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
        return type(cfg).model_validate(cfg.model_dump()), raw
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist") from None
    except (ValidationError, ValueError) as e:
        raise UsageError(f"--config {path}: {e}") from None


def cmd_serve(args) -> int:
    from deployments.run import run

    cfg, raw = _config(args)
    grpc_port = args.grpc_port or (raw.get("grpc_options") or {}).get("port", 9000)
    http_port = args.http_port or (raw.get("http_options") or {}).get("port", 8000)
    return run(cfg, grpc_port, http_port, args.host, ask=args.ask, stay=not args.exit)


def cmd_draft_worker(args) -> int:
    from ..engine.defaults import FANOUT_BUDGET
    from ..pipeline.draft_server import run_draft_worker

    budget = FANOUT_BUDGET if args.fanout_budget is None else args.fanout_budget
    if budget < 0:
        raise UsageError(f"--fanout-budget must be >= 0 (0 = no speculation branches), got {budget}")
    if args.max_seqs < 1:
        raise UsageError(f"--max-seqs must be >= 1, got {args.max_seqs}")
    if args.max_model_len < 16:
        raise UsageError(f"--max-model-len must be >= 16, got {args.max_model_len}")
    try:
        return run_draft_worker(args.model, port=args.port, threads=args.threads, dtype=args.dtype,
                                quantize=args.quantize, host=args.host, fanout_budget=budget,
                                max_seqs=args.max_seqs, max_model_len=args.max_model_len)
    except (FileNotFoundError, OSError, ValueError) as e:
        bind = isinstance(e, OSError) and "bind" in str(e)
        raise UsageError(f"--port: {e}" if bind else f"--model: {e}") from None
