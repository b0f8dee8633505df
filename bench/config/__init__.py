"""Layer 7, declaring a matrix: YAML → validated, frozen config objects, at the boundary.

matrix.py: the matrix language (profiles, axes, designs, excludes, seeds → cells);
train_config.py: one run's typed config and the checks of its values; slurm.py: the ``slurm:``
section. Every refusal is a ConfigError naming file, key and what is allowed.

May import: tricks (to parse trick values), parts (model, dataset and schedule names), store, base.
"""
