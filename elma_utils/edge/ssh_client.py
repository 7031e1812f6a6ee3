"""The edge's end of the offload link: one persistent, pinned, key-authenticated SSH connection.

The server's model service listens on the server host's loopback only; the edge reaches it
through ``direct-tcpip`` channels of one SSH connection (OpenSSH sshd with port forwarding,
or :class:`~elma_utils.server.ssh_endpoint.SSHEndpoint`). The connection is opened once and
reused, kept alive, and re-opened with bounded, jittered exponential backoff when it dies.
Host keys come only from a ``known_hosts`` file: an unknown or changed key is refused
(:class:`HostKeyError`), never accepted. Passwords, agents and ``~/.ssh`` keys are not used.

The transport is payload-agnostic: :meth:`SSHTunnelClient.open_channel` gives a raw byte
channel; :meth:`SSHTunnelClient.request_line` is a convenience for newline-framed
request/reply protocols (one request line, one reply line).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import paramiko

from elma_utils.edge.ssh_keys import fingerprint, keyscan_command, known_hosts_name, load_private_key

LINE_END = b"\n"
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024


class OffloadUnavailable(ConnectionError):
    """The server cannot be used now (unreachable, refused, timed out): answer on the edge instead."""


class HostKeyError(OffloadUnavailable):
    """The server's host key is not pinned in known_hosts, or differs from the pinned one."""


class AuthenticationRejected(OffloadUnavailable):
    """The server did not accept the edge's client key."""


class OffloadTimeout(OffloadUnavailable, TimeoutError):
    """No complete reply before the deadline."""


class _ChannelLost(ConnectionError):
    """The channel closed before a full reply line arrived (usually a dropped connection)."""


_STATS_LOCK = threading.Lock()
TRANSIENT_ERRORS = (OSError, EOFError, paramiko.SSHException, _ChannelLost)


