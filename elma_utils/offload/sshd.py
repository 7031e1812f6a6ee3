"""Run a real OpenSSH sshd on 127.0.0.1 with its own files in one directory.

Tests, notebooks and the demo use it to exercise the offload link against the same server a
deployment would use, without touching the system's sshd: its own config, host key,
authorized_keys, pid and log file, in the foreground (``sshd -D -e``), on a loopback port.
The config allows only public-key logins and only local port forwarding (the edge's
``direct-tcpip`` channel), optionally restricted to one destination, plus read-only SFTP.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from elma_utils.offload.ssh_keys import generate_ed25519_key, load_private_key

SSHD_BINARY = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # Debian's compiled-in privilege separation directory (root only)


class SSHDError(RuntimeError):
    """sshd could not be configured or started; the message carries its log."""


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sshd_config_text(
    *,
    port: int,
    host_key: Path,
    authorized_keys: Path,
    pid_file: Path,
    user: str,
    permit_open: tuple[str, int] | None,
    sftp_root: Path | None,
    listen: str = "127.0.0.1",
) -> str:
    """The sshd_config: key-only logins for ``user``, local forwarding only, read-only SFTP."""
    lines = [
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {user}",
        "PubkeyAuthentication yes",
        "PubkeyAcceptedAlgorithms ssh-ed25519",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",  # keys live in temp dirs whose owners/modes sshd would otherwise reject
        "AllowTcpForwarding local",  # the edge's direct-tcpip channel; no remote forwards
        f"PermitOpen {permit_open[0]}:{permit_open[1]}" if permit_open else "PermitOpen any",
        "GatewayPorts no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "PermitTTY no",
        "PrintMotd no",
        "ClientAliveInterval 15",
        "ClientAliveCountMax 3",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "LogLevel VERBOSE",
    ]
    if sftp_root is not None:
        lines.append(f"Subsystem sftp internal-sftp -R -d {sftp_root}")
    return "\n".join(lines) + "\n"


@dataclass
class OpenSSHServer:
    """A foreground sshd started by :func:`start_sshd`; stop it with :meth:`stop` (or ``with``)."""

    directory: Path
    port: int
    host_key_path: Path
    authorized_keys_path: Path
    config_path: Path
    log_path: Path
    user: str
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def host_key(self):
        """The server's public host key (for pinning in known_hosts)."""
        return load_private_key(self.host_key_path)

    def is_running(self) -> bool:
        return self.process.poll() is None

    def session_pids(self) -> list[int]:
        """PIDs of the processes serving this sshd's connections (its children and theirs)."""
        return _descendants(self.process.pid)

    def drop_connections(self) -> int:
        """Kill this sshd's per-connection children (simulates a dropped link); returns how many."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the listener and its connection children (only processes this object started)."""
        if self.process.poll() is None:
            children = self.session_pids()
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
            for pid in children:  # sshd -D leaves established sessions running on SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> OpenSSHServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _descendants(pid: int) -> list[int]:
    """Children of ``pid`` and theirs, from /proc (Linux); parents come before their children."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(x) for x in task.read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found.extend(kids)
            queue.extend(kids)
    return found


def _wait_for_banner(port: int, process: subprocess.Popen, deadline: float) -> bool:
    """True once sshd answers with its SSH banner; False if it exited or the deadline passed."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def start_sshd(
    directory: str | os.PathLike,
    *,
    authorized_keys_path: str | os.PathLike,
    port: int = 0,
    host_key_path: str | os.PathLike | None = None,
    permit_open: tuple[str, int] | None = None,
    sftp_root: str | os.PathLike | None = None,
    user: str | None = None,
    start_timeout: float = 10.0,
) -> OpenSSHServer:
    """Start sshd on 127.0.0.1:``port`` (0 = a free port) with its files in ``directory``.

    A host key is made in ``directory`` unless ``host_key_path`` is given (an existing key
    keeps the pinned fingerprint across restarts). ``permit_open`` limits forwarding to one
    destination; ``sftp_root`` enables read-only internal-sftp starting in that directory.
    Only ``user`` (default: the current user) may log in, with a key from ``authorized_keys_path``.
    """
    if not Path(SSHD_BINARY).exists():
        raise SSHDError(f"{SSHD_BINARY} not found: install openssh-server")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    host_key = Path(host_key_path) if host_key_path else directory / "ssh_host_ed25519_key"
    if not host_key.exists():
        generate_ed25519_key(host_key, comment="elma-sshd-host")
    user = user or getpass.getuser()
    config_path, log_path = directory / "sshd_config", directory / "sshd.log"
    attempts = 1 if port else 5  # a free port can be taken between probing and binding: retry
    last_log = ""
    for _ in range(attempts):
        chosen = port or free_loopback_port()
        config_path.write_text(
            sshd_config_text(
                port=chosen,
                host_key=host_key.resolve(),
                authorized_keys=Path(authorized_keys_path).resolve(),
                pid_file=directory / "sshd.pid",
                user=user,
                permit_open=permit_open,
                sftp_root=Path(sftp_root).resolve() if sftp_root else None,
            )
        )
        check = subprocess.run([SSHD_BINARY, "-t", "-f", str(config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SSHDError(f"sshd rejected {config_path}: {check.stderr.strip()}")
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [SSHD_BINARY, "-D", "-e", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # keeps terminal signals meant for the caller away from it
            )
        if _wait_for_banner(chosen, process, time.monotonic() + start_timeout):
            return OpenSSHServer(
                directory=directory,
                port=chosen,
                host_key_path=host_key,
                authorized_keys_path=Path(authorized_keys_path),
                config_path=config_path,
                log_path=log_path,
                user=user,
                process=process,
            )
        if process.poll() is None:
            process.kill()
        process.wait()
        last_log = log_path.read_text(errors="replace")[-2000:]
    raise SSHDError(f"sshd did not start on 127.0.0.1 (log {log_path}):\n{last_log}")


def ssh_binary() -> str | None:
    """Path of the OpenSSH client, if installed (tests that need it skip otherwise)."""
    return shutil.which("ssh")
