"""File-system helpers shared by the writers (weights, config.yaml, prepared data, checkpoints) and the image
readers."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
from pathlib import Path
from typing import Iterable, Union

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask: read from /proc/self/status where Linux gives it (the umask is left alone), else by
    setting it and putting it back, under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def naming_the_file(path: Union[str, os.PathLike]):
    """An OSError without a file name raised inside (a write's ENOSPC or EIO names none) re-raised naming ``path``,
    the file being written, so the error says which file the disk could not take. So is the OSError behind a
    serializer's own error: safetensors' ``SafetensorError`` ("... (os error 28)") and the RuntimeError ``torch.save``
    raises over its file object's OSError (give ``torch.save`` an open file: to a path it reports none)."""
    import sys

    handled = sys.exc_info()[1]  # an exception the caller is handling: not this block's cause
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except Exception as exc:
        code = _errno_behind(exc, handled)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc


def _errno_behind(exc: BaseException, stop: BaseException = None):
    """The errno of the OSError a serializer's error wraps, or None: torch's RuntimeError over the OSError it
    caught (its context chain, up to ``stop``, honouring ``raise ... from None``), safetensors' SafetensorError
    ("... (os error N)")."""
    if type(exc).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(exc))
        return int(found.group(1)) if found else None
    if not isinstance(exc, RuntimeError):
        return None
    seen, cause = set(), exc
    while cause is not None and cause is not stop and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        seen.add(id(cause))
        cause = cause.__cause__ if cause.__cause__ is not None or cause.__suppress_context__ else cause.__context__
    return None


def torch_save(obj, path: Union[str, os.PathLike], name: Union[str, os.PathLike, None] = None) -> None:
    """``torch.save(obj)`` into the file ``path`` through a Python file object, so a full disk is an OSError naming
    ``name`` (default ``path``; e.g. the final name of a temporary) instead of torch's "unexpected pos" RuntimeError."""
    import torch

    with naming_the_file(name or path), open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write(path: Union[str, os.PathLike], write, *, sync: bool = False) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (same folder, created when missing), so ``path`` is complete or
    absent. The temporary name ``.<name>.<random>.tmp`` ends in .tmp, not in an image extension: a killed run's
    leftover is never read as a sample (the writers pass the format explicitly). ``sync``: the temporary is flushed
    to disk before the rename (for files whose presence marks work as done). An OSError that names no file (a full
    disk) names ``path``; the folders it created for ``path`` are removed again after a failure (left empty)."""
    path = Path(path)
    created = missing_folders(path.parent)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # inside: a failure (or Ctrl-C) half way removes what it made
        tmp = temporary_file(path.parent, temporary_prefix(path))
        with naming_the_file(path):
            write(Path(tmp))
            if sync:
                sync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        remove_empty_folders(created)
        raise


def missing_folders(folder: Union[str, os.PathLike]) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first: what ``mkdir(parents=True)``
    creates, and a failed call removes again with ``remove_empty_folders``."""
    folder = Path(folder)
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first, as ``missing_folders`` gives them) while they are empty; stops at the
    first that is not (another writer's files) or cannot be removed. One that was never made (a ``mkdir`` that
    failed half way: absent, under a file, a name too long) is passed over, so the outer ones it did make go too.
    Never raises an OSError."""
    for folder in folders:
        try:
            Path(folder).rmdir()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                continue
            break


def append_text(path: Union[str, os.PathLike], text: str) -> None:
    """Append ``text`` (UTF-8) to the file ``path``, created when missing, never through a symlink: a symlink at
    ``path`` (planted in a received folder; none of ours is one) is replaced by a new file, its target untouched."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_NONBLOCK", 0)  # a FIFO planted meanwhile: an error, not a wait for a reader
    if path.is_symlink() or (path.exists() and not path.is_file() and not path.is_dir()):  # a link, a FIFO
        path.unlink()
    fd = os.open(path, flags, 0o666)  # O_NOFOLLOW: a symlink planted meanwhile is an error, not a target
    with naming_the_file(path), os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


