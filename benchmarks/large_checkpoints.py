"""What large checkpoints cost: the static path and migrate against `cp`, verify against a
bare load, at 0.5M, 2M and 8.5M policy parameters (and more with ``--sizes``).

    python -m benchmarks.large_checkpoints [--reps 2] [--sizes 512,1024,2048]

``--sizes`` are the hidden widths of ``net_arch=[w, w]`` (actor and critic each): 512 gives
about 0.53M parameters, 1024 about 2.1M, 2048 about 8.4M. For each size a layout-2
checkpoint (what ``save`` writes) and the same model in layout 1 (the scaler pickled in
``data``) are built in a temporary folder; then every command runs as a fresh process, the
commands of one size alternating, ``--reps`` times. Wall time is the median; peak memory is
the child's ``ru_maxrss`` (its largest resident set), the largest over the reps. For the full
``verify`` that is the parent process only (its load checks run in a forked child).

Printed side by side, each as a ratio measured in the same run:

- layout 2, ``verify --static`` and ``migrate`` (already current: a copy) against ``cp``:
  the marginal time, largest size minus smallest, over cp's marginal time (target <= 2), and
  the peak memory growth from the smallest size to the largest (target <= 10%); beside them
  ``cp + fsync``, the same kernel copy with the file and its folder fsynced (a Python child),
  which is the least ``migrate`` must do, so that the cost of the fsync shows on its own;
- layout 1, ``migrate`` (it rewrites the scaler): peak memory above the same command on the
  layout-2 file of that size, over the size of ``data`` (target <= 2);
- full ``verify`` and ``verify --quick`` against a bare ``DistributionalPPO.load`` in a
  fresh interpreter (targets <= 1.5 and <= 1.15).

Children run with one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Run:
    """One child process: wall time (s) and peak resident memory (MB)."""

    wall: float
    peak_mb: float


def run_child(command: list[str], *, expect: int | None = 0) -> Run:
    """Run ``command`` as a fresh process and measure it with the kernel's own accounting."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_CHILD_ENV
    )
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.stderr:
        child.stderr.close()
    if expect is not None and code != expect:
        raise SystemExit(f"{' '.join(command[:4])} exited {code}:\n{stderr[-2000:]}")
    return Run(elapsed, usage.ru_maxrss / 1024)


def _cli(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("dppo-ckpt")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "dppo_ckpt.cli"]
    return [*head, *args]


def _bare_load(path: Path) -> list[str]:
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from dppo_ckpt import DistributionalPPO\n"
        f"DistributionalPPO.load({str(path)!r}, device='cpu')\n"
    )
    return [sys.executable, "-c", code]


# What `migrate` of a current file must do at the least: copy the file in the kernel, as cp
# does, and fsync it and its folder before it counts as written.
_COPY_AND_FSYNC = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as a, open(dst, "wb") as b:
    size, done = os.fstat(a.fileno()).st_size, 0
    while done < size:
        n = os.copy_file_range(a.fileno(), b.fileno(), size - done, done, done)
        if n == 0:
            sys.exit("the source shrank during the copy")
        done += n
    os.fsync(b.fileno())
folder = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
os.fsync(folder)
os.close(folder)
"""


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def build(folder: Path, width: int) -> tuple[Path, Path, int]:
    """A layout-2 checkpoint of a policy with hidden width ``width``, the same in layout 1,
    and the policy's parameter count, built in a child process: this one must stay small,
    since a child's peak memory counts what it shares with its parent before ``exec``."""
    code = (
        "import sys; from pathlib import Path; from benchmarks.large_checkpoints import _build;"
        f" print(_build(Path({str(folder)!r}), {width}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_CHILD_ENV,
        cwd=ROOT, check=True,
    )  # fmt: skip
    params = int(done.stdout.split()[-1])
    return folder / f"w{width}_layout2.zip", folder / f"w{width}_layout1.zip", params


def _build(folder: Path, width: int) -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    from dppo_ckpt import DistributionalPPO
    from fixtures.make_fixtures import to_layout_1

    torch.set_num_threads(1)
    model = DistributionalPPO(
        "MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0,
        vgs_warmup_steps=0, device="cpu",
        policy_kwargs=dict(net_arch=[width, width], ortho_init=False),
    )  # fmt: skip
    model.learn(64)  # one update: the scaler's statistics are real, not zeros
    layout_2, layout_1 = folder / f"w{width}_layout2.zip", folder / f"w{width}_layout1.zip"
    model.save(layout_2)
    to_layout_1(layout_2, layout_1, model._variance_gradient_scaler)
    return sum(p.numel() for p in model.policy.parameters())


@dataclass
class SizeResult:
    params: int
    file_mb: float
    data_mb: float
    runs: dict[str, list[Run]]

    def wall(self, name: str) -> float:
        return statistics.median(run.wall for run in self.runs[name])

    def peak(self, name: str) -> float:
        return max(run.peak_mb for run in self.runs[name])


