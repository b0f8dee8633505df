"""trickbench: measure what deep-learning training tricks cost and buy on your model and hardware.

The package is built in layers; each imports only the layers below it (the import-linter
contract in pyproject.toml, checked by tests/test_architecture.py). Top to bottom:

    cli          the command line (trickbench, python -m bench)
    diagnostics  look inside one cell, check a machine
    regression   the regression check: compare, baseline, check, A/B, A/A, power
    reports      report.md and figures from stored rows
    execution    running many: the matrix runner, cluster arrays, the machine
    training     one run: the loop, its measurements, the worker process, feasibility
    config       declaring a matrix: YAML → validated config objects
    tricks       the trick catalogue and its contract (tricks/spec.py)
    parts        models, data, schedules, distributed helpers, the step clock
    store        result rows and output paths
    base         registries, safe YAML, the user-error type

docs/architecture.md walks one run through them.
"""
__version__ = "0.1.0"