def remove_temporaries(folder: Union[str, os.PathLike], names: Iterable[str]) -> list:
    """Remove the temporaries a killed writer left beside ``folder/<name>`` for each of ``names``: files (or links)
    named ``.<name>.<8 random characters>.tmp``, as ``atomic_write`` / ``temporary_file`` make them (the name cut by
    ``temporary_prefix`` at the folder's name limit included). Other files are never touched. Returns the removed
    paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefixes = {temporary_prefix(folder / name) for name in names}
    removed = []
    for entry in folder.iterdir():
        name = entry.name
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None or not _TEMPORARY_TAIL.fullmatch(name[len(prefix):]):
            continue
        if entry.is_symlink() or entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


#: what temporary_file adds to a temporary_prefix: 8 random characters (hex; mkstemp's alphabet in older files) and
#: ``.tmp``
_TEMPORARY_TAIL = re.compile(r"[a-z0-9_]{8}\.tmp")


def unlink_file_or_link(path: Union[str, os.PathLike]) -> None:
    """Remove ``path`` when it is a file or a symlink (a dangling one included; the link, never its target)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)


def loads_json(text: Union[str, bytes]):
    """``json.loads``, with JSON nested deeper than Python's recursion limit (a RecursionError) raised as the
    ``json.JSONDecodeError`` (a ValueError) its readers report for any malformed file."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to be read", text if isinstance(text, str) else "", 0) \
            from None


def sync_file(path: Union[str, os.PathLike]) -> None:
    """Flush ``path``'s data to disk (before a rename that marks it complete)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def name_limit(directory: Union[str, os.PathLike]) -> int:
    """The longest file name (bytes) ``directory``'s file system takes (255 where it cannot be asked)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def temporary_prefix(path: Path, reserve: int = len("12345678.tmp")) -> str:
    """``".<name>."`` for a temporary file beside ``path``, with ``name`` cut (at a character boundary) so that the
    prefix plus ``reserve`` bytes (8 random characters and ``.tmp``) fit the folder's file-name limit: a
    final name that fits it, e.g. a long analogy id, never fails for its temporary's length."""
    limit = name_limit(path.parent)
    name = path.name
    while len(os.fsencode(f".{name}.")) + reserve > limit and name:
        name = name[:-1]
    return f".{name}."


def save_image_atomically(image, path: Union[str, os.PathLike], *, sync: bool = False) -> Path:
    """Save the PIL ``image`` under ``path`` in the format its extension names (``atomic_write``: the file is complete
    or keeps what it held, e.g. a previous result when the disk fills; ``sync`` as there); returns ``path``. An
    extension Pillow does not know is a ValueError. An image Pillow has not decoded yet (opened from a file) is
    decoded first: an error reading it names that file, never ``path``."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix or '(none)'!r}")
    source = getattr(image, "filename", None)
    with naming_the_file(source) if source else contextlib.nullcontext():
        image.load()  # a no-op for a decoded image
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt), sync=sync)
    return path


def save_figure_atomically(fig, path: Union[str, os.PathLike], dpi: int) -> Path:
    """``fig.savefig`` under ``path`` in the format its extension names (png without one), via ``atomic_write``."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower() or "png"))
    return path


def temporary_file(directory: Union[str, os.PathLike], prefix: str, suffix: str = ".tmp", *,
                   named: Union[str, os.PathLike, None] = None) -> str:
    """A new empty file ``<prefix><random><suffix>`` in ``directory`` with the permissions a plain ``open`` gives:
    created with mode 0o666, so the kernel applies the umask, or a folder's default ACL, as it does for ``open``
    (mkstemp's 0600 would survive the rename onto the final name); returns its path. A folder that cannot take it
    raises an OSError naming ``named`` (default ``directory``), never the random name that was not created."""
    return _new_temporary(directory, prefix, suffix, named, folder=False)


