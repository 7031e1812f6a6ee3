"""Load, validate, split and extend SQuAD json files.

Everything downstream (features, training, official scoring) starts from these
objects, so the loader checks what later code silently relies on: every answer
text really sits at its ``answer_start`` in the context. Bad questions are
reported, fixed where the fix is unambiguous, or dropped; a bad question never
crashes a load, while a file that is not SQuAD at all raises ``ValueError``.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import logging
import os
import random
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elma_utils import config

log = logging.getLogger(__name__)

VERSIONS = ("1.1", "2.0")
SPLITS = ("train", "dev")
MAX_PROBLEMS = 50  # problems kept as text in a report; n_bad counts all of them
DOWNLOAD_TIMEOUT_S = 60.0
_BASE_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset"

SQUAD_URLS: dict[tuple[str, str], str] = {
    (version, split): f"{_BASE_URL}/{split}-v{version}.json" for version in VERSIONS for split in SPLITS
}

# sha256 of the files served at SQUAD_URLS (what a download must match).
# - dev-v1.1: checked here, the shared copy is byte-identical to the official file.
# - train-v1.1, train-v2.0, dev-v2.0: the published checksums of the official files, as pinned by
#   TensorFlow Datasets (url_checksums/squad.txt, train-v1.1: 30,288,272 bytes) and ParlAI
#   (tasks/squad, tasks/squad2; train-v2.0: 42,123,633 bytes, dev-v2.0: 4,370,528 bytes).
#   They cannot be checked on this machine. The shared train-v1.1.json (7175291878ae…) and
#   dev-v2.0.json (eb9e85707da2…) are rebuilt copies (see ../shared/data/README.md), so their
#   hashes differ on purpose and must never be used as "official" ones.
# Verification applies to downloads only; a file already in the data directory is trusted.
SQUAD_SHA256: dict[tuple[str, str], str] = {
    ("1.1", "train"): "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
    ("1.1", "dev"): "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
    ("2.0", "train"): "68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002",
    ("2.0", "dev"): "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
}


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context


@dataclass(frozen=True)
class SquadExample:
    qas_id: str
    question: str
    context: str
    answers: tuple[Answer, ...]  # empty for unanswerable
    is_impossible: bool
    title: str
    context_id: str  # stable id of the paragraph: "<title>#<paragraph index>"
    synthetic: bool = False  # True for made-up unanswerable examples


@dataclass
class ValidationReport:
    n_articles: int = 0
    n_paragraphs: int = 0
    n_questions: int = 0  # question entries read, good and bad
    n_unanswerable: int = 0  # among the kept examples
    n_bad: int = 0  # questions dropped or flagged (answer start fixed, answers dropped)
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, human-readable

    def add_problem(self, message: str, n_questions: int = 1) -> None:
        """Count `n_questions` bad questions under one message; keep it while there is room."""
        self.n_bad += n_questions
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)


@dataclass
class SquadDataset:
    version: str  # "1.1" or "2.0"
    split: str  # "train" or "dev"
    path: Path
    raw: dict  # the parsed json as on disk (cut to the questions read when `limit` is used)
    examples: list[SquadExample]
    report: ValidationReport


class _BadEntry(Exception):
    """One malformed article, paragraph or question: reported, never raised to the caller."""


# ---------------------------------------------------------------- paths and download


def _check_version_split(version: str, split: str) -> tuple[str, str]:
    version = _normalize_version(version)
    if split not in SPLITS:
        raise ValueError(f"unknown SQuAD split {split!r}; choose one of {SPLITS}")
    return version, split


def _normalize_version(version: str) -> str:
    """'1.1', 'v1.1', '2.0', 'v2.0' -> '1.1' / '2.0'; anything else is an error."""
    text = str(version).strip().lower().removeprefix("v")
    if text not in VERSIONS:
        raise ValueError(f"unknown SQuAD version {version!r}; choose one of {VERSIONS}")
    return text


def squad_filename(version: str, split: str) -> str:
    """Official file name, e.g. 'dev-v1.1.json'."""
    version, split = _check_version_split(version, split)
    return f"{split}-v{version}.json"


def squad_path(
    version: str,
    split: str,
    data_dir: Path | None = None,
    download: bool = True,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Path of a SQuAD file in `data_dir`, downloading the official file when it is missing.

    Without an explicit `data_dir` (or ELMA_DATA_DIR) a file missing from the shared,
    read-only ../shared/data/squad is looked for, and downloaded, in the project's data/squad/.
    """
    version, split = _check_version_split(version, split)
    directory = Path(data_dir) if data_dir is not None else config.data_dir()
    path = directory / squad_filename(version, split)
    if path.is_file():
        return path
    if data_dir is None and not os.environ.get("ELMA_DATA_DIR"):
        path = config.PROJECT_ROOT / "data" / "squad" / squad_filename(version, split)
        if path.is_file():
            return path
    url = SQUAD_URLS[(version, split)]
    if not download:
        raise FileNotFoundError(_missing_message(path, url, "downloading is switched off"))
    _download(url, path, SQUAD_SHA256.get((version, split)), timeout)
    return path


