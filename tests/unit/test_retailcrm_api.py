"""The RetailCRM wire format: header auth, JSON-string form fields, 1/0 booleans, typed errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qs, parse_qsl

import httpx
import pytest

from retailcrm_service.crm.client import (
    RetailCrmApiError,
    RetailCrmAuthError,
    RetailCrmClient,
    RetailCrmRateLimited,
    RetailCrmUnavailable,
    encode_query,
)

pytestmark = pytest.mark.anyio  # before collection, so parametrized async tests work

KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"


def make(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[RetailCrmClient, list]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    return RetailCrmClient(domain="https://acme.retailcrm.ru/", api_key=KEY, http=http), seen


def ok(body: dict | None = None) -> Callable[[httpx.Request], httpx.Response]:
    return lambda r: httpx.Response(200, json={"success": True, **(body or {})})


async def test_key_travels_only_in_the_header() -> None:
    client, seen = make(ok({"users": []}))
    await client.users(filters={"isManager": True})
    request = seen[0]
    assert request.headers["X-API-KEY"] == KEY
    assert KEY not in str(request.url)
    assert KEY not in repr(client)


async def test_entity_is_one_form_field_holding_a_json_string() -> None:
    client, seen = make(ok({"info": []}))
    module = {"code": "vochi-telephony", "active": True, "integrations": {"telephony": {"a": 1}}}
    await client.edit_integration_module(module)
    request = seen[0]
    assert request.method == "POST"
    assert request.url.path == "/api/v5/integration-modules/vochi-telephony/edit"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = parse_qs(request.content.decode())
    assert list(form) == ["integrationModule"]
    assert json.loads(form["integrationModule"][0]) == module


async def test_call_event_and_upload_use_their_fields() -> None:
    client, seen = make(ok({"processedCallsCount": 1, "duplicateCalls": ["1.2"]}))
    await client.call_event({"phone": "+375291234567", "type": "in", "codes": ["150"]})
    result = await client.calls_upload([{"externalId": "1.1"}, {"externalId": "1.2"}])
    assert json.loads(parse_qs(seen[0].content.decode())["event"][0])["codes"] == ["150"]
    assert seen[0].url.path == "/api/v5/telephony/call/event"
    assert len(json.loads(parse_qs(seen[1].content.decode())["calls"][0])) == 2
    assert result.processed_calls_count == 1
    assert result.duplicate_calls == ("1.2",)


async def test_get_booleans_are_one_and_zero_with_php_brackets() -> None:
    client, seen = make(ok({"manager": {"id": 7, "code": "150"}}))
    body = await client.telephony_manager("+375291234567", details=False, ignore_status=True)
    await client.users(filters={"active": False, "groups": ["manager", "boss"]}, limit=50)
    assert body["manager"]["code"] == "150"
    assert parse_qsl(seen[0].url.query.decode()) == [
        ("phone", "+375291234567"),
        ("details", "0"),
        ("ignoreStatus", "1"),
    ]
    assert parse_qsl(seen[1].url.query.decode()) == [
        ("limit", "50"),
        ("page", "1"),
        ("filter[active]", "0"),
        ("filter[groups][]", "manager"),
        ("filter[groups][]", "boss"),
    ]


def test_encode_query_drops_none_and_nests() -> None:
    assert encode_query({"a": None, "f": {"x": {"y": True}}}) == [("f[x][y]", "1")]


async def test_service_methods_are_unversioned() -> None:
    client, seen = make(ok({"credentials": [], "versions": ["5.0"]}))
    await client.credentials()
    await client.api_versions()
    assert [r.url.path for r in seen] == ["/api/credentials", "/api/api-versions"]


FAILURES = [
    (
        httpx.Response(503, json={"success": False, "errorMsg": "Rate limit exceeded"}),
        RetailCrmRateLimited,
        503,
    ),
    (httpx.Response(429, text="slow down"), RetailCrmRateLimited, 429),
    (
        httpx.Response(500, json={"success": False, "errorMsg": "Internal Server Error"}),
        RetailCrmUnavailable,
        500,
    ),
    (httpx.Response(405, text="<html><body>nginx</body></html>"), RetailCrmUnavailable, 405),
    (httpx.Response(200, text="not json"), RetailCrmUnavailable, 200),
    (
        httpx.Response(403, json={"success": False, "errorMsg": 'Wrong "apiKey" value.'}),
        RetailCrmAuthError,
        403,
    ),
    (
        httpx.Response(401, json={"success": False, "errorMsg": '"apiKey" is missing.'}),
        RetailCrmAuthError,
        401,
    ),
    (
        httpx.Response(404, json={"success": False, "errorMsg": "Account does not exist."}),
        RetailCrmAuthError,
        404,
    ),
    (
        httpx.Response(404, json={"success": False, "errorMsg": "API method not found"}),
        RetailCrmApiError,
        404,
    ),
    (
        httpx.Response(200, json={"success": False, "errorMsg": "Telephony not enabled"}),
        RetailCrmApiError,
        200,
    ),
]


@pytest.mark.parametrize("case", range(len(FAILURES)))
async def test_failures_become_typed_errors(case: int) -> None:
    response, kind, status = FAILURES[case]
    client, _ = make(lambda r: response)
    with pytest.raises(kind) as caught:
        await client.credentials()
    assert caught.value.status == status
    assert KEY not in str(caught.value)
    if kind is RetailCrmAuthError:
        assert not caught.value.retryable
    assert caught.value.retryable == isinstance(caught.value, RetailCrmUnavailable)


async def test_field_errors_and_retry_after_are_kept() -> None:
    client, _ = make(
        lambda r: httpx.Response(
            400,
            json={
                "success": False,
                "errorMsg": "Errors in the entity format",
                "errors": {"logo": "Logo image must be svg"},
            },
        )
    )
    with pytest.raises(RetailCrmApiError) as caught:
        await client.edit_integration_module({"code": "c"})
    assert caught.value.error_msg == "Errors in the entity format"
    assert caught.value.errors == {"logo": "Logo image must be svg"}
    limited, _ = make(lambda r: httpx.Response(503, headers={"Retry-After": "2"}, text=""))
    with pytest.raises(RetailCrmRateLimited) as caught_limit:
        await limited.users()
    assert caught_limit.value.retry_after == 2.0


async def test_timeouts_and_network_errors_are_unavailable() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for handler, kind in ((timeout, TimeoutError), (refused, ConnectionError)):
        client, _ = make(handler)
        with pytest.raises(RetailCrmUnavailable) as caught:
            await client.call_event({"phone": "1", "type": "in"})
        assert isinstance(caught.value.__cause__, kind)  # as CrmHttp raises them
        assert isinstance(caught.value.__cause__.__cause__, httpx.HTTPError)


async def test_path_segments_are_checked() -> None:
    client, seen = make(ok())
    with pytest.raises(ValueError, match="segment"):
        await client.user("../admin")
    assert seen == []
