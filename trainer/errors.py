"""Errors raised while reading user-supplied data files (domain errors: see gramrec.service.errors)."""

from __future__ import annotations

from pathlib import Path

from gramrec.service.errors import GramrecError


class DataFormatError(GramrecError, ValueError):
    """A data file is malformed; the message points at the file and line so users can fix it."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep pickling (e.g. across DataLoader workers) working
        return (type(self), (self.path, self.line, self.problem))
