"""What the command groups share: the usage error, flag sets, and the few steps many commands take
(reading a prompt, loading a model pair, starting a local draft worker, linking to a draft)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..engine.defaults import DTYPES

__all__ = ["UsageError", "add_sampling_flags", "add_model_flags", "add_ssd_flags", "add_fanout_budget_flag",
           "add_client_flags", "sampling", "read_prompt", "load_pair", "parse_fanout", "check_k", "split_modes",
           "draft_worker_or_address", "start_local_draft_worker", "draft_client", "write_json"]

DTYPE_CHOICES = [*DTYPES, "auto"]  # auto: lm.resolve_dtype
QUANTIZE_CHOICES = ["int8", "none"]
TOKEN_ENV = "SPECSERVE_TOKEN"


class UsageError(Exception):
    """A bad flag value; printed as `specserve: error: ...`, exit status 2."""


# ---------------------------------------------------------------------------- flag sets

def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")


def add_model_flags(p: argparse.ArgumentParser, draft_required: bool = False) -> None:
    p.add_argument("--target", required=True, help="target model: a directory, a prepared name or a hub id")
    p.add_argument("--draft", required=draft_required, default=None, help="draft model (same tokenizer as the target)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="target dtype (default float32: exact batch to batch; bfloat16 is faster on GPUs and "
                        "on CPUs with AMX/AVX512-BF16, which auto picks; the output is exact for the dtype "
                        "you pick, up to ties at its precision)")
    p.add_argument("--draft-dtype", default="float32", choices=DTYPE_CHOICES,
                   help="draft dtype (never changes the output, only speed; default float32)")
    p.add_argument("--draft-quantize", default="int8", choices=QUANTIZE_CHOICES,
                   help="dynamic int8 quantization of the draft (default int8: never changes the output)")
    p.add_argument("--kernels", default="auto", choices=["auto", "packed", "plain"],
                   help="CPU matmul kernels (default auto: float32 weights packed for oneDNN, and bfloat16 ones where "
                        "the CPU multiplies bf16 natively; packed: bfloat16 too wherever oneDNN can pack it; "
                        "plain: PyTorch's nn.Linear)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def add_ssd_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-address", default=None,
                   help="ssd: host:port of a running `specserve draft-worker` (default: start one locally)")
    p.add_argument("--fanout", default=None,
                   help="ssd: outcomes pre-drafted per position, comma-separated F_0..F_k (default: geometric)")
    p.add_argument("--no-speculate", action="store_true",
                   help="ssd: remote draft without pre-drafting (measures the speculation cache alone)")
    p.add_argument("--draft-timeout", type=float, default=30.0,
                   help="ssd: seconds to wait for a proposal before finishing without the draft (default 30)")
    add_fanout_budget_flag(p, "ssd, the local worker: ")


def add_fanout_budget_flag(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from ..engine.defaults import FANOUT_BUDGET

    p.add_argument("--fanout-budget", type=int, default=None,
                   help=f"{prefix}the most branches a round's speculation drafts (default {FANOUT_BUDGET}; 0 = none)")


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """--address and --token (default $SPECSERVE_TOKEN) for every client of a running server."""
    p.add_argument("--address", default="127.0.0.1:9000", help="the server's gRPC address (default 127.0.0.1:9000)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                   help=f"bearer token, when the server requires one (default: ${TOKEN_ENV})")


# ---------------------------------------------------------------------------- checks and steps

def sampling(args):
    from ..engine.sampling import SamplingParams

    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None


def check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise UsageError(f"--k: the draft length must be >= 1, got {k}")


def split_modes(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def parse_fanout(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        f = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--fanout: give comma-separated counts like 2,1,1,1,3, got {text!r}") from None
    if any(x < 0 for x in f):
        raise UsageError(f"--fanout: counts must be >= 0, got {text!r}")
    return f


def read_prompt(text: str) -> str:
    prompt = sys.stdin.read() if text == "-" else text
    if not prompt or not prompt.strip():
        raise UsageError("--prompt: the prompt is empty; give some text (or pipe it with --prompt -)")
    return prompt


def load_pair(args, draft: str | None, threads: int | None, quiet: bool = False):
    """The target of --target and the draft `draft` (None: no draft), with the model flags."""
    from transformers.utils import logging as hf_logging

    from ..engine.lm import load_model

    hf_logging.disable_progress_bar()  # our own one-line report per model instead
    try:
        target = load_model(args.target, dtype=args.dtype, threads=threads, kernels=args.kernels)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"--target: {e}") from None
    draft_lm = None
    if draft:
        try:
            draft_lm = load_model(draft, dtype=args.draft_dtype, quantize=args.draft_quantize, tokenizer=False,
                                  kernels=args.kernels)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise UsageError(f"--draft: {e}") from None
    for lm in (target, draft_lm):
        if lm is not None and not quiet:
            print(f"loaded {lm.name} ({lm.dtype}, {lm.extra.get('kernels', 'plain')} kernels) "
                  f"in {lm.load_s:.1f}s", file=sys.stderr)
    return target, draft_lm


def draft_worker_or_address(args, ssd: bool):
    """(worker, threads, address) for a command that may run ssd: with --draft-address no worker and
    --threads; else, for ssd, a local worker (close it when done) and the target's threads."""
    if not ssd or args.draft_address:
        if ssd and args.fanout_budget is not None:
            raise UsageError("--fanout-budget is the local worker's: with --draft-address, start that worker "
                             "with `specserve draft-worker --fanout-budget N`, or drop the flag")
        return None, args.threads, args.draft_address
    worker, threads = start_local_draft_worker(args)
    return worker, threads, worker.address


def start_local_draft_worker(args):
    """A draft worker child process on its own core; this process keeps (and is pinned to) the others.

    Returns (worker, threads): the worker (close it when done) and the torch threads the target
    should use (--threads, else one per core left to it).
    """
    from ..pipeline.local_draft_worker import LocalDraftWorker, split_cores

    if args.fanout_budget is not None and args.fanout_budget < 0:
        raise UsageError(f"--fanout-budget must be >= 0 (0 = no speculation branches), got {args.fanout_budget}")
    target_cores, draft_cores = split_cores()
    os.sched_setaffinity(0, target_cores)
    print(f"starting a draft worker on core(s) {sorted(draft_cores)}, target on {sorted(target_cores)}",
          file=sys.stderr)
    worker = LocalDraftWorker(args.draft, threads=1, cores=draft_cores, dtype=args.draft_dtype,
                              quantize=args.draft_quantize, fanout_budget=args.fanout_budget)
    return worker, args.threads or len(target_cores)


def draft_client(address: str, timeout: float, vocab_size: int):
    """A DraftClient to `address` (--draft-address) whose draft shares the target's vocabulary."""
    from ..pipeline.remote_drafter import DraftClient

    client = DraftClient(address, timeout=timeout)
    try:
        client.check_vocab(vocab_size)
    except ValueError as e:
        client.close()
        raise UsageError(f"--draft-address: {e}") from None
    except RuntimeError as e:
        client.close()
        raise UsageError(f"--draft-address: {e}; is `specserve draft-worker` running there?") from None
    return client


def write_json(path: str | None, obj: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)
