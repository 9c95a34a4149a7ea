"""The machine line every benchmark prints beside its figures."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """``nproc N, <CPU model>, Python X.Y.Z``."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}"
