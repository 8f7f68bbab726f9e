"""A deliberate slowdown for proving that ``scripts/bench --compare`` catches regressions.

Theory of operation
-------------------
A bench calls ``install_from_env()`` once, before it measures (and before it forks, so its
children inherit the change). When ``FLUXRIG_BENCH_INJECT`` is unset nothing happens and the
product runs as shipped. When it names a target and a factor (``codec:1.25``, or several
separated by commas) the target's functions are replaced, *in this process only*, by wrappers
that run the real function and add ``factor - 1`` times its duration in busy waits (paid in
lumps of ``SPIN_NS``), so every call costs ``factor`` times as much on average.
The product's code is never edited: the shim lives in ``perf/`` and is only imported by the
benches.

The wrapper itself costs time (Python call frames, ~0.2 µs on the dev VM), which on a
0.7 µs encoder would be a slowdown of its own. So the clock is read on one call in
``SAMPLE`` only, and the wrapper's cost is measured (``calibrate``: on the first call's own
arguments when the function may be called twice) and subtracted from what each call owes:
``codec:1.25`` measured 1.25-1.28x on ``engine.cbor.dumps`` and ``loads``, where a
straightforward timing wrapper made the encoder 1.6x slower.

Targets:

* ``codec``: ``engine.cbor.dumps`` and ``engine.cbor.loads``;
* ``ring``: ``engine.ring.Producer.try_write`` and ``engine.ring.Consumer.poll`` (the work,
  not the waits: ``Producer.write`` blocks on a full ring, which must not be multiplied).
"""

from __future__ import annotations

import os
import sys
import time
import timeit
from collections.abc import Callable
from typing import TypeVar

ENV = "FLUXRIG_BENCH_INJECT"

R = TypeVar("R")


class InjectError(ValueError):
    """``FLUXRIG_BENCH_INJECT`` does not say ``target:factor[,target:factor]``."""


def parse(spec: str) -> dict[str, float]:
    """``"codec:1.25,ring:1.1"`` -> ``{"codec": 1.25, "ring": 1.1}``.

    Raises:
        InjectError: an unknown target, a factor that is not a number >= 1, or a malformed
            entry; the message names the variable and the entry.
    """
    out: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        target, sep, factor_text = entry.partition(":")
        if not sep or target not in TARGETS:
            raise InjectError(f"{ENV}: entry {entry!r}: expected TARGET:FACTOR with TARGET one "
                              f"of {', '.join(sorted(TARGETS))}")
        try:
            factor = float(factor_text)
        except ValueError:
            raise InjectError(f"{ENV}: entry {entry!r}: factor={factor_text!r} is not a "
                              f"number") from None
        if not 1.0 <= factor <= 100.0:
            raise InjectError(f"{ENV}: entry {entry!r}: factor must be in [1, 100], "
                              f"got {factor}")
        out[target] = factor
    return out


SAMPLE = 64  # time one call in this many: two clock reads (~100 ns) on every call would
# cost more than the ~175 ns that 25% of a 0.7 µs encoder call is
BLOCK = 8  # timed calls per estimate of the function's duration
SPIN_NS = 20_000.0  # pay the owed time in spins of at least this much (two clock reads each)
CALIBRATION_ROUNDS = 15

Args = tuple[object, ...]


def _noop(*args: object) -> None:
    return None


def _slowed(fn: Callable[..., R], factor: float, overhead_ns: float | None,
            probe: Callable[[], Callable[..., object]] | None = None) -> Callable[..., R]:
    """The wrapper: positional arguments only, for the least overhead (see ``slow_down``)."""
    extra = factor - 1.0
    clock = time.perf_counter_ns
    calls = SAMPLE - 1  # so the very first call is timed
    best = float("inf")  # fastest timed call of the current block
    owed = 0.0  # busy wait owed per call: fn's time x extra, less the wrapper's own cost
    debt = 0.0
    overhead = overhead_ns  # None: calibrated by the first call, on its arguments

    def slowed(*args: object) -> R:
        nonlocal calls, best, owed, debt, overhead
        if overhead is None:
            overhead = calibrate(fn, probe or (lambda: _slowed(fn, 1.0, 0.0)), args)
        calls += 1
        if calls % SAMPLE:
            result = fn(*args)
        else:
            t0 = clock()
            result = fn(*args)
            best = min(best, clock() - t0)
            # the fastest of a block, not a mean: a preempted call must not count, and the
            # benches report undisturbed figures too (best of rounds)
            if calls == SAMPLE or calls % (SAMPLE * BLOCK) == 0:
                owed = max(0.0, best * extra - overhead)
                best = float("inf")
        debt += owed
        if debt >= SPIN_NS:
            until = clock() + debt
            debt = 0.0
            while clock() < until:
                pass  # a busy wait: sleeping would hand the CPU to the peer being measured
        return result

    return slowed


