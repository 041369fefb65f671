"""``/metrics`` of both programs after the fixture calls, as Prometheus reads it: real processes
(vochi-call-service -> retailcrm-service serve -> the sandbox), parsed by prometheus-client."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.e2e.test_pipeline import wait_for_rows
from tests.support.pipeline import (  # noqa: F401  (api_key, crm, enterprise: pytest fixtures)
    FAST_ENV,
    api_key_fixture,
    crm_fixture,
    enterprise_fixture,
    fixture_records,
    wait_drained,
)
from tests.support.procs import REPO_ROOT, ServiceProcess


def _scrape(url: str) -> tuple[dict[str, str], list[Sample]]:
    """``{family: type}`` and every sample of ``url``'s ``/metrics``."""
    response = httpx.get(url + "/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    return {f.name: f.type for f in families}, [s for f in families for s in f.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def _assert_documented(types: dict[str, str]) -> None:
    """Every family is in docs/operations.md's tables (by its name without the prefix)."""
    guide = (REPO_ROOT / "docs" / "operations.md").read_text()
    for name, kind in types.items():
        if name.endswith("_created"):  # prometheus-client's creation time of a counter/histogram
            continue
        short = re.sub(r"^(retailcrm_service|vochi_crm_client)_", "", name)
        if kind == "counter":
            short += "_total"
        assert f"{short}`" in guide, name


def _assert_prometheus_conventions(
    types: dict[str, str], samples: list[Sample], enterprise: str
) -> None:
    for sample in samples:
        # no enterprise number (or any other id) is ever part of a metric name
        assert enterprise not in sample.name, sample.name
        assert not re.search(r"\d{3,}", sample.name), sample.name
        family = re.sub(r"_(total|created|bucket|count|sum)$", "", sample.name)
        if types.get(family) == "counter":
            assert sample.name.endswith(("_total", "_created")), sample.name
    # every counter-like stat is a counter, not a gauge
    for name, kind in types.items():
        if kind == "gauge":
            assert not name.endswith("_total"), name


@pytest.mark.slow
def test_metrics_of_both_programs_are_typed_labelled_and_have_latency_histograms(
    database_url: str, crm: ServiceProcess, enterprise: str
) -> None:
    with ServiceProcess.service(database_url, env=FAST_ENV) as service:
        targets = {"retailcrm": service.url + "/api/events"}
        with ServiceProcess.call_service(database_url, targets=targets) as calls:
            for record in fixture_records():
                body = record["body"]
                response = httpx.post(
                    f"{calls.url}/{record['event']}",
                    json=body,
                    headers={"Token": body["Token"]},
                    timeout=10,
                )
                assert response.status_code == 200, response.text
            wait_for_rows(database_url, 12)
            asyncio.run(wait_drained(database_url))
            redirect = httpx.post(
                service.url + "/api/smart-redirect",
                json={"enterprise_number": enterprise, "phone": "+375291234567"},
                timeout=10,
            )
            assert redirect.status_code == 200
            call_types, call_samples = _scrape(calls.url)
        types, samples = _scrape(service.url)

    _assert_prometheus_conventions(call_types, call_samples, enterprise)
    _assert_prometheus_conventions(types, samples, enterprise)
    _assert_documented(call_types)
    _assert_documented(types)

    # the call service: its webhooks and the library's counters, by label
    assert _value(call_samples, "vochi_call_service_webhooks_total", event="dial") == 7
    ack = "vochi_call_service_webhook_duration_seconds_count"
    assert _value(call_samples, ack, event="hangup") == 6
    assert call_types["vochi_crm_client_delivered_events"] == "counter"
    assert _value(call_samples, "vochi_crm_client_delivered_events_total", target="retailcrm") == 12
    assert _value(call_samples, "vochi_crm_client_breaker_state", state="closed") == 1
    assert _value(call_samples, "vochi_crm_client_cache_lookups_total", cache="matrix") > 0

    # the service: counters as counters, latency histograms with observations
    assert types["retailcrm_service_intake_events"] == "counter"
    assert _value(samples, "retailcrm_service_intake_events_total", outcome="accepted") == 12
    assert _value(samples, "retailcrm_service_intake_commit_duration_seconds_count") >= 1
    assert types["retailcrm_service_delivery_latency_seconds"] == "histogram"
    popup = _value(samples, "retailcrm_service_delivery_latency_seconds_count", kind="popup")
    history = _value(samples, "retailcrm_service_delivery_latency_seconds_count", kind="history")
    assert (popup, history) == (7, 4)
    delivered = _value(
        samples, "retailcrm_service_delivery_outcomes_total", kind="popup", outcome="delivered"
    )
    assert delivered == 7
    request_count = "retailcrm_service_crm_request_duration_seconds_count"
    # at least one request per delivered popup (a slow answer on a loaded machine is retried)
    assert _value(samples, request_count, endpoint="telephony/call/event") >= 7
    assert _value(samples, request_count, endpoint="telephony/calls/upload") >= 1
    # every request is counted once by outcome and timed once
    requests = _value(samples, "retailcrm_service_crm_requests_total")
    assert requests == _value(samples, request_count)
    assert _value(samples, "retailcrm_service_crm_requests_total", outcome="ok") >= 8
    smart = _value(
        samples,
        "retailcrm_service_http_request_duration_seconds_count",
        route="/api/smart-redirect",
    )
    assert smart == 1
    webhook_ack = _value(
        samples, "retailcrm_service_http_request_duration_seconds_count", route="/api/events"
    )
    assert webhook_ack >= 1
    assert _value(samples, "retailcrm_service_cache_lookups_total", cache="config") > 0
    assert _value(samples, "retailcrm_service_listener_connected") == 1
    # the backlog is read at each delivery sweep (every second): a level, not a count
    assert types["retailcrm_service_outbox_due_rows"] == "gauge"
    assert _value(samples, "retailcrm_service_outbox_oldest_due_age_seconds") >= 0
    assert _value(samples, "retailcrm_service_delivery_breakers", state="closed") == 1
    # enterprise is a label only while its breaker is not closed: none here
    assert not [s for s in samples if s.name == "retailcrm_service_delivery_breaker_open"]
