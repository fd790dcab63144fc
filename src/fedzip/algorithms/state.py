"""The server's state: one plain value, carried from round to round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedzip.clientstate import ClientStates
from fedzip.tree import Params


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from round to round, as one plain value.

    ``groups`` holds an algorithm's named tensor groups besides the model
    (SCAFFOLD's server control variate is ``groups["control"]``).
    ``client_states`` maps an owner (``"codec"``: per-client codec state such
    as error-feedback residuals; ``"algorithm"``: SCAFFOLD's client control
    variates) to its :class:`~fedzip.clientstate.ClientStates` store.
    Checkpoints walk these fields; a new field is saved without listing it.
    """

    params: Params
    optimizer_state: dict[str, Any]
    aggregator_state: dict[str, Any]
    round: int = 0  # rounds completed
    groups: dict[str, Params] = field(default_factory=dict)
    client_states: dict[str, ClientStates] = field(default_factory=dict)
