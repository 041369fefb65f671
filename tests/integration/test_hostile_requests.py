"""Hostile and malformed requests to every service route get a clear 4xx, never a 500,
and leave the database as it was (the events route only for what its shared body parser does)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.pg import create_enterprise
from tests.support.service import RunningService, running_service, service_settings

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"
GOOD: dict[str, Any] = {"domain": "http://127.0.0.1:9", "api_key": KEY}
DEEP = b"[" * 20_000  # under every body limit, deeper than the JSON parser's stack
JSON = {"content-type": "application/json"}


@pytest.fixture
async def svc(db: asyncpg.Connection, database_url: str) -> AsyncIterator[RunningService]:
    await create_enterprise(db, "0367", integrations={"uon": True})
    await create_enterprise(db, "0400")
    async with running_service(service_settings(database_url)) as service:
        async with httpx.AsyncClient(base_url=service.url) as http:
            for number in ("0367", "0400"):
                assert (await http.put(f"/api/config/{number}", json=GOOD)).status_code == 200
        yield service


@pytest.fixture
async def http(svc: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=svc.url, timeout=20) as client:
        yield client


async def _configs(db: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT number, integrations_config::text AS c FROM enterprises")
    return sorted((r["number"], r["c"]) for r in rows)


def _assert_envelope(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["code"]
    assert error["message"]
    return error


# Bodies that used to reach PostgreSQL (NUL, lone surrogate, NaN, overflowing float) or the
# filesystem (timezone names) and answered 500, plus strings a `$` anchor let through.
HOSTILE_CONFIGS = [
    pytest.param('{"smart_redirect": {"mode": "\\u0000"}}', "smart_redirect", id="nul"),
    pytest.param('{"smart_redirect": {"mode": "\\ud800"}}', "smart_redirect", id="surrogate"),
    pytest.param('{"smart_redirect": {"\\u0000": 1}}', "smart_redirect", id="nul-key"),
    pytest.param('{"smart_redirect": {"deadline_ms": NaN}}', "smart_redirect", id="nan"),
    pytest.param('{"smart_redirect": {"deadline_ms": 1e400}}', "smart_redirect", id="inf"),
    pytest.param(
        '{"smart_redirect": {"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}}',
        "smart_redirect",
        id="deep-smart",
    ),
    pytest.param('{"timezone": "' + "a" * 1000 + '"}', "timezone", id="tz-long"),
    pytest.param('{"timezone": "Europe"}', "timezone", id="tz-directory"),
    pytest.param('{"timezone": "../../../../etc/passwd"}', "timezone", id="tz-traversal"),
    pytest.param(
        '{"external_phones": [{"siteCode": "shop\\n", "externalPhone": "+375291234567"}]}',
        "external_phones.0.siteCode",
        id="site-newline",
    ),
    pytest.param(
        '{"external_phones": [{"siteCode": "shop", "externalPhone": "+375291234567\\n"}]}',
        "external_phones.0.externalPhone",
        id="phone-newline",
    ),
    pytest.param('{"user_extensions": {"7": "150\\r\\nX: y"}}', "user_extensions", id="crlf"),
    pytest.param('{"domain": "https://acme.retailcrm.ru\\u202e"}', "domain", id="rtl"),
    pytest.param('{"enabled": null}', "enabled", id="null-for-bool"),
    pytest.param('{"user_extensions": [["7", "150"]]}', "user_extensions", id="list-for-dict"),
]


@pytest.mark.parametrize(("patch", "field"), HOSTILE_CONFIGS)
async def test_hostile_config_values_get_422_naming_the_field_and_change_nothing(
    db: asyncpg.Connection, http: httpx.AsyncClient, patch: str, field: str
) -> None:
    before = await _configs(db)
    body = json.dumps(GOOD)[:-1] + ", " + patch[1:]  # raw text: keeps NaN and lone surrogates
    response = await http.put("/api/config/0367", content=body.encode(), headers=JSON)
    error = _assert_envelope(response, 422)
    assert field in error["fields"]
    assert await _configs(db) == before


DEEP_ROUTES = [
    ("PUT", "/api/config/0367"),
    ("POST", "/api/config/0367/test"),
    ("POST", "/api/smart-redirect"),
    ("POST", "/api/events"),
    ("POST", "/api/events/replay"),
]


@pytest.mark.parametrize(("method", "path"), DEEP_ROUTES)
async def test_json_nested_deeper_than_the_parser_gets_400_not_500(
    db: asyncpg.Connection, http: httpx.AsyncClient, method: str, path: str
) -> None:
    before = await _configs(db)
    small = path.endswith(("/test", "/smart-redirect"))  # these take 16 KiB at most
    body = DEEP[:15_000] if small else DEEP
    response = await http.request(method, path, content=body, headers=JSON)
    assert _assert_envelope(response, 400)["code"] == "invalid_json"
    assert await _configs(db) == before


async def test_the_dialplan_route_answers_deep_json_in_its_own_format(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post(
        "/api/callevent/getcustomerdata", content=DEEP[:15_000], headers={"Token": "x", **JSON}
    )
    assert response.status_code == 400
    assert response.text.startswith('{"Name":"","DialPlan":null,')


BAD_NUMBERS = [
    "0367%0A",  # "$" matched before the newline: 404/200 with "0367\n" instead of 422
    "0367%00",
    "%D9%A0%D9%A3%D9%A6%D9%A7",  # Arabic-Indic digits
    "1" * 33,
    "'%20OR%201=1--",
    "0367%0D%0ASet-Cookie:%20x=1",
    "%E2%80%AE0367",  # RTL override
    "0367%F0%9F%98%80",
]


@pytest.mark.parametrize("number", BAD_NUMBERS)
async def test_odd_enterprise_numbers_in_paths_get_422(
    db: asyncpg.Connection, http: httpx.AsyncClient, number: str
) -> None:
    before = await _configs(db)
    calls = [
        ("GET", f"/api/config/{number}", None),
        ("PUT", f"/api/config/{number}", GOOD),
        ("DELETE", f"/api/config/{number}", None),
        ("POST", f"/api/config/{number}/test", None),
        ("POST", f"/api/config-cache/refresh/{number}", None),
        ("POST", f"/retailcrm-admin/api/register/{number}", None),
        ("GET", f"/api/user-status/{number}", None),
    ]
    for method, path, body in calls:
        response = await http.request(method, path, json=body)
        _assert_envelope(response, 422)
        assert "Set-Cookie" not in response.headers
    assert await _configs(db) == before


async def test_path_traversal_towards_another_enterprise_reaches_no_route(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/api/config/..%2F0400", "/api/config/0367/..%2F..%2Fconfig%2F0400"):
        response = await http.get(path)
        _assert_envelope(response, 404, 422)
        assert "api_key" not in response.text


async def test_wrong_content_types_and_non_object_bodies_get_4xx(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    before = await _configs(db)
    form = await http.put("/api/config/0367", data={"domain": "http://127.0.0.1:9"})
    xml = await http.put(
        "/api/config/0367", content=b"<config/>", headers={"content-type": "text/xml"}
    )
    for body in ("null", "[]", '"text"', "42", "true"):
        response = await http.put("/api/config/0367", content=body, headers=JSON)
        assert _assert_envelope(response, 422)["fields"] == {"body": "expected an object"}
    assert _assert_envelope(form, 400)["code"] == "invalid_json"
    assert _assert_envelope(xml, 400)["code"] == "invalid_json"
    assert await _configs(db) == before


async def test_oversized_bodies_get_413_even_without_a_content_length(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    """Chunked uploads carry no Content-Length: the limit must hold while reading."""
    before = await _configs(db)

    async def chunks(total: int, piece: bytes) -> AsyncIterator[bytes]:
        for _ in range(total // len(piece)):
            yield piece

    form_piece = b"clientId=" + b"a" * 8183 + b"&"
    cases = [
        ("PUT", "/api/config/0367", JSON, b" " * 8192, 300_000),
        (
            "POST",
            "/retailcrm/make-call",
            {"content-type": "application/x-www-form-urlencoded"},
            form_piece,
            64 * 8192,
        ),
        (
            "POST",
            "/retailcrm/status",
            {"content-type": "application/x-www-form-urlencoded"},
            form_piece,
            64 * 8192,
        ),
        (
            "POST",
            "/retailcrm-admin/login",
            {"content-type": "application/x-www-form-urlencoded"},
            form_piece,
            64 * 8192,
        ),
    ]
    for method, path, headers, piece, total in cases:
        response = await http.request(method, path, content=chunks(total, piece), headers=headers)
        assert _assert_envelope(response, 413)["code"] == "too_large"
    assert await _configs(db) == before


async def test_unparseable_callback_forms_get_400(http: httpx.AsyncClient) -> None:
    too_many = "&".join(f"f{i}=1" for i in range(60)).encode()
    form = {"content-type": "application/x-www-form-urlencoded"}
    for path in ("/retailcrm/make-call", "/retailcrm/status", "/retailcrm-admin/login"):
        response = await http.post(path, content=too_many, headers=form)
        assert _assert_envelope(response, 400)["code"] == "invalid_form"


async def test_hostile_callback_values_get_4xx_and_write_nothing(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    # Percent-encoded by hand: a lone surrogate (%ED%A0%80) is not encodable by the client.
    hostile = ["%00", "%ED%A0%80", "'%20OR%201=1%20--", "%E2%80%AE", "x" * 10_000, "%0D%0AX-I:%201"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    for value in hostile:
        for path in ("/retailcrm/make-call", "/retailcrm/status"):
            query = f"clientId={value}&userId={value}&status={value}"
            for response in (
                await http.get(f"{path}?{query}"),
                await http.post(path, content=query.encode(), headers=form),
            ):
                # 413: the three 10k-char fields exceed the callbacks' 16 KiB body limit; 429:
                # this address has sent too many unknown clientIds
                code = _assert_envelope(response, 401, 413, 429)["code"]
                assert code in ("unauthorized", "too_large", "rate_limited")
                assert "X-I" not in response.headers
    assert await db.fetchval("SELECT count(*) FROM retailcrm_user_status") == 0


async def test_hostile_admin_login_inputs_get_401(http: httpx.AsyncClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    for token in ("%00", "a.b.c", "x" * 10_000, "'%20OR%201=1", "%0D%0ASet-Cookie:%20a=b"):
        got = await http.get(f"/retailcrm-admin/login?token={token}")
        posted = await http.post(
            "/retailcrm-admin/login", content=f"clientId={token}".encode(), headers=form
        )
        bearer = await http.get(
            "/retailcrm-admin/api/me", headers={"Authorization": "Bearer " + token}
        )
        for response in (got, posted, bearer):
            assert _assert_envelope(response, 401)["code"] == "unauthorized"
            assert "set-cookie" not in response.headers


_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\x00", "\ud800", "\u202e", "' OR 1=1 --", "\r\n", "😀", "x" * 5000, "NaN"]),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_FIELDS = [
    "api_key",
    "enabled",
    "user_extensions",
    "timezone",
    "internal_calls",
    "external_phones",
    "smart_redirect",
    "extra",
]


def _encode(document: dict[str, Any]) -> bytes:
    # allow_nan: NaN/Infinity are what a hostile client sends; surrogatepass keeps lone ones.
    return json.dumps(document, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


async def test_fuzzed_config_documents_never_500_and_never_write_partially(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    """Hypothesis over the PUT body: 200 (then it reads back), or a 4xx that changed nothing."""
    failures: list[str] = []
    documents = st.fixed_dictionaries(
        {"domain": st.sampled_from(["http://127.0.0.1:9", "https://a.retailcrm.ru"]) | _text},
        optional={name: _json for name in _FIELDS},
    )
    examples: list[dict[str, Any]] = []

    @settings(
        max_examples=80,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    @given(documents)
    def collect(document: dict[str, Any]) -> None:
        examples.append(document)

    collect()
    for document in examples:
        before = await _configs(db)
        response = await http.put("/api/config/0367", content=_encode(document), headers=JSON)
        if response.status_code == 200:
            again = await http.get("/api/config/0367")
            if again.status_code != 200:
                failures.append(f"read back {again.status_code}: {document!r:.200}")
            continue
        if response.status_code not in (400, 413, 422) or "error" not in response.json():
            failures.append(f"{response.status_code}: {document!r:.200}")
        elif await _configs(db) != before:
            failures.append(f"partial write on {response.status_code}: {document!r:.200}")
    assert failures == []


async def test_unknown_routes_and_wrong_methods_answer_in_the_envelope(
    http: httpx.AsyncClient,
) -> None:
    missing = await http.get("/api/nothing-here")
    wrong = await http.patch("/api/config/0367", json=GOOD)
    assert _assert_envelope(missing, 404)["code"] == "not_found"
    assert _assert_envelope(wrong, 405)["code"] == "method_not_allowed"


_phone = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\x00", "\u202e+375291234567", "' OR 1=1 --", "😀" * 10, "9" * 10_000]),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=2),
)
_dialplan_bodies = st.fixed_dictionaries(
    {},
    optional={
        "Token": st.sampled_from(["token-0367", "0367", "\x00", "x" * 200]) | _phone,
        "Phone": _phone,
        "TrunkId": _phone,
        "UniqueId": _phone,
    },
)
_redirect_bodies = st.fixed_dictionaries(
    {},
    optional={
        "enterprise_number": st.sampled_from(["0367", "0400", "0367\n"]) | _phone,
        "phone": _phone,
        "call_unique_id": _phone,
        "channel": st.sampled_from(["SIP/150-00000001", "SIP/x;reboot"]) | _phone,
        "trunk": _phone,
    },
)


async def test_fuzzed_dialplan_and_smart_redirect_bodies_never_500(
    db: asyncpg.Connection, database_url: str
) -> None:
    """The dialplan route always answers in its own format; smart-redirect 200 or a 4xx."""
    await create_enterprise(db, "0367", name2="token-0367")
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(_dialplan_bodies, _redirect_bodies)
    def collect(dialplan: dict[str, Any], redirect: dict[str, Any]) -> None:
        pairs.append((dialplan, redirect))

    collect()
    parts = {"smart_redirect"}
    failures: list[str] = []
    async with (
        running_service(service_settings(database_url), parts=parts) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=10) as client,
    ):
        assert (await client.put("/api/config/0367", json=GOOD)).status_code == 200
        for dialplan, redirect in pairs:
            got = await client.post(
                "/api/callevent/getcustomerdata", content=_encode(dialplan), headers=JSON
            )
            if got.status_code >= 500:
                failures.append(f"dialplan {got.status_code}: {dialplan!r:.200}")
            if not got.text.startswith('{"Name":'):
                failures.append(f"dialplan format: {got.text[:80]!r} for {dialplan!r:.200}")
            sent = await client.post("/api/smart-redirect", content=_encode(redirect), headers=JSON)
            if sent.status_code >= 500:
                failures.append(f"redirect {sent.status_code}: {redirect!r:.200}")
        await svc.runtime.logs.flush()
        assert svc.runtime.logs.stats()["lost"] == 0
    assert failures == []


async def test_status_callbacks_take_only_ascii_digit_user_ids_and_codes(
    db: asyncpg.Connection, http: httpx.AsyncClient
) -> None:
    raw = await db.fetchval("SELECT integrations_config FROM enterprises WHERE number = '0367'")
    client_id = json.loads(raw)["retailcrm"]["clientId"]
    for user_id in ("²", "١٢", "-7", "7 OR 1=1"):
        response = await http.post(
            "/retailcrm/status", data={"clientId": client_id, "userId": user_id, "status": "busy"}
        )
        assert "userId" in _assert_envelope(response, 422)["fields"]
    coded = await http.post(
        "/retailcrm/status",
        data={"clientId": client_id, "userId": "7", "status": "busy", "code": "١٥٠"},
    )
    assert coded.status_code == 200
    rows = await db.fetch("SELECT retailcrm_user_id, code FROM retailcrm_user_status")
    assert [(r["retailcrm_user_id"], r["code"]) for r in rows] == [("7", None)]


async def test_static_files_cannot_be_used_to_read_the_service_source(
    http: httpx.AsyncClient,
) -> None:
    for path in (
        "/retailcrm-admin/static/..%2F..%2Fapp.py",
        "/retailcrm-admin/static/..%2Fapp.py",
        "/retailcrm-admin/static/%2e%2e/settings.py",
        "/retailcrm-admin/static/....//app.py",
    ):
        response = await http.get(path)
        assert response.status_code == 404, path
        assert "create_app" not in response.text
        assert "Secret" not in response.text
    assert (await http.get("/retailcrm-admin/static/logo.svg")).status_code == 200
