"""Answer questions on the edge from a bundle: LiteRT parts + NumPy, no Keras or TensorFlow.

``EdgeModel.load(bundle_dir)`` verifies the bundle (sizes, sha256) before opening any part.
A question runs its windows one at a time (batch 1; a bundle with ``dynamic_length`` runs
them at the question's longest window length, an older fixed-shape bundle pads every window
to ``seq_len``): embeddings, then layer 1 and its exit, then layer 2 … After each layer the
question's windows are judged together with the same ``LayerOutput.from_logits`` and
exit policy as the Keras ``EarlyExitRunner``; at the first decision nothing further is run.
A question that no layer settles comes back ``solved=False`` with the last layer's answer
(to offload), unless the bundle's thresholds carry ``E_offload`` (learned by the server,
``server.offload_threshold``) and the last layer's entropy is ≤ it: offloading that question
would not pay, so it is answered here (``solved=True``).

Adaptive width: a bundle whose manifest has ``skim`` (``{file, layer, block, tau,
margin_blocks}``, the file a ``SkimHead`` .npz checked like every other file) skims each
window after layer s with NumPy (``early_exit.skim``): the kept positions of hidden,
padding_mask and segment_ids go on to the next parts (a shorter sequence on a
``dynamic_length`` bundle; padded back to ``seq_len`` with padding_mask 0 on a fixed one),
and the exit logits are put back at the original positions, so answers come out as before.
``EdgeAnswer.kept_share`` says how much of the question went on. A bundle without ``skim``
runs exactly as before.

Interpreter: ``ai_edge_litert`` first, then ``tflite_runtime``, then ``tensorflow.lite``
only when neither is installed.

Tokenizer: ``answer(question, context)`` tokenises with ``QATokenizer.from_assets`` on the
bundle's ``tokenizer/`` directory with the ``python`` piece backend (plain-Python WordPiece,
or the ``sentencepiece`` package for ALBERT): the same ids as training, and the device needs
neither Keras nor TensorFlow (a test answers a question in a fresh interpreter and checks
that neither module was imported).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.early_exit.entropy import answer_space
from elma_utils.early_exit.policies import EarlyExitAnswer, LayerOutput
from elma_utils.early_exit.skim import SkimHead, scatter_logits
from elma_utils.export.bundle import (
    check_predictor_skim,
    policy_from_thresholds,
    read_thresholds,
    verify_bundle,
)


def interpreter_class():
    """The LiteRT interpreter class: ai_edge_litert, else tflite_runtime, else tensorflow.lite."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            import tensorflow as tf  # last resort only: the edge normally has no TensorFlow

            Interpreter = tf.lite.Interpreter
    return Interpreter


@dataclass
class EdgeAnswer(EarlyExitAnswer):
    """``EarlyExitAnswer`` plus per-stage timings (milliseconds)."""

    tokenise_ms: float = 0.0
    embeddings_ms: float = 0.0  # all windows
    layer_ms: list[float] = field(default_factory=list)  # per computed layer, all windows (skim included)
    windows: int = 1
    kept_share: float = 1.0  # share of the question's tokens past the skim layer (1.0: no skim)
    layer_texts: list[str] = field(default_factory=list)  # each computed layer's answer
    kept_below_offload_threshold: bool = False  # solved: no exit settled it, but E_offload kept it here

    @property
    def total_ms(self) -> float:
        return self.tokenise_ms + self.embeddings_ms + float(sum(self.layer_ms))


