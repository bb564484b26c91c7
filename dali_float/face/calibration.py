"""Fitting and checking the box calibration (a development tool; bench/calibrate_face_box.py runs it).

Reference boxes are human annotations in WIDER FACE style (the data S3FD was trained on). For each
annotated face: frames of 720p/1080p with the face at a chosen fraction of the frame height are cut
from its photograph, BlazeFace runs on them, its box is matched to the (mapped) annotation, and the
pairs give the calibration (medians of centre shift and size ratio) and the check (IoU of FLOAT's
crop squares). The method and the numbers: docs/FACE_FRAMING.md.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import logging

import numpy as np
import torch
import torch.nn.functional as F

from dali_float.face.blazeface import box_iou
from dali_float.face.detector import BoxCalibration, float_crop_box

log = logging.getLogger(__name__)

WIDER_WIDTH = 1024  # every WIDER FACE photograph is 1024 pixels wide
QUANTILES = (0.05, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class WiderFace:
    """One annotated face: box (4,) x0, y0, x1, y1 in the photograph's original pixels, and flags."""

    image: str
    box: np.ndarray
    blur: int
    occlusion: int
    pose: int
    invalid: int

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def read_wider_gt(path: Path) -> dict[str, list[WiderFace]]:
    """wider_face_{split}_bbx_gt.txt -> {image file name: faces}.

    Records: the image path, the face count n, then max(n, 1) lines of
    x y w h blur expression illumination invalid occlusion pose.
    """
    lines = Path(path).read_text().split("\n")
    out: dict[str, list[WiderFace]] = {}
    i = 0
    while i < len(lines) and lines[i].strip():
        name = os.path.basename(lines[i].strip())
        n = int(lines[i + 1])
        faces = []
        for row in lines[i + 2:i + 2 + n]:
            x, y, w, h, blur, _expr, _illum, invalid, occlusion, pose = (int(v) for v in row.split()[:10])
            faces.append(WiderFace(name, np.array([x, y, x + w, y + h], np.float32), blur, occlusion, pose, invalid))
        out[name] = faces
        i += 2 + max(n, 1)
    return out


def clean_faces(faces: Iterable[WiderFace], min_size: float) -> list[WiderFace]:
    """Faces a person would frame: >= min_size px, valid, not heavily blurred, not occluded, typical pose."""
    return [f for f in faces if f.size >= min_size and f.invalid == 0 and f.blur < 2 and f.occlusion == 0
            and f.pose == 0]


def height_from_yolo_labels(faces: list[WiderFace], label_text: str) -> int:
    """The photograph's original height from YOLO labels (normalised boxes) of the same faces.

    Labels list the faces in the annotation file's order: height = pixel height / normalised height,
    the median over faces taller than 20 px (the labels have 4 decimals).
    """
    rows = [line.split() for line in label_text.strip().splitlines() if line.strip()]
    if len(rows) != len(faces):
        raise ValueError(f"{faces[0].image if faces else '?'}: {len(rows)} labels for {len(faces)} faces")
    ratios = [(f.box[3] - f.box[1]) / float(r[4]) for f, r in zip(faces, rows)
              if f.box[3] - f.box[1] > 20 and float(r[4]) > 0]
    if not ratios:
        raise ValueError(f"{faces[0].image}: no face tall enough to recover the image height")
    return int(round(float(np.median(ratios))))


def split_of(image: str) -> str:
    """"fit" or "check": a fixed half of the photographs by a hash of the name (no face crosses over)."""
    return "fit" if hashlib.sha256(image.encode()).digest()[0] % 2 == 0 else "check"


