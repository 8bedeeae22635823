"""Locks for threads that share a LoRWeB model, or the process (a server's request threads, a notebook's workers).

A LoRWeB model holds one analogy at a time (every layer's coefficients, merged or fused weights, the strength), so
the calls that set it and generate from it are serialized per model: a pipeline call holds its transformer's lock
from its query to its output, and ``set_query``, ``clear_query``, ``set_analogy``, ``fuse_lora`` / ``unfuse_lora``,
the strength, injection, removal, backend choice, LoRWeB saves and loads and entering or leaving ``merged()`` of
another thread wait for it (re-entrant: the same thread nests freely). Process-wide state gets process-wide
locks: model loading (accelerate's ``init_empty_weights`` patches ``nn.Module`` for the whole process, so two
overlapping loads could leave every later module on the meta device), ``train`` (it seeds the process-wide RNG and
sets up accelerate's process-wide state) and matplotlib drawing (its text parser is not thread-safe)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref

import torch

_ANALOGY_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()

#: held while a model is loaded (``load_kontext_pipeline``, the analogy encoder, ``from_pretrained``, the evaluation's
#: CLIP and LPIPS) and while LoRWeB layers are built (a module built during another thread's load gets meta
#: parameters from accelerate's process-wide patch; transformers swaps ``PreTrainedModel.tie_weights`` process-wide
#: while it loads, and overlapping loads left the swap behind)
LOADING = threading.RLock()
#: held by ``train`` for its whole run
TRAINING = threading.RLock()
#: held while a figure is drawn and saved
DRAWING = threading.RLock()
#: held by the library's short ``warnings.catch_warnings`` blocks (probing PIL's writers, building LPIPS): they swap
#: Python's process-wide warning filters (before Python 3.14), and two overlapping the wrong way would leave the
#: first one's filters installed for good
WARNING_FILTERS = threading.RLock()


#: folder (real path) -> [its lock, how many threads hold or wait for it]: ``folder_files_lock``
_FOLDER_LOCKS: dict = {}


@contextlib.contextmanager
def folder_files_lock(directory):
    """Held by this process's threads while they replace a set of files that belong together in ``directory`` (a
    checkpoint's weights and its config.yaml): two saves into one folder never leave one's config beside the
    other's weights. (Other processes are not excluded: a training run holds its folder's ``FolderLock``.)"""
    key = os.path.realpath(os.fspath(directory))
    with _GUARD:
        entry = _FOLDER_LOCKS.setdefault(key, [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _GUARD:
            entry[1] -= 1
            if entry[1] == 0:
                del _FOLDER_LOCKS[key]


def analogy_lock(model) -> threading.RLock:
    """The re-entrant lock that serializes the analogy state of ``model`` (one per model object, dropped with it;
    ``torch.compile(model)`` and ``DistributedDataParallel(model)`` share ``model``'s: the calls on a wrapper change
    the model inside it)."""
    from .model import unwrapped_model

    model = unwrapped_model(model)
    with _GUARD:
        lock = _ANALOGY_LOCKS.get(model)
        if lock is None:
            lock = _ANALOGY_LOCKS[model] = threading.RLock()
        return lock


def holding_analogy(model):
    """A context holding ``analogy_lock(model)``; nothing while torch.compile traces (a compiled region does not
    take Python locks) or for an object that is no model (the call then refuses it by name)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    try:
        return analogy_lock(model)
    except TypeError:  # cannot be weakly referenced (a string, None): not a model
        return contextlib.nullcontext()


def serialized_on_model(function):
    """``function(model, ...)`` run holding ``model``'s analogy lock."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with holding_analogy(model):
            return function(model, *args, **kwargs)
    return wrapper


def serialized_on_transformer(method):
    """A pipeline method run holding its transformer's analogy lock."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with holding_analogy(self.transformer):
            return method(self, *args, **kwargs)
    return wrapper


def holding(lock):
    """``function`` run holding the process-wide ``lock``."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with lock:
                return function(*args, **kwargs)
        return wrapper
    return decorate
