"""AsteriskControl against a real OpenSSH sshd on loopback with a recording ``asterisk`` stub."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest

from retailcrm_service.telephony.asterisk_ssh import (
    AsteriskControl,
    AsteriskTimeout,
    AsteriskUnavailable,
    ChannelNotFound,
    HostKeyRejected,
    InvalidArgument,
)
from tests.support.sshd import SshServer, ssh_fixture, sshd_fixture  # noqa: F401

HOST = "127.0.0.1"


async def test_redirect_runs_exactly_the_documented_command(ssh: SshServer) -> None:
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        result = await asterisk.redirect(HOST, "SIP/150-0000a1b2", "151")
    assert ssh.calls() == [["asterisk", "-rx", "channel redirect SIP/150-0000a1b2 inoffice,151,1"]]
    assert "successfully redirected" in result.stdout


async def test_originate_runs_exactly_the_documented_command(ssh: SshServer) -> None:
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        await asterisk.originate(HOST, "150", "+375 29 123-45-67")
    assert ssh.calls() == [
        [
            "asterisk",
            "-rx",
            "channel originate LOCAL/150@web-originate application Dial "
            "LOCAL/+375291234567@inoffice",
        ]
    ]


async def test_local_channel_with_semicolon_half_reaches_asterisk_intact(
    ssh: SshServer,
) -> None:
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        await asterisk.redirect(HOST, "Local/150@ctx-0000001;1", "152", context="mngr5_0001363_1")
    assert ssh.calls() == [
        ["asterisk", "-rx", "channel redirect Local/150@ctx-0000001;1 mngr5_0001363_1,152,1"]
    ]


async def test_channel_listing_is_parsed_from_the_host(ssh: SshServer) -> None:
    ssh.set_channels(
        "SIP/150-0000a1b2!inoffice!150!1!Up!Dial!SIP/151,30!375291234567!!!3!12!br!1757840723.6\n"
    )
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        channels = await asterisk.list_channels(HOST)
    assert [(c.name, c.unique_id) for c in channels] == [("SIP/150-0000a1b2", "1757840723.6")]
    assert ssh.calls() == [["asterisk", "-rx", "core show channels concise"]]


HOSTILE_CHANNELS = ["SIP/150-0000a1b2; touch /tmp/pwned", "SIP/$(reboot)", "SIP/150' ; id ; '"]
HOSTILE_PHONES = ["375291234567; reboot", "$(id)", "+375`id`", "375 29\nreboot"]


async def test_hostile_arguments_are_refused_before_any_ssh(ssh: SshServer) -> None:
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        for channel in HOSTILE_CHANNELS:
            with pytest.raises(InvalidArgument):
                await asterisk.redirect(HOST, channel, "150")
        for phone in HOSTILE_PHONES:
            with pytest.raises(InvalidArgument):
                await asterisk.originate(HOST, "150", phone)
        with pytest.raises(InvalidArgument):
            await asterisk.originate("127.0.0.1 -oProxyCommand=id", "150", "375291234567")
        assert asterisk.stats()["connects"] == 0
    assert ssh.calls() == []


async def test_unknown_host_key_is_refused(ssh: SshServer, tmp_path: Path) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    known = ssh.write_known_hosts(tmp_path / "known_hosts", key=impostor)
    async with AsteriskControl(settings=ssh.settings(known_hosts=str(known))) as asterisk:
        with pytest.raises(HostKeyRejected):
            await asterisk.originate(HOST, "150", "375291234567")
    assert ssh.calls() == []


async def test_host_missing_from_known_hosts_is_refused(ssh: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    async with AsteriskControl(settings=ssh.settings(known_hosts=str(empty))) as asterisk:
        with pytest.raises(HostKeyRejected):
            await asterisk.redirect(HOST, "SIP/150-0000a1b2", "151")
    missing = ssh.settings(known_hosts=str(tmp_path / "absent"))
    async with AsteriskControl(settings=missing) as asterisk:
        with pytest.raises(HostKeyRejected):
            await asterisk.redirect(HOST, "SIP/150-0000a1b2", "151")
    assert ssh.calls() == []


async def test_a_key_the_host_does_not_authorise_is_refused(ssh: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    async with AsteriskControl(settings=ssh.settings(key_path=str(stranger))) as asterisk:
        with pytest.raises(AsteriskUnavailable):
            await asterisk.originate(HOST, "150", "375291234567")
    assert ssh.calls() == []


async def test_one_connection_is_reused_and_closed_when_idle(ssh: SshServer) -> None:
    now = [1000.0]
    settings = ssh.settings(idle_close=60.0)
    async with AsteriskControl(settings=settings, clock=lambda: now[0]) as asterisk:
        await asyncio.gather(
            *(asterisk.redirect(HOST, f"SIP/15{i}-0000a1b2", "151") for i in range(5))
        )
        assert asterisk.stats()["connects"] == 1
        now[0] += 30
        assert await asterisk.close_idle() == 0
        now[0] += 31
        assert await asterisk.close_idle() == 1
        assert asterisk.stats()["open_connections"] == 0
        await asterisk.originate(HOST, "150", "375291234567")
        assert asterisk.stats()["connects"] == 2
    assert len(ssh.calls()) == 6


async def test_a_hung_command_times_out(ssh: SshServer) -> None:
    ssh.set_delay(3)
    async with AsteriskControl(settings=ssh.settings(command_timeout=0.5)) as asterisk:
        with pytest.raises(AsteriskTimeout):
            await asterisk.originate(HOST, "150", "375291234567")


async def test_redirect_of_a_vanished_channel_reports_channel_not_found(
    ssh: SshServer,
) -> None:
    ssh.set_gone_channels("SIP/150-0000dead")
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        with pytest.raises(ChannelNotFound):
            await asterisk.redirect(HOST, "SIP/150-0000dead", "151")


async def test_background_jobs_finish_before_close_and_none_start_after(
    ssh: SshServer,
) -> None:
    done: list[str] = []

    async def job() -> None:
        await asterisk.originate(HOST, "150", "375291234567")
        done.append("ok")

    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        assert asterisk.spawn(job(), name="click-to-call")
    assert done == ["ok"]
    assert not asterisk.spawn(job(), name="too-late")
    assert len(ssh.calls()) == 1


async def test_a_malformed_client_key_is_reported_as_unavailable(
    ssh: SshServer, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    async with AsteriskControl(settings=ssh.settings(key_path=str(garbage))) as asterisk:
        with pytest.raises(AsteriskUnavailable):
            await asterisk.originate(HOST, "150", "375291234567")
    assert ssh.calls() == []


async def test_show_channel_runs_the_documented_inspection_command(ssh: SshServer) -> None:
    async with AsteriskControl(settings=ssh.settings()) as asterisk:
        await asterisk.show_channel(HOST, "SIP/150-0000a1b2")
    assert ssh.calls() == [["asterisk", "-rx", "core show channel SIP/150-0000a1b2"]]