def frame_around(photo: torch.Tensor, face: np.ndarray, fraction: float, frame: tuple[int, int],
                 centre: tuple[float, float]) -> tuple[torch.Tensor, np.ndarray]:
    """A (3, H, W) uint8 frame cut from photo (3, h, w) so the face is `fraction` of the frame height.

    centre: where the face centre lands, as fractions of the frame (x, y). Outside the photograph is
    black. Returns the frame and the face box mapped into it (x0, y0, x1, y1 pixels).
    """
    height, width = frame
    scale = fraction * height / float(face[3] - face[1])  # frame pixels per photo pixel
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    x0 = int(np.floor(cx - centre[0] * width / scale))
    y0 = int(np.floor(cy - centre[1] * height / scale))
    x1 = int(np.ceil(x0 + width / scale))
    y1 = int(np.ceil(y0 + height / scale))
    h, w = photo.shape[1:]
    padded = torch.zeros(3, y1 - y0, x1 - x0, dtype=torch.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        padded[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = photo[:, sy0:sy1, sx0:sx1]
    out = F.interpolate(padded[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                        antialias=scale < 1)[0].round().clamp(0, 255).to(torch.uint8)
    kx, ky = width / (x1 - x0), height / (y1 - y0)
    mapped = np.array([(face[0] - x0) * kx, (face[1] - y0) * ky, (face[2] - x0) * kx, (face[3] - y0) * ky],
                      np.float32)
    return out, mapped


def best_match(reference: np.ndarray, boxes: np.ndarray, min_iou: float = 0.3) -> int | None:
    """Index of the detected box (k, 4) that overlaps the reference box (4,) most, if IoU >= min_iou."""
    if len(boxes) == 0:
        return None
    ious = box_iou(reference.astype(np.float32), boxes.astype(np.float32))
    best = int(ious.argmax())
    return best if ious[best] >= min_iou else None


def fit_calibration(raw: np.ndarray, reference: np.ndarray) -> BoxCalibration:
    """Medians over pairs (k, 4) of detector and reference boxes: centre shift / raw size, size ratios."""
    rw, rh = raw[:, 2] - raw[:, 0], raw[:, 3] - raw[:, 1]
    dx = ((reference[:, 0] + reference[:, 2]) - (raw[:, 0] + raw[:, 2])) / 2 / rw
    dy = ((reference[:, 1] + reference[:, 3]) - (raw[:, 1] + raw[:, 3])) / 2 / rh
    sx = (reference[:, 2] - reference[:, 0]) / rw
    sy = (reference[:, 3] - reference[:, 1]) / rh
    return BoxCalibration(*(round(float(np.median(v)), 4) for v in (dx, dy, sx, sy)))


def crop_iou(boxes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """IoU of FLOAT's crop square of each box (k, 4) with the square of its reference box -> (k,)."""
    out = np.empty(len(boxes), np.float32)
    for i, (a, b) in enumerate(zip(boxes, reference)):
        out[i] = box_iou(np.asarray(float_crop_box(a), np.float32), np.asarray([float_crop_box(b)], np.float32))[0]
    return out


def summary(values: np.ndarray) -> dict[str, float | int]:
    """count, mean, min, 5/25/50/75th percentiles of values (rounded to 4 decimals)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"count": 0}
    out: dict[str, float | int] = {"count": int(values.size), "mean": round(float(values.mean()), 4),
                                   "min": round(float(values.min()), 4)}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = round(float(np.quantile(values, q)), 4)
    return out


def box_relation(raw: np.ndarray, reference: np.ndarray) -> dict[str, dict]:
    """How reference boxes sit relative to detector boxes: centre shift / raw size and size ratios."""
    rw, rh = raw[:, 2] - raw[:, 0], raw[:, 3] - raw[:, 1]
    return {
        "centre_dx_over_width": summary(((reference[:, 0] + reference[:, 2]) - (raw[:, 0] + raw[:, 2])) / 2 / rw),
        "centre_dy_over_height": summary(((reference[:, 1] + reference[:, 3]) - (raw[:, 1] + raw[:, 3])) / 2 / rh),
        "width_ratio": summary((reference[:, 2] - reference[:, 0]) / rw),
        "height_ratio": summary((reference[:, 3] - reference[:, 1]) / rh),
    }


# --------------------------------------------------------------------------------------------------
# The whole run

FRACTIONS = (0.10, 0.20, 0.30, 0.40)  # face height / frame height: the framings of talking-head videos
# The constants are fitted where the box style is stable (0.20-0.40, docs/FACE_FRAMING.md); a face of
# 10 % of the frame is ~11 px in the network's input and its boxes are shaped differently.
FIT_FRACTIONS = (0.20, 0.30, 0.40)
BOOTSTRAP = 200  # resamples of the photographs for the confidence intervals of the fitted constants
FRAMES = ((720, 1280), (1080, 1920))  # (height, width)
MODELS = ("full_range", "short_range")


@dataclass(frozen=True)
class Photo:
    name: str
    pixels: torch.Tensor  # (3, H, 1024) uint8, the photograph at its original size
    faces: list[WiderFace]  # the clean faces only


def load_photos(data_dir: Path, min_size: float) -> tuple[list[Photo], dict]:
    """Photographs with at least one clean face, restored to their original size, and a count of what was read.

    data_dir holds images/*.jpg (416 x 416 copies of WIDER FACE validation photographs),
    yolo_labels/<name>.txt (their boxes normalised to the original size, which gives the original
    height) and wider_face_val_bbx_gt.txt (the annotations). docs/FACE_FRAMING.md says where from.
    """
    from PIL import Image

    gt = read_wider_gt(data_dir / "wider_face_val_bbx_gt.txt")
    photos, counts = [], {"images": 0, "images_with_clean_faces": 0, "faces": 0, "clean_faces": 0}
    for path in sorted((data_dir / "images").glob("*.jpg")):
        faces = gt[path.name]
        counts["images"] += 1
        counts["faces"] += len(faces)
        clean = clean_faces(faces, min_size)
        if not clean:
            continue
        height = height_from_yolo_labels(faces, (data_dir / "yolo_labels" / f"{path.stem}.txt").read_text())
        image = Image.open(path).convert("RGB").resize((WIDER_WIDTH, height), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        photos.append(Photo(path.name, pixels, clean))
        counts["images_with_clean_faces"] += 1
        counts["clean_faces"] += len(clean)
    return photos, counts


def collect_pairs(data_dir: Path, min_size: float = 80.0, seed: int = 0, device: str = "cpu") -> dict:
    """Detect with both models (raw boxes) on every framing of every clean face and match the annotations.

    Returns a pickle-able dict: data counts, settings, detector identities, per model the matched
    pairs (setting, split, photo, raw and reference boxes in frame pixels) and per setting the
    number of faces found / tried. The calibration constants play no part here (`evaluate` uses them).
    """
    from dali_float.face.detector import FaceDetector

    photos, counts = load_photos(data_dir, min_size)
    detectors = {m: FaceDetector(device, model=m, calibrate=False) for m in MODELS}
    pairs: dict[str, list[dict]] = {m: [] for m in MODELS}
    found = {m: {f"{h}p@{f:.2f}": [0, 0] for h, _ in FRAMES for f in FRACTIONS} | {"whole": [0, 0]} for m in MODELS}
    rng = np.random.default_rng(seed)
    log.info("%d photographs, %d clean faces of >= %.0f px; %d frames per face", len(photos),
             sum(len(p.faces) for p in photos), min_size, len(FRAMES) * len(FRACTIONS))
    for n, photo in enumerate(photos):
        if n % 20 == 0:
            log.info("photograph %d/%d", n, len(photos))
        split = split_of(photo.name)
        whole = {m: d.detect(photo.pixels[None])[0] for m, d in detectors.items()}
        for face in photo.faces:
            for m in MODELS:
                _record(pairs[m], found[m], "whole", split, face.box, whole[m].raw_boxes, photo.name)
            centres = rng.uniform((0.3, 0.35), (0.7, 0.55), size=(len(FRACTIONS), 2))
            for height, width in FRAMES:
                cut = [frame_around(photo.pixels, face.box, f, (height, width), tuple(c))
                       for f, c in zip(FRACTIONS, centres)]
                batch = torch.stack([frame for frame, _ in cut])
                for m, d in detectors.items():
                    for f, (_, mapped), det in zip(FRACTIONS, cut, d.detect(batch)):
                        _record(pairs[m], found[m], f"{height}p@{f:.2f}", split, mapped, det.raw_boxes, photo.name)
    return {"data": counts, "min_face_px": min_size, "seed": seed, "fractions": list(FRACTIONS),
            "frames": [f"{w}x{h}" for h, w in FRAMES], "identities": {m: d.identity for m, d in detectors.items()},
            "pairs": pairs, "found": found}


def evaluate(collected: dict) -> dict:
    """Fit on the "fit" half, check the fitted and the in-code constants on the other half: a JSON-able dict."""
    from dali_float.face.detector import CALIBRATIONS

    results = {k: v for k, v in collected.items() if k not in ("pairs", "found", "identities")}
    results["models"] = {m: _evaluate(collected["pairs"][m], collected["found"][m], CALIBRATIONS[m],
                                      collected["identities"][m]) for m in MODELS}
    return results


def _record(pairs: list[dict], found: dict, setting: str, split: str, reference: np.ndarray, boxes: np.ndarray,
            photo: str) -> None:
    found[setting][1] += 1
    best = best_match(reference, boxes)
    if best is not None:
        found[setting][0] += 1
        pairs.append({"setting": setting, "split": split, "photo": photo, "raw": boxes[best], "reference": reference})


def _evaluate(pairs: list[dict], found: dict, in_code: BoxCalibration, identity: str) -> dict:
    def stack(rows, key):
        return np.stack([r[key] for r in rows]).astype(np.float32) if rows else np.zeros((0, 4), np.float32)

    framed = [p for p in pairs if p["setting"] != "whole"]
    typical = [p for p in framed if float(p["setting"].split("@")[1]) in FIT_FRACTIONS]
    fit = [p for p in typical if p["split"] == "fit"]
    fitted = fit_calibration(stack(fit, "raw"), stack(fit, "reference"))
    out = {"identity": identity,
           "recall": {k: {"found": v[0], "faces": v[1], "rate": round(v[0] / max(v[1], 1), 4)} for k, v in found.items()},
           "fit_on": f"framed pairs at {', '.join(f'{f:.2f}' for f in FIT_FRACTIONS)} of the frame height, fit half",
           "pairs": {"fit": len(fit), "fit_photos": len({p["photo"] for p in fit}),
                     "check": len([p for p in typical if p["split"] == "check"]),
                     "check_photos": len({p["photo"] for p in typical if p["split"] == "check"})},
           "reference_relative_to_raw_box_fit_half": box_relation(stack(fit, "raw"), stack(fit, "reference")),
           "fitted": fitted.__dict__, "fitted_ci95_bootstrap_by_photo": _bootstrap(fit),
           "in_code": in_code.__dict__, "check": {}}
    groups = {"framed 0.20-0.40": typical, "framed all": framed}
    groups |= {s: [p for p in pairs if p["setting"] == s] for s in sorted({p["setting"] for p in pairs})}
    for setting, group in groups.items():
        rows = [p for p in group if p["split"] == "check"]
        raw, ref = stack(rows, "raw"), stack(rows, "reference")
        out["check"][setting] = {
            "raw": summary(crop_iou(raw, ref)),
            "fitted": summary(crop_iou(fitted.apply(raw), ref)),
            "in_code": summary(crop_iou(in_code.apply(raw), ref)),
        }
    return out


def _bootstrap(fit: list[dict]) -> dict[str, list[float]]:
    """95 % intervals of the fitted constants, resampling whole photographs (their pairs are correlated)."""
    photos = sorted({p["photo"] for p in fit})
    by_photo = {name: [p for p in fit if p["photo"] == name] for name in photos}
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(BOOTSTRAP):
        rows = [p for name in rng.choice(photos, size=len(photos)) for p in by_photo[name]]
        cal = fit_calibration(np.stack([p["raw"] for p in rows]), np.stack([p["reference"] for p in rows]))
        draws.append([cal.dx, cal.dy, cal.sx, cal.sy])
    low, high = np.quantile(np.asarray(draws), [0.025, 0.975], axis=0)
    return {k: [round(float(a), 4), round(float(b), 4)] for k, a, b in zip(("dx", "dy", "sx", "sy"), low, high)}
