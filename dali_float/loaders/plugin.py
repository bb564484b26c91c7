"""Build (once, with g++) and load the DALI operator in window_read.cc (`fn.dali_float_window_read`).

The library is compiled against the installed DALI's headers into
$DALI_FLOAT_HOME/plugins/window_read-<dali version>-<source hash>.so, so a new DALI or a changed
source builds a new one. Without a C++ compiler or CUDA headers the build fails with one warning and
the DALI loader falls back to reading the windows in its external source (strategy "python").
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

from dali_float.paths import home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("window_read.cc")
OPERATOR = "dali_float_window_read"


def _cuda_include_dirs() -> list[Path]:
    """Folders holding cuda_runtime.h and crt/host_config.h (DALI's headers include them)."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    candidates += [Path("/usr/local/cuda/include")]
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    candidates += sorted(site.glob("nvidia/cu*/include")) + sorted(site.glob("nvidia/cuda_runtime/include"))
    runtime = [p for p in candidates if (p / "cuda_runtime.h").exists()]
    # pip's CUDA runtime headers may lack crt/; triton ships a copy.
    crt = [p for p in candidates + sorted(site.glob("triton/backends/nvidia/include"))
           if (p / "crt" / "host_config.h").exists()]
    return runtime[:1] + [p for p in crt[:1] if p not in runtime[:1]]


def library_path() -> Path:
    import nvidia.dali as dali

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return home() / "plugins" / f"window_read-{dali.__version__}-{digest}.so"


def build(target: Path) -> None:
    """Compile window_read.cc into `target` (atomic: a concurrent build never sees half a file)."""
    import nvidia.dali.sysconfig as sysconfig

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    includes = _cuda_include_dirs()
    if not includes:
        raise RuntimeError("no CUDA headers found (set CUDA_HOME)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    cmd = [compiler, "-std=c++20", "-O2", "-fPIC", "-shared", "-w", str(SOURCE), "-o", str(tmp),
           *sysconfig.get_compile_flags(), *[f"-I{p}" for p in includes], *sysconfig.get_link_flags()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"g++ failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    os.replace(tmp, target)


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
