"""ELMA's own SSH endpoint (paramiko server mode) for hosts where OpenSSH's sshd cannot be used.

It does the one thing the edge needs from sshd and nothing more: ed25519 public-key logins
against an ``authorized_keys`` file, ``direct-tcpip`` channels (what ``ssh -L`` / ``ssh -W``
and :class:`~elma_utils.offload.ssh_client.SSHTunnelClient` open) to ONE configured loopback
service, whose bytes it relays both ways, and optionally read-only SFTP below one directory
(model bundles). No shell, no exec, no passwords, no other destinations, no remote forwards.
A real OpenSSH client can use it like any sshd.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import select
import socket
import threading
import time
from pathlib import Path

import paramiko

from elma_utils.offload.ssh_keys import KEY_TYPE, load_authorized_keys, load_private_key

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"127.0.0.1": {"127.0.0.1", "localhost"}, "::1": {"::1", "localhost"}}
RELAY_CHUNK = 64 * 1024


def relay(chan: paramiko.Channel, sock: socket.socket, stopping: threading.Event) -> None:
    """Copy bytes both ways between an SSH channel and a TCP socket until both sides are done.

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
        sock.close()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            chan.close()  # sends CHANNEL_CLOSE, which fails if the connection is already gone


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


class _Gatekeeper(paramiko.ServerInterface):
    """Per-connection policy: who may log in and which channels may be opened."""

    def __init__(self, endpoint: SSHEndpoint, transport: paramiko.Transport):
        self.endpoint = endpoint
        self.transport = transport
        self.pending: dict[int, socket.socket] = {}  # chanid -> connected target socket
        self.lock = threading.Lock()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ep = self.endpoint
        if ep.users is not None and username not in ep.users:
            log.warning("endpoint: refused user %r", username)
            return paramiko.AUTH_FAILED
        if key.get_name() != KEY_TYPE:
            return paramiko.AUTH_FAILED
        try:
            allowed = {k.asbytes() for k in load_authorized_keys(ep.authorized_keys_path)}
        except OSError as exc:
            log.error("endpoint: cannot read %s: %s", ep.authorized_keys_path, exc)
            return paramiko.AUTH_FAILED
        return paramiko.AUTH_SUCCESSFUL if key.asbytes() in allowed else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self.endpoint.sftp_root is not None and self.transport.is_authenticated():
            return paramiko.OPEN_SUCCEEDED  # only the sftp subsystem is served on it
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel, name: str) -> bool:
        return (
            name == "sftp"
            and self.endpoint.sftp_root is not None
            and super().check_channel_subsystem_request(channel, name)
        )

    def check_channel_direct_tcpip_request(self, chanid: int, origin, destination) -> int:
        ep = self.endpoint
        if not self.transport.is_authenticated() or not ep.allows(destination):
            log.warning("endpoint: refused forward to %s:%s", *destination)
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        try:
            sock = socket.create_connection(ep.target, timeout=ep.connect_timeout)
        except OSError as exc:
            log.warning("endpoint: target %s:%s unreachable: %s", *ep.target, exc)
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    ``authorized_keys_path`` is re-read at every login, so keys can be added or revoked live.
    Each connection gets a thread (plus one per open channel); :meth:`close` ends them all.
    """

    def __init__(
        self,
        host_key_path: str | os.PathLike,
        authorized_keys_path: str | os.PathLike,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sftp_root: str | os.PathLike | None = None,
        users: set[str] | None = None,
        auth_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_connections: int = 64,
    ):
        self.host_key = load_private_key(host_key_path)
        self.authorized_keys_path = Path(authorized_keys_path)
        if not self.authorized_keys_path.is_file():
            raise FileNotFoundError(f"authorized_keys {self.authorized_keys_path} not found")
        self.target = (str(target[0]), int(target[1]))
        self.host, self._requested_port = host, port
        self.sftp_root = Path(sftp_root).resolve() if sftp_root is not None else None
        self.users = set(users) if users is not None else None
        self.auth_timeout, self.connect_timeout = auth_timeout, connect_timeout
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._transports: set[paramiko.Transport] = set()
        self._threads: set[threading.Thread] = set()
        self.connections_served = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SSHEndpoint:
        """Bind and start accepting connections (idempotent)."""
        if self._listener is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(128)
        self._listener = listener
        self._stopping.clear()
        self._spawn(self._accept_loop, "ssh-endpoint-accept")
        log.info("endpoint: listening on %s:%d, forwarding to %s:%d", self.host, self.port, *self.target)
        return self

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("endpoint not started")
        return self._listener.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def allows(self, destination: tuple[str, int]) -> bool:
        """Whether a client may forward to ``destination`` (only the configured target)."""
        host, port = destination
        names = LOOPBACK_NAMES.get(self.target[0], {self.target[0]})
        return int(port) == self.target[1] and host in names

    def connection_count(self) -> int:
        with self._lock:
            return sum(1 for t in self._transports if t.is_active())

    def drop_connections(self) -> int:
        """Close every client's SSH connection but keep listening (clients must reconnect)."""
        with self._lock:
            transports = list(self._transports)
        for t in transports:
            t.close()
        return len(transports)

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, close all connections and wait for their threads."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
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
    def _spawn(self, fn, name: str, *args) -> None:
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

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stopping.is_set():
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
            if self.connection_count() >= self.max_connections:
                log.warning("endpoint: too many connections, dropping %s:%s", *addr[:2])
                sock.close()
                continue
            self._spawn(self._serve, f"ssh-endpoint-{addr[1]}", sock, addr)

    def _serve(self, sock: socket.socket, addr) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.add_server_key(self.host_key)
        if self.sftp_root is not None:
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, ReadOnlySFTPServer, self.sftp_root)
        gate = _Gatekeeper(self, transport)
        with self._lock:
            self._transports.add(transport)
            self.connections_served += 1
        try:
            transport.start_server(server=gate)
            login_deadline = time.monotonic() + self.auth_timeout
            while transport.is_active() and not self._stopping.is_set():
                if not transport.is_authenticated() and time.monotonic() > login_deadline:
                    log.warning("endpoint: %s:%s did not log in within %.0f s", *addr[:2], self.auth_timeout)
                    break
                chan = transport.accept(0.25)
                if chan is None:
                    continue
                target = gate.take(chan.get_id())
                if target is not None:
                    self._spawn(relay, f"ssh-endpoint-relay-{addr[1]}", chan, target, self._stopping)
                # else: a session channel, served by the sftp subsystem handler thread
        except (paramiko.SSHException, EOFError, OSError) as exc:
            log.info("endpoint: connection from %s:%s ended: %s", *addr[:2], exc)
        finally:
            transport.close()
            gate.discard_pending()
            with self._lock:
                self._transports.discard(transport)
