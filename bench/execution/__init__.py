"""Layer 5, running many: the matrix runner (resume, one child process per run, placement on
devices), the cluster path (submitit arrays, collect, status) and the machine fingerprint.

May import: training, config, tricks, parts, store, base.
"""
