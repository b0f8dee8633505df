"""Layer 2, diagnostics: look inside one cell or check a machine (``diagnose``, LR range test,
layer statistics, ``attention-memory``, ``selfcheck``).

May import: regression, reports, execution, training, config, tricks, parts, store, base.
"""