def _missing_message(path: Path, url: str, reason: str) -> str:
    return (
        f"SQuAD file {path.name} is not available ({reason}). Put {path.name} at {path} "
        f"(download it from {url}), or set ELMA_DATA_DIR to a directory holding it."
    )


def _download(url: str, path: Path, sha256: str | None, timeout: float) -> None:
    """Fetch `url` to a temporary file beside `path`, check its sha256, then rename atomically."""
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as out:
            digest = _fetch_to(url, out, timeout)
        if sha256 is None or digest == sha256:
            os.replace(tmp_name, path)
            tmp_name = None
            log.info("downloaded %s to %s", url, path)
            return
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, timeouts, disk errors
        raise FileNotFoundError(_missing_message(path, url, f"download failed: {exc}")) from exc
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    raise FileNotFoundError(
        _missing_message(path, url, f"the download has sha256 {digest}, expected {sha256}; it was deleted")
    )


def _fetch_to(url: str, out: Any, timeout: float) -> str:
    """Stream `url` into `out` with a progress bar; returns the sha256 of what was written."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


# ---------------------------------------------------------------- loading


def load_squad(
    version: str,
    split: str,
    data_dir: Path | None = None,
    *,
    download: bool = True,
    limit: int | None = None,
) -> SquadDataset:
    """Load and validate a SQuAD file from the data directory (downloaded if missing)."""
    version, split = _check_version_split(version, split)
    path = squad_path(version, split, data_dir, download=download)
    return load_squad_file(path, version, limit, split=split)


def load_squad_file(
    path: Path,
    version: str | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
) -> SquadDataset:
    """Load and validate a SQuAD json file from an explicit path.

    `version` defaults to the file's own "version" field (or 2.0 when questions carry
    `is_impossible`); `split` defaults to "train" for files named train*, else "dev".
    `limit` keeps the first `limit` good questions in file order, and cuts `raw` to match.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    raw = _read_json(path)
    version = _resolve_version(raw, version, path)
    split = split or ("train" if path.name.startswith("train") else "dev")
    if split not in SPLITS:
        raise ValueError(f"unknown SQuAD split {split!r}; choose one of {SPLITS}")
    report = ValidationReport()
    examples = _parse_dataset(raw["data"], version, limit, report)
    if limit is not None:
        raw = _cut_raw(raw, report)
    if report.n_bad:
        log.warning("%s: %d bad question(s), e.g. %s", path.name, report.n_bad, report.problems[:3])
    return SquadDataset(version, split, path, raw, examples, report)


