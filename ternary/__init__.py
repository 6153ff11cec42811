"""ternary: a pure-Python CPU inference engine and torch-free trainer for BitNet b1.58 models.

The package is one namespace over the repository's top-level folders
(`ternary.engine`, `ternary.formats`, `ternary.training`, `ternary.server`, `ternary.bench`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]

if TYPE_CHECKING:
    from ternary.engine.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy, so `import ternary.formats` does not pay for Numba start-up.
    if name == "Engine":
        from ternary.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'ternary' has no attribute {name!r}")
