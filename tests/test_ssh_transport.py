"""The offload link's SSH transport, with real parts on loopback: OpenSSH sshd, ELMA's endpoint,
the real ssh client, and a line-echo service standing in for the QA server."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time

import paramiko
import pytest
from ssh_helpers import LineEchoService, LocalForward, make_keys, pin, ssh_options, talk_lines

from elma_utils.bench.link_overhead import format_round_trips, measure_round_trip
from elma_utils.edge.ssh_client import (
    AuthenticationRejected,
    Backoff,
    HostKeyError,
    OffloadUnavailable,
    SSHTunnelClient,
    line_frame,
)
from elma_utils.edge.ssh_keys import (
    fingerprint,
    generate_ed25519_key,
    known_hosts_line,
    load_authorized_keys,
    load_private_key,
    load_public_key,
)
from elma_utils.server.ssh_endpoint import SSHEndpoint
from elma_utils.server.sshd import free_loopback_port, make_chroot_parent, ssh_binary, start_sshd

needs_ssh = pytest.mark.skipif(ssh_binary() is None, reason="OpenSSH client not installed")
BUNDLE = b"edge model bundle v1\n" + bytes(range(256)) * 300  # ~77 kB with every byte value


# -- fixtures: one echo service, one sshd and one endpoint for the module ---------------------------
@pytest.fixture(scope="module")
def echo():
    service = LineEchoService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle_dir():
    # sshd chroots the devices' SFTP to this root: it must sit in root-owned 0755 directories
    # (not under /tmp, 1777), so it goes in one under /var/lib made here and removed afterwards.
    parent = make_chroot_parent(prefix="elma-test-bundles-")
    root = parent / "bundles"
    (root / "v1").mkdir(parents=True)
    root.chmod(0o755)
    (root / "v1" / "model.tflite").write_bytes(BUNDLE)
    yield root
    shutil.rmtree(parent)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, keys, echo, bundle_dir):
    server = start_sshd(
        tmp_path_factory.mktemp("sshd"),
        authorized_keys_path=keys.authorized_keys,
        permit_open=echo.address,
        sftp_root=bundle_dir,
    )
    pin(keys.known_hosts, server.port, server.host_key)
    yield server
    server.stop()
    assert not server.is_running()


@pytest.fixture(scope="module")
def endpoint_host_key(tmp_path_factory):
    path = tmp_path_factory.mktemp("endpoint") / "host_ed25519"
    generate_ed25519_key(path, comment="elma-endpoint")
    return path


@pytest.fixture(scope="module")
def endpoint(keys, echo, bundle_dir, endpoint_host_key):
    ep = SSHEndpoint(endpoint_host_key, keys.authorized_keys, echo.address, sftp_root=bundle_dir).start()
    pin(keys.known_hosts, ep.port, load_private_key(endpoint_host_key))
    yield ep
    ep.close()


def client_for(
    keys, port: int, echo, *, user: str = "root", key=None, known_hosts=None, **kw
) -> SSHTunnelClient:
    return SSHTunnelClient(
        "127.0.0.1",
        port,
        user,
        key or keys.client_key,
        known_hosts or keys.known_hosts,
        echo.address,
        **{"timeout": 10.0, "keepalive_s": 5.0, **kw},
    )


@pytest.fixture(params=["sshd", "endpoint"])
def server_port(request):
    """Run a test against both ways in: OpenSSH's sshd and ELMA's endpoint."""
    return request.getfixturevalue(request.param).port


# -- keys -------------------------------------------------------------------------------------------
def test_generated_keys_match_openssh_tools(tmp_path):
    key = generate_ed25519_key(tmp_path / "k", comment="t")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert load_public_key(tmp_path / "k.pub").asbytes() == key.asbytes()
    listed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[1] == fingerprint(key)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(tmp_path / "k")], capture_output=True, text=True)
    assert derived.stdout.split()[:2] == ["ssh-ed25519", key.get_base64()]
    assert known_hosts_line("127.0.0.1", 2222, key).startswith("[127.0.0.1]:2222 ssh-ed25519 ")
    assert known_hosts_line("127.0.0.1", 22, key).startswith("127.0.0.1 ssh-ed25519 ")
    with pytest.raises(FileExistsError):
        generate_ed25519_key(tmp_path / "k")


def test_authorized_keys_skip_options_and_other_types(tmp_path, keys):
    good = load_public_key(f"{keys.client_key}.pub")
    text = (
        "# comment\n"
        f'from="10.0.0.1" ssh-ed25519 {good.get_base64()} restricted\n'
        "ssh-rsa AAAAB3NzaC1yc2E= rsa\n"
        f"ssh-ed25519 {good.get_base64()} plain\n"
    )
    (tmp_path / "ak").write_text(text)
    assert [k.asbytes() for k in load_authorized_keys(tmp_path / "ak")] == [good.asbytes()]


def test_line_frame_and_backoff_bounds():
    assert line_frame(b"abc") == b"abc\n" == line_frame(b"abc\n")
    with pytest.raises(ValueError):
        line_frame(b"a\nb")
    backoff = Backoff(initial_s=0.1, factor=2.0, max_s=1.0, jitter=0.5)
    delays = [backoff.delay(n) for n in range(10) for _ in range(20)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert max(backoff.delay(9) for _ in range(50)) <= 1.0
    assert min(backoff.delay(9) for _ in range(50)) >= 0.5


# -- both servers: reach the service, keys, SFTP ----------------------------------------------------
@pytest.mark.network
def test_client_reaches_echo_through_one_persistent_connection(keys, echo, server_port):
    with client_for(keys, server_port, echo) as client:
        replies = [client.request_line(f'{{"id": {i}, "q": "héllo"}}'.encode()) for i in range(50)]
        assert replies == [f'{{"id": {i}, "q": "héllo"}}'.encode() for i in range(50)]
        assert client.stats.connects == 1 and client.stats.reconnects == 0
        assert client.stats.channels_opened == 1  # the same channel carried every request
        assert client.stats.requests == 50
        assert client.stats.bytes_sent == client.stats.bytes_received == sum(len(r) + 1 for r in replies)
        assert client.stats.wire_bytes_sent > client.stats.bytes_sent  # handshake + encryption overhead
        raw = client.open_channel()
        raw.sendall(b"raw bytes\n")
        assert raw.makefile("rb").readline() == b"raw bytes\n"
        raw.close()


@pytest.mark.network
def test_sftp_reads_bundle_and_refuses_writes(keys, echo, server_port, tmp_path):
    with client_for(keys, server_port, echo) as client:
        client.request_line(b"before sftp")
        sftp = client.sftp()
        try:
            assert "model.tflite" in sftp.listdir("v1")
            local = tmp_path / "model.tflite"
            sftp.get("v1/model.tflite", str(local))
            assert hashlib.sha256(local.read_bytes()).hexdigest() == hashlib.sha256(BUNDLE).hexdigest()
            assert sftp.stat("v1/model.tflite").st_size == len(BUNDLE)
            with pytest.raises(OSError):
                sftp.open("v1/new.bin", "wb").write(b"x")
            with pytest.raises(OSError):
                sftp.remove("v1/model.tflite")
        finally:
            sftp.close()
        assert client.request_line(b"after sftp") == b"after sftp"
        assert client.stats.connects == 1  # SFTP shared the connection


@pytest.mark.network
def test_endpoint_sftp_stays_inside_its_root(keys, echo, endpoint, bundle_dir):
    (bundle_dir.parent / "secret.txt").write_text("outside the root")
    with client_for(keys, endpoint.port, echo) as client, client.sftp() as sftp:
        assert sftp.normalize("../..") == "/"
        for path in ("../secret.txt", "/../secret.txt", "v1/../../secret.txt"):
            with pytest.raises(OSError):
                sftp.open(path, "rb").read()


@pytest.mark.network
def test_wrong_client_key_is_rejected(keys, echo, server_port):
    client = client_for(keys, server_port, echo, key=keys.stranger_key)
    t0 = time.monotonic()
    with pytest.raises(AuthenticationRejected) as err:
        client.request_line(b"hello")
    assert time.monotonic() - t0 < 8  # refused at once, not retried with backoff
    assert "rejected the client key" in str(err.value)
    assert fingerprint(load_private_key(keys.stranger_key)) in str(err.value)
    assert client.stats.connects == 0


@pytest.mark.network
def test_password_login_is_refused(server_port):
    transport = paramiko.Transport(("127.0.0.1", server_port))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as err:
            transport.auth_password("root", "root")
        assert err.value.allowed_types == ["publickey"]
    finally:
        transport.close()


@pytest.mark.network
def test_unknown_host_key_is_refused_with_pinning_advice(keys, echo, server_port, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    other = generate_ed25519_key(tmp_path / "other_host")
    pin(known_hosts, server_port + 1, other)  # a pin for another port does not count
    client = client_for(keys, server_port, echo, known_hosts=known_hosts)
    with pytest.raises(HostKeyError) as err:
        client.connect()
    message = str(err.value)
    command = f"ssh-keyscan -t ed25519 -p {server_port} 127.0.0.1 >> {known_hosts}"
    assert command in message
    assert "not pinned" in message and "SHA256:" in message
    # the advice works: run it, then the same client connects
    scanned = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=20)
    assert scanned.returncode == 0, scanned.stderr
    client.connect()
    assert client.server_fingerprint in message
    assert client.request_line(b"pinned") == b"pinned"
    client.close()


@pytest.mark.network
def test_missing_known_hosts_file_is_refused(keys, echo, server_port, tmp_path):
    client = client_for(keys, server_port, echo, known_hosts=tmp_path / "nope")
    with pytest.raises(HostKeyError, match="ssh-keyscan -t ed25519 -p"):
        client.connect()


@pytest.mark.network
def test_changed_host_key_is_refused(keys, echo, server_port, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    impostor = generate_ed25519_key(tmp_path / "impostor")
    pin(known_hosts, server_port, impostor)
    client = client_for(keys, server_port, echo, known_hosts=known_hosts)
    with pytest.raises(HostKeyError) as err:
        client.request_line(b"x")
    message = str(err.value)
    assert "CHANGED" in message and fingerprint(impostor) in message
    assert f"ssh-keygen -R '[127.0.0.1]:{server_port}' -f {known_hosts}" in message
    assert client.stats.requests == 0


@pytest.mark.network
def test_other_destinations_are_refused(keys, echo, server_port):
    other_service = LineEchoService()
    try:
        for target in (other_service.address, ("127.0.0.2", echo.address[1]), ("example.com", 80)):
            client = client_for(keys, server_port, echo)
            client.target = target
            with pytest.raises(OffloadUnavailable, match="refused a channel"):
                client.request_line(b"sneak")
            client.close()
        assert other_service.connections == 0
    finally:
        other_service.close()


@pytest.mark.network
def test_unreachable_server_raises_offload_unavailable_within_deadline(keys, echo):
    port = free_loopback_port()  # nothing listens there
    client = client_for(keys, port, echo, timeout=1.5, backoff=Backoff(initial_s=0.05, max_s=0.4))
    t0 = time.monotonic()
    with pytest.raises(OffloadUnavailable, match="unreachable after"):
        client.request_line(b"hello")
    assert time.monotonic() - t0 < 3.0
    assert client.stats.connect_failures >= 2


# -- a real OpenSSH client against ELMA's endpoint ---------------------------------------------------
@needs_ssh
@pytest.mark.network
def test_openssh_client_forwards_through_endpoint(keys, echo, endpoint):
    forward = LocalForward(keys, keys.known_hosts, endpoint.port, echo.address[1])
    try:
        forward.wait_ready()
        lines = [f"line {i} ✓".encode() for i in range(20)]
        assert talk_lines(("127.0.0.1", forward.local_port), lines) == lines
    finally:
        forward.close()


@needs_ssh
@pytest.mark.network
def test_openssh_stdio_forward_and_refused_destination(keys, echo, endpoint):
    base = ["ssh", "-p", str(endpoint.port), *ssh_options(keys, keys.known_hosts)]
    ok = subprocess.run(
        [*base, "-W", f"127.0.0.1:{echo.address[1]}", "127.0.0.1"],
        input=b"one\ntwo\n",
        capture_output=True,
        timeout=20,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"one\ntwo\n"
    refused = subprocess.run(
        [*base, "-W", f"127.0.0.1:{echo.address[1] + 1}", "127.0.0.1"],
        input=b"x\n",
        capture_output=True,
        timeout=20,
    )
    assert refused.returncode != 0 and refused.stdout == b""
    wrong_key = subprocess.run(
        ["ssh", "-p", str(endpoint.port), *ssh_options(keys, keys.known_hosts, keys.stranger_key)]
        + ["-W", f"127.0.0.1:{echo.address[1]}", "127.0.0.1"],
        input=b"x\n",
        capture_output=True,
        timeout=20,
    )
    assert wrong_key.returncode == 255 and b"Permission denied" in wrong_key.stderr


# -- dropped connections ----------------------------------------------------------------------------
@pytest.mark.network
def test_client_reconnects_after_sshd_drops_the_connection(keys, echo, sshd):
    with client_for(keys, sshd.port, echo) as client:
        assert client.request_line(b"first") == b"first"
        assert sshd.drop_connections() >= 1  # kill the sshd processes serving this connection
        assert client.request_line(b"second") == b"second"
        assert client.stats.reconnects == 1


@pytest.mark.network
def test_client_reconnects_after_endpoint_drop_and_restart(keys, echo, endpoint_host_key, bundle_dir):
    ep = SSHEndpoint(endpoint_host_key, keys.authorized_keys, echo.address).start()
    port = ep.port
    pin(keys.known_hosts, port, load_private_key(endpoint_host_key))
    with client_for(keys, port, echo, timeout=5.0) as client:
        assert client.request_line(b"first") == b"first"
        assert ep.drop_connections() == 1
        assert client.request_line(b"after drop") == b"after drop"
        assert client.stats.reconnects == 1
        ep.close()
        with pytest.raises(OffloadUnavailable):  # server down: the caller falls back
            client.request_line(b"while down", timeout=0.5)
        ep = SSHEndpoint(endpoint_host_key, keys.authorized_keys, echo.address, port=port).start()
        try:
            assert client.request_line(b"after restart") == b"after restart"
            assert client.stats.reconnects == 2
        finally:
            ep.close()


# -- concurrency ------------------------------------------------------------------------------------
def _hammer(make_client, n_threads: int, n_lines: int, shared: bool) -> dict[int, list[bytes]]:
    """Each thread sends n_lines distinct lines; returns the replies that did not match."""
    shared_client = make_client() if shared else None
    mismatches: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        client = shared_client or make_client()
        bad = []
        try:
            for i in range(n_lines):
                payload = f'{{"client": {tid}, "seq": {i}, "pad": "{"x" * (i % 97)}"}}'.encode()
                if client.request_line(payload) != payload:
                    bad.append(payload)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            if not shared:
                client.close()
        mismatches[tid] = bad

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    if shared_client is not None:
        shared_client.close()
    assert not errors, errors
    return mismatches


@pytest.mark.network
@pytest.mark.slow
def test_eight_clients_two_hundred_lines_each(keys, echo, server_port):
    mismatches = _hammer(lambda: client_for(keys, server_port, echo), 8, 200, shared=False)
    assert sorted(mismatches) == list(range(8))
    assert all(bad == [] for bad in mismatches.values())


@pytest.mark.network
def test_one_client_shared_by_eight_threads(keys, echo, endpoint):
    made = []

    def make():
        made.append(client_for(keys, endpoint.port, echo))
        return made[-1]

    mismatches = _hammer(make, 8, 50, shared=True)
    assert all(bad == [] for bad in mismatches.values()) and len(mismatches) == 8
    stats = made[0].stats
    assert stats.connects == 1 and stats.requests == 400
    assert 1 <= stats.channels_opened <= 8  # pooled channels, at most one per concurrent caller


# -- the overhead measurement -----------------------------------------------------------------------
@pytest.mark.network
def test_measure_round_trip_reports_all_modes(keys, echo, endpoint):
    results = measure_round_trip(
        lambda: client_for(keys, endpoint.port, echo),
        b'{"q": "x"}',
        lines=20,
        new_connection_lines=2,
        warmup=2,
    )
    print("\n" + format_round_trips(results))
    assert set(results) == {"ssh_persistent", "ssh_channel_per_line", "ssh_connection_per_line", "plain_tcp"}
    assert results["plain_tcp"].wire_bytes_per_line == 2 * len(b'{"q": "x"}\n')
    assert results["ssh_persistent"].wire_bytes_per_line > results["plain_tcp"].wire_bytes_per_line
    assert (
        results["ssh_connection_per_line"].wire_bytes_per_line
        > 10 * results["ssh_persistent"].wire_bytes_per_line
    )
    assert all(r.lines > 0 and r.p50_ms > 0 for r in results.values())
