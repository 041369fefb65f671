"""A real OpenSSH server on loopback whose ``asterisk`` is a recording stub.

``SshServer.start(dir)`` runs ``/usr/sbin/sshd -D -e`` on a free port with a temporary config,
host key and authorized_keys (holding a freshly generated client key). Every session runs
through a ``ForceCommand`` wrapper that puts the stub directory first on ``PATH`` and then hands
the original command line to ``/bin/sh -c``, exactly as a login shell would, so quoting mistakes
in the client would show up in the argv the stub records.

The stub ``asterisk`` appends its argv as one JSON line to ``calls.jsonl`` and answers like
Asterisk's CLI: canned text for ``core show channels concise``, a success line for
``channel redirect``, nothing for ``channel originate``, a short description for
``core show channel``.

A test module shares one server between its tests by importing the two fixtures:
``from tests.support.sshd import ssh_fixture, sshd_fixture  # noqa: F401`` and asking for
``ssh`` (the module's server, its recorded calls and canned behaviour reset for each test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh
import pytest

from retailcrm_service.telephony.asterisk_ssh import AsteriskSettings
from tests.support.procs import free_port

SSHD = "/usr/sbin/sshd"

_STUB = r"""#!{python} -I
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\n")
delay_file = os.path.join(here, "delay")
if os.path.exists(delay_file):
    time.sleep(float(open(delay_file).read() or 0))
cli = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "-rx" else ""
if cli == "core show channels concise":
    path = os.path.join(here, "channels.txt")
    sys.stdout.write(open(path, encoding="utf-8").read() if os.path.exists(path) else "")
elif cli.startswith("channel redirect "):
    parts = cli.split(" ")
    gone = os.path.join(here, "gone_channels")
    if os.path.exists(gone) and parts[2] in open(gone).read().split():
        print("Channel '%s' not found" % parts[2])
    else:
        print("Channel '%s' successfully redirected to %s" % (parts[2], parts[3]))
elif cli.startswith("channel originate "):
    pass
elif cli.startswith("core show channel "):
    print(" -- General --\n           Name: %s\n          State: Up (6)" % cli.split(" ")[3])
else:
    print("No such command '%s' (type 'core show help %s' for other possible commands)"
          % (cli, cli.split(" ")[0]))
"""

_WRAPPER = """#!/bin/sh
PATH="{stub_dir}:$PATH"
export PATH
[ -n "$SSH_ORIGINAL_COMMAND" ] || exit 1
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""

_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
MaxSessions 64
MaxStartups 64
ForceCommand {dir}/wrapper.sh
LogLevel VERBOSE
"""


def _write_private(key: asyncssh.SSHKey, path: Path) -> None:
    key.write_private_key(str(path))
    path.chmod(0o600)


def _public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


class SshServer:
    """A running sshd; use as a context manager or call ``stop()``."""

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.stub_dir = directory / "bin"
        self.client_key = directory / "client_ed25519"
        self.known_hosts = directory / "known_hosts"
        self.port = 0
        self.user = _current_user()
        self._proc: subprocess.Popen[bytes] | None = None
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, directory: str | os.PathLike[str]) -> SshServer:
        if not Path(SSHD).exists():
            raise RuntimeError(
                f"{SSHD} is missing: apt-get install -y openssh-server (.ci/run installs it)"
            )
        server = cls(Path(directory))
        server._prepare()
        for _attempt in range(5):
            if server._launch(free_port()):
                return server
        raise RuntimeError(f"sshd did not start: {server.log_text()[-2000:]}")

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stub_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        _write_private(self.host_key, self.dir / "host_ed25519")
        client = asyncssh.generate_private_key("ssh-ed25519")
        _write_private(client, self.client_key)
        (self.dir / "authorized_keys").write_text(_public_line(client) + "\n")
        stub = self.stub_dir / "asterisk"
        stub.write_text(_STUB.replace("{python}", sys.executable))
        stub.chmod(0o755)
        wrapper = self.dir / "wrapper.sh"
        wrapper.write_text(_WRAPPER.format(stub_dir=self.stub_dir))
        wrapper.chmod(0o755)

    def _launch(self, port: int) -> bool:
        self.port = port
        config = self.dir / "sshd_config"
        config.write_text(_CONFIG.format(port=port, dir=self.dir, user=self.user))
        self.write_known_hosts(self.known_hosts)
        log = (self.dir / "sshd.log").open("ab")
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            if self._banner_ok():
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                return sock.recv(64).startswith(b"SSH-2.0")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> SshServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ for tests

    def write_known_hosts(self, path: Path, key: asyncssh.SSHKey | None = None) -> Path:
        """A known_hosts file trusting ``key`` (default: this server's real host key)."""
        key = key or self.host_key
        path.write_text(f"[{self.host}]:{self.port} {_public_line(key)}\n")
        return path

    def settings(self, **overrides: Any) -> AsteriskSettings:
        """Client settings that reach this server with the generated key."""
        values: dict[str, Any] = {
            "user": self.user,
            "key_path": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "port": self.port,
            "connect_timeout": 5.0,
            "command_timeout": 5.0,
        }
        values.update(overrides)
        return AsteriskSettings(**values)

    def calls(self) -> list[list[str]]:
        """Every argv the stub ``asterisk`` received, in order."""
        path = self.stub_dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def set_channels(self, text: str) -> None:
        (self.stub_dir / "channels.txt").write_text(text)

    def set_delay(self, seconds: float) -> None:
        (self.stub_dir / "delay").write_text(str(seconds))

    def set_gone_channels(self, *names: str) -> None:
        (self.stub_dir / "gone_channels").write_text("\n".join(names))

    def reset(self) -> None:
        """Forget recorded calls and canned behaviour (between tests sharing one server)."""
        for name in ("calls.jsonl", "channels.txt", "delay", "gone_channels"):
            (self.stub_dir / name).unlink(missing_ok=True)

    def log_text(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture(scope="module", name="sshd")
def sshd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """One sshd for the whole test module (starting one takes a while)."""
    with SshServer.start(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(name="ssh")
def ssh_fixture(sshd: SshServer) -> SshServer:
    """The module's sshd with nothing recorded or canned yet."""
    sshd.reset()
    return sshd
