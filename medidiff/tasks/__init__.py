"""Tasks: one object per task, in one file each, and the registry every other layer looks them up in.

Adding a task: a file here with a :class:`Task` subclass, one line in :data:`REGISTRY`, a configuration and a data
card (see the README, "Add your own task").
"""

from medidiff.errors import MedidiffError
from medidiff.tasks.base import Case, Option, Output, Task
from medidiff.tasks.fusion import Fusion
from medidiff.tasks.restoration import Restoration
from medidiff.tasks.segmentation import Segmentation
from medidiff.tasks.superres import SuperRes
from medidiff.tasks.synthesis import Synthesis

REGISTRY: dict[str, type[Task]] = {cls.name: cls for cls in (Segmentation, Restoration, SuperRes, Fusion, Synthesis)}

__all__ = ["REGISTRY", "Case", "Fusion", "Option", "Output", "Restoration", "Segmentation", "SuperRes", "Synthesis",
           "Task", "task_class", "task_named"]


def task_class(name: str) -> type[Task]:
    """The task registered under ``name``; an unknown name is a ``MedidiffError`` listing the known ones."""
    if name not in REGISTRY:
        raise MedidiffError(f"unknown task {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def task_named(class_path: str) -> type[Task] | None:
    """The registered task a configuration's ``class_path`` names (``medidiff.tasks.Segmentation`` or the class's
    own module path), or None."""
    for cls in REGISTRY.values():
        if class_path in (f"medidiff.tasks.{cls.__name__}", f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    return None
