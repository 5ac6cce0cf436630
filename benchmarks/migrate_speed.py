"""`dppo-ckpt migrate` against `cp` of the same file: time ratio and peak memory.

    python benchmarks/migrate_speed.py [--hidden 1250 2500 5000] [--repeats 3] [--dir DIR]
                                       [--variants untrained trained]

For each hidden width a legacy checkpoint is built once (a DistributionalPPO on Pendulum-v1
with ``net_arch`` ``[h, h]`` for actor and critic, saved the old way with its scaler pickling
``_parameters``); width 5000 gives a policy of about 200 MB. Then ``dppo-ckpt migrate --static``
and ``cp`` run as child processes, alternating, ``--repeats`` times each, with a warm page
cache for both. Each width is measured twice: untrained (the optimizer member is nearly empty)
and after one update (it holds Adam's moments, twice the policy), the scaler entry being the
same size in both. Printed per file: median wall time of each command, their ratio, and the
peak resident memory (``ru_maxrss`` of each child, from ``wait4``) of each.

Memory is reported beside the sizes that drive it: the policy and optimizer members are copied
in the kernel (``copy_file_range``), so they never enter the process; the ``data`` member
holding the scaler (for a legacy file, three policy-sized tensor sets in base64) is decoded
and rewritten in memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_MiB = 1024 * 1024


def build(path: Path, hidden: int, trained: bool) -> None:
    """Write a legacy checkpoint whose policy has two ``hidden x hidden`` layers per head.

    ``trained``: run one update first, so that the optimizer member holds Adam's two moments
    (twice the policy) while the scaler entry keeps the same size.
    """
    import gymnasium as gym
    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dppo_ckpt import DistributionalPPO
    from fixtures.make_fixtures import write_legacy_checkpoint

    torch.set_num_threads(1)
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1")])
    model = DistributionalPPO(
        "MlpPolicy",
        env,
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=dict(net_arch=dict(pi=[hidden, hidden], vf=[hidden, hidden])),
    )
    if trained:
        model.learn(16)
    write_legacy_checkpoint(model, path)


def run(command: list[str]) -> tuple[float, int]:
    """Wall time (s) and peak resident memory (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, usage.ru_maxrss * 1024  # KiB on Linux


def measure(path: Path, repeats: int) -> dict[str, float]:
    out = path.with_name(path.stem + ".migrated.zip")
    copy = path.with_name(path.stem + ".copy.zip")
    migrate_cmd = [
        sys.executable,
        "-m",
        "dppo_ckpt.cli",
        "migrate",
        "--static",
        str(path),
        str(out),
    ]
    cp_cmd = ["cp", str(path), str(copy)]
    times: dict[str, list[float]] = {"migrate": [], "cp": []}
    peaks: dict[str, list[int]] = {"migrate": [], "cp": []}
    run(cp_cmd)  # warm the page cache
    copy.unlink()
    for _ in range(repeats):
        for name, command, target in (("migrate", migrate_cmd, out), ("cp", cp_cmd, copy)):
            target.unlink(missing_ok=True)
            elapsed, peak = run(command)
            times[name].append(elapsed)
            peaks[name].append(peak)
            target.unlink()
    with zipfile.ZipFile(path) as zf:
        sizes = {info.filename: info.file_size for info in zf.infolist()}
    return {
        "file": path.stat().st_size,
        "policy": sizes["policy.pth"],
        "optimizer": sizes["policy.optimizer.pth"],
        "data": sizes["data"],
        "migrate_s": statistics.median(times["migrate"]),
        "cp_s": statistics.median(times["cp"]),
        "migrate_rss": max(peaks["migrate"]),
        "cp_rss": max(peaks["cp"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1250, 2500, 5000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=["untrained", "trained"],
        default=["untrained", "trained"],
        help="untrained: nearly empty optimizer member; trained: Adam moments in it",
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dppo_migrate_bench"))
    parser.add_argument("--build", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build(Path(args.build[0]), int(args.build[1]), bool(int(args.build[2])))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    variants = [v == "trained" for v in args.variants]
    for hidden, trained in [(h, t) for h in args.hidden for t in variants]:
        path = args.dir / f"legacy_h{hidden}{'_trained' if trained else ''}.zip"
        if not path.exists():
            start = time.perf_counter()
            # In a child: this process stays small, and children forked from it start small
            # (ru_maxrss counts what a child inherited before exec).
            subprocess.run(
                [sys.executable, __file__, "--build", str(path), str(hidden), str(int(trained))],
                check=True,
            )
            print(f"built {path} in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append((hidden, measure(path, args.repeats)))
        print(f"measured {path.name}", flush=True)
    header = (
        f"{'hidden':>6} {'policy':>8} {'optim':>8} {'data':>8} {'file':>8} {'migrate':>8} "
        f"{'cp':>7} {'ratio':>6} {'migr. RSS':>10} {'cp RSS':>7} {'RSS/data':>8}"
    )
    print(header)
    for hidden, r in rows:
        print(
            f"{hidden:>6} {r['policy'] / _MiB:>6.0f}MB {r['optimizer'] / _MiB:>6.0f}MB "
            f"{r['data'] / _MiB:>6.0f}MB "
            f"{r['file'] / _MiB:>6.0f}MB {r['migrate_s']:>7.2f}s {r['cp_s']:>6.2f}s "
            f"{r['migrate_s'] / r['cp_s']:>6.1f} {r['migrate_rss'] / _MiB:>8.0f}MB "
            f"{r['cp_rss'] / _MiB:>5.0f}MB {r['migrate_rss'] / r['data']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
