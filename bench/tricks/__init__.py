"""Registered tricks. Importing this package registers every trick in ``TRICKS``."""
from bench.registry import Registry
from bench.spec import Trick

TRICKS: Registry[type[Trick]] = Registry("trick")


def register(cls: type[Trick]) -> type[Trick]:
    """Class decorator: register a Trick under its ``name``."""
    return TRICKS.register(cls.name, cls.description)(cls)


# Registration happens on import; the order here is the order hooks run in, which matters where
# two tricks use the same hook:
# - prepare_model: change the model's structure (attention, residual blocks) before checkpointing
#   wraps its blocks and before the DDP wrapper in world_size;
# - transform_batch: resize before mixing (CutMix's box area is then exact at the trained size);
# - process_gradients: clip before centralizing (centralizing only lowers the norm);
# - wrap_step: precision's GradScaler innermost, SAM around it.
from bench.tricks import (  # noqa: E402,F401
    attention,
    residual,
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
    augment,
)
