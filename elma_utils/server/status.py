"""`elma status`: what a server root holds, read while `elma serve` runs.

The server root is one directory that `elma serve --server-root`, `elma status`, the growth
loop and `elma publish` share (``ServerLayout``)::

    <root>/hard-questions.sqlite3    the store of offloaded questions (WAL: readers never block the server)
    <root>/authorized_keys           registered devices (`elma keys add`); comment = device id
    <root>/ssh_host_ed25519_key      ELMA's SSH endpoint's host key (made on first start)
    <root>/elma-service.sock         the model service behind the endpoint (0600)
    <root>/bundles/                  published edge bundles + LATEST.json (the devices' SFTP root)
    <root>/exits/, <root>/retrain/   what publish keeps behind each version, one directory per retraining
    <root>/growth/state.json         the growth loop's record: last run, the run in progress
    <root>/growth/logs/run-*.log     one log (and result) per growth run
    <root>/growth/run.lock           one growth run at a time

``collect_status`` reads all of it without writing anything: the store is opened read-only,
so a status taken while the server answers neither blocks it nor creates files.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STORE_NAME = "hard-questions.sqlite3"
GROWTH_DIR = "growth"


@dataclass(frozen=True)
class ServerLayout:
    """Where everything of one server lives below ``root`` (see the module note)."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / STORE_NAME

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def service_socket(self) -> Path:
        return self.root / "elma-service.sock"

    @property
    def bundles(self) -> Path:
        from elma_utils.server.publish import BUNDLES_DIR

        return self.root / BUNDLES_DIR

    @property
    def growth(self) -> Path:
        return self.root / GROWTH_DIR

    @property
    def growth_state(self) -> Path:
        return self.growth / "state.json"

    @property
    def growth_logs(self) -> Path:
        return self.growth / "logs"

    @property
    def growth_lock(self) -> Path:
        return self.growth / "run.lock"


def iso(ts: float | None) -> str | None:
    """A UNIX time as ISO 8601 UTC (seconds), or None."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing. While a server has the store open (its ``-wal`` and
    ``-shm`` exist) a WAL reader (``mode=ro``); otherwise the file as it is (``immutable``), so
    that no ``-shm`` owned by whoever ran `elma status` is left for the server to trip over."""
    live = all(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?" + ("mode=ro" if live else "immutable=1")
    conn = sqlite3.connect(uri, uri=True, timeout=10.0)
    from elma_utils.server.store import STORE_APPLICATION_ID

    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id != STORE_APPLICATION_ID:
        conn.close()
        raise ValueError(f"{path} is not a hard-question store (application_id {app_id:#x})")
    return conn


def store_status(path: Path, recent: int = 10) -> dict[str, Any]:
    """Counts, per-device activity and the ``recent`` latest offloads of a store (read-only)."""
    from elma_utils.server.store import store_counts

    out: dict[str, Any] = {"path": str(path), "exists": path.is_file()}
    if not out["exists"]:
        return out
    try:
        conn = _open_read_only(path)
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path}: cannot read the store: {exc}") from exc
    try:
        conn.execute("BEGIN")  # one snapshot for every query
        out.update(store_counts(conn))
        out["last_row"] = conn.execute("SELECT max(id) FROM offloads").fetchone()[0] or 0
        first, last = conn.execute("SELECT min(received_at), max(received_at) FROM offloads").fetchone()
        out["first_at"], out["last_at"] = iso(first), iso(last)
        out["devices"] = {
            device: {"offloads": n, "last_seen": iso(seen)}
            for device, n, seen in conn.execute(
                "SELECT device_id, count(*), max(received_at) FROM offloads GROUP BY device_id ORDER BY device_id"
            )
        }
        out["recent"] = [
            {
                "device_id": device,
                "received_at": iso(at),
                "question": question,
                "server_answer": None if no_answer else answer,
                "edge_exit_layer": layer,
            }
            for device, at, question, answer, no_answer, layer in conn.execute(
                "SELECT device_id, received_at, question, server_text, no_answer, edge_exit_layer"
                " FROM offloads ORDER BY id DESC LIMIT ?",
                (max(0, int(recent)),),
            )
        ]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return out


def _devices(store: dict, authorized_keys: Path | None) -> list[dict]:
    """Devices seen in the store and devices registered in ``authorized_keys``, one row each."""
    from elma_utils.server.device_keys import list_devices

    registered: dict[str, list[str]] = {}
    if authorized_keys is not None:
        for entry in list_devices(authorized_keys):
            registered.setdefault(entry["device_id"], []).append(entry["fingerprint"])
    seen = store.get("devices", {})
    rows = []
    for device in sorted(set(seen) | set(registered)):
        rows.append(
            {
                "device_id": device,
                "offloads": seen.get(device, {}).get("offloads", 0),
                "last_seen": seen.get(device, {}).get("last_seen"),
                "registered": None if authorized_keys is None else device in registered,
                "fingerprints": registered.get(device, []),
            }
        )
    return rows


