"""File-system helpers shared by the writers (weights, config.yaml, prepared data, checkpoints)."""

from __future__ import annotations

import os
import threading
from typing import Union

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_permissions(path: Union[str, os.PathLike], *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would have given it (0o666 / 0o777 less the umask).
    ``tempfile.mkstemp`` / ``mkdtemp`` create their files 0600 and folders 0700, which the atomic rename keeps:
    a checkpoint or prepared dataset then could not be read by other users of a shared machine."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