def temporary_folder(directory: Union[str, os.PathLike], prefix: str, *,
                     named: Union[str, os.PathLike, None] = None) -> str:
    """A new empty folder ``<prefix><random>`` in ``directory`` with the permissions a plain ``mkdir`` gives (mode
    0o777 less the umask, or the folder's default ACL; mkdtemp's 0700 would survive the rename); errors as
    ``temporary_file``."""
    return _new_temporary(directory, prefix, "", named, folder=True)


def _new_temporary(directory, prefix: str, suffix: str, named, *, folder: bool) -> str:
    no_follow = getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):  # 8 random characters, as mkstemp's (temporary_prefix reserves their room)
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            if folder:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | no_follow, 0o666))
            return path
        except FileExistsError:
            continue
        except OSError as exc:  # a read-only or full folder
            raise OSError(exc.errno, exc.strerror, str(named if named is not None else directory)) from exc
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(named if named is not None else directory))


def write_temporary_text(directory: Union[str, os.PathLike], name: str, text: str) -> str:
    """A temporary file ``.<name>.<random>.tmp`` in ``directory`` (``temporary_file``) holding ``text`` (UTF-8), for
    the caller to rename onto ``directory/name``; removed again when writing it fails. Errors name
    ``directory/name``."""
    final = Path(directory) / name
    tmp = temporary_file(directory, temporary_prefix(final), named=final)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def image_read_errors() -> tuple:
    """What Pillow raises for a file that is not a complete, decodable image: UnidentifiedImageError and a truncated
    file (OSError), some corrupt headers (SyntaxError, ValueError), and DecompressionBombError (a plain Exception)
    for an image of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_read_error_message(path, exc: BaseException) -> str:
    """The one-line error for an image file Pillow cannot read: the file, and for a decompression bomb the limit
    and how to raise it."""
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return (f"{path} is too large to decode ({exc}); if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS "
                "before reading it")
    return f"{path} is not a readable image ({type(exc).__name__}: {exc})"


def recorded_location(name: Union[str, os.PathLike]) -> str:
    """How a model location is recorded (checkpoints, training configs, evaluation runs): a local path that exists
    as an absolute path (a relative one would break when used from another directory), anything else (a hub id)
    unchanged. ``~`` is not expanded, as nowhere in this package (a shell expands an unquoted one)."""
    path = Path(str(name))
    return str(path.resolve()) if path.exists() else str(name)


def same_or_inside(path: Union[str, os.PathLike], folder: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


class FolderInUseError(ValueError):
    """Another process holds the folder's lock (``FolderLock``)."""


#: Error numbers of a file system that does not implement ``flock`` (some network and cluster file systems).
_NO_FLOCK_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSYS", "ENOLCK", "EOPNOTSUPP", "ENOTSUP")
                             if hasattr(errno, name))
#: The descriptors of the locks this process holds: closed in a child forked while they are held (a DataLoader
#: worker), whose copy would otherwise keep the lock after the holder was killed.
_HELD_LOCK_FDS: set = set()


