"""``kdistill run NAME --profile P``: one of the paper experiments (:mod:`kdistill.experiments`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdistill import experiments


def _run(args: argparse.Namespace) -> int:

    if args.list or not args.experiment:
        for name, desc in experiments.describe():
            print(f"{name:18s} {desc}")
        return 0
    results = experiments.run_experiment(args.experiment, args.profile, args.out, args.set, args.data_path,
                                         progress=not args.no_progress, resume=args.resume)
    out = Path(args.out or f"runs/{args.experiment}-{args.profile}")
    print((out / "results.md").read_text())
    print(f"wall time: {results['wall_time_s']:.1f} s; results in {out}/results.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a named experiment (see --list)")
    p.add_argument("experiment", nargs="?")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--profile", default="quick")
    p.add_argument("--out")
    p.add_argument("--data-path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out that stopped part-way (same profile and --set values); models "
                        "it finished are kept (cifar10-kd, cifar100-kd, cifar10-mini)")
    p.set_defaults(func=_run)
