"""Run a real OpenSSH sshd on 127.0.0.1 with its own files in one directory.

Tests, notebooks and the demo use it to exercise the offload link against the same server a
deployment would use, without touching the system's sshd: its own config, host key,
authorized_keys, pid and log file, in the foreground (``sshd -D -e``), on a loopback port.
A device key may do exactly two things there: forward to the one model-service address
(``direct-tcpip``, ``ssh -L``/``-W``) and read the bundles directory read-only over SFTP. The
config enforces it (:func:`device_match_block`: ``ForceCommand internal-sftp -R``, a
``ChrootDirectory`` on the bundles, ``PermitOpen``, no remote/Unix-socket/agent/X11/tunnel/tty),
and so do the device's ``authorized_keys`` options (:func:`device_key_options`), each on its own.
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from elma_utils.edge.protocol import is_identifier
from elma_utils.edge.ssh_keys import generate_ed25519_key, load_private_key, public_key_line

SSHD_BINARY = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # Debian's compiled-in privilege separation directory (root only)


class SSHDError(RuntimeError):
    """sshd could not be configured or started; the message carries its log."""


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The SFTP a device gets: read-only, starting at the chroot's top (the bundles directory).
SFTP_COMMAND = "internal-sftp -R -d /"
# Without a bundles directory: an SFTP server that permits no request at all ("none" names no
# request type, see ``sftp-server -Q requests``), so the session can neither run nor read anything.
NO_SFTP_COMMAND = "internal-sftp -R -p none"
_CONFIG_PATH = re.compile(r"/[A-Za-z0-9._/@+-]*")  # no spaces, quotes or %-tokens in sshd_config


def _open_spec(permit_open: tuple[str, int]) -> str:
    """``host:port`` for PermitOpen/permitopen, IPv6 in brackets.

    The host must be an IP address: sshd matches the literal string the client asks for, and a
    non-root device's forwards are made from inside its chroot, where no name can be resolved.
    """
    host, port = permit_open
    try:
        address = ipaddress.ip_address(host[1:-1] if host[:1] + host[-1:] == "[]" else host)
    except ValueError:
        raise ValueError(f"permit_open host must be an IP address (not a name): {host!r}") from None
    if not 0 < int(port) < 65536:
        raise ValueError(f"permit_open port out of range: {port!r}")
    return f"[{address}]:{int(port)}" if address.version == 6 else f"{address}:{int(port)}"


def device_key_options(permit_open: tuple[str, int], sftp_root: str | os.PathLike | None) -> str:
    """The ``authorized_keys`` options for a device key on the OpenSSH route.

    ``restrict`` turns off every forwarding, the pty and ~/.ssh/rc; ``port-forwarding`` with
    ``permitopen`` gives back local forwarding to the model service only; the forced command makes
    every shell, exec or subsystem request a read-only SFTP server (none that serves anything when
    ``sftp_root`` is None). The key line alone cannot confine SFTP to the bundles directory: that
    is sshd_config's ``ChrootDirectory`` (:func:`device_match_block`), inside which it is ``/``.
    """
    command = SFTP_COMMAND if sftp_root is not None else NO_SFTP_COMMAND
    return f'restrict,port-forwarding,permitopen="{_open_spec(permit_open)}",command="{command}"'


def device_authorized_key_line(
    key: paramiko.PKey, device_id: str, permit_open: tuple[str, int], sftp_root: str | os.PathLike | None
) -> str:
    """``OPTIONS ssh-ed25519 AAAA… DEVICE_ID``: one device's restricted ``authorized_keys`` line."""
    if not is_identifier(device_id):  # the comment is the device id: no spaces, no new lines
        raise ValueError(f"device id {device_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    return f"{device_key_options(permit_open, sftp_root)} {public_key_line(key, device_id)}"


def write_device_authorized_keys(
    path: str | os.PathLike,
    devices: Mapping[str, paramiko.PKey],
    permit_open: tuple[str, int],
    sftp_root: str | os.PathLike | None,
) -> Path:
    """Write an ``authorized_keys`` (0600) holding exactly ``devices`` (id → key), each restricted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [device_authorized_key_line(k, d, permit_open, sftp_root) for d, k in devices.items()]
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return path


def chroot_problem(path: str | os.PathLike) -> str | None:
    """Why sshd would refuse ``path`` as a ChrootDirectory (None if it would accept it).

    sshd checks, at each login, that every component from ``/`` down is a root-owned directory
    not writable by group or others; checking first turns a login that dies later into one error.
    """
    path = Path(path).resolve()
    for component in [*reversed(path.parents), path]:
        try:
            st = component.stat()
        except OSError as exc:
            return f"{component} cannot be read ({exc.strerror})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{component} is not a directory"
        if st.st_uid != 0 or st.st_mode & 0o022:
            mode = stat.filemode(st.st_mode)
            return f"{component} is owned by uid {st.st_uid} with mode {mode} ({oct(st.st_mode & 0o7777)})"
    return None


def check_sftp_chroot(sftp_root: str | os.PathLike) -> Path:
    """``sftp_root`` resolved, or ``SSHDError`` naming the component sshd would refuse to chroot to."""
    root = Path(sftp_root).resolve()
    problem = chroot_problem(root)
    if problem is not None:
        raise SSHDError(
            f"sftp_root {root} cannot be the devices' SFTP chroot: {problem}. sshd requires every "
            "directory from / down to it to be owned by root and not writable by group or others "
            "(so nothing under /tmp, mode 1777, qualifies): put the bundles in a root-owned 0755 "
            "directory such as /srv/elma/bundles (chown root:root; chmod 755 each component)."
        )
    if os.geteuid() != 0:
        raise SSHDError(
            f"sftp_root {root} needs sshd to chroot the devices' SFTP, which only an sshd run as root can do"
        )
    return root


def make_chroot_parent(parent: str | os.PathLike = "/var/lib", prefix: str = "elma-sftp-") -> Path:
    """A new, empty root-owned 0755 directory under ``parent`` (which must itself qualify), in which
    a bundles directory can serve as the SFTP chroot; the caller removes it when done."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    problem = chroot_problem(path)
    if problem is not None:
        shutil.rmtree(path)
        raise SSHDError(f"{path} cannot hold an SFTP chroot: {problem}")
    return path


def device_match_block(
    user: str, permit_open: tuple[str, int] | None, sftp_root: str | os.PathLike | None
) -> str:
    """The sshd_config ``Match User`` block that confines ``user`` to a device's two abilities.

    The same block belongs in an administrator's own sshd (docs/SECURITY.md). For a non-root user
    sshd chroots the whole connection, forwards included: TCP forwards to an IP address still
    work (nothing to look up), a Unix-socket path would resolve inside the chroot.
    """
    lines = [
        f"Match User {user}",
        f"ForceCommand {SFTP_COMMAND if sftp_root is not None else NO_SFTP_COMMAND}",
        *([f"ChrootDirectory {Path(sftp_root)}"] if sftp_root is not None else ["MaxSessions 0"]),
        f"AllowTcpForwarding {'local' if permit_open else 'no'}",
        f"PermitOpen {_open_spec(permit_open) if permit_open else 'none'}",
        "PermitListen none",
        "AllowStreamLocalForwarding no",  # ssh -L port:/run/x.sock: refused before any path check
        "GatewayPorts no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "PermitTTY no",
        "PermitUserRC no",
    ]
    return "\n".join(lines[:1] + ["    " + line for line in lines[1:]]) + "\n"


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
    """The sshd_config: key-only logins for ``user`` alone, who gets only a device's two abilities."""
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
        "PermitUserEnvironment no",
        "PrintMotd no",
        "ClientAliveInterval 15",
        "ClientAliveCountMax 3",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "LogLevel VERBOSE",
    ]
    if sftp_root is not None:
        lines.append(f"Subsystem sftp {SFTP_COMMAND}")  # Subsystem may not appear in a Match block
    return "\n".join(lines) + "\n" + device_match_block(user, permit_open, sftp_root)


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
        try:
            tasks = list(Path(f"/proc/{parent}/task").glob("*/children"))
        except FileNotFoundError:  # it exited while we looked: no children left to stop
            continue
        for task in tasks:
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
    device_keys: Mapping[str, paramiko.PKey] | None = None,
    start_timeout: float = 10.0,
) -> OpenSSHServer:
    """Start sshd on 127.0.0.1:``port`` (0 = a free port) with its files in ``directory``.

    A host key is made in ``directory`` unless ``host_key_path`` is given (an existing key
    keeps the pinned fingerprint across restarts). Only ``user`` (default: the current user) may
    log in, with a key from ``authorized_keys_path`` (lines may carry :func:`device_key_options`),
    and only as a device (:func:`device_match_block`): forwarding to ``permit_open`` (None: no
    forwarding) and read-only SFTP chrooted to ``sftp_root`` (None: no SFTP), which must pass
    :func:`check_sftp_chroot`. ``device_keys`` (device id → key) rewrites ``authorized_keys_path``
    with exactly those keys, each restricted.
    """
    if not Path(SSHD_BINARY).exists():
        raise SSHDError(f"{SSHD_BINARY} not found: install openssh-server")
    chroot = check_sftp_chroot(sftp_root) if sftp_root is not None else None
    if chroot is not None and not _CONFIG_PATH.fullmatch(str(chroot)):
        raise SSHDError(f"sftp_root {chroot}: use letters, digits and . _ / @ + - only in its path")
    if device_keys is not None:
        if permit_open is None:
            raise SSHDError("device_keys need permit_open: a device key exists to reach the model service")
        write_device_authorized_keys(authorized_keys_path, device_keys, permit_open, chroot)
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
                sftp_root=chroot,
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
