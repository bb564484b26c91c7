"""Real photographs of faces for tests, and frames with them pasted at known places (the raw-video
corpus's own helpers: dali_float/faces_corpus.py; sources and licences in dali_float/data/README.md)."""
from __future__ import annotations

from dali_float.faces_corpus import DATA, background, paste, portraits, rgb

_BY_NAME = {p.name: p for p in portraits()}
HOPPER, HOPPER_FACE = _BY_NAME["hopper"].path, _BY_NAME["hopper"].face
ASTRONAUT, ASTRONAUT_FACE = _BY_NAME["collins"].path, _BY_NAME["collins"].face

__all__ = ["ASTRONAUT", "ASTRONAUT_FACE", "DATA", "HOPPER", "HOPPER_FACE", "background", "paste", "rgb"]
