"""Model sync end to end with tiny real models: offloads → store → retrain → publish → SFTP → swap.

The server's full model is a tiny random 3-layer QA model (the teacher); the first edge keeps
2 layers with zeroed exit heads (it settles nothing, so it offloads everything). Real SQuAD
dev questions are offloaded, the store's export trains the edge's exits, and the retrained
edge is published only when no worse. Edges fetch it through ELMA's SSH endpoint, a real
OpenSSH sshd, or a plain directory, and every broken bundle must be refused.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from qa_fixtures import save_tiny_artifact
from ssh_helpers import make_keys, pin
from sync_helpers import file_entry, fill_store, republish_manifest, server_view

from elma_utils.early_exit.experiment import load_exits_model_from
from elma_utils.early_exit.skim import SkimHead
from elma_utils.edge.runtime import EdgeModel
from elma_utils.edge.ssh_client import SSHTunnelClient
from elma_utils.edge.ssh_keys import generate_ed25519_key, load_private_key
from elma_utils.edge.sync import (
    LATEST_NAME,
    VERSION_RE,
    LocalTree,
    SyncError,
    current_bundle,
    current_version,
    installed_versions,
    parse_latest,
    previous_version,
    rollback,
    rolled_back_versions,
    sync_bundle,
    sync_with_client,
    version_serial,
)
from elma_utils.export.bundle import verify_bundle, write_bundle
from elma_utils.server import publish
from elma_utils.server.ssh_endpoint import SSHEndpoint
from elma_utils.server.sshd import SSHD_BINARY, make_chroot_parent, start_sshd
from elma_utils.squad.data import examples_to_squad_json

SEQ, STRIDE, QUERY = 96, 48, 24
E_T = 0.97  # zeroed heads have normalised entropy 1.0: they never settle
QUESTION = "Which team won Super Bowl 50?"
CONTEXT = (
    "Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina "
    "Panthers 24-10 to earn their third Super Bowl title."
)
needs_sshd = pytest.mark.skipif(not Path(SSHD_BINARY).exists(), reason="OpenSSH sshd not installed")


# -- the server: publish v1, retrain → v2, refused retrain, equal retrain → v3 -----------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, dev_v11, minilm_tokenizer):
    """Every publication step once, with the LATEST.json bytes after each (views are copies)."""
    t0 = time.perf_counter()
    work = tmp_path_factory.mktemp("server")
    root = work / "server_root"
    full = save_tiny_artifact(work / "full", minilm_tokenizer, seed=1, num_layers=3)
    edge, _, _ = load_exits_model_from(full, 2)
    for head in edge.exit_heads:
        head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    exits = publish.save_exits(edge, full, work / "exits0", mode="zeroed")
    first = write_bundle(
        edge, minilm_tokenizer, work / "bundle0", seq_len=SEQ, precision="float32",
        thresholds={"policy": "entropy", "E_T": E_T, "rule": "max"}, model_version="tiny-edge-zeroed",
        doc_stride=STRIDE, max_query_len=QUERY,
    )  # fmt: skip
    out = {"root": root, "full": full, "bundle0": first, "latest": {}}
    out["v1"] = publish.publish_bundle(first, root, exits_dir=exits)
    out["latest"]["v1"] = (publish.bundles_dir(root) / LATEST_NAME).read_bytes()

    offloaded = dev_v11.examples[200:264]  # stored hard questions (train + held-out contexts)
    held_out_dev = dev_v11.examples[:12]  # SQuAD dev questions with their real labels
    original = dev_v11.examples[300:312]  # stands in for the original training data
    (work / "dev.json").write_text(json.dumps(examples_to_squad_json(held_out_dev)))
    (work / "original.json").write_text(json.dumps(examples_to_squad_json(original)))
    out["store"] = work / "hard.sqlite3"
    fill_store(out["store"], offloaded, full, first)
    out["contexts"] = {
        "offloaded": {e.context for e in offloaded},
        "dev": {e.context for e in held_out_dev},
        "original": {e.context for e in original},
    }
    common = dict(eval_fraction=0.25, batch_size=16, dev_eval=work / "dev.json", seed=0)
    # judged on the edge's answers alone: this candidate settles every held-out question with a
    # random model's answers, so the default gate (whole-system F1) would rightly keep v1
    # (tests/test_growth_rounds.py); here it must publish, to give the sync tests a v2
    out["trained"] = publish.retrain_edge(
        out["store"], root, epochs=3, learning_rate=1e-2, original_train=work / "original.json",
        price_offloads=False, **common,
    )  # fmt: skip
    out["latest"]["v2"] = (publish.bundles_dir(root) / LATEST_NAME).read_bytes()
    out["listing_before_refusal"] = sorted(p.name for p in publish.bundles_dir(root).iterdir())
    # learning rate 0: the candidate is the current model again, so its F1 is exactly the same
    out["refused"] = publish.retrain_edge(
        out["store"], root, epochs=0.3, learning_rate=0.0, tolerance=-0.5, **common
    )
    out["latest"]["after_refusal"] = (publish.bundles_dir(root) / LATEST_NAME).read_bytes()
    out["listing_after_refusal"] = sorted(p.name for p in publish.bundles_dir(root).iterdir())
    out["equal"] = publish.retrain_edge(
        out["store"], root, epochs=0.3, learning_rate=0.0, tolerance=0.0, **common
    )
    out["latest"]["v3"] = (publish.bundles_dir(root) / LATEST_NAME).read_bytes()
    out["v2"], out["v3"] = out["trained"].version, out["equal"].version
    out["seconds"] = time.perf_counter() - t0
    return out


def view(server, tmp_path: Path, stage: str, name: str = "view") -> Path:
    """The server's bundles directory as it was when ``stage`` ("v1", "v2", "v3") was the latest."""
    versions = [server[v] for v in ("v1", "v2", "v3") if v <= stage]
    return server_view(
        publish.bundles_dir(server["root"]), tmp_path / name, server["latest"][stage], versions
    )


