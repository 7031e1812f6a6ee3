"""The outbox against a real server and real disks: a question the server refuses is set aside
while the good ones behind it arrive; a disk that is full or has gone read-only costs the user
the queueing of the offload, never the edge's answer.

The disk tests mount their own file systems (a 1 MiB tmpfs; ext4 on a loop device that the
kernel remounts read-only after an error, as it does a failing SD card with
errors=remount-ro): they need root and skip without it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.bench.loopback import LoopbackDeployment
from elma_utils.edge.client import EdgeQA
from elma_utils.edge.outbox import Outbox
from elma_utils.edge.protocol import AskRequest, EdgeResult, context_ref
from elma_utils.edge.runtime import EdgeModel

OFFLINE = "OffloadUnavailable: no server configured (offline device)"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, minilm_tokenizer) -> Path:
    """E_T below any entropy: the edge never settles, every question is offloaded."""
    return write_tiny_bundle(tmp_path_factory.mktemp("edge") / "b", minilm_tokenizer, -1.0)


@pytest.fixture(scope="module")
def edge_model(bundle) -> EdgeModel:
    return EdgeModel.load(bundle)


def _records(caplog, level: int, logger: str = "elma_utils.edge.outbox") -> list[str]:
    """``logger``'s lines at ``level`` (a server in the same process logs too)."""
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == logger]


# ---------------------------------------------------------------- a poison question, a real server


@pytest.mark.network
def test_a_refused_question_is_set_aside_and_the_ones_behind_it_arrive(
    tmp_path, minilm_tokenizer, bundle, dev_v11, caplog
):
    """The old outbox retried the refused item for ever and sent nothing behind it."""
    first, *rest = dev_v11.examples[:4]
    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    with LoopbackDeployment(model, bundle, tmp_path / "work") as dep:
        edge, box = dep.edge, dep.edge.outbox
        # names a context the server will hold, with an edge span past its end: the server
        # refuses it (bad_request) every time, as it must
        end = len(first.context) + 5
        poison = AskRequest("poison-1", dep.device_id, first.question,
                            EdgeResult("x", "tiny-edge-0", start=end - 1, end=end),
                            context_ref=context_ref(first.context))  # fmt: skip
        box.put(poison)
        good = [
            AskRequest(f"good-{i}", dep.device_id, e.question, EdgeResult("", "tiny-edge-0"), e.context)
            for i, e in enumerate(rest)
        ]
        for request in good:
            box.put(request)
        with caplog.at_level(logging.WARNING, logger="elma_utils.edge.outbox"):
            live = edge.answer(first.question, first.context)  # answered, then the outbox drains
        assert live.source == "server", live.error
        assert box.counts() == {"pending": 0, "sent": 3, "dead": 1}
        [dead] = box.dead()
        assert dead.request == poison and dead.attempts == 1
        assert dead.last_error == (
            "refused by the server as the client's fault (bad_request): "
            "ProtocolError: bad_request: server: edge.end is past the end of the context"
        )
        [warning] = _records(caplog, logging.WARNING)
        assert "request poison-1 set aside" in warning and dead.last_error in warning
        stored = dict(
            dep.server.store.db.conn.execute(
                "SELECT request_id, question FROM offloads WHERE device_id = ?", (dep.device_id,)
            ).fetchall()
        )
        assert stored == {live.request_id: first.question, **{r.id: r.question for r in good}}

        # the server goes away: a transient failure stops the drain, nothing is set aside
        dep.server.close()
        dep.endpoint.drop_connections()  # its open channel went with it
        later = [AskRequest(f"later-{i}", dep.device_id, e.question, EdgeResult("", "e"), e.context)
                 for i, e in enumerate(rest)]  # fmt: skip
        for request in later:
            box.put(request)
        result = edge.flush_outbox()
        assert (result.sent, result.set_aside, result.remaining) == (0, 0, 3)
        pending = box.pending()
        assert [(i.request.id, i.attempts) for i in pending] == [
            ("later-0", 1),
            ("later-1", 0),
            ("later-2", 0),
        ]
        assert result.failed_id == pending[0].id and result.error.startswith("OffloadUnavailable: ")
        assert (
            1.0 <= pending[0].next_attempt_at - pending[0].last_attempt_at <= 1.25
        )  # the default 1 s, jittered
        assert [i.request.id for i in box.dead()] == ["poison-1"]


