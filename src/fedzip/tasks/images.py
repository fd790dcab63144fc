"""The seed's task: image classification with the FedAvg CNN.

McMahan et al. (AISTATS 2017) and TFF's "model and update compression"
tutorial: 28×28 images, the original FedAvg CNN, cross-entropy, accuracy,
clients weighted by their examples.
"""

from __future__ import annotations

import functools

from fedzip.data.federated import ClientExamples
from fedzip.errors import DataError
from fedzip.models import FedAvgCNN
from fedzip.tasks.base import ClassificationMetrics, Task, classification_loss


def check_images(examples: ClientExamples, where: str) -> None:
    """Float images and integer labels of shape ``[n]``: what the CNN takes."""
    if not examples.x.is_floating_point():
        raise DataError(f"{where}: examples are {examples.x.dtype}, the model takes float images")
    y = examples.y
    if y.is_floating_point() or y.is_complex() or y.dim() != 1:
        raise DataError(f"{where}: labels must be integers of shape [n], got {y.dtype} {tuple(y.shape)}")


def image_task(num_classes: int = 10) -> Task:
    """The FedAvg CNN on ``num_classes`` classes (10 digits, 62 for EMNIST-62)."""
    return Task(
        name="images",
        model_fn=functools.partial(FedAvgCNN, num_classes),
        loss_fn=classification_loss(),
        metrics=ClassificationMetrics(),
        weighting="examples",
        check_examples=check_images,
        num_classes=num_classes,
    )
