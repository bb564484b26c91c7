"""One crop per clip from the face boxes of its sampled frames (media.framing.choose_face_crop), against
FLOAT's framing rule written out here from its `generate.py` (`process_img`): centre = box centre,
half-side = 1.6 x max(half-width, half-height) of the face box."""
from __future__ import annotations

import numpy as np
import pytest

from dali_float.errors import ClipSkipped
from dali_float.media.framing import (DETECT_SIZE, MAX_UPSCALE, choose_face_crop, center_crop, detection_positions,
                                      detection_size, whole_frame_crop)

W, H = 1280, 720


def box(cx: float, cy: float, w: float, h: float) -> np.ndarray:
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def floats_square(face: np.ndarray) -> np.ndarray:
    """FLOAT's process_img, in floats: the square of half-side 1.6 x max(half-width, half-height)."""
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    half = 1.6 * max(face[2] - face[0], face[3] - face[1]) / 2
    return np.array([cx - half, cy - half, cx + half, cy + half])


def frames_of(*faces_per_frame) -> list[np.ndarray]:
    return [np.array(f, dtype=np.float64).reshape(-1, 4) for f in faces_per_frame]


def test_a_still_face_gives_floats_square_around_it():
    face = box(900, 300, 200, 240)
    crop = choose_face_crop(frames_of(*[[face]] * 10), W, H, 512)
    np.testing.assert_allclose(crop.crop_box, floats_square(face))
    assert crop.crop_box[2] - crop.crop_box[0] == pytest.approx(1.6 * 240)
    assert crop.faces_seen == 1 and crop.face_frames == crop.sampled_frames == 10
    x0, y0, x1, y1 = crop.window  # relative to the frame, past it where padded
    assert (x0 * W, y0 * H, x1 * W, y1 * H) == pytest.approx(crop.crop_box)


def test_the_crop_is_the_median_face_so_one_wrong_frame_does_not_move_it():
    faces = [box(640 + dx, 360, 200, 200) for dx in (-10, -5, 0, 5, 10, 0, 0, 0)]
    faces.append(box(660, 370, 230, 230))  # one frame with a bigger, shifted box (still inside the crop)
    crop = choose_face_crop(frames_of(*[[f] for f in faces]), W, H, 512)
    np.testing.assert_allclose(crop.crop_box, floats_square(box(640, 360, 200, 200)))


def test_two_faces_frame_the_larger_one_and_record_both():
    small, large = box(300, 360, 120, 140), box(900, 360, 200, 230)
    crop = choose_face_crop(frames_of(*[[small, large]] * 6), W, H, 512)
    np.testing.assert_allclose(crop.crop_box, floats_square(large))
    assert crop.faces_seen == 2
    np.testing.assert_allclose(crop.face_box, large)


def test_no_face_is_skipped_with_the_reason():
    with pytest.raises(ClipSkipped, match="no face found on any of 8 sampled frames"):
        choose_face_crop(frames_of(*[[]] * 8), W, H, 512)


def test_a_face_found_on_too_few_frames_is_skipped():
    face = box(640, 360, 200, 200)
    with pytest.raises(ClipSkipped, match="found on only 5 of 10"):
        choose_face_crop(frames_of(*([[face]] * 5 + [[]] * 5)), W, H, 512)


def test_a_face_that_leaves_the_crop_on_some_frame_is_skipped():
    faces = [[box(640, 360, 200, 200)]] * 8 + [[box(640 + 150, 360, 200, 200)]]  # 150 px: past 0.6 x 100 px
    with pytest.raises(ClipSkipped, match=r"leaves FLOAT's crop at 8"):
        choose_face_crop(frames_of(*faces), W, H, 512)
    far = [[box(640, 360, 200, 200)]] * 8 + [[box(640 + 400, 360, 200, 200)]]  # moved clear of the clip's box
    with pytest.raises(ClipSkipped, match=r"leaves FLOAT's crop at 8"):
        choose_face_crop(frames_of(*far), W, H, 512)
    moving = [[box(640 + 50, 360, 200, 200)]] + [[box(640, 360, 200, 200)]] * 8  # 50 px < 60 px of margin
    choose_face_crop(frames_of(*moving), W, H, 512)


def test_a_face_too_small_for_the_input_is_skipped_at_the_stated_threshold():
    side_limit = 512 / MAX_UPSCALE  # FLOAT's square must be at least this many source pixels
    just_enough = side_limit / 1.6
    choose_face_crop(frames_of(*[[box(640, 360, just_enough, just_enough)]] * 8), W, H, 512)
    with pytest.raises(ClipSkipped, match="face too small"):
        choose_face_crop(frames_of(*[[box(640, 360, just_enough - 2, just_enough - 2)]] * 8), W, H, 512)
    # The same face is fine for a 64 x 64 input (the tiny preset).
    choose_face_crop(frames_of(*[[box(640, 360, 40, 40)]] * 8), W, H, 64)


def test_a_face_at_the_edge_gives_a_square_past_the_frame():
    face = box(100, 120, 200, 200)
    crop = choose_face_crop(frames_of(*[[face]] * 8), W, H, 512)
    assert crop.crop_box[0] < 0 and crop.crop_box[1] < 0  # zero-padded there by the decoder's graph
    assert crop.window[0] < 0 and crop.window[1] < 0


def test_center_and_none():
    np.testing.assert_allclose(center_crop(W, H).crop_box, [280, 0, 1000, 720])
    np.testing.assert_allclose(center_crop(H, W).crop_box, [0, 280, 720, 1000])
    np.testing.assert_allclose(whole_frame_crop(512, 512).crop_box, [0, 0, 512, 512])
    with pytest.raises(ClipSkipped, match="not square"):
        whole_frame_crop(W, H)


def test_detection_samples_a_few_frames_per_second_spread_over_the_clip():
    positions = detection_positions(25 * 60, 25)  # one minute: 2 per second
    assert len(positions) == 120 and positions[0] == 0 and positions[-1] == 25 * 60 - 1
    assert len(detection_positions(60, 25)) == 8  # a short clip still gets a few
    assert len(detection_positions(25 * 3600, 25)) == 240  # an hour: capped
    assert detection_size(1920, 1080) == (round(1080 * DETECT_SIZE / 1920), DETECT_SIZE)  # longer side, aspect kept
    assert detection_size(120, 100) == (100, 120)  # never upscaled