# ---------------------------------------------------------------- full and read-only disks


def _run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def _mount_or_skip(*args: str) -> None:
    try:
        _run("mount", *args)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount here (root needed): {getattr(exc, 'stderr', None) or exc}")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs of this test's own, unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    _mount_or_skip("-t", "tmpfs", "-o", "size=1m", "elma-test", str(mnt))
    yield mnt
    _run("umount", str(mnt))


@pytest.fixture
def ext4_on_loop(tmp_path):
    """An 8 MiB ext4 (errors=remount-ro) on a loop device, and its sysfs switch that reports an fs error."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    image, mnt = tmp_path / "sd.img", tmp_path / "sd"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    _mount_or_skip("-o", "loop,errors=remount-ro", str(image), str(mnt))
    device = _run("findmnt", "-n", "-o", "SOURCE", str(mnt)).strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    try:
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger}")
        yield mnt, trigger
    finally:
        _run("umount", str(mnt))


def _fill(directory: Path) -> Path:
    """Write a file until the file system has no block left; returns it."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return path


def _assert_edge_answer(result, expected) -> None:
    """The user got what the device model answered, marked as the edge's fallback."""
    assert (result.text, result.source, result.exit_layer) == (
        expected.text,
        "edge-fallback",
        expected.exit_layer,
    )
    start = expected.char_start if expected.char_start >= 0 else None
    assert result.char_start == start and result.entropies == list(expected.entropies)


def test_a_full_disk_loses_the_queueing_not_the_answer(small_tmpfs, edge_model, dev_v11, caplog):
    """The old EdgeQA.answer raised sqlite3.OperationalError: the user got nothing."""
    e = dev_v11.examples[0]
    expected = edge_model.answer(e.question, e.context)
    with Outbox(small_tmpfs / "outbox.sqlite3") as box:
        edge = EdgeQA(edge_model, tunnel=None, outbox=box, device_id="tx2-full")
        assert box.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)  # WAL emptied
        filler = _fill(small_tmpfs)
        with caplog.at_level(logging.ERROR, logger="elma_utils.edge.client"):
            result = edge.answer(e.question, e.context)
        _assert_edge_answer(result, expected)
        assert result.queued is False
        assert result.error == f"{OFFLINE}; not queued: OperationalError: database or disk is full"
        [line] = _records(caplog, logging.ERROR, "elma_utils.edge.client")
        assert f"request {result.request_id} not queued" in line and "database or disk is full" in line
        assert "\n" not in line and len(box) == 0

        filler.unlink()  # room again: the next fallback is queued
        again = edge.answer(e.question, e.context)
        assert (again.queued, again.error) == (True, OFFLINE)
        assert [i.request.id for i in box.pending()] == [again.request_id]


def test_a_disk_gone_read_only_loses_the_queueing_not_the_answer(ext4_on_loop, edge_model, dev_v11, caplog):
    mnt, trigger = ext4_on_loop
    e0, e1 = dev_v11.examples[:2]
    expected = edge_model.answer(e1.question, e1.context)
    with Outbox(mnt / "outbox.sqlite3") as box:
        edge = EdgeQA(edge_model, tunnel=None, outbox=box, device_id="tx2-ro")
        before = edge.answer(e0.question, e0.context)
        assert before.queued
        trigger.write_text("1")  # the kernel remounts the file system read-only under the open outbox
        with pytest.raises(OSError, match="Read-only file system"):
            (mnt / "probe").write_text("x")
        with caplog.at_level(logging.ERROR, logger="elma_utils.edge.client"):
            result = edge.answer(e1.question, e1.context)
        _assert_edge_answer(result, expected)
        assert result.queued is False
        assert result.error.startswith(f"{OFFLINE}; not queued: OperationalError: ")
        [line] = _records(caplog, logging.ERROR, "elma_utils.edge.client")
        assert f"request {result.request_id} not queued" in line
        assert [i.request.id for i in box.pending()] == [before.request_id]  # what was queued is still there
        with pytest.raises(sqlite3.OperationalError):
            box.put(AskRequest("x-1", "tx2-ro", e1.question, EdgeResult("", "e"), e1.context))
