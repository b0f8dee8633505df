"""Registered tricks. Importing this package registers every trick in ``TRICKS``."""
from bench.base.registry import Registry
from bench.tricks.spec import Trick

TRICKS: Registry[type[Trick]] = Registry("trick")


def register(cls: type[Trick]) -> type[Trick]:
    """Class decorator: register a Trick under its ``name``."""
    return TRICKS.register(cls.name, cls.description)(cls)


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
from bench.tricks import (  # noqa: E402,F401
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
