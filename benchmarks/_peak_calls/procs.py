"""The measured processes: start, wait until ready, kill, restart; their CPU and RSS.

Every process is a child of the benchmark in its own session, with its output in a log file,
bound to 127.0.0.1. ``Monitor`` samples CPU time and RSS of every process once a second in a
thread; PostgreSQL counts as its postmaster plus its backends (the time of backends that have
exited is in the postmaster's children times, so the total never goes backwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """One child process of the benchmark (a role of ``peak_calls.py``)."""

    def __init__(
        self,
        name: str,
        role: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        log_dir: Path,
        port: int | None = None,
        ready_path: str | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.argv = argv
        self.env = dict(env)
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.retired_cpu = 0.0  # CPU seconds of earlier incarnations (killed, restarted)
        self.last_cpu = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.ps = psutil.Process(self.popen.pid)
        self.last_cpu = 0.0

    async def ready(self, http: httpx.AsyncClient, wait_s: float = 60.0) -> None:
        if self.ready_path is None:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}: {self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                reply = await http.get(self.url + self.ready_path, timeout=2.0)
                if reply.status_code < 500:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {wait_s:.0f}s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cpu(self) -> float:
        """CPU seconds of this process, earlier incarnations included."""
        if self.ps is not None:
            with contextlib.suppress(psutil.Error):
                times = self.ps.cpu_times()
                self.last_cpu = times.user + times.system
        return self.retired_cpu + self.last_cpu

    def rss(self) -> int:
        if self.ps is None:
            return 0
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def kill(self) -> None:
        """SIGKILL, as a crash would; its CPU so far is kept."""
        self.cpu()
        self.retired_cpu += self.last_cpu
        self.last_cpu = 0.0
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        self.ps = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.cpu()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=timeout)


class Postgres:
    """The PostgreSQL server's processes (when it runs on this machine), found from a backend."""

    name = "postgres"
    role = "postgres"

    def __init__(self) -> None:
        self.ps: psutil.Process | None = None
        self.retired_cpu = 0.0
        self.last_cpu = 0.0

    def attach(self, backend_pid: int) -> None:
        """Follow the postmaster of this backend (again after a restart)."""
        self.retired_cpu += self.last_cpu
        self.last_cpu = 0.0
        try:
            self.ps = psutil.Process(psutil.Process(backend_pid).ppid())
        except psutil.Error:
            self.ps = None  # not on this machine (DATABASE_URL elsewhere): not measured

    def cpu(self) -> float:
        if self.ps is not None:
            with contextlib.suppress(psutil.Error):
                own = self.ps.cpu_times()
                total = own.user + own.system + own.children_user + own.children_system
                for child in self.ps.children():
                    with contextlib.suppress(psutil.Error):
                        times = child.cpu_times()
                        total += times.user + times.system
                self.last_cpu = total
        return self.retired_cpu + self.last_cpu

    def rss(self) -> int:
        if self.ps is None:
            return 0
        total = 0
        with contextlib.suppress(psutil.Error):
            # Shared buffers are counted once per backend that touched them: an upper bound.
            total = int(self.ps.memory_info().rss)
            for child in self.ps.children():
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
        return total


class Monitor:
    """Samples CPU and RSS of every process once a second; ``mark()`` starts a new window."""

    def __init__(self) -> None:
        self.procs: list[Proc | Postgres] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._peak_rss: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def add(self, proc: Proc | Postgres) -> None:
        with self._lock:
            self.procs.append(proc)

    def remove(self, proc: Proc | Postgres) -> None:
        with self._lock:
            self.procs.remove(proc)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for proc in self.procs:
                rss = proc.rss()
                self._peak_rss[proc.name] = max(self._peak_rss.get(proc.name, 0), rss)
                proc.cpu()

    def mark(self) -> tuple[float, dict[str, float], dict[str, int]]:
        """(monotonic time, CPU seconds per process, peak RSS per process since the last mark).

        ``cpu["machine"]`` is the busy time of the whole machine (every core, every process):
        what is not ours in it is other work sharing the cores (other engineers' test runs).
        """
        self.sample()
        with self._lock:
            cpu = {p.name: p.cpu() for p in self.procs}
            peaks, self._peak_rss = self._peak_rss, {}
        times = psutil.cpu_times()
        cpu["machine"] = times.user + times.nice + times.system + times.irq + times.softirq
        return time.monotonic(), cpu, peaks

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
