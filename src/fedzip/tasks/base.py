"""A task: the model, the loss, the metrics and how a client's examples are weighted.

One :class:`Task` drives everything that depends on what is being learned:
client training, evaluation, the pre-run data check, the CLI and config
files, checkpoints and the Ray backend (a task is picklable when its parts
are: use module-level functions or ``functools.partial``, not lambdas).

Metrics are *mergeable*: each batch contributes sums of counts
(:meth:`Metrics.batch_sums`), sums add up over batches and clients, and the
figures (loss, accuracy) are ratios of the summed counts
(:meth:`Metrics.summarize`). A pooled accuracy is therefore the fraction of
all counted predictions that were right, never a mean of per-client means.
The class axis is the last one of the logits (``[B, C]`` for images,
``[B, T, V]`` for sequences) and label ids listed as ``ignore`` (padding)
count nowhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from fedzip.data.federated import ClientExamples
from fedzip.errors import ConfigError, DataError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class Metrics(Protocol):
    """Mergeable metrics: per-batch sums, and figures computed from summed sums."""

    def batch_sums(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over one batch (0-dim tensors, left on the training device)."""

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Figures (loss, accuracy, ...) from sums added over batches and clients."""


def _mask(y: torch.Tensor, ids: Sequence[int]) -> torch.Tensor | None:
    """True where ``y`` is none of ``ids`` (None: everything counts)."""
    if not ids:
        return None
    return ~torch.isin(y, torch.tensor(list(ids), dtype=y.dtype, device=y.device))


@dataclass(frozen=True)
class ClassificationMetrics:
    """Loss and accuracy with the class axis last, padding masked.

    ``ignore``: label ids that count nowhere (padding): neither in the loss
    nor in accuracy. ``accuracy_ignore``: further ids left out of accuracy
    only (Shakespeare's end-of-snippet token, as TFF's baseline counts it).

    Sums per batch: ``loss_sum`` (the batch's mean loss × its counted labels),
    ``loss_count`` (labels in the loss), ``correct`` and ``count`` (labels in
    accuracy and how many of them the argmax of the last axis got right).
    """

    ignore: tuple[int, ...] = ()
    accuracy_ignore: tuple[int, ...] = ()

    def batch_sums(self, logits, y, loss):
        # Counts known without looking at the labels stay Python numbers: a
        # client's step adds these every batch, so each tensor op here costs
        # on every batch of every client (and a GPU never syncs for them).
        hit = logits.detach().argmax(-1) == y
        if not self.ignore and not self.accuracy_ignore:
            n = float(y.numel())
            return {"loss_sum": loss.detach().double() * n, "loss_count": n, "correct": hit.sum(), "count": n}
        keep = _mask(y, self.ignore)
        acc_keep = _mask(y, self.ignore + self.accuracy_ignore)
        loss_count = y.numel() if keep is None else keep.sum()
        if acc_keep is None:
            correct, count = hit.sum(), y.numel()
        else:
            correct, count = (hit & acc_keep).sum(), acc_keep.sum()
        return {
            "loss_sum": loss.detach().double() * loss_count,
            "loss_count": torch.as_tensor(loss_count, dtype=torch.float64, device=y.device),
            "correct": torch.as_tensor(correct, dtype=torch.float64, device=y.device),
            "count": torch.as_tensor(count, dtype=torch.float64, device=y.device),
        }

    def summarize(self, sums):
        return {
            "loss": sums.get("loss_sum", 0.0) / max(sums.get("loss_count", 0.0), 1.0),
            "accuracy": sums.get("correct", 0.0) / max(sums.get("count", 0.0), 1.0),
        }


def classification_loss(ignore_index: int | None = None) -> LossFn:
    """Cross-entropy with the class axis last, averaged over the labels that are
    not ``ignore_index``. For ``[B, C]`` logits it is ``F.cross_entropy``."""
    return _ClassificationLoss(ignore_index)


@dataclass(frozen=True)
class _ClassificationLoss:
    ignore_index: int | None = None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.dim() > 2:  # [B, T, V] -> [B*T, V]
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        if self.ignore_index is None:
            return F.cross_entropy(logits, y)
        return F.cross_entropy(logits, y, ignore_index=self.ignore_index)


#: how a client's update is weighted in the mean
WEIGHTINGS = ("examples", "tokens", "uniform")


@dataclass(frozen=True)
class Task:
    """What is learned and how it is scored.

    Args:
        name: shown in ``run.json`` and the metrics.
        model_fn: builds the ``nn.Module`` (called once per process).
        loss_fn: ``(logits, y) -> scalar`` mean loss of a batch.
        metrics: mergeable metrics (:class:`ClassificationMetrics` by default).
        weighting: a client's weight in the mean: ``"examples"`` (examples
            trained on, TFF's default), ``"tokens"`` (labels counted by the
            loss, i.e. real characters for text), ``"uniform"`` (1 per client),
            or a function ``ClientExamples -> float``.
        check_examples: ``(examples, where) -> None``, raising
            :class:`DataError` when examples do not suit the task (dtype,
            shape, label range), run once before training.
        num_classes: the size of the last logit axis, checked before training.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    loss_fn: LossFn = field(default_factory=classification_loss)
    metrics: Metrics = field(default_factory=ClassificationMetrics)
    weighting: str | Callable[[ClientExamples], float] = "examples"
    check_examples: Callable[[ClientExamples, str], None] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.model_fn):
            raise ConfigError(f"task {self.name!r}: model_fn must be a callable returning an nn.Module")
        if not callable(self.loss_fn):
            raise ConfigError(f"task {self.name!r}: loss_fn must be callable (logits, y) -> loss")
        if not isinstance(self.metrics, Metrics):
            raise ConfigError(f"task {self.name!r}: metrics must have batch_sums and summarize")
        if isinstance(self.weighting, str) and self.weighting not in WEIGHTINGS:
            raise ConfigError(f"task {self.name!r}: weighting {self.weighting!r} unknown; "
                              f"choose from {list(WEIGHTINGS)} or give a function")
        if not isinstance(self.weighting, str) and not callable(self.weighting):
            raise ConfigError(f"task {self.name!r}: weighting must be a name or a function")

    def client_weight(self, examples: ClientExamples, num_examples: int, sums: Mapping[str, float]) -> float:
        """A client's weight from what it trained on this round."""
        if self.weighting == "examples":
            return float(num_examples)
        if self.weighting == "tokens":
            return float(sums.get("loss_count", num_examples))
        if self.weighting == "uniform":
            return 1.0
        w = float(self.weighting(examples))
        if not w >= 0 or w == float("inf"):
            raise DataError(f"task {self.name!r}: weighting function returned {w!r}; "
                            "weights must be finite and >= 0")
        return w

    def check(self, model: nn.Module, examples: ClientExamples, where: str, on_device=lambda t: t) -> None:
        """One forward pass on one example before training, so data that does not
        fit fails here naming ``where`` (a client), not mid-round."""
        if len(examples) == 0:
            return
        if self.check_examples is not None:
            self.check_examples(examples, where)
        shape = tuple(examples.x.shape[1:])
        try:
            with torch.no_grad():
                out = model(on_device(examples.x[:1]))
        except (RuntimeError, IndexError, TypeError, ValueError) as e:
            first = (str(e).splitlines() or [""])[0]
            raise DataError(f"examples of {where} (shape {shape}) do not fit the model "
                            f"(task {self.name!r}, {examples.x.dtype} examples): {first}") from None
        if not isinstance(out, torch.Tensor):
            raise DataError(f"task {self.name!r}: the model returned {type(out).__name__}, not a tensor")
        if self.num_classes is not None and out.shape[-1] != self.num_classes:
            raise DataError(f"task {self.name!r}: the model outputs {out.shape[-1]} classes, "
                            f"the data set has {self.num_classes}")
        y = examples.y
        if self.num_classes is not None and y.numel() and not y.is_floating_point():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(f"{where} has labels outside 0..{self.num_classes - 1}")
