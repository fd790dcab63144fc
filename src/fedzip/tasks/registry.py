"""Task names to tasks: the built-in ones, or any ``module:attribute`` import path."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fedzip.errors import ConfigError
from fedzip.tasks.base import Task


def _images(info: Any) -> Task:
    from fedzip.tasks.images import image_task

    return image_task(int(getattr(info, "num_classes", 10)))


def _images_small(info: Any) -> Task:
    """:class:`~fedzip.models.SmallCNN` on 28x28 images, otherwise the ``images`` task."""
    import functools

    from fedzip.models import SmallCNN
    from fedzip.tasks.base import ClassificationMetrics, classification_loss
    from fedzip.tasks.images import check_images

    # the images task with a model 1/150 the size: what DP's noise, which grows with d, leaves room for
    num_classes = int(getattr(info, "num_classes", 10))
    return Task(name="images_small", model_fn=functools.partial(SmallCNN, num_classes),
                loss_fn=classification_loss(), metrics=ClassificationMetrics(), weighting="examples",
                check_examples=check_images, num_classes=num_classes)


def _shakespeare(info: Any) -> Task:
    from fedzip.tasks.shakespeare import shakespeare_task

    return shakespeare_task()


#: built-in task name → (one line, builder from the data set's info)
TASKS: dict[str, tuple[str, Callable[[Any], Task]]] = {
    "images": ("the FedAvg CNN on 28x28 images, classes from the data set", _images),
    "images_small": ("a small CNN (conv 8, conv 16, linear; 11,274 parameters for 10 classes) on 28x28 "
                     "images, classes from the data set", _images_small),
    "shakespeare": ("TFF's character LSTM, next-character prediction", _shakespeare),
}


def resolve_task(spec: str | Task, info: Any = None) -> Task:
    """A task from a name: ``auto`` (the data set's own task), a built-in name,
    or ``module.path:attribute`` where the attribute is a :class:`Task` or a
    function returning one (given the data set's info if it takes an argument)."""
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"task must be a name or module:attribute, got {spec!r}")
    if spec == "auto":
        spec = getattr(info, "task", None) or "images"
    if spec in TASKS:
        return TASKS[spec][1](info)
    if ":" not in spec:
        raise ConfigError(f"task {spec!r} unknown; choose from {['auto', *TASKS]} or give "
                          "module.path:attribute")
    obj = import_path(spec, "task")
    if callable(obj) and not isinstance(obj, Task):
        try:
            takes_arg = bool(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            takes_arg = False
        obj = obj(info) if takes_arg else obj()
    if not isinstance(obj, Task):
        raise ConfigError(f"task {spec!r} is a {type(obj).__name__}, not a fedzip.tasks.Task "
                          "(or a function returning one)")
    return obj


def import_path(spec: str, field: str) -> Any:
    """The object at ``module.path:attribute`` (the attribute may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field} {spec!r}: expected module.path:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field} {spec!r}: cannot import {module_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{field} {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    return obj
