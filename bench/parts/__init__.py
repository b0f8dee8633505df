"""Layer 9, parts of a run: models, datasets, learning-rate schedules, BatchNorm helpers,
distributed (DDP) helpers, FLOP formulas torch lacks, the step clock, and the lifeline that
keeps a child from outliving its parent.

May import: store, base.
"""
