"""Reference models, registered by name, plus every torchvision classification model."""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from bench.base.registry import Registry
from bench.base.safeyaml import shorten

VIT_TINY_PATCH = 4

# (num_classes, image_size) -> model; the input's side length matters only to models with a
# fixed sequence length (ViT's position embeddings), the others accept any size.
MODELS: Registry[Callable[[int, int], nn.Module]] = Registry("model")


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@MODELS.register("tiny_cnn", "3-stage BatchNorm CNN (73k params): an epoch of digits in seconds on CPU")
def tiny_cnn(num_classes: int, image_size: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Sequential(  # the stages, so checkpointing finds three blocks
            nn.Sequential(conv_bn_relu(3, 16), conv_bn_relu(16, 16)),
            nn.Sequential(conv_bn_relu(16, 32, stride=2), conv_bn_relu(32, 32)),
            nn.Sequential(conv_bn_relu(32, 64, stride=2), conv_bn_relu(64, 64)),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


@MODELS.register("resnet18_cifar", "ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs")
def resnet18_cifar(num_classes: int, image_size: int = 32) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    # At 32x32 the ImageNet stem (7x7 stride 2 + max-pool) would throw away 15/16 of the pixels.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@MODELS.register("vit_tiny", "torchvision VisionTransformer, patch 4, 4 layers, width 128, 4 heads (0.5M params)")
def vit_tiny(num_classes: int, image_size: int = 32) -> nn.Module:
    """A small ViT for 32x32 inputs: (image_size / 4)^2 patch tokens plus the class token.

    The attention reference model: its encoder blocks call ``nn.MultiheadAttention``, which the
    ``attention`` trick replaces. Any ``image_size`` divisible by the patch size works.
    """
    return VisionTransformer(image_size=image_size, patch_size=VIT_TINY_PATCH, num_layers=4, num_heads=4,
                             hidden_dim=128, mlp_dim=256, num_classes=num_classes)


def torchvision_names() -> list[str]:
    """Torchvision's classification models (the top-level ``torchvision.models`` namespace)."""
    return torchvision.models.list_models(module=torchvision.models)


def model_names() -> list[str]:
    return MODELS.names() + torchvision_names()


def build_model(name: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A freshly initialised model: a registered reference model or a torchvision one by name.

    ``image_size`` (the side of the square input) reaches the registered models; None = their
    default (32). Torchvision's models are built with their own defaults.
    """
    if name in MODELS:
        return MODELS.get(name)(num_classes, **({} if image_size is None else {"image_size": image_size}))
    if name in torchvision_names():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise KeyError(name)


@functools.lru_cache(maxsize=256)
def meta_forward_problem(model_name: str, num_classes: int, shape: tuple[int, int, int], batch: int,
                         built_for: int | None = None) -> str | None:
    """Why a training-mode forward of the model on this input fails (None when it works).

    ``built_for``: the image side the model is built for when it differs from the input's (a run
    builds its model once, for the configured size, then progressive resizing feeds it smaller
    images; a model with a fixed input size, such as ViT's position embeddings, refuses them).
    On the meta device only shapes are computed. An op the meta device does not implement is
    not the model's fault, so it passes (the run itself will tell).
    """
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constructors' FutureWarnings would add lines to a refusal
            model = build_model(model_name, num_classes, image_size=built_for or shape[-1]).train()
            output = model(torch.empty(batch, *shape))
    except NotImplementedError:
        return None
    except Exception as err:  # noqa: BLE001 - any failure of the forward is the answer
        text = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        return None if "meta" in text.lower() else shorten(text, 120)[1:-1]
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (batch, num_classes):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        return f"output is {shorten(got)}, not logits of shape ({batch}, {num_classes})"
    return None
