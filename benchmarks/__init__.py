"""buttress benchmark suite.

Run it from the repository root::

    python -m benchmarks              # full run, prints the tables
    python -m benchmarks --quick      # short run; non-zero exit on a 2x regression
    python -m benchmarks --write-docs # full run, then regenerate docs/benchmarks.md

Modules:

- ``_harness``: the timing loop (sync and async), calibration, medians.
- ``overhead``: the candidates (buttress, hand-written floors, peer libraries) per group.
- ``accuracy``: rate-limiter admissions against the GCRA bound, real time.
- ``fairness``: many async tasks sharing one limiter (Jain's index, max wait).
- ``memory``: per-key limiter memory and the sweeping of idle keys.
- ``report``: console tables and the Markdown page.
"""
