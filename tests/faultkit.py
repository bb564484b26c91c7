"""Real faults for the fault-injection tests (tests/test_faults_*.py): small corpora, the scripts run as
separate processes, a mount namespace with a small tmpfs or a read-only bind mount (CI runs as root),
process trees and their signals. No hook inside the code under test is used where a real fault can be made.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from dali_float import demo
from dali_float.cache import format as cf
from dali_float.cache.index import ClipIndex, committed_ids
from dali_float.config import TINY_PRESET
from dali_float.models import ModelSources
from dali_float.preprocess import cache_fingerprint

REPO = Path(__file__).resolve().parents[1]
P = TINY_PRESET
CROP = "center"  # the synthetic heads are drawn already framed
FP = cache_fingerprint(P, ModelSources(), CROP)


def make_clip(path: Path, num_frames: int = 66, seed: int = 0) -> Path:
    """A short H.264/AAC talking head (64x64, 25 fps) at `path`."""
    frames, wave, _ = demo.synth_talking_head(num_frames, 64, fps=25.0, seed=seed)
    return demo.write_clip(Path(path), frames, 25.0, audio=wave)


def make_corpus(root: Path, clips: int = 3, num_frames: int = 66, first_seed: int = 0) -> Path:
    for i in range(clips):
        make_clip(root / f"clip{i}.mp4", num_frames, seed=first_seed + i)
    return root


def layout_of(cache_dir: Path) -> cf.CacheLayout:
    return cf.CacheLayout(cf.cache_root(cache_dir, P, FP))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def common_args(data: Path, cache_dir: Path) -> list[str]:
    return ["--preset", P.name, "--data_root", str(data), "--cache_dir", str(cache_dir), "--crop", CROP,
            "--no_progress"]


def script_command(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / name), *args]


def run_script(name: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python <name> args...` to the end: its exit code, stdout and stderr."""
    return subprocess.run(script_command(name, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start_script(name: str, *args: str, stderr_path: Path | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """`python <name> args...` started in the background (stderr to a file, to be read while it runs)."""
    err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL
    return subprocess.Popen(script_command(name, *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                            env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(done: subprocess.CompletedProcess, code: int) -> str:
    """The process exited `code` with exactly one `error:` line and no traceback; that line."""
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def committed(layout: cf.CacheLayout) -> set[str]:
    """Clip ids committed in the index or in any journal (what a kill cannot take back)."""
    ids: set[str] = set()
    for path in [layout.index_path, *layout.journals()]:
        if path.exists():
            ids |= committed_ids(path)
    return ids


def index_rows(layout: cf.CacheLayout) -> dict[str, tuple]:
    with ClipIndex.open_readonly(layout) as index:
        return {e.clip_id: (e.status, e.shard, e.offset, e.nbytes, e.checksum) for e in index.entries()}


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(folder).glob("*")) if p.is_file()}


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 120, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


# -- processes ---------------------------------------------------------------------------------------------

def _status_of(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a dead child nobody reaped yet)."""
    status = _status_of(pid)
    return status is not None and status[1] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren: the fork server and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            status = _status_of(int(entry.name))
            if status is not None:
                children.setdefault(status[0], []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- mount namespaces ---------------------------------------------------------------------------------------

def in_mount_namespace(setup: str, code: str, *args: str, timeout: float = 600) -> dict:
    """Run `setup` (shell: mounts) then `python -c code args...` in a private mount namespace (the mounts
    vanish with it); `code` prints one JSON object as its last line of stdout, which is returned."""
    command = f"set -e\n{setup}\nexec {sys.executable} -c \"$0\" \"$@\""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", command, code, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# The start of every namespace driver: run the scripts, report what happened.
DRIVER_PRELUDE = '''
import json, os, subprocess, sys
from pathlib import Path
sys.path[:0] = [os.environ["PYTHONPATH"].split(":")[0], os.environ["PYTHONPATH"].split(":")[1]]
from faultkit import run_script, common_args, layout_of, committed, file_sizes, index_rows, error_lines
def done_of(p):
    return {"code": p.returncode, "errors": error_lines(p.stderr), "traceback": "Traceback" in p.stderr,
            "stderr": p.stderr[-3000:]}
'''
