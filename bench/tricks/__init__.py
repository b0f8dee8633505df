"""The trick catalogue: one module per trick, each a small registered class (bench.tricks.spec
is the contract: the hooks a trick may implement, and the registry).

Layer 8. Importing this package registers every trick in ``TRICKS``; nothing here knows the
matrix, the runner or the reports.

May import: parts, store, base.
"""
# Registration happens on import; the order here is the order hooks run in, which matters where
# two tricks use the same hook:
# - prepare_model: channels_last converts the weights before world_size's DDP wrapper builds its
#   gradient buckets from the parameters' strides; the model's structure (attention, residual
#   blocks) changes before checkpointing wraps its blocks and before DDP; compile comes last, as
#   it wraps whatever the others made of the model;
# - transform_batch: resize before mixing (CutMix's box area is then exact at the trained size);
#   both keep a channels_last batch channels_last (checked);
# - process_gradients: clip before centralizing (centralizing only lowers the norm);
# - wrap_step: precision's GradScaler innermost, SAM around it.
# isort: off
from bench.tricks import (  # noqa: F401 - imported to register
    channels_last,
    attention,
    residual,
    inplace_activations,
    accumulation,
    checkpointing,
    precision,
    sam,
    ema,
    world_size,
    label_smoothing,
    progressive_resizing,
    mixing,
    input_grad_penalty,
    grad_clip,
    grad_centralization,
    lookahead,
    no_decay_bn_bias,
    optimizer_impl,
    zero_grad,
    cudnn_benchmark,
    augment,
    torch_compile,
)
# isort: on
from bench.tricks.spec import TRICKS, register  # noqa: F401 - the registry, filled below
