"""Resource hygiene audit: does every public operation give back what it takes, on success and on failure (a bad
input, a monkeypatched error, a ``KeyboardInterrupt`` raised from inside a callback)? CPU only, tiny local models,
nothing downloaded.

Method. ``gives_back(...)`` wraps the operation: a garbage collection, then a ``snapshot()`` before and after of
(1) the open file descriptors and what they point to (``/proc/self/fd`` + ``os.readlink``), (2) the child processes
(``/proc/self/task/*/children``) and the Python threads (``threading.enumerate``), (3) the process-wide state:
torch's thread counts, ``torch.backends`` flags (cuDNN, SDPA kernels, TF32, mkldnn), default dtype and device,
deterministic mode, grad / inference / anomaly mode, autocast, ``os.environ``, ``sys.path``, the working directory,
every logger's level / handlers / propagation, ``warnings`` filters and hooks, the signal handlers (SIGINT, SIGTERM,
SIGHUP, SIGPIPE, SIGCHLD), ``sys.excepthook``, stdout / stderr, ``PIL.Image.MAX_IMAGE_PIXELS``, matplotlib's raw
rcParams (read without resolving the backend) and pyplot figures, diffusers' / transformers' / huggingface_hub's
progress-bar switches, the open tqdm bars, and the module-level patches a model load makes (accelerate's
``init_empty_weights`` on ``nn.Module``, transformers' ``tie_weights``). Inside it ``ResourceWarning`` is an error
and ``sys.unraisablehook`` collects the ones raised from ``__del__`` (an unclosed file found by the collector).
``tempfile.tempdir`` / ``TMPDIR`` point at a fresh folder that must stay empty (``watched_tmp``), and the output
folders must hold no temporaries or locks afterwards (``leftovers``: ``*.tmp``, ``.tmp-step-*``, ``*.kept``,
``.lorweb-*.lock``). Failures are checked while the error is still referenced (a notebook keeps the last one in
``sys.last_value``), then the lock is taken again and the call retried.

Allowed, and pinned where cheap (third-party and bounded, not given back by design): matplotlib's font cache keeps
its FreeType files open (``mpl-data/fonts``, an lru cache of at most 64 fonts: a second plot opens no more); tqdm's
``tqdm_monitor`` daemon thread (one per process, started by the first shown bar, until exit; a quiet run none);
torch's DataLoader installs its SIGCHLD handler the first time workers start and keeps it for the process (its
worker-failure check; putting the old handler back would switch that check off for later loaders); an fp32
pipeline's weights are memory maps of its safetensors files (zero-copy loads), held exactly as long as the pipeline
(pinned); a model load interrupted inside the libraries keeps a file mapped only while that error is referenced
(their frames); a logger a library creates at its first import is new, not a change (``lorweb_fast*`` loggers must
stay in the default configuration). ``global_state`` itself imports lazily loaded modules on its first call, so it
runs once before any test.

====================================================  =====  =====  ===============  ======  =====  ===============
operation                                             fds    temp   threads / procs  global  locks  verdict
====================================================  =====  =====  ===============  ======  =====  ===============
save / load_lorweb_weights, save_pretrained / folder  ok     ok     ok               ok      n/a    ok (no mmap
  load; corrupt file; save interrupted                                                              kept)
LoRWeBKontextPipeline.from_pretrained (+ interrupted) mmap*  ok     ok               ok      ok     ok (*legit.)
pipeline call (progress on/off; Ctrl-C in callback)   ok     ok     ok (bar closed)  ok      ok     ok
pipe.save_pretrained, plot_coefficients, plot_loss    fonts  ok     ok               ok      ok     ok
training.train, num_workers 0 / 2, success            fonts  ok     ok               SIGCHLD ok     ok
train, step_callback raising (RuntimeError / Ctrl-C)  ok     ok     ok               ok      ok     ok, retry works
train, a DataLoader worker raising (num_workers 2)    was    ok     was LEAK (2      ok      ok     fixed
  (API; `lorweb-fast train` in-process is clean)      LEAK          workers, 2 feeder
                                                                    threads)
data prepare / data check (API and CLI), dump         ok     ok     ok (pool joined) ok      ok     ok
data prepare / check failing inside pool threads      ok     ok     ok               ok      ok     ok, retry works
data prepare / check with progress=False              ok     ok     was: tqdm        ok      n/a    fixed
                                                                    monitor started
eval read_evalset, eval generate (+ Ctrl-C), score    fonts  ok     ok               ok      ok     ok
  (+ Ctrl-C in LPIPS)
lorweb-fast infer (+ Ctrl-C), --coefficients-plot     fonts  ok     ok               ok      n/a    ok
====================================================  =====  =====  ===============  ======  =====  ===============

Defects found, fixed in the same session (their tests pin the fix): ``training._batches`` kept the DataLoader
iterator (worker processes, feeder threads, pipes) alive while the error a worker raised was referenced (now the
workers are shut down when the batches end, stop or fail, and the error's cause carries no traceback); a disabled
tqdm bar (``progress=False``) still started tqdm's monitor thread (now ``lorweb_fast._progress.progress_bar`` builds
disabled bars without it).
"""

