"""Tasks: what is learned (model, loss, mergeable metrics, client weighting).

Built in: ``images`` (the seed's FedAvg CNN), ``images_small`` (a small CNN
of 11,274 parameters for 10 classes, where DP noise must stay small against
the signal) and ``shakespeare`` (TFF's character LSTM). A user's own task is named by import path,
``"mypkg.tasks:mine"``, where ``mine`` is a :class:`Task` or a function
returning one (called with the data set's info when it takes an argument).
"""

from fedzip.tasks.base import ClassificationMetrics, Metrics, Task, classification_loss
from fedzip.tasks.images import image_task
from fedzip.tasks.registry import TASKS, resolve_task

__all__ = ["TASKS", "ClassificationMetrics", "Metrics", "Task", "classification_loss", "image_task",
           "resolve_task"]
