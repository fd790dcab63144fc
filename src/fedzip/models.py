"""Model zoo. Any ``torch.nn.Module`` mapping a batch to logits works with
fedzip; the loss defaults to cross-entropy and the metric to accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FedAvgCNN(nn.Module):
    """The CNN of McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data" (AISTATS 2017), exactly as TFF's
    ``create_original_fedavg_cnn_model`` defines it: two 5×5 'same' conv
    layers (32, 64 filters, ReLU) each followed by 2×2 max pooling, a dense
    layer of 512 (ReLU) and a dense output layer. 1,663,370 parameters for
    10 classes, 1,690,046 for 62.

    Inputs are ``[n, 28, 28]`` (or ``[n, 1, 28, 28]``) images. Weights are
    initialised as Keras does (Glorot uniform, zero biases). The network runs
    in the channels_last memory format, which is faster for this CNN on CPU.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(7 * 7 * 64, 512)
        self.fc2 = nn.Linear(512, num_classes)
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            _glorot_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def _glorot_uniform_(w: torch.Tensor) -> None:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.uniform_(-bound, bound)


def fedavg_cnn(only_digits: bool = True) -> FedAvgCNN:
    """The seed's model: 10 classes for digits, 62 for EMNIST's letters and digits."""
    return FedAvgCNN(10 if only_digits else 62)


class SmallCNN(nn.Module):
    """A small CNN for 28×28 images: two 5×5 'same' conv layers (8 and 16
    filters, ReLU), each followed by 2×2 max pooling, and one linear layer.
    11,274 parameters for 10 classes (conv 208, conv 3,216, linear 7,850),
    about 1/150 of :class:`FedAvgCNN`.

    Where it is used: differential privacy, whose noise grows with the
    model's size (its norm is ``z·C·√d`` against a signal of at most ``C``),
    and the scaling benchmark, whose rounds must cost little besides the
    framework. Weights keep PyTorch's default initialization.

    Inputs are ``[n, 28, 28]`` (or ``[n, 1, 28, 28]``) images.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=5, padding=2)
        self.fc = nn.Linear(16 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class CharLSTM(nn.Module):
    """The Shakespeare next-character model of McMahan et al. (AISTATS 2017), as
    TFF's ``create_recurrent_model(vocab_size=90)`` (``tff.simulation.baselines.
    shakespeare``) defines it: an embedding of 8, two LSTM layers of 256 units
    returning sequences, and a dense layer to the vocabulary (logits, no softmax).

    ``forward``: int64 ids ``[B, T]`` → logits ``[B, T, vocab_size]`` (batch first).

    Parameters: **822,570** for the defaults (measured): embedding 720, LSTM
    layers 272,384 and 526,336, dense 23,130. Keras' model has 820,522: PyTorch's
    LSTM keeps two bias vectors per layer (``b_ih`` and ``b_hh``, 4 × 256 each)
    where Keras keeps one, so 2 × 1,024 more, always zero-initialised here and
    trained like the rest (their sum plays Keras' single bias).

    Initialised as TFF's Keras layers are: embedding uniform(-0.05, 0.05); LSTM
    input kernels ``he_normal`` (TFF sets ``kernel_initializer='he_normal'``:
    truncated normal, std sqrt(2 / fan_in) / 0.8796, cut at 2 std), recurrent
    kernels orthogonal, biases zero except the forget gate's 1 (Keras'
    ``unit_forget_bias``; PyTorch's gate order is i, f, g, o, and the 1s sit in
    ``b_ih``, ``b_hh`` stays zero); dense kernel Glorot uniform, bias zero.

    Masking: TFF's embedding has ``mask_zero=True``, so Keras skips pad inputs.
    Pads only ever trail a snippet (see :mod:`fedzip.data.shakespeare`), so the
    logits at every non-pad input equal an unmasked model's, which this is; a
    loss or metric should ignore pad targets (TFF's accuracy and token count
    mask ``y == 0``).
    """

    def __init__(
        self, vocab_size: int = 90, embedding_dim: int = 8, hidden: int = 256, layers: int = 2
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim),
                            ("hidden", hidden), ("layers", layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CharLSTM: {name} must be a positive integer, got {value!r}")
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, vocab_size)
        with torch.no_grad():
            self.embedding.weight.uniform_(-0.05, 0.05)
            for k in range(layers):
                w_ih = getattr(self.lstm, f"weight_ih_l{k}")
                std = math.sqrt(2.0 / w_ih.shape[1]) / 0.87962566103423978
                nn.init.trunc_normal_(w_ih, std=std, a=-2 * std, b=2 * std)
                nn.init.orthogonal_(getattr(self.lstm, f"weight_hh_l{k}"))
                b_ih = getattr(self.lstm, f"bias_ih_l{k}")
                b_ih.zero_()
                b_ih[hidden : 2 * hidden] = 1.0
                getattr(self.lstm, f"bias_hh_l{k}").zero_()
        _glorot_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.fc(out)
