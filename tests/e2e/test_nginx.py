"""deploy/nginx.conf in front of the real service process: Debian's nginx on loopback ports.

The internal server block serves the call services; the public one only the admin UI,
RetailCRM's callbacks and the dialplan route. A second proxy hop on the same host (a TLS
terminator, here one more nginx server) sits in front of the public block, so every caller
there looks like 127.0.0.1: no internal route may answer through it.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support.pg import create_enterprise
from tests.support.procs import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
INTERNAL_TOKEN = "internal-token-" + "t" * 32


@dataclass(frozen=True)
class Ports:
    service: int  # the service's internal port (RETAILCRM_PORT)
    service_public: int  # RETAILCRM_PUBLIC_PORT
    internal: int  # nginx's internal block
    public: int  # nginx's public block
    front: int  # the proxy in front of the public block


def _render(ports: Ports, prefix: Path) -> Path:
    site = (REPO / "deploy" / "nginx.conf").read_text()
    for placeholder in ("127.0.0.1:8019", "127.0.0.1:8020", "listen 127.0.0.1:80;", "listen 8080;"):
        assert placeholder in site
    site = (
        site.replace("127.0.0.1:8019", f"127.0.0.1:{ports.service}")
        .replace("127.0.0.1:8020", f"127.0.0.1:{ports.service_public}")
        .replace("127.0.0.1:8021", f"127.0.0.1:{ports.service}")
        .replace("127.0.0.1:8022", f"127.0.0.1:{ports.service_public}")
        .replace("listen 127.0.0.1:80;", f"listen 127.0.0.1:{ports.internal};")
        .replace("listen 8080;", f"listen 127.0.0.1:{ports.public};")
        .replace("/var/log/nginx/retailcrm_access.log", str(prefix / "access.log"))
    )
    (prefix / "retailcrm.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(exist_ok=True)
    main = f"""
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/retailcrm.conf;
    # A TLS terminator on the same host, in front of the public block: it passes the request
    # on as it came, forwarding headers included.
    server {{
        listen 127.0.0.1:{ports.front};
        location / {{
            proxy_pass http://127.0.0.1:{ports.public};
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""
    conf = prefix / "nginx.conf"
    conf.write_text(main)
    return conf


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("nginx exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not listen")


@dataclass(frozen=True)
class Site:
    internal: str  # nginx's internal block
    front: str  # the proxy in front of the public block
    service_public: str  # the service's public port, without nginx
    prefix: Path


@pytest.fixture
def site(database_url: str, tmp_path: Path) -> Iterator[Site]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (apt-get install -y nginx)")
    public_port = free_port()
    env = {"RETAILCRM_PUBLIC_PORT": str(public_port), "RETAILCRM_INTERNAL_TOKEN": INTERNAL_TOKEN}
    with ServiceProcess.service(database_url, env=env) as service:
        for _attempt in range(3):  # a free port can be taken between choosing and binding
            ports = Ports(service.port, public_port, free_port(), free_port(), free_port())
            conf = _render(ports, tmp_path)
            proc = subprocess.Popen(
                [NGINX, "-p", str(tmp_path), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                for port in (ports.internal, ports.public, ports.front):
                    _wait_port(port, proc)
            except RuntimeError:
                proc.kill()
                proc.wait()
                continue
            try:
                yield Site(
                    internal=f"http://127.0.0.1:{ports.internal}",
                    front=f"http://127.0.0.1:{ports.front}",
                    service_public=f"http://127.0.0.1:{public_port}",
                    prefix=tmp_path,
                )
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            return
        raise RuntimeError((tmp_path / "error.log").read_text())


def test_internal_api_admin_and_callbacks_reach_the_service_through_nginx(site: Site) -> None:
    base, prefix = site.internal, site.prefix
    with httpx.Client(base_url=base, timeout=10) as http:
        health = http.get("/retailcrm/api/health")
        admin = http.get("/retailcrm-admin/")
        cache = http.get("/retailcrm/api/config-cache/active-enterprises")
        login = http.get("/retailcrm-admin/login?token=SECRET-IN-QUERY")
        callback = http.get("/retailcrm/make-call")
    assert health.status_code == 200
    assert health.json()["status"] in ("ok", "degraded")
    assert health.json()["database"]["ok"] is True
    assert admin.status_code == 200
    assert "RetailCRM" in admin.text
    assert admin.headers["referrer-policy"] == "no-referrer"
    assert cache.status_code == 200
    assert cache.json() == {"enterprises": [], "count": 0}
    assert login.status_code == 401
    assert login.json()["error"]["code"] == "unauthorized"
    assert callback.status_code not in (502, 504)
    assert callback.headers["content-type"].startswith("application/json")
    access_log = (prefix / "access.log").read_text()
    assert "/retailcrm/api/health" in access_log
    assert "SECRET-IN-QUERY" not in access_log


# Every internal route, as the public side would spell it (nginx maps /retailcrm/api/ to /api/).
INTERNAL_ROUTES = [
    ("GET", "/retailcrm/api/config/0367"),
    ("PUT", "/retailcrm/api/config/0367"),
    ("DELETE", "/retailcrm/api/config/0367"),
    ("POST", "/retailcrm/api/config/0367/test"),
    ("POST", "/retailcrm/api/config-cache/refresh/0367"),
    ("POST", "/retailcrm/api/config-cache/refresh-all"),
    ("GET", "/retailcrm/api/config-cache/active-enterprises"),
    ("POST", "/retailcrm/api/events"),
    ("POST", "/retailcrm/api/events/replay"),
    ("POST", "/retailcrm/api/smart-redirect"),
    ("GET", "/retailcrm/api/user-status/0367"),
    ("GET", "/retailcrm/api/stats"),
    ("GET", "/retailcrm/api/metrics"),
    ("GET", "/retailcrm/api/health"),
]
# Ways around a prefix match, as a client might try them.
DETOURS = [
    "/retailcrm-admin/../retailcrm/api/config/0367",
    "/retailcrm/make-call/../api/config/0367",
    "/retailcrm//api/config/0367",
    "/retailcrm-admin/%2e%2e/api/config/0367",
    "/retailcrm-admin/..%2fapi/config/0367",
    "/retailcrm-admin/%2e%2e%2f%2e%2e%2fapi%2fconfig%2f0367",
    "/api/config/0367",
    "/stats",
    "/metrics",
]
FORGED = {
    "X-Real-IP": "127.0.0.1",
    "X-Forwarded-For": "127.0.0.1",
    "X-Internal-Token": INTERNAL_TOKEN,
}
CONFIG = {"domain": "http://127.0.0.1:9", "api_key": "k" * 32, "enabled": True}


def _config_of(database_url: str) -> object:
    async def read() -> object:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(
                "SELECT integrations_config FROM enterprises WHERE number = '0367'"
            )
        finally:
            await conn.close()

    return asyncio.run(read())


def test_no_internal_route_answers_through_a_proxy_in_front_of_the_public_side(
    site: Site, database_url: str
) -> None:
    async def seed() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await create_enterprise(conn, "0367", integrations={"retailcrm": CONFIG})
        finally:
            await conn.close()

    asyncio.run(seed())
    before = _config_of(database_url)
    answered: list[str] = []
    with httpx.Client(timeout=10) as http:
        for base in (site.front, site.service_public):
            for headers in ({}, FORGED):
                for method, path in INTERNAL_ROUTES + [("GET", p) for p in DETOURS]:
                    url = base + path
                    if base == site.service_public:  # the service itself knows no /retailcrm/api
                        url = base + path.replace("/retailcrm/api/", "/api/", 1)
                    body = {"events": []} if method in ("POST", "PUT") else None
                    reply = http.request(method, url, json=body, headers=headers)
                    if reply.status_code not in (400, 401, 403, 404, 405):
                        answered.append(f"{method} {url} {headers}: {reply.status_code}")
        # The same routes answer on the internal side (so the list above is not a list of typos).
        inside = http.get(site.internal + "/retailcrm/api/config-cache/active-enterprises")
        assert inside.status_code == 200
    assert answered == []
    assert _config_of(database_url) == before


def test_the_public_side_serves_the_admin_ui_callbacks_and_the_dialplan(site: Site) -> None:
    with httpx.Client(base_url=site.front, timeout=10) as http:
        admin = http.get("/retailcrm-admin/")
        login = http.post("/retailcrm-admin/login", data={"clientId": "x" * 43})
        callback = http.get("/retailcrm/make-call", params={"clientId": "x" * 43})
        status = http.post("/retailcrm/status", data={"clientId": "x" * 43})
        dialplan = http.post(
            "/retailcrm/api/callevent/getcustomerdata",
            json={"UniqueId": "1.1", "Phone": "375291234567", "TrunkId": "t1"},
            headers={"Token": "0367"},
        )
    assert admin.status_code == 200
    assert "RetailCRM" in admin.text
    assert admin.headers["referrer-policy"] == "no-referrer"
    for reply in (login, callback, status):
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "unauthorized"
    # The dialplan's own format, from the service (not nginx's 404).
    assert dialplan.text.startswith('{"Name":"","DialPlan":null')
