"""Build a model from a text spec, as the CLI's ``--model`` takes it: a built-in name
(``resnet56``), ``timm:NAME`` or ``PKG.MODULE:FACTORY`` (``torchvision.models:resnet50``,
``my_pkg.nets:build``), called with keyword arguments. Never downloads weights: ``pretrained``
is refused; trained weights come from a local file (``aofp_ext.load_weights``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from .lenet import lenet5_bn
from .mobilenet import mobilenet_v2_cifar
from .resnet_cifar import resnet20, resnet56
from .vgg import vgg16_cifar

__all__ = ["BUILTIN", "ModelSpecError", "from_spec"]

BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5_bn, "resnet20": resnet20, "resnet56": resnet56, "vgg16": vgg16_cifar,
    "mobilenetv2": mobilenet_v2_cifar,
}


class ModelSpecError(ValueError):
    """A model spec that cannot be imported, called, or does not give an nn.Module."""


def _factory(spec: str) -> Callable[..., Any]:
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(
            f"model {spec!r}: expected a built-in name ({', '.join(BUILTIN)}), 'timm:NAME' or "
            "'PKG.MODULE:FACTORY' (e.g. 'torchvision.models:resnet50')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    if module_name == "timm":
        def create(**kwargs: Any) -> nn.Module:
            return module.create_model(attr, pretrained=False, **kwargs)
        if attr not in module.list_models():
            raise ModelSpecError(f"model {spec!r}: timm has no model {attr!r}")
        return create
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model {spec!r}: {attr!r} is not callable")
    return obj


def from_spec(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The model that ``spec`` names, built with ``kwargs``; errors name the spec."""
    kwargs = dict(kwargs or {})
    for key in ("pretrained", "weights"):
        if kwargs.get(key) not in (None, False):
            raise ModelSpecError(f"model {spec!r}: {key}={kwargs[key]!r} would download weights; "
                                 "build the architecture only and pass a local weights file")
    factory = _factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelSpecError(f"model {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model {spec!r}: the factory returned {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model
