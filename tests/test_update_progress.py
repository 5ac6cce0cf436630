"""`DistributionalPPO.update_progress`: one call per minibatch, no bit changed, never saved."""

from __future__ import annotations

import io

from dppo_ckpt.checkpoint.archive import open_checkpoint
from tests._models import make_model, optimizer_state_bytes, parameters_bytes


def test_the_hook_sees_every_minibatch_and_changes_no_bit():
    # One after the other: each model seeds the global generators when it is built.
    plain = make_model()
    plain.learn(128)
    hooked = make_model()
    calls: list[int] = []
    hooked.update_progress = calls.append
    hooked.learn(128)
    # Two rollouts of 64 steps, each 2 epochs of 2 minibatches of 32.
    assert calls == [0, 0, 1, 1] * 2
    assert parameters_bytes(hooked) == parameters_bytes(plain)
    assert optimizer_state_bytes(hooked) == optimizer_state_bytes(plain)


def test_the_hook_is_left_out_of_the_checkpoint():
    model = make_model()
    model.update_progress = lambda epoch: None
    buffer = io.BytesIO()
    model.save(buffer)
    with open_checkpoint(buffer.getvalue()) as archive:
        assert "update_progress" not in archive.data
    assert model.update_progress is not None  # saving leaves it in place
