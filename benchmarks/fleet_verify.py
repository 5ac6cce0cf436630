"""Static verification of many checkpoints: `verify --static --ray` against `verify --static
--jobs 2` against a plain loop over `run_checks(path, static=True)`.

    python -m benchmarks.fleet_verify [--files 200] [--reps 3]

``--files`` checkpoints (copies of the fixtures, each under its own name) are written to a
temporary folder. Each way of checking them runs as a fresh process, in turn, ``--reps``
times; the medians are printed as files per second, with the ratio to the plain loop:

- the plain loop: one process, ``run_checks`` on every file in order;
- `dppo-ckpt verify --static --jobs 2 --format json DIR`;
- `dppo-ckpt verify --static --ray --format json DIR` on a local Ray cluster it starts
  itself. Its own summary line splits the run into Ray's start-up (paid once per cluster, not
  per batch) and the checks, so both are reported: files/s of the whole process, and of the
  checks alone.

On one machine Ray adds its start-up and a task per file; its use is a cluster, where the
checks of one batch spread over every node. The figures say what the fan-out costs here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = ["dppo_quantile_vgs.zip", "dppo_categorical_vgs.zip", "dppo_vgs_off.zip",
            "dppo_legacy.zip", "sb3_ppo.zip"]  # fmt: skip
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_RAY_LINE = re.compile(r"in ([\d.]+) s \(([\d.]+) files/s\).*?(?:Ray start-up ([\d.]+) s)?$")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dppo_ckpt.cli", *args]


def _loop(folder: Path) -> list[str]:
    code = (
        "import sys, pathlib\n"
        "from dppo_ckpt.checkpoint.checks import run_checks\n"
        "for p in sorted(pathlib.Path(sys.argv[1]).glob('*.zip')):\n"
        "    run_checks(str(p), static=True)\n"
    )
    return [sys.executable, "-c", code, str(folder)]


def _make_files(folder: Path, count: int) -> None:
    for index in range(count):
        source = ROOT / "fixtures" / _SOURCES[index % len(_SOURCES)]
        shutil.copyfile(source, folder / f"ckpt_{index:04d}_{source.name}")


def _run(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_ENV, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[2:5]} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fleet-verify-") as tmp:
        folder = Path(tmp)
        _make_files(folder, args.files)
        commands = {
            "plain loop": _loop(folder),
            "verify --static --jobs 2": _cli("verify", "--static", "--jobs", "2", "-f", "json",
                                             str(folder)),
            "verify --static --ray": _cli("verify", "--static", "--ray", "-f", "json",
                                          str(folder)),
        }  # fmt: skip
        walls: dict[str, list[float]] = {name: [] for name in commands}
        checks: list[float] = []
        startups: list[float] = []
        _run(commands["plain loop"])  # warm the file cache and bytecode
        for _ in range(args.reps):
            for name, command in commands.items():
                wall, stderr = _run(command)
                walls[name].append(wall)
                if name.endswith("--ray"):
                    line = stderr.strip().splitlines()[-1]
                    match = _RAY_LINE.search(line)
                    if match is None:
                        raise SystemExit(f"no summary line from verify --ray: {line!r}")
                    checks.append(float(match.group(1)))
                    startups.append(float(match.group(3) or 0.0))

    files = args.files
    base = files / statistics.median(walls["plain loop"])
    print(f"{files} checkpoints, static checks, {args.reps} runs each, medians, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'':28s} {'files/s':>10s} {'vs loop':>8s} {'wall s':>8s}")
    for name, values in walls.items():
        rate = files / statistics.median(values)
        print(f"{name:28s} {rate:10.1f} {rate / base:8.2f} {statistics.median(values):8.2f}")
    rate = files / statistics.median(checks)
    print(f"{'  --ray, checks only':28s} {rate:10.1f} {rate / base:8.2f} "
          f"{statistics.median(checks):8.2f}")  # fmt: skip
    print(f"Ray start-up (ray.init of a local cluster): {statistics.median(startups):.2f} s")


if __name__ == "__main__":
    main()
