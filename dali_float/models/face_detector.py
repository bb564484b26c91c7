"""The face detector as preprocessing imports it, next to the other frozen models.

The implementation lives in dali_float.face (the .tflite runner, BlazeFace's decoding, the
calibration to FLOAT's S3FD-style boxes: docs/FACE_FRAMING.md); this module only names it here.
`detector_identity()` gives the fingerprint part without building the network, like
`model_identities` does for the encoders.
"""
from __future__ import annotations

from dali_float.face.detector import (CALIBRATION_VERSION, FaceDetections, FaceDetector, detector_identity,
                                      float_crop_box)

__all__ = ["CALIBRATION_VERSION", "FaceDetections", "FaceDetector", "detector_identity", "float_crop_box"]
