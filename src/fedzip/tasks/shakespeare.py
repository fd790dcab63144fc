"""Federated Shakespeare: next-character prediction with TFF's character LSTM.

TFF's baseline (``tff.simulation.baselines.shakespeare``, after McMahan et
al., AISTATS 2017 and Reddi et al., ICLR 2021): TFF's 86-character
vocabulary plus pad, out-of-vocabulary, beginning and end of snippet (90
ids), sequences of 80 characters (+1 for the target), batch 4, an
embedding of 8, two LSTM layers of 256 and a linear layer to the vocabulary.

Scoring, as TFF's baseline counts it: accuracy over real characters — padding
and the end-of-snippet token are left out (the target is never the
beginning-of-snippet token). The loss is cross-entropy over every non-pad
target (end of snippet included: it is a real prediction); TFF's Keras loss
averages over padding too, which only rescales it. Clients are weighted by
the characters they trained on (``weighting="tokens"``) or, as TFF's default
weighted FedAvg, by sequences (``"examples"``).
"""

from __future__ import annotations

import functools

from fedzip.data.federated import ClientExamples
from fedzip.data.shakespeare import EOS, PAD, VOCAB_SIZE
from fedzip.errors import DataError
from fedzip.models import CharLSTM
from fedzip.tasks.base import ClassificationMetrics, Task, classification_loss

#: TFF's baseline client batch size for Shakespeare
BATCH_SIZE = 4


def check_sequences(examples: ClientExamples, where: str) -> None:
    """int64 character ids ``[n, T]`` and targets of the same shape."""
    x, y = examples.x, examples.y
    if x.is_floating_point() or y.is_floating_point() or x.dim() != 2 or tuple(x.shape) != tuple(y.shape):
        raise DataError(f"{where}: the character task takes integer ids x [n, T] and targets y [n, T], "
                        f"got x {x.dtype} {tuple(x.shape)}, y {y.dtype} {tuple(y.shape)}")


def shakespeare_task(weighting: str = "tokens", hidden: int = 256) -> Task:
    """TFF's character LSTM on the 90-id vocabulary (see the module doc)."""
    return Task(
        name="shakespeare",
        model_fn=functools.partial(CharLSTM, VOCAB_SIZE, 8, hidden, 2),
        loss_fn=classification_loss(ignore_index=PAD),
        metrics=ClassificationMetrics(ignore=(PAD,), accuracy_ignore=(EOS,)),
        weighting=weighting,
        check_examples=check_sequences,
        num_classes=VOCAB_SIZE,
    )