def _read_json(path: Path) -> dict:
    """Parse the file, turning every way it can fail to be SQuAD json into a clear ValueError."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}): {exc.reason}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: not a SQuAD file: expected an object with a 'data' list, found {found}")
    return raw


def _resolve_version(raw: dict, version: str | None, path: Path) -> str:
    """Requested version, checked against the one the file declares."""
    declared = raw.get("version")
    declared_norm = None
    if isinstance(declared, str):
        try:
            declared_norm = _normalize_version(declared)
        except ValueError:
            declared_norm = None
    if version is None:
        return declared_norm or ("2.0" if _has_is_impossible(raw["data"]) else "1.1")
    version = _normalize_version(version)
    if declared_norm is not None and declared_norm != version:
        raise ValueError(
            f"{path}: file declares SQuAD version {declared!r}, but version {version} was asked for"
        )
    return version


def _has_is_impossible(articles: list) -> bool:
    for article in articles[:1]:
        for paragraph in _get(article, "paragraphs", list, default=[])[:1]:
            for qa in _get(paragraph, "qas", list, default=[])[:1]:
                return isinstance(qa, dict) and "is_impossible" in qa
    return False


def _get(obj: Any, key: str, kind: type, default: Any = None) -> Any:
    """obj[key] if obj is a dict and the value has the right type, else `default`."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, kind) else default


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key] with the right type, else a _BadEntry naming the field."""
    if not isinstance(obj, dict):
        raise _BadEntry(f"{where}: expected an object, found {type(obj).__name__}")
    if key not in obj:
        raise _BadEntry(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadEntry(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


def _parse_dataset(
    articles: list, version: str, limit: int | None, report: ValidationReport
) -> list[SquadExample]:
    """Every good question of the file, in file order, until `limit` are kept."""
    examples: list[SquadExample] = []
    seen_ids: set[str] = set()
    for a_index, article in enumerate(articles):
        if limit is not None and len(examples) >= limit:
            break
        report.n_articles += 1
        try:
            title = _require(article, "title", str, f"article {a_index}")
            paragraphs = _require(article, "paragraphs", list, f"article {a_index} ({title!r})")
        except _BadEntry as exc:
            _drop_container(article, str(exc), report)
            continue
        for p_index, paragraph in enumerate(paragraphs):
            if limit is not None and len(examples) >= limit:
                break
            context_id = _get(paragraph, "context_id", str) or f"{title}#{p_index}"
            room = None if limit is None else limit - len(examples)
            examples.extend(_parse_paragraph(paragraph, title, context_id, version, room, seen_ids, report))
    report.n_unanswerable = sum(ex.is_impossible for ex in examples)
    return examples


def _drop_container(container: Any, message: str, report: ValidationReport) -> None:
    """A broken article or paragraph: all of its questions count as bad, under one message."""
    n = _count_questions(container)
    report.n_questions += n
    report.add_problem(f"{message} ({n} question(s) dropped)", n_questions=n)


def _count_questions(container: Any) -> int:
    if not isinstance(container, dict):
        return 0
    if isinstance(container.get("qas"), list):
        return len(container["qas"])
    return sum(_count_questions(p) for p in _get(container, "paragraphs", list, default=[]))


def _parse_paragraph(
    paragraph: Any,
    title: str,
    context_id: str,
    version: str,
    room: int | None,
    seen_ids: set[str],
    report: ValidationReport,
) -> list[SquadExample]:
    report.n_paragraphs += 1
    try:
        context = _require(paragraph, "context", str, f"paragraph {context_id!r}")
        qas = _require(paragraph, "qas", list, f"paragraph {context_id!r}")
    except _BadEntry as exc:
        _drop_container(paragraph, str(exc), report)
        return []
    out: list[SquadExample] = []
    for q_index, qa in enumerate(qas):
        if room is not None and len(out) >= room:
            break
        report.n_questions += 1
        where = f"qid {qa['id']}" if isinstance(qa, dict) and isinstance(qa.get("id"), str) else None
        where = where or f"question {q_index} of {context_id!r}"
        try:
            example = _parse_question(qa, title, context, context_id, version, where, seen_ids, report)
        except _BadEntry as exc:
            report.add_problem(str(exc))
            continue
        seen_ids.add(example.qas_id)
        out.append(example)
    return out


def _parse_question(
    qa: Any,
    title: str,
    context: str,
    context_id: str,
    version: str,
    where: str,
    seen_ids: set[str],
    report: ValidationReport,
) -> SquadExample:
    """One question; raises _BadEntry when it must be dropped, reports it when only fixed."""
    qas_id = _require(qa, "id", str, where)
    if qas_id in seen_ids:
        raise _BadEntry(f"{where}: duplicate question id, dropped")
    question = _require(qa, "question", str, where)
    raw_answers = _require(qa, "answers", list, where)
    if version == "2.0":
        is_impossible = _require(qa, "is_impossible", bool, where)
    else:
        is_impossible = bool(_get(qa, "is_impossible", bool, default=False))
        if is_impossible:
            raise _BadEntry(f"{where}: is_impossible=true in a SQuAD 1.1 file, dropped")
    if is_impossible:
        if raw_answers:
            report.add_problem(f"{where}: unanswerable question lists {len(raw_answers)} answer(s), ignored")
        answers: tuple[Answer, ...] = ()
    else:
        answers = _checked_answers(raw_answers, context, where, report)
    synthetic = bool(_get(qa, "synthetic", bool, default=False))
    return SquadExample(qas_id, question, context, answers, is_impossible, title, context_id, synthetic)


def _checked_answers(
    raw_answers: list, context: str, where: str, report: ValidationReport
) -> tuple[Answer, ...]:
    """Answers whose text is at their start; wrong starts fixed to the nearest occurrence."""
    if not raw_answers:
        raise _BadEntry(f"{where}: answerable question without answers, dropped")
    answers: list[Answer] = []
    notes: list[str] = []
    for i, raw in enumerate(raw_answers):
        try:
            answers.append(_checked_answer(raw, context, f"{where} answer {i}", notes))
        except _BadEntry as exc:
            notes.append(str(exc))
    if not answers:
        raise _BadEntry("; ".join(notes) + " -> question dropped")
    if notes:
        report.add_problem("; ".join(notes))
    return tuple(answers)


def _checked_answer(raw: Any, context: str, where: str, notes: list[str]) -> Answer:
    text = _require(raw, "text", str, where)
    start = raw.get("answer_start")
    if not text.strip():
        raise _BadEntry(f"{where}: empty answer text, dropped")
    valid_start = isinstance(start, int) and not isinstance(start, bool)
    if valid_start and context[start : start + len(text)] == text:
        return Answer(text, start)
    fixed = _nearest_occurrence(context, text, start if valid_start else 0)
    if fixed is None:
        raise _BadEntry(f"{where}: answer {_short(text)} not at {start!r} and not in the context, dropped")
    notes.append(f"{where}: answer {_short(text)} not at {start!r}, moved to {fixed}")
    return Answer(text, fixed)


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """Offset of the occurrence of `text` in `context` closest to `start`, or None."""
    best = None
    pos = context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def _short(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _cut_raw(raw: dict, report: ValidationReport) -> dict:
    """Copy of `raw` holding only the first report.n_questions questions (what was read)."""
    remaining = report.n_questions
    data = []
    for article in raw["data"]:
        if remaining <= 0:
            break
        cut_article = (
            {k: v for k, v in article.items() if k != "paragraphs"} if isinstance(article, dict) else {}
        )
        cut_article["paragraphs"] = []
        for paragraph in _get(article, "paragraphs", list, default=[]):
            if remaining <= 0:
                break
            qas = _get(paragraph, "qas", list, default=[])
            cut_paragraph = dict(paragraph) if isinstance(paragraph, dict) else {}
            cut_paragraph["qas"] = copy.deepcopy(qas[:remaining])
            remaining -= len(cut_paragraph["qas"])
            cut_article["paragraphs"].append(cut_paragraph)
        data.append(cut_article)
    return {**{k: v for k, v in raw.items() if k != "data"}, "data": data}


# ---------------------------------------------------------------- splits and made-up negatives


def split_by_article(
    examples: Sequence[SquadExample], held_out_fraction: float, seed: int = 0
) -> tuple[list[SquadExample], list[SquadExample]]:
    """(kept, held_out) split by article title, so no paragraph leaks between the parts.

    round(fraction * n_titles) titles are held out (at least one and not all, when
    0 < fraction < 1 and there are two titles or more). Example order is preserved.
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    titles = sorted({ex.title for ex in examples})
    n_held = round(held_out_fraction * len(titles))
    if 0.0 < held_out_fraction < 1.0 and len(titles) >= 2:
        n_held = min(max(n_held, 1), len(titles) - 1)
    random.Random(seed).shuffle(titles)
    held = set(titles[:n_held])
    kept = [ex for ex in examples if ex.title not in held]
    held_out = [ex for ex in examples if ex.title in held]
    return kept, held_out


