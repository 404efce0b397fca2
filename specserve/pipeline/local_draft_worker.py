"""Start a draft worker as a child process on this machine and wait until it listens.

`generate --mode ssd` and `bench` use it when no `--draft-address` is given. By default the
worker gets one core of its own (the last one) and one thread; the caller pins itself to the
other cores, so draft and target run side by side instead of fighting over the same cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

__all__ = ["LocalDraftWorker", "split_cores"]


def split_cores() -> tuple[set[int], set[int]]:
    """(target cores, draft cores) from this process's allowed cores: the last one for the draft."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    return set(cores[:-1]), {cores[-1]}


class LocalDraftWorker:
    """`specserve draft-worker` as a subprocess; `.address` once it listens; `.close()` stops it."""

    def __init__(self, model: str, threads: int = 1, cores: set[int] | None = None, dtype: str = "float32",
                 quantize: str | None = "int8", timeout: float = 300.0, fanout_budget: int | None = None):
        cmd = [sys.executable, "-m", "specserve", "draft-worker", "--model", model, "--port", "0",
               "--threads", str(threads), "--dtype", dtype, "--quantize", quantize or "none"]
        if fanout_budget is not None:
            cmd += ["--fanout-budget", str(fanout_budget)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        self.address = self._wait_listening(timeout)

    def _wait_listening(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                if line.startswith("LISTENING "):
                    found.append(line.split()[1])
                    break
            for _ in self.proc.stdout:  # keep draining so the child never blocks on a full pipe
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the draft worker exited with status {self.proc.returncode} before listening "
                                   "(its error is printed above)")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the draft worker did not listen within {timeout:.0f} s")
            time.sleep(0.05)
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalDraftWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
