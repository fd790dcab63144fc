"""SCAFFOLD: FedAvg whose clients correct their drift with control variates.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning" (ICML 2020), Algorithm 1 with
option II. The server keeps a control variate ``c`` (``state.groups["control"]``,
zeros at init) and broadcasts it with the model; client ``i`` keeps its own
``c_i`` (in the algorithm's client-state store, zeros the first time) and:

* corrects every local gradient, ``g ← g − c_i + c``, before its optimizer
  steps (so each client follows the *global* gradient direction, not its own);
* after ``K`` local steps with learning rate ``η_l`` from the broadcast ``x``
  to ``y_i``, sets ``c_i⁺ = c_i − c + (x − y_i) / (K η_l)`` (option II; for
  plain SGD this is the mean raw gradient over the local steps);
* sends the model delta ``y_i − x`` and ``Δc_i = c_i⁺ − c_i`` (group
  ``"control"``), and keeps ``c_i⁺``.

The server steps the model with its optimizer on the mean delta as FedAvg does
(``x ← x + η_g·mean Δy`` with server SGD at ``lr = η_g``) and moves
``c ← c + (|S|/N)·mean_{i∈S} Δc_i`` with ``S`` the round's successful clients
and ``N`` the population, so that ``c`` stays the mean of *all* clients'
``c_i`` (a client never sampled has ``c_i = 0``).

``num_clients`` (N) is a required argument: the server cannot learn the
population's size from a round's sample, and a wrong N scales every control
update (N too small overshoots c by N_true/N, too large shrinks the drift
correction). Give the number of clients of the training data.

Option II needs ``K`` and ``η_l``: ``K`` is the number of steps the client
took, ``η_l`` the learning rate of the client optimizer. It assumes plain SGD
on the client (``(x − y_i)/(K η_l)`` is then the mean step direction); the
client optimizer must therefore be ``torch.optim.SGD`` without momentum
(weight decay is allowed: it is part of the gradient the correction sees).
The model delta is averaged by the aggregator (weighted by examples by
default; the paper's unweighted mean is ``aggregator=mean(weighted=False)``);
the control deltas are always an unweighted mean, as ``c = mean_i c_i`` needs.

Compressing control variates. ``control_codec`` (a codec or policy; default
float32) encodes ``Δc_i`` on the uplink; the broadcast of ``c`` uses the
algorithm's broadcast policy like the model. Compression interacts with the
method: ``c`` is a *sum* of every round's control deltas, so the error of a
biased codec (top-k, sign) accumulates into ``c`` round after round and
drifts the correction; an unbiased codec keeps ``E[c]`` right but adds
variance that also accumulates (it does not average out within a client's
``c_i`` the way it does in one model update). Error feedback fixes both, and
fedzip does it by construction: the client keeps the control variate the
server knows about, ``c_i + Q(Δc_i)`` (``Q`` the decode of exactly the bytes
it sends), not ``c_i⁺``. Since ``c_i⁺`` is the mean raw gradient whatever
``c_i`` was, the next round's ``Δc_i = c_i⁺ − (c_i + Q(Δc_i))`` carries the
previous compression error, and ``c = (1/N) Σ_i c_i`` holds exactly (up to
float rounding) for any codec. A compressed *broadcast* of ``c`` only
perturbs the correction of that round: ``c_i⁺`` cancels it. (A stateful
codec such as :class:`~fedzip.codecs.ErrorFeedback` would keep no residual for
a group; it is not needed here.) On the heterogeneous least-squares test
problem, 2-bit control deltas converge as float32 ones do; keeping ``c_i⁺``
instead, they stall over a hundred times farther from the optimum.

Per-client state is one model-sized tensor set per client ever sampled,
never dropped: for large populations keep it on disk with
``client_states=fedzip.DiskStates(folder)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.client import (
    GROUP_SEP,
    ClientContext,
    ClientHooks,
    OptimizerFn,
    group_policy,
)
from fedzip.algorithms.state import ServerState
from fedzip.codecs import Codec, CodecPolicy, Float32, as_policy
from fedzip.errors import ConfigError
from fedzip.payload import decode_params, encode_params
from fedzip.seeding import torch_rng
from fedzip.tree import Params
from fedzip.wire import Kind, Message

CONTROL = "control"


def plain_sgd_lr(client_optimizer: OptimizerFn, algorithm: str) -> float:
    """The learning rate of ``client_optimizer``, which must be plain SGD
    (``torch.optim.SGD`` without momentum): a ConfigError otherwise."""
    probe = client_optimizer([torch.zeros(1, requires_grad=True)])
    group = probe.param_groups[0]
    if type(probe) is not torch.optim.SGD or group.get("momentum", 0) or group.get("nesterov", False) \
            or group.get("maximize", False):
        raise ConfigError(f"{algorithm} needs plain SGD on the client (torch.optim.SGD without momentum), "
                          f"got {type(probe).__name__} with {dict((k, v) for k, v in group.items() if k != 'params')}")
    lr = float(group["lr"])
    if not lr > 0:
        raise ConfigError(f"{algorithm}: the client learning rate must be > 0, got {lr!r}")
    return lr


def codec_policy(codec: Any, field: str) -> CodecPolicy:
    """A codec policy from a codec, a policy, None (float32) or a codec spec
    (``"uniform:bits=8"``, ``{"type": "uniform", "bits": 8}``) as in configs."""
    if isinstance(codec, (str, Mapping)):
        from fedzip.config import build_codec

        codec = build_codec(codec, field)
    if codec is not None and not isinstance(codec, (Codec, CodecPolicy)):
        raise ConfigError(f"{field} must be a codec, a codec policy or a codec spec, got {type(codec).__name__}")
    return as_policy(codec)


def is_lossless(policy: CodecPolicy) -> bool:
    """True when every codec the policy can pick is float32 (decode(encode(x)) == x)."""
    codecs = [policy.codec, policy.small, *policy.overrides.values()]
    return all(type(c) is Float32 for c in codecs)


def roundtrip(group: str, values: Params, policy: CodecPolicy, rng: torch.Generator) -> Params:
    """What the server decodes from ``values`` sent as ``group`` with ``rng``:
    the same encoding :class:`~fedzip.algorithms.client.ClientWork` does."""
    named = {f"{group}{GROUP_SEP}{k}": v for k, v in values.items()}
    records = encode_params(named, group_policy(policy), rng)
    decoded = decode_params(Message(Kind.UPDATE, {}, records, 0), {k: tuple(v.shape) for k, v in named.items()},
                            group_policy(policy))
    return {k: decoded[f"{group}{GROUP_SEP}{k}"] for k in values}


class ControlVariates(ClientHooks):
    """SCAFFOLD's client step: the gradient correction, ``Δc_i`` sent as group
    ``"control"``, ``c_i + Q(Δc_i)`` kept (see the module doc)."""

    def __init__(self, lr: float, policy: CodecPolicy, seed: int) -> None:
        self.lr = float(lr)
        self.policy = policy
        self.seed = int(seed)
        self.lossless = is_lossless(policy)
        self.group_policies = {CONTROL: policy}

    def start(self, ctx: ClientContext) -> None:
        c = ctx.groups.get(CONTROL)
        if c is None or set(c) != set(ctx.received):
            raise ValueError("SCAFFOLD: the broadcast holds no control variate for every model tensor")
        ci = ctx.state
        if ci is not None and (not isinstance(ci, Mapping) or set(ci) != set(ctx.received)):
            raise ValueError(f"SCAFFOLD: client {ctx.client_id!r} has a control variate that does not "
                             "match the model")
        # c − c_i, once per client, on the training device
        ctx.scaffold_correction = {
            name: (c[name] - ci[name] if ci is not None else c[name]).to(device=p.device, dtype=p.dtype)
            for name, p in ctx.received.items()
        }

    def before_step(self, ctx: ClientContext) -> None:
        corr = ctx.scaffold_correction
        for name, p in ctx.model.named_parameters():
            if p.grad is None:
                p.grad = corr[name].clone()
            else:
                p.grad.add_(corr[name])

    def finish(self, ctx: ClientContext, delta: Params) -> None:
        c = ctx.groups[CONTROL]
        ci = ctx.state
        if ctx.steps == 0:  # no local step: c_i⁺ = c_i (nothing was learned about f_i)
            dc = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in delta.items()}
        else:
            # c_i⁺ − c_i = −c + (x − y_i)/(K η_l) = −c − delta/(K η_l)
            scale = 1.0 / (ctx.steps * self.lr)
            dc = {k: (-c[k].float() - scale * v.float()) for k, v in delta.items()}
        if self.lossless:
            sent = dc
        else:  # the very bytes ClientWork will send: same policy, same rng key
            sent = roundtrip(CONTROL, dc, self.policy,
                             torch_rng(self.seed, ctx.round, ctx.client_id, "codec", CONTROL))
        ctx.out_groups[CONTROL] = dc
        ctx.out_state = {k: (ci[k].float() + sent[k] if ci is not None else sent[k].clone()) for k in dc}


class Scaffold(FederatedAlgorithm):
    """SCAFFOLD, option II (see the module doc).

    Args:
        num_clients: N, the number of clients in the population (required).
        control_codec: the uplink codec for ``Δc_i`` (a codec, a policy or a
            codec spec; default float32).
        Other arguments: :class:`~fedzip.algorithms.base.FederatedAlgorithm`'s;
        the client optimizer must be plain SGD.
    """

    name = "scaffold"

    def __init__(self, *args: Any, num_clients: int | None = None,
                 control_codec: Codec | CodecPolicy | str | Mapping | None = None, **kwargs: Any) -> None:
        if num_clients is None:
            raise ConfigError("SCAFFOLD needs num_clients, the number of clients in the population: the "
                              "server control variate is the mean of all N clients' c_i and moves by "
                              "(|S|/N)·mean(Δc_i) each round (e.g. algorithm 'scaffold:num_clients=3400')")
        if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
            raise ConfigError(f"SCAFFOLD num_clients must be a positive integer, got {num_clients!r}")
        self.num_clients = num_clients
        self.control_policy = codec_policy(control_codec, "control_codec")
        super().__init__(*args, **kwargs)

    def client_hooks(self) -> ClientHooks:
        return ControlVariates(plain_sgd_lr(self.client_optimizer, "SCAFFOLD"), self.control_policy, self.seed)

    def init_groups(self, params: Params) -> dict[str, Params]:
        return {CONTROL: {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}}

    def broadcast_groups(self, state: ServerState) -> dict[str, Params]:
        return {CONTROL: state.groups[CONTROL]}

    def update_groups(self, state: ServerState) -> dict[str, dict[str, tuple[int, ...]]]:
        return {CONTROL: {k: tuple(v.shape) for k, v in state.params.items()}}

    def server_update(
        self, state: ServerState, mean_delta: Params, group_means: dict[str, Params], cohort: int,
    ) -> tuple[Params, dict[str, Any], dict[str, Params]]:
        if cohort > self.num_clients:
            raise ConfigError(f"SCAFFOLD: {cohort} clients succeeded in one round but num_clients is "
                              f"{self.num_clients}; num_clients must be the population's size")
        params, opt_state = self.server_step(state, mean_delta)
        c = state.groups[CONTROL]
        dc = group_means.get(CONTROL)
        if dc is not None:
            share = cohort / self.num_clients
            c = {k: c[k] + share * dc[k] for k in c}
        return params, opt_state, {**state.groups, CONTROL: c}


def scaffold(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
             aggregator: Any = None, *, num_clients: int, control_codec: Any = None, **kwargs: Any) -> Scaffold:
    """SCAFFOLD over a population of ``num_clients``; other arguments as
    :func:`~fedzip.weighted_fedavg`."""
    return Scaffold(model_fn, client_optimizer, server_optimizer, aggregator, num_clients=num_clients,
                    control_codec=control_codec, **kwargs)


__all__ = ["ControlVariates", "Scaffold", "scaffold"]
