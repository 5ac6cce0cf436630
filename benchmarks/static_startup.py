"""How long `dppo-ckpt verify --static` takes on a small checkpoint: the pre-commit path.

    python -m benchmarks.static_startup [--reps 10] [--checkpoint FIXTURE]

Fresh processes, in turn, ``--reps`` times each, after one warm-up round:

1. ``python -c pass``: the interpreter's own start, for scale;
2. ``dppo-ckpt --version``: the command line's imports (Typer included) and nothing else;
3. ``dppo-ckpt verify --static FIXTURE``: as the pre-commit hook runs it (target <= 0.25 s);
4. ``dppo-ckpt verify --static --format table FIXTURE``: the same output, but parsed by Typer,
   which imports pydantic and builds a validator per parameter.

Prints the median wall and CPU time of each and its ratio to ``python -c pass``. Children
may write bytecode, as an installed package has it compiled; one thread each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "dppo_quantile_vgs.zip"
_CHILD_ENV = {
    key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"
} | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("dppo-ckpt")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "dppo_ckpt.cli"]
    return [*head, *args]


def _run(command: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_CHILD_ENV
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--checkpoint", type=Path, default=FIXTURE, help="a passing checkpoint")
    args = parser.parse_args(argv)
    path = str(args.checkpoint)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "dppo-ckpt --version": _cli("--version"),
        "dppo-ckpt verify --static FILE": _cli("verify", "--static", path),
        "... --format table FILE (Typer parses)": _cli("verify", "--static", "-f", "table", path),
    }
    for command in commands.values():  # warm-up: bytecode and the file cache
        _run(command)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.reps):
        for name, command in commands.items():
            runs[name].append(_run(command))
    base = statistics.median(wall for wall, _ in runs["python -c pass"])
    print(f"checkpoint: {path}, {args.reps} reps each, in turn")
    print(f"  {'':40} {'wall s':>7} {'cpu s':>7} {'x python':>9}")
    for name, samples in runs.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        print(f"  {name:40} {wall:7.3f} {cpu:7.3f} {wall / base:9.1f}")
    static = statistics.median(w for w, _ in runs["dppo-ckpt verify --static FILE"])
    print(f"  verify --static: {static:.3f} s wall (target <= 0.25 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
