"""Clip segments: clips defined as time spans of longer videos (`--segments FILE`), as HDTF and CelebV-HQ
define theirs.

The file is CSV, one clip per row: `video,start_s,end_s[,clip_name]`, the video relative to the data
root, times in seconds of the video's timeline (its first frame at 0). A first row whose start_s is not a
number is a header. A row's clip id is its clip_name, else `<video>#<start>-<end>` (times as written,
normalised: `12.50` and `12.5` are one clip). Every problem is a UsageError naming the file and line.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dali_float.errors import UsageError

SEGMENT_SEPARATOR = "#"


@dataclass(frozen=True)
class ClipSpec:
    """One clip: a whole video, or the segment [start, end) seconds of one (`span_s`).

    clip_id: the video's path relative to the data root ('/'-separated), or the segment's id (below).
    Defined here, not in `media.files` (which finds whole videos and imports this module), so the two
    modules depend one way.
    """

    clip_id: str
    path: Path
    span_s: tuple[float, float] | None = None
    where: str = ""  # a segment's row: "<file>:<line>" (what an error about it names)


def format_seconds(value: float) -> str:
    """Seconds as they appear in a segment id: shortest exact decimal, no trailing zeros ("12.5", "3")."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def segment_id(video: str, start_s: float, end_s: float) -> str:
    return f"{video}{SEGMENT_SEPARATOR}{format_seconds(start_s)}-{format_seconds(end_s)}"


def read_segments(path: Path, data_root: Path) -> list[ClipSpec]:
    """The rows of a segments CSV as clips, sorted by clip id (UsageError for a bad file or row)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"--segments {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--segments {path} cannot be read ({err}); give a UTF-8 CSV file") from None
    clips: dict[str, ClipSpec] = {}
    lines: dict[str, int] = {}
    root = Path(data_root)
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(cells) not in (3, 4):
            raise UsageError(f"{where}: expected video,start_s,end_s[,clip_name], found {len(cells)} column(s)")
        video, start_text, end_text = cells[:3]
        try:
            start, end = float(start_text), float(end_text)
        except ValueError:
            if number == 1 and not clips:
                continue  # a header row
            raise UsageError(f"{where}: start_s and end_s must be seconds, found {start_text!r}, {end_text!r}") from None
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
            raise UsageError(f"{where}: the segment {start_text}-{end_text} s must have 0 <= start_s < end_s")
        for what, text in (("video", video), ("clip_name", cells[3] if len(cells) == 4 else "")):
            if "\0" in text:  # no file name can hold a NUL byte (os.stat would raise ValueError)
                raise UsageError(f"{where}: the {what} {text!r} holds a NUL character, which no file name "
                                 f"can hold; remove it from that row")
        relative = PurePosixPath(video.replace("\\", "/"))
        if not video or relative.is_absolute() or ".." in relative.parts:
            raise UsageError(f"{where}: the video {video!r} must be a path relative to --data_root {root}")
        name = cells[3] if len(cells) == 4 and cells[3] else segment_id(relative.as_posix(), start, end)
        if name in clips:
            raise UsageError(f"{where}: the clip {name!r} is already defined on line {lines[name]}; "
                             f"give every row its own clip_name or span")
        clips[name] = ClipSpec(name, root / relative, (start, end), where)
        lines[name] = number
    return [clips[k] for k in sorted(clips)]
