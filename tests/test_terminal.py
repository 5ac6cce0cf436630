"""`dppo-ckpt train` in a real terminal (tmux) 80 columns wide: the progress line fits, the
update shows as its own phase, and a Ctrl-C during an update is acknowledged within a second.

The updates are made long (many epochs of small minibatches over a short rollout), so that the
test can see an update and interrupt it even on a loaded machine; every wait but the one
under test is generous.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
# A short rollout, then an update of 200 epochs x 4 minibatches: seconds long.
LONG_UPDATES = """\
n_steps = 256
batch_size = 64
n_epochs = 200
vgs_warmup_steps = 4
"""
_PHASE_LINE = re.compile(r"^(rollout|update|stopping) +[━╸╺]+ +[\d,]+/[\d,]+ ")
_UPDATE_LINE = re.compile(r"^update +[━╸╺]+ +[\d,]+/[\d,]+ +epoch (\d+)/200 +minibatch \d/4\b")


class _Pane:
    """A detached tmux session of its own server (socket), running one command."""

    def __init__(self, command: str, cwd: Path) -> None:
        self.socket = f"dppo-ckpt-test-{os.getpid()}"
        self._tmux(
            "new-session", "-d", "-s", "test", "-x", str(WIDTH), "-y", "50", "-c", str(cwd),
            command,
        )  # fmt: skip

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return result.stdout

    def capture(self) -> list[str]:
        # -J joins lines the terminal wrapped: a line printed wider than the pane shows whole.
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "test").splitlines()

    def ctrl_c(self) -> None:
        self._tmux("send-keys", "-t", "test", "C-c")

    def wait_for(self, found: object, timeout: float, poll: float = 0.05) -> list[str]:
        """The pane's lines once ``found(lines)`` is true; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.capture()
            if found(lines):  # type: ignore[operator]
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s; the pane shows:\n" + "\n".join(lines))
            time.sleep(poll)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def pane_command(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    (tmp_path / "long_updates.toml").write_text(LONG_UPDATES)
    environment = {
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "XDG_CONFIG_HOME": os.environ["XDG_CONFIG_HOME"],
        "TERM": "xterm-256color",
    }
    train = [
        sys.executable, "-m", "dppo_ckpt.cli", "train", "--config", "long_updates.toml",
        "--n-envs", "1", "--timesteps", "1000", "--checkpoint-every", "1000000",
        "--eval-episodes", "0", "--out", "run",
    ]  # fmt: skip
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in environment.items())
    # The pane stays open after the run, so that its exit code can be read off the screen.
    command = f"env {exports} {shlex.join(train)}; echo EXIT=$?; sleep 300"
    pane = _Pane(command, tmp_path)
    yield pane, tmp_path
    pane.close()


def test_progress_fits_80_columns_and_ctrl_c_in_an_update_is_acknowledged(pane_command):
    from dppo_ckpt.checkpoint.checks import run_checks

    pane, folder = pane_command
    # --timesteps 1000 rounds up to four rollouts of 256 steps: said once, and the bar's total.
    lines = pane.wait_for(
        lambda lines: any(_UPDATE_LINE.match(line) and int(_UPDATE_LINE.match(line)[1]) >= 1
                          for line in lines),
        timeout=120,
    )  # fmt: skip
    update = next(line for line in lines if _UPDATE_LINE.match(line))
    assert "256/1,024" in update, update
    notes = [line for line in lines if "round up" in line]
    assert notes == ["note: 1,000 steps round up to 1,024 (rollouts of 256 steps x 1 env)"]

    pane.ctrl_c()
    sent = time.monotonic()
    lines = pane.wait_for(
        lambda lines: any(line.startswith("Interrupt received") for line in lines), timeout=5
    )
    acknowledged = time.monotonic() - sent
    assert acknowledged < 1.0, f"acknowledged after {acknowledged:.2f} s"
    text = " ".join(" ".join(lines).split())
    assert "Interrupt received: stopping at the end of this update" in text
    # Still in the update when acknowledged: the acknowledgement did not wait for it to end.
    assert not any(line.startswith("checkpoint ") for line in lines)

    lines = pane.wait_for(lambda lines: any(line.startswith("EXIT=") for line in lines), 120)
    assert "EXIT=130" in lines, lines
    assert not any("Traceback" in line for line in lines)
    assert "stopped by Ctrl-C; the final checkpoint is complete and verified" in lines
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, too_wide
    assert not any("…" in line for line in lines), "a cut column"
    assert any(_PHASE_LINE.match(line) for line in lines)
    checkpoint = folder / "run" / "checkpoint_000000256.zip"
    assert f"last checkpoint: {Path('run') / checkpoint.name}" in lines
    assert run_checks(checkpoint, quick=True).exit_code == 0