def assert_serving(local: Path, version: str) -> str:
    """``current`` is ``version``, its bundle loads and answers, and nothing half-downloaded is left."""
    assert current_version(local) == version
    assert not list(local.glob(".incoming-*"))
    answer = EdgeModel.load(current_bundle(local)).answer(QUESTION, CONTEXT)
    assert isinstance(answer.text, str) and 1 <= answer.exit_layer <= 2
    return answer.text


def installed_from(server, tmp_path: Path, stage: str) -> Path:
    local = tmp_path / "edge"
    sync_bundle(LocalTree(view(server, tmp_path, stage, f"install-{stage}")), ".", local)
    assert current_version(local) == server[stage]
    return local


# -- publishing ------------------------------------------------------------------------------------
def test_published_versions_are_atomic_monotonic_and_complete(server):
    root, bundles = server["root"], publish.bundles_dir(server["root"])
    versions = [server["v1"], server["v2"], server["v3"]]
    assert all(VERSION_RE.match(v) for v in versions)
    assert [version_serial(v) for v in versions] == [1, 2, 3]
    assert sorted(versions) == versions and len(set(versions)) == 3
    # only finished bundles and the pointer are visible to edges: no staging or temp entries
    assert sorted(p.name for p in bundles.iterdir()) == sorted([LATEST_NAME, *versions])
    for stage in ("v1", "v2", "v3"):
        pointer = parse_latest(server["latest"][stage])
        assert pointer.version == server[stage] and pointer.serial == version_serial(server[stage])
        manifest = verify_bundle(bundles / pointer.version)
        assert manifest["model_version"] == pointer.version
        assert file_entry(bundles / pointer.version / "manifest.json") == {
            "sha256": pointer.manifest_sha256,
            "bytes": pointer.manifest_bytes,
        }
        assert (root / publish.EXITS_DIR / pointer.version / publish.EXITS_WEIGHTS).is_file()
    assert verify_bundle(bundles / server["v1"])["source_model_version"] == "tiny-edge-zeroed"
    assert publish.read_latest(root).version == server["v3"]
    print(f"\nserver: publish, 3 retrains and evaluations took {server['seconds']:.1f} s")


