"""A whole ELMA deployment on one machine's loopback: server, SSH ways in, and an edge.

Notebook 05, the benchmarks and the end-to-end tests all need the same set-up, so it lives
here once:

    with LoopbackDeployment(model_dir, bundle_dir, work_dir, way_in="endpoint") as dep:
        result = dep.edge.answer(question, context)      # EdgeQA: early exit, offload, outbox
        dep.round_trips()                                 # SSH vs TCP overhead, model excluded

It generates the keys (client ed25519 key, server host key), writes ``authorized_keys``
and pins the host key in a ``known_hosts`` file — the same files a real device and server
would hold — starts the offload server on 127.0.0.1, then ELMA's SSH endpoint or a real
OpenSSH sshd forwarding to it, and connects the edge's persistent tunnel.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elma_utils.edge.client import EdgeQA
from elma_utils.edge.identity import DeviceRegistry
from elma_utils.edge.outbox import Outbox
from elma_utils.edge.ssh_client import SSHTunnelClient
from elma_utils.edge.ssh_keys import (
    add_known_host,
    fingerprint,
    generate_ed25519_key,
    load_private_key,
    write_authorized_keys,
)
from elma_utils.server.service import ModelAnswerer, OffloadServer

WAYS_IN = ("endpoint", "sshd")


class LoopbackDeployment:
    """Server + SSH way in + edge client, started together and closed together."""

    def __init__(
        self,
        model_dir: str | Path,
        bundle_dir: str | Path,
        work_dir: str | Path,
        *,
        way_in: str = "endpoint",
        device_id: str = "edge-loopback",
        deadline_ms: int = 5000,
        null_threshold: float | None = None,
        sftp_root: str | Path | None = None,
    ):
        if way_in not in WAYS_IN:
            raise ValueError(f"way_in must be one of {WAYS_IN}, got {way_in!r}")
        self.model_dir, self.bundle_dir = Path(model_dir), Path(bundle_dir)
        self.work = Path(work_dir)
        self.way_in = way_in
        self.device_id, self.deadline_ms = device_id, deadline_ms
        self.null_threshold = null_threshold
        self.sftp_root = sftp_root
        self.server = self.endpoint = self.sshd = self.tunnel = self.edge = None

    # ------------------------------------------------------------------ keys
    def _keys(self) -> None:
        keys = self.work / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        self.client_key = keys / "edge_ed25519"
        if not self.client_key.is_file():
            generate_ed25519_key(self.client_key, comment=self.device_id)
        self.authorized_keys = write_authorized_keys(  # the comment names the device (device_identity)
            keys / "authorized_keys", [load_private_key(self.client_key)], comment=self.device_id
        )
        self.host_key = keys / "server_host_ed25519"
        if not self.host_key.is_file():
            generate_ed25519_key(self.host_key, comment="elma-server")
        self.known_hosts = keys / "known_hosts"
        self.known_hosts.write_text("")  # pinned below, for this run's port

    # ----------------------------------------------------------------- start
    def start(self) -> LoopbackDeployment:
        from elma_utils.edge.runtime import EdgeModel

        self._keys()
        answerer = ModelAnswerer.load(self.model_dir, self.null_threshold)
        self.server = OffloadServer(
            answerer,
            self.work / "server" / "hard-questions.sqlite3",
            registry=DeviceRegistry(self.authorized_keys),  # asks must be signed by the device's key
        ).start()
        target = ("127.0.0.1", self.server.port)
        if self.way_in == "endpoint":
            from elma_utils.server.ssh_endpoint import SSHEndpoint

            self.endpoint = SSHEndpoint(
                self.host_key, self.authorized_keys, target, sftp_root=self.sftp_root
            ).start()
            ssh_port, host_key = self.endpoint.port, load_private_key(self.host_key)
        else:
            from elma_utils.server.sshd import start_sshd

            # authorized_keys is rewritten with the device's restricted line (device_key_options):
            # forward to the server, read the bundles over chrooted SFTP, nothing else.
            self.sshd = start_sshd(
                self.work / "sshd",
                authorized_keys_path=self.authorized_keys,
                device_keys={self.device_id: load_private_key(self.client_key)},
                host_key_path=self.host_key,
                permit_open=target,
                sftp_root=self.sftp_root,
            )
            ssh_port, host_key = self.sshd.port, self.sshd.host_key
        add_known_host(self.known_hosts, "127.0.0.1", ssh_port, host_key)
        self.ssh_port = ssh_port
        self.tunnel = self.make_tunnel()
        self.tunnel.connect()
        self.edge = EdgeQA(
            EdgeModel.load(self.bundle_dir),
            self.tunnel,
            Outbox(self.work / "edge" / "outbox.sqlite3"),
            device_id=self.device_id,
            deadline_ms=self.deadline_ms,
        )
        return self

    def make_tunnel(self, device_id: str | None = None) -> SSHTunnelClient:
        """A new (unconnected) tunnel client with the pinned host key and the key of
        ``device_id`` (default: the deployment's device), made and registered when new."""
        key = self.client_key if device_id in (None, self.device_id) else self._device_key(device_id)
        return SSHTunnelClient(
            "127.0.0.1",
            self.ssh_port,
            getpass.getuser(),
            key,
            self.known_hosts,
            ("127.0.0.1", self.server.port),
            timeout=max(10.0, self.deadline_ms / 1000),
        )

    def _device_key(self, device_id: str) -> Path:
        """Another device's key file, registered in authorized_keys under its id (device_keys).

        Registered whenever authorized_keys does not hold it, not only when the key is new:
        ``start`` writes authorized_keys anew, while the keys of an earlier run into the same
        directory stay on disk (registering only new keys refused every one of them)."""
        from elma_utils.server.device_keys import add_device, list_devices, revoke_device

        key = self.work / "keys" / f"device-{device_id}_ed25519"
        if not key.is_file():
            generate_ed25519_key(key, comment=device_id)
        registered = {d["device_id"]: d["fingerprint"] for d in list_devices(self.authorized_keys)}
        if registered.get(device_id) != fingerprint(load_private_key(key)):
            revoke_device(self.authorized_keys, device_id)  # another key under this id: not this one
            options = ""
            if self.sshd is not None:  # OpenSSH: the same restricted line as the deployment's device
                from elma_utils.server.sshd import device_key_options

                options = device_key_options(("127.0.0.1", self.server.port), self.sftp_root)
            add_device(self.authorized_keys, device_id, f"{key}.pub", options=options)
        return key

    def round_trips(self, lines: int = 300, new_connection_lines: int = 20) -> dict:
        """Round trip of a ping (no model time) over the persistent SSH channel, a channel
        per question, a connection per question, and plain TCP; ms and wire bytes."""
        from elma_utils.bench.link_overhead import measure_round_trip
        from elma_utils.edge.protocol import Ping, encode

        payload = encode(Ping("rtt-probe")).rstrip(b"\n")
        results = measure_round_trip(
            self.make_tunnel, payload, lines=lines, new_connection_lines=new_connection_lines
        )
        return {mode: r.as_dict() for mode, r in results.items()}

    def server_throughput(
        self,
        questions: Sequence[tuple[str, str]],
        clients: Sequence[int] = (1, 4, 8),
        per_client: int = 100,
        **options: Any,
    ) -> dict[int, dict]:
        """Throughput (questions/s) and p50/p95/p99/max round trip (ms) with N devices at once,
        each on its own SSH connection; ``options`` (warmup, deadline_ms, on_reply, ...) go to
        :func:`~elma_utils.bench.throughput.measure_server_throughput`. The asks are stored."""
        from elma_utils.bench.throughput import measure_server_throughput

        results = measure_server_throughput(
            self.make_tunnel, questions, clients, per_client=per_client, **options
        )
        return {n: r.as_dict() for n, r in results.items()}

    def close(self) -> None:
        for part in (self.tunnel, self.endpoint):
            if part is not None:
                part.close()
        if self.sshd is not None:
            self.sshd.stop()
        if self.edge is not None and self.edge.outbox is not None:
            self.edge.outbox.close()
        if self.server is not None:
            self.server.close()

    def __enter__(self) -> LoopbackDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
