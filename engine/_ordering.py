"""Ordered loads and stores on shared memory — the only door to memory order in fluxrig.

Every cross-process publication (ring tail and head, doorbell flags) goes through these
functions, so the memory-model reasoning lives in one place. Python has no release/acquire
stores, so they are implemented in C (``engine/_ringcore.c``) with the GCC ``__atomic``
builtins:

* ``store_release``: every store this process made before it (the record bytes) is visible to
  another core before the stored value is. On x86-64 (TSO) this is a plain ``mov``; on aarch64
  it is ``stlr``.
* ``load_acquire``: no load after it is satisfied before it. x86-64: ``mov``; aarch64: ``ldar``.
* ``fence``: a full fence (``mfence`` / ``dmb ish``). Release/acquire does not order a store
  before a *later load*; the doorbell protocol needs exactly that ("I set my waiting flag,
  then I look at your position" against "I move my position, then I look at your flag"),
  otherwise both sides can miss each other and a wake-up is lost.

Slots are int64 at 8-byte aligned offsets; the C side checks alignment and bounds.
"""

from engine._ringcore import fence, load_acquire, store_release

__all__ = ["fence", "load_acquire", "store_release"]
