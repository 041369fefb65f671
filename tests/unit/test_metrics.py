"""The service's Prometheus families: bounded labels, typed values, read from the /stats sources."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from retailcrm_service.ops.metrics import Metrics, crm_endpoint


def _families(metrics: Metrics) -> dict[str, Any]:
    text = metrics.exposition().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_crm_endpoint_labels_replace_ids_and_codes_so_their_set_stays_bounded() -> None:
    assert crm_endpoint("/api/v5/telephony/call/event") == "telephony/call/event"
    assert crm_endpoint("/api/v5/users/19/status") == "users/{id}/status"
    assert crm_endpoint("/api/v5/users/20/status") == "users/{id}/status"
    assert crm_endpoint("/api/v5/integration-modules/vochi-telephony/edit") == (
        "integration-modules/{id}/edit"
    )
    assert crm_endpoint("/api/credentials") == "credentials"
    assert crm_endpoint("/api/v5/a/b/c/d/e/f") == "{id}/{id}/{id}/{id}"


def test_enterprise_is_a_label_only_while_its_breaker_is_not_closed() -> None:
    metrics = Metrics()
    breakers = {"0367": "closed", "0368": "open", "0369": "half_open"}
    metrics.add_source("outbox", lambda: {"breakers": breakers, "backlog": {"due": 3}})
    families = _families(metrics)
    failing = families["retailcrm_service_delivery_breaker_open"].samples
    assert sorted(s.labels["enterprise"] for s in failing) == ["0368", "0369"]
    by_state = {
        s.labels["state"]: s.value for s in families["retailcrm_service_delivery_breakers"].samples
    }
    assert by_state == {"closed": 1, "open": 1, "half_open": 1}
    assert families["retailcrm_service_outbox_due_rows"].samples[0].value == 3
    breakers["0368"] = breakers["0369"] = "closed"
    assert not _families(metrics)["retailcrm_service_delivery_breaker_open"].samples


def test_stats_counters_are_counters_and_levels_are_gauges() -> None:
    metrics = Metrics()
    metrics.add_source(
        "integration_logs", lambda: {"written": 5, "queued": 2, "retention_days": 30}
    )
    families = _families(metrics)
    assert families["retailcrm_service_journal_written_rows"].type == "counter"
    assert families["retailcrm_service_journal_written_rows"].samples[0].name.endswith("_total")
    assert families["retailcrm_service_journal_queued_rows"].type == "gauge"
    # a setting is not a metric
    assert not [name for name in families if "retention" in name]


def test_a_failing_stats_source_leaves_the_other_metrics_standing() -> None:
    metrics = Metrics()

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    metrics.add_source("outbox", broken)
    metrics.add_source("asterisk", lambda: {"commands": 4})
    families = _families(metrics)
    assert families["retailcrm_service_asterisk_commands"].samples[0].value == 4
    assert "retailcrm_service_outbox_due_rows" not in families
