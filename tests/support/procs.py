"""Real processes for end-to-end tests: the service, the sandbox and the reference call service.

    svc = ServiceProcess.service(database_url, env={...})   # retailcrm-service serve
    crm = ServiceProcess.sandbox(api_keys=["KEY"])          # retailcrm-service sandbox
    calls = ServiceProcess.call_service(database_url, targets={"retailcrm": events_url})
    with svc, crm, calls:          # start, wait for /health (or the sandbox's state) to answer
        svc.kill()                 # kill -9
        svc.start()                # same port, same env
    # leaving the block terminates whatever still runs

Every process binds a free 127.0.0.1 port chosen at construction, gets ``DATABASE_URL`` and the
env given, and writes its output to a log file (``proc.log_path``) shown when a start fails.
``InProcessService`` runs ``create_app(settings)`` under uvicorn in a thread (integration tests).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _command(name: str) -> str:
    path = VENV_BIN / name
    return str(path) if path.exists() else name


class ServiceProcess:
    """One real process on a fixed free port; start, wait until ready, kill -9, restart."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        ready_path: str,
        env: Mapping[str, str] | None = None,
        name: str = "proc",
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        # The checkout first on the path: the processes run this tree's code whatever was installed.
        python_path = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        )
        self.env = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"vochi-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def service(cls, database_url: str, *, env: Mapping[str, str] | None = None) -> ServiceProcess:
        port = free_port()
        full_env = {
            "DATABASE_URL": database_url,
            "RETAILCRM_ALLOW_HTTP": "1",
            "RETAILCRM_JWT_SECRET": "e2e-jwt-secret-0123456789abcdef-0123456789abcdef",
            "RETAILCRM_DATA_DIR": tempfile.mkdtemp(prefix="vochi-e2e-"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        argv = [_command("retailcrm-service"), "serve", "--port", str(port)]
        return cls(argv, port=port, ready_path="/health", env=full_env, name="service")

    @classmethod
    def sandbox(
        cls,
        *,
        api_keys: Sequence[str],
        rate_limit: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        port = free_port()
        argv = [_command("retailcrm-service"), "sandbox", "--port", str(port)]
        for key in api_keys:
            argv += ["--api-key", key]
        if not rate_limit:
            argv.append("--no-rate-limit")
        return cls(argv, port=port, ready_path="/_sandbox/state", env=env, name="sandbox")

    @classmethod
    def call_service(
        cls,
        database_url: str,
        *,
        targets: Mapping[str, str],
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        port = free_port()
        argv = [_command("vochi-call-service"), "--port", str(port)]
        for name, url in targets.items():
            argv += ["--target", f"{name}={url}"]
        full_env = {"DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        return cls(argv, port=port, ready_path="/health", env=full_env, name="call-service")

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> ServiceProcess:
        if self.running:
            return self
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the ready path answers with JSON (``/health`` may say "degraded": still up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = httpx.get(self.url + self.ready_path, timeout=1.0)
                body = response.json()
                if response.status_code == 200 or (isinstance(body, dict) and "status" in body):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` the process (its whole session) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL past ``timeout``."""
        if not self.running:
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text("utf-8", errors="replace")[-tail:]
        except OSError:
            return ""

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class InProcessService:
    """``create_app(settings)`` under uvicorn in a thread, on a free port (integration tests)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None

    def __enter__(self) -> InProcessService:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT)
        self._sock.close()


@contextlib.contextmanager
def running(*procs: ServiceProcess) -> Iterator[tuple[ServiceProcess, ...]]:
    """Start several processes; stop them all on exit, whatever happened."""
    started: list[ServiceProcess] = []
    try:
        for proc in procs:
            started.append(proc.start())
        yield procs
    finally:
        for proc in reversed(started):
            proc.stop()
