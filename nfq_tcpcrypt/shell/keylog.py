"""Opt-in key log file (DESIGN.md §9; format in README: `ES <N_A> <ES>`, `SS <resume[i]> <ss[i]>`)."""

from __future__ import annotations

import os

HEADER = "# nfq-tcpcrypt key log\n"


class KeyLog:
    """Appends the engine's key-log lines to a 0600 file, flushed line by line."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="ascii", buffering=1)
        if os.fstat(fd).st_size == 0:
            self._file.write(HEADER)
            self._file.flush()

    def write(self, line: str) -> None:
        """Append one line (a trailing newline is added when missing) and flush it."""
        self._file.write(line if line.endswith("\n") else line + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()
