"""Writing result files safely: whole or not at all, with the usual permissions.

Every file jetgraph writes goes through :func:`atomic_write` (a temporary file in the same folder,
then one rename), so an interrupted run leaves no half-written output, and gets mode 0666 less
the umask (0644 by default) rather than ``mkstemp``'s 0600. :func:`check_writable` lets a
command refuse an output it could not write before doing any work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's umask: read from /proc on Linux (no race), else set and set straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: str | Path, data: bytes | str | Callable[[str], None]) -> Path:
    """Write ``data`` (bytes, text, or a function that writes a given file name) to ``path``
    through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {str(path)!r}: {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            if isinstance(data, str):
                stream.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                stream.write(data)
        if callable(data):
            data(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Raise ``OSError`` with a one-line reason unless ``path`` can be created or replaced: it is
    not a folder, and a file can be made in its nearest existing folder (probed by creating and
    deleting one there; nothing else is created)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"the {what} {str(path)!r} is a folder; give a file name")
    folder = path.parent
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write the {what} {str(path)!r}: {str(folder)!r} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write the {what} {str(path)!r}: the file is read-only")
    try:  # a real probe: permissions alone say nothing for root, read-only mounts or /proc
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".jetgraph-probe-", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write the {what} {str(path)!r}: {str(folder)!r} is not "
                              f"writable ({exc.strerror})") from None
    return path
