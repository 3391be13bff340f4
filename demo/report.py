"""The demo's summary text and its chart of RSS per task across worker generations."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from karton.core.task import TaskState
from matplotlib.figure import Figure

from demo.pipeline import count_lost
from demo.supervisor import Generation

MIB = 1024 * 1024


@dataclass(frozen=True)
class RssRecord:
    """One line of the consumer's RSS log: the RSS right after one task."""

    pid: int
    task_uid: str
    rss: int
    time: float
    raised: bool


def read_rss_log(path: Path) -> list[RssRecord]:
    """Read the JSON lines written by :mod:`demo.leaky_consumer`, oldest first.

    A missing file means that no task was processed and gives an empty list.
    """
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as rss_file:
        for line in rss_file:
            fields = json.loads(line)
            records.append(
                RssRecord(
                    int(fields["pid"]),
                    str(fields["task_uid"]),
                    int(fields["rss"]),
                    float(fields["time"]),
                    bool(fields.get("raised", False)),
                )
            )
    records.sort(key=lambda record: record.time)
    return records


def describe_ending(generation: Generation, stopped_by_demo: bool) -> str:
    """Return how a worker generation ended, as a phrase."""
    if generation.exit_code is None:
        return "still running"
    decision = generation.decision
    if decision is not None:
        text = f"rule {decision.rule} tripped, exit code {generation.exit_code}"
        if decision.exit_code != generation.exit_code:
            text += f" (WARNING: memwatch announced exit code {decision.exit_code})"
        return text
    if stopped_by_demo:
        return f"stopped by the demo, exit status {generation.exit_code}"
    return (
        f"exited with status {generation.exit_code} without a memwatch decision; "
        f"see {generation.log_path}"
    )


def format_summary(
    sent: int,
    states: Counter[TaskState],
    generations: Sequence[Generation],
    records: Sequence[RssRecord],
) -> str:
    """Return the demo's summary: task counts, then one line per worker generation."""
    tasks_by_pid = Counter(record.pid for record in records)
    lines = [
        f"tasks sent:     {sent}",
        f"Finished:       {states[TaskState.FINISHED]}",
        f"Crashed:        {states[TaskState.CRASHED]}",
        f"lost:           {count_lost(sent, states)}",
        f"restarts:       {max(len(generations) - 1, 0)}",
    ]
    for position, generation in enumerate(generations):
        ending = describe_ending(generation, stopped_by_demo=position == len(generations) - 1)
        lines.append(
            f"  generation {generation.number} (pid {generation.pid}, "
            f"{tasks_by_pid[generation.pid]} tasks): {ending}"
        )
    return "\n".join(lines)


def plot_rss(
    records: Sequence[RssRecord],
    generations: Sequence[Generation],
    path: Path,
    title: str,
) -> Path:
    """Draw the RSS after each task, one colour per worker generation, to a PNG file.

    A dashed vertical line marks each restart, labelled with the rule that
    tripped, and a black cross marks each task that raised.

    :param records: RSS records in processing order
    :return: ``path``
    """
    figure = Figure(figsize=(11, 5), layout="constrained")
    axes = figure.subplots()
    decisions = {generation.pid: generation.decision for generation in generations}
    numbers = {generation.pid: generation.number for generation in generations}

    # Group consecutive records of one process into one generation's line.
    segments: list[tuple[int, list[int], list[float]]] = []
    for task_number, record in enumerate(records, start=1):
        if not segments or segments[-1][0] != record.pid:
            segments.append((record.pid, [], []))
        segments[-1][1].append(task_number)
        segments[-1][2].append(record.rss / MIB)

    for position, (pid, task_numbers, rss_mib) in enumerate(segments):
        axes.plot(
            task_numbers,
            rss_mib,
            marker=".",
            linewidth=1,
            label=f"generation {numbers.get(pid, '?')} (pid {pid})",
        )
        decision = decisions.get(pid)
        if decision is None or position == len(segments) - 1:
            continue
        restart_x = task_numbers[-1] + 0.5
        axes.axvline(restart_x, color="grey", linestyle="--", linewidth=1)
        # Below the end of the old generation's line and left of the start
        # of the new one, the plot is empty.
        axes.annotate(
            f"{decision.rule}, exit {decision.exit_code}",
            xy=(restart_x, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            verticalalignment="bottom",
            horizontalalignment="right",
            fontsize=8,
            color="grey",
        )

    crashed = [
        (task_number, record.rss / MIB)
        for task_number, record in enumerate(records, start=1)
        if record.raised
    ]
    if crashed:
        axes.scatter(
            [task_number for task_number, _ in crashed],
            [rss_mib for _, rss_mib in crashed],
            marker="x",
            color="black",
            zorder=3,
            label="task raised (Crashed)",
        )

    axes.set_xlabel("task, in processing order")
    axes.set_ylabel("RSS after the task (MiB)")
    axes.set_title(title, fontsize=11)
    if len(segments) <= 20:
        figure.legend(fontsize=8, loc="outside right upper")
    axes.grid(visible=True, alpha=0.3)
    figure.savefig(path, dpi=100)
    return path
