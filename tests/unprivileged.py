"""Running a check without root's power to read any file (tests run as root on CI machines).

The child keeps its user but loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its capability
bounding set before it starts, so file permissions apply to it as to anyone.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args...` with this repository importable, unable to bypass file permissions."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=repo, env=env,
                          preexec_fn=_drop_file_capabilities if os.geteuid() == 0 else None, timeout=600)
