"""The one error type for bad model and tokenizer files.

Every problem found in a file is reported as ``GGUFError(path, where, problem)``, whose message reads
``"<file>: <key or tensor>: <what is wrong>"``, so a user sees which file, which field and why, instead of a
NumPy broadcasting error or a segfault in a jitted kernel. ``GGUFError("already formatted message")`` is
accepted too.
"""

from __future__ import annotations

import os


class GGUFError(ValueError):
    """A model or tokenizer file is unreadable, inconsistent or unsupported."""

    def __init__(
        self, path: str | os.PathLike[str], where: str | None = None, problem: str | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.where = where
        self.problem = problem
        if where is None and problem is None:
            super().__init__(self.path)
        else:
            super().__init__(f"{self.path}: {where}: {problem}")
