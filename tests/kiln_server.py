"""Start and stop the real Kiln server (uvicorn on a free loopback port) for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPO = ROOT / "model_repo"


def cache_entries(cache: Path) -> list[Path]:
    """Compile-cache entries: the folders with a manifest (the cache root also holds `auto/` and `monitor/`)."""
    return [p for p in cache.iterdir() if (p / "manifest.json").is_file()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    cache_dir: Path
    repo: Path
    extra_args: list[str] = field(default_factory=list)
    grpc_port: int = 0  # 0: gRPC off

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC server, as tritonclient.grpc wants it."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0, path: str = "/v2/health/ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if http_status(self.url + path, timeout=2) == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"kiln serve not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(repo: Path | None = DEFAULT_REPO, cache_dir: Path | None = None, *, log_dir: Path, args: list[str] = (),
                 env: dict[str, str] | None = None, wait: bool = True, timeout: float = 180.0,
                 cpu: int | None = None, grpc: bool = False, nofile: int | None = None,
                 prefix: list[str] = ()) -> Server:
    """`grpc`: serve gRPC on a free port too (off otherwise, so parallel servers never race for 8001).
    `nofile`: the server's RLIMIT_NOFILE (what `ulimit -n` sets). `prefix`: a command the server runs
    under (valgrind, for bench.monitor --instructions)."""
    port = free_port()
    grpc_port = free_port() if grpc else 0
    cache_dir = cache_dir or (log_dir / "cache")
    log_path = log_dir / f"kiln-{port}.log"
    where = ["--repo", str(repo)] if repo is not None else []  # None: the args name the models (--model_dir)
    cmd = [*prefix, sys.executable, "-m", "service.cli", "serve", *where, "--port", str(port),
           "--cache-dir", str(cache_dir), "--grpc-port", str(grpc_port), *args]
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
    if nofile is not None:  # at once: the server opens its sockets seconds later, after loading models
        import resource

        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    server = Server(proc, port, log_path, cache_dir, repo, list(args), grpc_port)
    if wait:
        try:
            server.wait_ready(timeout)
        except Exception:
            server.stop()
            raise
    return server
