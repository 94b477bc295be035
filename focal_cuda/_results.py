"""Where a run's results go: ``benchmarks/results/<date>-<machine>/`` (the benchmarks, the demo and
the experiments share the naming, so one run's files sit together)."""

from __future__ import annotations

import datetime
import os
import platform
import re

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_slug(device: torch.device) -> str:
    """'nvidia-h100-80gb-hbm3' for a GPU; 'cpu-<model>-<threads>t' for the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model()}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def run_dir_name(device: torch.device) -> str:
    return f"{datetime.date.today().isoformat()}-{machine_slug(device)}"


def default_run_dir(device: torch.device) -> str:
    """benchmarks/results/<date>-<machine> under the current directory (the repository root)."""
    return os.path.join("benchmarks", "results", run_dir_name(device))