def make_unanswerable(examples: Sequence[SquadExample], ratio: float, seed: int = 0) -> list[SquadExample]:
    """Made-up unanswerable examples: a question paired with another paragraph of its article.

    Returns only the new examples (add them to the training set yourself):
    round(ratio * n_answerable) of them, one at most per answerable question, so fewer
    (with a warning) when not enough questions qualify. The other paragraph never
    contains any of the question's answers (compared case-insensitively).
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    answerable = [i for i, ex in enumerate(examples) if not ex.is_impossible and ex.answers]
    target = round(ratio * len(answerable))
    paragraphs = _paragraphs_by_title(examples)
    rng = random.Random(seed)
    order = answerable.copy()
    rng.shuffle(order)
    made: list[tuple[int, SquadExample]] = []
    for i in order:
        if len(made) >= target:
            break
        negative = _negative_for(examples[i], paragraphs[examples[i].title], rng)
        if negative is not None:
            made.append((i, negative))
    if len(made) < target:
        log.warning("make_unanswerable: only %d of %d asked examples could be made", len(made), target)
    return [negative for _, negative in sorted(made, key=lambda pair: pair[0])]


def _paragraphs_by_title(examples: Iterable[SquadExample]) -> dict[str, list[tuple[str, str, str]]]:
    """title -> [(context_id, context, lower-cased context)], each paragraph once, in order."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    seen: set[str] = set()
    for ex in examples:
        if ex.context_id not in seen:
            seen.add(ex.context_id)
            out.setdefault(ex.title, []).append((ex.context_id, ex.context, ex.context.lower()))
    return out


