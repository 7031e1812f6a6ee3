"""Two machines on one: the device in its own network namespace, joined to the server by a veth pair.

The server side of the pair stays in this namespace (``10.77.N.1``), the device side is moved
into a new namespace (``10.77.N.2``), which has no other way out: the device can reach the
server only across the "wire", through the address the server was told to ``--listen`` on.
Where namespaces cannot be made (not root, no ``ip``), the fallback is a loopback address
other than 127.0.0.1 (127.0.0.2), still given through ``--listen``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceNetwork:
    server_address: str  # what `elma serve --listen` binds and the device dials
    device_address: str  # the device's own address (in its namespace)
    command_prefix: tuple[str, ...]  # run a device process: prefix + [python, -m, elma_utils.cli, device ...]
    namespace: str | None  # None: the loopback fallback

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command_prefix, *args], **kw)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def namespaces_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextlib.contextmanager
def device_network(tag: str = "elma") -> Iterator[DeviceNetwork]:
    """A namespace + veth pair for the device (removed afterwards), or the loopback fallback."""
    if not namespaces_available():
        yield DeviceNetwork("127.0.0.2", "127.0.0.2", (), None)
        return
    n = os.getpid() % 200 + 20
    ns, host_if, dev_if = (
        f"{tag}-dev-{os.getpid()}",
        f"elh{os.getpid() % 100000}",
        f"eld{os.getpid() % 100000}",
    )
    server, device = f"10.77.{n}.1", f"10.77.{n}.2"
    created = False
    try:
        _ip("netns", "add", ns)
        created = True
        _ip("link", "add", host_if, "type", "veth", "peer", "name", dev_if)
        _ip("link", "set", dev_if, "netns", ns)
        _ip("addr", "add", f"{server}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{device}/24", "dev", dev_if)
        _ip("-n", ns, "link", "set", dev_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError:
        if created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        yield DeviceNetwork("127.0.0.2", "127.0.0.2", (), None)
        return
    try:
        yield DeviceNetwork(server, device, ("ip", "netns", "exec", ns), ns)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # removes both ends
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
