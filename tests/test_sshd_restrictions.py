"""A device key on the OpenSSH route may do exactly two things: forward to the model service and
read the bundles directory over SFTP. Checked with the real ``ssh`` and ``sftp`` clients (and
paramiko) against a real sshd from ``start_sshd``: everything else must be refused."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from ssh_helpers import LineEchoService, LocalForward, make_keys, pin, ssh_options, talk_lines

from elma_utils.edge.ssh_client import OffloadUnavailable, SSHTunnelClient
from elma_utils.edge.ssh_keys import load_private_key, public_key_line
from elma_utils.server.sshd import (
    SSHD_BINARY,
    SSHDError,
    device_key_options,
    device_match_block,
    free_loopback_port,
    make_chroot_parent,
    start_sshd,
)

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(
        not (shutil.which("ssh") and shutil.which("sftp") and Path(SSHD_BINARY).exists()),
        reason="OpenSSH client, sftp or sshd not installed",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd can chroot the devices' SFTP only when run as root"),
]

DEVICE = "device-7"
BUNDLE = b"edge model bundle v1\n" + bytes(range(256)) * 300  # ~77 kB with every byte value
SECRET = b"outside the bundles directory\n"
NOT_SFTP = b"This service allows sftp connections only.\n"  # what sshd answers a forced internal-sftp


# -- fixtures: one echo service, one chroot, one restricted sshd for the module ---------------------
@pytest.fixture(scope="module")
def echo():
    service = LineEchoService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def chroot_parent():
    # sshd's ChrootDirectory needs every path component root-owned and not group/world-writable;
    # /tmp is 1777, so the bundles live in a root-owned 0755 directory under /var/lib, made here
    # and removed afterwards.
    parent = make_chroot_parent(prefix="elma-test-sftp-")
    yield parent
    shutil.rmtree(parent)


@pytest.fixture(scope="module")
def bundle_root(chroot_parent):
    root = chroot_parent / "bundles"
    (root / "v1").mkdir(parents=True)
    root.chmod(0o755)
    (root / "v1" / "model.tflite").write_bytes(BUNDLE)
    (root / "leak").symlink_to("/etc/hostname")  # resolves inside the chroot: nothing there
    (chroot_parent / "secret.txt").write_bytes(SECRET)  # next to the root, not below it
    return root


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, keys, echo, bundle_root):
    server = start_sshd(
        tmp_path_factory.mktemp("sshd"),
        authorized_keys_path=keys.authorized_keys,
        device_keys={DEVICE: load_private_key(keys.client_key)},
        permit_open=echo.address,
        sftp_root=bundle_root,
    )
    pin(keys.known_hosts, server.port, server.host_key)
    yield server
    server.stop()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` with its bytes (None for directories): to see that nothing changed."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() or p.is_symlink() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def ssh(keys, sshd, *args: str, stdin: bytes = b"", timeout: float = 20) -> subprocess.CompletedProcess:
    """The real ssh client as the device, against the module's sshd."""
    cmd = ["ssh", "-p", str(sshd.port), "-l", sshd.user, *ssh_options(keys, keys.known_hosts), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)


def sftp_batch(keys, sshd, *commands: str) -> subprocess.CompletedProcess:
    """The real sftp client running ``commands`` as a batch (it stops at the first failing one)."""
    cmd = ["sftp", "-b", "-", "-P", str(sshd.port), *ssh_options(keys, keys.known_hosts)]
    cmd += ["-o", f"User={sshd.user}", "127.0.0.1"]
    return subprocess.run(cmd, input="\n".join(commands).encode() + b"\n", capture_output=True, timeout=20)


