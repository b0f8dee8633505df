"""Layer 3, the regression check ("regression-check in CI"): compare two sides (results folders,
baseline JSON, pytest-benchmark JSON) by tiers (exact, timing, accuracy, instructions);
record and update baselines; A/B against a git revision; the A/A and power studies.

cells.py: what a side knows per cell; sides.py: reading a side; compare.py: the rules and
their output; baseline.py: ``check`` and ``baseline``; ab.py: ``compare --against``;
history.py and history_show.py: the performance history across commits; bisect.py: the first
commit that moved a metric, decided by the same rules.

May import: reports, execution, training, config, tricks, parts, store, base.
"""