def test_retrained_edge_is_better_and_published(server):
    r = server["trained"]
    assert r.published, r.reason
    assert r.version == server["v2"] and r.current_version == server["v1"]
    assert r.reason.startswith(f"published {r.version}")
    assert r.train_questions > 0 and r.original_questions == 12 and r.train["steps"] > 0
    assert np.isfinite(r.train["final_loss"])
    store_eval_cur, store_eval_new = r.current["sets"]["store_eval"], r.candidate["sets"]["store_eval"]
    assert store_eval_cur["questions"] == store_eval_new["questions"] > 0
    assert r.current["sets"]["dev"]["questions"] == r.candidate["sets"]["dev"]["questions"] == 12
    # the zeroed edge settles nothing and agrees with the teacher on almost nothing
    assert store_eval_cur["share_solved"] == 0.0 and store_eval_cur["avg_exit_layer"] == 2.0
    assert store_eval_new["f1"] > store_eval_cur["f1"] + 5.0
    assert r.candidate["f1"] >= r.current["f1"]
    # same exit policy and windows as the edge it replaces
    bundles = publish.bundles_dir(server["root"])
    for key in ("seq_len", "doc_stride", "max_query_len", "precision", "num_layers"):
        assert verify_bundle(bundles / r.version)[key] == verify_bundle(bundles / server["v1"])[key]
    assert (bundles / r.version / "thresholds.json").read_text() == (
        bundles / server["v1"] / "thresholds.json"
    ).read_text()
    report = json.loads((Path(r.run_dir) / "report.json").read_text())
    assert report["published"] and report["version"] == r.version
    exits_cfg = json.loads(
        (server["root"] / publish.EXITS_DIR / r.version / publish.EXITS_CONFIG).read_text()
    )
    assert exits_cfg["num_exits"] == 2 and exits_cfg["mode"] == "distill"


def test_held_out_questions_are_not_trained_on(server):
    run = Path(server["trained"].run_dir)
    train = {
        p["context"] for a in json.loads((run / "train.json").read_text())["data"] for p in a["paragraphs"]
    }
    held = {
        p["context"] for a in json.loads((run / "eval.json").read_text())["data"] for p in a["paragraphs"]
    }
    assert train and held and not train & held
    assert train | held == server["contexts"]["offloaded"]
    assert not server["contexts"]["dev"] & (train | server["contexts"]["original"])


def test_worse_candidate_is_not_published(server):
    r = server["refused"]
    assert not r.published and r.version is None
    assert r.candidate["f1"] == r.current["f1"]  # lr 0: the same model, but the tolerance asks for +0.5
    assert r.reason.startswith(f"kept {server['v2']}") and "minus tolerance -0.5" in r.reason
    assert server["latest"]["after_refusal"] == server["latest"]["v2"]
    assert server["listing_after_refusal"] == server["listing_before_refusal"]
    run = Path(r.run_dir)
    assert not (run / "candidate").exists() and not (run / "exits").exists()
    assert json.loads((run / "report.json").read_text())["published"] is False


def test_equal_candidate_counts_as_no_worse(server):
    r = server["equal"]
    assert r.published and r.current_version == server["v2"] and r.version == server["v3"]
    assert r.candidate["f1"] == r.current["f1"] and r.candidate["sets"] == r.current["sets"]


