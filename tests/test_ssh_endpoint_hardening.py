"""ELMA's SSH endpoint under attack and misuse, with real parts on loopback: trickling floods from
other source addresses (127.0.0.x), revoked keys, weak algorithms offered by the real OpenSSH
client, broken handshakes, and a Unix-socket service."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import socket
import socketserver
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ssh_helpers import KeySet, LineEchoService, make_keys, pin, ssh_options

from elma_utils.edge.ssh_client import AuthenticationRejected, OffloadUnavailable, SSHTunnelClient
from elma_utils.edge.ssh_keys import (
    fingerprint,
    generate_ed25519_key,
    load_private_key,
    load_public_key,
    write_authorized_keys,
)
from elma_utils.server.ssh_endpoint import PARAMIKO_LOG_CHANNEL, SSHEndpoint
from elma_utils.server.sshd import ssh_binary

needs_ssh = pytest.mark.skipif(ssh_binary() is None, reason="OpenSSH client not installed")
pytestmark = pytest.mark.network


# -- helpers ----------------------------------------------------------------------------------------
@dataclass
class Rig:
    keys: KeySet
    host_key: Path


@pytest.fixture
def rig(tmp_path) -> Rig:
    keys = make_keys(tmp_path / "keys")
    host_key = tmp_path / "host_ed25519"
    generate_ed25519_key(host_key, comment="endpoint")
    return Rig(keys, host_key)


@pytest.fixture
def echo():
    service = LineEchoService()
    yield service
    service.close()


def started(rig: Rig, target, **kw) -> SSHEndpoint:
    """An endpoint on a free port whose host key is pinned in the rig's known_hosts."""
    ep = SSHEndpoint(rig.host_key, rig.keys.authorized_keys, target, **kw).start()
    pin(rig.keys.known_hosts, ep.port, load_private_key(rig.host_key))
    return ep


def device(
    rig: Rig, ep: SSHEndpoint, target: tuple[str, int], key: Path | None = None, **kw
) -> SSHTunnelClient:
    return SSHTunnelClient(
        "127.0.0.1",
        ep.port,
        "elma",
        key or rig.keys.client_key,
        rig.keys.known_hosts,
        target,
        **{"timeout": 10.0, "keepalive_s": 5.0, **kw},
    )


def wait_for(condition, timeout: float, step: float = 0.05) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return time.monotonic() - t0
        time.sleep(step)
    return None


@dataclass
class _Slot:
    source: str
    sock: socket.socket | None = None
    opened: float = 0.0
    next_byte: float = 0.0
    got_bytes: bool = False
    reopen_at: float = 0.0


