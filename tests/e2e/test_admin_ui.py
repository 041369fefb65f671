"""The admin UI in headless Chromium (Playwright) against real processes: the service, the
RetailCRM sandbox, the reference call service and PostgreSQL.

One walk through an admin's whole workflow (login link, connection, managers, a call in the
journal, replay, logout, delete), with the security rules checked on the way: CSRF, another
enterprise's pages, no secret in anything the browser receives, no horizontal scrolling at 360 px.
Screenshots of every page are written under the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from retailcrm_service.security import admin_auth as auth
from retailcrm_service.security.secrets import Secret
from retailcrm_service.settings import Settings
from tests.support.pipeline import FAST_ENV, fixture_records, run_async, wait_drained
from tests.support.procs import ServiceProcess

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
NUMBER = "0367"
OTHER = "0400"
ACCOUNT = "acme"
MANAGERS = [
    {"id": 19, "firstName": "Иван", "lastName": "Петров", "email": "petrov@example.by"},
    {"id": 20, "firstName": "Анна", "lastName": "Сидорова", "email": "sidorova@example.by"},
    {"id": 21, "firstName": "Олег", "lastName": "Смирнов", "email": "smirnov@example.by"},
]
PLATFORM_USERS = {"150": ("Кузнецова", "Ольга"), "151": ("Орлов", "Пётр"), "152": ("Ли", "Вера")}
# A call of the fixture that rings extension 150 (an incoming call nobody answered).
CALL_ID = "1764150100.205"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
]


async def _seed_platform(conn: asyncpg.Connection) -> None:
    for number, token in ((NUMBER, "375291110001"), (OTHER, "375291110400")):
        await conn.execute(
            """INSERT INTO enterprises (number, name, name2, secret) VALUES ($1, $2, $3, $4)""",
            number,
            f"Enterprise {number}",
            token,
            f"{number:0>32}",
        )
    for ext, (last, first) in PLATFORM_USERS.items():
        user_id = await conn.fetchval(
            """INSERT INTO users (enterprise_number, first_name, last_name)
               VALUES ($1, $2, $3) RETURNING id""",
            NUMBER,
            first,
            last,
        )
        await conn.execute(
            """INSERT INTO user_internal_phones (user_id, phone_number, enterprise_number)
               VALUES ($1, $2, $3)""",
            user_id,
            ext,
            NUMBER,
        )


async def _retailcrm_config(conn: asyncpg.Connection) -> dict[str, Any]:
    raw = await conn.fetchval(
        "SELECT integrations_config FROM enterprises WHERE number = $1", NUMBER
    )
    return dict(json.loads(raw or "{}").get("retailcrm") or {})


def _in_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on a thread of its own: Playwright's sync API holds this thread's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def _config(database_url: str) -> dict[str, Any]:
    return _in_thread(run_async, _retailcrm_config, database_url)  # type: ignore[no-any-return]


def _module(crm: ServiceProcess) -> dict[str, Any] | None:
    state = httpx.get(crm.url + "/_sandbox/state", timeout=10).json()
    modules = state["accounts"][ACCOUNT]["modules"]
    return modules.get("vochi-telephony", {}).get("module") if modules else None


def _codes(module: dict[str, Any] | None) -> dict[str, str]:
    telephony = ((module or {}).get("integrations") or {}).get("telephony") or {}
    return {str(c["userId"]): str(c["code"]) for c in telephony.get("additionalCodes") or []}


def _login_link(service: ServiceProcess) -> str:
    """What ``retailcrm-service token 0367`` prints (the platform's one-time link)."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "retailcrm-service"), "token", NUMBER],
        env={**service.env, "RETAILCRM_PUBLIC_URL": service.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def stack(database_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess, str]]:
    key = secrets.token_hex(16)
    run_async(_seed_platform, database_url)
    with ServiceProcess.sandbox(api_keys=[], rate_limit=False) as crm:
        httpx.post(
            crm.url + "/_sandbox/seed",
            json={"accounts": [{"name": ACCOUNT, "api_key": key, "users": MANAGERS}]},
            timeout=10,
        ).raise_for_status()
        with ServiceProcess.service(database_url, env=FAST_ENV) as service:
            yield service, crm, key


class Browser:
    """One Chromium page that remembers every text body it received (for the secrets check)."""

    def __init__(self, pw: Any, shots: Path) -> None:
        self.browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        self.context = self.browser.new_context(
            viewport={"width": 1200, "height": 900}, locale="ru-RU", timezone_id="Europe/Minsk"
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.shots = shots
        self.received: list[str] = []
        self.page.on("response", self._keep)

    def _keep(self, response: Any) -> None:
        try:
            kind = response.headers.get("content-type", "")
            if any(t in kind for t in ("html", "json", "javascript", "css", "text")):
                self.received.append(response.text())
        except Exception:  # a body of a redirect or an aborted navigation
            pass

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def narrow_fits(self, name: str) -> None:
        """At 360 px the page does not scroll sideways; the narrow screenshot is kept too."""
        self.page.set_viewport_size({"width": 360, "height": 740})
        width = self.page.evaluate("document.documentElement.scrollWidth")
        self.page.screenshot(path=str(self.shots / f"{name}-360.png"), full_page=True)
        self.page.set_viewport_size({"width": 1200, "height": 900})
        assert width <= 360, f"{name}: scrolls horizontally at 360 px ({width} px wide)"

    def close(self) -> None:
        self.context.close()
        self.browser.close()


def test_admin_walks_login_connection_managers_journal_replay_logout_and_delete(
    stack: tuple[ServiceProcess, ServiceProcess, str],
    database_url: str,
    tmp_path: Path,
) -> None:
    service, crm, key = stack
    shots = tmp_path / "screenshots"
    shots.mkdir()
    base = f"{service.url}/retailcrm-admin/{NUMBER}"
    with playwright_sync.sync_playwright() as pw:
        ui = Browser(pw, shots)
        page = ui.page
        try:
            # -- the login link: exchanged for the cookie, the token gone from the address bar
            first = page.goto(_login_link(service))
            assert page.url == base + "/"
            assert "token" not in page.url
            headers = first.all_headers()
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert "script-src 'self'" in headers["content-security-policy"]
            assert "unsafe-inline" not in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            for name in ("Подключение", "Менеджеры", "Журнал", "Диагностика"):
                assert page.get_by_role("link", name=name).is_visible()

            # -- «Подключение»: test shows the key's scopes, then save and register
            page.get_by_label("Адрес RetailCRM").fill(crm.url)
            page.get_by_label("API-ключ").fill(key)
            assert page.get_by_label("Интеграция включена").is_checked()
            page.get_by_role("button", name="Проверить подключение").click()
            result = page.locator("#connection-result")
            result.get_by_text("Подключение работает").wait_for()
            assert "telephony_write" in result.inner_text()
            page.get_by_role("button", name="Сохранить и зарегистрировать").click()
            result.get_by_text("Модуль телефонии зарегистрирован").wait_for()
            module = _module(crm)
            assert module is not None
            assert module["active"] is True
            page.reload()
            assert page.get_by_label("API-ключ").input_value() == ""
            assert f"…{key[-4:]}" in page.locator("#api_key_hint").inner_text()
            ui.shot("1-connection")
            ui.narrow_fits("1-connection")
            # The keyboard alone: Tab reaches the test button, Enter runs the saved-key test.
            result.evaluate("box => { box.textContent = ''; }")
            for _ in range(40):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.textContent") == "Проверить подключение":
                    break
            page.keyboard.press("Enter")
            result.get_by_text("Подключение работает").wait_for()

            # -- «Менеджеры»: 150 to Петров, then to Сидорова: one owner, RetailCRM agrees
            page.get_by_role("link", name="Менеджеры").click()
            petrov = page.get_by_role("combobox", name="Петров Иван")
            sidorova = page.get_by_role("combobox", name="Сидорова Анна")
            assert "150 — Кузнецова Ольга" in petrov.inner_text()
            petrov.select_option(label="150 — Кузнецова Ольга")
            page.get_by_role("button", name="Сохранить назначения").click()
            page.locator("#managers-result").get_by_text("отправлены в RetailCRM").wait_for()
            config = _config(database_url)
            client_id = config["clientId"]
            assert config["user_extensions"] == {"19": "150"}
            assert _codes(_module(crm)) == {"19": "150"}

            sidorova.select_option(label="150 — Кузнецова Ольга")
            assert petrov.input_value() == ""
            assert "перейдёт от «Петров Иван»" in page.locator("#moves").inner_text()
            ui.shot("2-managers-moving")
            page.get_by_role("button", name="Сохранить назначения").click()
            page.locator("#managers-result").get_by_text("отправлены в RetailCRM").wait_for()
            config = _config(database_url)
            owners = [u for u, ext in config["user_extensions"].items() if ext == "150"]
            assert owners == ["20"]
            assert _codes(_module(crm)) == {"20": "150"}
            page.reload()
            assert page.get_by_role("combobox", name="Сидорова Анна").input_value() == "150"
            ui.shot("2-managers")
            ui.narrow_fits("2-managers")

            # -- a fixture call through the call service, then its trace in «Журнал»
            targets = {"retailcrm": service.url + "/api/events"}
            with (
                ServiceProcess.call_service(database_url, targets=targets) as calls,
                httpx.Client(timeout=10) as http,
            ):
                for record in fixture_records():
                    body = record["body"]
                    if body.get("UniqueId") != CALL_ID:
                        continue
                    sent = http.post(
                        f"{calls.url}/{record['event']}",
                        json=body,
                        headers={"Token": body["Token"]},
                    )
                    assert sent.status_code < 300, sent.text
                _wait_for_rows(database_url)
            states = _in_thread(asyncio.run, wait_drained(database_url))
            assert states.get("delivered"), states
            page.get_by_role("link", name="Журнал").click()
            page.get_by_role("link", name=f"звонок {CALL_ID}").first.wait_for()
            ui.shot("3-journal")
            ui.narrow_fits("3-journal")
            page.goto(f"{base}/journal?source=outbox&call_id={CALL_ID}")
            page.get_by_role("link", name=f"звонок {CALL_ID}").first.click()
            page.get_by_role("heading", name=f"Звонок {CALL_ID}").wait_for()
            assert "доставлено" in page.inner_text("main")
            assert "calls_upload" in page.inner_text("main")
            page.get_by_role("button", name="Повторить отправку").click()
            page.locator("#replay-result").get_by_text(
                "Поставлено в очередь повторно: 1"
            ).wait_for()
            ui.shot("4-call")
            ui.narrow_fits("4-call")

            page.get_by_role("link", name="Диагностика").click()
            page.get_by_role("heading", name="Последняя проверка подключения").wait_for()
            assert "test_connection" in page.inner_text("main")
            ui.shot("5-diagnostics")
            ui.narrow_fits("5-diagnostics")

            # -- CSRF, another enterprise, JSON only
            api = f"{service.url}/retailcrm-admin/api"
            request = page.request
            put = request.put(
                f"{api}/managers/{NUMBER}",
                data=json.dumps({"user_extensions": {}}),
                headers={"Content-Type": "application/json"},
            )
            post = request.post(f"{api}/register/{NUMBER}")
            delete = request.delete(f"{api}/config/{NUMBER}")
            assert (put.status, post.status, delete.status) == (403, 403, 403)
            assert _config(database_url)["user_extensions"] == {"20": "150"}
            csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
            form = request.post(
                f"{api}/replay/{NUMBER}",
                form={"since": "2020-01-01T00:00:00+00:00"},
                headers={"X-CSRF-Token": csrf},
            )
            assert form.status == 415
            other_page = page.goto(f"{service.url}/retailcrm-admin/{OTHER}/")
            assert other_page.status == 403
            assert request.get(f"{api}/config/{OTHER}").status == 403
            assert request.get(f"{api}/journal/{OTHER}").status == 403

            # -- «Выйти» ends the session on the server: the copied cookie gets 401
            page.goto(base + "/")
            cookie = next(c for c in ui.context.cookies() if c["name"] == auth.SESSION_COOKIE)
            page.get_by_role("button", name="Выйти").click()
            page.wait_for_url(f"{service.url}/retailcrm-admin/?logged_out=1")
            copied = httpx.get(
                f"{api}/me", cookies={auth.SESSION_COOKIE: cookie["value"]}, timeout=10
            )
            assert copied.status_code == 401

            # -- log in again, then «Удалить интеграцию»: the old accountUrl is refused
            old_account_url = auth.account_url(_settings(service), NUMBER, version=0)
            page.goto(_login_link(service))
            page.once("dialog", lambda dialog: dialog.accept())
            page.get_by_role("button", name="Удалить интеграцию").click()
            page.wait_for_url(f"{service.url}/retailcrm-admin/?deleted=1")
            ui.shot("6-deleted")
            assert _module(crm)["active"] is False
            assert _config(database_url) == {}
            refused = httpx.get(old_account_url, timeout=10, follow_redirects=False)
            assert refused.status_code == 401

            # -- nothing the browser received carries a secret
            assert ui.received
            secrets_seen = [key, service.env["RETAILCRM_JWT_SECRET"], client_id]
            for body in ui.received:
                for secret in secrets_seen:
                    assert secret not in body
                assert "token=ey" not in body  # no login or account JWT either
        finally:
            ui.close()
    assert len(list(shots.glob("*.png"))) >= 10


def _settings(service: ServiceProcess) -> Settings:
    return Settings(
        database_url=Secret(service.env["DATABASE_URL"]),
        jwt_secret=Secret(service.env["RETAILCRM_JWT_SECRET"]),
        public_url=service.url,
    )


def _wait_for_rows(database_url: str, timeout: float = 20.0) -> None:
    """Until the call's hangup is in the outbox (the call service sends without waiting)."""

    async def has_hangup(conn: asyncpg.Connection) -> bool:
        return bool(
            await conn.fetchval(
                """SELECT count(*) FROM retailcrm_outbox
                   WHERE call_unique_id = $1 AND event_type = 'hangup'""",
                CALL_ID,
            )
        )

    deadline = time.monotonic() + timeout
    while not _in_thread(run_async, has_hangup, database_url):
        assert time.monotonic() < deadline, "the call never reached the outbox"
        time.sleep(0.1)
