"""Every kernel launch of the backend goes through `launch`, so tests can count launches and the
ahead-of-time compile check can record the exact arguments of each launch instead of running it."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence

from .plan import LAUNCH_MEMBERS

_observers: List[Callable] = []
# Registers per thread ptxas may use (the hardware's 255). Without it ptxas sometimes caps a kernel of 8 warps at 128
# registers, for occupancy, and spills rather than use the registers it has.
MAX_REGISTERS = 255


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int) -> None:
    """kernel[grid](**args, **constexprs) unless an observer (a recorder) returns True to stop it."""
    skip = False
    for observe in _observers:
        skip = observe(kernel, grid, args, constexprs, num_warps) or skip
    if not skip:
        kernel[grid](**args, **constexprs, num_warps=num_warps, maxnreg=MAX_REGISTERS)


def member_tuple(values: Sequence, length: int = LAUNCH_MEMBERS) -> tuple:
    """A kernel's member tuple of pointers: the launch group's tensors, padded with the first (never read: the
    kernels index members below the group's count)."""
    values = tuple(values)
    return values + (values[0],) * (length - len(values))


def member_sizes(values: Sequence[int], length: int = LAUNCH_MEMBERS) -> tuple:
    """A kernel's member tuple of sizes, as floats (exact below 2^24): Triton specialises integers inside tuples on
    their values (1 becomes a constant, multiples of 16 get a divisibility hint), which would make the compiled
    kernel depend on the shapes; floats it passes as they are. The kernels convert back with `member_int`.
    plan.check_limits keeps every size below 2^24 (plan.MAX_OUT_FEATURES)."""
    return tuple(float(v) for v in member_tuple(values, length))


@contextlib.contextmanager
def observe_launches(record_only: bool = False):
    """Yields a list that collects (kernel name, kernel, grid, args, constexprs, num_warps) of every launch in the
    block. record_only=True skips the launches (used with meta tensors to collect compile signatures)."""
    seen = []

    def observer(kernel, grid, args, constexprs, num_warps):
        seen.append((kernel_name(kernel), kernel, grid, args, constexprs, num_warps))
        return record_only

    _observers.append(observer)
    try:
        yield seen
    finally:
        _observers.remove(observer)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))
