"""Every kernel launch of the backend goes through `launch`, so tests can count launches and the
ahead-of-time compile check can record the exact arguments of each launch instead of running it."""
from __future__ import annotations

import contextlib
from typing import Callable, List

_observers: List[Callable] = []


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int) -> None:
    """kernel[grid](**args, **constexprs) unless an observer (a recorder) returns True to stop it."""
    skip = False
    for observe in _observers:
        skip = observe(kernel, grid, args, constexprs, num_warps) or skip
    if not skip:
        kernel[grid](**args, **constexprs, num_warps=num_warps)


@contextlib.contextmanager
def observe_launches(record_only: bool = False):
    """Yields a list that collects (kernel name, grid, args, constexprs, num_warps) of every launch in the block.

    record_only=True skips the launches (used with meta tensors to collect compile signatures).
    """
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
