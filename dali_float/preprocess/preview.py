"""`preprocess.py show CLIP --preview crop.png`: a clip's first frame with the framing it was given drawn on it.

The frame is the clip's first (a segment's: the first at or after its start), upright as players show it
(the source's rotation applied, as preprocessing applies it), whole: FLOAT's square (`crop_box`, which may
reach past the frame, where preprocessing pads with black) and, with `--crop face`, the face box the crop
was made from are drawn over it in the upright pixels the entry records them in.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dali_float.cache import format as cf
from dali_float.errors import MediaError, UsageError

log = logging.getLogger(__name__)


def first_frame(entry: cf.ClipEntry) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the clip's first frame, upright. MediaError (one line) when it cannot be read."""
    import av

    start = float(entry.segment_s[0]) if entry.segment_s else 0.0
    try:
        with av.open(entry.source_path) as container:
            stream = container.streams.video[0]
            if start > 0 and stream.time_base:
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None or frame.time >= start - 0.5 / max(entry.fps, 1):
                    image = frame.to_ndarray(format="rgb24")
                    break
            else:
                raise MediaError(f"{entry.source_path}: no frame at or after {start:g} s")
    except (OSError, av.error.FFmpegError) as err:
        raise MediaError(f"{entry.source_path} cannot be read for a preview ({err})") from None
    return np.ascontiguousarray(np.rot90(image, k=(entry.source_rotation_deg // 90) % 4))


def write_preview(entry: cf.ClipEntry, out: Path) -> Path:
    """Write the first frame with the crop square (and the face box) drawn, as a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--preview {out}: give a .png file to write")
    if len(entry.crop_box) != 4:
        raise UsageError(f"{entry.clip_id} has no crop recorded ({entry.status}: {entry.reason or 'no framing'}); "
                         f"rerun preprocess.py to frame it")
    image = first_frame(entry)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = entry.crop_box
    left, top, right, bottom = min(0, x0), min(0, y0), max(w, x1), max(h, y1)  # the square may leave the frame
    fig = plt.figure(figsize=((right - left) / 100, (bottom - top) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_facecolor("black")  # where the square leaves the frame, preprocessing pads with black
    ax.imshow(image, extent=(0, w, h, 0))
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
    label = f"{entry.crop or 'crop'}: FLOAT's square"
    if entry.face_box:
        fx0, fy0, fx1, fy1 = entry.face_box
        ax.add_patch(Rectangle((fx0, fy0), fx1 - fx0, fy1 - fy0, fill=False, edgecolor="red", linewidth=1.5))
        label += " (green), the face box (red)"
    ax.text(left + 4, top + 4, label, color="white", fontsize=8, va="top",
            bbox={"facecolor": "black", "alpha": 0.5, "linewidth": 0})
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.axis("off")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    log.info("wrote %s: the first frame of %s (%dx%d) with its crop %s", out, entry.clip_id, w, h,
             [round(v, 1) for v in entry.crop_box])
    return out