def test_retrained_edge_gets_its_own_e_t_from_calibration_questions(server, dev_v11, tmp_path):
    root = tmp_path / "server_root"
    first = publish.publish_bundle(
        server["bundle0"], root, exits_dir=server["root"] / publish.EXITS_DIR / server["v1"]
    )
    calibration = tmp_path / "calibration.json"  # dev questions used nowhere else in this module
    calibration.write_text(json.dumps(examples_to_squad_json(dev_v11.examples[340:370])))
    r = publish.retrain_edge(
        server["store"], root, epochs=3, learning_rate=1e-2, eval_fraction=0.25, batch_size=16, seed=0,
        calibration=calibration, max_f1_loss=1.0, tolerance=100.0,
    )  # fmt: skip
    assert r.published and r.current_version == first, r.reason
    cal = r.recalibration
    assert cal["status"] == "recalibrated" and cal["questions"] == 30
    assert cal["E_T_before"] == E_T and cal["f1"] >= cal["full_depth_f1"] - 1.0 - 1e-9
    published = json.loads((publish.bundles_dir(root) / r.version / "thresholds.json").read_text())
    assert published == {"policy": "entropy", "E_T": cal["E_T"], "rule": "max"}
    assert json.loads((Path(r.run_dir) / "report.json").read_text())["recalibration"] == cal


def test_a_skimming_edge_keeps_its_skim_head_through_retraining(server, dev_v11, minilm_tokenizer, tmp_path):
    """Adaptive width survives the growth loop: retraining the exit heads carries the published
    bundle's skim head (same weights, same keep rule) into the candidate, whose E_T is chosen on
    skimmed statistics; a mode that retrains the layers the head reads is refused before training."""
    edge, _, _ = load_exits_model_from(server["full"], 2)
    hidden = int(edge.backbone.hidden_dim)
    w = np.random.default_rng(5).normal(size=hidden).astype(np.float32) / np.sqrt(hidden)
    head = SkimHead(w, -2.0, layer=1, block=8, tau=0.5)
    bundle = write_bundle(
        edge, minilm_tokenizer, tmp_path / "skim-bundle", seq_len=SEQ, precision="float32",
        thresholds={"policy": "entropy", "E_T": E_T, "rule": "max"}, model_version="tiny-edge-skim",
        doc_stride=STRIDE, max_query_len=QUERY, skim=head,
    )  # fmt: skip
    root = tmp_path / "server_root"
    first = publish.publish_bundle(bundle, root, exits_dir=server["root"] / publish.EXITS_DIR / server["v1"])
    with pytest.raises(publish.PublishError, match="retrains the layers its skim head reads"):
        publish.retrain_edge(server["store"], root, mode="joint_distill")
    assert not (root / publish.RUNS_DIR).exists() or not any((root / publish.RUNS_DIR).iterdir())
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(examples_to_squad_json(dev_v11.examples[340:370])))
    r = publish.retrain_edge(
        server["store"], root, epochs=1, learning_rate=1e-2, eval_fraction=0.25, batch_size=16, seed=0,
        calibration=calibration, tolerance=100.0,
    )  # fmt: skip
    assert r.published and r.current_version == first, r.reason
    published = publish.bundles_dir(root) / r.version
    assert verify_bundle(published)["skim"] == verify_bundle(bundle)["skim"]
    carried = SkimHead.load(published / "skim.npz")
    np.testing.assert_array_equal(carried.w, head.w)
    assert carried.settings() == head.settings() and r.recalibration["skimmed"] == head.settings()
    runtime = EdgeModel.load(published)
    assert runtime.skim is not None and runtime.skim.settings() == head.settings()
    assert 1 <= runtime.answer(QUESTION, CONTEXT).exit_layer <= 2


def test_retrain_without_stored_questions_keeps_the_current_version(server, tmp_path):
    from elma_utils.server.store import HardQuestionStore

    HardQuestionStore(tmp_path / "empty.sqlite3").close()
    before = (publish.bundles_dir(server["root"]) / LATEST_NAME).read_bytes()
    r = publish.retrain_edge(tmp_path / "empty.sqlite3", server["root"])
    assert not r.published and "0 training" in r.reason
    assert (publish.bundles_dir(server["root"]) / LATEST_NAME).read_bytes() == before
    with pytest.raises(publish.PublishError, match="no LATEST.json"):
        publish.retrain_edge(tmp_path / "empty.sqlite3", tmp_path / "nothing-published")


# -- fetching over SSH -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


