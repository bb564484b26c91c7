"""Telling a torch checkpoint from what was given instead, without importing torch (preprocess.py status
checks --motion_ckpt this way before anything is hashed; models.motion_encoder when torch.load fails)."""
from __future__ import annotations

import zipfile
from pathlib import Path


def not_a_torch_checkpoint(flag: str, path: Path, kind: str) -> str:
    """The one line for a weights file that torch cannot load: what it is, and what to give instead."""
    return (f"{flag} checkpoint {path} is not a torch checkpoint: {kind}; give a file written by torch.save, "
            f"e.g. FLOAT's checkpoints/float.pth as its download script fetches it")


def torch_file_problem(path: Path) -> str | None:
    """What a file is when it is plainly not one torch.save wrote (None: it may be one). Reads its first bytes
    (and a ZIP's table of contents): for the one line that says what was given instead of a checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        return f"it cannot be read ({err.strerror})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):  # torch.save's format since 1.6 is a ZIP holding <name>/data.pkl
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "a damaged or cut ZIP archive (an interrupted download?)"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        return f"a ZIP archive without torch's data.pkl ({len(names)} file(s), e.g. {names[0] if names else '-'})"
    if head[:1] == b"\x80":  # a pickle: torch's format before 1.6
        return None
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull` where it came from)"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    if len(head) > 9 and head[8:10] == b'{"':  # 8 bytes of header length, then the JSON header
        return "a safetensors file (torch.load does not read those)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a file of unknown kind (it begins with the bytes {head[:8].hex()})"
    return f"a text file (it begins {text[:40]!r})"
