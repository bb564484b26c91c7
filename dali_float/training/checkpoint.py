"""Checkpoints: atomic writes, the newest K kept, a `latest` pointer, RNG capture, compatibility checks.

Layout under <output_dir>/checkpoints/:
    step_00000040.pt   one torch.save'd dict (CHECKPOINT_VERSION; tensors and plain Python only,
                       so it loads with weights_only=True)
    latest             the file name of the newest checkpoint (one line)

A checkpoint is written to a temporary name, flushed, fsynced and renamed, then `latest` is replaced
the same way: a process killed at any moment leaves the previous checkpoint, and a pointer to a whole
file, in place.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dali_float.config import Preset
from dali_float.atomic import TMP_MARKER, write_atomic
from dali_float.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dali_float.training"  # the "format" entry of every checkpoint
CHECKPOINT_VERSION = 1
LATEST = "latest"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_name(step: int, suffix: str) -> str:
    """A run's file of `step` (checkpoints, sample videos): one zero-padding, 8 digits, so names sort by step."""
    return f"step_{step:08d}{suffix}"


class CheckpointStore:
    """The checkpoints of one run folder."""

    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep  # 0: keep all

    def path_for(self, step: int) -> Path:
        return self.directory / step_name(step, ".pt")

    def checkpoints(self) -> list[Path]:
        """Whole checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The file `latest` names; the newest file when the pointer is missing or dangling; None if empty."""
        pointer = self.directory / LATEST
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if named.is_file():
                return named
        files = self.checkpoints()
        return files[-1] if files else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` as the checkpoint of `step`, point `latest` at it, drop all but the newest K."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        write_atomic(path, lambda f: torch.save(state, f))
        write_atomic(self.directory / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
        self._prune(keep_path=path)
        return path

    def _prune(self, keep_path: Path) -> None:
        for leftover in self.directory.glob(f"*{TMP_MARKER}*"):  # a save killed half-way
            leftover.unlink(missing_ok=True)
        if self.keep:
            for old in [p for p in self.checkpoints() if p != keep_path][:-(self.keep - 1) or None]:
                old.unlink(missing_ok=True)


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file as is, or the newest checkpoint of a run folder (or of its checkpoints/ folder)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            found = CheckpointStore(folder).latest()
            if found is not None:
                return found
        raise CheckpointError(f"{path}: no checkpoint in that folder")
    raise CheckpointError(f"{path}: no such checkpoint file or run folder")


def resolve_resume(resume: str, store: CheckpointStore) -> Path:
    """The checkpoint `--resume` names: "latest" (of this run's folder), a file, or a run folder."""
    if resume == LATEST:
        path = store.latest()
        if path is None:
            raise CheckpointError(f"--resume latest: no checkpoint in {store.directory} (drop --resume to start "
                                  f"a new run, or pass --output_dir of the run to continue)")
        return path
    try:
        return find_checkpoint(Path(resume))
    except CheckpointError as err:
        raise CheckpointError(f"--resume {err}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (CheckpointError, one line, when it is not one of ours)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: one line for the user
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    return checked_training_checkpoint(state, path)


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a checkpoint of this trainer (of any version), not e.g. FLOAT's float.pth."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def checked_training_checkpoint(obj: Any, path: Path) -> dict[str, Any]:
    """`obj` (a loaded file) when it is a training checkpoint of CHECKPOINT_VERSION; CheckpointError otherwise."""
    if not is_training_checkpoint(obj) or obj.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a dali-float training checkpoint of version {CHECKPOINT_VERSION}")
    return obj


def check_preset(state: dict[str, Any], path: Path, preset: Preset, fix: str) -> None:
    """CheckpointError when the checkpoint belongs to another preset (or another version of it); `fix`
    says what else to pass."""
    saved = state["preset"]
    if saved["name"] != preset.name or saved["digest"] != preset.digest():
        raise CheckpointError(f"{path} belongs to preset {saved['name']!r} (digest {saved['digest'][:12]}); this "
                              f"run uses preset {preset.name!r} (digest {preset.digest()[:12]}): pass "
                              f"--preset {saved['name']} or {fix}")


def check_resumable(state: dict[str, Any], path: Path, preset: Preset, world_size: int) -> None:
    """CheckpointError when the checkpoint cannot continue this run: another preset or world size."""
    check_preset(state, path, preset, "another --resume")
    if len(state["ranks"]) != world_size:
        raise CheckpointError(f"{path} was written by {len(state['ranks'])} rank(s); this run has {world_size}: "
                              f"resume with the same number of processes")


def check_fingerprint(state: dict[str, Any], path: Path, fingerprint: str) -> None:
    """CheckpointError when the checkpoint was trained on features of other encoder weights."""
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(f"{path} was trained on features with fingerprint {state['fingerprint'][:12]}, but the "
                              f"features of this run have {fingerprint[:12]} (other encoder weights or preset "
                              f"settings): pass the weights that run used (--motion_ckpt / --wav2vec2_path / "
                              f"--emotion_path / --emotion), or start a new run")


# --- random number generators ---------------------------------------------------------------------

def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this process draws from: torch CPU (+ CUDA of this device), numpy, python, the trainer's."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "python": random.getstate(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    saved_type = torch.device(state["generator_device"]).type
    if saved_type == generator.device.type:
        generator.set_state(state["generator"])
    else:  # a GPU run resumed on the CPU (or back): the draws cannot continue the same sequence
        log.warning("the checkpoint's training RNG ran on %s, this run on %s: it is reseeded, not continued",
                    saved_type, generator.device.type)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
