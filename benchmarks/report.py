"""The report: Markdown tables of the results and, for each target, whether it was met."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmarks.footprint import WARM_UP_CALLS, FootprintRun
from benchmarks.micro import MicroRow
from benchmarks.stats import summarize
from benchmarks.throughput import VARIANTS, ConsumerRun, StackResult

KIB = 1024
MIB = 1024 * 1024

#: The targets on the cost per call: subject, upper or lower bound on its ratio, wording.
RATIO_TARGETS = (
    (
        "memory",
        "at most",
        1.25,
        "memwatch extra_mb guard: overhead <= 1.25 x (wrapt no-op + pread)",
    ),
    ("kmw-hooks", "at least", 12.0, "karton-memory-watcher hook pair >= 12 x memwatch extra_mb"),
    ("count-time", "at most", 1.3, "memwatch count/time guard: overhead <= 1.3 x wrapt no-op"),
)
#: RSS growth over the footprint run that the target allows, in bytes.
FOOTPRINT_LIMIT = MIB
#: The target's minimum of guarded throughput divided by unguarded throughput.
THROUGHPUT_TARGET = 0.8


@dataclass(frozen=True)
class Verdict:
    """One target, the number measured for it, and ``met``, ``missed`` or ``not measured``."""

    target: str
    measured: str
    result: str


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def micro_section(rows: Mapping[str, MicroRow], rounds: int) -> list[str]:
    """Return the table of the cost per call."""
    lines = [
        "## Cost per call",
        "",
        (
            f"{rounds} interleaved rounds. Overhead: µs per call minus the bare call of the same "
            "kind (function, method or `await`) in the same round. Ratio: overhead divided by "
            "the reference's overhead in the same round; median and range over the rounds."
        ),
        "",
    ]
    table = []
    for row in rows.values():
        ratio = row.ratio
        table.append(
            [
                row.label,
                f"{row.calls:,}",
                f"{row.per_call.median:.3f}",
                f"{row.per_call.q1:.3f}-{row.per_call.q3:.3f}",
                "-" if row.overhead is None else f"{row.overhead.median:.3f}",
                "-" if ratio is None else f"{ratio.median:.2f}",
                "-" if ratio is None else ratio.spread(),
                "-" if row.reference is None else rows[row.reference].label,
            ]
        )
    header = [
        "subject",
        "calls/round",
        "µs/call median",
        "µs/call IQR",
        "overhead µs",
        "ratio",
        "ratio range",
        "reference",
    ]
    return [*lines, *_table(header, table), ""]


def footprint_section(
    runs: Mapping[str, Sequence[FootprintRun]], labels: Mapping[str, str]
) -> list[str]:
    """Return the table of RSS growth."""
    lines = [
        "## RSS growth",
        "",
        (
            f"Each run is a fresh interpreter: {WARM_UP_CALLS:,} warm-up calls, then the calls "
            "below. Growth: the RSS after the calls minus the RSS before them. Peak: the largest "
            "growth seen after any tenth of the calls."
        ),
        "",
    ]
    table = []
    for key, key_runs in runs.items():
        table.append(
            [
                labels.get(key, key),
                f"{key_runs[0].calls:,}" if key_runs else "-",
                ", ".join(f"{run.final / KIB:.0f}" for run in key_runs),
                f"{max(run.peak for run in key_runs) / KIB:.0f}" if key_runs else "-",
            ]
        )
    header = ["subject", "calls", "growth KiB (each run)", "max peak KiB"]
    return [*lines, *_table(header, table), ""]


def stack_section(result: StackResult) -> list[str]:
    """Return the karton stack's tables: throughput, restarts, losses and start-up costs."""
    lines = [
        "## karton stack",
        "",
        (
            f"{result.tasks:,} tasks per consumer and round, {len(result.rounds)} round(s). The "
            f"guarded consumer exits after every {result.restart_every} tasks. Tasks per second: "
            "from the end of the first task to the end of the last. Busy: the same with the "
            "restart gaps left out. Restart gap: from the last task of one worker process to "
            "the first task of the next."
        ),
        "",
    ]
    table = [
        _stack_row(variant, [stack_round.runs[variant] for stack_round in result.rounds])
        for variant in VARIANTS
    ]
    header = [
        "consumer",
        "tasks/s median",
        "tasks/s range",
        "busy tasks/s",
        "restarts",
        "restart gap s median (range)",
        "lost",
        "final states",
    ]
    lines += [*_table(header, table), ""]

    ratios = summarize([stack_round.ratio for stack_round in result.rounds])
    lines.append(f"Guarded / unguarded throughput: {ratios.median:.2f} (range {ratios.spread()}).")
    lines += _break_even(result)
    lines.append("")

    lines.append("What a restart pays for (seconds from a new interpreter's start to its exit):")
    lines.append("")
    steps = [
        [step, f"{summary.median:.3f}", summary.spread(3)]
        for step, summary in result.start_up.items()
    ]
    lines += [*_table(["step", "median s", "range s"], steps), ""]
    return lines


