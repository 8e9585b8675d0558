"""Opt-in key log file (README: Key log; format `ES <N_A> <ES>`, `SS <resume[i]> <ss[i]>`).

The file is created safely: never through a symbolic link (`O_NOFOLLOW`), mode 0600, and an
existing path is used only when it is a regular file owned by us with mode 0600 (README: Security
model); anything else refuses to start rather than write secrets where others can read them.
"""

from __future__ import annotations

import os
import stat

HEADER = "# nfq-tcpcrypt key log\n"


class KeyLogError(OSError):
    """The key log path is unsafe (a link, not a regular file, not ours, or readable by others)."""


def _open_safely(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyLogError(exc.errno, f"key log {path}: {exc.strerror} (a symbolic link is refused)") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by us"
    elif stat.S_IMODE(info.st_mode) != 0o600:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}, not 0600"
    if problem is not None:
        os.close(fd)
        raise KeyLogError(f"key log {path} {problem}: refusing to write secrets to it")
    return fd


class KeyLog:
    """Appends the engine's key-log lines to a 0600 file of ours, flushed line by line."""

    def __init__(self, path: str) -> None:
        fd = _open_safely(path)
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
