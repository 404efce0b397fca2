"""The `specserve` command line: one module per command group, each registering its sub-commands.

  generate.py  generate                          (the engine in this process)
  models.py    models tiny | prepare | list      (specserve.models: packaging)
  bench.py     bench, simulate                   (specserve.tools: measuring the engine)
  server.py    serve, draft-worker               (the server and the SSD draft worker)
  client.py    chat, bench-server, loadtest      (clients of a running server)
  k8s.py       k8s render [--check]              (the Kubernetes manifests)

Each sub-command sets `func`; `main` calls it with the parsed flags, which nothing modifies.
Bad input exits with status 2 and one line that names the flag and the fix (`UsageError`).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, client, generate, k8s, models, server
from .common import UsageError

__all__ = ["main", "build_parser", "UsageError"]

GROUPS = (generate, models, bench, server, client, k8s)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specserve", description="Speculative-decoding LLM server and tools.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
