"""What a benchmark figure is worth without the machine it came from: nothing. This records it.

`machine_info()` returns the CPU (model, cores usable by this process), memory, GPU and driver (where
one is visible), the load average (the machine may be shared), the date, the versions of everything
the figures depend on, and the dali-float commit measured.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dali_float.cli import usable_cores

_DISTRIBUTIONS = {"torch": "torch", "dali": "nvidia-dali-cuda120", "transformers": "transformers",
                  "numpy": "numpy", "av": "av", "torchaudio": "torchaudio"}


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    from dali_float import __version__

    out = {"python": platform.python_version(), "dali_float": __version__}
    for name, dist in _DISTRIBUTIONS.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def gpu_info() -> dict[str, Any] | None:
    """Name, memory, count, driver and CUDA of the visible GPUs; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"name": props.name, "count": torch.cuda.device_count(),
                            "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda,
                            "capability": f"{props.major}.{props.minor}", "driver": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
            info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return info


def source_version() -> dict[str, Any]:
    """The dali-float commit measured, and whether the working tree differed from it (None outside git)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "modified": None}
    if commit.returncode != 0:
        return {"commit": None, "modified": None}
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def machine_info() -> dict[str, Any]:
    """Everything that says where the figures were measured (JSON-ready)."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable_cores(),
        "memory_bytes": memory_bytes(), "gpu": gpu_info(), "load_average_start": load_average(),
        "os": f"{platform.system()} {platform.release()}", "python_executable": sys.executable,
        "versions": versions(), "source": source_version(),
    }
