"""Host data onto the engine's device without a host sync, sampling without a sync, and timing.

Why this module exists: on CUDA three innocent-looking calls stop the host until the GPU's queue
drains, which would put several syncs into every round instead of one:
  * `torch.tensor(list, device="cuda")` and `cpu_tensor.to("cuda")` copy from pageable memory, and
    PyTorch waits for the stream after such a copy (`memcpy_and_sync`). `to_device` stages the
    values in pinned memory and copies with `non_blocking=True` (the caching host allocator keeps
    the pinned block alive until the copy has run), so the host goes on queueing work.
  * `torch.multinomial` checks its input with two `.item()` reads. `draw` is the same exponential
    race that multinomial runs for one sample (argmax of p / Exp(1) noise from the same generator),
    without the checks: on the CPU it returns the same token and leaves the generator in the same
    state (tests/test_batch_gpu.py), on CUDA it stays on the device.
  * `time.perf_counter()` around a CUDA forward measures the launch, not the work. `Clock` marks
    CUDA events on the stream instead; they are read after the round's one host read, when they are
    already complete (no extra sync). On the CPU a mark is `time.perf_counter()`.

This module does not know about models, caches or sequences.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

__all__ = ["to_device", "draw", "Clock", "synchronize"]


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device | str,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (host ints or a CPU tensor) as a tensor on `device`, without waiting for the device."""
    device = torch.device(device)
    host = torch.as_tensor(values, dtype=dtype)
    if host.device == device:
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id ([] long, on probs' device) from probs [V] (a valid distribution: >= 0, sum > 0).

    Equal to `torch.multinomial(probs, 1, generator=generator)[0]`, draw for draw.
    """
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (for timing outside the rounds); nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Time marks on the device's timeline: `seconds(a, b)` once the work between them has run.

    On CUDA a mark is a recorded event, so `seconds` is only asked after the round's host read
    (every event recorded before that read has completed by then).
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a
