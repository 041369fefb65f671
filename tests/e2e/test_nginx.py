"""deploy/nginx.conf in front of the real service process: Debian's nginx on loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.procs import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _render(service_port: int, listen_port: int, prefix: Path) -> Path:
    site = (REPO / "deploy" / "nginx.conf").read_text()
    assert "127.0.0.1:8019" in site
    assert "listen 127.0.0.1:80;" in site
    site = (
        site.replace("127.0.0.1:8019", f"127.0.0.1:{service_port}")
        .replace("127.0.0.1:8020", f"127.0.0.1:{service_port}")
        .replace("listen 127.0.0.1:80;", f"listen 127.0.0.1:{listen_port};")
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


@pytest.fixture
def nginx_in_front(database_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (apt-get install -y nginx)")
    with ServiceProcess.service(database_url) as service:
        for _attempt in range(3):  # a free port can be taken between choosing and binding
            port = free_port()
            conf = _render(service.port, port, tmp_path)
            proc = subprocess.Popen(
                [NGINX, "-p", str(tmp_path), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                _wait_port(port, proc)
            except RuntimeError:
                proc.kill()
                proc.wait()
                continue
            try:
                yield f"http://127.0.0.1:{port}", tmp_path
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            return
        raise RuntimeError((tmp_path / "error.log").read_text())


def test_internal_api_admin_and_callbacks_reach_the_service_through_nginx(
    nginx_in_front: tuple[str, Path],
) -> None:
    base, prefix = nginx_in_front
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
