"""The sandbox's RetailCRM API surface, driven in-process over ASGI (docs/retailcrm.md#sandbox)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from retailcrm_service.sandbox import ControlError, Sandbox, SandboxConfig, create_sandbox_app

# Marked here as well: conftest adds the anyio mark after collection, too late for parametrize.
pytestmark = pytest.mark.anyio

KEY = "acme-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
READONLY_KEY = "readonly-key-0123456789abcdef"
SECRET = "client-id-secret-0123456789"


def module(code: str = "acme-pbx", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "code": code,
        "integrationCode": code,
        "active": True,
        "name": "Acme PBX",
        "logo": "https://pbx.example/logo.svg",
        "baseUrl": "https://pbx.example",
        "clientId": SECRET,
        "accountUrl": "https://pbx.example/account",
        "actions": {"activity": "/actions/activity"},
        "integrations": {
            "telephony": {
                "makeCallUrl": "https://pbx.example/make-call",
                "changeUserStatusUrl": "https://pbx.example/status",
                "allowEdit": False,
                "inputEventSupported": True,
                "outputEventSupported": True,
                "hangupEventSupported": True,
                "additionalCodes": [
                    {"userId": 1, "code": "150"},
                    {"userId": "2", "code": "151"},
                    {"userId": 3, "code": "152"},
                ],
                "externalPhones": [{"siteCode": "main", "externalPhone": "+375170000000"}],
            }
        },
    }
    data.update(overrides)
    return data


@dataclass
class Crm:
    http: httpx.AsyncClient
    sandbox: Sandbox

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def post(self, path: str, **form: Any) -> httpx.Response:
        return await self.http.post(path, data=form)

    async def register(self, **overrides: Any) -> httpx.Response:
        data = module(**overrides)
        return await self.post(
            f"/api/v5/integration-modules/{data['code']}/edit", integrationModule=json.dumps(data)
        )

    async def event(self, **event: Any) -> httpx.Response:
        return await self.post("/api/v5/telephony/call/event", event=json.dumps(event))

    async def upload(self, calls: list[dict[str, Any]]) -> httpx.Response:
        return await self.post("/api/v5/telephony/calls/upload", calls=json.dumps(calls))

    def state(self) -> dict[str, Any]:
        return self.sandbox.state.view()

    def account(self) -> dict[str, Any]:
        return self.state()["accounts"]["acme"]  # type: ignore[no-any-return]


def make_app(**kwargs: Any) -> Any:
    accounts = [
        {
            "name": "acme",
            "demo": True,
            "api_keys": [
                {"key": KEY},
                {"key": OTHER_KEY},
                {"key": READONLY_KEY, "scopes": ["user_read"]},
            ],
        }
    ]
    kwargs.setdefault("rate_limit", False)
    return create_sandbox_app(accounts=accounts, **kwargs)


@pytest.fixture
async def crm() -> AsyncIterator[Crm]:
    async with crm_for(make_app()) as client:
        yield client


class crm_for:  # lower-case: reads as a context-manager function at call sites
    def __init__(self, app: Any, key: str | None = KEY) -> None:
        self.app = app
        headers = {"X-API-KEY": key} if key else {}
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://acme.test", headers=headers
        )

    async def __aenter__(self) -> Crm:
        return Crm(self.http, self.app.state.sandbox)

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()


def error(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    return response.status_code, response.json()


# --- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v5/credentials",
        "/api/v5/telephony/setting/acme/edit",
        "/api/v5/no-such-method",
        "/api/v4/telephony/manager",
        "/",
        "/api/v5/users/abc",
    ],
)
async def test_unknown_methods_are_404_api_method_not_found(crm: Crm, path: str) -> None:
    assert error(await crm.get(path)) == (
        404,
        {"success": False, "errorMsg": "API method not found"},
    )


@pytest.mark.parametrize(
    ("verb", "path", "allow"),
    [
        ("GET", "/api/v5/telephony/call/event", "POST"),
        ("POST", "/api/v5/telephony/manager", "GET"),
        ("PUT", "/api/v5/users", "GET"),
        ("GET", "/api/v5/integration-modules/acme/edit", "POST"),
    ],
)
async def test_wrong_verbs_are_405(crm: Crm, verb: str, path: str, allow: str) -> None:
    response = await crm.http.request(verb, path)
    assert response.status_code == 405
    assert response.json()["success"] is False
    assert response.headers["allow"] == allow


async def test_service_methods_live_outside_v5(crm: Crm) -> None:
    versions = await crm.get("/api/api-versions")
    assert versions.json() == {"success": True, "versions": ["3.0", "4.0", "5.0"]}
    creds = (await crm.get("/api/credentials")).json()
    assert creds["success"] is True
    assert "/api/v5/telephony/call/event" in creds["credentials"]
    assert "telephony_write" in creds["scopes"]


# --- auth -------------------------------------------------------------------------------------


async def test_missing_key_is_401_apikey_is_missing() -> None:
    async with crm_for(make_app(), key=None) as crm:
        assert error(await crm.get("/api/v5/users")) == (
            401,
            {"success": False, "errorMsg": '"apiKey" is missing.'},
        )


async def test_wrong_key_is_403_wrong_apikey_value() -> None:
    async with crm_for(make_app(), key="nope") as crm:
        assert error(await crm.get("/api/v5/users")) == (
            403,
            {"success": False, "errorMsg": 'Wrong "apiKey" value.'},
        )


async def test_key_is_accepted_as_query_or_form_parameter() -> None:
    async with crm_for(make_app(), key=None) as crm:
        assert (await crm.get("/api/v5/users/1", apiKey=KEY)).status_code == 200
        assert (await crm.post("/api/v5/users/1/status", apiKey=KEY, status="busy")).json() == {
            "success": True
        }


async def test_key_without_the_scope_is_403_access_denied() -> None:
    async with crm_for(make_app(), key=READONLY_KEY) as crm:
        assert (await crm.get("/api/v5/users")).status_code == 200
        assert error(await crm.event(phone="1", type="in")) == (
            403,
            {"success": False, "errorMsg": "Access denied."},
        )


async def test_auth_statuses_are_configurable() -> None:
    config = SandboxConfig(missing_key_status=403, access_denied_status=401)
    async with crm_for(make_app(config=config), key=None) as crm:
        assert (await crm.get("/api/v5/users")).status_code == 403
    async with crm_for(make_app(config=config), key=READONLY_KEY) as crm:
        assert (await crm.get("/api/v5/orders")).status_code == 401


async def test_unknown_account_mode_is_404_json_on_get_and_405_html_on_post(crm: Crm) -> None:
    crm.sandbox.state.account_missing = True
    assert error(await crm.get("/api/v5/users")) == (
        404,
        {"success": False, "errorMsg": "Account does not exist."},
    )
    response = await crm.event(phone="1", type="in")
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<html>")


async def test_a_deleted_account_answers_like_an_unknown_one(crm: Crm) -> None:
    crm.sandbox.state.account("acme").exists = False
    assert (await crm.get("/api/v5/users")).json()["errorMsg"] == "Account does not exist."
    assert (await crm.post("/api/v5/users/1/status", status="free")).status_code == 405


# --- integration modules ----------------------------------------------------------------------


async def test_module_edit_creates_then_updates_and_get_returns_it(crm: Crm) -> None:
    created = await crm.register()
    assert created.status_code == 201
    assert created.json() == {"success": True, "info": []}
    updated = await crm.register(name="Acme PBX 2")
    assert updated.status_code == 200
    got = (await crm.get("/api/v5/integration-modules/acme-pbx")).json()
    assert got["success"] is True
    assert got["integrationModule"]["name"] == "Acme PBX 2"
    assert got["integrationModule"]["integrations"]["telephony"]["additionalCodes"][1] == {
        "userId": 2,
        "code": "151",
    }
    history = crm.account()["modules"]["acme-pbx"]["history"]
    assert [h["created"] for h in history] == [True, False]


async def test_unknown_module_is_404_not_found(crm: Crm) -> None:
    assert error(await crm.get("/api/v5/integration-modules/nope")) == (
        404,
        {"success": False, "errorMsg": "Not found"},
    )


async def test_module_as_nested_form_keys_is_the_non_scalar_error(crm: Crm) -> None:
    response = await crm.post(
        "/api/v5/integration-modules/acme-pbx/edit",
        **{"integrationModule[code]": "acme-pbx", "integrationModule[name]": "x"},
    )
    assert error(response) == (
        400,
        {
            "success": False,
            "errorMsg": 'Input value "integrationModule" contains a non-scalar value',
        },
    )


async def test_module_edit_without_the_field_is_parameter_missing(crm: Crm) -> None:
    assert error(await crm.post("/api/v5/integration-modules/acme-pbx/edit")) == (
        400,
        {"success": False, "errorMsg": "Parameter 'integrationModule' is missing"},
    )


async def test_module_sent_as_a_json_body_is_not_read(crm: Crm) -> None:
    response = await crm.http.post(
        "/api/v5/integration-modules/acme-pbx/edit", json={"integrationModule": module()}
    )
    assert response.json()["errorMsg"] == "Parameter 'integrationModule' is missing"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"logo": "https://pbx.example/logo.png"}, "logo", "Logo image must be svg"),
        ({"logo": ""}, "logo", "This value should not be blank."),
        ({"baseUrl": ""}, "baseUrl", "This value should not be blank."),
        ({"baseUrl": "   "}, "baseUrl", "This value should not be blank."),
        ({"name": None}, "name", "This value should not be blank."),
        ({"baseUrl": "not a url"}, "baseUrl", "This value is not a valid URL."),
        ({"active": "yes"}, "active", "This value should be of type bool."),
    ],
)
async def test_module_field_errors_are_400_with_an_errors_map(
    crm: Crm, overrides: dict[str, Any], field: str, message: str
) -> None:
    status, body = error(await crm.register(**overrides))
    assert status == 400
    assert body["success"] is False
    assert body["errorMsg"] == "Errors in the entity format"
    assert body["errors"][field] == message
    assert crm.account()["modules"] == {}


async def test_module_code_must_equal_the_path_code(crm: Crm) -> None:
    response = await crm.post(
        "/api/v5/integration-modules/other/edit", integrationModule=json.dumps(module())
    )
    status, body = error(response)
    assert status == 400
    assert "code" in body["errors"]


async def test_non_numeric_additional_code_user_id_is_a_field_error(crm: Crm) -> None:
    tel = module()["integrations"]["telephony"]
    tel["additionalCodes"] = [{"userId": "seven", "code": "150"}]
    status, body = error(await crm.register(integrations={"telephony": tel}))
    assert status == 400
    assert body["errors"] == {
        "integrations[telephony][additionalCodes][0][userId]": "This value should be of type int."
    }


async def test_unknown_users_and_sites_are_reported_in_info(crm: Crm) -> None:
    tel = module()["integrations"]["telephony"]
    tel["additionalCodes"] = [{"userId": 1, "code": "150"}, {"userId": "404", "code": "9"}]
    tel["externalPhones"] = [{"siteCode": "ghost", "externalPhone": "+1"}]
    body = (await crm.register(integrations={"telephony": tel})).json()
    assert body == {
        "success": True,
        "info": {"notExistUsersIds": [404], "notExistSiteCodes": ["ghost"]},
    }


async def test_telephony_is_read_only_from_integrations_telephony(crm: Crm) -> None:
    data = module(integrations={}, configuration={"makeCallUrl": "https://pbx.example/mc"})
    response = await crm.post(
        "/api/v5/integration-modules/acme-pbx/edit", integrationModule=json.dumps(data)
    )
    assert response.status_code == 201
    stored = (await crm.get("/api/v5/integration-modules/acme-pbx")).json()["integrationModule"]
    assert "configuration" not in stored
    assert "integrations" not in stored
    assert error(await crm.event(phone="+1", type="in")) == (
        400,
        {"success": False, "errorMsg": "Telephony not enabled"},
    )


async def test_read_only_fields_are_set_by_the_system(crm: Crm) -> None:
    await crm.register(freeze=True, native=True)
    stored = (await crm.get("/api/v5/integration-modules/acme-pbx")).json()["integrationModule"]
    assert stored["freeze"] is False
    assert stored["native"] is False


async def test_multipart_form_is_accepted(crm: Crm) -> None:
    response = await crm.http.post(
        "/api/v5/integration-modules/acme-pbx/edit",
        files={"integrationModule": (None, json.dumps(module()))},
    )
    assert response.status_code == 201
    assert crm.state()["requests"][-1]["contentType"].startswith("multipart/form-data")


# --- call events and popups -------------------------------------------------------------------


async def test_call_event_needs_an_active_telephony_module_for_the_key(crm: Crm) -> None:
    assert (await crm.event(phone="+1", type="in")).json()["errorMsg"] == "Telephony not enabled"
    await crm.register(active=False)
    assert (await crm.event(phone="+1", type="in")).json()["errorMsg"] == "Telephony not enabled"
    await crm.register()
    assert (await crm.event(phone="+1", type="in")).json() == {"success": True}
    async with crm_for(_app_of(crm), key=OTHER_KEY) as other:
        response = await other.event(phone="+1", type="in")
        assert response.json()["errorMsg"] == "Telephony not enabled"  # the module is not its


def _app_of(crm: Crm) -> Any:
    return crm.http._transport.app  # type: ignore[attr-defined]


async def test_call_event_without_the_field_is_parameter_missing(crm: Crm) -> None:
    assert (await crm.post("/api/v5/telephony/call/event")).json()["errorMsg"] == (
        "Parameter 'event' is missing"
    )


async def test_an_empty_entity_field_is_parameter_missing(crm: Crm) -> None:
    assert (await crm.post("/api/v5/telephony/call/event", event="")).json()["errorMsg"] == (
        "Parameter 'event' is missing"
    )


async def test_call_event_as_nested_keys_is_the_non_scalar_error(crm: Crm) -> None:
    response = await crm.post(
        "/api/v5/telephony/call/event", **{"event[phone]": "+1", "event[type]": "in"}
    )
    assert error(response) == (
        400,
        {"success": False, "errorMsg": 'Input value "event" contains a non-scalar value'},
    )


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"type": "in"}, "phone"),
        ({"phone": "+1"}, "type"),
        ({"phone": "+1", "type": "ringing"}, "type"),
        ({"phone": "+1", "type": "hangup", "hangupStatus": "missed"}, "hangupStatus"),
        ({"phone": "+1", "type": "hangup", "hangupStatus": "no answer"}, "hangupStatus"),
        ({"phone": "+1", "type": "in", "userIds": ["x"]}, "userIds[0]"),
        ({"phone": "+1", "type": "in", "codes": "150"}, "codes"),
    ],
)
async def test_invalid_call_events_are_rejected(
    crm: Crm, event: dict[str, Any], field: str
) -> None:
    await crm.register()
    status, body = error(await crm.event(**event))
    assert status == 400
    assert body["errorMsg"] == "Errors in the entity format"
    assert field in body["errors"]
    assert crm.account()["events"] == []


@pytest.mark.parametrize("status", ["answered", "busy", "cancel", "failed", "no answered"])
async def test_every_documented_hangup_status_is_accepted(crm: Crm, status: str) -> None:
    await crm.register()
    response = await crm.event(phone="+1", type="hangup", hangupStatus=status, codes=["150"])
    assert response.json() == {"success": True}


async def test_unknown_codes_and_users_are_reported(crm: Crm) -> None:
    await crm.register()
    body = (await crm.event(phone="+1", type="in", codes=["150", "999"], userIds=[2, 77])).json()
    assert body == {"success": True, "notExistCodes": ["999"], "notExistUsers": [77]}


async def test_popups_open_per_user_on_in_and_close_on_hangup(crm: Crm) -> None:
    await crm.register()
    await crm.event(phone="+375291234567", type="in", codes=["150", "151"], callExternalId="c1")
    await crm.event(phone="+375291234567", type="in", userIds=[3], callExternalId="c1")
    opened = crm.account()["openPopups"]
    assert sorted(opened) == ["1", "2", "3"]
    assert opened["1"][0]["phone"] == "+375291234567"
    assert opened["1"][0]["callExternalId"] == "c1"
    await crm.event(phone="+375291234567", type="hangup", codes=["150"], hangupStatus="cancel")
    assert sorted(crm.account()["openPopups"]) == ["2", "3"]
    await crm.event(
        phone="+375291234567", type="hangup", callExternalId="c1", hangupStatus="answered"
    )
    assert crm.account()["openPopups"] == {}
    closed = [p for p in crm.account()["popups"] if p["userId"] == 2]
    assert closed[0]["hangupStatus"] == "answered"


async def test_an_outgoing_event_opens_a_popup_too(crm: Crm) -> None:
    await crm.register()
    await crm.event(phone="+79001234567", type="out", codes=["152"])
    assert crm.account()["openPopups"]["3"][0]["type"] == "out"


async def test_a_repeated_dial_for_the_same_call_does_not_stack_popups(crm: Crm) -> None:
    await crm.register()
    await crm.event(phone="+1", type="in", codes=["150"], callExternalId="c1")
    await crm.event(phone="+1", type="in", codes=["150", "151"], callExternalId="c1")
    assert {k: len(v) for k, v in crm.account()["openPopups"].items()} == {"1": 1, "2": 1}


async def test_events_are_kept_in_arrival_order_with_extra_form_fields(crm: Crm) -> None:
    await crm.register()
    await crm.post(
        "/api/v5/telephony/call/event",
        event=json.dumps({"phone": "+1", "type": "in", "codes": ["150"]}),
        clientId="extra-client-id-0123456789",
    )
    await crm.event(phone="+1", type="hangup", codes=["150"])
    events = crm.account()["events"]
    assert [e["event"]["type"] for e in events] == ["in", "hangup"]
    assert events[0]["extra"] == {"clientId": "***6789"}  # an extra field VOCHI sends, masked
    assert crm.state()["requests"][-2]["form"]["clientId"] == "***6789"


# --- calls upload -----------------------------------------------------------------------------


def call(external_id: str | None = "1", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "date": "2025-11-26 10:00:03",
        "type": "in",
        "phone": "375291234567",
        "code": "150",
        "result": "answered",
        "duration": 161,
        "externalId": external_id,
        "recordUrl": "https://pbx.example/rec/abc",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


async def test_upload_needs_telephony(crm: Crm) -> None:
    assert error(await crm.upload([call()])) == (
        400,
        {"success": False, "errorMsg": "Telephony not enabled or not supports calls upload"},
    )


async def test_upload_dedups_by_external_id_across_and_within_requests(crm: Crm) -> None:
    await crm.register()
    first = (await crm.upload([call("a"), call("b"), call("a")])).json()
    assert first == {"success": True, "processedCallsCount": 2, "duplicateCalls": ["a"]}
    second = (await crm.upload([call("b", duration=1), call("c"), call(None)])).json()
    assert second == {"success": True, "processedCallsCount": 2, "duplicateCalls": ["b"]}
    calls = crm.account()["calls"]
    assert [c.get("externalId") for c in calls] == ["a", "b", "c", None]
    by_id = {c.get("externalId"): c for c in calls}
    assert by_id["a"]["duplicates"] == 1
    assert by_id["b"]["duplicates"] == 1
    assert by_id["b"]["duration"] == 161  # a re-upload does not update a stored call


@pytest.mark.parametrize(
    "result", ["answered", "busy", "failed", "no answer", "not allowed", "unknown"]
)
async def test_every_documented_call_result_is_accepted(crm: Crm, result: str) -> None:
    await crm.register()
    assert (await crm.upload([call(result=result)])).json()["processedCallsCount"] == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"result": "missed"}, "calls[0][result]"),
        ({"result": "no answered"}, "calls[0][result]"),
        ({"type": "hangup"}, "calls[0][type]"),
        ({"date": "2025-11-26T10:00:03"}, "calls[0][date]"),
        ({"date": "2025-11-26 10:00"}, "calls[0][date]"),
        ({"date": "2025-02-30 10:00:00"}, "calls[0][date]"),
        ({"date": None}, "calls[0][date]"),
        ({"phone": None}, "calls[0][phone]"),
        ({"duration": -1}, "calls[0][duration]"),
        ({"recordUrl": "rec.mp3"}, "calls[0][recordUrl]"),
    ],
)
async def test_invalid_calls_reject_the_whole_batch(
    crm: Crm, overrides: dict[str, Any], field: str
) -> None:
    await crm.register()
    status, body = error(await crm.upload([call("ok"), call("bad", **overrides)]))
    assert status == 400
    assert body["errorMsg"] == "Errors in the entity format"
    assert field.replace("[0]", "[1]") in body["errors"]
    assert crm.account()["calls"] == []


async def test_at_most_fifty_calls_per_upload(crm: Crm) -> None:
    await crm.register()
    ok = await crm.upload([call(str(i)) for i in range(50)])
    assert ok.json()["processedCallsCount"] == 50
    status, body = error(await crm.upload([call(f"x{i}") for i in range(51)]))
    assert status == 400
    assert body["errors"] == {"calls": "This collection should contain 50 elements or less."}


async def test_upload_limit_is_configurable() -> None:
    async with crm_for(make_app(config=SandboxConfig(max_calls_per_upload=2))) as crm:
        await crm.register()
        assert (await crm.upload([call("1"), call("2"), call("3")])).status_code == 400


async def test_upload_with_a_non_array_is_an_entity_error(crm: Crm) -> None:
    await crm.register()
    response = await crm.post("/api/v5/telephony/calls/upload", calls=json.dumps(call()))
    assert error(response)[1]["errors"] == {"calls": "This value should be of type array."}


async def test_requests_events_and_calls_record_when_they_arrived_in_epoch_seconds() -> None:
    """``receivedTs`` is the sandbox clock at arrival; a re-uploaded call keeps its first."""
    clock = iter(datetime(2025, 11, 26, 10, 0, s, 250_000, tzinfo=UTC) for s in range(60))
    moment = next(clock)

    def now() -> datetime:
        return moment

    async with crm_for(make_app(now=now)) as crm:
        await crm.register()
        moment = next(clock)
        await crm.event(phone="+1", type="in", codes=["150"], callExternalId="c1")
        moment = next(clock)
        await crm.upload([call("c1")])
        moment = next(clock)
        await crm.upload([call("c1")])
        account = crm.account()
        requests = crm.state()["requests"]
    base = datetime(2025, 11, 26, 10, 0, 0, 250_000, tzinfo=UTC).timestamp()
    assert [e["receivedTs"] for e in account["events"]] == [base + 1]
    assert [(c["receivedTs"], c["duplicates"]) for c in account["calls"]] == [(base + 2, 1)]
    assert [r["receivedTs"] for r in requests] == [base, base + 1, base + 2, base + 3]


# --- responsible manager ----------------------------------------------------------------------


async def test_manager_comes_from_the_customer_with_his_extension(crm: Crm) -> None:
    await crm.register()
    body = (await crm.get("/api/v5/telephony/manager", phone="375291234567", ignoreStatus=1)).json()
    assert body == {
        "success": True,
        "manager": {
            "id": 1,
            "firstName": "Анна",
            "lastName": "Иванова",
            "patronymic": "",
            "email": "anna@demo.example",
            "code": "150",
        },
    }


async def test_details_add_customer_and_links(crm: Crm) -> None:
    body = (await crm.get("/api/v5/telephony/manager", phone="+375291234567", details=1)).json()
    assert body["customer"]["id"] == 101
    assert body["customer"]["phones"] == [{"number": "+375291234567"}]
    assert body["links"]["customerLink"] == "http://acme.test/customers/101"
    assert body["links"]["lastOrderLink"] == "http://acme.test/orders/1002/edit"
    assert body["links"]["newOrderLink"].startswith("http://acme.test/orders/add?phone=")
    assert "code" not in body["manager"]  # no module registered: no extension known


async def test_manager_falls_back_to_the_customers_last_order(crm: Crm) -> None:
    body = (
        await crm.get("/api/v5/telephony/manager", phone="+375293193330", ignoreStatus=1)
    ).json()
    assert body["manager"]["id"] == 3


@pytest.mark.parametrize(("ignore", "present"), [("0", False), ("1", True)])
async def test_ignore_status_decides_for_a_busy_manager(
    crm: Crm, ignore: str, present: bool
) -> None:
    body = (
        await crm.get("/api/v5/telephony/manager", phone="375447034448", ignoreStatus=ignore)
    ).json()
    assert ("manager" in body) is present


async def test_available_statuses_are_configurable() -> None:
    config = SandboxConfig(manager_available_statuses=("free", "busy"))
    async with crm_for(make_app(config=config)) as crm:
        body = (await crm.get("/api/v5/telephony/manager", phone="375447034448")).json()
        assert body["manager"]["id"] == 2


async def test_unknown_phone_has_no_manager_key(crm: Crm) -> None:
    body = (await crm.get("/api/v5/telephony/manager", phone="+10000000000", details=1)).json()
    assert "manager" not in body
    assert "customer" not in body
    assert set(body["links"]) == {"newOrderLink", "newCustomerLink"}


@pytest.mark.parametrize(
    ("shape", "status", "body"),
    [
        ("null", 200, {"success": True, "manager": None}),
        ("404", 404, {"success": False, "errorMsg": "Not found"}),
    ],
)
async def test_no_manager_shape_is_configurable(
    shape: str, status: int, body: dict[str, Any]
) -> None:
    async with crm_for(make_app(config=SandboxConfig(no_manager_shape=shape))) as crm:
        assert error(await crm.get("/api/v5/telephony/manager", phone="+10000000000")) == (
            status,
            body,
        )


async def test_manager_without_phone_is_parameter_missing(crm: Crm) -> None:
    assert error(await crm.get("/api/v5/telephony/manager")) == (
        400,
        {"success": False, "errorMsg": "Parameter 'phone' is missing"},
    )


async def test_manager_python_booleans_are_rejected_unless_lenient(crm: Crm) -> None:
    strict = await crm.get("/api/v5/telephony/manager", phone="375291234567", details="True")
    assert strict.status_code == 400
    assert strict.json()["errorMsg"] == "Errors in the input parameters"
    async with crm_for(make_app(config=SandboxConfig(strict_booleans=False))) as lenient:
        ok = await lenient.get("/api/v5/telephony/manager", phone="375291234567", details="True")
        assert "customer" in ok.json()


# --- users, customers, orders -----------------------------------------------------------------


async def test_users_list_paginates_with_documented_limits(crm: Crm) -> None:
    body = (await crm.get("/api/v5/users", limit=20, page=1)).json()
    assert body["pagination"] == {
        "limit": 20,
        "totalCount": 5,
        "currentPage": 1,
        "totalPageCount": 1,
    }
    assert [u["id"] for u in body["users"]] == [1, 2, 3, 4, 5]
    assert set(body["users"][0]) >= {"id", "email", "status", "online", "isManager", "groups"}
    page2 = (await crm.get("/api/v5/users", limit=20, page=2)).json()
    assert page2["users"] == []


@pytest.mark.parametrize("limit", ["10", "25", "250", "abc"])
async def test_users_limit_outside_20_50_100_is_an_input_error(crm: Crm, limit: str) -> None:
    status, body = error(await crm.get("/api/v5/users", limit=limit))
    assert status == 400
    assert body["errorMsg"] == "Errors in the input parameters"
    assert "limit" in body["errors"]


@pytest.mark.parametrize(
    ("params", "ids"),
    [
        ({"filter[isManager]": "1"}, [1, 2, 3, 4]),
        ({"filter[isAdmin]": "1"}, [5]),
        ({"filter[online]": "0"}, [4]),
        ({"filter[status]": "free"}, [1, 5]),
        ({"filter[email]": "BORIS@demo.example"}, [2]),
        ({"filter[groups][]": "admins"}, [5]),
        ({"filter[active]": "1", "filter[status]": "busy"}, [2]),
    ],
)
async def test_users_filters(crm: Crm, params: dict[str, str], ids: list[int]) -> None:
    body = (await crm.get("/api/v5/users", **params)).json()
    assert [u["id"] for u in body["users"]] == ids


async def test_user_status_filter_only_matches_online_users(crm: Crm) -> None:
    """User 4 is free but offline."""
    body = (await crm.get("/api/v5/users", **{"filter[status]": "free"})).json()
    assert 4 not in [u["id"] for u in body["users"]]


async def test_user_get_and_not_found(crm: Crm) -> None:
    assert (await crm.get("/api/v5/users/2")).json()["user"]["lastName"] == "Петров"
    assert error(await crm.get("/api/v5/users/99")) == (
        404,
        {"success": False, "errorMsg": "Not found"},
    )


async def test_user_status_changes_the_user(crm: Crm) -> None:
    assert (await crm.post("/api/v5/users/1/status", status="break")).json() == {"success": True}
    assert (await crm.get("/api/v5/users/1")).json()["user"]["status"] == "break"
    bad = await crm.post("/api/v5/users/1/status", status="away")
    assert bad.status_code == 400
    assert bad.json()["errors"] == {"status": "The value you selected is not a valid choice."}
    missing = await crm.post("/api/v5/users/1/status")
    assert missing.json()["errorMsg"] == "Parameter 'status' is missing"


async def test_customers_filter_by_name_manager_and_phone_digits(crm: Crm) -> None:
    by_name = (await crm.get("/api/v5/customers", **{"filter[name]": "Сидоров"})).json()
    assert [c["id"] for c in by_name["customers"]] == [101]
    assert by_name["customers"][0]["managerId"] == 1
    by_phone = (await crm.get("/api/v5/customers", **{"filter[name]": "375447034448"})).json()
    assert [c["id"] for c in by_phone["customers"]] == [102]
    by_manager = (await crm.get("/api/v5/customers", **{"filter[managers][]": "4"})).json()
    assert [c["id"] for c in by_manager["customers"]] == [104]


async def test_customers_unknown_filter_keys_are_ignored(crm: Crm) -> None:
    body = (await crm.get("/api/v5/customers", **{"filter[phone]": "375447034448"})).json()
    assert body["pagination"]["totalCount"] == 4


async def test_orders_filter_by_customer_and_managers(crm: Crm) -> None:
    body = (await crm.get("/api/v5/orders", **{"filter[customerId]": "103"})).json()
    assert [(o["id"], o["managerId"], o["customer"]["id"]) for o in body["orders"]] == [
        (1001, 3, 103)
    ]
    body = (await crm.get("/api/v5/orders", **{"filter[managers][]": ["1", "2"]})).json()
    assert [o["id"] for o in body["orders"]] == [1002, 1003]


async def test_orders_pagination(crm: Crm) -> None:
    body = (await crm.get("/api/v5/orders", limit=50, page=1)).json()
    assert body["pagination"] == {
        "limit": 50,
        "totalCount": 3,
        "currentPage": 1,
        "totalPageCount": 1,
    }


async def test_a_scalar_filter_is_an_input_error(crm: Crm) -> None:
    response = await crm.get("/api/v5/users", filter="None")
    assert error(response)[1]["errorMsg"] == "Errors in the input parameters"


# --- rate limits ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_eleventh_request_inside_one_second_gets_503() -> None:
    clock = FakeClock()
    async with crm_for(make_app(rate_limit=True, clock=clock)) as crm:
        statuses = []
        for _ in range(11):
            statuses.append((await crm.get("/api/v5/users/1")).status_code)
            clock.now += 0.09
        assert statuses == [200] * 10 + [503]
        last = await crm.get("/api/v5/users/1")
        assert error(last) == (503, {"success": False, "errorMsg": "Rate limit exceeded"})
        clock.now = 1.0 + 0.09  # the first request has left the window
        assert (await crm.get("/api/v5/users/1")).status_code == 200
        rejections = crm.state()["rateLimitRejections"]
        assert rejections["count"] == 2
        assert rejections["recent"][0]["key"] == "***cdef"


async def test_telephony_has_its_own_bucket_of_forty() -> None:
    clock = FakeClock()
    async with crm_for(make_app(rate_limit=True, clock=clock)) as crm:
        await crm.register()
        statuses = [
            (await crm.get("/api/v5/telephony/manager", phone="+1")).status_code for _ in range(41)
        ]
        assert statuses == [200] * 40 + [503]
        assert (await crm.get("/api/v5/users/1")).status_code == 200


async def test_rate_limits_are_per_key() -> None:
    clock = FakeClock()
    async with crm_for(make_app(rate_limit=True, clock=clock)) as crm:
        for _ in range(10):
            await crm.get("/api/v5/users/1")
        assert (await crm.get("/api/v5/users/1")).status_code == 503
        async with crm_for(_app_of(crm), key=OTHER_KEY) as other:
            assert (await other.get("/api/v5/users/1")).status_code == 200


async def test_rate_limits_can_be_switched_off() -> None:
    async with crm_for(make_app(rate_limit=False, clock=FakeClock())) as crm:
        statuses = {(await crm.get("/api/v5/users/1")).status_code for _ in range(30)}
        assert statuses == {200}


# --- faults -----------------------------------------------------------------------------------


class FakeSleep:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


async def test_fault_error_status_on_one_endpoint_only(crm: Crm) -> None:
    await crm.register()
    crm.sandbox.add_fault({"endpoint": "telephony/call/event", "status": 503, "times": 1})
    assert error(await crm.event(phone="+1", type="in")) == (
        503,
        {"success": False, "errorMsg": "Service Unavailable"},
    )
    assert (await crm.event(phone="+1", type="in")).status_code == 200
    crm.sandbox.add_fault({"endpoint": "telephony/*", "status": 500})
    assert error(await crm.upload([call()])) == (
        500,
        {"success": False, "errorMsg": "Internal Server Error"},
    )
    assert (await crm.get("/api/v5/users/1")).status_code == 200
    crm.sandbox.clear_faults()
    assert (await crm.upload([call()])).status_code == 200


async def test_fault_down_answers_html_502_and_timeout_stalls_then_504() -> None:
    sleep = FakeSleep()
    async with crm_for(make_app(sleep=sleep)) as crm:
        crm.sandbox.add_fault({"endpoint": "users", "mode": "down"})
        down = await crm.get("/api/v5/users")
        assert down.status_code == 502
        assert down.text.startswith("<html>")
        crm.sandbox.clear_faults()
        crm.sandbox.add_fault({"endpoint": "users/*", "mode": "timeout", "timeout_seconds": 42})
        timeout = await crm.get("/api/v5/users/1")
        assert timeout.status_code == 504
        assert sleep.slept == [42.0]


async def test_fault_latency_and_error_rate_use_the_injected_sleep_and_rng() -> None:
    sleep = FakeSleep()
    async with crm_for(make_app(sleep=sleep, rng=random.Random(7))) as crm:
        crm.sandbox.add_fault({"endpoint": "users/*", "latency_ms": 250})
        crm.sandbox.add_fault({"endpoint": "users/*", "status": 500, "error_rate": 0.5})
        statuses = [(await crm.get("/api/v5/users/1")).status_code for _ in range(40)]
        assert sleep.slept == [0.25] * 40
        assert 5 < statuses.count(500) < 35
        assert set(statuses) == {200, 500}


# --- request log ------------------------------------------------------------------------------


async def test_request_log_decodes_forms_and_masks_keys_and_client_ids() -> None:
    async with crm_for(make_app(), key=None) as crm:
        await crm.post(
            "/api/v5/integration-modules/acme-pbx/edit",
            apiKey=KEY,
            integrationModule=json.dumps(module()),
        )
        await crm.get("/api/v5/users/1", apiKey=KEY)
        state = crm.state()
        text = json.dumps(state)
        assert KEY not in text
        assert SECRET not in text
        edit, get = state["requests"]
        assert edit["auth"] == {"via": "form", "key": "***cdef"}
        assert edit["form"]["integrationModule"]["integrations"]["telephony"]["makeCallUrl"] == (
            "https://pbx.example/make-call"
        )
        assert edit["status"] == 201
        assert get["auth"] == {"via": "query", "key": "***cdef"}
        assert get["query"] == [["apiKey", "***cdef"]]
        assert get["response"]["user"]["id"] == 1
        assert state["accounts"]["acme"]["keys"][0]["key"] == "***cdef"


async def test_system_info_and_key_sites_in_credentials() -> None:
    accounts = [
        {
            "name": "shop",
            "sites": ["main", "second"],
            "api_keys": [{"key": KEY, "sites": ["second"]}, {"key": OTHER_KEY}],
        }
    ]
    app = create_sandbox_app(accounts=accounts, rate_limit=False)
    async with crm_for(app) as crm:
        info = (await crm.get("/api/system-info")).json()
        assert info["success"] is True
        assert info["publicUrl"] == "http://acme.test"
        creds = (await crm.get("/api/credentials")).json()
        assert (creds["siteAccess"], creds["sitesAvailable"]) == ("access_selective", ["second"])
    async with crm_for(app, key=OTHER_KEY) as crm:
        creds = (await crm.get("/api/credentials")).json()
        assert (creds["siteAccess"], creds["sitesAvailable"]) == ("access_full", ["main", "second"])


async def _raw(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
    """One request straight over ASGI, without a Host header (httpx always sends one)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


