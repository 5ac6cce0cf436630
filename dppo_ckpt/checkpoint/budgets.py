"""Resource budgets for one untrusted checkpoint, over the whole file, nesting included.

A small file can describe a huge amount of work: a declared shape, a deep nesting, a long run
of cheap opcodes, a huge integer. Every budget is checked *before* the work or the allocation
it guards, and a refusal names the budget (exit code 2), so the user knows which option to
raise for a file they trust to be large.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dppo_ckpt.checkpoint.archive import BudgetExceeded
from dppo_ckpt.checkpoint.materialise import LoadBudget
from dppo_ckpt.checkpoint.stub_pickle import ReadBudget

__all__ = ["DEFAULT_BUDGETS", "BudgetExceeded", "Budgets"]

_GiB = 1024**3


@dataclass(frozen=True)
class Budgets:
    """What checking one file may cost.

    :param max_memory: bytes of arrays, tensors and byte strings built from the file's
        pickles (``--max-memory``), and the largest network its ``policy_kwargs`` may ask for.
    :param timeout: seconds of wall time per file (``--timeout``); a load check that runs
        longer is stopped.
    :param max_opcodes: pickle opcodes over all pickles of the file.
    :param max_int_bytes: size of the largest integer a pickle may hold.
    :param max_elements: elements of any one array, tensor or space.
    :param max_depth: nesting depth of the objects in a pickle.
    """

    max_memory: int = 4 * _GiB
    timeout: float = 120.0
    max_opcodes: int = 5_000_000
    max_int_bytes: int = 1024
    max_elements: int = 1 << 28
    max_depth: int = 200

    def __post_init__(self) -> None:
        for name in ("max_memory", "timeout", "max_opcodes", "max_int_bytes", "max_elements"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def read_budget(self) -> ReadBudget:
        """A fresh reading budget for one file, its clock started now."""
        return ReadBudget(
            max_opcodes=self.max_opcodes,
            max_int_bytes=self.max_int_bytes,
            deadline=time.monotonic() + self.timeout,
        )

    def load_budget(self) -> LoadBudget:
        """A fresh allocation budget for one file."""
        return LoadBudget(
            max_memory=self.max_memory, max_elements=self.max_elements, max_depth=self.max_depth
        )


DEFAULT_BUDGETS = Budgets()
