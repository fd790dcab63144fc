"""Model zoo. Any ``torch.nn.Module`` mapping a batch to logits works with
fedzip; the loss defaults to cross-entropy and the metric to accuracy."""

from __future__ import annotations

import math

import torch
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
