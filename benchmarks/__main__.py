"""Run every benchmark, print the report as Markdown, and write it and the raw results.

The exit status is 0 whether the targets were met or not, and the report shows
which were. It is 1 when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.downtime import downtime_section, run_downtime_benchmark
from benchmarks.footprint import FootprintRun, measure_footprint
from benchmarks.machine import describe_machine
from benchmarks.micro import MicroRow, run_micro
from benchmarks.reclaim import reclaim_section, run_reclaim_benchmark
from benchmarks.report import (
    Verdict,
    footprint_section,
    footprint_verdict,
    micro_section,
    ratio_verdicts,
    stack_section,
    stack_verdicts,
    targets_section,
)
from benchmarks.subjects import build_subjects
from benchmarks.throughput import StackResult, run_stack_benchmark
from demo.stack import StackError

logger = logging.getLogger("benchmarks")

PARTS = ("footprint", "micro", "stack", "downtime", "reclaim")
#: Subjects whose RSS growth is measured; ``bare`` is the control.
FOOTPRINT_SUBJECTS = ("bare", "memory", "count-time", "all")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` lowers the defaults of the other options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Measure memwatch's cost per guarded call against its physical floor and "
            "karton-memory-watcher, its RSS growth, and a karton consumer's throughput "
            "with and without restarts, then print the results and the targets met."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds and tasks, about a minute (default: about 4 minutes on 2 cores)",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds of the cost-per-call benchmarks (default 15, quick 5)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="seconds per subject and round of the cost-per-call benchmarks "
        "(default 0.2, quick 0.05)",
    )
    parser.add_argument(
        "--footprint-calls",
        type=int,
        default=1_000_000,
        help="guarded calls per RSS-growth run (default 1000000)",
    )
    parser.add_argument(
        "--footprint-runs",
        type=int,
        help="runs of each subject in the RSS-growth benchmark (default 2, quick 1)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        help="tasks per consumer and round on the karton stack (default 1000, quick 300)",
    )
    parser.add_argument(
        "--restart-every",
        type=int,
        default=50,
        help="tasks after which the guarded consumer restarts (default 50)",
    )
    parser.add_argument(
        "--stack-rounds", type=int, help="rounds on the karton stack (default 3, quick 1)"
    )
    parser.add_argument(
        "--skip", action="append", choices=PARTS, default=[], help="leave out a part; repeatable"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-output"),
        help="folder for report.md, results.json and the karton logs (default bench-output/)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="log the stack's and the restart loop's steps and memwatch's start-up lines",
    )
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = {
        "rounds": 5 if quick else 15,
        "seconds": 0.05 if quick else 0.2,
        "footprint_runs": 1 if quick else 2,
        "tasks": 300 if quick else 1000,
        "stack_rounds": 1 if quick else 3,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("rounds", "footprint_calls", "footprint_runs", "stack_rounds", "restart_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    if args.tasks < 2:
        parser.error(f"--tasks must be 2 or more, got {args.tasks}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be more than 0, got {args.seconds}")
    return args


def configure_logging(verbose: bool) -> None:
    """Log progress to standard error; the stack's steps and memwatch's only with ``verbose``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not verbose:
        for name in ("demo", "karton", "memwatch"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> str:
    """Run the parts not skipped and return the report."""
    machine = describe_machine()
    subjects = build_subjects()
    labels = {key: subject.label for key, subject in subjects.items()}
    report = ["# memwatch benchmarks", "", f"Machine: {machine.describe()}.", ""]
    verdicts: list[Verdict] = []
    results: dict[str, object] = {"machine": dataclasses.asdict(machine)}

    footprint: dict[str, list[FootprintRun]] = {}
    if "footprint" not in args.skip:
        logger.info("RSS growth: %d calls per run", args.footprint_calls)
        footprint = measure_footprint(FOOTPRINT_SUBJECTS, args.footprint_calls, args.footprint_runs)
        results["footprint"] = {k: [dataclasses.asdict(r) for r in v] for k, v in footprint.items()}

    micro: dict[str, MicroRow] = {}
    if "micro" not in args.skip:
        logger.info("cost per call: %d rounds of %.2f s per subject", args.rounds, args.seconds)
        micro = run_micro(subjects, args.rounds, args.seconds)
        results["micro"] = {key: dataclasses.asdict(row) for key, row in micro.items()}
        report += micro_section(micro, args.rounds)
        verdicts += ratio_verdicts(micro)
    if footprint:
        report += footprint_section(footprint, labels)
        verdicts.append(footprint_verdict(footprint))

    stack: StackResult | None = None
    if "stack" not in args.skip:
        logger.info("karton stack: %d tasks, %d rounds", args.tasks, args.stack_rounds)
        stack = run_stack_benchmark(
            args.output.resolve() / "karton",
            tasks=args.tasks,
            restart_every=args.restart_every,
            rounds=args.stack_rounds,
        )
        results["stack"] = dataclasses.asdict(stack)
        report += stack_section(stack)
        verdicts += stack_verdicts(stack)

    if "downtime" not in args.skip:
        restarts = 3 if args.quick else 8
        logger.info("restart downtime: %d restarts each way", restarts)
        downtime = run_downtime_benchmark(args.output.resolve() / "downtime", restarts)
        results["downtime"] = dataclasses.asdict(downtime)
        report += downtime_section(downtime)

    if "reclaim" not in args.skip:
        logger.info("reclaim budget: a worker whose every task trips")
        reclaim = run_reclaim_benchmark(5.0 if args.quick else 30.0)
        results["reclaim"] = dataclasses.asdict(reclaim)
        report += reclaim_section(reclaim)
        verdicts.append(
            Verdict(
                "reclaiming takes at most 1 % of a worker's time",
                f"{reclaim.share:.2%}",
                "met" if reclaim.share <= 0.01 else "missed",
            )
        )

    report += targets_section(verdicts)
    report.append(f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    text = "\n".join(report)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "report.md").write_text(text, encoding="utf-8")
    (args.output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and print the report; return the exit status."""
    args = parse_args(argv)
    configure_logging(args.verbose)
    started = time.monotonic()
    try:
        text = run(args)
    except (StackError, TimeoutError, RuntimeError, OSError) as error:
        logger.error("benchmark failed: %s", error)
        return 1
    print(text)
    logger.info(
        "done in %.0f s; report and raw results in %s",
        time.monotonic() - started,
        args.output.resolve(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
