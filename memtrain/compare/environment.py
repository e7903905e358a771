"""What a comparison ran on: device, driver, CUDA, library versions, CPU — printed above every table."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch

from memtrain import __version__
from memtrain.memory.nvml import driver_version


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_environment() -> dict[str, str]:
    """Facts that need no GPU context (safe in the sweep's parent process)."""
    return {
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores; torch threads {torch.get_num_threads()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda or "none (CPU build)",
        "segmentation_models_pytorch": _version("segmentation-models-pytorch"),
        "pytorch_msssim": _version("pytorch-msssim"),
        "lightning": _version("lightning"),
        "memtrain": __version__,
        "os": f"{platform.system()} {platform.release()}",
        "executable": sys.executable,
    }


def device_environment(device: str) -> dict[str, str]:
    """The device a cell ran on (initialises CUDA: call it inside a cell)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "device": f"{props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor})",
            "driver": driver_version() or "unknown (NVML unavailable)",
            "cuda": torch.version.cuda or "?",
            "cudnn": str(torch.backends.cudnn.version()),
        }
    return {"device": f"CPU: {cpu_name()}", "driver": "n/a (CPU)", "cuda": "n/a (CPU)"}