def calibrate(fn: Callable[..., object], probe: Callable[[], Callable[..., object]],
              args: Args) -> float:
    """What a wrapper adds to one call of ``fn(*args)``, in ns.

    Bare calls and calls through ``probe()`` (a wrapper of the same shape at factor 1,
    owing nothing) are timed in alternating rounds of ~1 ms, best of ``CALIBRATION_ROUNDS``
    each. Measured on the real function and arguments because the cost of the wrapper's
    frames and clock reads depends on the work around them: on a no-op it measured ~100 ns
    less than around ``engine.cbor.loads``.
    """
    bare, dressed = _callers(fn, args), _callers(probe(), args)
    once = timeit.Timer(bare).timeit(10) / 10
    number = max(SAMPLE, int(1e-3 / max(once, 1e-9)))
    bare_t, dressed_t = timeit.Timer(bare), timeit.Timer(dressed)
    best_bare = best_dressed = float("inf")
    for _ in range(CALIBRATION_ROUNDS):
        best_bare = min(best_bare, bare_t.timeit(number) / number)
        best_dressed = min(best_dressed, dressed_t.timeit(number) / number)
    return max(0.0, (best_dressed - best_bare) * 1e9)


def _callers(fn: Callable[..., object], args: Args) -> Callable[[], object]:
    # ``fn(*args)`` costs ~35 ns more than ``fn(a)``, and only the wrapper unpacks: timing
    # both sides with ``*args`` would miss that much of the wrapper's cost
    if len(args) == 1:
        (a,) = args
        return lambda: fn(a)
    if len(args) == 2:
        a, b = args
        return lambda: fn(a, b)
    return lambda: fn(*args)


def slow_down(fn: Callable[..., R], factor: float, *, pure: bool) -> Callable[..., R]:
    """``fn`` made ``factor`` times slower by busy waits, its results unchanged.

    One call in ``SAMPLE`` is timed; every call then owes ``factor - 1`` times the fastest
    timed call of the last ``BLOCK``, less the wrapper's own cost, paid in busy waits of
    ``SPIN_NS`` or more (a clock read on every call would cost more than the 0.18 µs that
    25% of a 0.7 µs encoder call is). The wrapper takes positional arguments only, the
    cheapest call Python has, and assumes calls of similar duration (see ``_codec`` for a
    function with two).

    Args:
        fn: the function to wrap.
        factor: >= 1; 1.25 means each call takes 25% longer (20% less throughput).
        pure: ``fn`` may be called again with the same arguments (an encoder, a decoder):
            the wrapper's cost is then calibrated on the first call, with its arguments;
            otherwise (a ring write) on a no-op, at once.
    """
    overhead = None if pure else calibrate(_noop, lambda: _slowed(_noop, 1.0, 0.0), ())
    return _slowed(fn, factor, overhead)


def _codec(factor: float) -> list[str]:
    from engine import cbor

    cbor.dumps = slow_down(cbor.dumps, factor, pure=True)  # type: ignore[assignment]
    real_loads = cbor.loads

    # strict decoding takes ~8x plain decoding's time: each gets its own wrapper (its own
    # estimate), behind a front with loads' own signature (a generic dispatcher taking
    # keywords cost ~0.6 µs per call on the dev VM, more than 25% of a plain decode)
    def front(plain_w: Callable[..., object],
              strict_w: Callable[..., object]) -> Callable[..., object]:
        def loads(data: bytes | bytearray | memoryview, strict: bool = False) -> object:
            return strict_w(data, True) if strict else plain_w(data)

        return loads

    def probe() -> Callable[..., object]:
        return front(_slowed(real_loads, 1.0, 0.0), _slowed(real_loads, 1.0, 0.0))

    cbor.loads = front(_slowed(real_loads, factor, None, probe),  # type: ignore[assignment]
                       _slowed(real_loads, factor, None, probe))
    return ["engine.cbor.dumps", "engine.cbor.loads (strict and plain apart)"]


def _ring(factor: float) -> list[str]:
    from engine import ring

    # not pure (a second write would write twice): calibrated on a no-op, which is close
    # enough for calls of ~10 µs (a batch of 64 records)
    ring.Producer.try_write = slow_down(  # type: ignore[method-assign]
        ring.Producer.try_write, factor, pure=False)
    ring.Consumer.poll = slow_down(ring.Consumer.poll, factor,  # type: ignore[method-assign]
                                   pure=False)
    return ["engine.ring.Producer.try_write", "engine.ring.Consumer.poll"]


TARGETS: dict[str, Callable[[float], list[str]]] = {"codec": _codec, "ring": _ring}


def install_from_env() -> dict[str, float]:
    """Apply ``FLUXRIG_BENCH_INJECT`` to this process; what was injected (empty: nothing).

    Announces every wrapped function on stderr, so a bench log never hides an injection.

    Raises:
        InjectError: the variable is set but malformed (see ``parse``).
    """
    spec = os.environ.get(ENV, "")
    targets = parse(spec)
    if not targets:
        return {}
    for target, factor in targets.items():
        for name in TARGETS[target](factor):
            print(f"INJECTED slowdown ({ENV}): {name} x{factor:g}", file=sys.stderr)
    return targets
