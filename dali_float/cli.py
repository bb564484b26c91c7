"""What the three scripts share: logging set-up, the top-level error handler, common arguments."""
from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Callable

from dali_float.config import PRESETS
from dali_float.errors import DaliFloatError, EnvironmentProblem, Interrupted, UsageError, describe_disk

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
    except Interrupted as err:  # not an error: what was saved, and the command that continues
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)
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


def this_command() -> str:
    """The command line this process runs, as the user would type it again (`python preprocess.py ...`)."""
    return shlex.join(["python", *sys.argv])


# OS errors that are the machine's doing (a full disk, a read-only mount, an I/O error, no memory).
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM, errno.EMFILE,
                                 errno.ENFILE, errno.ESTALE})


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default in its help (appended when the text does not say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or default is argparse.SUPPRESS
                or default is None or default is False or (hasattr(default, "__len__") and not len(default))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def alias(action: argparse.Action, *names: str) -> argparse.Action:
    """Accept `names` (e.g. an old spelling kept for a release) as well as the action's own flags, hidden
    from --help and from the usage line. Returns the action (for `alias(g.add_argument(...), "--old")`)."""
    action.hidden_aliases = (*getattr(action, "hidden_aliases", ()), *names)
    return action


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every dali-float command uses it.

    - Errors are a UsageError: one `error:` line and exit 2 (via run_main), no usage dump; an unknown
      flag says which known one it resembles ("did you mean --data_root?").
    - No abbreviations (`--data_roo` is an error, not --data_root), and every `--flag_name` is also
      accepted as `--flag-name` (hidden from --help), as are the hidden aliases of `alias()`.
    - Every option's default is shown in --help (HelpFormatter).
    - `--config FILE.toml` (on every parser that has no subcommands): keys are the long flag names without
      dashes, values as TOML types them (`data_root = "/data/HDTF"`, `steps = 2000`, `no_progress = true`);
      the file's settings come first, so a flag on the command line wins; an unknown key is one error line.
    - `given_flags(namespace)`: the destinations set on the command line or in the config file (train.py
      tells a flag given with --resume from a default).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._finalized = False
        self._other_commands_flags: set[str] = set()  # flags of this command's sibling subcommands

    def error(self, message: str):
        command = self.prog if self.prog.startswith("python") else f"python {self.prog}"
        raise UsageError(f"{message} (see {command} --help)")

    # -- what the parser accepts, completed before it parses or prints help ---------------------------

    def _finalize(self) -> None:
        """Add --config (parsers without subcommands) and register the hidden spellings of every flag.

        Done at first use, not in __init__: options come from parents and groups after construction,
        and a parser only learns later whether it gets subcommands. The hidden spellings go straight into
        argparse's table of option strings (there is no public way to accept a flag that --help omits)."""
        if self._finalized:
            return
        self._finalized = True
        if self.add_help and self._subparsers is None and "--config" not in self._option_string_actions:
            self.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                              help="read settings from a TOML file: keys are the long flag names without dashes "
                                   "(e.g. data_root = \"/data/HDTF\"); flags on the command line win (default: none)")
        subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        commands = [p for a in subparsers for p in a.choices.values() if isinstance(p, ArgumentParser)]
        shared = {name for p in commands for name in p.long_flags()}
        for p in commands:  # one --config file serves every subcommand: a key of another one is not an error
            p._other_commands_flags = shared - set(p.long_flags())
        for action in list(self._actions):
            names = [s for s in action.option_strings if s.startswith("--")]
            names += list(getattr(action, "hidden_aliases", ()))
            for name in names + [n.replace("_", "-") for n in names if "_" in n]:
                self._option_string_actions.setdefault(name, action)

    def format_help(self) -> str:
        self._finalize()
        return super().format_help()

    def format_usage(self) -> str:
        self._finalize()
        return super().format_usage()

    def long_flags(self) -> dict[str, argparse.Action]:
        """Every long flag this parser accepts (hidden spellings included), by its name."""
        self._finalize()
        return {s: a for s, a in self._option_string_actions.items() if s.startswith("--")}

    # -- parsing -------------------------------------------------------------------------------------

    def parse_known_args(self, args=None, namespace=None):
        self._finalize()
        args = list(sys.argv[1:] if args is None else args)
        if isinstance(self._option_string_actions.get("--config"), argparse.Action) and self._subparsers is None:
            args = self._config_args(args) + args
        given = self._given_in(args)
        namespace, extras = super().parse_known_args(args, namespace)
        setattr(namespace, _GIVEN, frozenset(getattr(namespace, _GIVEN, frozenset())) | given)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return namespace

    def _given_in(self, args: list[str]) -> frozenset[str]:
        """Destinations of the flags in `args` that this parser knows (a flag's value is skipped)."""
        given, i = set(), 0
        while i < len(args):
            word = args[i]
            if word == "--":
                break
            action = self._option_string_actions.get(word.split("=", 1)[0]) if word.startswith("-") else None
            if action is not None:
                given.add(action.dest)
                if action.nargs is None and "=" not in word:
                    i += 1  # its value
            i += 1
        return frozenset(given)

    def _unrecognized(self, extras: list[str]) -> str:
        known = sorted({s for p in self._all_parsers() for s, a in p.long_flags().items()
                        if s in a.option_strings})
        flags = [w for w in extras if w.startswith("-")] or extras
        parts = []
        for flag in flags:
            name = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
            near = difflib.get_close_matches(name, [k[2:] for k in known], n=1, cutoff=0.6) \
                if flag.startswith("-") else []
            parts.append(f"{flag} (did you mean --{near[0]}?)" if near else flag)
        return f"unrecognized argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"

    def _all_parsers(self) -> list["ArgumentParser"]:
        found: list[ArgumentParser] = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if isinstance(sub, ArgumentParser) and sub not in found:
                        found += sub._all_parsers()
        return found

    def _config_args(self, args: list[str]) -> list[str]:
        """The settings of the --config file named in `args`, as the command-line words they stand for."""
        path = None
        for i, word in enumerate(args):
            if word == "--":
                break
            if word == "--config" and i + 1 < len(args):
                path = args[i + 1]
            elif word.startswith("--config="):
                path = word.split("=", 1)[1]
        if path is None:
            return []
        return config_file_args(Path(path), self.long_flags(), ignored=self._other_commands_flags)