import contextlib
import errno
import gc
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import _locks, cli, data, demo, lora_api, training
from lorweb_fast._files import FolderLock
from lorweb_fast.data import PREPARE_LOCK_NAME, AnalogyDataError
from lorweb_fast.evaluation import evalsets, tiny
from lorweb_fast.evaluation.generate import GENERATE_LOCK_NAME
from lorweb_fast.testing import (build_tiny_lorweb_assets, infer_input_files, one_intra_op_thread, random_analogy,
                                 relation252k_folder, tiny_pair_model, tiny_train_config)
from lorweb_fast.training import RUN_LOCK_NAME

pytest.importorskip("diffusers")
if not os.path.isdir("/proc/self/task") or not os.path.exists(f"/proc/self/task/{os.getpid()}/children"):
    pytest.skip("needs Linux /proc (file descriptors, child processes)", allow_module_level=True)

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
#: matplotlib's FreeType font cache (font_manager's lru-cached FT2Font objects keep their files open)
MPL_FONTS = os.sep.join(("", "mpl-data", "fonts", ""))
#: torch's DataLoader SIGCHLD handler (torch/utils/data/_utils/signal_handling.py), installed once per process
TORCH_SIGCHLD = "_set_SIGCHLD_handler.<locals>.handler"
TQDM_MONITOR = "tqdm_monitor"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)
LOCKS = (RUN_LOCK_NAME, PREPARE_LOCK_NAME, GENERATE_LOCK_NAME)


# ------------------------------------------------------------------------------------------------------ snapshot
def open_fds() -> dict:
    """{fd: what it points to} of this process (the listing's own descriptor left out)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if not target.startswith("/proc/"):
                fds[int(name)] = target
    return fds


def child_pids() -> set:
    """The process ids of this process's children (any thread's)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            pids |= set(f.read().split())
    return pids


def mappings(root) -> Counter:
    """{file: number of mappings} of the files under ``root`` this process has mapped (``/proc/self/maps``)."""
    with open("/proc/self/maps") as f:
        return Counter(line.split()[-1] for line in f if str(root) in line)


def logger_config() -> dict:
    """{name: (level, propagate, disabled, handlers)} of the root logger and every logger created so far."""
    found = {"": logging.getLogger()}
    found.update((n, lg) for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger))
    return {n: (lg.level, lg.propagate, lg.disabled, tuple(map(id, lg.handlers))) for n, lg in found.items()}


