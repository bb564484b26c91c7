"""Worker processes (preprocessing's clip workers, torch DataLoader workers, the planning probe pool) are
started by a fork server, never forked from the process that asks for them.

A forked child has its parent's memory but only the thread that called fork: a lock another thread
held stays locked for ever, and a DALI pipeline the child frees (garbage, or a cleared cache of
decoders) waits in its destructor for executor threads that live only in the parent. Both were seen
once the parent had run DALI pipelines and OpenMP ops: naive-loader workers hung in
`Executor2::Shutdown` and, late in a one-process run of the suite, died of SIGSEGV.

The fork server is a fresh interpreter (started by fork + exec, so it inherits no thread) that only
imports PRELOAD, once per process that uses it; each worker is forked from it, so it starts in
milliseconds with torch and this package imported, and holds nothing of the caller's: what it needs
comes pickled (the datasets keep that cheap: paths to reopen, weights in shared memory). The server's
only threads are OpenBLAS's idle pools (from importing NumPy), which OpenBLAS stops around a fork.

What differs from fork: a worker sees the environment variables the server started with (the first
use in this process), not later changes; and the main script is imported once more in the server,
as `__mp_main__`, so a script that starts workers needs an `if __name__ == "__main__":` guard
(train.py, preprocess.py and the bench scripts have one).
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver

# What the workers run, imported once in the server ("__main__" is Python's default: the caller's script).
PRELOAD = ("__main__", "torch", "dali_float.loaders.torch_loader", "dali_float.loaders.naive",
           "dali_float.models.audio_encoder", "dali_float.models.emotion", "dali_float.preprocess.plan",
           "dali_float.preprocess.worker")


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context to start workers with (DataLoader(multiprocessing_context=...), Pool).

    The server is started here if it does not run yet (it then imports PRELOAD before its first fork).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs
    multiprocessing.forkserver.ensure_running()
    return context
