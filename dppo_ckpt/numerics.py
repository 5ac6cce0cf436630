"""The numerics a process trains with: a fingerprint of them, and a portable mode.

Training results depend on more than the seed. The same code on the same data gives other
bits when a library picks other kernels for this CPU: MKL dispatches its BLAS by instruction
set (and takes a vendor-specific path on AMD), ATen picks AVX2 or AVX-512 vectorised kernels,
numpy dispatches its SIMD loops, and any thread count above one changes the order of
floating-point sums. A run resumed on a machine whose CPU differs is then not bit for bit.

**Portable mode** removes those dependencies. It must be chosen before torch and numpy load,
because each library reads its setting once, at start-up:

- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility mode, one code path
  (SSE2-based) on every x86-64 CPU, Intel or not;
- ``ATEN_CPU_CAPABILITY=default``: ATen's kernels built for the x86-64 baseline, no AVX;
- ``NPY_DISABLE_CPU_FEATURES``: numpy's SIMD loops above its build baseline switched off;
- one thread for OpenMP, MKL, OpenBLAS and torch, and oneDNN switched off in torch, whose
  kernels dispatch by instruction set too.

From the command line it is ``--portable`` (the default for ``train`` and ``cycle``; see the
README for its measured cost). From Python, set ``DPPO_CKPT_NUMERICS=portable`` in the
environment of the process, or call :func:`use_portable_numerics` before anything imports
torch or numpy; ``import dppo_ckpt`` applies the variable itself.

**The fingerprint** (:func:`fingerprint`) records what the bits of a run depend on, as plain
JSON: the library versions, torch's BLAS and CPU capability, MKL's mode, the thread count, the
deterministic-algorithms flag, numpy's enabled SIMD dispatch targets, the CPU, and the
scaler's state version. :meth:`dppo_ckpt.ppo.DistributionalPPO.save` stores it in the checkpoint;
:func:`resume_differences` names what differs between a checkpoint's fingerprint and the
current process, so that ``train --resume`` and ``cycle`` can say when a resume cannot be bit
for bit. In portable mode the CPU itself no longer matters, so it is not compared.

This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "NUMERICS_ENV",
    "PORTABLE",
    "NATIVE",
    "NumericsError",
    "portable_environment",
    "apply_numerics",
    "configure_torch",
    "current_mode",
    "fingerprint",
    "resume_differences",
    "resume_note",
    "use_portable_numerics",
]

#: The environment variable that chooses the mode of a Python process (``portable``/``native``).
NUMERICS_ENV = "DPPO_CKPT_NUMERICS"
PORTABLE = "portable"
NATIVE = "native"

# numpy >= 2.4 dispatches by x86-64 micro-architecture level, earlier versions by single
# feature; naming a target the installed numpy does not dispatch makes it warn.
_NUMPY_DISPATCH_TARGETS = "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"
_NUMPY_DISPATCH_TARGETS_BEFORE_2_4 = (
    "SSSE3 SSE41 POPCNT SSE42 AVX F16C FMA3 AVX2 AVX512F AVX512CD AVX512_KNL AVX512_KNM "
    "AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
)


def _numpy_dispatch_targets() -> str:
    # Read from the installed metadata: numpy itself must not be imported before this is set.
    version = _version("numpy") or ""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return _NUMPY_DISPATCH_TARGETS
    if (major, minor) >= (2, 4):
        return _NUMPY_DISPATCH_TARGETS
    return _NUMPY_DISPATCH_TARGETS_BEFORE_2_4


def portable_environment() -> dict[str, str]:
    """The variables portable mode sets before torch and numpy load."""
    return {
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
        "NPY_DISABLE_CPU_FEATURES": _numpy_dispatch_targets(),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }


_LOADED_TOO_EARLY = ("torch", "numpy")

# Fingerprint keys that break bit-for-bit results whatever the mode, and those that only
# matter when the process runs with the CPU's own kernels.
_ALWAYS_COMPARED = (
    "numerics",
    "python",
    "torch",
    "numpy",
    "stable_baselines3",
    "gymnasium",
    "blas",
    "cpu_capability",
    "mkl_cbwr",
    "threads",
    "deterministic_algorithms",
    "mkldnn",
    "numpy_simd",
    "vgs_state_version",
)
_NATIVE_ONLY_COMPARED = ("machine", "cpu")


class NumericsError(RuntimeError):
    """The requested numerics cannot be had in this process (a library loaded too early)."""


def current_mode() -> str:
    """The mode this process was started in: ``DPPO_CKPT_NUMERICS``, or native."""
    value = os.environ.get(NUMERICS_ENV, "").strip().lower()
    return PORTABLE if value == PORTABLE else NATIVE


def use_portable_numerics() -> None:
    """Switch this process to portable numerics; call it before torch or numpy is imported.

    :raises NumericsError: torch or numpy is already loaded with other settings
    """
    apply_numerics(PORTABLE)


def apply_numerics(mode: str) -> None:
    """Put this process in ``mode`` (``"portable"`` or ``"native"``).

    Portable mode sets :func:`portable_environment` (and ``DPPO_CKPT_NUMERICS``, so that child
    processes inherit it); it can only be entered before torch and numpy load, or when the
    process already runs in it. Native mode leaves the libraries' own choices alone, and it
    cannot be had inside a process that started portable.

    :raises NumericsError: the mode cannot be had in this process
    """
    if mode not in (PORTABLE, NATIVE):
        raise ValueError(f"unknown numerics mode {mode!r}; expected {PORTABLE!r} or {NATIVE!r}")
    if mode == current_mode() and (mode == NATIVE or _portable_environment_in_place()):
        if "torch" in sys.modules:
            configure_torch()
        return
    loaded = [name for name in _LOADED_TOO_EARLY if name in sys.modules]
    if loaded:
        raise NumericsError(
            f"{mode} numerics must be chosen before {' and '.join(loaded)} "
            f"{'is' if len(loaded) == 1 else 'are'} imported: set {NUMERICS_ENV}={mode} in "
            "the environment of the process"
        )
    if mode == PORTABLE:
        os.environ.update(portable_environment())
    else:
        for name, value in portable_environment().items():
            if os.environ.get(name) == value:
                del os.environ[name]
    os.environ[NUMERICS_ENV] = mode


def _portable_environment_in_place() -> bool:
    return all(os.environ.get(name) == value for name, value in portable_environment().items())


def configure_torch() -> None:
    """Apply the settings of the current mode that torch takes at run time (idempotent)."""
    if current_mode() != PORTABLE:
        return
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


# ---------------------------------------------------------------------------------------------
# The fingerprint


def _version(distribution: str) -> str | None:
    # Imported here: importlib.metadata is a large share of the static checker's start-up.
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_description() -> str:
    """The CPU's vendor and widest vector extension: what native kernels dispatch on."""
    vendor, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id":
                    vendor = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        import platform

        return platform.processor() or "unknown"
    widest = next(
        (name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "baseline"
    )
    return f"{vendor} {widest}"


def _numpy_simd() -> str:
    """numpy's dispatch targets that are enabled: the SIMD loops above its build baseline
    that this process runs (none in portable mode)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    enabled = [name for name in umath.__cpu_dispatch__ if umath.__cpu_features__.get(name)]
    return " ".join(enabled) or "none"


def fingerprint() -> dict[str, Any]:
    """What this process's training results depend on, as a flat JSON-ready dict."""
    import platform

    import torch

    configure_torch()  # what this process trains with, even before the algorithm is imported

    from dppo_ckpt import __version__
    from dppo_ckpt.vgs import VarianceGradientScaler

    blas = "mkl" if torch.backends.mkl.is_available() else "other"
    return {
        "numerics": current_mode(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "stable_baselines3": _version("stable-baselines3"),
        "gymnasium": _version("gymnasium"),
        "dppo_ckpt": __version__,
        "blas": blas,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "AUTO") if blas == "mkl" else "n/a",
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn": bool(torch.backends.mkldnn.enabled),
        "numpy_simd": _numpy_simd(),
        "machine": platform.machine(),
        "cpu": _cpu_description(),
        "vgs_state_version": VarianceGradientScaler.STATE_FORMAT_VERSION,
    }


def resume_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this process's, as ``key a -> b``.

    An empty list means that a resume here can be bit for bit. When both sides ran portable,
    the CPU is not compared: that is what the mode is for.
    """
    keys = list(_ALWAYS_COMPARED)
    if not (recorded.get("numerics") == PORTABLE and current.get("numerics") == PORTABLE):
        keys += _NATIVE_ONLY_COMPARED
    return [
        f"{key} {recorded.get(key, 'unrecorded')} -> {current.get(key)}"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]


def resume_note(recorded: Mapping[str, Any] | None) -> str | None:
    """The one line that says a resume in this process cannot be bit for bit, or ``None``.

    :param recorded: the checkpoint's fingerprint (``None``: the checkpoint has none)
    """
    if recorded is None:
        return (
            "not bit for bit: the checkpoint records no numerics (plain SB3, or "
            "dppo-ckpt < 0.2), so an exact resume cannot be promised"
        )
    differences = resume_differences(recorded, fingerprint())
    if not differences:
        return None
    return "not bit for bit: the numerics differ from the checkpoint's: " + ", ".join(differences)
