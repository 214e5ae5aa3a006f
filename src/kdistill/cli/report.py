"""``kdistill report RUN_DIR [RUN_DIR ...] [--out FILE]``: a self-contained HTML report of runs."""

from __future__ import annotations

import argparse
import json
from kdistill.outputs.html import write_report


def _report(args: argparse.Namespace) -> int:

    path = write_report(args.run_dirs, args.out)
    print(json.dumps({"report": str(path), "runs": len(args.run_dirs)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page (tables, curves, plots) for run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by train/distill/run --out")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)")
    p.set_defaults(func=_report)