def global_state() -> dict:
    """The process-wide state an operation must leave as it found it (module docstring). Its first call imports
    lazily loaded modules (transformers' ``PreTrainedModel`` brings scipy, torch.distributed's checkpointing and
    their loggers and warning filters): ``one_thread`` calls it once before any test."""
    import diffusers.utils.logging as diffusers_logging
    import matplotlib
    import PIL.Image
    import transformers
    import transformers.utils.logging as transformers_logging
    from tqdm.std import tqdm

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module: ``utils.tqdm`` is the class
    b = torch.backends
    pyplot = sys.modules.get("matplotlib.pyplot")
    return {
        "torch threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "default dtype / device": (torch.get_default_dtype(), str(torch.get_default_device())),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "grad / inference / anomaly": (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                                       torch.is_anomaly_enabled()),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "matmul precision": torch.get_float32_matmul_precision(),
        "cudnn": (b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic,
                  b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision),
        "cuda matmul": (b.fp32_precision, b.cuda.matmul.fp32_precision,
                        b.cuda.matmul.allow_fp16_reduced_precision_reduction,
                        b.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "sdp kernels": (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(),
                        b.cuda.cudnn_sdp_enabled()),
        "mkldnn": b.mkldnn.enabled,
        "environ": dict(os.environ), "sys.path": list(sys.path), "cwd": os.getcwd(),
        "loggers": logger_config(),
        "warnings": (list(warnings.filters), warnings.showwarning, warnings.formatwarning),
        "signals": {sig: signal.getsignal(sig) for sig in SIGNALS},
        "hooks and stdio": (sys.excepthook, threading.excepthook, sys.stdout, sys.stderr),
        "PIL.Image.MAX_IMAGE_PIXELS": PIL.Image.MAX_IMAGE_PIXELS,
        "matplotlib rcParams": dict.copy(matplotlib.rcParams),  # raw: reading "backend" would resolve it
        "pyplot figures": None if pyplot is None else pyplot.get_fignums(),
        "library progress bars": (diffusers_logging.is_progress_bar_enabled(),
                                  transformers_logging.is_progress_bar_enabled(),
                                  hub_tqdm.are_progress_bars_disabled(),
                                  dict(getattr(hub_tqdm, "progress_bar_states", {}))),
        "open tqdm bars": len(tqdm._instances),
        "load patches": (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer,
                         getattr(transformers.PreTrainedModel, "tie_weights", None)),
    }


def snapshot() -> dict:
    gc.collect()
    return {"fds": open_fds(), "children": child_pids(), "threads": [t.name for t in threading.enumerate()],
            "sigchld": signal.getsignal(signal.SIGCHLD), "state": global_state()}


def differences(before: dict, after: dict, *, tqdm_monitor: bool = True) -> dict:
    """What ``after`` holds that ``before`` did not (or lost), but for the allowed third-party leftovers (module
    docstring): matplotlib's font files, one tqdm monitor thread (unless ``tqdm_monitor`` is False), torch's SIGCHLD
    handler, new loggers in their default configuration."""
    found = {}
    opened = {fd: p for fd, p in after["fds"].items() if before["fds"].get(fd) != p and MPL_FONTS not in p}
    closed = {fd: p for fd, p in before["fds"].items() if after["fds"].get(fd) != p}
    if opened or closed:
        found["file descriptors"] = {"opened": opened, "closed": closed}
    if after["children"] - before["children"]:
        found["child processes"] = sorted(after["children"] - before["children"])
    threads = Counter(after["threads"]) - Counter(before["threads"])
    if tqdm_monitor and TQDM_MONITOR not in before["threads"]:
        threads[TQDM_MONITOR] = max(0, threads[TQDM_MONITOR] - 1)
    if +threads:
        found["threads"] = sorted((+threads).elements())
    sigchld = after["sigchld"]
    if sigchld != before["sigchld"] and getattr(sigchld, "__qualname__", "") != TORCH_SIGCHLD:
        found["SIGCHLD handler"] = (before["sigchld"], sigchld)
    old, new = before["state"], after["state"]
    for key in old:
        if key == "loggers":  # a logger a library creates when first imported is new, not a change; ours must be
            default = (logging.NOTSET, True, False, ())  # left in the default configuration
            changed = {n: (old[key].get(n), v) for n, v in new[key].items()
                       if (n in old[key] or n.startswith("lorweb_fast")) and old[key].get(n, default) != v}
            if changed:
                found[key] = changed
        elif old[key] != new[key]:
            found[key] = (old[key], new[key]) if not isinstance(old[key], dict) else {
                k: (old[key].get(k, "<absent>"), new[key].get(k, "<absent>")) for k in old[key].keys() | new[key]
                if old[key].get(k, "<absent>") != new[key].get(k, "<absent>")}
    return found


@contextlib.contextmanager
def gives_back(what: str, watched: Path = None, *, tqdm_monitor: bool = True):
    """Run the block with ResourceWarning an error (unraisable ones collected) and assert that it gave back what it
    took (``differences``: nothing), that no ResourceWarning was raised, and that ``watched`` (the temporary folder)
    is still empty."""
    unraisable, hook = [], sys.unraisablehook
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        sys.unraisablehook = unraisable.append
        try:
            before = snapshot()
            yield
            after = snapshot()
        finally:
            sys.unraisablehook = hook
    warned = [f"{u.exc_type.__name__}: {u.exc_value} ({u.object!r})" for u in unraisable
              if issubclass(u.exc_type, ResourceWarning)]
    assert not warned, f"{what}: {warned}"
    found = differences(before, after, tqdm_monitor=tqdm_monitor)
    assert not found, f"{what} did not give back: {found}"
    if watched is not None:
        assert sorted(p.name for p in watched.iterdir()) == [], f"{what} left files in the temporary folder"


def leftovers(root) -> list:
    """Temporaries and locks under ``root``: atomic writes' ``*.tmp`` / ``.<name>.<random>.tmp.*``, checkpoint
    folders ``.tmp-step-*`` (also ``-replaced``), kept copies ``*.kept``, run locks ``.lorweb-*.lock``."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if p.name.endswith((".tmp", ".kept", ".lock")) or p.name.startswith(".tmp-step-")
                  or ".tmp." in p.name)


def assert_lock_free(folder, name: str) -> None:
    """No lock file left in ``folder`` and the lock can be taken (and given back) right away."""
    assert not (Path(folder) / name).exists(), f"{name} left in {folder}"
    lock = FolderLock(folder, name, "audit")
    lock.acquire()
    lock.release()


def assert_process_locks_free(*models) -> None:
    """The process-wide locks (model loading, training, drawing) and the models' analogy locks can be taken by
    another thread at once: nothing holds them after the call."""
    locks = [_locks.LOADING, _locks.TRAINING, _locks.DRAWING, *(_locks.analogy_lock(m) for m in models)]
    taken = []

    def take():
        for lock in locks:
            if lock.acquire(blocking=False):
                lock.release()
                taken.append(lock)

    worker = threading.Thread(target=take)
    worker.start()
    worker.join()
    assert len(taken) == len(locks), "a process-wide or analogy lock is still held"


def raising_at(n: int, real, error):
    """``real`` wrapped to raise ``error`` (an exception instance) at its ``n``-th call; returns (wrapper, fired):
    ``fired[0]`` counts the raises (the premise of each failure test)."""
    calls, fired = [0], [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            fired[0] += 1
            raise error
        return real(*args, **kwargs)

    return wrapped, fired


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    importlib.import_module("matplotlib.figure")  # its config and font list set up before any folder is watched
    global_state()  # its own lazy imports, before any snapshot
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``build_tiny_lorweb_assets`` (pipe/, clip/, lorweb.safetensors) + data/ (4 synthetic grids, as
    ``tiny_training_assets``) + bad_data/ (the same with one target a truncated JPEG: its header passes the scan,
    it fails to decode at its training step, in a DataLoader worker with num_workers > 0)."""
    from PIL import Image

    root = build_tiny_lorweb_assets(tmp_path_factory.mktemp("resource_assets"))
    demo.make_synthetic_analogies(root / "data", 4)
    shutil.copytree(root / "data", root / "bad_data")
    target = root / "bad_data" / "target" / "0000.png"
    with Image.open(target) as im:
        rgb = im.convert("RGB")
    target.unlink()
    rgb.save(target.with_suffix(".jpg"), quality=95)
    raw = target.with_suffix(".jpg").read_bytes()
    target.with_suffix(".jpg").write_bytes(raw[:len(raw) // 2])
    return root


@pytest.fixture(scope="module")
def pipe(assets):
    from lorweb_fast.flux import LoRWeBKontextPipeline

    loaded = LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                   encoder=assets / "clip", resolution="native", long_edge=64)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture()
def watched_tmp(tmp_path, monkeypatch):
    """A fresh, empty folder as ``tempfile.gettempdir()`` and TMPDIR."""
    folder = tmp_path / "TMPDIR"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def train_config(assets, out, **over):
    return tiny_train_config(assets, out, **{"steps": 2, "checkpoint_every": 2, **over})


# ------------------------------------------------------------------------------------------ checkpoints (files)
def test_checkpoint_file_and_folder_round_trips_give_back_everything(tmp_path, watched_tmp):
    """save_lorweb_weights (new file, then replacing it: the kept copy), load_lorweb_weights, save_pretrained
    (folder: weights, config.yaml, card) and load_lora_weights from the folder: no descriptor, mapping, thread or
    temporary left; the loaded tensors are copies (no mmap of the checkpoint kept); the folder holds the final files
    only."""
    source, target, folder_target = tiny_pair_model(0), tiny_pair_model(1), tiny_pair_model(2)
    path = tmp_path / "out" / "lorweb.safetensors"
    with gives_back("checkpoint round trips", watched_tmp):
        lf.save_lorweb_weights(source, path)
        lf.save_lorweb_weights(source, path)
        lf.load_lorweb_weights(target, path)
        lora_api.save_pretrained(source, tmp_path / "folder")
        lora_api.load_lora_weights(folder_target, tmp_path / "folder")
    assert mappings(tmp_path) == {}
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["README.md", "config.yaml",
                                                                       "lorweb.safetensors"]
    assert torch.equal(lf.lorweb_state_dict(target)["transformer.0.lora_A"],
                       lf.lorweb_state_dict(source)["transformer.0.lora_A"])


def test_checkpoint_failures_give_back_everything(tmp_path, watched_tmp, monkeypatch):
    """A corrupt file refused, a save interrupted inside safetensors' writer over an existing file, and a
    save_pretrained into a new folder interrupted: no descriptor or temporary left, the old file as it was, the new
    folder removed again; the retried save works."""
    import safetensors.torch

    model = tiny_pair_model()
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(model, path)
    good = path.read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(good[:len(good) // 2])
    real = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the temporary is complete; the rename never comes
        raise KeyboardInterrupt

    with gives_back("failed checkpoint calls", watched_tmp):
        with pytest.raises(lf.LoRWeBCheckpointError):
            lf.load_lorweb_weights(tiny_pair_model(1), tmp_path / "bad.safetensors")
        monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lf.save_lorweb_weights(model, path)
        with pytest.raises(KeyboardInterrupt):
            lora_api.save_pretrained(model, tmp_path / "new" / "folder")
        monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert path.read_bytes() == good and not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []
    lf.save_lorweb_weights(model, path)
    assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_load_call_save_and_plot_give_back_everything(assets, pipe, tmp_path, watched_tmp):
    """from_pretrained, a call with and without its progress bar, save_pretrained, plot_coefficients: nothing but
    matplotlib's font cache stays, and a second plot opens no further file (the cache is bounded)."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    a, a_prime, b = random_analogy(0)
    mapped = mappings(assets)
    with gives_back("pipeline", watched_tmp):
        loaded = LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                       encoder=assets / "clip", resolution="native", long_edge=64)
        # legitimate: fp32 weights are the checkpoint files' memory maps (zero-copy loads), held by the pipeline
        assert mappings(assets) - mapped, "the premise: the loaded weights are file-backed"
        del loaded
        gc.collect()
        assert mappings(assets) == mapped, "the mappings went with the pipeline"
        for progress in (True, False):
            pipe(a, a_prime, b, "edit", num_inference_steps=2, max_sequence_length=MSL, progress=progress)
        pipe.save_pretrained(tmp_path / "saved")
        lf.plot_coefficients(pipe.transformer, tmp_path / "c.png")
    fds = open_fds()
    lf.plot_coefficients(pipe.transformer, tmp_path / "c.png")
    assert open_fds() == fds
    assert leftovers(tmp_path) == []
    assert_process_locks_free(pipe.transformer)


def test_pipeline_call_interrupted_from_its_callback_gives_back_everything(pipe, watched_tmp):
    """Ctrl-C (a KeyboardInterrupt from ``callback_on_step_end``) with the denoising bar shown: checked while the
    error is held, the bar is closed, the analogy lock free, nothing else kept; the same call then works."""
    a, a_prime, b = random_analogy(1)
    steps = []

    def interrupt(pipeline, step, timestep, kwargs):
        steps.append(step)
        raise KeyboardInterrupt

    with gives_back("interrupted pipeline call", watched_tmp):
        with pytest.raises(KeyboardInterrupt):
            pipe(a, a_prime, b, "edit", num_inference_steps=2, max_sequence_length=MSL, progress=True,
                 callback_on_step_end=interrupt)
        assert steps == [0]
        assert_process_locks_free(pipe.transformer)
    assert len(pipe(a, a_prime, b, "edit", num_inference_steps=2, max_sequence_length=MSL)) == 1


def test_from_pretrained_interrupted_inside_the_model_load_restores_process_state(assets, watched_tmp, monkeypatch):
    """A Ctrl-C inside the libraries' weight loading (bf16: they set the default dtype and patch ``nn.Module`` while
    loading): default dtype, module patches, the loading lock all as before; the checkpoint mapping a library frame
    keeps goes with the error."""
    import safetensors.torch

    from lorweb_fast.flux import LoRWeBKontextPipeline

    wrapped, fired = raising_at(1, safetensors.torch.load_file, KeyboardInterrupt())
    monkeypatch.setattr(safetensors.torch, "load_file", wrapped)
    mapped = mappings(assets)
    with gives_back("interrupted from_pretrained", watched_tmp):
        with pytest.raises(KeyboardInterrupt) as info:
            LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                  encoder=assets / "clip", dtype=torch.bfloat16)
        assert fired == [1]
        assert_process_locks_free()
        del info
    assert mappings(assets) == mapped


# -------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_gives_back_everything(assets, tmp_path, watched_tmp, num_workers):
    """A run to its end: no worker process, feeder thread or pipe left, the run lock removed, no temporary; global
    state as before but for torch's SIGCHLD handler (num_workers 2; pinned, third-party) and the font cache."""
    out = tmp_path / "run"
    with gives_back(f"train(num_workers={num_workers})", watched_tmp):
        result = training.train(train_config(assets, out, num_workers=num_workers))
    assert result["step"] == 2 and (out / "lorweb.safetensors").is_file()
    assert leftovers(out) == []
    assert_lock_free(out, RUN_LOCK_NAME)
    assert_process_locks_free()
    if num_workers:  # torch's, kept for the process (module docstring); SIGINT / SIGTERM are checked by gives_back
        assert signal.getsignal(signal.SIGCHLD).__qualname__ == TORCH_SIGCHLD


@pytest.mark.parametrize("num_workers, error", [(0, RuntimeError), (2, KeyboardInterrupt)])
def test_train_failing_in_its_step_callback_gives_back_everything(assets, tmp_path, watched_tmp, num_workers, error):
    """The step callback raises at step 1 of 3: while the error is held no worker, thread, pipe or temporary is
    left and the run lock is removed; a retry (``resume``) into the same folder starts right away."""
    out = tmp_path / "run"

    def stop(step, loss):
        raise error("stop")

    with gives_back(f"train failing (num_workers={num_workers})", watched_tmp):
        with pytest.raises(error):
            training.train(train_config(assets, out, num_workers=num_workers, steps=3), step_callback=stop)
    assert leftovers(out) == []
    assert_lock_free(out, RUN_LOCK_NAME)
    assert_process_locks_free()
    result = training.train(train_config(assets, out, num_workers=num_workers, steps=1, resume=True))
    assert result["step"] == 1 and leftovers(out) == []


def test_train_releases_its_data_workers_before_raising_their_error(assets, tmp_path):
    """num_workers 2, a target that decodes only partly: the worker's AnalogyDataError comes back with the worker
    processes, their queue threads and pipes given back, even while the error is held."""
    before = snapshot()
    with pytest.raises(AnalogyDataError, match="0000.jpg") as info:
        training.train(train_config(assets, tmp_path / "run", data=str(assets / "bad_data"), num_workers=2, steps=4))
    held = differences(before, snapshot())
    del info  # the leaked workers go with the error: nothing stays behind this test
    after = differences(before, snapshot())
    if after:  # given back at the latest with the error (a RuntimeError: another failure than the one tested)
        raise RuntimeError(f"not given back even once the error was dropped: {after}")
    assert held == {}, f"held while the error is referenced: {held}"


def test_cli_train_with_a_failing_data_worker_leaves_nothing_behind(assets, tmp_path, watched_tmp, capsys):
    """The same failure through ``lorweb-fast train`` in-process: exit status 2, one line naming the file, and the
    workers are gone when ``cli.main`` returns (it drops the error), the run lock is removed."""
    out = tmp_path / "run"
    argv = ["train", "--data", str(assets / "bad_data"), "--out", str(out), "--model", str(assets / "pipe"),
            "--encoder", str(assets / "clip"), "--steps", "4", "--batch-size", "2", "--mixed-precision", "no",
            "--long-edge", "64", "--resize", "long-edge", "--num-loras", "4", "--rank", "2", "--key-dim", "8",
            "--num-workers", "2", "--max-sequence-length", str(MSL), "--optimizer", "adamw", "--quiet"]
    with gives_back("lorweb-fast train with a failing data worker", watched_tmp):
        assert cli.main(argv) == 2
    assert "0000.jpg" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and not (out / RUN_LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------------- data
def relation252k(root):
    return relation252k_folder(root, {"cat": [(24, 24)] * 3, "dog": [(24, 24)] * 2}, seed=0)


def test_data_prepare_and_check_give_back_everything(tmp_path, watched_tmp, capsys):
    """prepare_relation252k and check_folder (dump) with bars, and both commands in-process: the image thread pools
    are joined, the prepare lock removed, no temporary."""
    relation252k(tmp_path / "rel")
    check = dict(resize="long-edge", long_edge=64)
    with gives_back("data prepare / check", watched_tmp):
        report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=True)
        data.check_folder(tmp_path / "out", dump=tmp_path / "dump", progress=True, **check)
        assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out2")]) == 0
        assert cli.main(["data", "check", str(tmp_path / "out2"), "--resize", "long-edge", "--long-edge", "64",
                         "--dump", str(tmp_path / "dump2"), "--quiet"]) == 0
    capsys.readouterr()
    assert report["written"] == 4 and len(list((tmp_path / "dump").glob("*_target.png"))) == 4
    assert leftovers(tmp_path) == []
    for out in ("out", "out2"):
        assert_lock_free(tmp_path / out, PREPARE_LOCK_NAME)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["ctrl-c", "disk full"])
def test_data_prepare_failing_in_a_pool_thread_gives_back_everything(tmp_path, watched_tmp, monkeypatch, error):
    """The second analogy's write raises inside the thread pool (Ctrl-C; a full output disk): while the error is
    held the pool's threads are joined, the lock removed, no temporary left; the next run completes the folder."""
    relation252k(tmp_path / "rel")
    out = tmp_path / "out"
    if isinstance(error, OSError):
        error.filename = str(out / "control" / "x.jpg")  # a file of the output: the run stops
    real = data.write_analogy
    wrapped, fired = raising_at(2, real, error)
    monkeypatch.setattr(data, "write_analogy", wrapped)
    with gives_back("data prepare failing in a pool thread", watched_tmp):
        with pytest.raises(type(error)):
            data.prepare_relation252k(tmp_path / "rel", out, progress=True)
        assert fired == [1]
    assert leftovers(tmp_path) == []
    assert_lock_free(out, PREPARE_LOCK_NAME)
    monkeypatch.setattr(data, "write_analogy", real)
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert report["written"] + report["skipped"] == 4 and report["failed"] == []


def test_data_check_interrupted_in_its_decoding_threads_gives_back_everything(assets, watched_tmp, monkeypatch):
    """A Ctrl-C raised by the image decoding on the pool threads of ``check_folder``: the threads are joined before
    the error leaves, the bar is closed."""
    wrapped, fired = raising_at(2, data.decode_problem, KeyboardInterrupt())
    monkeypatch.setattr(data, "decode_problem", wrapped)
    with gives_back("data check interrupted", watched_tmp):
        with pytest.raises(KeyboardInterrupt):
            data.check_folder(assets / "data", progress=True, resize="long-edge", long_edge=64)
        assert fired == [1]


def stop_tqdm_monitors() -> None:
    """Stop tqdm's monitor thread (the next bar starts a new one: its ``report()`` is then False)."""
    from tqdm._monitor import TMonitor

    for thread in threading.enumerate():
        if isinstance(thread, TMonitor):
            thread.exit()


def test_tqdm_monitor_stopping_works():
    """The premise of the test below: the monitor thread can be stopped, and a shown bar starts it again."""
    from tqdm.auto import tqdm

    stop_tqdm_monitors()
    assert TQDM_MONITOR not in [t.name for t in threading.enumerate()]
    with open(os.devnull, "w") as sink, tqdm(total=1, file=sink) as bar:
        bar.update(1)
    assert TQDM_MONITOR in [t.name for t in threading.enumerate()]


def test_a_quiet_data_prepare_starts_no_thread(tmp_path):
    relation252k(tmp_path / "rel")
    stop_tqdm_monitors()
    with gives_back("prepare_relation252k(progress=False)", tqdm_monitor=False):
        data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def eval_assets(assets):
    evalset = tiny.make_folder_evalset(assets / "evalset", tasks=("flip",), per_task=2, size=(32, 32))
    tiny.make_runs_folder(assets / "base", evalset, seed=2)
    tiny.save_random_lpips_backbone(assets / "torch_home")
    rows = [{"id": f"flip/{i:03d}", "kind": kind, "response": response} for i in range(2)
            for kind, response in (("score", '{"metrics": {"accuracy": 7, "consistency": 8}}'),
                                   ("pairwise", '{"better": 1}'))]
    (assets / "replay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return assets


def test_evaluation_commands_give_back_everything(eval_assets, tmp_path, watched_tmp, monkeypatch, capsys):
    """read_evalset; `eval generate` (and a Ctrl-C from its second pipeline call: lock removed, no temporary, the
    rerun completes); `eval score` with CLIP, LPIPS and a replay judge (and a Ctrl-C inside LPIPS)."""
    from lorweb_fast.evaluation import metrics
    from lorweb_fast.flux import LoRWeBKontextPipeline

    assets = eval_assets
    monkeypatch.setenv("TORCH_HOME", str(assets / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    runs = tmp_path / "runs"
    generate = ["eval", "generate", "--evalset", str(assets / "evalset"), "--weights",
                str(assets / "lorweb.safetensors"), "--model", str(assets / "pipe"), "--out", str(runs), "--steps", "2",
                "--dtype", "fp32", "--device", "cpu", "--resolution", "native", "--long-edge", "64", "--batch-size",
                "1", "--pipe-arg", f"max_sequence_length={MSL}", "--quiet"]
    score = ["eval", "score", "--runs", str(runs), "--against", str(assets / "base"), "--encoder",
             str(assets / "clip"), "--judge", f"replay:{assets / 'replay.jsonl'}", "--device", "cpu", "--quiet",
             "--out", str(tmp_path / "report")]
    call, fired = raising_at(2, LoRWeBKontextPipeline.__call__, KeyboardInterrupt())
    lpips, lpips_fired = raising_at(1, metrics.LPIPSDistance.__call__, KeyboardInterrupt())
    with gives_back("evaluation", watched_tmp):
        assert len(evalsets.read_evalset(assets / "evalset")) == 2
        with monkeypatch.context() as patch:
            patch.setattr(LoRWeBKontextPipeline, "__call__", call)
            assert cli.main(generate) == 130 and fired == [1]
        assert leftovers(runs) == []
        assert_lock_free(runs, GENERATE_LOCK_NAME)
        assert cli.main(generate) == 0
        with monkeypatch.context() as patch:
            patch.setattr(metrics.LPIPSDistance, "__call__", lpips)
            assert cli.main(score) == 130 and lpips_fired == [1]
        assert cli.main(score) == 0
    assert "1 generated, 1 already done" in capsys.readouterr().out
    assert (tmp_path / "report" / "metrics.json").is_file()
    assert leftovers(tmp_path) == []
    assert_lock_free(runs, GENERATE_LOCK_NAME)


def test_infer_gives_back_everything(assets, tmp_path, watched_tmp, monkeypatch, capsys):
    """`lorweb-fast infer` with a coefficients plot, then interrupted inside the pipeline call (status 130, nothing
    written): no descriptor, thread or temporary left."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    inputs = infer_input_files(tmp_path)
    argv = ["infer", "--a", str(inputs / "a.png"), "--a-prime", str(inputs / "a_prime.png"), "--b",
            str(inputs / "b.png"), "--prompt", "p", "--weights", str(assets / "lorweb.safetensors"), "--model",
            str(assets / "pipe"), "--encoder", str(assets / "clip"), "--steps", "2", "--dtype", "fp32", "--device",
            "cpu", "--resolution", "native", "--long-edge", "64", "--pipe-arg", f"max_sequence_length={MSL}",
            "--quiet"]
    call, fired = raising_at(1, LoRWeBKontextPipeline.__call__, KeyboardInterrupt())
    with gives_back("lorweb-fast infer", watched_tmp):
        assert cli.main(argv + ["--out", str(tmp_path / "b1.png"), "--coefficients-plot", str(tmp_path / "c.png")]) == 0
        with monkeypatch.context() as patch:
            patch.setattr(LoRWeBKontextPipeline, "__call__", call)
            assert cli.main(argv + ["--out", str(tmp_path / "b2.png")]) == 130 and fired == [1]
    capsys.readouterr()
    assert (tmp_path / "b1.png").is_file() and (tmp_path / "c.png").is_file() and not (tmp_path / "b2.png").exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------------ plots
def test_plots_failing_while_saving_leave_nothing(pipe, tmp_path, watched_tmp, monkeypatch):
    """plot_loss and plot_coefficients whose savefig fails half-way (a full disk): the temporary goes, the earlier
    plot stays, no descriptor or pyplot figure is kept, the drawing lock is free."""
    from matplotlib.figure import Figure

    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.01}) + "\n" for s in range(1, 5)))
    training.plot_loss(log, tmp_path / "loss.png")
    pipe(*random_analogy(2), "edit", num_inference_steps=1, max_sequence_length=MSL)
    lf.plot_coefficients(pipe.transformer, tmp_path / "c.png")
    kept = {name: (tmp_path / name).read_bytes() for name in ("loss.png", "c.png")}
    real = Figure.savefig

    def half_written(fig, fname, **kwargs):
        real(fig, fname, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with gives_back("failing plots", watched_tmp):
        with pytest.raises(OSError):
            training.plot_loss(log, tmp_path / "loss.png")
        with pytest.raises(OSError):
            lf.plot_coefficients(pipe.transformer, tmp_path / "c.png")
        assert_process_locks_free(pipe.transformer)
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert leftovers(tmp_path) == []