def client(keys, port: int, user: str = "elma") -> SSHTunnelClient:
    return SSHTunnelClient(
        "127.0.0.1", port, user, keys.client_key, keys.known_hosts, ("127.0.0.1", 9), timeout=10.0
    )


def endpoint_for(keys, sftp_root: Path, tmp_path: Path) -> SSHEndpoint:
    host_key = tmp_path / "host_ed25519"
    generate_ed25519_key(host_key, comment="elma-endpoint")
    ep = SSHEndpoint(host_key, keys.authorized_keys, ("127.0.0.1", 9), sftp_root=sftp_root).start()
    pin(keys.known_hosts, ep.port, load_private_key(host_key))
    return ep


def check_fetch(ssh: SSHTunnelClient, local: Path, server) -> float:
    old = EdgeModel.load(current_bundle(local))
    old_answer = old.answer(QUESTION, CONTEXT)
    t0 = time.perf_counter()
    result = sync_with_client(ssh, ".", local, timeout=10.0)
    seconds = time.perf_counter() - t0
    assert result.updated and result.version == server["v2"] and result.previous == server["v1"]
    bundle = publish.bundles_dir(server["root"]) / server["v2"]
    assert result.bytes == sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert result.files == len(verify_bundle(bundle)["files"]) + 1
    assert_serving(local, server["v2"])
    assert previous_version(local) == server["v1"]
    same = old.answer(QUESTION, CONTEXT)  # the old model keeps serving from its own files
    assert (same.text, same.exit_layer, same.entropies) == (
        old_answer.text,
        old_answer.exit_layer,
        old_answer.entropies,
    )
    again = sync_with_client(ssh, ".", local)
    assert again.status == "up_to_date" and again.files == 0
    return seconds


def test_sync_through_elma_endpoint(server, keys, tmp_path):
    local = installed_from(server, tmp_path, "v1")
    ep = endpoint_for(keys, view(server, tmp_path, "v2"), tmp_path)
    try:
        with client(keys, ep.port) as ssh:
            seconds = check_fetch(ssh, local, server)
    finally:
        ep.close()
    print(f"\nsync of {server['v2']} through the SSH endpoint: {seconds:.2f} s")


@needs_sshd
def test_sync_through_openssh_sshd(server, keys, tmp_path):
    local = installed_from(server, tmp_path, "v1")
    # sshd chroots the devices' SFTP: the view must sit in root-owned 0755 directories, not /tmp
    parent = make_chroot_parent(prefix="elma-test-sync-")
    try:
        sshd = start_sshd(
            tmp_path / "sshd", authorized_keys_path=keys.authorized_keys, sftp_root=view(server, parent, "v2")
        )
        pin(keys.known_hosts, sshd.port, sshd.host_key)
        try:
            with client(keys, sshd.port, user=getpass.getuser()) as ssh:
                seconds = check_fetch(ssh, local, server)
        finally:
            sshd.stop()
    finally:
        shutil.rmtree(parent)
    print(f"\nsync of {server['v2']} through OpenSSH sshd: {seconds:.2f} s")


def test_connection_lost_mid_transfer_leaves_current_alone(server, keys, tmp_path):
    local = installed_from(server, tmp_path, "v1")
    ep = endpoint_for(keys, view(server, tmp_path, "v2"), tmp_path)
    seen, dropped = [], []

    def drop(done: int, total: int) -> None:
        seen.append((done, total))
        if len(seen) == 1:
            dropped.append(ep.drop_connections())

    try:
        with client(keys, ep.port) as ssh, pytest.raises(SyncError, match="failed") as err:
            sync_with_client(ssh, ".", local, timeout=10.0, progress=drop)
    finally:
        ep.close()
    assert dropped == [1] and seen[-1][0] < seen[-1][1]  # cut off before the end
    assert err.value.file is not None
    assert_serving(local, server["v1"])
    assert installed_versions(local) == [server["v1"]]


