"""SmartRedirect's decisions with an in-memory CRM and a fake clock (no network, no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from retailcrm_service.crm.pacing import Pacer
from retailcrm_service.security.secrets import Secret
from retailcrm_service.storage.enterprise_configs import RetailCrmConfig
from retailcrm_service.telephony.smart_redirect import (
    SmartOptions,
    SmartRedirect,
    dialplan_context,
    phone_key,
    sanitize_name,
)
from vochi_crm_client import CacheSettings
from vochi_crm_client.testing import FakeClock, seeded_rng, settle

PHONE = "+375291234567"


class FakeCrm:
    """Answers like RetailCRM's telephony/manager, customers and orders; counts calls."""

    def __init__(
        self,
        *,
        manager: dict[str, Any] | None = None,
        customer: dict[str, Any] | None = None,
        customers: list[dict[str, Any]] | None = None,
        orders: list[dict[str, Any]] | None = None,
        gate: asyncio.Event | None = None,
        fail: Exception | None = None,
    ) -> None:
        self.manager = manager
        self.customer = customer
        self.customer_list = customers or []
        self.order_list = orders or []
        self.gate = gate
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []

    async def telephony_manager(
        self, phone: str, *, details: bool = False, ignore_status: bool = True
    ) -> dict[str, Any]:
        self.calls.append(("telephony/manager", phone))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        body: dict[str, Any] = {"success": True}
        if self.manager is not None:
            body["manager"] = self.manager
        if self.customer is not None:
            body["customer"] = self.customer
        return body

    async def customers(
        self, *, filters: Mapping[str, Any] | None = None, limit: int = 20, page: int = 1
    ) -> dict[str, Any]:
        self.calls.append(("customers", dict(filters or {})))
        return {"success": True, "customers": self.customer_list}

    async def orders(
        self, *, filters: Mapping[str, Any] | None = None, limit: int = 20, page: int = 1
    ) -> dict[str, Any]:
        self.calls.append(("orders", dict(filters or {})))
        return {"success": True, "orders": self.order_list}


class Configs:
    def __init__(self, *configs: RetailCrmConfig) -> None:
        self.by_number = {c.enterprise_number: c for c in configs}

    async def get(self, number: str) -> RetailCrmConfig | None:
        return self.by_number.get(number)


class Statuses:
    def __init__(self, statuses: dict[str, str]) -> None:
        self.statuses = statuses

    async def get(self, enterprise_number: str, user_id: str) -> str | None:
        return self.statuses.get(user_id)


def config(
    number: str = "0367",
    *,
    key: str = "k" * 32,
    extensions: dict[str, str | None] | None = None,
    smart: dict[str, Any] | None = None,
    enabled: bool = True,
) -> RetailCrmConfig:
    return RetailCrmConfig(
        enterprise_number=number,
        enabled=enabled,
        domain="https://acme.retailcrm.ru",
        api_key=Secret(key),
        user_extensions=extensions or {},
        smart_redirect=smart or {},
        ip="10.88.10.19",
    )


async def phone_ids(enterprise_number: str, extension: str) -> int | None:
    return {"150": 31, "151": 32, "152": 33}.get(extension)


def service(
    crm: FakeCrm | dict[str, FakeCrm],
    *configs: RetailCrmConfig,
    clock: FakeClock | None = None,
    statuses: Statuses | None = None,
    pacer: Pacer | None = None,
) -> SmartRedirect:
    def client_for(cfg: RetailCrmConfig) -> FakeCrm:
        return crm[cfg.enterprise_number] if isinstance(crm, dict) else crm

    clock = clock or FakeClock()
    return SmartRedirect(
        configs=Configs(*(configs or (config(),))),
        client_for=client_for,
        internal_phones=phone_ids,
        statuses=statuses,  # type: ignore[arg-type]
        pacer=pacer,
        cache=CACHE,
        clock=clock,
        sleep=clock.sleep,
        rng=seeded_rng(),
    )


CACHE = CacheSettings(ttl=300, ttl_jitter=0, negative_ttl=30, max_staleness=3600, sweep_interval=1)


MANAGER = {"id": 7, "firstName": "Ann", "lastName": "Lee", "code": "150"}


async def test_responsible_manager_gives_extension_and_dialplan_context() -> None:
    crm = FakeCrm(manager=MANAGER, customer={"id": 15, "firstName": "Ivan", "lastName": "Petrov"})
    async with service(crm) as smart:
        decision = await smart.decide("0367", PHONE, trunk="0001363")
    assert (decision.source, decision.extension, decision.manager_id) == (
        "telephony_manager",
        "150",
        7,
    )
    assert decision.dialplan == "mngr31_0001363_1"
    assert decision.name == "Petrov Ivan"
    assert decision.manager_name == "Lee Ann"