async def test_an_api_call_without_a_host_header_links_to_the_servers_address() -> None:
    app = make_app()
    status, body = await _raw(app, "GET", "/api/system-info", [(b"x-api-key", KEY.encode())])
    assert status == 200
    assert json.loads(body)["publicUrl"] == "http://127.0.0.1:8080"


async def test_of_a_repeated_api_key_header_the_first_counts() -> None:
    app = make_app()
    first_valid = [(b"x-api-key", KEY.encode()), (b"x-api-key", b"wrong-key-0123456789")]
    status, _ = await _raw(app, "GET", "/api/credentials", first_valid)
    assert status == 200
    status, _ = await _raw(app, "GET", "/api/credentials", first_valid[::-1])
    assert status != 200


async def test_unparseable_phone_finds_no_manager(crm: Crm) -> None:
    body = (await crm.get("/api/v5/telephony/manager", phone="<unknown>")).json()
    assert body == {"success": True}


async def test_state_request_log_can_be_limited_and_followed(crm: Crm) -> None:
    for user_id in (1, 2, 3):
        await crm.get(f"/api/v5/users/{user_id}")
    full = crm.sandbox.state.view()["requests"]
    assert [r["path"] for r in full] == ["/api/v5/users/1", "/api/v5/users/2", "/api/v5/users/3"]
    last = crm.sandbox.state.view(requests=1)["requests"]
    assert [r["path"] for r in last] == ["/api/v5/users/3"]
    after = crm.sandbox.state.view(since=full[0]["seq"])["requests"]
    assert [r["seq"] for r in after] == [full[1]["seq"], full[2]["seq"]]


