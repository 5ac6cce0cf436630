"""The progress line of `train`: its phases, its counts and the Ctrl-C acknowledgements."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from dppo_ckpt.train_progress import (
    ROLLOUT,
    STOPPING,
    UPDATE,
    RunProgress,
    acknowledgement,
    rounded_total,
    rounding_note,
)


class _Count:
    count = 0


def _progress(total: int = 4096) -> tuple[RunProgress, io.StringIO, _Count]:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    interrupt = _Count()
    return RunProgress(console, total, 0, interrupt, "1.000"), out, interrupt


@pytest.mark.parametrize(
    ("requested", "start", "rollout", "total"),
    [(100, 0, 4096, 4096), (4096, 0, 4096, 4096), (4097, 0, 4096, 8192), (1000, 512, 256, 1024),
     (512, 1024, 256, 1024)],
)  # fmt: skip
def test_the_total_is_the_first_rollout_boundary_at_or_past_the_request(
    requested, start, rollout, total
):
    assert rounded_total(requested, start, rollout) == total


def test_the_rounding_is_said_only_when_it_happens():
    assert rounding_note(4096, 4096, 0, 1024, 4) is None
    note = rounding_note(100, 4096, 0, 1024, 4)
    assert note == "note: 100 steps round up to 4,096 (rollouts of 1,024 steps x 4 envs)"


def test_each_ctrl_c_says_what_it_does_in_each_phase():
    assert "at the end of this update" in acknowledgement(1, UPDATE)
    assert "after this rollout and its update" in acknowledgement(1, ROLLOUT)
    assert "cannot stop midway" in acknowledgement(2, UPDATE)
    assert "stopping at the next step" in acknowledgement(2, ROLLOUT)
    assert acknowledgement(3, ROLLOUT) is None  # the third aborts: the command says so
    for count in (1, 2):
        for phase in (ROLLOUT, UPDATE):
            assert acknowledgement(count, phase).startswith("Interrupt received")


def test_the_update_phase_counts_epochs_and_minibatches():
    progress, _, _ = _progress()
    with progress:
        progress.begin_update(4096, epochs=10, batches=3)
        assert progress.phase == UPDATE
        for epoch in range(2):
            for _ in range(3):
                progress.minibatch(epoch)
        progress.minibatch(2)
        assert progress._detail() == "4,096/4,096  epoch 3/10  minibatch 1/3"
        progress.rollout(4097, fps=1234.4, mean_return=-812.26, scale="0.912")
        assert progress.phase == ROLLOUT
        assert progress._detail() == "4,097/4,096  1,234 fps  ret -812  vgs 0.912"
        progress.stopping(4096, fps=1200.0, mean_return=None, scale="0.850")
        assert progress.phase == STOPPING
        assert progress._detail() == "4,096/4,096  1,200 fps  ret -  vgs 0.850"


def test_a_ctrl_c_is_acknowledged_once_by_the_watcher():
    progress, out, interrupt = _progress()
    with progress:
        progress.begin_update(4096, epochs=10, batches=3)
        interrupt.count = 1
        deadline = time.monotonic() + 5
        while "Interrupt received" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        progress.acknowledge()  # nothing new: said once
    text = " ".join(out.getvalue().split())
    assert text.count("Interrupt received") == 1
    assert "stopping at the end of this update" in text


@pytest.mark.parametrize("width", [80, 60])
@pytest.mark.parametrize(
    ("total", "fps", "mean_return"),
    [(100_352, 1234.0, -812.3), (1_000_000, 12345.0, -1234.5), (10_000_000, 123456.0, -12345.6)],
)
def test_the_line_fits_the_terminal_without_cutting_a_column(width, total, fps, mean_return):
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None)
    progress = RunProgress(console, total, 0, _Count(), "1.000")
    progress.rollout(total - 128, fps, mean_return, "0.912")
    lines = [_rendered(progress, console, out)]
    progress.begin_update(total - 128, epochs=10, batches=256)
    for _ in range(256):
        progress.minibatch(9)
    progress._draw()
    lines.append(_rendered(progress, console, out))
    for line in lines:
        assert len(line) <= width and "…" not in line, line
        assert f"{total - 128:,}/{total:,}" in line, line
    if width == 80 and total <= 1_000_000:  # room for everything
        assert "vgs 0.912" in lines[0] and "minibatch 256/256" in lines[1]


def _rendered(progress: RunProgress, console: Console, out: io.StringIO) -> str:
    out.truncate(0)
    out.seek(0)
    console.print(progress._progress.get_renderable())
    return out.getvalue().splitlines()[0]
