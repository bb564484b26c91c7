"""Build (once, with g++) and load the DALI operators in window_read.cc (`fn.dali_float_window_read`, and
`fn.dali_float_window_index` / `fn.dali_float_window_gather` of the resident strategy).

The library is compiled against the installed DALI's headers into
$DALI_FLOAT_HOME/plugins/window_read-<dali version>-<source hash>.so, so a new DALI or a changed
source builds a new one. DALI's headers include a few CUDA headers even for a CPU operator: they come
from a CUDA toolkit where one is installed, else from the pip packages requirements.txt installs
(nvidia-cuda-runtime with torch, nvidia-cuda-crt, nvidia-cuda-cccl). Without a C++ compiler or those
headers the build fails with one warning and the DALI loader falls back to reading the windows in its
external source (strategy "python").
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from dali_float.atomic import TMP_MARKER, fsync_dir
from dali_float.paths import home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("window_read.cc")
OPERATOR = "dali_float_window_read"


# What DALI's operator headers include from CUDA (also on the CPU), and the pip package that provides each
# where no CUDA toolkit is installed (requirements.txt installs them next to torch's CUDA runtime).
REQUIRED_HEADERS = {"cuda_runtime.h": "nvidia-cuda-runtime", "cuda_fp16.h": "nvidia-cuda-runtime",
                    "crt/host_config.h": "nvidia-cuda-crt", "nv/target": "nvidia-cuda-cccl"}
TOOLKIT_ROOTS = (Path("/usr/local/cuda"),)
# "pip": take the headers from Python packages only (CUDA_HOME, CUDA_PATH and /usr/local/cuda are not
# consulted), as on a machine with a pip-installed torch and no toolkit.
HEADERS_ENV = "DALI_FLOAT_CUDA_HEADERS"


def _header_candidates() -> list[Path]:
    """Include folders that may hold CUDA headers: the toolkit's first, then those of pip packages."""
    dirs = []
    if os.environ.get(HEADERS_ENV, "auto") != "pip":
        roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
        dirs += [root / "include" for root in [*roots, *TOOLKIT_ROOTS]]
    for entry in dict.fromkeys(sys.path):  # every site-packages folder this interpreter imports from
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            dirs += sorted(nvidia.glob("cu*/include")) + sorted(nvidia.glob("cuda_*/include"))
    return list(dict.fromkeys(dirs))


def cuda_include_dirs() -> list[Path]:
    """The -I folders for REQUIRED_HEADERS: one folder that holds them all if there is one (a toolkit,
    or pip's nvidia/cu13/include), else the first holder of each. RuntimeError naming what is missing."""
    candidates = _header_candidates()
    for folder in candidates:
        if all((folder / header).exists() for header in REQUIRED_HEADERS):
            return [folder]
    chosen, missing = [], []
    for header, package in REQUIRED_HEADERS.items():
        holder = next((folder for folder in candidates if (folder / header).exists()), None)
        if holder is None:
            missing.append(f"{header} (pip install {package})")
        elif holder not in chosen:
            chosen.append(holder)
    if missing:
        raise RuntimeError(f"CUDA headers not found: {', '.join(missing)}; or set CUDA_HOME to a CUDA toolkit")
    return chosen


def library_path() -> Path:
    import nvidia.dali as dali

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return home() / "plugins" / f"window_read-{dali.__version__}-{digest}.so"


def build(target: Path) -> None:
    """Compile window_read.cc into `target` (atomic: a concurrent build never sees half a file; durable: a
    crash after the rename never leaves an empty or partial .so under the final name, which
    `load_window_reader` would trust because it only checks that the file exists)."""
    import nvidia.dali.sysconfig as sysconfig

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    includes = cuda_include_dirs()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}{TMP_MARKER}{os.getpid()}")
    # libdali_kernels: the gather's device-to-device batch copy (ScatterGatherGPU), so this library needs no
    # CUDA runtime of its own (DALI's is linked into DALI's libraries; on a machine without CUDA it is never called).
    cmd = [compiler, "-std=c++20", "-O2", "-fPIC", "-shared", "-w", str(SOURCE), "-o", str(tmp),
           *sysconfig.get_compile_flags(), *[f"-I{p}" for p in includes], *sysconfig.get_link_flags(),
           "-ldali_kernels"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"g++ failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    try:
        fd = os.open(tmp, os.O_RDONLY)  # the compiler wrote it: its bytes reach the disk before the name does
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)  # the rename itself survives a crash


@lru_cache(maxsize=1)
def load_window_reader() -> bool:
    """Make `fn.dali_float_window_read` available; False (with one warning) when it cannot be built."""
    import nvidia.dali.plugin_manager as plugin_manager

    target = library_path()
    try:
        if not target.exists():
            log.info("building the DALI window-read operator (once): %s", target)
            build(target)
        plugin_manager.load_library(str(target))
    except (RuntimeError, OSError) as err:
        log.warning("DALI window-read operator unavailable (%s); the DALI loader reads the windows in Python "
                    "instead (--read_strategy python, slower)", err)
        return False
    return True


if __name__ == "__main__":  # `python -m dali_float.loaders.plugin`: build now, say where
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = load_window_reader()
    log.info("DALI window-read operator: %s", library_path() if ok else "not available (Python reads will be used)")
