"""One dead Asterisk host or one noisy enterprise cannot make other enterprises' redirects fail:
background SSH jobs are limited per enterprise, and a host whose connects fail is marked down so
that commands for it fail at once instead of each waiting out a connect timeout (a real sshd on
127.0.0.1, and a silent listener on 127.0.0.2 that accepts TCP but never speaks SSH)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from retailcrm_service.storage.journal import IntegrationLogWriter, LogRow
from retailcrm_service.telephony.asterisk_ssh import AsteriskControl, AsteriskUnavailable
from retailcrm_service.telephony.call_control import CallControl
from retailcrm_service.telephony.smart_redirect import Decision
from tests.support.sshd import SshServer, ssh_fixture, sshd_fixture  # noqa: F401

LIVE = "127.0.0.1"
DEAD = "127.0.0.2"


class SilentHost:
    """Accepts connections on ``DEAD`` and never answers: a hung host, as SSH sees it."""

    def __init__(self) -> None:
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)

    async def start(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._accept, DEAD, port)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


@pytest.fixture
async def silent(ssh: SshServer) -> AsyncIterator[SilentHost]:
    host = SilentHost()
    server = await host.start(ssh.port)  # the SSH port is one setting for every host
    try:
        yield host
    finally:
        host.close()
        server.close()


class Journal:
    """A journal sink keeping the rows in memory."""

    def __init__(self) -> None:
        self.rows: list[LogRow] = []

    async def __call__(self, rows: Sequence[LogRow]) -> None:
        self.rows.extend(rows)


def _decision(enterprise: str, host: str) -> Decision:
    return Decision(
        source="customer",
        extension="151",
        manager_id=19,
        enterprise_number=enterprise,
        redirect_channel=True,
        host=host,
    )


async def test_commands_for_a_dead_host_fail_fast_once_it_is_marked_down(
    ssh: SshServer, silent: SilentHost
) -> None:
    settings = ssh.settings(connect_timeout=0.5, host_breaker_failures=2)
    async with AsteriskControl(settings=settings) as asterisk:
        results = await asyncio.gather(
            *(asterisk.redirect(DEAD, f"SIP/150-0000000{i}", "151") for i in range(8)),
            return_exceptions=True,
        )
        assert all(isinstance(r, AsteriskUnavailable) for r in results)
        # later commands are refused without connecting while the host is down
        for i in range(4):
            with pytest.raises(AsteriskUnavailable):
                await asterisk.redirect(DEAD, f"SIP/151-0000000{i}", "151")
        # a live host is not affected
        await asterisk.redirect(LIVE, "SIP/152-00000001", "151")
        stats = asterisk.stats()
    # one connect was tried, the commands queued behind it shared its failure; no one else
    # waited out another connect timeout
    assert silent.connections <= settings.host_breaker_failures
    assert stats["host_down_refusals"] >= 10
    assert stats["hosts_down"] == 1
    assert ssh.calls() == [["asterisk", "-rx", "channel redirect SIP/152-00000001 inoffice,151,1"]]


async def test_a_noisy_enterprise_cannot_take_the_slots_of_another(
    ssh: SshServer, silent: SilentHost
) -> None:
    settings = ssh.settings(
        connect_timeout=1.0, max_background=10, max_per_enterprise=4, host_breaker_failures=50
    )
    sink = Journal()
    async with (
        IntegrationLogWriter(sink=sink) as journal,
        AsteriskControl(settings=settings) as asterisk,
    ):
        control = CallControl(asterisk=asterisk, journal=journal)
        noisy = [
            control.schedule_redirect(_decision("0500", DEAD), f"SIP/150-000000{i:02}", None)
            for i in range(20)
        ]
        quiet = control.schedule_redirect(_decision("0367", LIVE), "SIP/151-00000001", "1.1")
        clicks = control.start_call("0500", DEAD, "150", "375291234567")
        assert noisy.count(True) == 4
        assert not clicks
        assert quiet
        for _ in range(400):
            if not asterisk.stats()["background_jobs"]:
                break
            await asyncio.sleep(0.025)
        await journal.flush()
    assert asterisk.stats()["jobs_rejected_enterprise"] == 17
    assert ssh.calls() == [["asterisk", "-rx", "channel redirect SIP/151-00000001 inoffice,151,1"]]
    done = {(r.enterprise_number, r.status) for r in sink.rows}
    assert ("0367", "success") in done