class LitePart:
    """One .tflite part: named inputs, outputs in the order the manifest lists them."""

    def __init__(self, path: Path, inputs: list[str], outputs: list[str], num_threads: int | None = None):
        self.path = Path(path)
        self.output_names = list(outputs)
        try:
            self.interpreter = interpreter_class()(model_path=str(path), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{self.path.name}: cannot load the LiteRT model: {err}") from err
        details = {d["name"]: d for d in self.interpreter.get_input_details()}
        missing = [n for n in inputs if n not in details]
        if missing:
            raise ValueError(f"{self.path.name}: inputs {missing} not found (has {sorted(details)})")
        self._inputs = {n: (details[n]["index"], details[n]["dtype"]) for n in inputs}
        self.input_shapes = {n: tuple(details[n]["shape"]) for n in inputs}
        out = self.interpreter.get_output_details()
        if len(out) != len(outputs):
            raise ValueError(f"{self.path.name}: {len(out)} outputs, the manifest lists {len(outputs)}")
        self._outputs = [d["index"] for d in out]
        self.dynamic = any(int(d["shape_signature"][1]) == -1 for d in details.values())
        self.calls = 0
        self.resizes = 0

    def _fit_to(self, inputs: dict[str, np.ndarray]) -> None:
        """Resize a dynamic part to this call's sequence length (cheap: no weight copy)."""
        if all(tuple(np.shape(inputs[n])) == self.input_shapes[n] for n in self._inputs):
            return
        for name, (index, _) in self._inputs.items():
            self.interpreter.resize_tensor_input(index, list(np.shape(inputs[name])))
        self.interpreter.allocate_tensors()
        self.input_shapes = {n: tuple(np.shape(inputs[n])) for n in self._inputs}
        self.resizes += 1

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if self.dynamic:
            self._fit_to(inputs)
        for name, (index, dtype) in self._inputs.items():
            self.interpreter.set_tensor(index, np.asarray(inputs[name], dtype=dtype))
        self.interpreter.invoke()
        self.calls += 1
        return {
            n: self.interpreter.get_tensor(i) for n, i in zip(self.output_names, self._outputs, strict=True)
        }


class EdgeModel:
    """A verified bundle, ready to answer questions with early exit."""

    def __init__(self, bundle_dir: Path, manifest: dict, thresholds: dict, num_threads: int | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.thresholds = thresholds
        self.seq_len = int(manifest["seq_len"])
        self.dynamic_length = bool(manifest.get("dynamic_length", False))
        self.num_layers = int(manifest["num_layers"])
        specs = manifest["parts"]

        def part(name: str) -> LitePart:
            if name not in specs:
                raise ValueError(f"manifest.json: no input/output spec for {name}")
            return LitePart(
                self.bundle_dir / name, specs[name]["inputs"], specs[name]["outputs"], num_threads
            )

        self.parts: dict[str, LitePart] = {}
        for name in specs:
            self.parts[name] = part(name)
        self.embeddings = self.parts[manifest.get("embeddings", "embeddings.tflite")]
        self.steps = [
            (self.parts[s["layer"]], self.parts[s["head"]] if s.get("head") else None)
            for s in manifest["layers"]
        ]
        self.policy = policy_from_thresholds(thresholds)
        self.rule = thresholds.get("rule", "max")
        self.null_threshold = thresholds.get("null_threshold")
        # no exit settled it, but offloading would not pay (server.offload_threshold): keep it
        self.offload_threshold = thresholds.get("E_offload")
        self.skim = skim_from_manifest(self.bundle_dir, manifest)
        if self.skim is not None and not 1 <= self.skim.layer < len(self.steps):  # refuse at load
            raise ValueError(
                f"manifest.json: skim layer {self.skim.layer} must lie in 1..{len(self.steps) - 1}"
            )
        check_predictor_skim(thresholds, manifest.get("skim"))
        self._tokenizer = None

    @classmethod
    def load(cls, bundle_dir: str | Path, num_threads: int | None = None) -> EdgeModel:
        """Verify the bundle (raises ``BundleError``), then open every part."""
        manifest = verify_bundle(bundle_dir)
        return cls(Path(bundle_dir), manifest, read_thresholds(bundle_dir), num_threads)

    # ---------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from elma_utils.model.tokenizers import QATokenizer

            self._tokenizer = QATokenizer.from_assets(
                self.bundle_dir / self.manifest.get("tokenizer", "tokenizer"), backend="python"
            )
        return self._tokenizer

    def features_for(self, examples: list) -> Any:
        from elma_utils.squad.features import build_features

        return build_features(
            examples,
            self.tokenizer,
            max_seq_len=self.seq_len,
            doc_stride=int(self.manifest.get("doc_stride", 128)),
            max_query_len=int(self.manifest.get("max_query_len", 64)),
            progress=False,
        )

    # ------------------------------------------------------------------ answers
    def answer(self, question: str, context: str, policy=None) -> EdgeAnswer:
        """Answer one question about ``context`` (tokenised here; see the module note)."""
        from elma_utils.squad.data import SquadExample

        for label, text in (("question", question), ("context", context)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{label} must be a non-empty string")
        example = SquadExample("edge", question, context, (), False, "", "edge#0")
        t0 = time.perf_counter()
        feats = self.features_for([example])
        tokenise_ms = (time.perf_counter() - t0) * 1e3
        ans = self._answer_rows(context, feats, np.arange(len(feats)), policy or self.policy)
        ans.tokenise_ms = tokenise_ms
        return ans

    def answer_features(self, examples: list, features, policy=None, skim=None) -> list[EdgeAnswer]:
        """Answers for ``examples`` (objects with ``.context``) whose windows are ``features``.

        ``skim``: None uses the bundle's skim head (if any), False turns skimming off, a
        ``SkimHead`` replaces it (e.g. another tau)."""
        policy = policy or self.policy
        return [
            self._answer_rows(ex.context, features, np.nonzero(features.example_index == i)[0], policy, skim)
            for i, ex in enumerate(examples)
        ]

    def _padded(self, features, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        L = self.seq_len
        if len(rows) and int(features.lengths[rows].max()) > L:
            raise ValueError(
                f"a window has {int(features.lengths[rows].max())} tokens; this bundle takes at most {L}"
            )
        n = min(features.max_seq_len, L)
        if self.dynamic_length and len(rows):
            L = n = int(features.lengths[rows].max())  # the question's longest window, unpadded
        inputs = features.model_inputs(rows, n)
        offsets = np.full((len(rows), L, 2), -1, dtype=np.int32)
        offsets[:, :n] = features.offsets[rows, :n]
        pad = ((0, 0), (0, L - n))
        out = {
            "token_ids": np.pad(inputs["token_ids"], pad),  # padding: masked, any id will do
            "segment_ids": np.pad(inputs["segment_ids"], pad),
            "padding_mask": np.pad(inputs["padding_mask"], pad),
        }
        return {k: v.astype(np.int32) for k, v in out.items()}, offsets

    def _answer_rows(self, context: str, features, rows: np.ndarray, policy, skim=None) -> EdgeAnswer:
        if not len(rows):
            raise ValueError("no windows for this question")
        skim = self.skim if skim is None else (skim or None)
        if skim is not None and not 1 <= skim.layer < len(self.steps):
            raise ValueError(f"skim layer {skim.layer} must lie in 1..{len(self.steps) - 1}")
        inputs, offsets = self._padded(features, rows)
        lengths = np.asarray(features.lengths[rows], dtype=np.int64)
        full_len = offsets.shape[1]
        mask = answer_space(offsets, include_cls=True)
        windows = range(len(rows))
        t0 = time.perf_counter()
        hidden = [
            self.embeddings(
                token_ids=inputs["token_ids"][w : w + 1], segment_ids=inputs["segment_ids"][w : w + 1]
            )["hidden"]
            for w in windows
        ]
        embeddings_ms = (time.perf_counter() - t0) * 1e3
        pads = [inputs["padding_mask"][w : w + 1] for w in windows]
        segs = [inputs["segment_ids"][w : w + 1] for w in windows]
        positions: list[np.ndarray | None] = [None] * len(rows)
        kept = lengths.copy()
        history: list[LayerOutput] = []
        layer_ms: list[float] = []
        for k, (layer, head) in enumerate(self.steps):
            t0 = time.perf_counter()
            starts, ends = [], []
            for w in windows:
                feed = {"hidden": hidden[w], "padding_mask": pads[w], "segment_ids": segs[w]}
                out = layer(**feed)
                hidden[w] = feed["hidden"] = out["hidden"]
                if head is not None:
                    out = head(**feed)
                s, e = out["start_logits"][0], out["end_logits"][0]
                if positions[w] is not None:
                    s, e = (
                        scatter_logits(s, positions[w], full_len),
                        scatter_logits(e, positions[w], full_len),
                    )
                starts.append(s)
                ends.append(e)
            layer_ms.append((time.perf_counter() - t0) * 1e3)
            result = LayerOutput.from_logits(
                k + 1,
                np.stack(starts).astype(np.float32),
                np.stack(ends).astype(np.float32),
                mask,
                offsets=offsets,
                context=context,
                rule=self.rule,
                null_threshold=self.null_threshold,
            )
            history.append(result)
            decision = policy.decide(history)
            if decision is not None or k == len(self.steps) - 1:
                # the learned offload threshold belongs to the bundle's own policy, not to an override
                keep = decision is None and policy is self.policy and self._keep_on_device(result)
                c0, c1 = result.best_span
                skimmed = any(p is not None for p in positions)
                return EdgeAnswer(
                    text=result.text or "",
                    char_start=int(c0),
                    char_end=int(c1),
                    exit_layer=result.layer,
                    solved=decision is not None or keep,
                    entropy=float(result.entropy),
                    null_diff=float(result.null_diff or 0.0),
                    entropies=[float(h.entropy) for h in history],
                    embeddings_ms=embeddings_ms,
                    layer_ms=layer_ms,
                    windows=len(rows),
                    kept_share=float(kept.sum() / lengths.sum()) if skimmed else 1.0,
                    layer_texts=[h.text or "" for h in history],
                    kept_below_offload_threshold=keep,
                )
            if skim is not None and k + 1 == skim.layer:
                t0 = time.perf_counter()
                for w in windows:
                    pos = skim.kept_positions(hidden[w][0], offsets[w], int(lengths[w]))
                    kept[w] = pos.size
                    if not self.dynamic_length:  # fixed-shape parts: pad back to seq_len, masked
                        pos = np.concatenate([pos, np.full(full_len - pos.size, -1, dtype=pos.dtype)])
                    positions[w] = pos
                    idx = np.maximum(pos, 0)
                    real = (pos >= 0)[None, :]
                    hidden[w] = np.where(real[..., None], hidden[w][:, idx], 0.0).astype(np.float32)
                    pads[w] = np.where(real, pads[w][:, idx], 0).astype(np.int32)
                    segs[w] = np.where(real, segs[w][:, idx], 0).astype(np.int32)
                layer_ms[-1] += (time.perf_counter() - t0) * 1e3
        raise AssertionError("unreachable: the last layer always answers")

    def _keep_on_device(self, last: LayerOutput) -> bool:
        """After the last layer: is the question below the learned offload threshold?"""
        return self.offload_threshold is not None and last.entropy <= self.offload_threshold

    def reset_counts(self) -> None:
        for p in self.parts.values():
            p.calls = 0


def skim_from_manifest(bundle_dir: Path, manifest: dict) -> SkimHead | None:
    """The bundle's skim head with the manifest's keep rule, or None (no adaptive width)."""
    spec = manifest.get("skim")
    if not spec:
        return None
    try:
        return SkimHead.load(
            Path(bundle_dir) / spec["file"],
            **{k: spec.get(k) for k in ("layer", "block", "tau", "margin_blocks")},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"manifest.json: skim head {spec!r} cannot be used: {err}") from err
