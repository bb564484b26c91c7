"""The run folder (--output_dir): its settings, what `--resume` restores of them, and one owner at a time.

    <output_dir>/config.json   every setting of the run (TrainConfig.to_dict and the resolved device and
                               precision), human-readable, written atomically when a fresh run starts and
                               again when a resume changes a setting that may change
    <output_dir>/run.lock      held (flock: cache.lock.WriterLock) by the one process training into the folder,
                               with its pid, host, command and start time

`--resume` continues a run as it was set up: a setting not given is the recorded one (`train.py --resume
latest` alone continues exactly); a setting given must agree with the record, unless it is one of
MAY_CHANGE, or the run is refused in one line naming the flag, the recorded value and the given one. The
record is config.json of the checkpoint's run folder, else (a run from before config.json) the checkpoint's
own `config`. Every check happens before anything is created: a refused run leaves no folder behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from dali_float.atomic import write_atomic
from dali_float.cache.lock import WriterLock, describe_holder, holder_of
from dali_float.errors import CacheBusy, RunFolderBusy, UsageError
from dali_float.training.checkpoint import CheckpointStore, load_checkpoint, resolve_resume
from dali_float.training.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"

# What a resume may change: how long the run goes (steps), how often it saves, logs and renders, where it
# reports (wandb, the bar, the sample trace), how long it waits for the cache's lock and whether it re-does
# the cache first, and the machine: the device (the loop warns when the training RNG cannot continue on
# another kind) and the torch/naive loader's worker processes (the samples are the stream's, whatever the
# number of workers). Everything else decides which samples, which model or which updates the run makes.
MAY_CHANGE = frozenset({"steps", "save_every", "keep_checkpoints", "log_every", "log_samples", "sample_every",
                        "progress", "wandb_project", "wandb_mode", "lock_timeout_s", "force_preprocess", "device",
                        "num_workers", "resident_reserve_gb"})
# Never taken from the record: where the run is and how it continues (given, or their defaults), what starts
# a new run (--init_from, refused with --resume; the run's `init` record is kept by the trainer), and an action.
NOT_RESTORED = frozenset({"output_dir", "resume", "init_from", "force_preprocess"})
_RESOLVED = {"lr": "resolved_lr", "crop": "resolved_crop", "cache_dir": "resolved_cache_dir"}
_PATHS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if "Path" in str(f.type))


def config_from_args(values: dict[str, Any], given: frozenset[str]) -> TrainConfig:
    """train.py's TrainConfig: `values` (its arguments by name, None where not given), and with --resume the
    run's recorded settings for every one of them that was not `given` (UsageError for a given one that
    differs from the record and may not change)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in names and v is not None})
    if cfg.resume is None:
        return cfg
    recorded, where = recorded_settings(cfg)
    check_settings(cfg, recorded, where, given)
    restored = {k: _typed(k, recorded[k]) for k in names & recorded.keys() - given - NOT_RESTORED}
    return cfg.replace(**restored)


def recorded_settings(cfg: TrainConfig) -> tuple[dict[str, Any], str]:
    """(settings, where they were read) of the run `cfg.resume` continues: its folder's config.json, else
    its checkpoint's config."""
    checkpoint = resolve_resume(cfg.resume, CheckpointStore(cfg.checkpoint_dir))
    path = checkpoint.parent.parent / CONFIG_FILE  # <run>/checkpoints/step_*.pt
    try:
        if checkpoint.parent.name != "checkpoints":  # a checkpoint file kept elsewhere: its own record
            raise FileNotFoundError
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        return load_checkpoint(checkpoint)["config"], str(checkpoint)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} cannot be read ({err}): give the run's settings as flags, or remove the file to "
                         f"take them from the checkpoint") from None


def check_settings(cfg: TrainConfig, recorded: dict[str, Any], where: str,
                   given: frozenset[str] | None = None) -> None:
    """UsageError naming the first setting of `cfg` that differs from `recorded` (a run's record, read from
    `where`) and may not change on a resume. `given`: only these are compared (the others are restored);
    None: all of them (a TrainConfig made in Python)."""
    mine = cfg.to_dict()
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in MAY_CHANGE or name in NOT_RESTORED or name not in recorded or (given is not None
                                                                                  and name not in given):
            continue
        key = _RESOLVED.get(name, name)  # --lr 1e-3 agrees with a run of tiny's default learning rate
        ours, theirs = mine.get(key), recorded.get(key, recorded[name])
        if not _same(name, ours, theirs):
            raise UsageError(f"--{name} {_shown(ours)} differs from the run's {_shown(theirs)} "
                             f"({where}): drop --{name} to continue the run as it was set up, or start a new run "
                             f"in another --output_dir")


def _same(name: str, a: Any, b: Any) -> bool:
    if name in _PATHS and a is not None and b is not None:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def _shown(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def _typed(name: str, value: Any) -> Any:
    """A recorded (JSON) value as TrainConfig holds it."""
    return Path(value) if name in _PATHS and value is not None else value


def write_config(cfg: TrainConfig, resolved: dict[str, Any]) -> Path:
    """config.json of the run folder (atomically): every setting, and `resolved` (device, precision). A resume
    keeps the record's --init_from (how the run started)."""
    path = Path(cfg.output_dir) / CONFIG_FILE
    settings = {**cfg.to_dict(), **resolved}
    if cfg.resume is not None:
        try:
            settings["init_from"] = json.loads(path.read_text()).get("init_from")
        except (OSError, ValueError):
            pass
    text = json.dumps(settings, indent=1) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))
    return path


class RunFolderOwner:
    """The run folder's lock (LOCK_FILE), taken at once or refused with who holds it (RunFolderBusy, one line).

    Taking it creates the folder: call it after every check of the arguments, so that a refused run leaves
    nothing behind. Held until `release()` (the end of the run, however it ends)."""

    def __init__(self, output_dir: Path):
        self.lock = WriterLock(Path(output_dir), timeout_s=0, filename=LOCK_FILE)
        try:
            self.lock.acquire()
        except CacheBusy:
            holder = describe_holder(holder_of(self.lock.path))
            raise RunFolderBusy(f"{output_dir} is in use by {holder}; wait for that run to end (or stop it), or "
                                f"give another --output_dir") from None

    def release(self) -> None:
        self.lock.release()
