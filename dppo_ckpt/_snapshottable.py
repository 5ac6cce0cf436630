"""The outermost wrapper of every environment that :mod:`dppo_ckpt.envs` builds.

A module of its own because it subclasses ``gymnasium.Wrapper``, and :mod:`dppo_ckpt.envs`
must not import gymnasium (numpy) when it loads.
"""

from __future__ import annotations

import contextlib

import gymnasium as gym


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Snapshottable(gym.Wrapper):
    """The outermost wrapper of each environment: pickles and restores what it wraps.

    Called through ``VecEnv.env_method``, so for a ``SubprocVecEnv`` the work happens in the
    environment's own process and only bytes cross the pipe. Both methods return their
    failure instead of raising it: an exception would end a ``SubprocVecEnv`` worker.
    """

    def dppo_ckpt_snapshot(self) -> bytes | str:
        """The wrapped environment (Monitor and every gymnasium wrapper included), pickled;
        or, when it cannot be pickled, the reason as text."""
        import cloudpickle

        try:
            return cloudpickle.dumps(self.env)
        except Exception as exc:  # whatever the environment's pickling raises
            return f"{type(exc).__name__}: {_one_line(exc)}"

    def dppo_ckpt_restore(self, blob: bytes) -> str | None:
        """Replace the wrapped environment with a snapshot of :meth:`dppo_ckpt_snapshot`;
        ``None`` when done, else why not (the environment is then unchanged)."""
        import pickle

        try:
            env = pickle.loads(blob)
        except Exception as exc:  # a snapshot of other software versions
            return f"{type(exc).__name__}: {_one_line(exc)}"
        if not isinstance(env, gym.Env):
            return f"the snapshot holds a {type(env).__name__}, not an environment"
        old, self.env = self.env, env
        with contextlib.suppress(Exception):  # the replaced copy is dropped either way
            old.close()
        return None
