"""Fault injection for the crash-safety tests: `point(name)` marks a step of a crash-safe write.

With DALI_FLOAT_CRASH_AT=<name>[:<n>] in the environment, the process dies at once (os._exit, no
clean-up, no flush: what SIGKILL leaves) the n-th time (default 1st) it reaches that step. Unset
(always, outside tests), a point costs one dictionary look-up. What a power cut adds (written but
not fsynced bytes lost) a process crash cannot show: the fsync before each commit is for that.

Steps: shard-append (half a record written), shard-fsync (a group's records written, not fsynced),
journal-commit (rows inserted, not committed), journal-committed (committed, the worker's parent not told
yet), journal-unlink (a journal merged, not deleted),
index-commit (an index transaction not committed), export-commit (the training view's arrays written,
training.json not yet), compact-copy / compact-fsync / compact-unlink (compaction).
"""
from __future__ import annotations

import os

ENV = "DALI_FLOAT_CRASH_AT"
CRASH_EXIT_CODE = 86
_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os._exit(CRASH_EXIT_CODE)
