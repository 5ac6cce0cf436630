"""How much `dppo-ckpt verify` costs next to simply loading the checkpoint.

    python benchmarks/verify_speed.py [--reps 5] [--sizes 50,100,200] [--no-big | --no-compare]

1. `dppo-ckpt verify MODEL.zip` (every check, round trip included) against a bare
   `python -c` that imports stable-baselines3 and calls `DistributionalPPO.load(MODEL.zip)`.
   Both run as fresh processes, alternating, ``--reps`` times; medians and their ratio are
   printed (target: ratio <= 1.3).
2. `dppo-ckpt verify --static` on the same file (target: < 0.3 s).
3. `verify --static` on DistributionalPPO checkpoints with large policies (``--sizes`` in MB of
   float32 policy parameters), built in a temporary folder: wall time and peak memory
   (``ru_maxrss`` of the child) per size, and both per MB of file, to show how they grow.

Children run with one thread (OMP_NUM_THREADS=1), like this process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "dppo_quantile_vgs.zip"
_CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _verify_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("dppo-ckpt")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "dppo_ckpt.cli"]
    return [*head, "verify", *args]


def _bare_load_command(path: Path) -> list[str]:
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "import stable_baselines3\n"
        "from dppo_ckpt import DistributionalPPO\n"
        f"DistributionalPPO.load({str(path)!r}, device='cpu')\n"
    )
    return [sys.executable, "-c", code]


def run_child(command: list[str], *, expect: int | None = 0) -> tuple[float, int, float]:
    """Wall time (s), peak resident memory (KiB) and CPU time (user + system, s) of one child
    process. CPU time is reported too because it hardly depends on how busy the machine is."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_CHILD_ENV
    )
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.stderr:
        child.stderr.close()
    if expect is not None and child.returncode != expect:
        raise SystemExit(f"{command[:3]} exited {child.returncode}:\n{stderr}")
    return elapsed, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def compare_with_load(path: Path, reps: int) -> None:
    verify_runs: list[tuple[float, int, float]] = []
    load_runs: list[tuple[float, int, float]] = []
    inline_runs: list[tuple[float, int, float]] = []
    run_child(_bare_load_command(path))  # warm the file cache and bytecode
    run_child(_verify_command(str(path)))
    for _ in range(reps):
        verify_runs.append(run_child(_verify_command(str(path))))
        load_runs.append(run_child(_bare_load_command(path)))
        inline_runs.append(run_child(_verify_command("--no-isolate", str(path))))
    verify_wall = statistics.median(r[0] for r in verify_runs)
    load_wall = statistics.median(r[0] for r in load_runs)
    verify_cpu = statistics.median(r[2] for r in verify_runs)
    load_cpu = statistics.median(r[2] for r in load_runs)
    print(f"checkpoint: {path} ({path.stat().st_size / 1e3:.0f} kB), {reps} alternating reps")
    print(f"  {'':38} {'wall s':>7} {'cpu s':>7}")
    print(f"  {'dppo-ckpt verify (all 12 checks)':38} {verify_wall:7.3f} {verify_cpu:7.3f}")
    print(f"  {'python -c DistributionalPPO.load':38} {load_wall:7.3f} {load_cpu:7.3f}")
    print(f"  ratio verify / load: wall {verify_wall / load_wall:.2f}, "
          f"cpu {verify_cpu / load_cpu:.2f} (target <= 1.3)")  # fmt: skip
    inline_wall = statistics.median(r[0] for r in inline_runs)
    print(f"  {'dppo-ckpt verify --no-isolate':38} {inline_wall:7.3f} "
          f"{statistics.median(r[2] for r in inline_runs):7.3f}")  # fmt: skip
    print(f"  cost of the child process (and budgets): verify / --no-isolate wall "
          f"{verify_wall / inline_wall:.2f}")  # fmt: skip
    static = [run_child(_verify_command("--static", str(path))) for _ in range(reps)]
    python = [run_child([sys.executable, "-c", "pass"]) for _ in range(reps)]
    print(f"  {'dppo-ckpt verify --static':38} {statistics.median(r[0] for r in static):7.3f} "
          f"{statistics.median(r[2] for r in static):7.3f} (target < 0.3 s)")  # fmt: skip
    print(f"  {'python -c pass (interpreter start)':38} "
          f"{statistics.median(r[0] for r in python):7.3f} "
          f"{statistics.median(r[2] for r in python):7.3f}")  # fmt: skip


def _build_big(path: Path, megabytes: int) -> int:
    """Save a DistributionalPPO whose policy holds about ``megabytes`` MB of float32."""
    import math

    import torch

    from dppo_ckpt import DistributionalPPO

    torch.set_num_threads(1)
    # Two hidden-to-hidden layers (actor and critic) dominate: about 2 * width**2 parameters.
    width = int(math.sqrt(megabytes * 1e6 / 4 / 2))
    model = DistributionalPPO(
        "MlpPolicy",
        "Pendulum-v1",
        n_steps=64,
        batch_size=32,
        seed=0,
        device="cpu",
        policy_kwargs=dict(net_arch=dict(pi=[width, width], vf=[width, width]), ortho_init=False),
    )
    params = sum(p.numel() for p in model.policy.parameters())
    model.save(path)
    del model
    return params


def big_checkpoints(sizes: list[int], reps: int) -> None:
    print("verify --static on large checkpoints (wall time, peak RSS of the child):")
    print(f"  {'policy MB':>9} {'file MB':>8} {'time s':>7} {'peak MB':>8} {'s/GB':>6} "
          f"{'peak/file':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dppo-verify-bench-") as folder:
        for megabytes in sizes:
            path = Path(folder) / f"big_{megabytes}.zip"
            params = _build_big(path, megabytes)
            file_mb = path.stat().st_size / 1e6
            runs = [run_child(_verify_command("--static", str(path))) for _ in range(reps)]
            wall = statistics.median(r[0] for r in runs)
            peak = max(r[1] for r in runs) / 1024
            print(f"  {params * 4 / 1e6:9.0f} {file_mb:8.0f} {wall:7.2f} {peak:8.0f} "
                  f"{wall / file_mb * 1e3:6.2f} {peak / file_mb:9.2f}")  # fmt: skip
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default="50,100,200", help="policy sizes in MB")
    parser.add_argument("--no-big", action="store_true", help="skip the large checkpoints")
    parser.add_argument("--no-compare", action="store_true", help="only the large checkpoints")
    parser.add_argument("--checkpoint", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    if not args.no_compare:
        compare_with_load(args.checkpoint, args.reps)
    if not args.no_big:
        big_checkpoints([int(s) for s in args.sizes.split(",")], max(1, min(args.reps, 3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
