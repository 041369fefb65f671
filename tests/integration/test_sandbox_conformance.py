"""The official ``retailcrm`` PyPI client (5.3.0, sync/requests) against the sandbox over sockets.

Booleans are passed as ``1``/``0`` where the client would send Python reprs
(docs/retailcrm.md#request-encoding).
Each call is checked twice: the client's view (status, body) and the sandbox's view of the request
(method, path, auth, decoded form or query).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import retailcrm

from retailcrm_service.sandbox import SandboxServer

KEY = "conformance-key-0123456789abcdef"
SECRET = "client-id-0123456789abcdef0123"
MODULE: dict[str, Any] = {
    "code": "acme-pbx",
    "integrationCode": "acme-pbx",
    "active": True,
    "name": "Acme PBX",
    "logo": "https://pbx.example/logo.svg",
    "baseUrl": "https://pbx.example",
    "clientId": SECRET,
    "integrations": {
        "telephony": {
            "makeCallUrl": "https://pbx.example/make-call",
            "additionalCodes": [{"userId": 1, "code": "150"}],
            "externalPhones": [{"siteCode": "main", "externalPhone": "+375170000000"}],
        }
    },
}


@pytest.fixture(scope="module")
def crm() -> Iterator[SandboxServer]:
    accounts = [{"name": "acme", "api_key": KEY, "demo": True}]
    with SandboxServer(accounts=accounts, rate_limit=False) as server:
        yield server


@pytest.fixture
def client(crm: SandboxServer) -> Any:
    return retailcrm.v5(crm.url, crm.api_key)


def last_request(crm: SandboxServer) -> dict[str, Any]:
    return crm.state()["requests"][-1]  # type: ignore[no-any-return]


def test_service_methods(crm: SandboxServer, client: Any) -> None:
    versions = client.api_versions()
    assert versions.is_successful()
    assert "5.0" in versions.get_response()["versions"]
    assert last_request(crm)["path"] == "/api/api-versions"
    credentials = client.api_credentials()
    assert credentials.is_successful()
    assert "/api/v5/telephony/call/event" in credentials.get_response()["credentials"]
    entry = last_request(crm)
    assert entry["auth"] == {"via": "header", "key": "***cdef"}
    assert entry["method"] == "GET"


def test_module_edit_and_get(crm: SandboxServer, client: Any) -> None:
    edit = client.integration_module_edit(MODULE)
    assert edit.get_status_code() in (200, 201)
    assert edit.get_response()["success"] is True
    entry = last_request(crm)
    assert (entry["method"], entry["path"]) == ("POST", "/api/v5/integration-modules/acme-pbx/edit")
    assert entry["contentType"] == "application/x-www-form-urlencoded"
    seen = entry["form"]["integrationModule"]
    assert seen["integrations"] == MODULE["integrations"]
    assert seen["clientId"] == "***0123"
    got = client.integration_module("acme-pbx")
    assert got.is_successful()
    assert got.get_response()["integrationModule"]["clientId"] == SECRET


def test_module_edit_errors_reach_the_client(client: Any) -> None:
    bad = client.integration_module_edit({**MODULE, "logo": "https://pbx.example/logo.png"})
    assert not bad.is_successful()
    assert bad.get_error_msg() == "Errors in the entity format"
    assert bad.get_errors() == {"logo": "Logo image must be svg"}


def test_call_event(crm: SandboxServer, client: Any) -> None:
    client.integration_module_edit(MODULE)
    event = {
        "phone": "+375291234567",
        "type": "in",
        "codes": ["150", "999"],
        "callExternalId": "1764150000.101",
        "externalPhone": "+375170000000",
    }
    response = client.telephony_call_event(event)
    assert response.is_successful()
    assert response.get_response() == {"success": True, "notExistCodes": ["999"]}
    assert last_request(crm)["form"] == {"event": event}
    assert crm.state()["accounts"]["acme"]["openPopups"]["1"][0]["callExternalId"] == (
        "1764150000.101"
    )


def test_calls_upload(crm: SandboxServer, client: Any) -> None:
    client.integration_module_edit(MODULE)
    calls = [
        {
            "date": "2025-11-26 10:00:03",
            "type": "in",
            "phone": "375291234567",
            "code": "150",
            "result": "no answer",
            "duration": 0,
            "externalId": "conf-1",
        }
    ]
    first = client.telephony_calls_upload(calls)
    assert first.get_response() == {"success": True, "processedCallsCount": 1, "duplicateCalls": []}
    assert last_request(crm)["form"] == {"calls": calls}
    again = client.telephony_calls_upload(calls)
    assert again.get_response()["duplicateCalls"] == ["conf-1"]
    bad = client.telephony_calls_upload([{**calls[0], "externalId": "conf-2", "result": "missed"}])
    assert bad.get_errors() == {"calls[0][result]": "The value you selected is not a valid choice."}


def test_telephony_manager_with_numeric_booleans(crm: SandboxServer, client: Any) -> None:
    client.integration_module_edit(MODULE)
    response = client.telephony_manager("+375291234567", details=1, ignore_status=1)
    body = response.get_response()
    assert body["manager"]["id"] == 1
    assert body["manager"]["code"] == "150"
    assert body["customer"]["id"] == 101
    entry = last_request(crm)
    assert entry["form"] == {"phone": "+375291234567", "details": "1", "ignoreStatus": "1"}


def test_telephony_manager_with_the_clients_python_booleans_is_refused(client: Any) -> None:
    """The client's defaults send ``details=True``; the sandbox is strict by default."""
    response = client.telephony_manager("+375291234567")
    assert response.get_status_code() == 400
    assert response.get_error_msg() == "Errors in the input parameters"


def test_users_list_get_and_status(crm: SandboxServer, client: Any) -> None:
    listed = client.users({"isManager": 1, "groups": ["manager"]}, limit=50, page=1)
    body = listed.get_response()
    assert body["pagination"]["limit"] == 50
    assert [u["id"] for u in body["users"]] == [1, 2, 3, 4]
    assert last_request(crm)["form"] == {
        "filter": {"isManager": "1", "groups": {"0": "manager"}},
        "limit": "50",
        "page": "1",
    }
    assert client.user(2).get_response()["user"]["id"] == 2
    assert client.user_status(2, "dinner").get_response() == {"success": True}
    assert last_request(crm)["form"] == {"status": "dinner"}
    assert client.user(2).get_response()["user"]["status"] == "dinner"
    missing = client.user(404)
    assert (missing.get_status_code(), missing.get_error_msg()) == (404, "Not found")


def test_users_without_filters_sends_filter_none(client: Any) -> None:
    """``filters=None`` becomes a literal ``filter=None``: a bad input for the sandbox."""
    response = client.users()
    assert response.get_status_code() == 400
    assert response.get_error_msg() == "Errors in the input parameters"


def test_customers_and_orders(crm: SandboxServer, client: Any) -> None:
    customers = client.customers({"name": "Сидоров"}).get_response()
    assert [c["id"] for c in customers["customers"]] == [101]
    orders = client.orders({"customerId": 103}).get_response()
    assert [o["managerId"] for o in orders["orders"]] == [3]
    assert last_request(crm)["form"]["filter"] == {"customerId": "103"}


def test_wrong_key_reaches_the_client(crm: SandboxServer) -> None:
    response = retailcrm.v5(crm.url, "not-a-key").users({"isManager": 1})
    assert response.get_status_code() == 403
    assert response.get_error_msg() == 'Wrong "apiKey" value.'
