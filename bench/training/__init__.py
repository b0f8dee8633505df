"""Layer 6, one run: the training loop that composes the tricks, its measurements (time,
memory, FLOPs, profiling), the worker process that runs one job file and writes its row, and
the feasibility checks that build a cell on the meta device before anything runs.

May import: config, tricks, parts, store, base.
"""
