"""Randomness keyed by what it is for, never by order or worker.

Every random draw in a run comes from a generator seeded by
``derive_seed(seed, round, client_id, purpose)``: the same run repeats bit
for bit, on one process or many, and a restart from a checkpoint draws what
the uninterrupted run would have drawn (FedJAX's per-round, per-client keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from fedzip.errors import ConfigError


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from any keys (ints, strings), stable across processes."""
    h = hashlib.blake2b(repr(keys).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def numpy_rng(*keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*keys))


def torch_rng(*keys: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g


def sample_clients(client_ids: Sequence[str], n: int, round_num: int, seed: int) -> list[str]:
    """``n`` distinct clients for ``round_num``, a function of (seed, round) alone."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"clients_per_round must be a positive integer, got {n!r}")
    if n > len(client_ids):
        raise ConfigError(
            f"clients_per_round={n} but the data set has only {len(client_ids)} clients"
        )
    idx = numpy_rng(seed, round_num, "sample").choice(len(client_ids), size=n, replace=False)
    return [client_ids[int(i)] for i in idx]
