"""A raw-video corpus of real faces: public-domain portraits pasted, swaying a little, into larger
720p/1080p frames of a real background, off-centre, as H.264 + AAC: what `--crop face` is for.

    python -m dali_float.faces_corpus OUT_DIR [--seconds 4] [--clips 4]

The built-in demo corpus is drawn heads that are already framed (it uses `--crop center`); this one is
the opposite case: the face covers 20-35 % of the frame height somewhere in a wide frame, and moves.
Portraits: Eileen Collins (NASA) and Grace Hopper (US Navy), both public domain; background CC0
(dali_float/data/README.md). The speech is the demo's synthetic voice. `ensure_faces_corpus()` writes it
once under $DALI_FLOAT_HOME (the bench measures face detection's cost on it).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from dali_float.atomic import create_folder_once
from dali_float.demo import synth_talking_head, write_clip
from dali_float.paths import home

log = logging.getLogger(__name__)

FACES_CORPUS_VERSION = 1
DATA = Path(__file__).with_name("data")


@dataclass(frozen=True)
class Portrait:
    """A photograph and the face box in it (x0, y0, x1, y1, pixels; read off the photograph by eye:
    hairline or forehead to chin, cheek to cheek)."""

    name: str
    path: Path
    face: tuple[float, float, float, float]


def portraits() -> list[Portrait]:
    return [Portrait("hopper", Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
                     (165.0, 128.0, 360.0, 328.0)),
            Portrait("collins", DATA / "astronaut.jpg", (178.0, 72.0, 275.0, 172.0))]


def rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def background(width: int, height: int) -> np.ndarray:
    """A face-free real photograph (a coffee cup) stretched to width x height."""
    return np.array(Image.open(DATA / "coffee.jpg").convert("RGB").resize((width, height), Image.BILINEAR))


def paste(frame: np.ndarray, photo: np.ndarray, face: tuple, scale: float, at: tuple[int, int]):
    """Paste `photo` scaled by `scale` with its top-left at `at` (clipped to the frame). Returns the new
    frame and where the face box landed (x0, y0, x1, y1 in frame pixels)."""
    h, w = photo.shape[:2]
    small = np.array(Image.fromarray(photo).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
    out = frame.copy()
    x, y = at
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + small.shape[1], frame.shape[1]), min(y + small.shape[0], frame.shape[0])
    out[y0:y1, x0:x1] = small[y0 - y:y1 - y, x0 - x:x1 - x]
    sx, sy = small.shape[1] / w, small.shape[0] / h
    return out, (face[0] * sx + x, face[1] * sy + y, face[2] * sx + x, face[3] * sy + y)


@dataclass(frozen=True)
class FaceClip:
    """One clip: which portrait, the frame size, the face's height as a share of the frame height, where
    the face's centre is (shares of the frame), and its sway (pixels, a slow sine)."""

    name: str
    portrait: str
    width: int
    height: int
    face_share: float
    centre: tuple[float, float]
    sway_px: float


def face_clip_specs(clips: int = 4) -> list[FaceClip]:
    base = [FaceClip("hopper_720p_right", "hopper", 1280, 720, 0.28, (0.72, 0.42), 12.0),
            FaceClip("collins_720p_left", "collins", 1280, 720, 0.22, (0.25, 0.45), 8.0),
            FaceClip("hopper_1080p_left", "hopper", 1920, 1080, 0.25, (0.33, 0.40), 16.0),
            FaceClip("collins_1080p_right", "collins", 1920, 1080, 0.33, (0.68, 0.50), 10.0)]
    return [base[i % len(base)] if i < len(base) else FaceClip(**{**asdict(base[i % len(base)]),
                                                                   "name": f"{base[i % len(base)].name}_{i}"})
            for i in range(clips)]


def write_face_clip(path: Path, spec: FaceClip, seconds: float, seed: int = 0) -> dict:
    """Render and encode one clip; returns its face box per frame (for checks)."""
    portrait = {p.name: p for p in portraits()}[spec.portrait]
    photo = rgb(portrait.path)
    face_h = portrait.face[3] - portrait.face[1]
    scale = spec.face_share * spec.height / face_h
    centre_in_photo = ((portrait.face[0] + portrait.face[2]) / 2 * scale, (portrait.face[1] + portrait.face[3]) / 2 * scale)
    frames_count = int(round(seconds * 25))
    base = background(spec.width, spec.height)
    frames, boxes = [], []
    for f in range(frames_count):
        dx = spec.sway_px * np.sin(2 * np.pi * f / 75)  # a 3 s sway
        at = (round(spec.centre[0] * spec.width - centre_in_photo[0] + dx), round(spec.centre[1] * spec.height - centre_in_photo[1]))
        frame, box = paste(base, photo, portrait.face, scale, at)
        frames.append(frame)
        boxes.append([round(v, 1) for v in box])
    _, audio, _ = synth_talking_head(frames_count, 32, seed=seed)
    write_clip(path, np.stack(frames), 25.0, audio=audio, x264_preset="veryfast")
    return {"face_boxes": boxes}


def generate_faces_corpus(out_dir: Path, seconds: float = 4.0, clips: int = 4) -> list[Path]:
    """Write the clips under `out_dir` (created) and `faces.json` (the specs and each frame's face box)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"faces_corpus_version": FACES_CORPUS_VERSION, "seconds": seconds, "clips": []}
    paths = []
    for i, spec in enumerate(face_clip_specs(clips)):
        path = out_dir / f"{spec.name}.mp4"
        truth = write_face_clip(path, spec, seconds, seed=i)
        meta["clips"].append({**asdict(spec), "path": path.name, **truth})
        paths.append(path)
    (out_dir / "faces.json").write_text(json.dumps(meta) + "\n")
    return paths


def ensure_faces_corpus() -> Path:
    """The corpus under $DALI_FLOAT_HOME/faces/v<version>, written once (into a temporary sibling, then
    renamed, as the demo corpus)."""
    return create_folder_once(home() / "faces" / f"v{FACES_CORPUS_VERSION}", "faces.json", generate_faces_corpus,
                              "the raw-video corpus of real faces")


def _parser():
    from dali_float.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m dali_float.faces_corpus",
                            description="write a raw-video corpus of real faces (720p/1080p, off-centre, H.264)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the folder to write the clips to")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per clip")
    parser.add_argument("--clips", type=int, default=4, help="number of clips")
    return parser


def main(argv: list[str] | None = None) -> int:
    """python -m dali_float.faces_corpus OUT_DIR [--seconds 4] [--clips 4]"""
    from dali_float.cli import setup_logging

    args = _parser().parse_args(argv)
    setup_logging()
    written = generate_faces_corpus(args.out_dir, args.seconds, args.clips)
    log.info("%d clips in %s", len(written), args.out_dir)
    return 0


if __name__ == "__main__":
    from dali_float.cli import run_main

    run_main(main)
