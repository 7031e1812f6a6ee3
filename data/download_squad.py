"""Fetch and verify the SQuAD json files (v1.1 and v2.0, train and dev).

    python data/download_squad.py                 # all four files, downloading what is missing
    python data/download_squad.py --no-download   # only check what is there
    python data/download_squad.py --files dev-v1.1 dev-v2.0 --data-dir /some/dir

Files are looked up where the project reads them (``$ELMA_DATA_DIR``, else
``../shared/data/squad``, else ``data/squad``). A missing file is downloaded from the
official SQuAD site and kept only if its sha256 matches the published one. Every file is
then loaded and validated; the line printed for it says whether it is byte-identical to the
official file (a local rebuilt copy is trusted, but reported as such). Exit status 1 when a
file is missing or does not load.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from elma_utils.squad.data import SQUAD_SHA256, load_squad_file, squad_path

FILES = {
    "train-v1.1": ("1.1", "train"),
    "dev-v1.1": ("1.1", "dev"),
    "train-v2.0": ("2.0", "train"),
    "dev-v2.0": ("2.0", "dev"),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check(name: str, data_dir: Path | None, download: bool) -> bool:
    version, split = FILES[name]
    try:
        path = squad_path(version, split, data_dir, download=download)
        dataset = load_squad_file(path, version, split=split)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{name}: MISSING OR BAD: {exc}")
        return False
    digest = sha256_of(path)
    official = SQUAD_SHA256.get((version, split))
    origin = (
        "official file (sha256 matches)" if digest == official else "not byte-identical to the official file"
    )
    report = dataset.report
    print(
        f"{name}: ok, {path} | sha256 {digest[:16]}… {origin} | {report.n_questions} questions, "
        f"{report.n_unanswerable} unanswerable, {report.n_bad} flagged"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", choices=sorted(FILES), default=list(FILES), help="which files")
    parser.add_argument("--data-dir", type=Path, default=None, help="directory holding the json files")
    parser.add_argument("--no-download", action="store_true", help="only check the files already there")
    args = parser.parse_args(argv)
    ok = [check(name, args.data_dir, not args.no_download) for name in args.files]
    print(f"{sum(ok)} of {len(ok)} SQuAD files ready")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
