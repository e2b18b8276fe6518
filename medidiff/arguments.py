"""Check settings read from an untrusted file (a checkpoint) against the signature that will receive them.

A checkpoint's hyperparameters become constructor arguments. Passing them on unchecked let a wrong type end in
a traceback deep inside a module, and a huge number (``steps: 1e8``) run until memory ran out. Every value is
checked here against the parameter's annotation — plain data only: numbers, strings, literals, lists and dicts
of those; never a class or callable — and numbers that size memory or time against a bound.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from typing import Any, Literal, Union

from medidiff.errors import MedidiffError

MAX_STEPS = 1000  # sampler steps: a DDPM's whole training horizon is 1000 steps
MAX_ENSEMBLE = 100
# inclusive bounds of the numbers that decide how much time or memory a run takes
BOUNDS: dict[str, tuple[float, float]] = {
    "steps": (1, MAX_STEPS), "val_steps": (1, MAX_STEPS), "teacher_steps_per_step": (1, MAX_STEPS),
    "ensemble": (1, MAX_ENSEMBLE), "num_timesteps": (2, 10_000), "em_iterations": (1, 100),
    "cg_iterations": (1, 1000), "val_sampling_batches": (0, 10**6), "spatial_dims": (2, 3),
    "in_channels": (0, 1024), "cond_channels": (0, 1024), "out_channels": (1, 1024), "channels": (1, 2048),
    "num_res_blocks": (1, 16), "num_res_units": (0, 16), "norm_num_groups": (1, 2048),
    "num_head_channels": (1, 2048), "strides": (1, 8), "num_classes": (2, 1000), "factors": (1, 16),
    "roi_size": (1, 4096),
}


def parameters(*functions: Any) -> dict[str, Any]:
    """``{name: annotation}`` of the named parameters of ``functions`` (classes: their ``__init__`` along the
    method resolution order, since subclasses pass ``**kwargs`` on)."""
    found: dict[str, Any] = {}
    for function in functions:
        owners = [k for k in function.__mro__ if "__init__" in vars(k)] if isinstance(function, type) else [function]
        for owner in owners:
            init = owner.__init__ if isinstance(owner, type) else owner
            hints = typing.get_type_hints(init)
            for name, parameter in inspect.signature(init).parameters.items():
                if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD) and name != "self":
                    found.setdefault(name, hints.get(name, Any))
    return found


def check_arguments(accepted: dict[str, Any], values: dict[str, Any], where: Any, what: str = "setting") -> None:
    """Refuse, naming the first offending key, any value not of its parameter's type or beyond its bound (the
    fields of a dataclass-typed parameter, given as a mapping, are checked the same way)."""
    for name, value in values.items():
        if name not in accepted:
            raise MedidiffError(f"holds the {what} '{name}', which this medidiff version does not know", where)
        if dataclasses.is_dataclass(accepted[name]) and isinstance(value, dict):
            check_arguments(typing.get_type_hints(accepted[name]), value, where, f"{what} {name}:")
            continue
        if not fits(value, accepted[name]):
            raise MedidiffError(f"holds the {what} {name}={_show(value)}, which is not a valid "
                                f"{_describe(accepted[name])}", where)
        bound = BOUNDS.get(name)
        if bound is not None and not _within(value, *bound):
            raise MedidiffError(f"holds the {what} {name}={_show(value)}, outside {bound[0]:g}..{bound[1]:g}",
                                where)


def fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is plain data of type ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return _plain(value)
    if annotation is None or annotation is type(None):
        return value is None
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin in (Union, types.UnionType):
        return any(fits(value, option) for option in args)
    if origin in (list, tuple, collections.abc.Sequence):
        items = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(fits(v, items) for v in value)
    if origin in (dict, collections.abc.Mapping):
        keys, items = args if args else (Any, Any)
        return isinstance(value, dict) and all(fits(k, keys) and fits(v, items) for k, v in value.items())
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        return isinstance(value, dict) and all(k in hints and fits(v, hints[k]) for k, v in value.items())
    return _scalar(value, annotation)


def _scalar(value: Any, annotation: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    return False  # classes, tensors, callables: never taken from a file


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _within(value: Any, low: float, high: float) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_within(v, low, high) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return low <= value <= high


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("collections.abc.", "")
    return getattr(annotation, "__name__", text) if isinstance(annotation, type) else text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