def _close_held_locks_in_child() -> None:
    """In a forked child: close its copies of the held lock descriptors (``_HELD_LOCK_FDS``)."""
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)  # the child's copy only: the parent's lock stays
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class FolderLock:
    """An exclusive lock on ``folder`` for one run: the file ``folder/<name>`` locked with ``flock`` (released by the
    kernel when the holder dies, so a killed run leaves no stale lock; a child forked meanwhile closes its copy),
    holding the holder's process id and host for the message of a refused second run. ``acquire`` creates
    ``folder`` (and missing parents) when missing; ``release`` removes the lock file and the folders ``acquire``
    created that are empty again, so a run refused or failed before writing anything leaves the file system as it
    was (a killed one leaves its lock file, which does no harm). Without ``fcntl`` (Windows), or on a file system
    without ``flock``, nothing is locked (the latter with a warning)."""

    def __init__(self, folder, name: str, what: str):
        self.folder, self.name, self.what = folder, name, what  # checked when acquired (the caller validates)
        self.fd = None
        self.created: list[Path] = []

    @property
    def path(self) -> Path:
        """The lock file, ``folder/<name>``."""
        return Path(self.folder) / self.name

    def acquire(self) -> None:
        """Take the lock (once; later calls do nothing); raise FolderInUseError naming the holder when another
        process has it, or the OSError of a folder or lock file that cannot be created (then nothing stays)."""
        if self.fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # no flock: not locked
            return
        folder = Path(self.folder)
        self.created = missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            while True:
                fd, created_file = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                    os.close(fd)
                    raise FolderInUseError(f"{folder} is in use by another {self.what} ({holder}, which holds "
                                           f"{self.path}); wait for it to end or use another folder") from None
                except OSError as exc:
                    os.close(fd)
                    if created_file:
                        self.path.unlink(missing_ok=True)
                    if exc.errno not in _NO_FLOCK_ERRNOS:
                        raise
                    from .validation import warn

                    warn(f"the file system of {folder} does not support flock ({exc.strerror}): this "
                         f"{self.what} runs without its lock, so make sure no other one uses the folder")
                    self._remove_created()
                    return
                except BaseException:
                    os.close(fd)
                    raise
                self.fd = fd  # locked: from here release() undoes it
                if self._holds_the_file_in_place():
                    break
                self.fd = None  # the holder before removed the file after this open: lock the file in place
                os.close(fd)
            _HELD_LOCK_FDS.add(self.fd)
            self._write_holder()
        except BaseException:
            self.release()
            raise

    def _open(self) -> tuple[int, bool]:
        """(descriptor, whether this call created the file): read-write to record the holder; read-only when the
        file (a killed run's, of another user) cannot be written, which flock takes as well. Never through a
        symlink: one at the lock's name (planted in a received folder; no lock of ours is one) is replaced."""
        no_follow = getattr(os, "O_NOFOLLOW", 0)
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True  # EXCL: never follows
            except FileExistsError:
                pass
            if self.path.is_symlink():
                self.path.unlink(missing_ok=True)
                continue
            try:
                try:  # non-blocking: a FIFO planted at the name would block a read-only open forever
                    fd = os.open(self.path, os.O_RDWR | no_follow | os.O_NONBLOCK)
                except PermissionError:
                    fd = os.open(self.path, os.O_RDONLY | no_follow | os.O_NONBLOCK)
            except FileNotFoundError:  # its holder removed it meanwhile
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # planted (a FIFO, a device): replaced, as a symlink is
                os.close(fd)
                self.path.unlink(missing_ok=True)
                continue
            return fd, False

    def _holds_the_file_in_place(self) -> bool:
        """Whether the locked descriptor is the file at ``path`` (not one its holder removed meanwhile)."""
        try:
            return os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def _write_holder(self) -> None:
        """Write "process <pid> on <host>" into the locked file (nothing on a read-only descriptor)."""
        import socket

        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        except OSError:  # a read-only descriptor (see _open): the message then names no holder
            pass

    def release(self) -> None:
        """Remove the lock file and unlock; then remove the folders ``acquire`` created if they are empty. Never
        raises an OSError (a lock file that cannot be removed stays, harmless)."""
        if self.fd is not None:
            fd = self.fd
            try:
                if self._holds_the_file_in_place():  # ours, not one another process locks now
                    self.path.unlink()  # while locked: a waiting process re-checks the file it locks
            except OSError:
                pass
            finally:
                self.fd = None
                _HELD_LOCK_FDS.discard(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the folders ``acquire`` created, innermost first, while they are empty."""
        remove_empty_folders(self.created)
        self.created = []