# -- the key line and the config ---------------------------------------------------------------------
def test_device_key_line_and_match_block_carry_the_restrictions(keys, echo, sshd, bundle_root):
    port = echo.address[1]
    key = public_key_line(load_private_key(keys.client_key), DEVICE)
    assert keys.authorized_keys.read_text() == (
        f'restrict,port-forwarding,permitopen="127.0.0.1:{port}",command="internal-sftp -R -d /" {key}\n'
    )
    assert device_key_options(("::1", 8765), None) == (
        'restrict,port-forwarding,permitopen="[::1]:8765",command="internal-sftp -R -p none"'
    )
    block = device_match_block(sshd.user, echo.address, bundle_root)
    assert block in sshd.config_path.read_text()
    for line in (
        f"ChrootDirectory {bundle_root}",
        "ForceCommand internal-sftp -R -d /",
        "AllowTcpForwarding local",
        f"PermitOpen 127.0.0.1:{port}",
        "AllowStreamLocalForwarding no",
        "PermitTTY no",
    ):
        assert f"\n    {line}\n" in block
    with pytest.raises(ValueError, match="IP address"):
        device_key_options(("localhost", 8765), None)  # a chrooted sshd cannot resolve names
    with pytest.raises(ValueError, match="IP address"):
        device_key_options(('127.0.0.1",command="sh', 1), None)
    with pytest.raises(ValueError, match="device id"):
        start_sshd(
            keys.directory / "unused",
            authorized_keys_path=keys.directory / "unused_keys",
            device_keys={"dev 1\nssh-ed25519": load_private_key(keys.client_key)},
            permit_open=echo.address,
        )


# -- no command, no shell ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["127.0.0.1", "id"],
        ["127.0.0.1", "touch {marker}; id"],
        ["-T", "127.0.0.1"],  # a shell without a tty, commands on stdin
        ["-T", "127.0.0.1", "sh", "-c", "id"],
    ],
    ids=["id", "touch", "shell", "sh-c"],
)
def test_commands_and_shells_are_refused(keys, sshd, tmp_path, args):
    marker = tmp_path / "ran"
    result = ssh(keys, sshd, *[a.format(marker=marker) for a in args], stdin=f"touch {marker}\nid\n".encode())
    assert (result.returncode, result.stdout) == (1, NOT_SFTP)
    assert b"uid=" not in result.stderr
    assert not marker.exists()


def test_other_subsystems_are_refused(keys, sshd):
    result = ssh(keys, sshd, "-s", "127.0.0.1", "shell")
    assert (result.returncode, result.stdout) == (255, b"")
    assert b"subsystem request failed" in result.stderr


def test_a_tty_is_refused(keys, sshd, tmp_path):
    marker = tmp_path / "ran"
    result = ssh(keys, sshd, "-tt", "127.0.0.1", stdin=f"touch {marker}\nid\nexit\n".encode())
    assert (result.returncode, result.stdout) == (255, b"")  # ssh -tt gives up without its pty
    assert b"PTY allocation request failed" in result.stderr
    assert not marker.exists()


# -- SFTP: the bundles, read-only, and nothing else --------------------------------------------------
def test_sftp_downloads_a_bundle_file(keys, sshd, tmp_path):
    got = tmp_path / "model.tflite"
    result = sftp_batch(
        keys, sshd, "pwd", "ls /", f"get /v1/model.tflite {got}", f"get v1/model.tflite {got}.2"
    )
    assert result.returncode == 0, result.stderr
    assert b"Remote working directory: /\n" in result.stdout
    assert got.read_bytes() == BUNDLE and (tmp_path / "model.tflite.2").read_bytes() == BUNDLE


@pytest.mark.parametrize(
    "remote",
    [
        "/etc/hostname",
        "../../etc/passwd",
        "/../etc/hostname",
        "v1/../../secret.txt",
        "/../secret.txt",
        "leak",
    ],
)
def test_sftp_reads_nothing_outside_the_bundles(keys, sshd, tmp_path, remote):
    got = tmp_path / "got"
    result = sftp_batch(keys, sshd, f"get {remote} {got}")
    assert result.returncode == 1
    assert re.search(rb"not found|No such file or directory", result.stderr), result.stderr
    assert not got.exists()


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("put {local} v1/new.bin", b"Permission denied"),
        ("put {local} /new.bin", b"Permission denied"),
        ("mkdir v2", b"Permission denied"),
        ("rm v1/model.tflite", b"Permission denied"),
        ("rename v1/model.tflite v1/old.tflite", b"Permission denied"),
        ("rmdir v1", b"Permission denied"),
        ("chmod 777 v1/model.tflite", b"Permission denied"),
        ("symlink /etc/passwd v1/pw", b"Permission denied"),
        ("ln v1/model.tflite v1/hard", b"does not support hardlink"),  # read-only: not even offered
    ],
)
def test_sftp_writes_are_refused(keys, sshd, chroot_parent, tmp_path, command, error):
    local = tmp_path / "upload.bin"
    local.write_bytes(b"not a bundle")
    before = tree(chroot_parent)
    result = sftp_batch(keys, sshd, command.format(local=local))
    assert result.returncode == 1
    assert error in result.stderr
    assert tree(chroot_parent) == before
    assert (chroot_parent / "bundles" / "v1" / "model.tflite").stat().st_mode & 0o777 == 0o644


