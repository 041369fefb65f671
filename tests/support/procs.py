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
``ThreadedServer`` runs any ASGI app under uvicorn in a thread with its own event loop, on a port
it picked free; it can go down and come back on the same port (while down, the port stays bound
but not listening, so connections are refused and no other process can take it).
``InProcessService`` is one running ``create_app(settings)`` with its lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
ASGIApp = Callable[..., Any]


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


def _bound_socket(port: int = 0, *, listen: bool = True) -> socket.socket:
    # proto=IPPROTO_TCP: asyncio then sets TCP_NODELAY on accepted sockets (no 40 ms Nagle stalls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    if listen:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


class ThreadedServer:
    """uvicorn in a background thread; ``stop()`` / ``start()`` keep the same port."""

    def __init__(self, app: ASGIApp, *, lifespan: str = "auto") -> None:
        self.app = app
        self.lifespan = lifespan
        self._placeholder: socket.socket | None = _bound_socket(listen=False)
        self.port: int = self._placeholder.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert self._server is None, "already running"
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        sock = _bound_socket(self.port)
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan=self.lifespan, access_log=False
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self, *, hold_port: bool = True) -> None:
        """Shut down (draining open requests); with ``hold_port``, keep the port refused."""
        if self._server is None:
            return
        self._server.should_exit = True
        assert self._thread is not None
        self._thread.join(30)
        self._server = None
        if hold_port:
            self._placeholder = _bound_socket(self.port, listen=False)

    def close(self) -> None:
        self.stop(hold_port=False)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessService(ThreadedServer):
    """``create_app(settings)`` under uvicorn in a thread, on a free port (integration tests)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, lifespan="on")
