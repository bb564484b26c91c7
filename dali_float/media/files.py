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
    return [(clip_id, Path(path)) for clip_id, path in scan_videos(root)]


def scan_videos(root: Path) -> list[tuple[str, str]]:
    """`discover_videos` as (clip id, path string) pairs: one directory read per folder and no system
    call or Path object per file (a million clips are listed in seconds)."""
    root = Path(root)
    if root.is_file():
        return [(root.name, str(root))] if root.suffix.lower() in VIDEO_EXTENSIONS else []
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; give the folder that holds the videos")
    found: list[tuple[str, str, str]] = []  # (clip id, path, real path or "" where it is the plain one)
    linked = False  # any symlink on the way: only then can two paths be one file
    # (folder, its id prefix, its real path, the real paths of it and its ancestors, reached through a link)
    real_root = os.path.realpath(root)
    stack = [(str(root), "", real_root, frozenset([real_root]), False)]
    while stack:
        folder, prefix, real, ancestors, via_link = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            log.debug("%s: cannot list (%s), skipped", folder, err)
            continue
        for e in entries:
            name = e.name
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if target in ancestors:  # a link back up the path: a loop
                        continue
                    stack.append((e.path, f"{prefix}{name}/", target, ancestors | {target}, True))
                else:
                    child = f"{real}/{name}"
                    stack.append((e.path, f"{prefix}{name}/", child, ancestors | {child}, via_link))
                continue
            if name.startswith("._") or os.path.splitext(name)[1].lower() not in VIDEO_EXTENSIONS:
                continue
            through_link = via_link or e.is_symlink()
            linked |= through_link
            found.append((prefix + name, e.path, os.path.realpath(e.path) if through_link else f"{real}/{name}"))
    found.sort(key=lambda item: item[0])
    if not linked:  # every path is its own file
        return [(clip_id, path) for clip_id, path, _ in found]
    unique, seen = [], set()
    for clip_id, path, real in found:
        if real in seen:
            log.debug("%s: same file as an earlier clip, skipped", clip_id)
            continue
        seen.add(real)
        unique.append((clip_id, path))
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
