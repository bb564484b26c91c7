"""Face framing: find the face in a frame and FLOAT's square crop around it.

  tflite_graph  a .tflite model's graph as a torch module (the ops BlazeFace uses; NCHW inside)
  blazeface     MediaPipe's BlazeFace around the network: letterbox, anchors, decoding, weighted NMS
  detector      FaceDetector (batched, on the motion encoder's device), calibration to S3FD-style
                boxes, float_crop_box (FLOAT's square)

Measured figures and the calibration: docs/FACE_FRAMING.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dali_float.face.detector import (CALIBRATION_VERSION, CALIBRATIONS, BoxCalibration, FaceDetections, FaceDetector,
                                      detector_identity, float_crop_box, model_file)

if TYPE_CHECKING:
    from dali_float.face.tflite_graph import TFLiteGraph, TFLiteGraphError


def __getattr__(name: str) -> Any:
    # tflite_graph imports torch; the detector's identity (the cache fingerprint) does not need it (PEP 562).
    if name in ("TFLiteGraph", "TFLiteGraphError"):
        from dali_float.face import tflite_graph

        return getattr(tflite_graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CALIBRATIONS", "CALIBRATION_VERSION", "BoxCalibration", "FaceDetections", "FaceDetector", "TFLiteGraph",
           "TFLiteGraphError", "detector_identity", "float_crop_box", "model_file"]
