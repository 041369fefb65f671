"""The sandbox's control API and API answer bad input with 4xx, never 500, and its
state view never shows a module's secrets (clientId, the accountUrl login token, API keys)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retailcrm_service.sandbox import AsyncSandboxServer

CLIENT_ID = "client-id-secret-0123456789abcdef"
LOGIN_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIwMzY3In0.signature-of-the-account-token"
DEEP = "[" * 20_000
CONTROL = [
    "/_sandbox/seed",
    "/_sandbox/faults",
    "/_sandbox/settings",
    "/_sandbox/callbacks/click-to-call",
    "/_sandbox/callbacks/user-status",
    "/_sandbox/callbacks/activity",
    "/_sandbox/callbacks/account-url",
]


def _module(base: str) -> dict[str, Any]:
    return {
        "code": "acme-pbx",
        "active": True,
        "name": "Acme PBX",
        "logo": f"{base}/logo.svg",
        "baseUrl": base,
        "clientId": CLIENT_ID,
        "accountUrl": f"{base}/retailcrm-admin/login?token={LOGIN_TOKEN}",
        "integrations": {"telephony": {"makeCallUrl": f"{base}/retailcrm/make-call"}},
    }


async def test_control_api_answers_json_nested_too_deeply_with_400() -> None:
    async with (
        AsyncSandboxServer(rate_limit=False) as crm,
        httpx.AsyncClient(base_url=crm.url) as http,
    ):
        for path in CONTROL:
            response = await http.post(path, content=DEEP.encode())
            assert response.status_code == 400, (path, response.text[:200])
            assert response.json()["error"]["code"] == "invalid_json"


async def test_an_entity_field_nested_too_deeply_is_retailcrms_input_error_not_a_500() -> None:
    async with (
        AsyncSandboxServer(rate_limit=False) as crm,
        httpx.AsyncClient(base_url=crm.url) as http,
    ):
        response = await http.post(
            "/api/v5/integration-modules/acme-pbx/edit",
            data={"integrationModule": DEEP},
            headers={"X-API-KEY": crm.api_key},
        )
    assert response.status_code == 400
    assert response.json()["success"] is False


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_keys = st.sampled_from(
    [
        "accounts",
        "name",
        "api_key",
        "api_keys",
        "scopes",
        "users",
        "customers",
        "orders",
        "sites",
        "endpoint",
        "mode",
        "status",
        "error_rate",
        "latency_ms",
        "times",
        "method",
        "userId",
        "phone",
        "account",
        "code",
        "site",
        "module",
        "rate_limit",
        "account_exists",
        "active",
        "freeze",
        "timeout_seconds",
    ]
)


async def test_fuzzed_control_documents_never_get_a_500() -> None:
    """Hypothesis over the control documents: any shape gets 200 or a 4xx envelope."""
    documents: list[tuple[str, dict[str, Any]]] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(CONTROL), st.dictionaries(_keys, _json, max_size=5))
    def collect(path: str, document: dict[str, Any]) -> None:
        documents.append((path, document))

    collect()
    failures = []
    async with (
        AsyncSandboxServer(rate_limit=False) as crm,
        httpx.AsyncClient(base_url=crm.url, timeout=10) as http,
    ):
        for path, document in documents:
            response = await http.post(path, json=document)
            if response.status_code >= 500:
                failures.append((path, document, response.status_code))
            elif response.status_code >= 400:
                assert set(response.json()["error"]) == {"code", "message"}
            await http.delete("/_sandbox/faults")  # no fault leaks into the next
    assert failures == []


async def test_the_state_view_masks_client_id_and_the_account_url_login_token() -> None:
    async with (
        AsyncSandboxServer(rate_limit=False) as crm,
        httpx.AsyncClient(base_url=crm.url) as http,
    ):
        api = {"X-API-KEY": crm.api_key}
        edit = await http.post(
            "/api/v5/integration-modules/acme-pbx/edit",
            data={"integrationModule": json.dumps(_module("http://127.0.0.1:9"))},
            headers=api,
        )
        read_back = await http.get("/api/v5/integration-modules/acme-pbx", headers=api)
        by_query = await http.get(f"/api/v5/users?apiKey={crm.api_key}")
        callback = await http.post("/_sandbox/callbacks/account-url", json={"code": "acme-pbx"})
        state = await http.get("/_sandbox/state")
    assert edit.status_code == 201
    # RetailCRM itself returns what the module stored: the API answer stays faithful.
    assert read_back.json()["integrationModule"]["clientId"] == CLIENT_ID
    assert by_query.status_code == 200
    assert callback.status_code == 200
    shown = state.text + callback.text
    assert '"accountUrl"' in state.text  # the view does show the module
    for secret in (CLIENT_ID, LOGIN_TOKEN, crm.api_key):
        assert secret not in shown