async def test_local_user_extensions_win_over_retailcrm_code() -> None:
    crm = FakeCrm(manager=MANAGER)
    async with service(crm, config(extensions={"7": "152"})) as smart:
        decision = await smart.decide("0367", PHONE, trunk="0001363")
    assert decision.extension == "152"
    assert decision.dialplan == "mngr33_0001363_1"


async def test_without_responsible_manager_the_customers_manager_is_used() -> None:
    crm = FakeCrm(
        customers=[{"id": 15, "managerId": 8, "phones": [{"number": "8 029 123-45-67"}]}],
    )
    async with service(crm, config(extensions={"8": "151"})) as smart:
        decision = await smart.decide("0367", PHONE, trunk="0001363")
    assert (decision.source, decision.manager_id, decision.extension) == ("customer", 8, "151")


async def test_then_the_latest_orders_manager_is_used() -> None:
    crm = FakeCrm(
        customer={"id": 15, "firstName": "Ivan"},
        orders=[
            {"id": 1, "managerId": 8, "createdAt": "2025-01-01 10:00:00"},
            {"id": 2, "managerId": 9, "createdAt": "2025-06-01 10:00:00"},
            {"id": 3, "managerId": None, "createdAt": "2025-09-01 10:00:00"},
        ],
    )
    async with service(crm, config(extensions={"8": "151", "9": "152"})) as smart:
        decision = await smart.decide("0367", PHONE, trunk="0001363")
    assert (decision.source, decision.manager_id, decision.extension) == ("order", 9, "152")
    assert ("orders", {"customerId": 15}) in crm.calls


async def test_manager_without_any_extension_is_not_redirected() -> None:
    crm = FakeCrm(manager={"id": 7, "firstName": "Ann"})
    async with service(crm) as smart:
        decision = await smart.decide("0367", PHONE, trunk="0001363")
    assert (decision.source, decision.extension, decision.dialplan) == ("unmapped", None, None)


def manager_lookups(crm: FakeCrm) -> int:
    return len([c for c in crm.calls if c[0] == "telephony/manager"])


async def test_answers_are_cached_positive_for_minutes_negative_for_less() -> None:
    clock = FakeClock()
    found, nobody = FakeCrm(manager=MANAGER), FakeCrm()
    crms = {"0367": found, "0368": nobody}
    async with service(crms, config("0367"), config("0368"), clock=clock) as smart:
        for _ in range(3):
            assert (await smart.decide("0367", PHONE, trunk="1")).extension == "150"
            assert (await smart.decide("0368", PHONE, trunk="1")).source == "none"
        assert (await smart.decide("0367", PHONE)).cached
        assert (manager_lookups(found), manager_lookups(nobody)) == (1, 1)
        await clock.run_for(31, step=1)
        await smart.decide("0367", PHONE)
        await smart.decide("0368", PHONE)
        assert (manager_lookups(found), manager_lookups(nobody)) == (1, 2)


async def test_a_stale_answer_is_served_at_once_and_refreshed_in_the_background() -> None:
    clock = FakeClock()
    crm = FakeCrm(manager=MANAGER)
    async with service(crm, clock=clock) as smart:
        await smart.decide("0367", PHONE, trunk="1")
        await clock.run_for(301, step=1)
        crm.manager = {**MANAGER, "id": 9, "code": "151"}
        stale = await smart.decide("0367", PHONE, trunk="1")
        await settle()
        fresh = await smart.decide("0367", PHONE, trunk="1")
    assert (stale.cached, stale.manager_id) == (True, 7)
    assert (fresh.cached, fresh.manager_id) == (True, 9)
    assert manager_lookups(crm) == 2


async def test_crm_errors_fail_open_and_are_not_stored() -> None:
    crm = FakeCrm(fail=RuntimeError("boom"))
    async with service(crm) as smart:
        first = await smart.decide("0367", PHONE, trunk="1")
        crm.fail = None
        crm.manager = MANAGER
        second = await smart.decide("0367", PHONE, trunk="1")
    assert (first.source, first.dialplan, first.as_reply()) == (
        "error",
        None,
        b'{"Name":"","DialPlan":null}',
    )
    assert (second.source, second.extension) == ("telephony_manager", "150")


