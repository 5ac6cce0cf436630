"""Capture and restore every random number generator a training run draws from.

Exact resume needs the generators to continue where they stopped: torch (action sampling,
gSDE noise), numpy's global state (minibatch permutations), python's ``random`` and the action
space's own generator. The captured state is plain JSON so that it is stored in a checkpoint's
``data`` without any pickle.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

RNG_STATE_VERSION = 1


def capture_rng_state(action_space: spaces.Space | None = None) -> dict[str, Any]:
    """Return the state of all generators as a JSON-serialisable dict."""
    numpy_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    space_rng = getattr(action_space, "_np_random", None)
    return {
        "version": RNG_STATE_VERSION,
        "torch": base64.b64encode(th.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": [int(k) for k in numpy_state["state"]["key"]],
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": [python_version, list(python_internal), python_gauss],
        "action_space": None if space_rng is None else space_rng.bit_generator.state,
    }


def restore_rng_state(state: dict[str, Any], action_space: spaces.Space | None = None) -> None:
    """Put every generator back to ``state`` (as returned by :func:`capture_rng_state`)."""
    if state.get("version") != RNG_STATE_VERSION:
        raise ValueError(f"unsupported RNG state version {state.get('version')!r}")
    torch_bytes = base64.b64decode(state["torch"])
    th.set_rng_state(th.frombuffer(bytearray(torch_bytes), dtype=th.uint8))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            np.asarray(numpy_state["key"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    if state.get("action_space") is not None and action_space is not None:
        action_space.np_random.bit_generator.state = state["action_space"]
