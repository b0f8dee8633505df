"""Reference models, registered by name, plus every torchvision classification model."""
from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn

from bench.registry import Registry

MODELS: Registry[Callable[[int], nn.Module]] = Registry("model")


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@MODELS.register("tiny_cnn", "3-stage BatchNorm CNN (73k params): an epoch of digits in seconds on CPU")
def tiny_cnn(num_classes: int) -> nn.Module:
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
def resnet18_cifar(num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    # At 32x32 the ImageNet stem (7x7 stride 2 + max-pool) would throw away 15/16 of the pixels.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def torchvision_names() -> list[str]:
    """Torchvision's classification models (the top-level ``torchvision.models`` namespace)."""
    return torchvision.models.list_models(module=torchvision.models)


def model_names() -> list[str]:
    return MODELS.names() + torchvision_names()


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model: a registered reference model or a torchvision one by name."""
    if name in MODELS:
        return MODELS.get(name)(num_classes)
    if name in torchvision_names():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise KeyError(name)