async def test_concurrent_calls_for_one_phone_share_one_lookup() -> None:
    gate = asyncio.Event()
    crm = FakeCrm(manager=MANAGER, gate=gate)
    smart_cm = service(crm, config(smart={"deadline_ms": 2000}))
    async with smart_cm as smart:
        waiting = [
            asyncio.get_running_loop().create_task(smart.decide("0367", PHONE, trunk="1"))
            for _ in range(10)
        ]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gate.set()
        decisions = await asyncio.gather(*waiting)
    assert {d.extension for d in decisions} == {"150"}
    assert len(crm.calls) == 1


async def test_each_enterprise_is_asked_with_its_own_account() -> None:
    a, b = FakeCrm(manager=MANAGER), FakeCrm(manager={**MANAGER, "id": 9, "code": "151"})
    async with service({"0367": a, "0368": b}, config("0367"), config("0368")) as smart:
        first = await smart.decide("0367", PHONE, trunk="1")
        second = await smart.decide("0368", PHONE, trunk="1")
    assert (first.manager_id, second.manager_id) == (7, 9)
    assert len(a.calls) == len(b.calls) == 1


async def test_manager_away_by_retailcrm_status_is_not_rung() -> None:
    crm = FakeCrm(manager=MANAGER)
    async with service(crm, statuses=Statuses({"7": "dinner"})) as smart:
        decision = await smart.decide("0367", PHONE, trunk="1")
    assert (decision.source, decision.extension, decision.dialplan) == (
        "manager_dinner",
        None,
        None,
    )


async def test_disabled_unknown_and_name_only_enterprises() -> None:
    crm = FakeCrm(manager=MANAGER, customer={"firstName": "Ivan"})
    configs = (
        config("0367", enabled=False),
        config("0368", smart={"mode": "off"}),
        config("0369", smart={"mode": "name-only"}),
    )
    async with service(crm, *configs) as smart:
        assert (await smart.decide("0367", PHONE)).source == "disabled"
        assert (await smart.decide("0368", PHONE)).source == "disabled"
        assert (await smart.decide("9999", PHONE)).source == "unknown_enterprise"
        assert (await smart.decide("0369", "<unknown>")).source == "invalid_phone"
        named = await smart.decide("0369", PHONE, trunk="0001363")
    assert (named.extension, named.dialplan, named.name) == ("150", None, "Ivan")


async def test_lookups_take_a_telephony_slot_of_the_enterprises_key() -> None:
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    crm = FakeCrm(manager=MANAGER)
    async with service(crm, clock=clock, pacer=pacer) as smart:
        await smart.decide("0367", PHONE, trunk="1")
    # The slot was taken: the next telephony request of this key has to wait its turn.
    assert pacer.reserve("k" * 32, "telephony/manager") > 0
    assert pacer.reserve("other-key-xxxxxxxxxxxxxxxxxxxxxx", "telephony/manager") == 0


def test_names_are_sanitised_for_the_dialplan_macro() -> None:
    assert sanitize_name('Lee, "Ann"  \\ the\nBoss') == "Lee Ann the Boss"
    assert sanitize_name(None) == ""
    assert len(sanitize_name("x" * 500)) <= 48
    assert sanitize_name("Пётр Иванов") == "Пётр Иванов"


def test_dialplan_context_needs_an_internal_phone_and_a_sane_trunk() -> None:
    assert dialplan_context(31, "0001363") == "mngr31_0001363_1"
    assert dialplan_context(31, "sip-line-main") == "mngr31_sip-line-main_1"
    assert dialplan_context(None, "0001363") is None
    assert dialplan_context(31, None) is None
    assert dialplan_context(31, "0001363,evil") is None
    assert dialplan_context(31, "a b") is None


def test_options_are_clamped_and_defaulted() -> None:
    assert SmartOptions.from_mapping(None) == SmartOptions()
    opts = SmartOptions.from_mapping(
        {"deadline_ms": 5, "mode": "routing+name", "redirect_channel": "1"}
    )
    assert (opts.deadline, opts.mode, opts.redirect_channel) == (0.02, "routing", True)
    assert SmartOptions.from_mapping({"deadline_ms": 10**9}).deadline == 2.0
    assert SmartOptions.from_mapping({"enabled": False}).mode == "off"
    assert SmartOptions.from_mapping({"redirect_context": "bad context"}).redirect_context == (
        "inoffice"
    )
    assert phone_key("+375 (29) 123-45-67") == "375291234567"
