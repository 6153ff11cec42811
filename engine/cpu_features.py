"""Which ternary kernel paths this machine can run, and the user's override (``TERNARY_KERNELS``).

A path needs the instructions twice over: the CPU must have them (``/proc/cpuinfo``) and the LLVM target Numba
compiles for must enable them (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` can narrow it, e.g. for portable
caches). Emitting an intrinsic the target lacks aborts the whole process inside LLVM, so nothing unsupported
is ever selected: an override naming such a path is an error, not a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

import llvmlite.binding as llvm
import numba

ENV_VAR = "TERNARY_KERNELS"
KERNEL_PATHS = ("avx512vnni", "avxvnni", "avx2", "generic")  # fastest first

# Requirements in LLVM feature names; a path is available when any one alternative is fully present.
_REQUIREMENTS: dict[str, tuple[frozenset[str], ...]] = {
    "avx512vnni": (frozenset({"avx512f", "avx512bw", "avx512vnni"}),),
    # 256-bit vpdpbusd: VEX-encoded AVX-VNNI, or EVEX with AVX512-VL.
    "avxvnni": (frozenset({"avx2", "avxvnni"}), frozenset({"avx2", "avx512vnni", "avx512vl"})),
    "avx2": (frozenset({"avx2"}),),
    "generic": (frozenset(),),
}
# /proc/cpuinfo spells a few flags differently from LLVM.
_CPUINFO_TO_LLVM = {"avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni"}


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The feature flags of the first processor in ``/proc/cpuinfo`` text, in LLVM's spelling."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(_CPUINFO_TO_LLVM.get(f, f) for f in value.split())
    return frozenset()


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's flags from ``/proc/cpuinfo``, or None where that file is missing (not Linux)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    return parse_cpuinfo_flags(text)


def parse_llvm_features(spec: str) -> frozenset[str]:
    """Enabled features of an LLVM feature string such as ``"+avx2,-avx512f,+fma"``."""
    return frozenset(f[1:] for f in spec.split(",") if f.startswith("+"))


def llvm_target_features() -> frozenset[str]:
    """The features LLVM enables when Numba compiles for this process (Numba's own rule)."""
    if numba.config.CPU_FEATURES is not None:
        return parse_llvm_features(numba.config.CPU_FEATURES)
    return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)


def supported_paths(
    flags: frozenset[str] | None = None, target: frozenset[str] | None = None
) -> tuple[str, ...]:
    """Kernel paths both the CPU (``flags``) and the compile target (``target``) support, fastest first."""
    target = llvm_target_features() if target is None else target
    if flags is None:
        flags = cpu_flags()
    have = target if flags is None else flags & target
    return tuple(p for p in KERNEL_PATHS if any(req <= have for req in _REQUIREMENTS[p]))


def select_path(
    requested: str | None = None, flags: frozenset[str] | None = None, target: frozenset[str] | None = None
) -> str:
    """The kernel path to run: ``requested``, else ``$TERNARY_KERNELS``, else the fastest supported.

    ``"auto"`` (or empty) means the fastest; an unknown or unsupported name raises ``ValueError``.
    """
    source = "requested kernel path"
    if requested is None:
        requested = os.environ.get(ENV_VAR)
        source = ENV_VAR
    supported = supported_paths(flags, target)
    if requested is None or requested.strip().lower() in ("", "auto"):
        return supported[0]
    name = requested.strip().lower()
    if name not in KERNEL_PATHS:
        raise ValueError(
            f"{source}={requested!r}: unknown kernel path; choose one of {', '.join(KERNEL_PATHS)}"
        )
    if name not in supported:
        raise ValueError(
            f"{source}={requested!r}: this CPU / LLVM target cannot run it "
            f"(supported: {', '.join(supported)})"
        )
    return name
