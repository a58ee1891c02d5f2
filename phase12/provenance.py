"""Where and with what a run ran: device name, library versions, git commit."""

from __future__ import annotations

import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from phase12.config import RunConfig


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (its architecture where none is known)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The commit of the source tree this package runs from, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(config: RunConfig, device: torch.device) -> dict:
    """Config, versions, device and commit of a run, for the JSON beside its outputs."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "config": asdict(config),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
