"""Media files: find the video clips under a folder (whole videos, or the segments a CSV names), and
the side audio file beside a clip."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dali_float.errors import UsageError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
AUDIO_SIDE_EXTENSIONS: tuple[str, ...] = (".wav", ".flac")


# --------------------------------------------------------------------------------------------------
# Discovery


def discover_videos(root: Path) -> list[tuple[str, Path]]:
    """All video files under `root` (recursive, symlinked folders followed), sorted by clip id.

    A clip id is the path relative to `root` with '/' separators (e.g. "Actor_01/01-01-03-01-01-01-01.mp4").
    Extensions match VIDEO_EXTENSIONS in any letter case; other files are ignored, and so are macOS
    resource forks ("._name.mp4"). A file reachable by several paths (symlinks) is listed once, under
    its smallest id; symlink loops are not followed. `root` may also be a single video file.
    """
    root = Path(root)
    if root.is_file():
        return [(root.name, root)] if root.suffix.lower() in VIDEO_EXTENSIONS else []
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; give the folder that holds the videos")
    found: list[tuple[str, str, str]] = []  # (clip id, folder, name)
    real_of: dict[tuple[str, str], str] = {}  # (folder, name) -> real path, where it is not folder/name
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = os.path.realpath(dirpath)
        # Prune links back to a folder on the current path (loops).
        ancestors = {os.path.realpath(p) for p in [dirpath, *Path(dirpath).parents]}
        dirnames[:] = [d for d in dirnames
                       if not (os.path.islink(os.path.join(dirpath, d))
                               and os.path.realpath(os.path.join(dirpath, d)) in ancestors | {here})]
        # One directory read for the links among the files (no system call per file: a million clips).
        with os.scandir(dirpath) as entries:
            links = {e.name for e in entries if e.is_symlink()}
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in filenames:
            if name.startswith("._") or os.path.splitext(name)[1].lower() not in VIDEO_EXTENSIONS:
                continue
            found.append((prefix + name, dirpath, name))
            real_of[dirpath, name] = os.path.realpath(os.path.join(dirpath, name)) if name in links \
                else os.path.join(here, name)
    found.sort(key=lambda item: item[0])
    unique, seen = [], set()
    for clip_id, dirpath, name in found:
        real = real_of[dirpath, name]
        if real in seen:
            log.debug("%s: same file as an earlier clip, skipped", clip_id)
            continue
        seen.add(real)
        unique.append((clip_id, Path(dirpath, name)))
    return unique


@dataclass(frozen=True)
class ClipSpec:
    """One clip: a whole video, or the segment [start, end) seconds of one (`span_s`).

    clip_id: the video's path relative to the data root ('/'-separated), or the segment's id
    (`dali_float.media.segments`).
    """

    clip_id: str
    path: Path
    span_s: tuple[float, float] | None = None

    @property
    def duration_hint_s(self) -> float | None:
        return None if self.span_s is None else self.span_s[1] - self.span_s[0]


def discover_clips(root: Path, segments: Path | None = None) -> list[ClipSpec]:
    """The clips of a data root, sorted by clip id: every video under it (`discover_videos`), or, with
    a segments CSV, the segment of each row (`dali_float.media.segments.read_segments`)."""
    if segments is not None:
        from dali_float.media.segments import read_segments

        if not Path(root).is_dir():
            raise UsageError(f"{root}: no such folder; give the folder the --segments file's videos are relative to")
        return read_segments(Path(segments), Path(root))
    return [ClipSpec(clip_id, path) for clip_id, path in discover_videos(root)]


def find_side_audio(video: Path) -> Path | None:
    """A same-stem .wav or .flac (any letter case) next to `video`; .wav wins; None if there is none."""
    video = Path(video)
    try:
        siblings = sorted(p for p in video.parent.iterdir() if p.stem == video.stem and p.is_file())
    except OSError:
        return None
    for ext in AUDIO_SIDE_EXTENSIONS:
        for p in siblings:
            if p.suffix.lower() == ext:
                return p
    return None