# -- forwarding: to the service only ------------------------------------------------------------------
def test_forward_to_the_service_works(keys, echo, sshd):
    forward = LocalForward(keys, keys.known_hosts, sshd.port, echo.address[1], user=sshd.user)
    try:
        forward.wait_ready()
        lines = [f"line {i} ✓".encode() for i in range(20)]
        assert talk_lines(("127.0.0.1", forward.local_port), lines) == lines
    finally:
        forward.close()
    stdio = ssh(keys, sshd, "-W", f"127.0.0.1:{echo.address[1]}", "127.0.0.1", stdin=b"one\ntwo\n")
    assert (stdio.returncode, stdio.stdout) == (0, b"one\ntwo\n")


def test_paramiko_client_forwards_and_reads_the_bundle(keys, echo, sshd, tmp_path):
    client = SSHTunnelClient(
        "127.0.0.1", sshd.port, sshd.user, keys.client_key, keys.known_hosts, echo.address, timeout=10.0
    )
    with client, client.sftp() as sftp:
        assert client.request_line(b"hello") == b"hello"
        assert sftp.normalize("../..") == "/"
        assert sorted(sftp.listdir("/")) == ["leak", "v1"]
        sftp.get("v1/model.tflite", str(tmp_path / "m"))
        assert hashlib.sha256((tmp_path / "m").read_bytes()).digest() == hashlib.sha256(BUNDLE).digest()
        for path in ("/etc/hostname", "../secret.txt", "/../secret.txt", "leak"):
            with pytest.raises(FileNotFoundError):
                sftp.open(path, "rb").read()
        with pytest.raises(PermissionError):
            sftp.open("v1/new.bin", "wb").write(b"x")
        with pytest.raises(PermissionError):
            sftp.remove("v1/model.tflite")
        assert client.request_line(b"after sftp") == b"after sftp"
    other = SSHTunnelClient(
        "127.0.0.1", sshd.port, sshd.user, keys.client_key, keys.known_hosts, ("127.0.0.1", 1), timeout=10.0
    )
    with other, pytest.raises(OffloadUnavailable, match="refused a channel"):
        other.request_line(b"elsewhere", retry=False)


def test_other_destinations_are_refused(keys, echo, sshd):
    other = LineEchoService()
    try:
        for target in (f"127.0.0.1:{other.address[1]}", f"localhost:{echo.address[1]}"):
            result = ssh(keys, sshd, "-W", target, "127.0.0.1", stdin=b"sneak\n")
            assert result.returncode == 255 and result.stdout == b""
            assert b"stdio forwarding failed" in result.stderr
        assert other.connections == 0
    finally:
        other.close()


class UnixListener:
    """A Unix-socket service that counts connections: the kind of socket a device must not reach."""

    def __init__(self, path: Path):
        self.path, self.connections = path, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.sendall(b"secret\n")
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


