"""A throwaway redis-server for tests: a free port on 127.0.0.1, a temp dir, AOF with fsync always.

Never the machine's own Redis (6379): tests may stop, kill and restart this one. restart() keeps
the port and the dir, so what the AOF holds survives it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, dir: str | Path | None = None, port: int | None = None):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            raise RuntimeError("redis-server is not on PATH: install it (apt-get install redis-server)")
        self.dir = Path(dir) if dir is not None else Path(tempfile.mkdtemp(prefix="specserve-redis-"))
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")  # "-LOADING ..." while the AOF loads
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
                "--daemonize", "no", "--logfile", ""]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start; its log:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown), or SIGKILL with kill=True (a crash: only the AOF remains)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, kill: bool = False) -> RedisServer:
        self.stop(kill=kill)
        return self.start()


@contextlib.contextmanager
def private_redis(dir: str | Path):
    """A started RedisServer in `dir`, stopped on exit; skips the test when redis-server is missing."""
    import pytest

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH: install it (apt-get install redis-server) to run the Redis tests")
    server = RedisServer(dir=dir).start()
    try:
        yield server
    finally:
        server.stop()
