"""Several service instances on one PostgreSQL, run from the systemd unit's command line behind
Debian nginx's upstream (deploy/): one is killed with SIGKILL during a stream of fixture calls,
nothing is lost and the other keeps serving; nginx passes an event batch that an instance dying
mid-request had taken on to the other one; an instance with a development set-up refuses to join
running ones."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.translate import Skipped, Translator
from tests.support.pipeline import (  # noqa: F401  (api_key, crm, enterprise: pytest fixtures)
    ACCOUNT,
    FAST_ENV,
    api_key_fixture,
    crm_fixture,
    enterprise_fixture,
    expected_calls,
    fixture_records,
    run_async,
    sandbox_state,
    wait_drained,
)
from tests.support.procs import REPO_ROOT, ServiceProcess, _command, free_port

pytestmark = pytest.mark.slow

DEPLOY = REPO_ROOT / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ROUNDS = 8
KILL_AFTER = 3


def unit_command(port: int) -> list[str]:
    """``ExecStart`` of deploy/systemd/retailcrm-service@.service for instance ``port``."""
    unit = (DEPLOY / "systemd" / "retailcrm-service@.service").read_text()
    line = re.search(r"^ExecStart=(.+)$", unit, re.M)
    assert line is not None
    argv = shlex.split(line.group(1).replace("%i", str(port)))
    assert Path(argv[0]).name == "retailcrm-service"
    return [_command("retailcrm-service"), *argv[1:]]


def instance(database_url: str, **env: str) -> ServiceProcess:
    port = free_port()
    full_env = {
        "DATABASE_URL": database_url,
        "RETAILCRM_ALLOW_HTTP": "1",
        "RETAILCRM_JWT_SECRET": "scale-out-jwt-secret-0123456789abcdef-0123456789",
        "RETAILCRM_DATA_DIR": tempfile.mkdtemp(prefix="vochi-instance-"),
        "PYTHONUNBUFFERED": "1",
        **FAST_ENV,
        **env,
    }
    return ServiceProcess(
        unit_command(port), port=port, ready_path="/health", env=full_env, name="instance"
    )


def _render_nginx(ports: list[int], listen: int, prefix: Path) -> Path:
    site = (DEPLOY / "nginx.conf").read_text()
    block = re.search(r"upstream retailcrm_service \{(.*?)\}", site, re.S)
    assert block is not None
    upstream = re.findall(r"server 127\.0\.0\.1:(\d+)", block.group(1))
    assert len(upstream) >= 2, "the upstream lists several instances"
    for default, port in zip(upstream, ports, strict=False):
        site = site.replace(f"127.0.0.1:{default} ", f"127.0.0.1:{port} ")
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{free_port()};")
    site = site.replace("listen 127.0.0.1:80;", f"listen 127.0.0.1:{listen};").replace(
        "/var/log/nginx/retailcrm_access.log", str(prefix / "access.log")
    )
    (prefix / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {name}_temp_path {prefix}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / name).mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    # user root: nginx started as root runs its workers as nobody, who cannot enter the test's
    # private temporary directory, and then answers 500 to every request body too large to be
    # buffered in memory (a batch of more than a few events), which the call service retries.
    conf.write_text(
        f"user root;\nworker_processes 1;\ndaemon off;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n{temp}\n    include {prefix}/site.conf;\n}}\n"
    )
    return conf


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Any]:
    """A function starting nginx in front of the given instance ports; yields its base URL."""
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (apt-get install -y nginx)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(ports: list[int]) -> str:
        listen = free_port()
        conf = _render_nginx(ports, listen, tmp_path)
        proc = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(conf)], stderr=subprocess.PIPE
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", listen), timeout=0.2):
                    return f"http://127.0.0.1:{listen}"
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen")

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _round(record: dict[str, Any], n: int) -> dict[str, Any]:
    """The fixture webhook as the ``n``th copy of its call (its own UniqueId)."""
    body = dict(record["body"])
    body["UniqueId"] = f"{body['UniqueId']}{n:03d}"
    return body


def _outbox_keys(database_url: str) -> list[str]:
    async def keys(conn: Any) -> list[str]:
        rows = await conn.fetch("SELECT idempotency_key FROM retailcrm_outbox")
        return [r["idempotency_key"] for r in rows]

    return run_async(keys, database_url)  # type: ignore[no-any-return]


def _forwarded(enterprise: str) -> dict[str, bool]:
    """The events the call service makes of the stream's webhooks (its own translation, its
    default options): idempotency key -> whether the event is a popup."""
    translate = Translator()
    events = {}
    for n in range(ROUNDS):
        for record in fixture_records():
            event = translate(record["event"], _round(record, n), enterprise_number=enterprise)
            if not isinstance(event, Skipped):
                events[event.idempotency_key] = event.is_popup
    return events


def _settled(target: dict[str, Any]) -> bool:
    """Whether the call service has nothing left to send: each event delivered or dropped."""
    done = target["delivered"] + sum(target["dropped"].values())
    return not target["queued"] and not target["in_flight"] and done >= target["enqueued"]


def _outbox_states(database_url: str) -> dict[str, int]:
    async def states(conn: Any) -> dict[str, int]:
        rows = await conn.fetch("SELECT state, count(*) AS n FROM retailcrm_outbox GROUP BY 1")
        return {r["state"]: r["n"] for r in rows}

    return run_async(states, database_url)  # type: ignore[no-any-return]


def test_an_instance_killed_mid_stream_loses_nothing_and_the_other_keeps_serving(
    database_url: str, crm: ServiceProcess, enterprise: str, nginx: Any
) -> None:
    first, second = instance(database_url), instance(database_url)
    with first, second:
        base = nginx([first.port, second.port])
        events_url = f"{base}/retailcrm/api/events"
        with (
            ServiceProcess.call_service(database_url, targets={"retailcrm": events_url}) as calls,
            httpx.Client(timeout=10) as http,
        ):
            for n in range(ROUNDS):
                if n == KILL_AFTER:
                    # Kill the instance that has taken events (the call service batches, so
                    # nginx may have sent all of the few POSTs so far to one of them). The
                    # webhooks were answered before their events were sent: the first batches,
                    # on instances just started, may still be committing.
                    taken = time.monotonic() + 10
                    while True:
                        accepted = [
                            http.get(f"{proc.url}/stats").json()["outbox"]["intake"]["accepted"]
                            for proc in (first, second)
                        ]
                        if sum(accepted) > 0 or time.monotonic() > taken:
                            break
                        time.sleep(0.05)
                    assert sum(accepted) > 0
                    if accepted[0] == 0:
                        first, second = second, first
                    first.kill()  # SIGKILL: leases lapse, the other instance takes over
                for record in fixture_records():
                    body = _round(record, n)
                    response = http.post(
                        f"{calls.url}/{record['event']}",
                        json=body,
                        headers={"Token": body["Token"]},
                    )
                    assert response.status_code == 200, response.text
            deadline = time.monotonic() + 60
            while True:
                target = http.get(f"{calls.url}/stats").json()["targets"]["retailcrm"]
                if target["enqueued"] == 12 * ROUNDS and _settled(target):
                    break
                assert time.monotonic() < deadline, target
                time.sleep(0.2)
            asyncio.run(wait_drained(database_url, timeout=60))
            still_serving = http.get(f"{base}/retailcrm/api/health")
        assert not first.running
        assert second.running

    # The call service acknowledged every webhook at once and may drop a popup that a failed
    # attempt made pointless (superseded by its call's hangup, or expired), on purpose and
    # counted; it gives up on nothing else. Every event the service acknowledged is in the
    # outbox, once (unique keys), and so is every hangup: only such popups may be missing.
    forwarded = _forwarded(enterprise)
    assert len(forwarded) == target["enqueued"] == 12 * ROUNDS
    dropped = target["dropped"]
    on_purpose = dropped.pop("superseded") + dropped.pop("expired")
    assert dropped == dict.fromkeys(dropped, 0), target  # overflow, rejected, shutdown
    assert target["rejected"] == 0
    assert target["delivered"] + on_purpose == target["enqueued"], target
    stored = _outbox_keys(database_url)
    assert len(stored) == len(set(stored))
    assert set(stored) <= set(forwarded)
    missing = set(forwarded) - set(stored)
    assert all(forwarded[key] for key in missing), sorted(missing)  # no history is missing
    # At least every acknowledged event: a popup dropped after an attempt that failed late (a
    # reply cut off by the kill, a timeout) may have been stored all the same (then the call
    # service counted it dropped, not delivered).
    assert len(stored) >= target["delivered"], (sorted(missing), target)
    assert len(missing) <= on_purpose
    states = _outbox_states(database_url)
    assert set(states) <= {"delivered", "skipped", "expired", "superseded"}, states
    account = sandbox_state(crm)["accounts"][ACCOUNT]
    history = [c["externalId"] for c in account["calls"]]
    assert sorted(history) == sorted(
        f"{call}{n:03d}" for call in expected_calls() for n in range(ROUNDS)
    )
    assert still_serving.status_code == 200
    assert still_serving.json()["database"]["ok"] is True


class _Upstream:
    """A stand-in instance on a free port: it reads each request whole, then answers 202, or
    closes the connection without a word (``dies``: an instance killed mid-request)."""

    def __init__(self, *, dies: bool) -> None:
        self.dies = dies
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length and len(body) < int(length.group(1)) and (chunk := conn.recv(65536)):
                    body += chunk
                if not head:
                    continue
                self.requests.append(head.split(b"\r\n", 1)[0])
                if not self.dies:
                    reply = b'{"accepted":0,"duplicates":0,"rejected":[]}'
                    conn.sendall(
                        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply)
                    )

    def close(self) -> None:
        self.sock.close()


def test_nginx_passes_a_batch_taken_by_an_instance_that_died_on_to_the_other(nginx: Any) -> None:
    # The events endpoint is idempotent: nginx resends a POST already sent to an instance that
    # failed it to the next one (proxy_next_upstream ... non_idempotent) instead of answering
    # 502, which would make the call service retry later and drop popups as superseded.
    dying, alive = _Upstream(dies=True), _Upstream(dies=False)
    try:
        base = nginx([dying.port, alive.port])
        body = {"events": []}
        with httpx.Client(timeout=10) as http:
            # Round robin: one of two batches goes to the dying instance first.
            replies = [http.post(f"{base}/retailcrm/api/events", json=body) for _ in range(2)]
    finally:
        dying.close()
        alive.close()
    assert [r.status_code for r in replies] == [202, 202]
    assert dying.requests == [b"POST /api/events HTTP/1.1"]
    assert alive.requests == [b"POST /api/events HTTP/1.1"] * 2


def test_an_instance_without_a_shared_jwt_secret_refuses_to_join_a_running_one(
    database_url: str,
) -> None:
    with instance(database_url) as running:
        assert running.running
        env = {
            **os.environ,
            **instance(database_url).env,
            "RETAILCRM_JWT_SECRET": "",
        }
        # The running instance registered at its first delivery sweep, before /health answered.
        result = subprocess.run(
            unit_command(free_port()),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the log line about the secret
    assert error.startswith("retailcrm-service: refusing to start beside 1 running instance")
    assert "RETAILCRM_JWT_SECRET" in error
