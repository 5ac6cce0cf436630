"""Shared pytest configuration: hypothesis profiles.

``ci`` (loaded when the ``CI`` environment variable is set) runs more examples and prints the
seed blob of a failure so it can be replayed; ``dev`` keeps local runs quick.
``HYPOTHESIS_PROFILE`` overrides the choice.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# The suite runs in portable numerics, the default of `train` and `cycle`: chosen here, before
# any test module imports torch or numpy, so in-process runs match the command line's.
os.environ["DPPO_CKPT_NUMERICS"] = "portable"
from dppo_ckpt import numerics  # noqa: E402

numerics.use_portable_numerics()

# `train` signs run manifests with the user's key; tests keep theirs out of the real home.
import tempfile  # noqa: E402

os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="dppo-ckpt-test-config-")
os.environ.pop("DPPO_CKPT_KEY", None)
