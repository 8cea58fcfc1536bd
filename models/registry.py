"""Method registry: ``create_method(name, backbone, **method_args)``, like timm's ``create_model``.

A method module registers its class with ``@register_method("name")``. The class takes the
backbone as its first argument and its hyper-parameters as keyword arguments with defaults;
``method_args`` from the config are checked against that signature so a mistyped key is an
error that lists the valid ones, before any process starts. A method whose signature has a
``teacher`` argument (distillation) is handed a frozen ``nn.Module`` there by the pipeline, which
resolves ``model.teacher``; it is not a method argument of the config.

What the trainer relies on, besides ``forward(views) -> {"loss": ...}``: the class attributes
``num_views`` (and ``multi_crop``, see models/multicrop.py), ``input_kind`` ("image" or "clip"),
``uses_labels``, ``exported_backbone`` (the dotted name of the submodule exported as the trained
backbone; "backbone" unless the class says otherwise, e.g. DINO's teacher) and the optional hook
``on_step_end(step, total_steps)``.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable

import torch.nn as nn

import ssl_foundry.models.methods as methods

_METHODS: dict[str, type[nn.Module]] = {}


def register_method(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' registered twice ({_METHODS[name]} and {cls})")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return add


def _import_all_methods() -> None:
    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def method_names() -> list[str]:
    _import_all_methods()
    return sorted(_METHODS)


def method_class(name: str) -> type[nn.Module]:
    _import_all_methods()
    if name not in _METHODS:
        raise KeyError(f"unknown method '{name}'. Registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


_BUILT_BY_THE_PIPELINE = ("self", "backbone", "teacher")


def method_arg_names(name: str) -> list[str]:
    params = inspect.signature(method_class(name).__init__).parameters
    return [p for p in params if p not in _BUILT_BY_THE_PIPELINE]


def takes_teacher(name: str) -> bool:
    """The method distils a frozen teacher network (``model.teacher``)."""
    return "teacher" in inspect.signature(method_class(name).__init__).parameters


def check_method_args(name: str, method_args: dict[str, Any]) -> None:
    valid = method_arg_names(name)
    for key in method_args:
        if key not in valid:
            raise KeyError(f"model.method_args.{key}: '{name}' has no such argument. Valid: {', '.join(valid)}")


def create_method(name: str, backbone: nn.Module, teacher: nn.Module | None = None, **method_args: Any) -> nn.Module:
    check_method_args(name, method_args)
    if takes_teacher(name) != (teacher is not None):
        raise ValueError(f"method '{name}' {'needs a' if takes_teacher(name) else 'takes no'} teacher network")
    return method_class(name)(backbone, **({"teacher": teacher} if teacher is not None else {}), **method_args)


def exported_backbone_name(method: nn.Module) -> str:
    """The dotted name, within ``method``, of the backbone it exports (its ``exported_backbone``;
    default ``"backbone"``, the trained one)."""
    return getattr(method, "exported_backbone", "backbone")
