"""An exits artifact from the checkpoint of an exits training that is still running (or was
stopped), so that a long run can be evaluated part way without stopping it.

An epoch of ``joint_distill`` on MiniLM is more than an hour on two CPU cores (it trains the
layers too), and whether it pays shows in the per-layer F1 long before the end. ``train_exits``
checkpoints every chunk (weights and optimizer state, ``model.training.ChunkCheckpoint``);
this copies the latest checkpoint and writes it as an ordinary exits artifact, which every
command that reads exits artifacts (``layerwise_dev_stats``, ``bench.adaptive_run``, ...) takes::

    python -m elma_utils.early_exit.snapshot --training artifacts/minilm-cpu-exits-joint_distill-1ep \\
        --full artifacts/minilm-cpu --out artifacts/minilm-cpu-exits-jd-snap [--eval 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from elma_utils.early_exit.exits_artifact import EXITS_CONFIG, EXITS_WEIGHTS, full_model_entry
from elma_utils.early_exit.experiment import CHECKPOINT_DIR
from elma_utils.model.artifacts import CONFIG_FILE


def checkpoint_state(training_dir: Path) -> dict[str, Any]:
    """The checkpoint's state.json (``chunks_done``, time, last losses); FileNotFoundError when
    the training has not finished a chunk, or has finished (its checkpoint is then removed)."""
    from elma_utils.model.training import CKPT_STATE, CKPT_WEIGHTS

    ckpt = Path(training_dir) / CHECKPOINT_DIR
    if (Path(training_dir) / EXITS_WEIGHTS).is_file() and not ckpt.is_dir():
        raise FileNotFoundError(f"{training_dir} finished training: use it as the exits artifact it is")
    if not (ckpt / CKPT_STATE).is_file() or not (ckpt / CKPT_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{ckpt}: no finished chunk to take a snapshot of (state.json, {CKPT_WEIGHTS})"
        )
    return json.loads((ckpt / CKPT_STATE).read_text())


def snapshot_exits(training_dir: Path, full_model_dir: Path, out: Path, mode: str = "joint_distill") -> Path:
    """Write the latest checkpoint of ``training_dir`` as an exits artifact at ``out``.

    The trainer replaces its checkpoint file atomically, so the copy is one whole chunk's
    weights; it may be one chunk newer than the state read before it (recorded as at least)."""
    from elma_utils.atomic_files import write_json_atomic
    from elma_utils.early_exit.experiment import load_exits_model_from
    from elma_utils.model.training import CKPT_WEIGHTS

    training_dir, out = Path(training_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or name another --out")
    state = checkpoint_state(training_dir)
    multi, _, _ = load_exits_model_from(full_model_dir)
    with tempfile.TemporaryDirectory(prefix="elma-snapshot-") as tmp:
        copy = Path(tmp) / CKPT_WEIGHTS
        shutil.copyfile(training_dir / CHECKPOINT_DIR / CKPT_WEIGHTS, copy)
        multi.load_weights(copy)  # the optimizer's state in the file is not needed here
    out.mkdir(parents=True)
    multi.save_weights(out / EXITS_WEIGHTS)
    write_json_atomic(out / EXITS_CONFIG, {
        **full_model_entry(full_model_dir, out),
        "mode": mode,
        "num_exits": multi.num_exits,
        "snapshot": {"of": str(training_dir), "chunks_done_at_least": int(state["chunks_done"]),
                     "losses": state.get("logs")},
    })  # fmt: skip
    return out


def layer_f1(exits_dir: Path, questions: int, data_dir: Path | None = None) -> list[float]:
    """Mean F1 (%) of each exit on ``questions`` dev-v1.1 questions spread over every article."""
    import numpy as np

    from elma_utils.early_exit.experiment import layerwise_dev_stats

    stats = layerwise_dev_stats(exits_dir, "1.1", questions, data_dir=data_dir)
    return [float(x) for x in 100 * np.asarray(stats["f1"]).mean(axis=1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="an exits artifact from a running exits training's checkpoint")
    p.add_argument(
        "--training", type=Path, required=True, help="train_exits' output folder (holds checkpoint/)"
    )
    p.add_argument(
        "--full", type=Path, required=True, help="the full-model artifact the exits were trained on"
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the snapshot (must not exist)")
    p.add_argument("--mode", default="joint_distill", help="how the exits are trained (recorded)")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="also print each exit's F1 on N dev-v1.1 questions")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    if not (args.full / CONFIG_FILE).is_file():
        p.error(f"{args.full} is no full-model artifact (no {CONFIG_FILE})")
    try:  # both checks come before the model loads
        out = snapshot_exits(args.training, args.full, args.out, args.mode)
    except (FileNotFoundError, FileExistsError) as err:
        p.error(str(err))
    chunks = json.loads((out / EXITS_CONFIG).read_text())["snapshot"]["chunks_done_at_least"]
    print(f"snapshot: {out} (after at least {chunks} chunks of {args.training})")
    if args.eval:
        f1 = layer_f1(out, args.eval, args.data_dir)
        print(f"F1 per exit on {args.eval} dev-v1.1 questions: " + " ".join(f"{x:.1f}" for x in f1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
