"""Framing: which square of the source frame the motion encoder sees, decided once per clip.

Crop modes (`--crop`):
  face    FLOAT's framing (its `generate.py`, `process_img`): the face box's centre; half-side = 1.6 x the
          larger half-side of the box; zero-padded where the square leaves the frame. The box comes from a
          face detector run on frames spread over the clip (`DETECT_FPS`, at most `DETECT_MAX_FRAMES`, the
          longer side scaled to `DETECT_SIZE`), calibrated to the boxes FLOAT's detector draws
          (docs/FACE_FRAMING.md), reduced to one robust box (the median), so the head's motion stays in
          the crop for the motion latents to carry. A per-frame crop would erase that motion.
  center  the centred square of the frame (the whole frame for square video).
  none    the whole frame, which must be square; only resized.

A clip whose face cannot be framed is skipped with the reason (`ClipSkipped`): no face, a face on too
few sampled frames, a face that leaves the crop on some sampled frame, or a face too small for the
input (the crop would be upscaled more than `MAX_UPSCALE` times). Several faces: the largest one.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from dali_float.errors import ClipSkipped, UsageError

if TYPE_CHECKING:
    import torch

    from dali_float.media.probe import VideoInfo
    from dali_float.media.video import FrameDecoder, Window

# The detector, the decoder and torch are imported where a crop is decided: `preprocess.py status` needs
# only the crop modes and the framing's identity, and must not wait for torch.

log = logging.getLogger(__name__)

CROP_MODES = ("face", "center", "none")
DETECT_MODEL = "full_range"  # BlazeFace variant (docs/FACE_FRAMING.md: finds faces from 10 % of the frame height)
DETECT_FPS = 2.0  # sampled frames per second of the clip
DETECT_MIN_FRAMES, DETECT_MAX_FRAMES = 8, 240
# Longer side of the frames the detector sees: the full-range model's input, so the frames are resized
# once (in the DALI graph, antialiased, on the device) and the detector's letterbox only pads.
DETECT_SIZE = 192
DETECT_BATCH = 32  # frames per detector call
MAX_UPSCALE = 2.0  # a crop side under input_size / MAX_UPSCALE source pixels: the face is too small
MIN_FACE_SHARE = 0.8  # the face must be found on at least this share of the sampled frames

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels


def default_crop(data_root: object | None) -> str:
    """The crop the scripts use without --crop: FLOAT's face framing for user data; the centred square
    for the built-in demo corpus (data_root None), whose synthetic heads are drawn already framed."""
    return "center" if data_root is None else "face"


def check_crop(crop: str) -> str:
    if crop not in CROP_MODES:
        raise UsageError(f"--crop {crop!r} is not one of {', '.join(CROP_MODES)}")
    return crop


@dataclass(frozen=True)
class CropDecision:
    """The crop of one clip (source pixels) and what the detector saw.

    crop_box: the square x0, y0, x1, y1; may reach past the frame (zero-padded there).
    faces_seen: the most faces on one sampled frame (0 for center/none).
    face_box: the clip's robust face box (median over the sampled frames), or None.
    sampled_frames / face_frames: frames the detector saw / on which it found the chosen face.
    """

    crop_box: Box
    width: int
    height: int
    faces_seen: int = 0
    face_box: Box | None = None
    sampled_frames: int = 0
    face_frames: int = 0

    @property
    def window(self) -> Window:
        """The crop box relative to the frame (FrameDecoder's `window`)."""
        x0, y0, x1, y1 = self.crop_box
        return (x0 / self.width, y0 / self.height, x1 / self.width, y1 / self.height)

    def to_entry(self) -> dict:
        return {"crop_box": [round(v, 2) for v in self.crop_box], "faces_seen": self.faces_seen,
                "face_box": None if self.face_box is None else [round(v, 2) for v in self.face_box],
                "detect_frames": self.sampled_frames, "face_frames": self.face_frames}


def center_crop(width: int, height: int) -> CropDecision:
    from dali_float.media.video import center_square_window

    x0, y0, x1, y1 = center_square_window(width, height)
    return CropDecision((x0 * width, y0 * height, x1 * width, y1 * height), width, height)


def whole_frame_crop(width: int, height: int) -> CropDecision:
    """--crop none: the frame as it is, which must be square (the encoder's input is square)."""
    from dali_float.media.video import FULL_FRAME

    if width != height:
        raise ClipSkipped(f"the video is {width}x{height}, not square: --crop none only resizes square video; "
                          f"use --crop face (FLOAT's framing) or --crop center")
    x0, y0, x1, y1 = FULL_FRAME
    return CropDecision((x0 * width, y0 * height, x1 * width, y1 * height), width, height)


def _area(box: np.ndarray) -> np.ndarray:
    return np.clip(box[..., 2] - box[..., 0], 0, None) * np.clip(box[..., 3] - box[..., 1], 0, None)


def choose_face_crop(frame_boxes: Sequence[np.ndarray], width: int, height: int, input_size: int,
                     frame_times_s: Sequence[float] | None = None) -> CropDecision:
    """One crop for a clip from the face boxes of its sampled frames; ClipSkipped when it cannot be framed.

    frame_boxes: per sampled frame, (k, 4) float boxes x0, y0, x1, y1 in source pixels (k may be 0),
        calibrated to FLOAT's detector.
    frame_times_s: the sampled frames' times in the clip (for the skip reasons); default their index.
    The face is the largest box of each frame; its median centre and size over the frames give the clip's
    face box and FLOAT's square around it. Then on every frame the face (the box overlapping the clip's
    face box most, else the largest) must lie inside that square, and it must be found on at least
    MIN_FACE_SHARE of the frames.
    """
    from dali_float.face.blazeface import box_iou
    from dali_float.face.detector import float_crop_box

    n = len(frame_boxes)
    times = list(frame_times_s) if frame_times_s is not None else list(range(n))
    unit = "s" if frame_times_s is not None else ""
    counts = [len(b) for b in frame_boxes]
    largest = [np.asarray(b, np.float64)[np.argmax(_area(np.asarray(b, np.float64)))] for b in frame_boxes if len(b)]
    if not largest:
        raise ClipSkipped(f"no face found on any of {n} sampled frames; check the video, or use --crop center "
                          f"for video that is already framed")
    stacked = np.stack(largest)
    centre = np.median((stacked[:, :2] + stacked[:, 2:]) / 2, axis=0)
    size = np.median(stacked[:, 2:] - stacked[:, :2], axis=0)
    face_box = np.concatenate([centre - size / 2, centre + size / 2])
    crop = np.asarray(float_crop_box(face_box))
    side = crop[2] - crop[0]
    if side * MAX_UPSCALE < input_size:
        raise ClipSkipped(f"face too small: FLOAT's crop around it is {side:.0f} px, under {input_size / MAX_UPSCALE:.0f} "
                          f"px (the {input_size}x{input_size} input would be upscaled more than {MAX_UPSCALE:g}x); "
                          f"use higher-resolution video")
    found = 0
    for boxes, t in zip(frame_boxes, times):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if not len(boxes):
            continue
        # The clip's face on this frame: the box overlapping the clip's face box most; when none overlaps,
        # the largest (the same rule that chose the face), which has moved away from the crop or is another
        # face while the chosen one is missed: either way this crop cannot be trusted on this frame.
        overlap = box_iou(face_box, boxes)
        face = boxes[np.argmax(overlap)] if overlap.max() > 0 else boxes[np.argmax(_area(boxes))]
        found += 1
        outside = max(crop[0] - face[0], crop[1] - face[1], face[2] - crop[2], face[3] - crop[3])
        if outside > 0:
            raise ClipSkipped(f"the face leaves FLOAT's crop at {t:.2f}{unit} (by {outside:.0f} px of a {side:.0f} px "
                              f"square): the head moves too much for one crop; cut the clip into segments "
                              f"(--segments) or remove it")
    if found < MIN_FACE_SHARE * n:
        raise ClipSkipped(f"the face is found on only {found} of {n} sampled frames (at least "
                          f"{MIN_FACE_SHARE:.0%} needed); check the video or cut it into segments")
    return CropDecision(tuple(float(v) for v in crop), width, height, faces_seen=max(counts),
                        face_box=tuple(float(v) for v in face_box), sampled_frames=n, face_frames=found)


def detection_positions(num_frames: int, fps: float) -> np.ndarray:
    """Which of a clip's T frames (at `fps`) the detector sees: DETECT_FPS per second, evenly spread,
    between DETECT_MIN_FRAMES and DETECT_MAX_FRAMES (never more than T)."""
    wanted = int(round(num_frames / fps * DETECT_FPS))
    count = min(num_frames, max(DETECT_MIN_FRAMES, min(DETECT_MAX_FRAMES, wanted)))
    return np.unique(np.round(np.linspace(0, num_frames - 1, count)).astype(np.int64))


def detection_size(width: int, height: int) -> tuple[int, int]:
    """(height, width) of a detection frame: the longer side DETECT_SIZE (never upscaled), aspect kept."""
    scale = min(1.0, DETECT_SIZE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class ClipFramer:
    """Decides each clip's crop (`decide`) for one worker; the detector is built on first use.

    crop: face | center | none. device: where the detector runs (the motion encoder's device).
    """

    crop: str
    device: torch.device | str = "cpu"
    _detector: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_crop(self.crop)

    @property
    def detector(self):
        if self._detector is None:
            from dali_float.models.face_detector import FaceDetector

            self._detector = FaceDetector(self.device, model=DETECT_MODEL)
        return self._detector

    def decide(self, info: VideoInfo, decoder: FrameDecoder, source_frames: np.ndarray, fps: float,
               input_size: int) -> CropDecision:
        """The clip's crop; source_frames (T,) are the source frame indices of its T frames at `fps`.
        ClipSkipped when the clip cannot be framed; MediaError when its frames cannot be decoded."""
        import torch

        from dali_float.media.video import FULL_FRAME

        if self.crop == "center":
            return center_crop(info.width, info.height)
        if self.crop == "none":
            return whole_frame_crop(info.width, info.height)
        positions = detection_positions(len(source_frames), fps)
        out_h, out_w = detection_size(info.width, info.height)
        boxes: list[np.ndarray] = []
        scale = np.array([info.width / out_w, info.height / out_h] * 2)
        batch: list[torch.Tensor] = []

        def flush() -> None:
            images = torch.cat(batch)
            batch.clear()
            # process_frames gives [-1, 1]; the detector takes [0, 1] (on the decoder's device: no copy)
            with _one_cpu_thread(images.device):
                found_all = self.detector.detect((images.float() + 1) / 2)
            for found in found_all:
                boxes.append(np.asarray(found.boxes, np.float64).reshape(-1, 4) * scale)

        for chunk in decoder.decode(info, source_frames[positions], window=FULL_FRAME, out_size=(out_h, out_w)):
            batch.append(chunk)
            if sum(len(c) for c in batch) >= DETECT_BATCH:
                flush()
        if batch:
            flush()
        return choose_face_crop(boxes, info.width, info.height, input_size, positions / fps)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the detector on one torch thread: its graph is ~300 small ops, and a second
    OpenMP thread made each op wait (measured up to 50x slower on 2 shared cores, docs/FACE_FRAMING.md)."""
    import torch

    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def framing_identity(crop: str) -> str:
    """The framing's part of the cache fingerprint: "center", "none", or "face:<detector identity>"
    (the detector's weights and calibration: another detector or calibration writes another cache)."""
    check_crop(crop)
    if crop != "face":
        return crop
    from dali_float.face.detector import FLOAT_CROP_SCALE
    from dali_float.models.face_detector import detector_identity

    return f"face:{detector_identity(DETECT_MODEL)}:scale{FLOAT_CROP_SCALE}:detect{DETECT_FPS}fps{DETECT_SIZE}px"
