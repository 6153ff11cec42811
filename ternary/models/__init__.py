"""The model that ships inside the package, so `ternary-run` works with nothing to download.

`default_model_path()` is what the Engine, `ternary-run` and `ternary-serve` open when no model is given:
the file named by the environment variable TERNARY_MODEL if it is set, else the bundled GGUF
(`python-code.gguf`, a small ternary Python-code model; its card is the "Bundled model" section of README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_NAME", "ENV_VAR", "default_model_path", "models_dir"]

BUNDLED_NAME = "python-code.gguf"
ENV_VAR = "TERNARY_MODEL"


def models_dir() -> Path:
    """The folder the bundled GGUF files are installed in."""
    return Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The model to use when none is given: $TERNARY_MODEL, else the bundled GGUF.

    Raises FileNotFoundError naming the path when that file is missing (a package installed without its data
    files, or a TERNARY_MODEL that points nowhere).
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={override}: no such model file")
        return path
    path = models_dir() / BUNDLED_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the bundled default model is missing (was the package installed without its data "
            f"files?); pass a model path or set {ENV_VAR}"
        )
    return path