def _published(root: Path) -> dict | None:
    from elma_utils.server.publish import bundles_dir, read_latest

    pointer = read_latest(root)
    if pointer is None:
        return None
    bundles = bundles_dir(root)
    versions = sorted(p.name for p in bundles.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        "version": pointer.version,
        "serial": pointer.serial,
        "published_at": pointer.published_at,
        "notes": pointer.notes,
        "versions": len(versions),
    }


def read_growth_state(layout: ServerLayout) -> dict:
    """The growth loop's state file, or {} before its first run."""
    path = layout.growth_state
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable growth state: {exc}") from exc
    return state if isinstance(state, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _growth(layout: ServerLayout, store: dict) -> dict:
    state = read_growth_state(layout)
    running = state.get("running")
    if running and not _pid_alive(int(running.get("server_pid", 0)) or -1):
        running = {**running, "stale": True}  # the server that ran it is gone
    seen = state.get("offloads_seen")
    return {
        "state_file": str(layout.growth_state),
        "settings": state.get("settings"),
        "runs": state.get("runs", 0),
        "running": running,
        "last_run": state.get("last_run"),
        "last_published": state.get("last_published"),
        "new_since_last_run": None if "last_row" not in store else store["last_row"] - int(seen or 0),
    }


def collect_status(
    server_root: str | os.PathLike,
    *,
    store: str | os.PathLike | None = None,
    authorized_keys: str | os.PathLike | None = None,
    recent: int = 10,
) -> dict[str, Any]:
    """Everything ``elma status`` shows, as plain JSON-able values (see the module note).

    ``store`` and ``authorized_keys`` default to the root's own files (the keys only when
    that file exists)."""
    layout = ServerLayout(Path(server_root))
    if not layout.root.is_dir():
        raise FileNotFoundError(f"no server root {layout.root}")
    keys = Path(authorized_keys) if authorized_keys is not None else None
    if keys is None and layout.authorized_keys.is_file():
        keys = layout.authorized_keys
    if keys is not None and not keys.is_file():
        raise FileNotFoundError(f"authorized_keys {keys} not found")
    stored = store_status(Path(store) if store is not None else layout.store, recent)
    return {
        "server_root": str(layout.root),
        "store": {k: v for k, v in stored.items() if k != "devices"},
        "authorized_keys": None if keys is None else str(keys),
        "devices": _devices(stored, keys),
        "published": _published(layout.root),
        "growth": _growth(layout, stored),
    }


def to_json(status: dict) -> str:
    """Strict JSON (no NaN or Infinity: they become null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(status), indent=2, allow_nan=False, ensure_ascii=False)


def _run_line(run: dict) -> str:
    took = run.get("duration_s")
    head = f"{run.get('started_at', '?')} ({took:.1f} s)" if isinstance(took, (int, float)) else "?"
    out = f"{head}: {run.get('outcome', '?')}"
    if run.get("reason"):
        out += f": {run['reason']}"
    return out


def format_status(status: dict) -> str:
    """``collect_status`` for a person to read."""
    lines = [f"ELMA server root {status['server_root']}"]
    st = status["store"]
    if not st.get("exists"):
        lines.append(f"store: none yet ({st['path']})")
    else:
        lines.append(
            f"store: {st['offloads']} offloads, {st['questions']} distinct questions, {st['contexts']} contexts, "
            f"{st['retries']} retries, {st['no_answer']} without answer ({st['path']})"
        )
        if st["recent"]:
            lines.append(f"  most recent {len(st['recent'])}:")
            for r in st["recent"]:
                lines.append(f"    {r['received_at']}  {r['device_id']:<16} {r['question']}")
    devices = status["devices"]
    registered = sum(1 for d in devices if d["registered"])
    seen = sum(1 for d in devices if d["offloads"])
    keys = status["authorized_keys"]
    lines.append(
        f"devices: {seen} seen in the store"
        + (f", {registered} registered in {keys}" if keys else " (no authorized_keys given)")
    )
    for d in devices:
        when = f"last seen {d['last_seen']}" if d["last_seen"] else "never seen"
        reg = {True: "registered", False: "NOT registered", None: ""}[d["registered"]]
        lines.append(f"    {d['device_id']:<24} {d['offloads']:>7} offloads  {when:<36} {reg}".rstrip())
    pub = status["published"]
    lines.append(
        "published: nothing yet"
        if pub is None
        else f"published: {pub['version']} (serial {pub['serial']}, {pub['published_at']}, "
        f"{pub['versions']} versions kept)"
    )
    g = status["growth"]
    if g["running"]:
        r = g["running"]
        stale = " — STALE: its server is gone" if r.get("stale") else ""
        lines.append(
            f"growth: running since {r.get('started_at')} (pid {r.get('pid')}, log {r.get('log')}){stale}"
        )
    if g["last_run"]:
        lines.append(f"growth: last run {_run_line(g['last_run'])}")
        if g["last_run"].get("log"):
            lines.append(f"        log {g['last_run']['log']}")
    elif not g["running"]:
        lines.append("growth: no run yet")
    if g["new_since_last_run"] is not None:
        lines.append(
            f"        {g['new_since_last_run']} new stored questions since the last run ({g['runs']} runs)"
        )
    return "\n".join(lines)