def _negative_for(
    example: SquadExample, paragraphs: list[tuple[str, str, str]], rng: random.Random
) -> SquadExample | None:
    """The question with a random other paragraph of its article free of its answers, or None."""
    needles = [a.text.lower() for a in example.answers]
    others = [p for p in paragraphs if p[0] != example.context_id and p[1] != example.context]
    rng.shuffle(others)
    for context_id, context, lowered in others:
        if not any(needle in lowered for needle in needles):
            return SquadExample(
                qas_id=f"{example.qas_id}_neg",
                question=example.question,
                context=context,
                answers=(),
                is_impossible=True,
                title=example.title,
                context_id=context_id,
                synthetic=True,
            )
    return None


# ---------------------------------------------------------------- back to json


def examples_to_squad_json(examples: Iterable[SquadExample], version: str = "1.1") -> dict:
    """Official SQuAD json (grouped by title, then paragraph) for scoring or saving.

    Two optional extras keep a round trip through load_squad_file exact: a paragraph's
    "context_id" when it is not the default "<title>#<index>", and "synthetic": true.
    Official scorers ignore both.
    """
    version = _normalize_version(version)
    articles: dict[str, dict[str, dict]] = {}
    for ex in examples:
        if ex.is_impossible and version == "1.1":
            raise ValueError(f"qid {ex.qas_id}: unanswerable questions need version 2.0")
        paragraph = articles.setdefault(ex.title, {}).setdefault(
            ex.context_id, {"context_id": ex.context_id, "context": ex.context, "qas": []}
        )
        if paragraph["context"] != ex.context:
            raise ValueError(f"context_id {ex.context_id!r} is used for two different contexts")
        paragraph["qas"].append(_qa_json(ex, version))
    data = [
        {"title": title, "paragraphs": list(_paragraph_json(title, paragraphs.values()))}
        for title, paragraphs in articles.items()
    ]
    return {"version": "1.1" if version == "1.1" else "v2.0", "data": data}


def _paragraph_json(title: str, paragraphs: Iterable[dict]) -> Iterator[dict]:
    for index, paragraph in enumerate(paragraphs):
        out = {"context": paragraph["context"], "qas": paragraph["qas"]}
        if paragraph["context_id"] != f"{title}#{index}":
            out["context_id"] = paragraph["context_id"]
        yield out


def _qa_json(example: SquadExample, version: str) -> dict:
    qa: dict[str, Any] = {
        "question": example.question,
        "id": example.qas_id,
        "answers": [{"text": a.text, "answer_start": a.start} for a in example.answers],
    }
    if version == "2.0":
        qa["is_impossible"] = example.is_impossible
    if example.synthetic:
        qa["synthetic"] = True
    return qa