_GIVEN = "_given_flags"


def given_flags(namespace: argparse.Namespace) -> frozenset[str]:
    """The destinations set on the command line or in the --config file (not left at their default)."""
    return frozenset(getattr(namespace, _GIVEN, frozenset())) - {"config"}


def config_file_args(path: Path, flags: dict[str, argparse.Action], ignored: set[str] = frozenset()) -> list[str]:
    """A TOML settings file as command-line words, checked against `flags` (a parser's long flags).

    Keys are the flag names without the leading dashes; true switches a flag on (false leaves it at its
    default), a list gives a flag that takes several values. UsageError (one line) for a file that cannot
    be read, an unknown key (with the nearest known one) or a value of the wrong kind. `ignored`: flags of
    the command's other subcommands (`preprocess.py status` reads the file `run` reads), skipped."""
    try:
        settings = tomllib.loads(path.expanduser().read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path} cannot be read ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--config {path} is not valid TOML ({err})") from None
    words: list[str] = []
    names = {s[2:]: a for s, a in flags.items() if s != "--config"}
    for key, value in settings.items():
        action = names.get(key)
        if action is None and f"--{key}" in ignored:
            continue
        if action is None:
            near = difflib.get_close_matches(key, [n for n in names if "-" not in n], n=1, cutoff=0.6)
            raise UsageError(f"--config {path}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                             + "; keys are the long flag names without dashes (see --help)")
        flag = f"--{key}"
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} takes true or false, got {value!r}")
            words += [flag] if value else []
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            words += [flag, *(str(v) for v in value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            words.append(f"{flag}={value}")  # one word: a value that starts with '-' stays a value
        else:
            raise UsageError(f"--config {path}: {key} takes one value (a string or a number), got {value!r}")
    return words


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


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "a seeded random init") -> None:
    """Where the frozen encoders' weights come from (`default`: what happens without the flag)."""
    g = parser.add_argument_group("model weights (all local; nothing is downloaded)")
    g.add_argument("--motion_ckpt", type=existing_path, default=None,
                   help=f"FLOAT checkpoint (float.pth) or a motion-encoder state dict (default: {default})")
    g.add_argument("--wav2vec2_path", type=existing_path, default=None,
                   help=f"local folder of wav2vec2-base-960h (save_pretrained layout; default: {default})")
    g.add_argument("--emotion_path", type=existing_path, default=None,
                   help=f"local folder of the speech-emotion classifier (wav2vec2, 7 classes; default: {default})")
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