class UnixForward(LocalForward):
    """``ssh -N -L local:/path``: the real client forwarding a local port to a Unix socket."""

    def __init__(self, keys, sshd, path: Path):
        self.local_port = free_loopback_port()
        cmd = ["ssh", "-N", "-L", f"{self.local_port}:{path}", "-p", str(sshd.port), "-l", sshd.user,
               *ssh_options(keys, keys.known_hosts), "127.0.0.1"]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_unix_socket_forward_is_refused(keys, sshd):
    directory = Path(tempfile.mkdtemp(prefix="elma-sock-"))  # short: socket paths are ~100 bytes at most
    listener = UnixListener(directory / "service.sock")
    forward = UnixForward(keys, sshd, listener.path)
    try:
        forward.wait_ready()
        with socket.create_connection(("127.0.0.1", forward.local_port), timeout=10) as conn:
            assert conn.recv(100) == b""  # sshd refused the channel: ssh closes the connection
        assert listener.connections == 0
        assert "refused streamlocal port forward: originator 127.0.0.1" in sshd.log()
    finally:
        forward.close()
        listener.close()
        shutil.rmtree(directory)


def test_remote_forward_and_tunnel_are_refused(keys, echo, sshd):
    remote = ssh(keys, sshd, "-N", "-R", f"0:127.0.0.1:{echo.address[1]}", "127.0.0.1")
    assert remote.returncode == 255
    assert b"remote port forwarding failed" in remote.stderr
    tunnel = ssh(keys, sshd, "-N", "-w", "any", "127.0.0.1")
    assert tunnel.returncode == 255
    assert b"Tunnel forwarding failed" in tunnel.stderr


# -- the chroot check -------------------------------------------------------------------------------
def test_start_sshd_refuses_a_chroot_it_cannot_use(keys, echo, chroot_parent, tmp_path):
    under_tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        with pytest.raises(SSHDError) as err:
            start_sshd(tmp_path / "a", authorized_keys_path=keys.authorized_keys, sftp_root=under_tmp)
        message = str(err.value)
        assert "/tmp is owned by uid 0 with mode drwxrwxrwt (0o1777)" in message
        assert "root-owned 0755 directory" in message
        assert not (tmp_path / "a" / "sshd_config").exists()  # refused before anything was started
    finally:
        under_tmp.rmdir()
    shared = chroot_parent / "group-writable"
    shared.mkdir()
    try:
        shared.chmod(0o775)
        with pytest.raises(SSHDError, match=f"{shared} is owned by uid 0 with mode drwxrwxr-x"):
            start_sshd(tmp_path / "b", authorized_keys_path=keys.authorized_keys, sftp_root=shared)
        shared.chmod(0o755)
        os.chown(shared, 65534, 65534)
        with pytest.raises(SSHDError, match=f"{shared} is owned by uid 65534"):
            start_sshd(tmp_path / "c", authorized_keys_path=keys.authorized_keys, sftp_root=shared)
    finally:
        shared.rmdir()


# -- the deployment's sshd way in writes the restricted key too ----------------------------------------
def test_loopback_deployment_gives_its_device_key_no_shell(tmp_path, minilm_tokenizer):
    from qa_fixtures import save_tiny_artifact, write_tiny_bundle

    from elma_utils.bench.loopback import LoopbackDeployment
    from elma_utils.edge.protocol import Ping, encode

    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    bundle = write_tiny_bundle(tmp_path / "bundle", minilm_tokenizer, -1.0)
    with LoopbackDeployment(model, bundle, tmp_path / "work", way_in="sshd", device_id="dev-9") as dep:
        assert b"p1" in dep.tunnel.request_line(encode(Ping("p1")).rstrip(b"\n"))
        line = dep.authorized_keys.read_text()
        assert line.startswith(f'restrict,port-forwarding,permitopen="127.0.0.1:{dep.server.port}",')
        assert line.rstrip().endswith(" dev-9") and line.count("\n") == 1
        opts = ["-F", "/dev/null", "-i", str(dep.client_key), "-o", "IdentitiesOnly=yes", "-o",
                f"UserKnownHostsFile={dep.known_hosts}", "-o", "BatchMode=yes", "-l", getpass.getuser()]  # fmt: skip
        result = subprocess.run(
            ["ssh", "-p", str(dep.ssh_port), *opts, "127.0.0.1", "id"], capture_output=True, timeout=20
        )
    assert result.returncode == 255 and b"uid=" not in result.stdout  # no SFTP here: no session at all
