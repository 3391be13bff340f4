"""Benchmarks of memwatch: cost per guarded call, memory footprint, karton throughput.

Run ``python -m benchmarks`` (or ``nox -s bench``); ``--help`` lists the options.
"""
