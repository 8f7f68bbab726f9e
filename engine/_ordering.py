"""Ordered loads and stores on shared memory — the only door to memory order in fluxrig.

Every cross-process publication (ring tail and head, doorbell flags, journal slot headers)
goes through these three functions, so the memory-model reasoning lives in one place.

What they promise
-----------------
* ``store_release(slots, i, v)``: every store this process made before it (the record bytes)
  is visible to another core before ``v`` is.
* ``load_acquire(slots, i)``: no load after it is satisfied before it.
* ``fence()``: a full fence. Release/acquire does not order a store before a *later load*;
  the doorbell protocol needs exactly that ("I set my waiting flag, then I look at your
  position" against "I move my position, then I look at your flag"), otherwise both sides
  can miss each other and a wake-up is lost.

``slots`` is an int64 (``"q"``) memoryview over shared memory; slot ``i`` is 8-byte aligned
(segments are mapped at page boundaries and every slot offset is a multiple of 8).

The C path (``engine/_ringcore.c``, used when built)
----------------------------------------------------
GCC ``__atomic`` builtins: ``__atomic_store_n(RELEASE)`` is a plain ``mov`` on x86-64 and
``stlr`` on aarch64; ``__atomic_load_n(ACQUIRE)`` is ``mov`` / ``ldar``; the fence is
``mfence`` / ``dmb ish``. Correct on both, which is why the C path is the one to build on an
ARM industrial PC. The C side checks alignment and bounds.

The pure-Python path (``engine/_ringpy.py``: no compiler at install time, or
``FLUXRIG_PURE_PYTHON=1``)
--------------------------------------------------------------------------------------
Python has no ordered stores, so this path leans on the x86-64 memory model (TSO, Intel SDM
vol. 3A §9.2.2 "Memory Ordering in P6 and More Recent Processor Families"; AMD APM vol. 2
§7.2) and says exactly what it leans on:

1. *Atomicity.* ``slots[i] = v`` on a ``"q"`` memoryview is CPython's ``pack_single``, which
   stores through ``memcpy(ptr, &x, 8)``; with a constant size the compiler emits one 8-byte
   ``mov``, and an aligned quadword access is atomic (SDM §9.1.1). ``slots[i]`` is the mirror
   load (``unpack_single``). No peer ever sees half a position.
   ``tests/test_ordering.py`` hammers one slot from two processes and finds no torn value.
2. *Release and acquire are free on x86-64.* TSO never reorders a store with an earlier
   store, nor a load with an earlier load, nor a store with an earlier load: a plain store
   is a release store and a plain load an acquire load. This is not a weaker guarantee than
   the C path's: on x86-64 GCC compiles its ``__atomic`` release store and acquire load to
   the very same plain ``mov``, and both paths copy record bytes with libc's ``memcpy`` (a
   ``rep movsb`` string store is still ordered before a later discrete store, SDM §9.2.4.1;
   glibc ends its non-temporal copy of very large blocks with ``sfence``).
3. *The interpreter keeps program order.* Each Python statement is a separate bytecode whose
   memory effects happen inside calls through type slots (``mp_ass_subscript``) that the C
   compiler cannot see through, so it cannot move one statement's stores past another's.
4. *The full fence* is an uncontended lock acquired and released. Every way CPython
   implements ``_thread.lock`` (POSIX semaphore ``sem_trywait``/``sem_post``, or a pthread
   mutex; ``PyMutex`` from 3.13) takes it with a ``lock``-prefixed read-modify-write
   (``lock cmpxchg``/``lock xadd``), and on x86-64 loads and stores are never reordered with
   a locked instruction (SDM §9.2.2): the same guarantee as ``mfence`` for ordinary memory,
   at ~125 ns instead of a system call. The fence is not decoration in Python: two processes
   racing "store mine, load yours" with nothing in between both missed the other's store in
   ~0.3 % of 1,000,000 rounds on the dev machine; with ``fence()`` between, in none. (Any
   Python call there, even an empty one, also hid it, so the proof is the SDM, not a test.) The lock is private to ``engine._ringpy`` and
   replaced in a forked child, so a fork cannot inherit it held.

What holds elsewhere: on aarch64, POWER or RISC-V plain loads and stores may be reordered
freely and a lock pair is not a full fence (acquire/release only), so 2 and 4 fail and
Python offers nothing that would mend them. The pure-Python ring is therefore refused on
any machine but x86-64 (``import engine._ordering`` raises ``ImportError`` naming the
machine): build the C extension there (a C compiler and the Python headers at install time).
The pure-Python CBOR encoder has no such limit.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Final

from engine._native import load, python_ring_allowed

__all__ = ["RING_IN_C", "fence", "load_acquire", "store_release"]

fence: Callable[[], None]
load_acquire: Callable[[memoryview, int], int]
store_release: Callable[[memoryview, int, int], None]

_core = load("engine._ringcore")
#: True when the ring's ordered operations and loops are the C ones (``engine._ringcore``),
#: False when they are ``engine._ringpy``'s; ``engine.ring`` takes its loops from the same.
RING_IN_C: Final = _core is not None
if _core is not None:
    fence, load_acquire, store_release = _core.fence, _core.load_acquire, _core.store_release
else:
    if not python_ring_allowed():
        raise ImportError(
            f"pure-Python ring needs x86-64 memory order: machine={platform.machine()}; "
            f"build the C extension engine._ringcore (install a C compiler and the Python "
            f"headers, then reinstall fluxrig)")
    from engine import _ringpy  # only here: it registers a fork hook for its fence lock

    fence, load_acquire, store_release = (_ringpy.fence, _ringpy.load_acquire,
                                          _ringpy.store_release)
