"""`python -m tlq_vllm.serve` as a managed subprocess, for benchmarks and tests.

`with ServerProcess(checkpoint, log=...) as url:` starts the launcher in its own process group,
waits until `/health` answers, and on exit (also on an exception, Ctrl-C or SIGTERM: while a
server runs, SIGTERM to the owning process raises SystemExit so the exit path runs) terminates
the whole group, engine core included, then kills what is left: no orphan servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(path: Path, pattern: tuple[str, ...] = ("Error", "error", "Exception")) -> str:
    """The most telling line of a log: the last one naming an error, else the last line."""
    with contextlib.suppress(OSError):
        lines = [x.strip() for x in Path(path).read_text(errors="replace").splitlines() if x.strip()]
        for line in reversed(lines):
            if any(p in line for p in pattern):
                return line[-300:]
        if lines:
            return lines[-1][-300:]
    return "(empty log)"


def wait_until_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    """Returns when GET url/health answers 200; raises when the server exits first or the time is up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {last_line(log_path)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s (log {log_path})")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the group of a process started with start_new_session=True."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    # Stragglers of the group (the engine core) whose leader has already gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through ServerProcess.__exit__, which stops the server


class ServerProcess:
    """A served checkpoint: `with ServerProcess(ckpt, log=path) as url:` (url = http://127.0.0.1:PORT)."""

    def __init__(self, checkpoint: str | Path, *, log: str | Path, preset: str = "cpu", launcher_args=(),
                 vllm_args=("--enforce-eager",), timeout: float = 420.0, cwd: str | Path | None = None):
        self.checkpoint, self.log_path, self.timeout = Path(checkpoint), Path(log), timeout
        self.preset, self.launcher_args, self.vllm_args, self.cwd = preset, list(launcher_args), list(vllm_args), cwd
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.url: str | None = None

    def __enter__(self) -> str:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        port = free_port()
        cmd = [sys.executable, "-m", "tlq_vllm.serve", str(self.checkpoint), "--preset", self.preset,
               "--port", str(port), *self.launcher_args, "--", *self.vllm_args]
        # vLLM's default (engine core in its own process), also under a test conftest that turns it off.
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        self._log = self.log_path.open("w")
        start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=self.cwd)
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(self.proc, self.url, self.log_path, self.timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - start
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        if getattr(self, "_log", None):
            self._log.close()
        if getattr(self, "_previous_sigterm", None) is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __exit__(self, *exc) -> None:
        self.stop()