def test_tampered_file_is_refused_over_sftp(server, keys, tmp_path):
    local = installed_from(server, tmp_path, "v1")
    served = view(server, tmp_path, "v2")
    part = served / server["v2"] / "layer_2.tflite"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    ep = endpoint_for(keys, served, tmp_path)
    try:
        with client(keys, ep.port) as ssh, pytest.raises(SyncError, match="sha256 does not match") as err:
            sync_with_client(ssh, ".", local)
    finally:
        ep.close()
    assert err.value.file == "layer_2.tflite"
    assert_serving(local, server["v1"])


# -- broken bundles on the server: refused, current untouched -----------------------------------------
def _truncate(v: Path) -> None:
    with open(v / "layer_1.tflite", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 100)


def _flip(v: Path) -> None:
    data = bytearray((v / "embeddings.tflite").read_bytes())
    data[1000] ^= 0x01
    (v / "embeddings.tflite").write_bytes(bytes(data))


def _drop(v: Path) -> None:
    (v / "tokenizer" / "vocab.txt").unlink()


def _extra(v: Path) -> None:
    (v / "extra.tflite").write_bytes(b"not in the manifest")


def _manifest_sha(v: Path) -> None:  # the manifest changed, LATEST.json not: a replaced manifest
    m = json.loads((v / "manifest.json").read_text())
    m["files"]["layer_1.tflite"]["sha256"] = "0" * 64
    (v / "manifest.json").write_text(json.dumps(m, indent=2))


def _manifest_and_latest(v: Path) -> None:  # both changed consistently: the file itself no longer matches
    republish_manifest(v.parent, lambda m: m["files"]["layer_1.tflite"].update(sha256="0" * 64))


def _unloadable(v: Path) -> None:  # hashes all consistent, but the part is not a LiteRT model
    (v / "layer_1.tflite").write_bytes(b"TFL3" + os.urandom(5000))
    republish_manifest(
        v.parent, lambda m: m["files"].update({"layer_1.tflite": file_entry(v / "layer_1.tflite")})
    )


def _escape(v: Path) -> None:
    republish_manifest(
        v.parent, lambda m: m["files"].update({"../../outside.txt": {"sha256": "0" * 64, "bytes": 1}})
    )


def _latest_garbage(v: Path) -> None:
    (v.parent / LATEST_NAME).write_bytes(b'{"format": "elma-edge-latest", "version": "../x"')


def _no_latest(v: Path) -> None:
    (v.parent / LATEST_NAME).unlink()