def measure(folder: Path, width: int, reps: int, heavy: bool) -> SizeResult:
    layout_2, layout_1, params = build(folder, width)
    out = folder / "out.zip"
    commands = {
        "cp": lambda: ["cp", str(layout_2), str(_fresh(out))],
        "cp + fsync": lambda: [sys.executable, "-c", _COPY_AND_FSYNC, str(layout_2),
                               str(_fresh(out))],
        "verify --static": lambda: _cli("verify", "--static", str(layout_2)),
        "migrate (layout 2)": lambda: _cli(
            "migrate", "--static", str(layout_2), str(_fresh(out))
        ),
        "migrate (layout 1)": lambda: _cli(
            "migrate", "--static", str(layout_1), str(_fresh(out))
        ),
    }
    if heavy:
        commands.update({
            "verify": lambda: _cli("verify", str(layout_2)),
            "verify --quick": lambda: _cli("verify", "--quick", str(layout_2)),
            "bare load": lambda: _bare_load(layout_2),
        })  # fmt: skip
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for make in commands.values():  # warm the file cache and the bytecode
        run_child(make())
    for _ in range(reps):
        for name, make in commands.items():
            runs[name].append(run_child(make()))
    with zipfile.ZipFile(layout_1) as archive:
        data_mb = archive.getinfo("data").file_size / 2**20
    return SizeResult(params, layout_2.stat().st_size / 2**20, data_mb, runs)


def report(results: list[SizeResult], heavy: bool) -> None:
    names = list(results[0].runs)
    print(f"{'params':>9} {'file MB':>8} {'data MB':>8} (layout 1)")
    for r in results:
        print(f"{r.params:>9,} {r.file_mb:8.1f} {r.data_mb:8.1f}")
    print(f"\n{'command':<20}" + "".join(f"{r.params / 1e6:>8.2f}M s  MB" for r in results))
    for name in names:
        cells = "".join(f"{r.wall(name):>10.2f} {r.peak(name):>5.0f}" for r in results)
        print(f"{name:<20}{cells}")
    small, large = results[0], results[-1]
    cp_marginal = large.wall("cp") - small.wall("cp")
    print(f"\nlayout 2, smallest -> largest ({small.params / 1e6:.2f}M -> "
          f"{large.params / 1e6:.2f}M params); cp's marginal time {cp_marginal:.3f} s")  # fmt: skip
    print(f"  {'command':<20} {'marginal s':>10} {'/ cp':>6} {'(<= 2)':>6} "
          f"{'peak growth':>11} {'(<= 10%)':>8}")  # fmt: skip
    for name in ("verify --static", "migrate (layout 2)"):
        marginal = large.wall(name) - small.wall(name)
        ratio = marginal / cp_marginal if cp_marginal > 0 else float("inf")
        growth = large.peak(name) / small.peak(name) - 1
        print(f"  {name:<20} {marginal:10.3f} {ratio:6.2f} {'ok' if ratio <= 2 else 'OVER':>6} "
              f"{growth:10.1%} {'ok' if growth <= 0.10 else 'OVER':>8}")  # fmt: skip
    fsync_marginal = large.wall("cp + fsync") - small.wall("cp + fsync")
    migrate_marginal = large.wall("migrate (layout 2)") - small.wall("migrate (layout 2)")
    print(f"  the same copy fsynced (what migrate must do at the least): marginal "
          f"{fsync_marginal:.3f} s, {fsync_marginal / cp_marginal:.2f} x cp's; migrate's "
          f"marginal is {migrate_marginal / fsync_marginal:.2f} x that")  # fmt: skip
    print("layout 1, migrate: memory above the layout-2 run, per MB of data (<= 2)")
    for r in results:
        extra = r.peak("migrate (layout 1)") - r.peak("migrate (layout 2)")
        ratio = extra / r.data_mb
        print(f"  {r.params / 1e6:6.2f}M params: +{extra:6.0f} MB for {r.data_mb:6.1f} MB of data"
              f" = {ratio:4.2f}x {'ok' if ratio <= 2 else 'OVER'}")  # fmt: skip
    if heavy:
        print("full verify against a bare DistributionalPPO.load (wall, median)")
        for r in results:
            full = r.wall("verify") / r.wall("bare load")
            quick = r.wall("verify --quick") / r.wall("bare load")
            print(f"  {r.params / 1e6:6.2f}M params: verify {full:4.2f} "
                  f"{'ok' if full <= 1.5 else 'OVER'} (<= 1.5), --quick {quick:4.2f} "
                  f"{'ok' if quick <= 1.15 else 'OVER'} (<= 1.15)")  # fmt: skip
        print("  (verify's peak memory above is its own process only: the load checks run in"
              " a forked child, whose memory its parent's accounting does not include)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sizes", default="512,1024,2048", help="hidden widths, comma-separated")
    parser.add_argument("--no-load", action="store_true", help="skip full verify and bare load")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.sizes.split(",")]
    heavy = not args.no_load
    with tempfile.TemporaryDirectory(prefix="dppo-large-") as folder:
        results = []
        for width in widths:
            results.append(measure(Path(folder), width, args.reps, heavy))
            print(f"measured width {width}", file=sys.stderr, flush=True)
            for path in Path(folder).glob(f"w{width}_*.zip"):
                path.unlink()
    report(results, heavy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
