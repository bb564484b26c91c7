"""The calibration tool (dali_float.face.calibration): annotation parsing, framing, fitting, crop IoU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_float.face.calibration import (clean_faces, crop_iou, fit_calibration, frame_around, height_from_yolo_labels,
                                         read_wider_gt, split_of, summary)
from dali_float.face.detector import BoxCalibration


def test_read_wider_gt_reads_boxes_flags_and_empty_records(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("1--A/a.jpg\n2\n10 20 100 120 0 0 0 0 0 0 \n5 5 30 40 2 0 0 0 1 1 \n"
                    "2--B/b.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n3--C/c.jpg\n1\n1 2 3 4 0 0 0 1 0 0 \n")
    gt = read_wider_gt(path)
    assert list(gt) == ["a.jpg", "b.jpg", "c.jpg"]
    a0, a1 = gt["a.jpg"]
    np.testing.assert_array_equal(a0.box, [10, 20, 110, 140])
    assert (a1.blur, a1.occlusion, a1.pose, a1.invalid) == (2, 1, 1, 0)
    assert gt["b.jpg"] == [] and gt["c.jpg"][0].invalid == 1
    assert clean_faces(gt["a.jpg"], min_size=80) == [a0]
    assert clean_faces(gt["a.jpg"], min_size=130) == []


def test_image_height_comes_from_normalised_labels(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("x/p.jpg\n3\n210 146 112 154 0 0 0 0 0 0\n464 240 52 94 1 0 0 0 0 0\n700 40 126 8 0 0 0 0 0 0\n")
    faces = read_wider_gt(gt)["p.jpg"]
    height = 736
    labels = "".join(f"0 0.5 0.5 0.1 {round(float(f.box[3] - f.box[1]) / height, 4)}\n" for f in faces)
    assert height_from_yolo_labels(faces, labels) == height
    with pytest.raises(ValueError, match="2 labels for 3 faces"):
        height_from_yolo_labels(faces, "\n".join(labels.splitlines()[:2]))


def test_frame_around_puts_the_face_at_the_asked_fraction_and_place():
    photo = torch.zeros(3, 400, 600, dtype=torch.uint8)
    photo[:, 100:180, 250:310] = 255  # a white "face", 60 x 80 px
    face = np.array([250, 100, 310, 180], np.float32)
    for fraction, frame, centre in ((0.3, (720, 1280), (0.5, 0.4)), (0.1, (1080, 1920), (0.3, 0.6))):
        out, mapped = frame_around(photo, face, fraction, frame, centre)
        assert out.shape == (3, *frame) and out.dtype == torch.uint8
        rows = torch.nonzero(out[0] > 127)
        found = [rows[:, 1].min().item(), rows[:, 0].min().item(), rows[:, 1].max().item() + 1, rows[:, 0].max().item() + 1]
        np.testing.assert_allclose(found, mapped, atol=1.5)  # the white block is where the mapped box says
        assert (mapped[3] - mapped[1]) == pytest.approx(fraction * frame[0], rel=0.01)
        assert ((mapped[0] + mapped[2]) / 2 / frame[1], (mapped[1] + mapped[3]) / 2 / frame[0]) == \
            pytest.approx(centre, abs=0.01)


def test_fit_recovers_a_known_calibration_from_noisy_pairs():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (400, 2))
    wh = rng.uniform(60, 300, (400, 2))
    raw = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    truth = BoxCalibration(dx=0.04, dy=-0.08, sx=0.9, sy=1.2)
    reference = truth.apply(raw) + rng.normal(0, 2, raw.shape).astype(np.float32)
    reference[:20] += 200  # outliers (a neighbour matched by mistake) must not move the medians much
    fitted = fit_calibration(raw, reference)
    for name in ("dx", "dy", "sx", "sy"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), abs=0.015), name


def test_crop_iou_compares_floats_squares():
    box = np.array([[100, 100, 200, 160]], np.float32)  # square of side 160 centred at (150, 130)
    assert crop_iou(box, box)[0] == pytest.approx(1.0)
    shifted = box + np.array([16, 0, 16, 0], np.float32)  # squares overlap 144 x 160
    assert crop_iou(box, shifted)[0] == pytest.approx(144 / 176)
    taller = np.array([[100, 70, 200, 190]], np.float32)  # side 192, same centre: 160^2 / 192^2
    assert crop_iou(box, taller)[0] == pytest.approx((160 / 192) ** 2)


def test_split_is_fixed_by_name_and_summary_counts():
    assert split_of("0_Parade_Parade_0_102.jpg") == split_of("0_Parade_Parade_0_102.jpg")
    names = [f"img_{i}.jpg" for i in range(200)]
    assert 70 < sum(split_of(n) == "fit" for n in names) < 130
    stats = summary(np.arange(101, dtype=np.float64))
    assert stats == {"count": 101, "mean": 50.0, "min": 0.0, "p5": 5.0, "p25": 25.0, "p50": 50.0, "p75": 75.0}
    assert summary(np.zeros(0)) == {"count": 0}
