"""A check function whose child dies the way a native crash kills it (for isolation tests)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.checkpoint.results import FileReport


def check_or_crash(path: str, **options: Any) -> FileReport:
    """``run_checks``, except that a file named ``crash*`` kills the process by SIGSEGV and
    one named ``hang*`` sleeps past any budget."""
    name = os.path.basename(path)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hang"):
        time.sleep(60)
    return run_checks(path, **options)
