"""Forking a process that may hold DALI pipelines (DataLoader workers, the planning probe pool)."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def no_garbage_across_fork() -> Iterator[None]:
    """Fork children inside this block: garbage is collected first and the survivors are frozen.

    A child whose collector frees an inherited, unreachable DALI pipeline runs its destructor, which
    waits on executor threads that live only in the parent: the child hangs for ever (seen in the suite:
    a DataLoader worker stuck in Executor2::~Executor2, from a collection in an at-fork hook). Collected
    here, pipelines shut down in the parent, where their threads are; frozen (gc.freeze), what a child
    inherits is never examined by its collector. The parent's collector gets them back on leaving.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