async def test_cli_accounts_give_each_key_full_telephony_access() -> None:
    from retailcrm_service.sandbox._server import cli_accounts

    accounts, generated = cli_accounts(["key-one-0123456789", "key-two-0123456789"])
    assert generated is None
    app = create_sandbox_app(accounts=accounts, rate_limit=False)
    for key in ("key-one-0123456789", "key-two-0123456789"):
        async with crm_for(app, key=key) as crm:
            assert (await crm.register()).status_code in (200, 201)
            assert (await crm.event(phone="+1", type="in", codes=["150"])).status_code == 200
            assert (await crm.get("/api/v5/users")).json()["pagination"]["totalCount"] == 5
    assert sorted(app.state.sandbox.state.accounts) == ["account-1", "account-2"]
    demo, key = cli_accounts([])
    assert key is not None
    assert len(key) >= 32
    assert demo[0]["name"] == "demo"


async def test_cards_never_hung_up_expire_beyond_the_per_user_cap() -> None:
    async with crm_for(make_app(config=SandboxConfig(max_open_popups_per_user=2))) as crm:
        await crm.register()
        for call_id in ("c1", "c2", "c3"):
            await crm.event(phone="+1", type="in", codes=["150"], callExternalId=call_id)
        open_ids = [p["callExternalId"] for p in crm.account()["openPopups"]["1"]]
        assert open_ids == ["c2", "c3"]
        assert crm.account()["popups"][0]["state"] == "expired"


async def test_fault_can_target_one_verb_and_bad_faults_are_refused(crm: Crm) -> None:
    crm.sandbox.add_fault({"endpoint": "users*", "method": "post", "status": 500})
    assert (await crm.get("/api/v5/users/1")).status_code == 200
    assert (await crm.post("/api/v5/users/1/status", status="free")).status_code == 500
    for bad in (
        {"endpoint": "nope/*", "status": 500},
        {"endpoint": "users", "mode": "explode"},
        {"endpoint": "users", "status": 200},
        {"endpoint": "users", "status": 500, "error_rate": 2},
    ):
        with pytest.raises(ControlError):
            crm.sandbox.add_fault(bad)
