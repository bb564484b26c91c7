"""The errors a user can cause, each with one clear line and the exit code the scripts use.

Scripts catch `DaliFloatError` at the top (see `dali_float.cli.run_main`) and print `error: <message>`
without a traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class DaliFloatError(Exception):
    """Base of every user-facing error; `str(err)` is the one line the user sees."""

    exit_code = 1


class UsageError(DaliFloatError):
    """Bad command line or environment: unknown preset, path that does not exist, missing GPU."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded: missing file, wrong keys or shapes, another preset."""


class CacheError(UsageError):
    """The feature cache is missing, stale, half-written or of another format version.

    The message always names the command that fixes it.
    """


class NoSourcesError(DaliFloatError):
    """The data root (or segment list) holds no video to preprocess: exit 1, nothing is touched."""


class MediaError(DaliFloatError):
    """One clip cannot be used (unreadable, no video stream, no audio, unsupported codec).

    Preprocessing records it as a `failed` entry and goes on with the other clips.
    """


class ClipSkipped(DaliFloatError):
    """One clip is valid but unusable for training (shorter than one window): recorded as `skipped`."""
