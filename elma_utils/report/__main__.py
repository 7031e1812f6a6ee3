"""``python -m elma_utils.report [--profile NAME] [--check]``: rewrite REPORT.md (and, for the
committed cpu results in reports/, the README's results block) from the metrics files.

``--check`` writes nothing and exits 1 when the README's block differs from what the committed
metrics give (what tests/test_report_readme.py checks in CI)."""

from __future__ import annotations

import argparse
import sys

from elma_utils import config, reporting
from elma_utils.report import headline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elma_utils.report", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=config.DEFAULT_PROFILE)
    p.add_argument("--check", action="store_true", help="only check the README block; exit 1 when stale")
    args = p.parse_args(argv)
    if args.check:
        readme = (config.PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
        block = headline.readme_block(reporting.load_all_metrics(config.PROJECT_ROOT / "reports"))
        if headline.replace_readme_block(readme, block) != readme:
            print("README.md's results block is stale: run `python -m elma_utils.report`", file=sys.stderr)
            return 1
        return 0
    print(reporting.write_report(config.reports_dir_for(args.profile), profile=args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
