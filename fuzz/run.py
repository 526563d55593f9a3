"""The fuzzer command: ``python -m fuzz.run --seconds N [--harness NAME] [--seed S]``.

A deterministic (seeded) mutational fuzzer over the harnesses of
:mod:`fuzz.harnesses`. Each harness starts from a corpus of valid inputs made
by the core itself (:mod:`fuzz.world`) and draws each new input from one of:

- byte-level mutation of a corpus entry, with crossover (:func:`gen.mutate_bytes`);
- structure-aware mutation: decode a seed, change its value tree, re-encode,
  and re-sign with the world's keys so the input reaches the rules behind
  the signature checks;
- generation: a random CBOR item (nested maps/arrays, tags, indefinite
  items, maps as map keys, huge lengths, deep nesting) placed where the
  decoder will reach it;
- a known-hostile shape on its own (:func:`gen.cbor_nasty`, :func:`gen.json_nasty`).

An input whose outcome (verdict, refusal code and the gist of its detail) was
not seen before joins the corpus: cheap feedback that steers mutation toward
new checks without tracing.

Time is split across the harnesses round-robin in short slices, so even a
20-second run gives every harness its share. The same ``--seed`` gives the
same input sequence per harness (how far it gets depends on the machine).

Exit status: 0 when every input decoded or was refused in budget; 1 on any
violation, after printing the harness, the reason and a reproducer in hex
(also saved under ``fuzz/corpus-out/``). Re-run one with
``python -m fuzz.run --harness NAME --replay HEX``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import gen
from .harnesses import Harness, Result, Violation, execute, make_harnesses
from .world import World

SLICE_SECONDS = 0.25
MAX_CORPUS = 2000
MAX_INPUT = 1 << 16
OUT_DIR = Path(__file__).resolve().parent / "corpus-out"


@dataclass
class _State:
    harness: Harness
    rng: random.Random
    corpus: list[bytes]
    seen: set[str] = field(default_factory=set)
    inputs: int = 0
    accepted: int = 0
    codes: Counter = field(default_factory=Counter)
    slowest: float = 0.0
    slowest_size: int = 0
    slowest_budget: float = 0.0
    violation: Violation | None = None
    generator_errors: int = 0


def _next_input(state: _State) -> bytes:
    try:
        return _make_input(state)
    except Exception as exc:  # noqa: BLE001 - a fuzzer bug must not end a long run
        state.generator_errors += 1
        if state.generator_errors == 1:
            print(f"note: {state.harness.name} input generator raised {exc!r}", file=sys.stderr)
        return gen.mutate_bytes(state.rng.choice(state.harness.seeds), state.rng)


def _make_input(state: _State) -> bytes:
    rng, h = state.rng, state.harness
    roll = rng.random()
    if roll < 0.45:
        base = rng.choice(state.corpus)
        other = rng.choice(state.corpus)
        return gen.mutate_bytes(base, rng, other, max_len=MAX_INPUT)
    if roll < 0.72:
        return h.structured(rng)[:MAX_INPUT]
    if roll < 0.94:
        return h.wrap(gen.cbor_item(rng), rng)[:MAX_INPUT]
    if h.text and rng.random() < 0.5:
        return gen.json_nasty(rng)[:MAX_INPUT]
    return h.wrap(gen.cbor_nasty(rng), rng)[:MAX_INPUT] if rng.random() < 0.5 else gen.cbor_nasty(rng)


def _record(state: _State, data: bytes, result: Result) -> None:
    state.inputs += 1
    primary = result.outcome.split("|", 1)[0]
    if primary.startswith("ok"):
        state.accepted += 1
    else:
        state.codes[primary.split(":", 1)[0]] += 1
    if result.seconds > state.slowest:
        state.slowest, state.slowest_size, state.slowest_budget = result.seconds, len(data), result.budget
    if result.outcome not in state.seen:
        state.seen.add(result.outcome)
        if len(state.corpus) < MAX_CORPUS:
            state.corpus.append(data)
        else:
            state.corpus[state.rng.randrange(len(state.harness.seeds), MAX_CORPUS)] = data


def _run_one(state: _State, world: World, data: bytes, budget_scale: float) -> None:
    try:
        result = execute(state.harness, data, world, budget_scale=budget_scale)
    except Violation as violation:
        state.violation = violation
        return
    _record(state, data, result)


def _report_violation(v: Violation) -> None:
    digest = hashlib.sha256(v.data).hexdigest()[:16]
    print(f"\nVIOLATION in harness {v.harness}: {v.reason}", file=sys.stderr)
    print(f"reproducer ({len(v.data)} bytes): {v.data.hex()}", file=sys.stderr)
    try:
        OUT_DIR.mkdir(exist_ok=True)
        path = OUT_DIR / f"{v.harness}-{digest}.bin"
        path.write_bytes(v.data)
        print(f"saved to {path}", file=sys.stderr)
    except OSError:
        pass
    print(f"replay: python -m fuzz.run --harness {v.harness} --replay {v.data.hex()[:64]}"
          f"{'...' if len(v.data) > 32 else ''}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="total run time, split across harnesses")
    parser.add_argument("--harness", action="append", help="run only this harness (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every per-input time budget (for slow machines)")
    parser.add_argument("--replay", metavar="HEX", help="run one input (hex) through --harness and print its outcome")
    parser.add_argument("--list", action="store_true", help="list the harnesses and exit")
    args = parser.parse_args(argv)

    world, harnesses = make_harnesses()
    if args.list:
        for name, h in harnesses.items():
            print(f"{name:12} {len(h.seeds)} seeds")
        return 0
    names = args.harness or list(harnesses)
    unknown = [n for n in names if n not in harnesses]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)} (have: {', '.join(harnesses)})")

    if args.replay is not None:
        data = bytes.fromhex(args.replay)
        status = 0
        for name in names:
            try:
                result = execute(harnesses[name], data, world, budget_scale=args.budget_scale)
            except Violation as v:
                _report_violation(v)
                status = 1
                continue
            print(f"{name}: {result.outcome} ({result.seconds * 1000:.2f} ms, budget {result.budget * 1000:.1f} ms)")
        return status

    states = [
        _State(harnesses[n], random.Random((args.seed << 32) ^ zlib.crc32(n.encode())), list(harnesses[n].seeds))
        for n in names
    ]
    # Every seed first: they must pass too.
    for state in states:
        for seed in state.harness.seeds:
            _run_one(state, world, seed, args.budget_scale)
            if state.violation:
                break

    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        live = [s for s in states if s.violation is None]
        if not live:
            break
        for state in live:
            slice_end = min(time.perf_counter() + SLICE_SECONDS, deadline)
            while time.perf_counter() < slice_end:
                _run_one(state, world, _next_input(state), args.budget_scale)
                if state.violation:
                    break
    elapsed = time.perf_counter() - started

    print(f"fuzz: seed {args.seed}, {elapsed:.1f} s, {len(states)} harnesses")
    print(f"{'harness':<11} {'inputs':>8} {'decoded':>8} {'refused':>8} {'corpus':>6} {'slowest':>9} "
          f"{'budget':>8}  top refusals")
    total = 0
    for s in states:
        total += s.inputs
        top = ", ".join(f"{c} {n}" for c, n in s.codes.most_common(3))
        print(f"{s.harness.name:<11} {s.inputs:>8} {s.accepted:>8} {s.inputs - s.accepted:>8} {len(s.corpus):>6} "
              f"{s.slowest * 1000:>7.2f}ms {s.slowest_budget * 1000:>6.1f}ms  {top}"
              f"{'  (' + str(s.slowest_size) + ' B slowest)' if s.slowest_size else ''}")
    violations = [s.violation for s in states if s.violation is not None]
    print(f"total: {total} inputs, {len(violations)} violation(s)")
    for v in violations:
        _report_violation(v)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
