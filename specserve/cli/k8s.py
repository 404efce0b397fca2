"""`specserve k8s render [--check]`: the Kubernetes manifests' serveConfigV2 (specserve.tools.k8s)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    k = sub.add_parser("k8s", help="Kubernetes manifests: `specserve k8s render [--check]` (see k8s/README.md)")
    k.add_argument("k8s_args", nargs=argparse.REMAINDER, help="render [--check] [--root DIR]")
    k.set_defaults(func=cmd_k8s)


def cmd_k8s(args) -> int:
    from ..tools.k8s import main

    return main(args.k8s_args)
