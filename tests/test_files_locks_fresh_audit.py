"""Fresh audit of the file-safety and locking helpers (``lorweb_fast/_files.py``, ``lorweb_fast/_locks.py``) and their
callers. Each test below FAILS on the audited code and states the expected behaviour in its docstring.

1. ``save_lorweb_weights`` to a file name that fits the file system's name limit works once and then fails on every
   re-save: ``model._keep_copy`` names its hidden copy ``.<name>.<random>.kept`` without ``temporary_prefix``'s cut.
2. A failure part-way through creating the missing parent folders leaves the outer ones behind (``atomic_write``,
   ``save_lorweb_weights``, ``FolderLock``), although each promises to remove the folders it made: ``atomic_write``
   runs its ``mkdir`` outside its ``try``, and ``remove_empty_folders`` stops at the never-created inner folder.
3. ``FolderLock._open`` falls back to a blocking ``O_RDONLY`` open when ``O_RDWR`` is refused: a FIFO planted at the
   lock's name (a received folder) hangs the run forever instead of being an error or replaced.
4. ``eval score`` takes no lock on its ``--out`` (``train``, ``data prepare`` and ``eval generate`` do): a second
   scoring into the same folder runs alongside, and its start-up clean-up (``remove_temporaries(out,
   REPORT_FILES)``, meant for a *killed* scoring's leftovers) deletes the running scoring's temporaries, which then
   dies on a file it just wrote.
5. ``temporary_file`` / ``default_permissions`` chmod new files to ``0o666 & ~umask``: in a folder with a default
   POSIX ACL (a group-shared folder) a plain ``open`` gets its mode from the ACL, so the written files lose the
   group's access a plain ``open`` would have given.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from lorweb_fast import _files


# --------------------------------------------------------------------------- 1. re-save to a long file name
def test_resaving_weights_under_a_long_file_name_that_fits_keeps_working(tmp_path):
    """model.py ``save_lorweb_weights`` / ``_keep_copy``: a file name within the folder's name limit
    (here 242 bytes of 255) is saved once; saving again to the same path (a checkpoint refreshed, a second
    ``save_lora_weights``) must also succeed. Today the second save raises ENAMETOOLONG on the hidden
    ``.<name>.<random>.kept`` copy (name + 15 bytes) that ``_keep_copy`` makes with a bare ``mkstemp`` prefix,
    while every other temporary name is cut by ``_files.temporary_prefix`` to fit. Expected: the kept copy's
    name is cut the same way (or otherwise fits), and the re-save replaces the file."""
    import lorweb_fast as lf
    from lorweb_fast.testing import small_lorweb_sequential

    model = small_lorweb_sequential()
    limit = _files.name_limit(tmp_path)
    name = "a" * (limit - 13 - len(".safetensors")) + ".safetensors"  # fits; + 15 bytes for .kept does not
    assert len(name) <= limit
    path = tmp_path / name
    lf.save_lorweb_weights(model, path)
    first = path.read_bytes()
    with __import__("torch").no_grad():
        for p in model.parameters():
            p.add_(1.0)  # something else to write
    lf.save_lorweb_weights(model, path)  # raises OSError(ENAMETOOLONG) today
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no kept copy or temporary left


# --------------------------------------------------------------------------- 2. atomic_write's folders
def _write_atomically(folder):
    _files.atomic_write(folder / "file.txt", lambda tmp: tmp.write_text("x"))


def _save_weights(folder):
    import lorweb_fast as lf
    from lorweb_fast.testing import small_lorweb_sequential

    lf.save_lorweb_weights(small_lorweb_sequential(), folder / "w.safetensors")


def _lock_folder(folder):
    lock = _files.FolderLock(folder, "x.lock", "thing")
    try:
        lock.acquire()
    finally:
        lock.release()


@pytest.mark.parametrize("writer", [_write_atomically, _save_weights, _lock_folder],
                         ids=["atomic_write", "save_lorweb_weights", "FolderLock"])
def test_a_writer_removes_the_outer_folders_it_made_when_an_inner_one_fails(tmp_path, writer):
    """_files.py ``atomic_write`` ("the folders it created for ``path`` are removed again after a failure"),
    model.py ``save_lorweb_weights`` (README: "removes every folder it created") and ``FolderLock.acquire`` /
    ``release`` ("a run refused or failed before writing anything leaves the file system as it was"). Given a
    target under ``new/<component>/`` where ``new/`` can be made but ``<component>`` cannot (here longer than the
    name limit: ENAMETOOLONG; equally a full inode table or a Ctrl-C between the two mkdirs), ``new/`` stays:
    ``atomic_write`` runs its ``mkdir`` before its ``try``, and ``_files.remove_empty_folders`` stops at the
    first folder it cannot remove, which is the inner one that was never created (rmdir: ENAMETOOLONG /
    ENOENT), so the outer one it did create is never reached. Expected: the OSError is raised and ``tmp_path``
    is as before (empty)."""
    too_long = "b" * (_files.name_limit(tmp_path) + 1)
    with pytest.raises(OSError) as info:
        writer(tmp_path / "new" / too_long)
    assert info.value.errno == errno.ENAMETOOLONG
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_removes_the_folders_it_made_when_interrupted_between_two_mkdirs(tmp_path, monkeypatch):
    """Same rule as above, with a Ctrl-C (KeyboardInterrupt) raised by the second ``mkdir`` of the parents
    ``atomic_write`` creates: expected, no folder of this call stays."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).name == "y" and (tmp_path / "x").is_dir():  # x/ made, Ctrl-C before x/y/
            raise KeyboardInterrupt
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(KeyboardInterrupt):
        _files.atomic_write(tmp_path / "x" / "y" / "file.txt", lambda tmp: tmp.write_text("x"))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. FIFO at the lock's name
