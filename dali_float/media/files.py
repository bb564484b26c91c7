"""Media files: find the video clips under a folder (whole videos, or the segments a CSV names), and
the side audio file beside a clip."""
from __future__ import annotations

import heapq
import logging
import os
from operator import itemgetter
from pathlib import Path

from dali_float.errors import EnvironmentProblem, UsageError
from dali_float.media.segments import ClipSpec, read_segments

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
_VIDEO_SUFFIXES = frozenset(VIDEO_EXTENSIONS)  # a hash lookup per file (scan_videos)
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
    """`discover_videos` as (clip id, path string) pairs: one directory read and one stat per folder, each
    folder (identified by st_dev and st_ino) read once however many links lead to it, and no system call
    or Path object per plain file (a million clips are listed in seconds).

    Raises EnvironmentProblem when a folder exists but cannot be listed: skipping it would make its clips
    look deleted, and a run would drop their cached features.
    """
    root = Path(root)
    if root.is_file():
        return [(root.name, str(root))] if root.suffix.lower() in VIDEO_EXTENSIONS else []
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; give the folder that holds the videos")
    found: list[tuple[str, str]] = []  # (clip id, path)
    links: list[str] = []  # the paths of symlinked files: only with one can two entries be one file
    folder_keys: dict[str, tuple[int, int]] = {}  # folder path -> its (st_dev, st_ino)
    visited: set[tuple[int, int]] = set()
    # Folders in increasing order of their id prefix: a child's prefix is greater than its parent's, so
    # the first visit of a folder is through its smallest path, and so is the first listing of each file
    # in it (what sorting every path and keeping the first of each file gave). A later path to a visited
    # folder (another link, or a loop back to an ancestor) is not followed.
    heap: list[tuple[str, str]] = [("", str(root))]  # (id prefix, folder path)
    while heap:
        prefix, folder = heapq.heappop(heap)
        listed = _list_folder(folder, visited)
        if listed is None:
            continue
        folder_keys[folder], entries = listed
        # The loop below runs once per file (a million times): each test is as cheap as it can be made.
        for e in entries:
            name = e.name
            try:
                is_dir = e.is_dir()  # follows symlinks (a stat only for a link)
            except OSError:
                is_dir = False
            if is_dir:
                heapq.heappush(heap, (f"{prefix}{name}/", e.path))
                continue
            # os.path.splitext's extension (none for a name of leading dots), without its two calls per file;
            # only a name starting with a dot can be a resource fork or all dots before its extension.
            dot = name.rfind(".")
            if (dot <= 0 or name[dot:].lower() not in _VIDEO_SUFFIXES
                    or name[0] == "." and (name.startswith("._") or not name[:dot].strip("."))):
                continue
            found.append((prefix + name, e.path))
            if e.is_symlink():
                links.append(e.path)
    found.sort(key=itemgetter(0))
    if not links:  # every folder was read once: every plain entry is its own file
        return found
    linked = set(links)
    unique, seen = [], set()
    for clip_id, path in found:
        # A plain entry is (its folder's key, its name); a link, the file it leads to, named the same way.
        folder, name = os.path.split(path)
        identity = _linked_file_identity(path) if path in linked else (folder_keys[folder], name)
        if identity in seen:
            log.debug("%s: same file as an earlier clip, skipped", clip_id)
            continue
        seen.add(identity)
        unique.append((clip_id, path))
    return unique


def _list_folder(folder: str, visited: set[tuple[int, int]]) -> tuple[tuple[int, int], list[os.DirEntry]] | None:
    """(st_dev, st_ino) and entries of `folder`, marking it visited; None when it was visited already or
    is gone (removed since its parent was listed). EnvironmentProblem when it exists but cannot be read."""
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in visited:
            return None
        visited.add(key)
        return key, list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):  # removed (or replaced by a file) meanwhile: simply gone
        log.debug("%s: gone while the data root was listed, skipped", folder)
        return None
    except OSError as err:
        raise EnvironmentProblem(
            f"{folder}: cannot list this folder ({err.strerror or err}); nothing was changed. Fix its permissions "
            f"(or move it out of --data_root) and run the same command again") from None


def _linked_file_identity(path: str) -> tuple:
    """The file a symlink leads to, as (its folder's (st_dev, st_ino), its name): the identity a plain entry
    of that folder has; its real path string when that folder cannot be stat-ed (a dangling link)."""
    real = os.path.realpath(path)
    folder, name = os.path.split(real)
    try:
        st = os.stat(folder)
    except OSError:
        return ("", real)
    return ((st.st_dev, st.st_ino), name)


def discover_clips(root: Path, segments: Path | None = None) -> list[ClipSpec]:
    """The clips of a data root, sorted by clip id: every video under it (`discover_videos`), or, with
    a segments CSV, the segment of each row (`dali_float.media.segments.read_segments`)."""
    if segments is not None:
        if not Path(root).is_dir():
            raise UsageError(f"{root}: no such folder; give the folder the --segments file's videos are relative to")
        clips = read_segments(Path(segments), Path(root))
        found: dict[Path, bool] = {}  # one stat per video, however many rows cut it
        for spec in sorted(clips, key=lambda c: int(c.where.rsplit(":", 1)[1])):  # the first bad row in the file
            if not found.setdefault(spec.path, os.path.exists(spec.path)):
                raise UsageError(f"{spec.where}: the video {spec.path} does not exist; fix that row (videos are "
                                 f"relative to --data_root {root}) or --data_root")
        return clips
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
