"""Loopback pieces for the SSH transport tests: a line-echo service, key sets, the real ssh client."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from elma_utils.edge.ssh_keys import add_known_host, generate_ed25519_key, write_authorized_keys
from elma_utils.server.sshd import free_loopback_port


class _EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections += 1
        for line in self.rfile:  # one reply line per request line, byte for byte
            self.wfile.write(line)


class LineEchoService(socketserver.ThreadingTCPServer):
    """A threaded TCP service on 127.0.0.1 that sends every line back: the stand-in QA server."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0):
        super().__init__(("127.0.0.1", port), _EchoHandler)
        self.connections = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.server_address[:2]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class KeySet:
    """Client key, a second (not authorized) client key, authorized_keys, and a known_hosts path."""

    directory: Path
    client_key: Path
    stranger_key: Path
    authorized_keys: Path
    known_hosts: Path


def make_keys(directory: Path) -> KeySet:
    directory.mkdir(parents=True, exist_ok=True)
    client = generate_ed25519_key(directory / "edge_ed25519", comment="edge")
    generate_ed25519_key(directory / "stranger_ed25519", comment="stranger")
    authorized = write_authorized_keys(directory / "authorized_keys", [client])
    return KeySet(
        directory,
        directory / "edge_ed25519",
        directory / "stranger_ed25519",
        authorized,
        directory / "known_hosts",
    )


def pin(known_hosts: Path, port: int, host_key) -> Path:
    return add_known_host(known_hosts, "127.0.0.1", port, host_key)


def ssh_options(keys: KeySet, known_hosts: Path, key: Path | None = None) -> list[str]:
    """Options that make the real ssh client use only these files, never ask, and fail fast."""
    return [
        "-F", "/dev/null",
        "-i", str(key or keys.client_key),
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "ConnectTimeout=10",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


class LocalForward:
    """``ssh -N -L local:127.0.0.1:svc -p port 127.0.0.1``: a real OpenSSH client's port forward."""

    def __init__(self, keys: KeySet, known_hosts: Path, ssh_port: int, service_port: int, user: str = "elma"):
        self.local_port = free_loopback_port()
        cmd = ["ssh", "-N", "-L", f"{self.local_port}:127.0.0.1:{service_port}", "-p", str(ssh_port),
               "-l", user, *ssh_options(keys, known_hosts), "127.0.0.1"]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ssh exited {self.process.returncode}: {self.process.stderr.read().decode()}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.local_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("ssh -L did not open its local port")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:  # seen once under full load: ssh still busy after SIGTERM
                self.process.kill()
                self.process.wait(5)
        self.process.stderr.close()


def talk_lines(address: tuple[str, int], lines: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send each line over one TCP connection and collect one reply line per request."""
    replies = []
    with socket.create_connection(address, timeout=timeout) as sock:
        reader = sock.makefile("rb")
        for line in lines:
            sock.sendall(line + b"\n")
            replies.append(reader.readline().rstrip(b"\n"))
    return replies
