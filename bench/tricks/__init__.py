"""Registered tricks. Importing this package registers every trick in ``TRICKS``."""
from bench.registry import Registry
from bench.spec import Trick

TRICKS: Registry[type[Trick]] = Registry("trick")


def register(cls: type[Trick]) -> type[Trick]:
    """Class decorator: register a Trick under its ``name``."""
    return TRICKS.register(cls.name, cls.description)(cls)


# Registration happens on import; the order here is the order hooks run in.
# channels_last first: its prepare_model must convert the weights before world_size's DDP wrapper
# builds its gradient buckets with the parameters' strides.
from bench.tricks import channels_last  # noqa: E402,F401
from bench.tricks import (  # noqa: E402,F401
    accumulation,
    checkpointing,
    precision,
    sam,
    ema,
    world_size,
)
from bench.tricks import inplace_activations, optimizer_impl, zero_grad, cudnn_benchmark  # noqa: E402,F401
# compile must stay the LAST import: its prepare_model wraps what every other trick made of the model.
from bench.tricks import torch_compile  # noqa: E402,F401
