"""Pieces for the model-sync tests: a store of real offloads, server views, and tampering."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from elma_utils.edge.protocol import AnswerReply, AskRequest, EdgeResult
from elma_utils.edge.sync import LATEST_NAME, parse_latest


def fill_store(store_path: Path, examples: list, server_model_dir: Path, edge_bundle: Path) -> int:
    """Offload every example: the edge bundle answers first, the server's QAModel answers and is stored."""
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.server.service import ModelAnswerer
    from elma_utils.server.store import HardQuestionStore

    server = ModelAnswerer.load(server_model_dir)
    edge = EdgeModel.load(edge_bundle)
    replies = server.answer_batch([(e.question, e.context) for e in examples])
    with HardQuestionStore(store_path) as store:
        for i, (ex, ans) in enumerate(zip(examples, replies, strict=True)):
            local = EdgeResult.from_answer(
                edge.answer(ex.question, ex.context), edge.manifest["model_version"]
            )
            request = AskRequest(f"q{i}", "edge-1", ex.question, local, context=ex.context)
            reply = AnswerReply(
                request.id, ans.text, ans.score, ans.no_answer, server.model_version, 1.0, ans.start, ans.end
            )
            store.record(request, reply)
    return len(examples)


def server_view(bundles: Path, dest: Path, latest: bytes, versions: list[str]) -> Path:
    """A copy of the published ``versions`` with ``latest`` as LATEST.json (what the server served then)."""
    dest.mkdir(parents=True)
    for v in versions:
        shutil.copytree(bundles / v, dest / v)
    (dest / LATEST_NAME).write_bytes(latest)
    return dest


def republish_manifest(view: Path, mutate) -> dict:
    """Change a version's manifest with ``mutate(manifest)`` and point LATEST.json at the new bytes,
    as a server that published a broken bundle consistently would."""
    version = parse_latest((view / LATEST_NAME).read_bytes()).version
    mpath = view / version / "manifest.json"
    manifest = json.loads(mpath.read_text())
    mutate(manifest)
    data = json.dumps(manifest, indent=2).encode()
    mpath.write_bytes(data)
    latest = json.loads((view / LATEST_NAME).read_text())
    latest.update(manifest_sha256=hashlib.sha256(data).hexdigest(), manifest_bytes=len(data))
    (view / LATEST_NAME).write_text(json.dumps(latest))
    return manifest


def file_entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