@dataclass
class TrickleFlood:
    """Sockets that never finish the SSH banner: each sends one byte every 1-2 s (which restarts
    paramiko's banner timeout), and one that gets closed reconnects 0.5 s later, as an attacker
    holding slots would. Closed sockets are sorted: ``refused`` (closed before the server said
    anything: turned away at accept), ``cut`` (lived about ``deadline`` s: the login deadline),
    ``other`` (cut earlier, e.g. evicted)."""

    target: tuple[str, int]
    sources: list[str]
    per_source: int
    deadline: float
    counts: dict[str, int] = field(
        default_factory=lambda: {"connects": 0, "refused": 0, "cut": 0, "other": 0}
    )
    cut_lifetimes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._slots = [_Slot(src) for src in self.sources for _ in range(self.per_source)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TrickleFlood:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for slot in self._slots:
            if slot.sock is not None:
                slot.sock.close()

    def _open(self, slot: _Slot, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((slot.source, 0))
        sock.setblocking(False)
        sock.connect_ex(self.target)
        slot.sock, slot.opened, slot.got_bytes = sock, now, False
        slot.next_byte = now + random.uniform(0.2, 1.0)
        self.counts["connects"] += 1

    def _closed(self, slot: _Slot, now: float) -> None:
        life = now - slot.opened
        if not slot.got_bytes:
            self.counts["refused"] += 1
        elif life >= self.deadline:  # the client saw it open at least as long as the server did
            self.counts["cut"] += 1
            self.cut_lifetimes.append(life)
        else:
            self.counts["other"] += 1
        slot.sock.close()
        slot.sock, slot.reopen_at = None, now + 0.5

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self._slots:
                if slot.sock is None and now >= slot.reopen_at:
                    self._open(slot, now)
            live = [s for s in self._slots if s.sock is not None]
            readable, _, _ = select.select([s.sock for s in live], [], [], 0.05)
            now = time.monotonic()
            for slot in live:
                if slot.sock in readable:
                    try:
                        data = slot.sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._closed(slot, now)
                        continue
                    slot.got_bytes = True
                if now >= slot.next_byte:
                    slot.next_byte = now + random.uniform(1.0, 2.0)
                    try:
                        slot.sock.send(b"x")  # never a newline: the banner line never ends
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._closed(slot, now)


@dataclass
class FloodResult:
    latencies: list[float]
    failures: list[str]
    max_unauthenticated: int


def logins_during_flood(rig: Rig, ep: SSHEndpoint, echo, flood: TrickleFlood, seconds: float) -> FloodResult:
    """While ``flood`` runs, a device that was already connected keeps asking, and a fresh device
    logs in and asks every 0.4 s; returns the fresh logins' latencies and failures."""
    persistent = device(rig, ep, echo.address)
    assert persistent.request_line(b"before the flood") == b"before the flood"
    flood.start()
    time.sleep(1.0)  # let the flood take its slots first
    latencies, failures, max_unauth = [], [], 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            max_unauth = max(max_unauth, ep.unauthenticated_count())
            fresh = device(rig, ep, echo.address)
            t0 = time.monotonic()
            try:
                reply = fresh.request_line(b"during the flood")
                assert reply == b"during the flood"
                latencies.append(time.monotonic() - t0)
            except OffloadUnavailable as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                fresh.close()
            assert persistent.request_line(b"still here") == b"still here"
            time.sleep(0.4)
    finally:
        flood.stop()
        persistent.close()
    return FloodResult(latencies, failures, max_unauth)


def report(name: str, ep: SSHEndpoint, flood: TrickleFlood, result: FloodResult) -> None:
    lat = sorted(result.latencies)
    print(
        f"\n{name}: {len(lat)} logins succeeded during the flood, {len(result.failures)} failed; "
        + (
            f"login+answer latency median {statistics.median(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms; "
            if lat
            else ""
        )
        + f"flood sockets: {flood.counts} (cut by the deadline after "
        + (f"{min(flood.cut_lifetimes):.2f}-{max(flood.cut_lifetimes):.2f} s" if flood.cut_lifetimes else "-")
        + f"); endpoint counters {dict(ep.counters)}; max unauthenticated {result.max_unauthenticated}"
    )


# -- 1. trickling floods cannot lock devices out ------------------------------------------------------
@pytest.mark.slow
def test_trickle_flood_from_one_address_does_not_lock_out_devices(rig, echo):
    """64+ slow unauthenticated sockets used to hold every slot for as long as they trickled."""
    ep = started(rig, echo.address, auth_timeout=3.0)  # default limits: 64 in all, 32 / 8 per address pending
    flood = TrickleFlood(ep.address, ["127.0.0.2"], per_source=80, deadline=ep.auth_timeout)
    try:
        result = logins_during_flood(rig, ep, echo, flood, seconds=8.0)
        report("one-address trickle flood", ep, flood, result)
    finally:
        ep.close()
    assert result.failures == []
    assert len(result.latencies) >= 8 and max(result.latencies) < 3.0
    assert flood.counts["cut"] >= ep.max_unauthenticated_per_source  # every held slot was taken back
    assert max(flood.cut_lifetimes) < ep.auth_timeout + 1.0  # trickling does not extend the deadline
    assert ep.counters["refused_per_source"] > 0 and flood.counts["refused"] > 0
    assert result.max_unauthenticated <= ep.max_unauthenticated_per_source + 1  # + the device logging in


@pytest.mark.slow
def test_trickle_flood_from_many_addresses_leaves_room_for_devices(rig, echo):
    """A flood from ten addresses fills the unauthenticated pool; a device still gets in by eviction."""
    ep = started(rig, echo.address, auth_timeout=3.0)
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    flood = TrickleFlood(ep.address, sources, per_source=8, deadline=ep.auth_timeout)
    try:
        result = logins_during_flood(rig, ep, echo, flood, seconds=6.0)
        report("ten-address trickle flood", ep, flood, result)
    finally:
        ep.close()
    assert result.failures == []
    assert len(result.latencies) >= 6 and max(result.latencies) < 3.0
    assert ep.counters["refused_unauthenticated"] > 0 and ep.counters["evicted"] > 0
    assert result.max_unauthenticated <= ep.max_unauthenticated == 32
    assert flood.counts["cut"] > 0 and max(flood.cut_lifetimes) < ep.auth_timeout + 1.0


# -- 2. revoked keys lose their live connections --------------------------------------------------------
def two_devices(rig: Rig, tmp_path: Path) -> Path:
    """A second authorised device key next to the rig's; returns its private key path."""
    other = tmp_path / "other_ed25519"
    generate_ed25519_key(other, comment="other")
    write_authorized_keys(
        rig.keys.authorized_keys,
        [load_public_key(f"{rig.keys.client_key}.pub"), load_public_key(f"{other}.pub")],
    )
    return other


def test_revoked_key_loses_its_live_connection_within_seconds(rig, echo, tmp_path):
    """The client keeps one connection and pooled channels, so a removed key kept working forever."""
    other = two_devices(rig, tmp_path)
    ep = started(rig, echo.address)
    revoked, kept = device(rig, ep, echo.address), device(rig, ep, echo.address, key=other)
    try:
        assert revoked.request_line(b"a1") == b"a1" and kept.request_line(b"b1") == b"b1"
        raw = revoked.open_channel()
        raw.sendall(b"raw\n")
        assert raw.makefile("rb").readline() == b"raw\n"
        time.sleep(1.0)  # the watchdog has read the file and knows both keys
        write_authorized_keys(rig.keys.authorized_keys, [load_public_key(f"{other}.pub")])  # in place
        delay = wait_for(lambda: not revoked.is_connected(), timeout=10.0)
        assert delay is not None, "the revoked key's connection was still open 10 s later"
        print(f"\nrevoked key's connection closed {delay:.2f} s after authorized_keys changed")
        assert delay <= 5.0
        raw.settimeout(2.0)
        assert raw.recv(10) == b"" and raw.closed  # its open channel went with it
        with pytest.raises(AuthenticationRejected):
            revoked.request_line(b"a2")  # and it cannot log in again
        assert kept.request_line(b"b2") == b"b2"
        assert kept.stats.connects == 1  # the other device was not disturbed
        assert ep.counters["revoked"] == 1
    finally:
        revoked.close()
        kept.close()
        ep.close()


def test_revoked_key_cannot_open_channels_on_its_live_connection(rig, echo, tmp_path):
    """Channel opens check authorisation again, even before the watchdog cuts the connection."""
    other = two_devices(rig, tmp_path)
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "model.bin").write_bytes(b"weights")
    ep = started(rig, echo.address, sftp_root=bundles, key_recheck_s=600.0)  # the watchdog looks rarely
    revoked, kept = device(rig, ep, echo.address), device(rig, ep, echo.address, key=other)
    try:
        assert revoked.request_line(b"a1") == b"a1" and kept.request_line(b"b1") == b"b1"
        with revoked.sftp() as sftp:
            assert sftp.listdir("/") == ["model.bin"]
        time.sleep(0.5)
        write_authorized_keys(rig.keys.authorized_keys, [load_public_key(f"{other}.pub")])
        with pytest.raises(OffloadUnavailable, match="refused a channel"):
            revoked.open_channel()
        with pytest.raises(OffloadUnavailable, match="offers no SFTP"):
            revoked.sftp()
        kept.open_channel().close()
        assert kept.request_line(b"b2") == b"b2"
        with kept.sftp() as sftp:
            assert sftp.listdir("/") == ["model.bin"]
    finally:
        revoked.close()
        kept.close()
        ep.close()


# -- 3. weak algorithms are refused ----------------------------------------------------------------------
@needs_ssh
def test_openssh_client_cannot_negotiate_weak_algorithms(rig, echo):
    """CBC ciphers and MD5 / truncated MACs were still accepted from a client that asked for them."""
    ep = started(rig, echo.address)
    # options are first-wins: LogLevel=INFO makes ssh print its "Unable to negotiate" line
    base = ["ssh", "-o", "LogLevel=INFO", "-p", str(ep.port), *ssh_options(rig.keys, rig.keys.known_hosts)]
    forward = ["-W", f"127.0.0.1:{echo.address[1]}", "127.0.0.1"]
    try:
        ok = subprocess.run([*base, *forward], input=b"default\n", capture_output=True, timeout=20)
        assert ok.returncode == 0 and ok.stdout == b"default\n", ok.stderr
        for cipher in ("aes128-cbc", "aes192-cbc", "aes256-cbc", "3des-cbc"):
            r = subprocess.run([*base, "-c", cipher, *forward], input=b"x\n", capture_output=True, timeout=20)
            assert r.returncode == 255 and r.stdout == b"", (cipher, r.stderr)
            assert (
                b"no matching cipher found" in r.stderr and b"cbc" not in r.stderr.split(b"Their offer:")[1]
            )
        for mac in ("hmac-md5", "hmac-md5-96", "hmac-sha1-96"):
            cmd = [*base, "-c", "aes128-ctr", "-o", f"MACs={mac}", *forward]  # a cipher that needs a MAC
            r = subprocess.run(cmd, input=b"x\n", capture_output=True, timeout=20)
            assert r.returncode == 255 and r.stdout == b"", (mac, r.stderr)
            offer = r.stderr.split(b"Their offer:")[1].split()[0].split(b",")
            assert b"no matching MAC found" in r.stderr and mac.encode() not in offer
            assert not any(m.startswith(b"hmac-md5") or m.endswith(b"-96") for m in offer)
    finally:
        ep.close()


# -- 4. failed handshakes log one line each, no traceback ------------------------------------------------
def _raw_peer(address: tuple[str, int], send: bytes, read_first: bool = False) -> int:
    """Connect, optionally read the server's first bytes, send ``send``, end with a clean EOF and
    wait for the server to close; returns the local port (how the server's log names this peer)."""
    with socket.create_connection(address, timeout=5) as sock:
        port = sock.getsockname()[1]
        if read_first:
            sock.recv(4096)  # the server's banner (and maybe its KEXINIT)
        sock.sendall(send)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while sock.recv(65536):  # read everything, so that closing sends no reset
                pass
        return port


def test_failed_handshakes_log_one_line_each_without_traceback(rig, echo, caplog):
    """Paramiko logged every failed handshake with a traceback, one record per line."""
    caplog.set_level(logging.DEBUG)
    ep = started(rig, echo.address)
    try:
        caplog.clear()
        peers = {
            "garbage": _raw_peer(ep.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            "ssh1": _raw_peer(ep.address, b"SSH-1.5-ancient\r\n", read_first=True),
            "mid-kex close": _raw_peer(ep.address, b"SSH-2.0-OpenSSH_9.2\r\n\x00\x00\x01", read_first=True),
            "bad packet": _raw_peer(ep.address, b"SSH-2.0-OpenSSH_9.2\r\n" + b"\xff" * 64, read_first=True),
        }
        stranger = device(rig, ep, echo.address, key=rig.keys.stranger_key)
        with pytest.raises(AuthenticationRejected):
            stranger.request_line(b"let me in")
        stranger.close()
        assert wait_for(lambda: ep.counters["handshake_failed"] == 5, timeout=10.0) is not None
        time.sleep(0.5)  # nothing more is coming
    finally:
        ep.close()
    shown = [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO
        and r.name.startswith((PARAMIKO_LOG_CHANNEL, "elma_utils.server.ssh_endpoint"))  # not the clients
        and "listening on" not in r.getMessage()
    ]
    lines = [r.getMessage() for r in shown]
    print("\n" + "\n".join(lines))
    assert "Traceback" not in caplog.text and 'File "' not in caplog.text  # not even at DEBUG
    assert len(shown) == 5 and all(r.levelno == logging.WARNING for r in shown), lines
    assert not [r for r in shown if r.name.startswith(PARAMIKO_LOG_CHANNEL)]
    for name, port in peers.items():
        mine = [line for line in lines if f"127.0.0.1:{port} " in line]
        assert len(mine) == 1 and mine[0].startswith(f"endpoint: handshake with 127.0.0.1:{port} failed: "), (
            name
        )
    line = {name: next(x for x in lines if f"127.0.0.1:{port} " in x) for name, port in peers.items()}
    assert "protocol banner" in line["garbage"] and "before the SSH banner" in line["garbage"]
    assert "Incompatible version (1.5 instead of 2.0) (at the SSH banner)" in line["ssh1"]
    assert "closed by the peer (during key exchange)" in line["mid-kex close"]
    assert "Invalid packet blocking (during key exchange)" in line["bad packet"]
    refused = [x for x in lines if fingerprint(load_private_key(rig.keys.stranger_key)) in x]
    assert len(refused) == 1 and "(before logging in; refused key SHA256:" in refused[0]


# -- 5. a Unix-socket service ------------------------------------------------------------------------------
class _UnixEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1
        for line in self.rfile:
            self.wfile.write(line)


class UnixLineEcho(socketserver.ThreadingUnixStreamServer):
    """A line-echo service on a 0600 Unix socket: the model service out of other users' reach."""

    daemon_threads = True

    def __init__(self, path: Path):
        super().__init__(str(path), _UnixEcho)
        os.chmod(path, 0o600)
        self.connections = 0
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@needs_ssh
def test_endpoint_forwards_to_a_unix_socket_service(rig, tmp_path):
    """Devices open ordinary direct-tcpip channels to the advertised port; the endpoint dials the socket."""
    path = tmp_path / "svc.sock"
    service = UnixLineEcho(path)
    with pytest.raises(ValueError, match="advertised_port"):
        SSHEndpoint(rig.host_key, rig.keys.authorized_keys, path)
    ep = started(rig, str(path), advertised_port=7000)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert ep.advertised == ("127.0.0.1", 7000) and ep.target == path
        lines = [f"line {i} ✓".encode() for i in range(30)]
        for name in ("127.0.0.1", "localhost"):
            with device(rig, ep, (name, 7000)) as client:
                assert [client.request_line(x) for x in lines] == lines
        wrong = device(rig, ep, ("127.0.0.1", 7001))
        with pytest.raises(OffloadUnavailable, match="refused a channel"):
            wrong.request_line(b"x")
        wrong.close()
        base = ["ssh", "-p", str(ep.port), *ssh_options(rig.keys, rig.keys.known_hosts)]
        ok = subprocess.run(
            [*base, "-W", "127.0.0.1:7000", "127.0.0.1"], input=b"one\ntwo\n", capture_output=True, timeout=20
        )
        assert ok.returncode == 0 and ok.stdout == b"one\ntwo\n", ok.stderr
        refused = subprocess.run(
            [*base, "-W", f"127.0.0.1:{ep.port}", "127.0.0.1"], input=b"x\n", capture_output=True, timeout=20
        )
        assert refused.returncode != 0 and refused.stdout == b""
        assert service.connections == 3  # two devices and ssh -W; refused channels never reached it
    finally:
        ep.close()
        service.close()
