"""What each hostile file of the suite costs ``dppo-ckpt verify`` before it is refused.

    python -m benchmarks.hostile_costs [--static]

Builds every case of ``tests/_hostile.py`` in a temporary folder and runs the real command
line on each as a fresh process: exit code, wall time and peak resident memory (of the
process and the children it waited for), beside the same figures for the clean fixture the
cases are made from, in the same run. The ratio columns are each case against that baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.verify_speed import _CHILD_ENV, _verify_command
from tests._hostile import BASE, CASES, build_all


def _measure(command: list[str], cwd: Path) -> tuple[int, float, float]:
    """Exit code, wall seconds and peak resident MB of one fresh process."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_CHILD_ENV, cwd=cwd
    )
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", action="store_true", help="verify --static instead")
    args = parser.parse_args(argv)
    flags = ["--static"] if args.static else []
    with tempfile.TemporaryDirectory(prefix="dppo-hostile-") as folder:
        scratch = Path(folder)
        files = build_all(scratch / "files")
        _, base_wall, base_peak = _measure(_verify_command(*flags, str(BASE)), scratch)
        print(f"{'case':26} {'exit':>4} {'wall s':>7} {'peak MB':>8} {'wall/base':>9} "
              f"{'peak/base':>9}")  # fmt: skip
        print(f"{'(clean fixture)':26} {0:4} {base_wall:7.2f} {base_peak:8.0f} {1:9.2f} "
              f"{1:9.2f}")  # fmt: skip
        for name in CASES:
            code, wall, peak = _measure(_verify_command(*flags, str(files[name])), scratch)
            print(f"{name:26} {code:4} {wall:7.2f} {peak:8.0f} {wall / base_wall:9.2f} "
                  f"{peak / base_peak:9.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
