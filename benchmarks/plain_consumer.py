"""The demo's consumer without memwatch: the reference for karton throughput.

It does exactly what ``python -m demo.leaky_consumer`` does per task (download
the sample, leak ``--leak-kib``, append one JSON line with the RSS to
``--rss-log``), with no guard on ``process``. Run it with the karton settings in
the environment, as the restart loop does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from demo.leaky_consumer import LeakyConsumer


def command_line(python: str, identity: str, rss_log: Path) -> list[str]:
    """Return the command line that runs this consumer with interpreter ``python``."""
    return [
        python,
        "-m",
        "benchmarks.plain_consumer",
        f"--identity={identity}",
        f"--rss-log={rss_log}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the unguarded consumer's loop until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plain_consumer",
        description="Run the demo's karton consumer with no memwatch guard.",
    )
    parser.add_argument("--identity", required=True, help="karton identity")
    parser.add_argument(
        "--rss-log",
        type=Path,
        required=True,
        help="file to which one JSON line per task is appended",
    )
    parser.add_argument(
        "--leak-kib", type=int, default=0, help="memory leaked per task, in KiB (default 0)"
    )
    args = parser.parse_args(argv)
    if args.leak_kib < 0:
        parser.error(f"--leak-kib must be 0 or more, got {args.leak_kib}")
    LeakyConsumer(args.identity, args.leak_kib, args.rss_log).loop()


if __name__ == "__main__":
    main()