BROKEN = {
    "truncated": (_truncate, "layer_1.tflite", "truncated"),
    "flipped byte": (_flip, "embeddings.tflite", "sha256 does not match"),
    "dropped file": (_drop, "tokenizer/vocab.txt", "missing on the server"),
    "extra file": (_extra, "extra.tflite", "not listed in manifest.json"),
    "manifest sha changed": (_manifest_sha, "manifest.json", "LATEST.json says"),
    "manifest and LATEST changed": (_manifest_and_latest, "layer_1.tflite", "sha256 does not match"),
    "unloadable part": (_unloadable, None, "does not load"),
    "path outside the bundle": (_escape, "manifest.json", "not a plain relative path"),
    "garbage LATEST": (_latest_garbage, LATEST_NAME, "not valid JSON"),
    "no LATEST": (_no_latest, LATEST_NAME, "not found on the server"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bundle_is_refused_and_current_kept(server, tmp_path, case):
    local = installed_from(server, tmp_path, "v1")
    before = assert_serving(local, server["v1"])
    served = view(server, tmp_path, "v2")
    breaker, bad_file, message = BROKEN[case]
    breaker(served / server["v2"])
    with pytest.raises(SyncError, match=message) as err:
        sync_bundle(LocalTree(served), ".", local)
    assert err.value.file == bad_file
    assert assert_serving(local, server["v1"]) == before
    assert installed_versions(local) == [server["v1"]] and previous_version(local) is None


# -- rollback, garbage collection, no downgrades ------------------------------------------------------
def test_rollback_and_reinstall(server, tmp_path):
    local = installed_from(server, tmp_path, "v1")
    served_v2 = LocalTree(view(server, tmp_path, "v2", "v2"))
    old = EdgeModel.load(current_bundle(local))
    assert sync_bundle(served_v2, ".", local).updated
    assert rollback(local) == server["v1"]
    assert current_version(local) == server["v1"] and previous_version(local) is None
    assert rolled_back_versions(local) == [server["v2"]]
    assert_serving(local, server["v1"])
    assert old.answer(QUESTION, CONTEXT).exit_layer == 2  # zeroed heads: nothing settles
    skipped = sync_bundle(served_v2, ".", local)
    assert skipped.status == "skipped" and current_version(local) == server["v1"]
    with pytest.raises(SyncError, match="no previous version"):
        rollback(local)
    forced = sync_bundle(served_v2, ".", local, force=True)
    assert forced.updated and forced.files == 0  # the kept copy verified, nothing downloaded
    assert current_version(local) == server["v2"] and rolled_back_versions(local) == []
    assert_serving(local, server["v2"])


def test_old_versions_are_collected_and_never_downgraded(server, tmp_path):
    local = installed_from(server, tmp_path, "v1")
    assert sync_bundle(LocalTree(view(server, tmp_path, "v2", "v2")), ".", local).removed == []
    result = sync_bundle(LocalTree(view(server, tmp_path, "v3", "v3")), ".", local, keep=2)
    assert result.updated and result.removed == [server["v1"]]
    assert installed_versions(local) == [server["v2"], server["v3"]]
    assert previous_version(local) == server["v2"]
    older = sync_bundle(LocalTree(view(server, tmp_path, "v2", "v2-again")), ".", local)
    assert older.status == "up_to_date" and "not newer" in older.message
    assert_serving(local, server["v3"])
    with pytest.raises(ValueError, match="keep must be"):
        sync_bundle(LocalTree(tmp_path / "v3"), ".", local, keep=1)


def test_local_tree_is_read_only_and_confined(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "root" / "inside").write_text("y")
    os.symlink("../secret", tmp_path / "root" / "link")
    tree = LocalTree(tmp_path / "root")
    assert tree.open("/inside").read() == tree.open("../inside").read() == b"y"  # "/" is the root
    assert tree.listdir(".") == ["inside", "link"] and tree.stat("inside").st_size == 1
    with pytest.raises(PermissionError):
        tree.open("link")
    with pytest.raises(PermissionError):
        tree.open("inside", "wb")


def test_cli_sync_from_a_directory_and_rollback(server, tmp_path, capsys):
    """`elma sync --from-dir` installs the published versions; `--rollback` goes back; a
    directory without LATEST.json is refused with a message and exit status 2."""
    from elma_utils.cli import main

    local = str(tmp_path / "edge")
    assert main(["sync", "--local-root", local, "--from-dir", str(view(server, tmp_path, "v1", "a"))]) == 0
    assert main(["sync", "--local-root", local, "--from-dir", str(view(server, tmp_path, "v2", "b"))]) == 0
    assert current_version(local) == server["v2"]
    assert f"updated: {server['v2']}" in capsys.readouterr().out
    assert main(["sync", "--local-root", local, "--rollback"]) == 0
    assert current_version(local) == server["v1"]
    (tmp_path / "empty").mkdir()
    assert main(["sync", "--local-root", local, "--from-dir", str(tmp_path / "empty")]) == 2
    assert "LATEST.json" in capsys.readouterr().err
    assert current_version(local) == server["v1"]


def test_error_closing_a_dropped_session_does_not_hide_the_sync_error(tmp_path):
    """After a drop paramiko's SFTP close can raise too; the caller must still see why sync failed."""

    class ClosingFails(LocalTree):
        def close(self) -> None:
            raise EOFError("connection already gone")

    class Client:
        def sftp(self) -> ClosingFails:
            return ClosingFails(tmp_path / "empty-server")

    (tmp_path / "empty-server").mkdir()
    with pytest.raises(SyncError, match=LATEST_NAME) as err:
        sync_with_client(Client(), ".", tmp_path / "edge")
    assert err.value.file == LATEST_NAME