@dataclass
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): ``initial * factor**n``, capped, with jitter.

    Jitter (a random cut of up to ``jitter`` of the delay) keeps many edge devices from
    reconnecting in lockstep after a server restart.
    """

    initial_s: float = 0.1
    factor: float = 2.0
    max_s: float = 5.0
    jitter: float = 0.5

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.factor**attempt)
        return base * (1.0 - self.jitter * random.random())


@dataclass
class TunnelStats:
    """Counters for one client. ``bytes_*`` are request/reply payload bytes of
    :meth:`SSHTunnelClient.request_line`; ``wire_bytes_*`` are everything written to / read
    from the TCP connection(s) (SSH handshakes, encryption and framing included)."""

    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    channels_opened: int = 0
    requests: int = 0
    retried_requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0
    last_connect_s: float = 0.0

    def add(self, name: str, n: int = 1) -> None:
        """Thread-safe increment (channels of one client are used from several threads)."""
        with _STATS_LOCK:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict:
        with _STATS_LOCK:
            return asdict(self)


class _CountingSocket:
    """A TCP socket that counts the bytes paramiko sends and receives through it."""

    def __init__(self, sock: socket.socket, stats: TunnelStats):
        self._sock, self._stats = sock, stats

    def send(self, data) -> int:
        n = self._sock.send(data)
        self._stats.add("wire_bytes_sent", n)
        return n

    def sendall(self, data) -> None:
        self._sock.sendall(data)
        self._stats.add("wire_bytes_sent", len(data))

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        self._stats.add("wire_bytes_received", len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _RefuseUnpinnedHost(paramiko.MissingHostKeyPolicy):
    """Never trust on first use: say what was offered and how to pin it, then refuse."""

    def __init__(self, port: int, known_hosts_path: Path):
        self.port, self.known_hosts_path = port, known_hosts_path

    def missing_host_key(self, client, hostname: str, key: paramiko.PKey) -> None:
        host = hostname[1:].split("]:")[0] if hostname.startswith("[") else hostname
        raise HostKeyError(
            f"host key of {hostname} is not pinned in {self.known_hosts_path}: the server offered "
            f"{key.get_name()} {fingerprint(key)}. Refusing to connect. If that is the server's key "
            f"(on the server: ssh-keygen -lf <host key>.pub), pin it with:\n"
            f"  {keyscan_command(host, self.port, self.known_hosts_path)}"
        )


def line_frame(payload: bytes) -> bytes:
    """``payload`` as exactly one ``\\n``-terminated line (a trailing ``\\n`` is optional)."""
    body = payload[:-1] if payload.endswith(LINE_END) else payload
    if LINE_END in body:
        raise ValueError("a request line must not contain a newline before its end")
    return body + LINE_END


class LineChannel:
    """One channel used for newline-framed request/reply. Not thread-safe: one user at a time."""

    def __init__(
        self, chan: paramiko.Channel, stats: TunnelStats, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    ):
        self.chan, self.stats, self.max_line_bytes = chan, stats, max_line_bytes
        self._buf = bytearray()

    def usable(self) -> bool:
        """Open, its connection alive, and no unread bytes that would desynchronise replies."""
        transport = self.chan.get_transport()
        return (
            not self.chan.closed
            and not self.chan.eof_received
            and not self._buf
            and transport is not None
            and transport.is_active()
        )

    def send_line(self, payload: bytes) -> None:
        data = line_frame(payload)
        self.chan.sendall(data)
        self.stats.add("bytes_sent", len(data))

    def read_line(self, deadline: float) -> bytes:
        """The next line without its ``\\n``; :class:`OffloadTimeout` if none by ``deadline``."""
        while True:
            end = self._buf.find(LINE_END)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self.stats.add("bytes_received", end + 1)
                return line
            if len(self._buf) > self.max_line_bytes:
                raise OffloadUnavailable(f"reply line longer than {self.max_line_bytes} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OffloadTimeout("no reply line before the deadline")
            self.chan.settimeout(remaining)
            try:
                data = self.chan.recv(65536)
            except TimeoutError as exc:  # socket.timeout
                raise OffloadTimeout("no reply line before the deadline") from exc
            if not data:
                raise _ChannelLost("channel closed before a full reply line arrived")
            self._buf += data

    def request(self, payload: bytes, deadline: float) -> bytes:
        self.send_line(payload)
        return self.read_line(deadline)

    def close(self) -> None:
        """Close the channel; on a connection that is already gone there is nothing to tell."""
        with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
            self.chan.close()


class SSHTunnelClient:
    """A persistent SSH connection from the edge to ``target`` on the server host's loopback.

    Thread-safe: the connection is shared; :meth:`request_line` takes a channel from a small
    pool (opening one when all are busy) so concurrent callers run in parallel, each with
    their own channel, and a single caller reuses the same channel for every request.
    ``timeout`` is the default deadline of one call, reconnecting included; after
    ``connect_attempts`` failed tries, or when the deadline passes, :class:`OffloadUnavailable`
    is raised so the caller can fall back. Host key and client key problems are not retried.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        key_path: str | os.PathLike,
        known_hosts_path: str | os.PathLike,
        target: tuple[str, int],
        *,
        timeout: float = 10.0,
        keepalive_s: float = 15.0,
        connect_attempts: int = 5,
        backoff: Backoff | None = None,
        max_idle_channels: int = 8,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ):
        self.host, self.port, self.user = host, int(port), user
        self.key_path, self.known_hosts_path = Path(key_path), Path(known_hosts_path)
        self.target = (str(target[0]), int(target[1]))
        self.timeout, self.keepalive_s = timeout, keepalive_s
        self.connect_attempts = max(1, connect_attempts)
        self.backoff = backoff or Backoff()
        self.max_idle_channels, self.max_line_bytes = max_idle_channels, max_line_bytes
        self._key = load_private_key(self.key_path)
        self.stats = TunnelStats()
        self._lock = threading.RLock()  # guards (re)connecting
        self._pool_lock = threading.Lock()
        self._idle: list[LineChannel] = []
        self._client: paramiko.SSHClient | None = None
        self._closed = False
        self.server_fingerprint: str | None = None

    # -- connection -------------------------------------------------------------------------------
    @property
    def client_key(self) -> paramiko.PKey:
        """The device's key: it logs in with it and signs its asks with it (``device_identity``)."""
        return self._key

    @property
    def name(self) -> str:
        return f"ssh://{self.user}@{known_hosts_name(self.host, self.port)}"

    def _live_transport(self) -> paramiko.Transport | None:
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is not None and transport.is_active() and transport.is_authenticated():
            return transport
        return None

    def is_connected(self) -> bool:
        return self._live_transport() is not None

    def connect(self, timeout: float | None = None) -> None:
        """Open the SSH connection now (otherwise the first request does)."""
        self._ensure_connected(self._deadline(timeout))

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _ensure_connected(self, deadline: float) -> paramiko.Transport:
        if self._closed:
            raise OffloadUnavailable(f"{self.name}: client is closed")
        transport = self._live_transport()
        if transport is not None:
            return transport
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise OffloadTimeout(f"{self.name}: still reconnecting at the deadline")
        try:
            transport = self._live_transport()
            if transport is not None:  # another thread reconnected while we waited
                return transport
            self._drop_connection()
            last: BaseException | None = None
            for attempt in range(self.connect_attempts):
                try:
                    return self._connect_once(deadline)
                except (HostKeyError, AuthenticationRejected):
                    raise
                except TRANSIENT_ERRORS as exc:
                    last = exc
                    self.stats.add("connect_failures")
                delay = self.backoff.delay(attempt)
                if attempt + 1 >= self.connect_attempts or time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
            raise OffloadUnavailable(
                f"{self.name} unreachable after {attempt + 1} attempt(s): {type(last).__name__}: {last}"
            ) from last
        finally:
            self._lock.release()

    def _connect_once(self, deadline: float) -> paramiko.Transport:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed before connecting")
        if not self.known_hosts_path.is_file():
            raise HostKeyError(
                f"known_hosts file {self.known_hosts_path} not found, so no host key is pinned for "
                f"{known_hosts_name(self.host, self.port)}. Pin the server's key with:\n"
                f"  {keyscan_command(self.host, self.port, self.known_hosts_path)}"
            )
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(self.known_hosts_path))
        except (paramiko.hostkeys.InvalidHostKey, ValueError, UnicodeDecodeError) as exc:
            raise HostKeyError(
                f"{self.known_hosts_path} is not a known_hosts file ({exc}); a line reads "
                f"'{known_hosts_name(self.host, self.port)} ssh-ed25519 AAAA...' (a .pub file lacks the host name). "
                f"Pin the server's key with:\n  {keyscan_command(self.host, self.port, self.known_hosts_path)}"
            ) from None
        started = time.monotonic()
        sock = socket.create_connection((self.host, self.port), timeout=remaining)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.set_missing_host_key_policy(_RefuseUnpinnedHost(self.port, self.known_hosts_path))
        try:
            client.connect(
                self.host,
                self.port,
                username=self.user,
                pkey=self._key,
                sock=_CountingSocket(sock, self.stats),
                timeout=remaining,
                banner_timeout=remaining,
                auth_timeout=remaining,
                channel_timeout=remaining,
                look_for_keys=False,
                allow_agent=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            name = known_hosts_name(self.host, self.port)
            raise HostKeyError(
                f"host key of {name} CHANGED: {self.known_hosts_path} pins {fingerprint(exc.expected_key)}, "
                f"the server offered {fingerprint(exc.key)}. Refusing to connect (possible man-in-the-middle). "
                f"If the server's key was deliberately replaced, remove the old pin with\n"
                f"  ssh-keygen -R '{name}' -f {self.known_hosts_path}\n"
                f"and pin the new one with\n  {keyscan_command(self.host, self.port, self.known_hosts_path)}"
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthenticationRejected(
                f"{self.name} rejected the client key {self.key_path} ({fingerprint(self._key)}); "
                f"add {self.key_path}.pub to the server's authorized_keys"
            ) from exc
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        transport.set_keepalive(max(1, int(self.keepalive_s)))
        self.server_fingerprint = fingerprint(transport.get_remote_server_key())
        self._client = client
        self.stats.add("connects")
        self.stats.reconnects = self.stats.connects - 1
        self.stats.last_connect_s = time.monotonic() - started
        return transport

    def _drop_connection(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for lc in idle:
            lc.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- channels ---------------------------------------------------------------------------------
    def open_channel(self, timeout: float | None = None) -> paramiko.Channel:
        """A new ``direct-tcpip`` channel to ``target`` (reconnecting first if needed). Caller closes it."""
        deadline = self._deadline(timeout)
        last: BaseException | None = None
        for _ in range(2):  # a connection found dead while opening gets one reconnect
            transport = self._ensure_connected(deadline)
            try:
                chan = transport.open_channel(
                    "direct-tcpip",
                    dest_addr=self.target,
                    src_addr=("127.0.0.1", 0),
                    timeout=max(0.001, deadline - time.monotonic()),
                )
            except paramiko.ChannelException as exc:
                raise OffloadUnavailable(
                    f"{self.name} refused a channel to {self.target[0]}:{self.target[1]}: {exc.text} "
                    f"(code {exc.code})"
                ) from exc
            except TRANSIENT_ERRORS as exc:
                last = exc
                transport.close()
                continue
            self.stats.add("channels_opened")
            return chan
        raise OffloadUnavailable(f"{self.name}: could not open a channel: {last}") from last

    def open_line_channel(self, timeout: float | None = None) -> LineChannel:
        """A channel of one's own for newline-framed request/reply (e.g. one per worker thread)."""
        return LineChannel(self.open_channel(timeout), self.stats, self.max_line_bytes)

    def _checkout(self, deadline: float) -> LineChannel:
        with self._pool_lock:
            while self._idle:
                lc = self._idle.pop()
                if lc.usable():
                    return lc
                lc.close()
        return LineChannel(self.open_channel(deadline - time.monotonic()), self.stats, self.max_line_bytes)

    def _checkin(self, lc: LineChannel) -> None:
        with self._pool_lock:
            if lc.usable() and len(self._idle) < self.max_idle_channels and not self._closed:
                self._idle.append(lc)
                return
        lc.close()

    def request_line(self, payload: bytes, timeout: float | None = None, *, retry: bool = True) -> bytes:
        """Send ``payload`` as one line and return the reply line (without its ``\\n``).

        With ``retry`` a request whose channel or connection died before the reply came is
        sent once more on a fresh one (at-least-once: the protocol's message ids let the
        server recognise a repeat). A timeout is never retried; its channel is discarded so
        that a late reply cannot be taken for the answer to a later request.
        """
        line_frame(payload)  # reject a malformed line before using the network
        deadline = self._deadline(timeout)
        last: BaseException | None = None
        for attempt in range(2 if retry else 1):
            if attempt:
                self.stats.add("retried_requests")
            lc = self._checkout(deadline)
            try:
                reply = lc.request(payload, deadline)
            except OffloadUnavailable:
                lc.close()
                raise
            except TRANSIENT_ERRORS as exc:
                lc.close()
                last = exc
                continue
            self.stats.add("requests")
            self._checkin(lc)
            return reply
        raise OffloadUnavailable(f"{self.name}: connection lost during the request: {last}") from last

    def sftp(self, timeout: float | None = None) -> paramiko.SFTPClient:
        """An SFTP session on the same connection (e.g. to fetch model bundles). Caller closes it."""
        transport = self._ensure_connected(self._deadline(timeout))
        try:
            return paramiko.SFTPClient.from_transport(transport)
        except paramiko.ChannelException as exc:
            raise OffloadUnavailable(f"{self.name} offers no SFTP: {exc.text}") from exc
        except TRANSIENT_ERRORS as exc:
            raise OffloadUnavailable(f"{self.name}: SFTP failed: {exc}") from exc

    def close(self) -> None:
        """Close the channels and the connection; the client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._drop_connection()

    def __enter__(self) -> SSHTunnelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