def test_folder_lock_on_a_fifo_that_cannot_be_opened_read_write_does_not_hang(tmp_path, monkeypatch):
    """_files.py ``FolderLock._open``: when ``O_RDWR`` is refused (a lock file of another user, not writable) it
    opens the name ``O_RDONLY`` without ``O_NONBLOCK``. A FIFO planted at the lock's name in a received folder
    (mode 0444, not ours: ``O_RDWR`` gives EACCES; simulated here since the tests may run as root) makes that open
    wait for a writer for ever: ``lorweb-fast train`` / ``data prepare`` / ``eval generate`` hang at start-up. The
    project treats planted FIFOs as errors elsewhere (a FIFO named like a target image, one at the metric cache,
    ``append_text``'s ``O_NONBLOCK``). Expected: ``acquire`` returns or raises within a few seconds (an error naming
    the lock file, or the FIFO replaced as a planted symlink is)."""
    lock_path = tmp_path / "x.lock"
    os.mkfifo(lock_path, 0o444)
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if os.fspath(path) == os.fspath(lock_path) and flags & os.O_RDWR and not flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(_files.os, "open", open_)
    outcome = {}
    lock = _files.FolderLock(tmp_path, "x.lock", "thing")

    def run():
        try:
            lock.acquire()
            outcome["acquired"] = True
        except BaseException as exc:  # noqa: BLE001 (recorded for the assertion)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    if hung:  # let the blocked open return (a writer appears), so the thread ends
        fd = real_open(lock_path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
    monkeypatch.undo()
    lock.release()
    assert not hung, "FolderLock.acquire blocked on a FIFO at the lock's name"
    if "error" in outcome:
        assert str(lock_path) in str(outcome["error"])


# --------------------------------------------------------------------------- 4. two eval score runs, one --out
@pytest.fixture(scope="module")
def score_assets(tmp_path_factory):
    """A tiny evaluation set (one task, two triplets), one runs folder made from it and a tiny CLIP."""
    pytest.importorskip("transformers")
    from lorweb_fast import demo
    from lorweb_fast.evaluation import tiny

    root = tmp_path_factory.mktemp("files_locks_score")
    evalset = tiny.make_folder_evalset(root / "evalset", tasks=("flip",), per_task=2, size=(32, 32))
    tiny.make_runs_folder(root / "ours", evalset, seed=1)
    demo.build_tiny_clip(root / "clip")
    return root


def test_a_second_eval_score_into_a_folder_being_scored_is_refused(score_assets, tmp_path, monkeypatch):
    """evaluation/score.py ``score``: ``train``, ``data prepare`` and ``eval generate`` hold a ``FolderLock`` on
    their output folder ("one run per folder"); ``eval score`` holds none, yet its start-up
    ``remove_temporaries(out, REPORT_FILES)`` ("a killed scoring's") cannot tell a killed scoring's temporaries
    from a running one's. Here scoring A is paused inside ``report._replace_together`` right after writing its
    metrics.json temporary; scoring B into the same ``out`` then runs to the end, deleting A's temporary, and A
    dies with FileNotFoundError on its own file. Expected (as ``eval generate``): B is refused with an error
    saying the folder is in use, and A completes with its full report."""
    from lorweb_fast.evaluation import score as S

    out = tmp_path / "report"
    runs = {"ours": score_assets / "ours"}
    kwargs = dict(metrics=("clip_dir",), encoder=str(score_assets / "clip"), device="cpu", progress=False)
    a_wrote_temp, b_done = threading.Event(), threading.Event()
    real_sync = _files.sync_file
    a_thread = {}

    def sync_file(path):
        real_sync(path)
        if threading.get_ident() == a_thread.get("ident") and not a_wrote_temp.is_set():
            a_wrote_temp.set()  # A's metrics.json temporary is written and synced, not yet renamed
            b_done.wait(60)

    monkeypatch.setattr(_files, "sync_file", sync_file)
    outcome = {}

    def scoring_a():
        a_thread["ident"] = threading.get_ident()
        try:
            outcome["a"] = S.score(runs, out, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            outcome["a_error"] = exc
        finally:
            a_wrote_temp.set()

    thread = threading.Thread(target=scoring_a, daemon=True)
    thread.start()
    assert a_wrote_temp.wait(120)
    try:
        S.score(runs, out, **kwargs)
        outcome["b"] = "completed"
    except Exception as exc:  # noqa: BLE001
        outcome["b_error"] = exc
    finally:
        b_done.set()
    thread.join(120)
    assert "a_error" not in outcome, f"the running scoring failed: {outcome.get('a_error')!r}"
    assert "b_error" in outcome and "in use" in str(outcome["b_error"]), outcome


# --------------------------------------------------------------------------- 5. default ACLs
def _posix_acl(entries) -> bytes:
    """The ``system.posix_acl_*`` xattr value of ``entries`` ((tag, permission bits) pairs, no qualifier)."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)


def _plain_and_ours(tmp_path, write):
    """(mode of a file made by a plain ``open``, mode of the file ``write(folder / name)`` makes) in a folder whose
    default ACL is user::rw- group::rw- other::r-- (a group-shared project folder), under umask 077."""
    folder = tmp_path / "shared"
    folder.mkdir()
    try:  # user::rw- group::rw- other::r--
        os.setxattr(folder, "system.posix_acl_default", _posix_acl([(0x01, 6), (0x04, 6), (0x20, 4)]))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"no POSIX ACLs here ({exc})")
    old = os.umask(0o077)
    try:
        with open(folder / "plain.txt", "w") as f:
            f.write("x")
        made = write(folder)
    finally:
        os.umask(old)
    return (folder / "plain.txt").stat().st_mode & 0o777, Path(made).stat().st_mode & 0o777


def _atomic_text(folder):
    _files.atomic_write(folder / "config.yaml", lambda tmp: tmp.write_text("x"))
    return folder / "config.yaml"


def _weights(folder):
    import lorweb_fast as lf
    from lorweb_fast.testing import small_lorweb_sequential

    lf.save_lorweb_weights(small_lorweb_sequential(), folder / "lorweb.safetensors")
    return folder / "lorweb.safetensors"


@pytest.mark.parametrize("write", [_atomic_text, _weights], ids=["atomic_write", "save_lorweb_weights"])
def test_new_files_get_the_mode_a_plain_open_gives_under_a_default_acl(tmp_path, write):
    """_files.py ``temporary_file`` / ``default_permissions``: "the permissions a plain ``open`` would give". They
    chmod the temporary to ``0o666 & ~umask``; but in a folder with a default POSIX ACL (the usual way to share a
    project folder with a group on a shared machine, the very case ``default_permissions`` was written for) the
    kernel ignores the umask and takes the mode from the ACL: a plain ``open`` gives 0o664 here, the chmod gives
    0o600 and strips the group's access. Expected: the written file's mode equals the plain ``open``'s (e.g.
    create the temporary with ``os.open(name, O_CREAT | O_EXCL, 0o666)`` so the kernel applies umask or ACL, and
    put that mode back after a writer that replaces the file, as safetensors does)."""
    plain, ours = _plain_and_ours(tmp_path, write)
    assert oct(ours) == oct(plain)
