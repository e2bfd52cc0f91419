"""Writing files so that a crash, a kill or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file in the same folder, then renaming it.

    The temporary file is flushed to disk before the rename, so after a crash the path holds either its previous
    content or the new one, never a mix. A failed write (disk full ...) raises an ``OSError`` naming ``path`` (not its
    temporary) and removes the temporary; an ``OSError`` that ``write`` raises with its own message (no ``errno``, such
    as a checksum mismatch) or that names another file passes through unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600), and some writers (safetensors) recreate it so: after writing, give it
        # what open() would have given it
        os.chmod(tmp, _file_mode(path))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno is None or exc.filename not in (None, tmp):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _file_mode(path: Path) -> int:
    """Permissions for a new version of ``path``: those of the file it replaces, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        pass
    mask = os.umask(0)  # the only way to read the umask; set back at once
    os.umask(mask)
    return 0o666 & ~mask