def _stack_row(variant: str, runs: Sequence[ConsumerRun]) -> list[str]:
    rates = summarize([run.tasks_per_second for run in runs])
    busy = summarize([run.busy_tasks_per_second for run in runs])
    gaps = [gap for run in runs for gap in run.gaps]
    states: Counter[str] = Counter()
    for run in runs:
        states.update(run.states)
    return [
        variant,
        f"{rates.median:.1f}",
        rates.spread(1),
        f"{busy.median:.1f}",
        str(sum(run.restarts for run in runs)),
        "-" if not gaps else f"{summarize(gaps).median:.3f} ({summarize(gaps).spread(3)})",
        str(sum(run.lost for run in runs)),
        ", ".join(f"{state} {count}" for state, count in sorted(states.items())),
    ]


def _break_even(result: StackResult) -> list[str]:
    # With N tasks of t seconds between restarts that leave the queue unserved for
    # g seconds, the ratio is N*t / (N*t + g), which is at least 0.8 when t >= 4*g/N.
    gaps = [gap for stack_round in result.rounds for gap in stack_round.runs["guarded"].gaps]
    if not gaps:
        return []
    gap = summarize(gaps).median
    rate = summarize([r.runs["unguarded"].tasks_per_second for r in result.rounds]).median
    factor = THROUGHPUT_TARGET / (1 - THROUGHPUT_TARGET)
    needed = factor * gap / result.restart_every
    return [
        f"A restart leaves the queue unserved {gap:.3f} s (median gap). At one restart per "
        f"{result.restart_every} tasks the guarded consumer keeps {THROUGHPUT_TARGET:.0%} of the "
        f"throughput once a task takes at least {needed * 1000:.0f} ms (estimate from the median "
        f"gap); the unguarded consumer's task takes {1000 / rate:.1f} ms here."
    ]


def ratio_verdicts(rows: Mapping[str, MicroRow]) -> list[Verdict]:
    """Judge the targets on the cost per call by the median ratio over the rounds."""
    verdicts = []
    for key, bound, limit, text in RATIO_TARGETS:
        row = rows.get(key)
        if row is None or row.ratio is None:
            verdicts.append(Verdict(text, "-", "not measured"))
            continue
        inside = [
            ratio
            for ratio in row.ratios
            if (ratio <= limit if bound == "at most" else ratio >= limit)
        ]
        met = row.ratio.median <= limit if bound == "at most" else row.ratio.median >= limit
        measured = (
            f"{row.ratio.median:.2f} x (range {row.ratio.spread()}; "
            f"{len(inside)} of {len(row.ratios)} rounds within)"
        )
        verdicts.append(Verdict(text, measured, "met" if met else "missed"))
    return verdicts


def footprint_verdict(runs: Mapping[str, Sequence[FootprintRun]]) -> Verdict:
    """Judge the RSS growth target on every guarded subject's largest growth."""
    guarded = [run for key, key_runs in runs.items() if key != "bare" for run in key_runs]
    calls = {run.calls for run in guarded}
    text = "RSS growth < 1 MiB over 1,000,000 guarded calls"
    if not guarded:
        return Verdict(text, "-", "not measured")
    largest = max(max(run.final, run.peak) for run in guarded)
    measured = (
        f"largest growth {largest / KIB:.0f} KiB over {len(guarded)} runs of "
        f"{', '.join(f'{count:,}' for count in sorted(calls))} calls"
    )
    if calls != {1_000_000}:
        return Verdict(text, measured, "not measured (other call count)")
    return Verdict(text, measured, "met" if largest < FOOTPRINT_LIMIT else "missed")


def stack_verdicts(result: StackResult | None) -> list[Verdict]:
    """Judge the karton stack's targets: no task lost, and the throughput ratio."""
    lost_text = "karton stack: 0 tasks lost"
    ratio_text = f"karton stack: guarded throughput >= {THROUGHPUT_TARGET:.0%} of unguarded"
    if result is None or not result.rounds:
        return [
            Verdict(lost_text, "-", "not measured"),
            Verdict(ratio_text, "-", "not measured"),
        ]
    runs = [run for stack_round in result.rounds for run in stack_round.runs.values()]
    lost = sum(run.lost for run in runs)
    sent = sum(run.sent for run in runs)
    ratios = summarize([stack_round.ratio for stack_round in result.rounds])
    return [
        Verdict(lost_text, f"{lost} of {sent} lost", "met" if lost == 0 else "missed"),
        Verdict(
            ratio_text,
            f"{ratios.median:.0%} (range {ratios.minimum:.0%}-{ratios.maximum:.0%}), "
            f"one restart per {result.restart_every} tasks",
            "met" if ratios.median >= THROUGHPUT_TARGET else "missed",
        ),
    ]


def targets_section(verdicts: Sequence[Verdict]) -> list[str]:
    """Return the table of targets."""
    rows = [[verdict.target, verdict.measured, verdict.result] for verdict in verdicts]
    return ["## Targets", "", *_table(["target", "measured", "result"], rows), ""]
