"""The documented verdict of every fixture (README, section "Verify"), shared by the tests."""

from __future__ import annotations

from pathlib import Path

from fixtures.make_fixtures import FIXTURES_DIR, MARKER_PREFIX

#: fixture -> (exit code, IDs of the checks that fail). Static and full runs agree.
EXPECTED: dict[str, tuple[int, frozenset[str]]] = {
    "dppo_quantile_vgs.zip": (0, frozenset()),
    "dppo_categorical_vgs.zip": (0, frozenset()),
    "dppo_vgs_off.zip": (0, frozenset()),
    "dppo_layout1.zip": (0, frozenset()),
    "dppo_legacy.zip": (1, frozenset({"DPPO005"})),
    "sb3_ppo.zip": (0, frozenset()),
    "hostile_data_entry.zip": (3, frozenset({"DPPO004"})),
    "hostile_policy_pth.zip": (3, frozenset({"DPPO004"})),
    "hostile_optimizer_pth.zip": (3, frozenset({"DPPO004"})),
    "hostile_nested_blob.zip": (3, frozenset({"DPPO004"})),
    "hostile_code_by_value.zip": (3, frozenset({"DPPO004"})),
    "broken_truncated.zip": (2, frozenset({"DPPO001"})),
    "broken_bitflip.zip": (2, frozenset({"DPPO001"})),
    "broken_not_a_zip.zip": (2, frozenset({"DPPO001"})),
    "broken_no_data.zip": (2, frozenset({"DPPO001"})),
    "broken_zip_bomb.zip": (2, frozenset({"DPPO001"})),
    "broken_dotdot.zip": (2, frozenset({"DPPO001"})),
    "broken_duplicate.zip": (2, frozenset({"DPPO001"})),
}


def fixture(name: str) -> Path:
    return FIXTURES_DIR / name


def markers(folder: Path) -> list[str]:
    """Marker files a hostile payload would have created in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(MARKER_PREFIX))
