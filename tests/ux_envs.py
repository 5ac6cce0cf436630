"""Small environments for the tests, registered on import, as ``tests.ux_envs:EnvId``.

They exist to be named with gymnasium's ``module:EnvId`` form: the module is importable only
because the tests put the project on the path, never registered by the package itself.
"""

from __future__ import annotations

import threading
from typing import Any

import gymnasium as gym
import numpy as np

IMAGE_SIZE = 36  # the smallest square NatureCNN's three convolutions accept


class UxVector(gym.Env):
    """A noisy 1-D reach task: observations drift, the action pushes them back to zero."""

    metadata = {"render_modes": ["rgb_array"]}
    observation_space = gym.spaces.Box(-10.0, 10.0, shape=(3,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def __init__(self, scale: float = 1.0, render_mode: str | None = None) -> None:
        self.scale = scale
        self.render_mode = render_mode
        self._state = np.zeros(3, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._state = self.np_random.normal(0.0, self.scale, size=3).astype(np.float32)
        return self._state.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        noise = self.np_random.normal(0.0, 0.1 * self.scale, size=3)
        self._state = np.clip(self._state + noise - 0.1 * float(action[0]), -10, 10)
        self._state = self._state.astype(np.float32)
        reward = float(-np.abs(self._state).sum()) * 10.0  # large, so VecNormalize matters
        return self._state.copy(), reward, False, False, {}


class UxImage(gym.Env):
    """A one-channel image with a bright square that the action moves left, right or not."""

    metadata = {"render_modes": ["rgb_array"]}
    observation_space = gym.spaces.Box(0, 255, shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self._x = 0

    def _image(self) -> np.ndarray:
        image = self.np_random.integers(0, 32, size=self.observation_space.shape, dtype=np.uint8)
        image[10:16, self._x : self._x + 6, 0] = 255
        return image

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._x = int(self.np_random.integers(0, IMAGE_SIZE - 6))
        return self._image(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._x = int(np.clip(self._x + int(action) - 1, 0, IMAGE_SIZE - 6))
        reward = 1.0 if abs(self._x - IMAGE_SIZE // 2) < 4 else 0.0
        return self._image(), reward, False, False, {}


class UxUnpicklable(UxVector):
    """UxVector holding a lock, as environments holding a simulator handle do: no pickle."""

    def __init__(self, scale: float = 1.0, render_mode: str | None = None) -> None:
        super().__init__(scale=scale, render_mode=render_mode)
        self._lock = threading.Lock()


_ENVS = (
    ("UxVector-v0", UxVector, 40),
    ("UxImage-v0", UxImage, 30),
    ("UxUnpicklable-v0", UxUnpicklable, 40),
)
for _id, _entry, _steps in _ENVS:
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry, max_episode_steps=_steps)
