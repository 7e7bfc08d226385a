"""Task types, one file each, registered by kind (see :mod:`.base` for the interface, :mod:`.registry`)."""

from . import classification, images, instruction, image_chat, multiple_choice  # noqa: F401 (registers the task types; in this order)
from .base import DataError, Task, TaskData
from .registry import TASK_TYPES, all_presets, by_kind, task_type

__all__ = ["DataError", "Task", "TaskData", "TASK_TYPES", "all_presets", "by_kind", "task_type"]
