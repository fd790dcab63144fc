"""Fuzz every decoder of bytes from the other side, for as long as it is given.

Targets, for every codec in :mod:`fedzip.codecs` (``registry()`` where it
exists, and every concrete ``Codec`` class in the package's modules, exported
or not yet, each at its defaults and a few bit widths):

* ``wire``: ``decode_message`` on mutants of a valid message; a mutant that
  decodes must re-encode to the same bytes.
* ``update``: the server's path, ``decode_message(expect=UPDATE)`` then
  ``StreamingMean.fold``: a mutant must raise ``PayloadError`` or fold a
  finite float update of the template's shapes.
* ``broadcast``: the client's path, ``decode_params`` of a BROADCAST message.
* ``codec``: ``codec.decode(body, shape)`` on mutated and random bodies (the
  codec contract: ``PayloadError`` or a float tensor of ``shape``).
* ``random``: random bytes, bare or behind a valid header.

Mutations, one to four per mutant: bit flips, byte overwrites, integer fields
(counts, name and tag lengths, ndim, dims, body lengths, version, kind) set to
0, 1, the maximum or random values, truncation, appended bytes, deleted or
duplicated slices, a slice from another codec's message spliced in.

Also watched: decodes slower than ``--slow`` seconds, and (on one call in
20, with tracemalloc) allocations above 16x the template's float32 size
plus 1 MiB. Findings are grouped by target, codec and exception, each with
the smallest mutant that showed it (hex, and written under ``--out``).

    python benchmarks/fuzz.py [--seconds 60] [--seed 0] [--out fuzz-findings]

Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import pkgutil
import random
import struct
import sys
import time
import traceback
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import torch

import fedzip
from fedzip import codecs as codecs_mod
from fedzip.codecs import Codec, UniformQuantization, as_policy
from fedzip.errors import PayloadError
from fedzip.payload import decode_params, encode_params
from fedzip.wire import MAGIC, VERSION, Kind, decode_message, encode_message, integer_fields

TEMPLATE = {
    "conv.weight": (8, 1, 5, 5),
    "conv.bias": (8,),
    "fc.weight": (10, 200),
    "fc.bias": (10,),
    "gain": (),  # a 0-d parameter
    "odd": (7, 3),  # sizes that do not fill whole bytes at odd bit widths
}
TEMPLATE_BYTES = 4 * sum(math.prod(s) for s in TEMPLATE.values())


def _build(factory, notes: list[str]) -> list[tuple[str, Codec]]:
    """``factory`` at its defaults, or with the arguments a wrapper or a sparsifier
    needs; and at a few bit widths when it takes ``bits``."""
    tries = [{}, {"fraction": 0.25}, {"inner": UniformQuantization(bits=4)},
             {"inner": UniformQuantization(bits=2, stochastic=False)}]
    built, errors = [], []
    for kw in tries:
        try:
            codec = factory(**kw)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if not getattr(codec, "tag", ""):
            return []  # a helper base class, not a codec
        label = ",".join(f"{k}={getattr(v, 'tag', v)}{getattr(v, 'bits', '')}" for k, v in kw.items())
        built.append((label, codec))
        if "inner" not in kw:
            break
    if not built:
        notes.append(f"cannot build {getattr(factory, '__name__', factory)}: {errors[-1]}")
        return []
    try:
        takes_bits = "bits" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_bits = False
    if takes_bits:
        for bits in (1, 2, 3, 5, 8, 16):
            try:
                built.append((f"bits={bits}", factory(bits=bits)))
            except Exception:
                pass
    return built


def all_codecs(notes: list[str]) -> dict[str, Codec]:
    factories = {}
    reg = getattr(codecs_mod, "registry", None)
    if callable(reg):
        factories.update(dict(reg()))
    modules = [codecs_mod]
    for info in pkgutil.iter_modules(codecs_mod.__path__, "fedzip.codecs."):
        try:  # codecs not exported yet are fuzzed too
            modules.append(importlib.import_module(info.name))
        except Exception as e:
            notes.append(f"cannot import {info.name}: {type(e).__name__}: {e}")
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, Codec) and not inspect.isabstract(obj) \
                    and obj.__module__.startswith("fedzip.codecs") and obj not in factories.values():
                factories.setdefault(getattr(obj, "tag", "") or name, obj)
    out: dict[str, Codec] = {}
    for name, factory in factories.items():
        for label, codec in _build(factory, notes):
            out[f"{name}:{label}" if label else name] = codec
    out.setdefault("uq:range", UniformQuantization(bits=4, range=(-0.5, 0.5)))
    out.setdefault("uq:nearest", UniformQuantization(bits=2, stochastic=False))
    return out


def update_of(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = {k: torch.randn(s, generator=g) * 0.05 for k, s in TEMPLATE.items()}
    u["conv.bias"] = torch.full(TEMPLATE["conv.bias"], 0.125)  # constant
    u["fc.bias"] = torch.zeros(TEMPLATE["fc.bias"])
    return u


def valid_messages(codec: Codec, seed: int) -> tuple[bytes, bytes]:
    agg = fedzip.zeroing(fedzip.clipping(fedzip.mean(codec), 10.0), 100.0)
    records, reports, _ = agg.client_encode(agg.broadcast_scalars(agg.init()), update_of(seed),
                                            torch.Generator().manual_seed(seed))
    update = encode_message(Kind.UPDATE, {"weight": 20.0, "train/loss_sum": 40.0, **reports}, records)
    b_records = encode_params(update_of(seed + 1), as_policy(codec), torch.Generator().manual_seed(seed))
    broadcast = encode_message(Kind.BROADCAST, agg.broadcast_scalars(agg.init()), b_records)
    return update, broadcast


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------




def mutate(data: bytes, rng: random.Random, donors: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(buf)
        op = rng.choice(["flip", "flip", "byte", "field", "field", "truncate", "extend", "delete",
                         "duplicate", "splice"])
        if op == "flip" and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == "byte" and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == "field":
            try:
                spots = integer_fields(bytes(buf))
            except (struct.error, IndexError):
                spots = []
            if spots:
                off, size = rng.choice(spots)
                top = (1 << (8 * size)) - 1
                value = rng.choice([0, 1, 2, top, top - 1, top // 2 + 1, rng.randrange(top + 1)])
                buf[off : off + size] = value.to_bytes(size, "little")
        elif op == "truncate":
            del buf[rng.randrange(n + 1) :]
        elif op == "extend":
            buf += rng.randbytes(rng.randint(1, 64))
        elif op == "delete" and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 16)]
        elif op == "duplicate" and n:
            i = rng.randrange(n)
            buf[i:i] = buf[i : i + rng.randint(1, 64)]
        elif op == "splice" and donors:
            d = rng.choice(donors)
            i, j = rng.randrange(len(d) + 1), rng.randrange(n + 1)
            buf[j : j + rng.randint(0, 32)] = d[i : i + rng.randint(1, 64)]
    return bytes(buf)


# --------------------------------------------------------------------------
# Targets: each returns "ok" or "rejected", or raises AssertionError (a finding)
# --------------------------------------------------------------------------


def _check_params(params):
    assert sorted(params) == sorted(TEMPLATE), f"names {sorted(params)}"
    for k, v in params.items():
        assert isinstance(v, torch.Tensor) and tuple(v.shape) == TEMPLATE[k], f"{k}: shape {tuple(v.shape)}"
        assert v.is_floating_point(), f"{k}: dtype {v.dtype}"
        assert bool(torch.isfinite(v).all()), f"{k}: non-finite values"


def t_wire(msg: bytes, codec: Codec) -> str:
    try:
        m = decode_message(msg)
    except PayloadError:
        return "rejected"
    assert encode_message(m.kind, m.scalars, m.tensors) == msg, "decoded but re-encodes differently"
    return "ok"


class Wrapped(Exception):
    """A codec raised something other than PayloadError on hostile bytes; the
    server still saw a PayloadError (payload.decode_params converts it), but the
    codec contract says decoders raise PayloadError themselves."""


def _rejected(e: PayloadError) -> str:
    cause = e.__cause__
    if cause is not None and not isinstance(cause, PayloadError):
        raise Wrapped(f"{type(cause).__name__}: {cause}") from cause
    return "rejected"


def t_update(msg: bytes, codec: Codec) -> str:
    agg = fedzip.mean(codec)
    acc = agg.accumulator({k: torch.zeros(s) for k, s in TEMPLATE.items()}, decode_each=True)
    try:
        m = decode_message(msg, expect=Kind.UPDATE)
        update = acc.decode_update(m)
        acc.fold_message(m)
    except PayloadError as e:
        return _rejected(e)
    _check_params(update)
    assert all(bool(torch.isfinite(s).all()) for s in acc.sums.values()), "non-finite running sums"
    return "ok"


def t_broadcast(msg: bytes, codec: Codec) -> str:
    try:
        params = decode_params(decode_message(msg, expect=Kind.BROADCAST), TEMPLATE, as_policy(codec))
    except PayloadError as e:
        return _rejected(e)
    _check_params(params)
    return "ok"


def t_codec(body: bytes, codec: Codec, shape: tuple[int, ...]) -> str:
    try:
        out = codec.decode(body, shape)
    except PayloadError:
        return "rejected"
    assert isinstance(out, torch.Tensor), f"decode returned {type(out).__name__}"
    assert tuple(out.shape) == shape, f"decode gave shape {tuple(out.shape)} for {shape}"
    assert out.is_floating_point(), f"decode gave dtype {out.dtype}"
    return "ok"


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


class Findings:
    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str], dict] = {}

    def add(self, target: str, codec: str, what: str, data: bytes, detail: str) -> None:
        key = (target, codec, what)
        g = self.groups.setdefault(key, {"count": 0, "data": data, "detail": detail})
        g["count"] += 1
        if len(data) < len(g["data"]):
            g["data"], g["detail"] = data, detail

    def __len__(self) -> int:
        return len(self.groups)


def run_one(fn, args, target, name, data, findings: Findings, stats: Counter, slow: float, measure: bool):
    if measure:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        outcome = fn(*args)
    except AssertionError as e:
        findings.add(target, name, f"invalid result: {e}", data, str(e))
        outcome = "finding"
    except Wrapped as e:
        c = e.__cause__
        tb = traceback.extract_tb(c.__traceback__)[-1] if c is not None else None
        where = f" at {Path(tb.filename).name}:{tb.lineno}" if tb else ""
        findings.add(target, name, f"codec raised {type(c).__name__}{where} (wrapped as PayloadError)",
                     data, str(e))
        outcome = "finding"
    except Exception as e:  # any other exception type is a finding
        tb = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        findings.add(target, name, f"{type(e).__name__} at {where}", data, f"{type(e).__name__}: {e}")
        outcome = "finding"
    finally:
        dt = time.perf_counter() - t0
        if measure:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            if peak > 16 * TEMPLATE_BYTES + (1 << 20):
                findings.add(target, name, "allocation above bound", data, f"peak {peak} bytes traced")
    if dt > slow:
        findings.add(target, name, "slow decode", data, f"{dt:.2f} s")
    stats[(target, name, outcome)] += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="total fuzzing time (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", type=float, default=1.0, help="seconds above which a decode is reported")
    ap.add_argument("--out", default=None, help="write each finding's smallest input under this folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    notes: list[str] = []
    codecs = all_codecs(notes)
    findings, stats = Findings(), Counter()
    valid, bodies = {}, {}
    for i, (name, c) in enumerate(list(codecs.items())):
        try:  # the codec contract: any finite float tensor of any shape encodes
            valid[name] = valid_messages(c, i)
            bodies[name] = {s: c.encode(update_of(7)[k], torch.Generator().manual_seed(1))
                            for k, s in TEMPLATE.items()}
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            findings.add("encode", name, f"{type(e).__name__} at {Path(tb.filename).name}:{tb.lineno}",
                         b"", f"encoding the template tensors {TEMPLATE}: {type(e).__name__}: {e}")
            del codecs[name]
    for note in notes:
        print(f"  note: {note}")
    print(f"fuzzing {len(codecs)} codec settings for {args.seconds:.0f} s: {', '.join(codecs)}")
    donors = [m for pair in valid.values() for m in pair]
    deadline = time.monotonic() + args.seconds
    i = 0
    names = list(codecs)
    while time.monotonic() < deadline:
        name = names[i % len(names)]
        codec = codecs[name]
        update, broadcast = valid[name]
        measure = rng.random() < 0.05
        kind = (i // len(names)) % 5  # every codec gets every target
        if kind == 0:
            m = mutate(update, rng, donors)
            run_one(t_update, (m, codec), "update", name, m, findings, stats, args.slow, measure)
        elif kind == 1:
            m = mutate(broadcast, rng, donors)
            run_one(t_broadcast, (m, codec), "broadcast", name, m, findings, stats, args.slow, measure)
        elif kind == 2:
            m = mutate(rng.choice((update, broadcast)), rng, donors)
            run_one(t_wire, (m, codec), "wire", name, m, findings, stats, args.slow, measure)
        elif kind == 3:
            key = rng.choice(list(TEMPLATE))
            shape = TEMPLATE[key]
            body = bodies[name][shape]
            b = mutate(body, rng, []) if rng.random() < 0.8 else rng.randbytes(rng.randint(0, 2 * len(body) + 8))
            run_one(t_codec, (b, codec, shape), "codec", name, b, findings, stats, args.slow, measure)
        else:
            raw = rng.randbytes(rng.randint(0, 300))
            if rng.random() < 0.7:
                raw = struct.pack("<4sBBHH", MAGIC, VERSION, rng.choice((1, 2)), rng.randrange(8),
                                  rng.randrange(8)) + raw
            run_one(t_wire, (raw, codec), "random", name, raw, findings, stats, args.slow, False)
        i += 1

    print(f"\n{i} inputs in {args.seconds:.0f} s\n")
    print(f"{'codec':22s} {'target':10s} {'inputs':>8s} {'rejected':>9s} {'accepted':>9s} {'findings':>9s}")
    per = defaultdict(Counter)
    for (target, name, outcome), n in stats.items():
        per[(name, target)][outcome] += n
    for (name, target), c in sorted(per.items()):
        print(f"{name:22s} {target:10s} {sum(c.values()):8d} {c['rejected']:9d} {c['ok']:9d} {c['finding']:9d}")
    if not findings:
        print("\nno findings: every mutant raised PayloadError or decoded to a valid, finite result")
        return 0
    print(f"\n{len(findings)} finding(s):")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for n, ((target, name, what), g) in enumerate(sorted(findings.groups.items())):
        print(f"\n[{n}] {target} / {name}: {what} ({g['count']}x)\n    {g['detail'][:300]}")
        print(f"    smallest input ({len(g['data'])} bytes): {g['data'][:96].hex()}{'...' if len(g['data']) > 96 else ''}")
        if out:
            (out / f"finding-{n}-{target}-{name.replace(':', '_').replace('=', '')}.bin").write_bytes(g["data"])
    return 1


if __name__ == "__main__":
    sys.exit(main())
