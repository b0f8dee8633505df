"""Layer 4, reports ("regenerate reports"): markdown tables, the wording of what moved beyond
seed noise, and figures, rebuilt from stored rows alone (never by training).

stats.py: per-cell statistics; tables.py: markdown; wording.py: calls and findings;
figures.py: seaborn figures; report.py: reading a results folder and writing report.md.

May import: execution (the machine fingerprint), training, config, tricks, parts, store, base.
"""
