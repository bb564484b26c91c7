"""What the three scripts share: logging set-up, the top-level error handler, common arguments."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from dali_float.config import PRESETS
from dali_float.errors import DaliFloatError, EnvironmentProblem, UsageError, describe_disk

log = logging.getLogger("dali_float")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    # DALI and transformers are chatty at INFO.
    for name in ("transformers", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(); a DaliFloatError becomes one `error:` line and its exit code."""
    try:
        code = main()
    except DaliFloatError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `preprocess.py status --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as err:  # the machine's, not a bug: one line, exit 3 (EnvironmentProblem)
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({describe_disk(err.filename)})" if err.filename and err.errno in (errno.ENOSPC, errno.EDQUOT) \
            else ""
        print(f"error: {err}{where}; fix that and run the same command again", file=sys.stderr)
        sys.exit(EnvironmentProblem.exit_code)
    sys.exit(code or 0)


# OS errors that are the machine's doing (a full disk, a read-only mount, an I/O error, no memory).
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM, errno.EMFILE,
                                 errno.ENFILE, errno.ESTALE})


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError: one `error:` line and exit 2 (via run_main), no usage dump."""

    def error(self, message: str):
        command = self.prog if self.prog.startswith("python") else f"python {self.prog}"
        raise UsageError(f"{message} (see {command} --help)")


def existing_path(value: str) -> Path:
    """argparse type: a path that must exist (a usage error, exit 2, otherwise)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return path


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="model sizes: 'float' (the real FLOAT sizes) or 'tiny' (same structure, "
                             "small; runs on a CPU). Default: tiny")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the frozen encoders' weights come from (random seeded init when not given)."""
    g = parser.add_argument_group("model weights (all local; nothing is downloaded)")
    g.add_argument("--motion_ckpt", type=existing_path, default=None,
                   help="FLOAT checkpoint (float.pth) or a motion-encoder state dict")
    g.add_argument("--wav2vec2_path", type=existing_path, default=None,
                   help="local folder of wav2vec2-base-960h (save_pretrained layout)")
    g.add_argument("--emotion_path", type=existing_path, default=None,
                   help="local folder of the speech-emotion classifier (wav2vec2, 7 classes)")
    g.add_argument("--emotion", default=None, choices=("model", "filename", "none"),
                   help="emotion source: the classifier (default), one-hot from RAVDESS-style file "
                        "names, or a uniform vector")


def add_data_arguments(parser: argparse.ArgumentParser, *, force_preprocess: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data_root", type=Path, default=None,
                   help="folder of talking-head videos (default: the built-in demo corpus)")
    g.add_argument("--cache_dir", type=Path, default=None,
                   help="where feature caches live (default: $DALI_FLOAT_HOME/features/<data root name>-<hash>, "
                        "one per corpus)")
    g.add_argument("--segments", type=existing_path, default=None,
                   help="CSV of clip segments, one clip per row: video,start_s,end_s[,clip_name] (video relative "
                        "to --data_root); default: every video under --data_root is a clip")
    g.add_argument("--crop", default=None, choices=("face", "center", "none"),
                   help="framing of the motion encoder's input: 'face' (FLOAT's: the detected face box's "
                        "centre, 1.6x its larger half-side, one crop per clip), 'center' (the centred square), "
                        "'none' (square video, resize only). Default: face; center for the built-in demo corpus")
    if force_preprocess:
        g.add_argument("--force_preprocess", action="store_true", help="recompute every clip's features")
    g.add_argument("--lock_timeout_s", type=float, default=60.0,
                   help="how long to wait while another process writes the cache (its writer lock) before "
                        "stopping with exit 3 (default 60)")


def visible_cuda_devices() -> int:
    """Number of CUDA devices torch sees (0 on a machine without a GPU or driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def env_rank() -> tuple[int, int]:
    """(rank, world_size) under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cores_per_local_rank() -> int:
    """usable_cores() shared among the torchrun ranks on this machine (LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
