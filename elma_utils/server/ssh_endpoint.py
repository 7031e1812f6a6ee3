"""ELMA's own SSH endpoint (paramiko server mode) for hosts where OpenSSH's sshd cannot be used.

It does the one thing the edge needs from sshd and nothing more: ed25519 public-key logins
against an ``authorized_keys`` file, ``direct-tcpip`` channels (what ``ssh -L`` / ``ssh -W``
and :class:`~elma_utils.edge.ssh_client.SSHTunnelClient` open) to ONE configured loopback
service (a TCP port or a Unix socket), whose bytes it relays both ways, and optionally
read-only SFTP below one directory (model bundles). No shell, no exec, no passwords, no other
destinations, no remote forwards, no CBC ciphers or MD5 / truncated MACs.
A real OpenSSH client can use it like any sshd.

Unauthenticated peers cannot hold it hostage: every connection must log in within
``auth_timeout`` of being accepted (whatever stage its handshake is in), and unauthenticated
connections are capped per source address and in total (below ``max_connections``).
``authorized_keys`` is watched: a removed key loses its live connections within seconds.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import posixpath
import select
import socket
import threading
import time
from pathlib import Path

import paramiko

from elma_utils.edge.ssh_keys import KEY_TYPE, fingerprint, load_authorized_keys, load_private_key

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"127.0.0.1": {"127.0.0.1", "localhost"}, "::1": {"::1", "localhost"}}
UNIX_TARGET_NAMES = {"127.0.0.1", "localhost", "::1"}
RELAY_CHUNK = 64 * 1024
# CBC modes (plaintext recovery) and MD5 / truncated MACs: OpenSSH's sshd stopped offering them long ago.
WEAK_ALGORITHMS = {
    "ciphers": ["3des-cbc", "aes128-cbc", "aes192-cbc", "aes256-cbc"],
    "macs": ["hmac-md5", "hmac-md5-96", "hmac-sha1-96"],
}
PARAMIKO_LOG_CHANNEL = "paramiko.transport.elma_endpoint"  # every endpoint transport logs here
WATCHDOG_TICK_S = 0.25
RACY_MTIME_NS = 2_000_000_000  # a file changed this recently may change again within one mtime tick
LIMITED_LOG_EVERY_S = 10.0
RELAY_THREAD = "ssh-endpoint-relay-"


def relay(chan: paramiko.Channel, sock: socket.socket, stopping: threading.Event) -> None:
    """Copy bytes both ways between an SSH channel and a socket (TCP or Unix) until both are done.

    End-of-file is passed on as a half-close (so ``ssh -W`` with a closed stdin still gets
    the service's last reply); a closed channel or a dead transport ends the relay at once.
    """
    from_chan = from_sock = True
    try:
        while (from_chan or from_sock) and not stopping.is_set() and not chan.closed:
            watch = [s for s, live in ((chan, from_chan), (sock, from_sock)) if live]
            readable, _, _ = select.select(watch, [], [], 0.5)
            if sock in readable:
                data = sock.recv(RELAY_CHUNK)
                if data:
                    chan.sendall(data)
                else:
                    from_sock = False
                    chan.shutdown_write()
            if chan in readable:
                data = chan.recv(RELAY_CHUNK)
                if data:
                    sock.sendall(data)
                else:
                    from_chan = False
                    sock.shutdown(socket.SHUT_WR)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        if from_sock and stopping.is_set():  # closing: what the service already sent still reaches the device
            _pass_on_pending(sock, chan)
        sock.close()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            chan.close()  # sends CHANNEL_CLOSE, which fails if the connection is already gone


def _pass_on_pending(sock: socket.socket, chan: paramiko.Channel) -> None:
    """Forward the bytes already waiting on ``sock`` (a reply written before the stop) to ``chan``."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        sock.setblocking(False)
        while not chan.closed and (data := sock.recv(RELAY_CHUNK)):
            chan.sendall(data)


class ReadOnlySFTPServer(paramiko.SFTPServerInterface):
    """SFTP rooted at one directory, read-only: list, stat and read; every write is refused.

    Client paths are interpreted below ``root`` ("/" is ``root``); a path that resolves
    outside it (``..``, symlinks) is answered "permission denied".
    """

    def __init__(self, server: paramiko.ServerInterface, root: str | os.PathLike, *args, **kwargs):
        super().__init__(server, *args, **kwargs)
        self.root = Path(root).resolve()

    def _local(self, path: str) -> Path | None:
        inside = posixpath.normpath("/" + path).lstrip("/")
        real = (self.root / inside).resolve()
        return real if real == self.root or self.root in real.parents else None

    def _stat(self, path: str, follow: bool):
        local = self._local(path)
        if local is None:
            return paramiko.SFTP_PERMISSION_DENIED
        try:
            st = os.stat(local) if follow else os.lstat(local)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        return paramiko.SFTPAttributes.from_stat(st, local.name)

    def canonicalize(self, path: str) -> str:
        return posixpath.normpath("/" + path)

    def list_folder(self, path: str):
        local = self._local(path)
        if local is None:
            return paramiko.SFTP_PERMISSION_DENIED
        try:
            names = sorted(os.listdir(local))
            return [paramiko.SFTPAttributes.from_stat(os.lstat(local / n), n) for n in names]
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    def stat(self, path: str):
        return self._stat(path, follow=True)

    def lstat(self, path: str):
        return self._stat(path, follow=False)

    def open(self, path: str, flags: int, attr):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
            return paramiko.SFTP_PERMISSION_DENIED
        local = self._local(path)
        if local is None:
            return paramiko.SFTP_PERMISSION_DENIED
        try:
            fh = open(local, "rb")  # noqa: SIM115 - the handle owns and closes it
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        return _ReadHandle(fh, flags)

    def remove(self, path):
        return paramiko.SFTP_PERMISSION_DENIED

    def rename(self, oldpath, newpath):
        return paramiko.SFTP_PERMISSION_DENIED

    def posix_rename(self, oldpath, newpath):
        return paramiko.SFTP_PERMISSION_DENIED

    def mkdir(self, path, attr):
        return paramiko.SFTP_PERMISSION_DENIED

    def rmdir(self, path):
        return paramiko.SFTP_PERMISSION_DENIED

    def chattr(self, path, attr):
        return paramiko.SFTP_PERMISSION_DENIED

    def symlink(self, target_path, path):
        return paramiko.SFTP_PERMISSION_DENIED


class _ReadHandle(paramiko.SFTPHandle):
    def __init__(self, fh, flags: int):
        super().__init__(flags)
        self.readfile = fh

    def stat(self):
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    def chattr(self, attr):
        return paramiko.SFTP_PERMISSION_DENIED


class _Peer:
    """One accepted TCP connection: where from, since when, and (once logged in) with which key."""

    def __init__(self, sock: socket.socket, addr: tuple) -> None:
        self.sock, self.addr = sock, addr
        self.source = str(addr[0])
        self.name = f"{addr[0]}:{addr[1]}"
        self.accepted = time.monotonic()
        self.transport: paramiko.Transport | None = None
        self.key: bytes | None = None  # the key blob that logged this connection in
        self.fingerprint: str | None = None
        self.user: str | None = None
        self.refusals: list[str] = []  # why login attempts were refused (for the one log line)
        self.cut_reason: str | None = None  # set when the endpoint ends the connection itself
        self.failure: str | None = None  # paramiko's error for it, taken out of paramiko's log
        self.in_traceback = False
        self.revoked_since: float | None = None
        self.logged_in = False  # the login has been logged and counted

    def authenticated(self) -> bool:
        """Whether it logged in (stays true after the connection ends)."""
        t = self.transport
        return t is not None and t.auth_handler is not None and t.auth_handler.is_authenticated()

    def refuse(self, what: str) -> None:
        if len(self.refusals) < 5:
            self.refusals.append(what)

    def cut(self, reason: str) -> None:
        """End the connection now, whatever stage it is in: the shutdown wakes paramiko's reader
        with end-of-file (no fd is closed under another thread's feet)."""
        if self.cut_reason is None:
            self.cut_reason = reason
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def quiet(self) -> bool:
        """Whether paramiko's log lines for it are summarised: not logged in, or cut by the endpoint."""
        return self.cut_reason is not None or not self.authenticated()


_PEERS: dict[threading.Thread, _Peer] = {}  # transport (its own thread) -> its connection
_PEERS_LOCK = threading.Lock()
_PARAMIKO_FAILURES = ("Exception (server): ", "Unknown exception: ", "Socket exception: ")


class _PeerLogFilter(logging.Filter):
    """Keep paramiko's per-line tracebacks of failed handshakes out of the server log.

    Paramiko logs a failed handshake at ERROR plus one record per traceback line, from the
    transport's own thread. For a connection that has not logged in (or that the endpoint cut)
    the error text becomes the connection's failure reason (the endpoint logs one line when it
    ends), the traceback is dropped, and paramiko's other INFO+ records are demoted to DEBUG.
    Logged-in devices' records pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        with _PEERS_LOCK:
            peer = _PEERS.get(threading.current_thread())
        if peer is None or not peer.quiet():
            return True
        if record.levelno >= logging.WARNING:
            if peer.in_traceback:
                return False
            message = record.getMessage()
            for prefix in _PARAMIKO_FAILURES:
                if message.startswith(prefix):
                    peer.failure = peer.failure or message[len(prefix) :].strip()
                    peer.in_traceback = prefix != "Socket exception: "
                    return False
        if record.levelno > logging.DEBUG:
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


logging.getLogger(PARAMIKO_LOG_CHANNEL).addFilter(_PeerLogFilter())


class _Gatekeeper(paramiko.ServerInterface):
    """Per-connection policy: who may log in and which channels may be opened (checked again at
    every channel: a key removed from authorized_keys opens nothing more)."""

    def __init__(self, endpoint: SSHEndpoint, transport: paramiko.Transport, peer: _Peer):
        self.endpoint = endpoint
        self.transport = transport
        self.peer = peer
        self.pending: dict[int, socket.socket] = {}  # chanid -> connected target socket
        self.lock = threading.Lock()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ep, peer = self.endpoint, self.peer
        if ep.users is not None and username not in ep.users:
            peer.refuse(f"user {username!r}")
            return paramiko.AUTH_FAILED
        if key.get_name() != KEY_TYPE:
            peer.refuse(f"{key.get_name()} key")
            return paramiko.AUTH_FAILED
        if key.asbytes() not in ep._allowed_keys(reread=True):
            peer.refuse(f"key {fingerprint(key)}")
            return paramiko.AUTH_FAILED
        # paramiko asks again right before it marks the login done, so the last key accepted
        # here is the one that logged in (it ignores login requests once authenticated)
        peer.key, peer.fingerprint, peer.user = key.asbytes(), fingerprint(key), username
        return paramiko.AUTH_SUCCESSFUL

    def _still_authorised(self, what: str) -> bool:
        peer = self.peer
        if not self.transport.is_authenticated() or peer.key is None:
            return False
        if self.endpoint._key_allowed(peer.key):
            return True
        log.warning(
            "endpoint: refused %s for %s: key %s is no longer authorised", what, peer.name, peer.fingerprint
        )
        return False

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self.endpoint.sftp_root is not None and self._still_authorised("a session"):
            return paramiko.OPEN_SUCCEEDED  # only the sftp subsystem is served on it
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel, name: str) -> bool:
        return (
            name == "sftp"
            and self.endpoint.sftp_root is not None
            and self._still_authorised("sftp")
            and super().check_channel_subsystem_request(channel, name)
        )

    def check_channel_direct_tcpip_request(self, chanid: int, origin, destination) -> int:
        ep = self.endpoint
        if not self._still_authorised("a forward"):
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if not ep.allows(destination):
            log.warning("endpoint: refused forward to %s:%s", *destination)
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        try:
            sock = ep._connect_target()
        except OSError as exc:
            log.warning("endpoint: target %s unreachable: %s", ep.target_name, exc)
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        with self.lock:
            self.pending[chanid] = sock
        return paramiko.OPEN_SUCCEEDED

    def take(self, chanid: int) -> socket.socket | None:
        with self.lock:
            return self.pending.pop(chanid, None)

    def discard_pending(self) -> None:
        with self.lock:
            socks, self.pending = list(self.pending.values()), {}
        for s in socks:
            s.close()


class SSHEndpoint:
    """A minimal SSH server: key logins, forwarding to one loopback ``target``, read-only SFTP.

    ``port=0`` picks a free port (see :attr:`port` after :meth:`start`). ``users=None``
    accepts any user name (the key is what authenticates); ``sftp_root`` enables SFTP.
    Each connection gets a thread (plus one per open channel); :meth:`close` ends them all.

    ``target`` is the service: ``(host, port)`` on loopback, or the path (``str`` / ``Path``) of
    a Unix socket (which can be mode 0600, out of other local users' reach). Devices always open
    ordinary ``direct-tcpip`` channels to :attr:`advertised`: ``127.0.0.1`` (also ``localhost``,
    ``::1``) and ``advertised_port`` for a Unix-socket target (required there: it is just the
    port number devices are configured with; nothing listens on it), the target itself for a TCP
    target (``advertised_port`` can rename its port). Every other destination is refused.

    Limits against peers that never log in: a connection must finish logging in within
    ``auth_timeout`` seconds of ``accept()``, or it is cut, whatever stage its handshake is in
    (a watchdog thread checks every 0.25 s). At most ``max_unauthenticated`` connections
    (default half of ``max_connections``) may be unauthenticated at once, at most
    ``max_unauthenticated_per_source`` of them from one source address; when the total is full, a
    newcomer from a less busy address evicts the oldest unauthenticated connection of the busiest
    one, so one flooding address cannot starve the others. Refusals are logged at most once per
    10 s per limit.

    ``authorized_keys_path`` is re-read at every login, and re-checked every ``key_recheck_s``
    (inode, size, mtime; re-read while it was changed less than 2 s ago) and at every channel
    open: a connection whose key is no longer in it is refused new channels and cut, with its
    open channels, after the removal is seen twice 0.25 s apart (so that a reader catching an
    in-place rewrite half-written does not cut anyone). A missing or unreadable file authorises
    nobody.

    :attr:`counters` counts ``accepted``, ``logins``, ``refused_full``, ``refused_per_source``,
    ``refused_unauthenticated``, ``evicted``, ``login_deadline``, ``revoked`` and
    ``handshake_failed``. Each failed handshake is logged as one WARNING line
    ("endpoint: handshake with HOST:PORT failed: REASON (STAGE)"), without paramiko's traceback.
    """

    def __init__(
        self,
        host_key_path: str | os.PathLike,
        authorized_keys_path: str | os.PathLike,
        target: tuple[str, int] | str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sftp_root: str | os.PathLike | None = None,
        users: set[str] | None = None,
        auth_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_connections: int = 64,
        max_unauthenticated: int | None = None,
        max_unauthenticated_per_source: int = 8,
        key_recheck_s: float = 1.0,
        advertised_port: int | None = None,
    ):
        self.host_key = load_private_key(host_key_path)
        self.authorized_keys_path = Path(authorized_keys_path)
        if not self.authorized_keys_path.is_file():
            raise FileNotFoundError(f"authorized_keys {self.authorized_keys_path} not found")
        if isinstance(target, (str, os.PathLike)):
            if advertised_port is None:
                raise ValueError(
                    "a Unix-socket target needs advertised_port: the port devices name in their forwards"
                )
            self.target: tuple[str, int] | Path = Path(target)
            self._names = UNIX_TARGET_NAMES
            self.advertised = ("127.0.0.1", int(advertised_port))
        else:
            self.target = (str(target[0]), int(target[1]))
            self._names = LOOPBACK_NAMES.get(self.target[0], {self.target[0]})
            self.advertised = (self.target[0], int(advertised_port or self.target[1]))
        self.host, self._requested_port = host, port
        self.sftp_root = Path(sftp_root).resolve() if sftp_root is not None else None
        self.users = set(users) if users is not None else None
        self.auth_timeout, self.connect_timeout = auth_timeout, connect_timeout
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.max_unauthenticated = (
            max(1, max_connections // 2) if max_unauthenticated is None else max_unauthenticated
        )
        if not 1 <= self.max_unauthenticated <= max_connections:
            raise ValueError("max_unauthenticated must be between 1 and max_connections")
        if max_unauthenticated_per_source < 1:
            raise ValueError("max_unauthenticated_per_source must be at least 1")
        self.max_unauthenticated_per_source = max_unauthenticated_per_source
        self.key_recheck_s = key_recheck_s
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._not_accepting = threading.Event()
        self._lock = threading.Lock()
        self._peers: set[_Peer] = set()
        self._threads: set[threading.Thread] = set()
        self._keys_lock = threading.Lock()
        self._keys: frozenset[bytes] = frozenset()
        self._keys_sig: tuple | None = None
        self._limited_log: dict[str, tuple[float, int]] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.connections_served = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SSHEndpoint:
        """Bind and start accepting connections (idempotent)."""
        if self._listener is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and self.host == "::":  # dual stack: IPv4 devices too
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((self.host, self._requested_port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._stopping.clear()
        self._not_accepting.clear()
        self._accept_thread = self._spawn(self._accept_loop, "ssh-endpoint-accept")
        self._spawn(self._watchdog, "ssh-endpoint-watchdog")
        log.info(
            "endpoint: listening on %s:%d, forwarding %s:%d to %s",
            self.host, self.port, *self.advertised, self.target_name,
        )  # fmt: skip
        return self

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("endpoint not started")
        return self._listener.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def target_name(self) -> str:
        if isinstance(self.target, Path):
            return f"unix:{self.target}"
        return f"{self.target[0]}:{self.target[1]}"

    def allows(self, destination: tuple[str, int]) -> bool:
        """Whether a client may forward to ``destination`` (only the advertised target)."""
        host, port = destination
        return host in self._names and int(port) == self.advertised[1]

    def connection_count(self) -> int:
        with self._lock:
            return sum(1 for p in self._peers if p.transport is not None and p.transport.is_active())

    def unauthenticated_count(self) -> int:
        """Connections that have not logged in yet (and are not being cut)."""
        with self._lock:
            return sum(1 for p in self._peers if p.cut_reason is None and not p.authenticated())

    def drop_connections(self) -> int:
        """Close every client's SSH connection but keep listening (clients must reconnect)."""
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            peer.cut("dropped by the endpoint")
            if peer.transport is not None:
                peer.transport.close()
        return len(peers)

    def stop_accepting(self, timeout: float = 5.0) -> None:
        """Stop listening; connected devices keep their connections and channels (a graceful stop)."""
        self._not_accepting.set()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, close all connections and wait for their threads.

        Forwards end first (within 0.5 s), each passing on the bytes the service had already
        sent, so a reply written before ``close`` still reaches its device."""
        self._stopping.set()
        self.stop_accepting(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            relays = [th for th in self._threads if th.name.startswith(RELAY_THREAD)]
        for th in relays:
            th.join(max(0.0, deadline - time.monotonic()))
        self.drop_connections()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for th in threads:
            if th is not threading.current_thread():
                th.join(max(0.0, deadline - time.monotonic()))
        self._listener = None

    def __enter__(self) -> SSHEndpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _spawn(self, fn, name: str, *args) -> threading.Thread:
        def run():
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        th = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(th)
        th.start()
        return th

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _log_limited(self, kind: str, level: int, message: str, *args) -> None:
        """Log at most once per LIMITED_LOG_EVERY_S per ``kind`` (floods must not flood the log)."""
        now = time.monotonic()
        with self._lock:
            last, missed = self._limited_log.get(kind, (-math.inf, 0))
            if now - last < LIMITED_LOG_EVERY_S:
                self._limited_log[kind] = (last, missed + 1)
                return
            self._limited_log[kind] = (now, 0)
        if missed:
            message += f" ({missed} more since the last report)"
        log.log(level, message, *args)

    def _connect_target(self) -> socket.socket:
        if isinstance(self.target, Path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(str(self.target))
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(self.target, timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock

    def _allowed_keys(self, reread: bool = False) -> frozenset[bytes]:
        """The authorised key blobs, re-read if ``reread`` or if the file looks changed."""
        path = self.authorized_keys_path
        try:
            st = path.stat()
            sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._keys_lock:
                if not reread and sig == self._keys_sig and time.time_ns() - st.st_mtime_ns > RACY_MTIME_NS:
                    return self._keys
            keys = frozenset(k.asbytes() for k in load_authorized_keys(path))
        except (OSError, ValueError) as exc:  # fail closed: nobody is authorised
            self._log_limited("keys", logging.ERROR, "endpoint: cannot read %s: %s", path, exc)
            keys, sig = frozenset(), None
        with self._keys_lock:
            self._keys, self._keys_sig = keys, sig
        return keys

    def _key_allowed(self, key: bytes) -> bool:
        return key in self._allowed_keys()

    def _admit(self, peer: _Peer) -> str | None:
        """Register ``peer`` if the limits allow it, else return the name of the limit it hit."""
        victim = None
        with self._lock:
            if len(self._peers) >= self.max_connections:
                refused = "refused_full"
            else:
                pending = [p for p in self._peers if p.cut_reason is None and not p.authenticated()]
                mine = sum(1 for p in pending if p.source == peer.source)
                refused = None
                if mine >= self.max_unauthenticated_per_source:
                    refused = "refused_per_source"
                elif len(pending) >= self.max_unauthenticated:
                    busiest, n = collections.Counter(p.source for p in pending).most_common(1)[0]
                    if n > mine + 1:  # the busiest address still has more than the newcomer's would
                        victim = min((p for p in pending if p.source == busiest), key=lambda p: p.accepted)
                        self.counters["evicted"] += 1
                    else:
                        refused = "refused_unauthenticated"
            if refused is not None:
                self.counters[refused] += 1
                return refused
            self._peers.add(peer)
            self.counters["accepted"] += 1
            self.connections_served += 1
        if victim is not None:
            victim.cut(
                f"evicted: {self.max_unauthenticated} unauthenticated connections, most from its address"
            )
        return None

    def _accept_loop(self) -> None:
        listener = self._listener
        limits = {
            "refused_full": lambda: f"{self.max_connections} connections",
            "refused_per_source": lambda: (
                f"{self.max_unauthenticated_per_source} unauthenticated connections from it"
            ),
            "refused_unauthenticated": lambda: f"{self.max_unauthenticated} unauthenticated connections",
        }
        while not self._stopping.is_set() and not self._not_accepting.is_set():
            try:
                readable, _, _ = select.select([listener], [], [], 0.25)
                if not readable:
                    continue
                sock, addr = listener.accept()
            except (OSError, ValueError) as exc:  # ValueError: select() on the closed listener
                if self._stopping.is_set() or getattr(exc, "errno", None) == errno.EBADF:
                    return
                log.warning("endpoint: accept failed: %s", exc)
                continue
            peer = _Peer(sock, addr)
            refused = self._admit(peer)
            if refused is not None:
                sock.close()
                self._log_limited(
                    refused, logging.WARNING, "endpoint: refused %s: already %s", peer.name, limits[refused]()
                )
                continue
            self._spawn(self._serve, f"ssh-endpoint-{addr[1]}", peer)

    def _watchdog(self) -> None:
        """Cut connections that did not log in within ``auth_timeout`` and those of revoked keys."""
        next_key_check = 0.0
        while not self._stopping.wait(WATCHDOG_TICK_S):
            now = time.monotonic()
            with self._lock:
                peers = list(self._peers)
            for peer in peers:
                if (
                    peer.cut_reason is None
                    and not peer.authenticated()
                    and now - peer.accepted > self.auth_timeout
                ):
                    self._count("login_deadline")
                    peer.cut(f"no login within {self.auth_timeout:g} s")
            live = [p for p in peers if p.cut_reason is None and p.authenticated()]
            if not live or (now < next_key_check and all(p.revoked_since is None for p in live)):
                continue
            next_key_check = now + self.key_recheck_s
            allowed = self._allowed_keys()
            for peer in live:
                if peer.key in allowed:
                    peer.revoked_since = None
                elif peer.revoked_since is None:
                    peer.revoked_since = now  # confirm on the next tick: the file may be half-written
                elif now - peer.revoked_since >= WATCHDOG_TICK_S:
                    self._count("revoked")
                    log.warning(
                        "endpoint: key %s of %s is no longer authorised: closing its connection",
                        peer.fingerprint, peer.name,
                    )  # fmt: skip
                    peer.cut(f"key {peer.fingerprint} revoked")

    def _logged_in(self, peer: _Peer) -> None:
        peer.logged_in = True
        self._count("logins")
        log.info("endpoint: %s logged in as %r with %s", peer.name, peer.user, peer.fingerprint)

    def _serve(self, peer: _Peer) -> None:
        try:
            transport = paramiko.Transport(peer.sock, disabled_algorithms=WEAK_ALGORITHMS)
        except OSError as exc:  # the peer is already gone
            peer.sock.close()
            with self._lock:
                self._peers.discard(peer)
            self._log_end(peer, exc)
            return
        transport.set_log_channel(PARAMIKO_LOG_CHANNEL)
        transport.add_server_key(self.host_key)
        if self.sftp_root is not None:
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, ReadOnlySFTPServer, self.sftp_root)
        gate = _Gatekeeper(self, transport, peer)
        with _PEERS_LOCK:
            _PEERS[transport] = peer
        peer.transport = transport
        error: BaseException | None = None
        try:
            with contextlib.suppress(OSError):
                peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if peer.cut_reason is None:
                    transport.start_server(server=gate)
            except Exception as exc:  # whatever a peer's bytes made paramiko raise: one log line
                error = exc
            while error is None and transport.is_active() and not self._stopping.is_set():
                if not peer.logged_in and transport.is_authenticated():
                    self._logged_in(peer)
                chan = transport.accept(0.25)
                if chan is None:
                    continue
                target = gate.take(chan.get_id())
                if target is not None:
                    self._spawn(relay, f"{RELAY_THREAD}{peer.addr[1]}", chan, target, self._stopping)
                # else: a session channel, served by the sftp subsystem handler thread
        except (paramiko.SSHException, EOFError, OSError) as exc:
            error = exc
        finally:
            transport.close()
            if transport.is_alive() and transport is not threading.current_thread():
                transport.join(2.0)  # its last log records must pass the filter while registered
            peer.sock.close()
            gate.discard_pending()
            with _PEERS_LOCK:
                _PEERS.pop(transport, None)
            with self._lock:
                self._peers.discard(peer)
            self._log_end(peer, error)

    def _log_end(self, peer: _Peer, error: BaseException | None) -> None:
        """One line per connection end: why a handshake failed, or that a device went away."""
        if peer.authenticated():
            if not peer.logged_in:
                self._logged_in(peer)
            why = peer.cut_reason or (str(error) if error is not None and str(error) else "")
            log.info(
                "endpoint: %s (%s) disconnected%s", peer.name, peer.fingerprint, f": {why}" if why else ""
            )
            return
        if self._stopping.is_set():
            log.debug("endpoint: %s closed while stopping", peer.name)
            return
        self._count("handshake_failed")
        reason = peer.cut_reason or peer.failure
        if reason is None and error is not None and str(error):
            reason = f"{type(error).__name__}: {error}"
        t = peer.transport
        if t is None or not t.remote_version:
            stage = "before the SSH banner"
        elif t.initial_kex_done:
            stage = "before logging in"
        elif t.local_kex_init is None:  # the server sends its KEXINIT once it accepted the banner
            stage = "at the SSH banner"
        else:
            stage = "during key exchange"
        refused = f"; refused {', '.join(peer.refusals)}" if peer.refusals else ""
        log.warning(
            "endpoint: handshake with %s failed: %s (%s%s)",
            peer.name, reason or "closed by the peer", stage, refused,
        )  # fmt: skip
