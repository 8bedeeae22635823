"""Thread-safety audit, second pass (CPU only, tiny models; see ``tests/test_concurrency.py`` for the first).

Users serve LoRWeB from thread pools: a web server's worker threads sharing one pipeline, per-request ``from_pipe``
pipelines sharing a transformer, a data-loading thread calling the helpers. This file covers what the first audit did
not: the library's ``warnings.catch_warnings()`` blocks (process-global state in Python 3.11), concurrent forwards
and model-level changes next to a running pipeline call, concurrent saves and loads of checkpoints, the memos and
caches mutated without a lock, and the ContextVar / per-thread state that does not follow work into other threads.

Every race is forced with ``threading.Event`` / ``Barrier`` and monkeypatched hooks at the point where a thread
switch can really happen (a call, a GIL release in a tensor op), never left to timing luck; every wait has a
timeout, so a library that serializes a call makes the other thread's wait expire instead of deadlocking the test.
The defects the audit found are fixed and pinned here: model-level changes (set_lorweb_scale, load, save, inject,
remove, fuse, entering and leaving ``merged``) wait for a running pipeline call; the one-analogy memo is kept for the
coefficients it was decided for; two saves into one folder do not interleave; the batch sampler reads its cached
order once; ``get_coefficients`` reads what the last ``set_query`` published without the lock; the warning
registry is bounded over a copy; and the library's own warnings are silenced per thread and context
(``validation.silenced_lorweb_warnings``) instead of through the process-wide filters. The strict xfails left are
the three blocks that still swap Python's process-wide filters (a known limitation, README threads).
"""

import contextvars
import os
import threading
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import lorweb_fast as lf
from lorweb_fast import _locks, data, training, validation
from lorweb_fast import layer as layer_module
from lorweb_fast.layer import LoRWeBLinear, one_analogy, uninitialised_lorweb_tensors
from lorweb_fast.testing import (at_first_step, generate_random_analogy, one_intra_op_thread, run_threads,
                                 small_lorweb_sequential, tiny_lorweb_kontext_pipeline)

#: how long a forced interleaving waits for the other thread; a library that serializes the call makes it expire
WAIT_S = 1.0
#: how long a test waits for a thread to reach a hook it must reach (a failure, not a timing choice)
REACH_S = 30.0
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (bit-equal results between threads, and no spinning on the shared 2-core CPU)."""
    with one_intra_op_thread():
        yield


# ------------------------------------------------------------------------------------------------- helpers
def small_model(seed: int = 0, layers: int = 4) -> nn.Module:
    return small_lorweb_sequential(seed, layers)


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in lf.lorweb_state_dict(model).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LoRWeBKontextPipeline (eval mode, native resolution, 64 px grids, no bar)."""
    pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_lorweb_kontext_pipeline(tmp_path_factory.mktemp("thread-audit-pipe"))


def generate(lp, seed: int, merge: str = "none", **kwargs):
    """b' (an array) of ``random_analogy(seed)`` with a generator seeded with ``seed``."""
    return generate_random_analogy(lp, seed, steps=STEPS, merge=merge, **kwargs)


# ------------------------------------------------------------------ 1. warnings.catch_warnings() call sites
class _Stop(Exception):
    """Raised by a hook inside a library block once the interleaving is done: the block is left through its
    ``catch_warnings().__exit__``, which restores the process-global filters as a normal exit does."""


class AuditWarning(UserWarning):
    """A warning category of "another thread" (a user's code)."""


def _site_image_suffixes(mp, hook, tmp_path):
    """validation.py ``image_suffixes``: probing PIL's writers (under ``simplefilter("ignore")`` until the thirty-seventh
    session; now a fixed list of formats, probed without touching the filters)."""
    from PIL import Image

    mp.setattr(Image, "registered_extensions", lambda: (hook(), {})[1])
    return validation.image_suffixes


def _site_check_folder(mp, hook, tmp_path):
    """data.py:743 ``check_folder``: ``filterwarnings("ignore", category=LoRWeBWarning)`` for the whole folder scan
    (every image decoded: the longest of these blocks)."""
    mp.setattr(data, "AnalogyFolder", lambda *args, **kwargs: hook())
    return lambda: data.check_folder(tmp_path, progress=False)


def _site_data_prepare(mp, hook, tmp_path):
    """data.py:1304 ``run_data`` (``lorweb-fast data prepare``): message filters for the reported warnings."""
    mp.setattr(validation, "check_data_args", lambda args: None)
    mp.setattr(data, "prepare_relation252k", lambda *args, **kwargs: hook())
    args = types.SimpleNamespace(data_command="prepare", src=tmp_path, out=tmp_path / "out", max_analogies=None,
                                 filter_categories=None, filter_json=None, min_pairs_per_category=1,
                                 max_samples_per_category=None, seed=0, quiet=True)
    return lambda: data.run_data(args)


def _site_reports_from_main_only(mp, hook, tmp_path):
    """training.py:1399 ``_reports_from_main_only`` on a process that is not the main one (a ``train()`` rank):
    ``simplefilter("ignore")`` for the whole training run."""
    import accelerate

    class NotMain:
        def __init__(self, *args, **kwargs):
            self.is_main_process = False

    mp.setattr(accelerate, "PartialState", NotMain)

    def run():
        with training._reports_from_main_only():
            hook()
    return run


def _site_lpips(mp, hook, tmp_path):
    """evaluation/metrics.py:153 ``LPIPSDistance``: ``simplefilter("ignore")`` around ``lpips.LPIPS(...)`` (the
    lpips package, torch.load and the torchvision backbone are stand-ins: only the block runs for real)."""
    from lorweb_fast.evaluation import metrics

    weights = tmp_path / "backbone.pth"
    torch.save({}, weights)
    mp.setattr(metrics, "check_lpips", lambda net, path: (types.SimpleNamespace(LPIPS=lambda **kw: hook()), weights))
    mp.setattr(metrics, "_tv_backbone", lambda net: nn.Module())
    return lambda: metrics.LPIPSDistance("alex", weights=weights)


def _site_tiny_b_picks(mp, hook, tmp_path):
    """evaluation/tiny.py:181 ``b_picks_without_warnings`` (a testing helper shipped in the package):
    ``simplefilter("error")``."""
    from lorweb_fast.evaluation import evalsets, tiny as eval_tiny

    mp.setattr(evalsets, "read_evalset", lambda root: hook())
    return lambda: eval_tiny.b_picks_without_warnings(tmp_path)


SITES = {"validation.image_suffixes": _site_image_suffixes, "data.check_folder": _site_check_folder,
         "data.run_data(prepare)": _site_data_prepare,
         "training._reports_from_main_only": _site_reports_from_main_only,
         "evaluation.metrics.LPIPSDistance": _site_lpips,
         "evaluation.tiny.b_picks_without_warnings": _site_tiny_b_picks}
#: the sites whose filter drops a LoRWeBWarning of another thread (run_data's filters match its own messages only)
BROAD_SITES = [name for name in SITES if name != "data.run_data(prepare)"]
CATCH_WARNINGS_DEFECT = ("warnings.catch_warnings() swaps the process-global warnings.filters in Python 3.11 (not "
                         "per thread or context): while a thread is inside this library block, every other thread runs "
                         "under its filters, and on exit the filters saved on entry are put back over other threads' "
                         "changes")
#: the sites that still swap the process-wide filters (known limitation, README threads): LPIPS built (a short block,
#: one at a time: _locks.WARNING_FILTERS) and the non-main ranks of a multi-process training run (a process of its
#: own); the others silence only their own thread's LoRWeB warnings (validation.silenced_lorweb_warnings, a contextvars
#: setting) or, as PIL's writers probed, none
STILL_SWAPPING = ("training._reports_from_main_only", "evaluation.metrics.LPIPSDistance")


def _sites(names, defect: str) -> list:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"{CATCH_WARNINGS_DEFECT}: {defect}"))
            if name in STILL_SWAPPING else name for name in names]


def _while_inside(site: str, mp, tmp_path, action):
    """Run ``site`` in thread "A"; once A is inside the site's ``catch_warnings`` block, run ``action()`` in this
    (the main) thread and return its result; then A leaves the block."""
    inside, resume = threading.Event(), threading.Event()

    def hook():
        inside.set()
        resume.wait(WAIT_S)
        raise _Stop

    call = SITES[site](mp, hook, tmp_path)
    errors = []

    def run():
        try:
            call()
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, name="A", daemon=True)
    thread.start()
    try:
        assert inside.wait(REACH_S), f"{site}: thread A never reached the hook inside the block ({errors})"
        return action()
    finally:
        resume.set()
        thread.join(REACH_S)
        assert not thread.is_alive() and not errors, errors


@pytest.mark.parametrize("site", _sites(list(SITES), "a filter another thread adds meanwhile is lost"))
def test_a_filter_another_thread_adds_survives_the_library_block(site, monkeypatch, tmp_path):
    """Thread A is inside the library's ``catch_warnings`` block of ``site``; the main thread adds a filter
    (``filterwarnings("error", category=AuditWarning)``, as a server configuring warnings at run time); A leaves the
    block. The filter must still be in place."""
    with warnings.catch_warnings():
        _while_inside(site, monkeypatch, tmp_path,
                      lambda: warnings.filterwarnings("error", category=AuditWarning))
        kept = any(f[0] == "error" and f[2] is AuditWarning for f in warnings.filters)
    assert kept, "another thread's filter was dropped when the library block exited"


@pytest.mark.parametrize("site", _sites(BROAD_SITES, "a LoRWeBWarning of another thread is dropped"))
def test_another_threads_library_warning_is_shown_while_a_block_runs(site, monkeypatch, tmp_path):
    """While thread A is inside the ``catch_warnings`` block of ``site``, the main thread calls ``set_query`` on an
    eval-mode model with autograd on, which warns (LoRWeBWarning: "the coefficients carry autograd history"). The
    call must succeed and its warning must be shown (recorded), as it is when no other thread is in such a block."""
    model = small_model()

    def query_with_autograd():
        try:
            lf.set_query(model, torch.randn(1, 6))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            return exc
        return None

    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        assert query_with_autograd() is None and len(log) == 1  # the premise: it warns when nothing else runs
        log.clear()
        error = _while_inside(site, monkeypatch, tmp_path, query_with_autograd)
    assert error is None, f"set_query failed because of another thread's warning filter: {error!r}"
    assert any(issubclass(w.category, lf.LoRWeBWarning) and "autograd" in str(w.message) for w in log), \
        "the warning of the main thread was lost"


def test_overlapping_library_blocks_leave_the_warning_filters_as_found(monkeypatch, tmp_path):
    """Thread A runs ``validation.image_suffixes`` (``simplefilter("ignore")``) and thread B ``data.check_folder``
    (ignores LoRWeBWarning) with the blocks overlapping the bad way: A enters, B enters, A leaves, B leaves.
    Afterwards ``warnings.filters`` must be what it was before (not "ignore every warning, for ever")."""
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()

    def hook_a():
        a_inside.set()
        b_inside.wait(WAIT_S)
        raise _Stop

    def hook_b():
        b_inside.set()
        a_left.wait(WAIT_S)
        raise _Stop

    call_a = _site_image_suffixes(monkeypatch, hook_a, tmp_path)
    call_b = _site_check_folder(monkeypatch, hook_b, tmp_path)

    def run_a():
        try:
            call_a()
        except _Stop:
            pass
        finally:
            a_left.set()

    def run_b():
        assert a_inside.wait(REACH_S)
        try:
            call_b()
        except _Stop:
            pass

    with warnings.catch_warnings():
        before = list(warnings.filters)
        _, errors = run_threads({"A": run_a, "B": run_b})
        after = list(warnings.filters)
    assert not errors, errors
    assert after == before, f"filters left behind: {[f for f in after if f not in before]}"


class InterleavedRegistry(dict):
    """A ``__warningregistry__`` into which "another thread's" warning inserts an entry right after a Python-level
    iteration over it yielded its first key: the place where Python may switch threads between two items of a
    comprehension over the live dict (a C-level copy of it is one step under the GIL, no such place)."""
    armed = False

    def __iter__(self):
        for i, key in enumerate(dict.__iter__(self)):
            yield key
            if i == 0 and self.armed:
                self.armed = False
                self[("image B is elongated", validation.LoRWeBWarning, 1)] = True  # the other thread's entry


def test_warn_survives_another_thread_warning_from_the_same_module():
    """A server module whose handler makes the library warn about many different images fills its
    ``__warningregistry__`` past ``MAX_REGISTERED_WARNINGS`` (the bound is the point of ``_bound_registry``). While
    one warning is being bounded, another thread's warning from the same module adds an entry to the registry (at
    the thread switch a Python-level iteration would allow). ``warn`` must return normally (no 'dictionary changed
    size during iteration') and the bound still hold."""
    registry = InterleavedRegistry()
    namespace = {"__name__": "user_server", "__warningregistry__": registry, "validation": validation}
    exec("def handler(message):\n    validation.warn(message)\n", namespace)  # a module outside the library
    handler = namespace["handler"]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("default")  # the default action: one registry entry per distinct text
        for i in range(validation.MAX_REGISTERED_WARNINGS + 4):
            handler(f"image {i} is elongated")
        assert len(registry) > validation.MAX_REGISTERED_WARNINGS  # the premise: the bound applies
        registry.armed = True
        handler("image A is elongated")
    registry.armed = False
    ours = [k for k in dict.keys(registry) if isinstance(k, tuple) and len(k) == 3 and k[1] is validation.LoRWeBWarning]
    assert len(ours) <= validation.MAX_REGISTERED_WARNINGS + 1


# ------------------------------------------------------------------ 2. forwards, coefficients and queries
@pytest.mark.parametrize("merge", ["none", "auto"])
def test_shared_pipeline_calls_from_two_threads_match_solo_calls_over_many_rounds(tiny, merge):
    """The documented guarantee (README, threads: a pipeline call holds its transformer's lock from its query to its
    output): two threads call one shared pipeline with different analogies, released together by a barrier, 12
    rounds: every b' is bit-equal to the same call run alone."""
    refs = {seed: generate(tiny, seed, merge) for seed in (1, 2)}
    assert not np.array_equal(refs[1], refs[2])  # the premise: the analogies give different images
    for _ in range(12):
        barrier = threading.Barrier(2, timeout=REACH_S)
        results, errors = run_threads({seed: (lambda seed=seed: (barrier.wait(), generate(tiny, seed, merge))[1])
                                       for seed in refs})
        assert not errors, errors
        assert all(np.array_equal(results[seed], refs[seed]) for seed in refs)


def test_set_query_waits_for_a_caller_holding_the_models_analogy_lock():
    """Model-level use (the caller's own loop of ``set_query`` then forward) is atomic only when the caller holds
    the model's analogy lock (``_locks.analogy_lock``, the re-entrant lock ``set_query`` and pipeline calls take;
    not exported). Forced: thread A holds it, sets its query, lets thread B call ``set_query`` with another
    query, waits for B (in vain: B waits for the lock), then runs its forward: A's output is its solo output, and B's
    query lands after A's forward. Then 3 threads x 20 rounds (barrier) of lock + set_query + forward: every output
    is its solo output."""
    model = small_model()
    queries = [torch.randn(1, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        refs = []
        for q in queries:
            lf.set_query(model, q)
            refs.append(model(x))
    assert not torch.equal(refs[0], refs[1])  # the premise
    a_set, b_set, order = threading.Event(), threading.Event(), []

    def thread_a():
        with torch.no_grad(), _locks.analogy_lock(model):
            lf.set_query(model, queries[0])
            a_set.set()
            b_set.wait(WAIT_S)  # expires: B's set_query waits for the lock
            out = model(x)
            order.append("A forward")
        return out

    def thread_b():
        assert a_set.wait(REACH_S)
        with torch.no_grad():
            lf.set_query(model, queries[1])
        order.append("B set_query")
        b_set.set()

    results, errors = run_threads({"A": thread_a, "B": thread_b})
    assert not errors, errors
    assert torch.equal(results["A"], refs[0]) and order == ["A forward", "B set_query"]

    def job(i):
        def run():
            outs = []
            for _ in range(20):
                barrier.wait()
                with torch.no_grad(), _locks.analogy_lock(model):
                    lf.set_query(model, queries[i])
                    outs.append(model(x))
            return all(torch.equal(out, refs[i]) for out in outs)
        return run

    barrier = threading.Barrier(3, timeout=REACH_S)
    results, errors = run_threads({i: job(i) for i in range(3)})
    assert not errors and all(results.values()), (errors, results)


def _change_scale(lp, _other):
    lf.set_lorweb_scale(lp.transformer, 0.3)


def _enter_merged(lp, _other):
    context = lf.merged(lp.transformer)
    context.__enter__()
    return context


def _load_other(lp, other):
    lf.load_lorweb_weights(lp.transformer, other)


MODEL_LEVEL_CHANGES = [pytest.param(_change_scale, id="lf.set_lorweb_scale"),
                       pytest.param(_enter_merged, id="lf.merged"),
                       pytest.param(_load_other, id="lf.load_lorweb_weights")]


@pytest.mark.parametrize("change", MODEL_LEVEL_CHANGES)
def test_model_level_changes_from_another_thread_wait_for_a_running_pipeline_call(tiny, tmp_path, change):
    """A pipeline call (analogy 1, unmerged) pauses after its first step while another thread changes the
    transformer with the model-level API (``lf.set_lorweb_scale``, ``lf.merged``, ``lf.load_lorweb_weights``);
    the pause ends when the change is done or after WAIT_S. The call must give its solo b' (the change waits for
    it, as the pipeline's own methods and ``set_query`` do), and the change must not fail."""
    ref = generate(tiny, 1)
    original = state_copy(tiny.transformer)
    other = {k: torch.randn_like(v) * 0.1 for k, v in original.items()}
    inside, changed, contexts = threading.Event(), threading.Event(), []

    def pause():
        inside.set()
        changed.wait(WAIT_S)

    def change_it():
        assert inside.wait(REACH_S)
        try:
            contexts.append(change(tiny, other))
        finally:
            changed.set()

    try:
        results, errors = run_threads({"call": lambda: generate(tiny, 1, callback_on_step_end=at_first_step(pause)),
                                       "change": change_it})
    finally:
        for context in contexts:
            if context is not None:
                context.__exit__(None, None, None)
        lf.set_lorweb_scale(tiny.transformer, 1.0)
        lf.load_lorweb_weights(tiny.transformer, original)
    assert not errors, errors
    assert np.array_equal(results["call"], ref), "the running call was changed by another thread"


@pytest.mark.parametrize("entry", ["holds_one_analogy", "merged_jit"])
def test_one_analogy_memo_is_only_kept_for_the_coefficients_it_was_decided_for(monkeypatch, entry):
    """Layers hold two identical coefficient rows (one analogy, not decided yet: ``check_finite=False``). Thread A
    asks whether they hold one analogy (``holds_one_analogy``, as the "jit" forward and ``merged_weight`` do, or
    entering ``merged(model, "jit")``, whose ``decide_one_analogy`` asks for all layers) and is paused after
    computing the answer (where the host synchronisation releases the GIL); the main thread sets two different
    queries; A goes on. Afterwards every layer must answer False for the new coefficients, and a "jit" forward of the
    two samples must equal the unmerged forward (a wrong memo makes sample 2 use sample 1's mixture)."""
    model = small_model()
    same = torch.randn(1, 6).expand(2, -1).clone()
    different = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        lf.set_query(model, same, check_finite=False)
    first = lf.lorweb_layers(model)["0"]
    assert first._one_analogy_memo is None  # the premise: undecided
    decided, resume = threading.Event(), threading.Event()
    name = "one_analogy" if entry == "holds_one_analogy" else "rows_identical"
    real = getattr(layer_module, name)

    def pausing(coeffs):
        result = real(coeffs)
        if threading.current_thread().name == "A" and not decided.is_set():
            decided.set()
            resume.wait(WAIT_S)
        return result

    monkeypatch.setattr(layer_module, name, pausing)

    def in_a():
        if entry == "holds_one_analogy":
            return first.holds_one_analogy()
        with torch.no_grad(), lf.merged(model, "jit"):
            return model(x)

    def in_main():
        assert decided.wait(REACH_S)
        try:
            with torch.no_grad():
                lf.set_query(model, different)
        finally:
            resume.set()

    _, errors = run_threads({"A": in_a, "main": in_main})
    assert not errors, errors
    monkeypatch.setattr(layer_module, name, real)
    layers = lf.lorweb_layers(model)
    assert not any(one_analogy(layer.coefficients) for layer in layers.values())  # the premise: two analogies
    wrong = [n for n, layer in layers.items() if layer.holds_one_analogy()]
    with torch.no_grad():
        unmerged = model(x)
        with lf.merged(model, "jit"):
            jit = model(x)
    assert not wrong, f"layers {wrong} remember 'one analogy' for two different queries"
    assert torch.allclose(jit, unmerged, rtol=1e-4, atol=1e-5), "a jit forward mixed the samples' analogies"


# ------------------------------------------------------------------ 3. checkpoints, locks, memos and caches
def _no_temporaries(folder) -> bool:
    return not [name for name in os.listdir(folder) if name.startswith(".")]


def test_concurrent_saves_to_one_path_leave_one_whole_checkpoint(tmp_path, monkeypatch):
    """Two threads save different models to the same file; A is held just before its rename. B's save waits for
    A's (one save into a folder at a time: ``_locks.folder_files_lock``), and meanwhile the file does not exist yet
    (a reader never sees a partial file); once A is released, both finish: the file is B's checkpoint, whole, and no
    temporary or kept copy is left behind."""
    models = {"A": small_model(1), "B": small_model(2)}
    states = {k: state_copy(m) for k, m in models.items()}
    path = tmp_path / "lorweb.safetensors"
    a_renaming, a_released, b_done, seen = threading.Event(), threading.Event(), threading.Event(), {}
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if threading.current_thread().name == "A" and os.fspath(dst) == os.fspath(path):
            a_renaming.set()
            a_released.wait(REACH_S)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)

    def save_b():
        assert a_renaming.wait(REACH_S)
        lf.save_lorweb_weights(models["B"], path)
        b_done.set()

    def in_main():
        assert a_renaming.wait(REACH_S)
        try:
            seen["b done while A renames"] = b_done.wait(WAIT_S)
            seen["file while A renames"] = path.exists()
        finally:
            a_released.set()

    _, errors = run_threads({"A": lambda: lf.save_lorweb_weights(models["A"], path), "B": save_b,
                             "main": in_main})
    assert not errors, errors
    assert seen == {"b done while A renames": False, "file while A renames": False}
    final = load_file(path)
    assert final.keys() == states["B"].keys() and all(torch.equal(final[k], states["B"][k]) for k in final)
    assert _no_temporaries(tmp_path)


def test_concurrent_saves_with_config_leave_a_matching_config_yaml(tmp_path, monkeypatch):
    """Two threads save two models (encoders "enc-A" / "enc-B") with ``config`` into the same file; A is held
    after renaming its config.yaml, before renaming its weights, while B's whole save runs. Afterwards the folder's
    config.yaml must name the encoder of the weights beside it."""
    models = {"A": small_model(1), "B": small_model(2)}
    path = tmp_path / "run" / "lorweb.safetensors"
    a_between, b_saved = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        result = real_replace(src, dst, *args, **kwargs)
        if threading.current_thread().name == "A" and os.fspath(dst).endswith("config.yaml"):
            a_between.set()
            b_saved.wait(WAIT_S)
        return result

    monkeypatch.setattr(os, "replace", replace)

    def save(name):
        lf.save_lorweb_weights(models[name], path, metadata={"encoder": f"enc-{name}"}, config={})

    def save_b():
        assert a_between.wait(REACH_S)
        try:
            save("B")
        finally:
            b_saved.set()

    _, errors = run_threads({"A": lambda: save("A"), "B": save_b})
    assert not errors, errors
    with safe_open(os.fspath(path), "pt") as f:
        weights_encoder = f.metadata()["encoder"]
    config_text = (path.parent / "config.yaml").read_text()
    assert f"external_query_model: {weights_encoder}\n" in config_text, \
        f"config.yaml names another encoder than the weights ({weights_encoder})"


def test_a_save_during_another_threads_load_holds_one_checkpoint(tmp_path, monkeypatch):
    """Thread B loads new weights into a model and is held after copying two of its four layers; the main thread
    saves the model meanwhile (B goes on once the save is done, or after WAIT_S). The saved file must hold one
    checkpoint: all old or all new tensors."""
    model = small_model(1)
    old, new = state_copy(model), state_copy(small_model(2))
    path = tmp_path / "lorweb.safetensors"
    half, saved, calls = threading.Event(), threading.Event(), []
    real = LoRWeBLinear._drop_coefficients

    def drop(self):
        real(self)
        if threading.current_thread().name == "B":
            calls.append(self)
            if len(calls) == 3:  # layers 0 and 1 hold the new tensors
                half.set()
                saved.wait(WAIT_S)

    monkeypatch.setattr(LoRWeBLinear, "_drop_coefficients", drop)

    def save():
        assert half.wait(REACH_S)
        try:
            lf.save_lorweb_weights(model, path)
        finally:
            saved.set()

    _, errors = run_threads({"B": lambda: lf.load_lorweb_weights(model, new), "main": save})
    assert not errors, errors
    got = load_file(path)
    assert all(torch.equal(got[k], old[k]) for k in old) or all(torch.equal(got[k], new[k]) for k in new), \
        "the saved file mixes layers of two checkpoints"


def test_analogy_lock_is_one_lock_for_threads_asking_for_a_new_model_at_once(monkeypatch):
    """``_locks.analogy_lock`` creates a model's lock on first use. Two threads ask for a new model's lock at once,
    the first held inside the lookup until the second has looked too (or WAIT_S: the guard lock makes the second
    wait): both get the same lock (two locks would serialize nothing)."""
    first_inside, second_looked = threading.Event(), threading.Event()

    class Table(type(_locks._ANALOGY_LOCKS)):
        def get(self, key, default=None):
            found = super().get(key, default)
            if not first_inside.is_set():
                first_inside.set()
                second_looked.wait(WAIT_S)
            else:
                second_looked.set()
            return found

    monkeypatch.setattr(_locks, "_ANALOGY_LOCKS", Table())
    model = nn.Linear(2, 2)

    def second():
        assert first_inside.wait(REACH_S)
        return _locks.analogy_lock(model)

    results, errors = run_threads({"first": lambda: _locks.analogy_lock(model), "second": second})
    assert not errors, errors
    assert results["first"] is results["second"] is _locks.analogy_lock(model)


class HookedSampler(training.StepBatchSampler):
    """A StepBatchSampler that pauses thread "X" once, right after it read its cached order (the return of the
    ``getattr`` call in ``_permutation``, where Python may switch threads)."""
    armed = False
    read, resume = threading.Event(), threading.Event()

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        cls = type(self)
        if name == "_cached_order" and cls.armed and threading.current_thread().name == "X":
            cls.armed = False
            cls.read.set()
            cls.resume.wait(WAIT_S)
        return value


def test_step_batch_sampler_batches_from_two_threads_match_solo_batches():
    """A data-loading thread asks a shared sampler for step 1's batch (epoch 0) and is paused between the epoch check
    and the read of the cached order; the main thread asks for step 2's batch (epoch 1); then the first goes on.
    Each batch must equal the one a sampler of its own gives."""
    kwargs = {"seed": 3, "start_step": 0, "total_steps": 10}
    solo = training.StepBatchSampler(4, 2, **kwargs)
    refs = {step: solo.batch(step) for step in (1, 2)}
    shared = HookedSampler(4, 2, **kwargs)
    shared.batch(0)  # epoch 0's order cached, as in a run
    HookedSampler.read.clear()
    HookedSampler.resume.clear()
    HookedSampler.armed = True

    def in_main():
        assert HookedSampler.read.wait(REACH_S)
        try:
            return shared.batch(2)
        finally:
            HookedSampler.resume.set()

    results, errors = run_threads({"X": lambda: shared.batch(1), "main": in_main})
    HookedSampler.armed = False
    assert not errors, errors
    assert results["main"] == refs[2] and results["X"] == refs[1], (results, refs)


# ------------------------------------------------------------------ 4. ContextVar and per-thread state
def _layer_built_here(seed: int) -> tuple:
    """(a LoRWeBLinear built in the calling thread after ``torch.manual_seed(seed)``, whether it drew from the
    RNG): an initialised layer draws its keys and basis, an uninitialised one (``uninitialised_lorweb_tensors``)
    draws nothing."""
    base = nn.Linear(8, 8)
    torch.manual_seed(seed)
    before = torch.random.get_rng_state()
    built = LoRWeBLinear(base, num_loras=3, rank=2, key_dim=4, query_dim=6)
    return built, not torch.equal(before, torch.random.get_rng_state())


def _same_lorweb_tensors(a: LoRWeBLinear, b: LoRWeBLinear) -> bool:
    return all(torch.equal(t, b.lorweb_tensors()[k]) for k, t in a.lorweb_tensors().items())


def test_uninitialised_flag_does_not_leak_into_other_threads():
    """``uninitialised_lorweb_tensors()`` (a checkpoint load's "skip the initial values") is a ContextVar: while
    thread A is inside it (and its own layer draws nothing), a layer the main thread builds is initialised as
    usual (equal to one built with the same seed outside any block)."""
    reference, _ = _layer_built_here(7)
    inside, resume = threading.Event(), threading.Event()

    def in_a():
        with uninitialised_lorweb_tensors():
            _, drew = _layer_built_here(1)
            inside.set()
            resume.wait(REACH_S)
        return drew

    def in_main():
        assert inside.wait(REACH_S)
        try:
            return _layer_built_here(7)
        finally:
            resume.set()

    results, errors = run_threads({"A": in_a, "main": in_main})
    assert not errors, errors
    built, drew = results["main"]
    assert results["A"] is False  # the premise: the block takes effect in its own thread
    assert drew and _same_lorweb_tensors(built, reference)


def test_work_handed_to_threads_inside_the_uninitialised_block_builds_initialised_layers():
    """Threads do not inherit ContextVars: a ``threading.Thread`` or a ``ThreadPoolExecutor`` worker started inside
    ``uninitialised_lorweb_tensors()`` builds initialised layers (the safe side: values drawn, never garbage);
    only work run in a copy of the context (``contextvars.copy_context().run``, as ``asyncio.to_thread`` does)
    sees the flag."""
    reference, _ = _layer_built_here(3)
    with uninitialised_lorweb_tensors():
        results, errors = run_threads({"thread": lambda: _layer_built_here(3)})
        with ThreadPoolExecutor(1) as pool:
            pooled = pool.submit(_layer_built_here, 3).result(REACH_S)
        with ThreadPoolExecutor(1) as pool:
            _, copied_drew = pool.submit(contextvars.copy_context().run, _layer_built_here, 3).result(REACH_S)
    assert not errors, errors
    for built, drew in (results["thread"], pooled):
        assert drew and _same_lorweb_tensors(built, reference)
    assert copied_drew is False


def test_no_grad_does_not_follow_set_query_into_a_worker_and_the_worker_is_told():
    """torch's grad mode is per thread: ``set_query`` handed to a pool worker from inside ``torch.no_grad()`` runs
    with autograd on. The library says so: the worker's call warns (LoRWeBWarning naming autograd and no_grad) and
    its coefficients carry autograd history, while the same call in the caller's thread does neither."""
    model = small_model()
    query = torch.randn(1, 6)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with torch.no_grad():
            here = lf.set_query(model, query)
            assert not log and not any(c.requires_grad for c in here.values())
            with ThreadPoolExecutor(1) as pool:
                there = pool.submit(lf.set_query, model, query).result(REACH_S)
    assert all(c.requires_grad for c in there.values())
    assert any(issubclass(w.category, lf.LoRWeBWarning) and "no_grad" in str(w.message) for w in log)


def test_a_step_callback_can_read_the_coefficients_through_a_worker_thread(tiny):
    """A step callback (e.g. a live preview of the mixture) asks a pool worker for ``lf.get_coefficients`` of the
    running pipeline's transformer and waits for the answer (WAIT_S). The worker must answer with the running
    call's coefficients (in the calling thread itself the read works: the lock is re-entrant)."""
    got = {}

    with ThreadPoolExecutor(1) as pool:
        def ask():
            here = lf.get_coefficients(tiny.transformer)
            future = pool.submit(lf.get_coefficients, tiny.transformer)
            try:
                got["worker"] = future.result(WAIT_S)
            except FutureTimeoutError:
                got["worker"] = None
            got["here"] = here

        generate(tiny, 1, callback_on_step_end=at_first_step(ask))
    assert got["here"]  # the premise: the calling thread reads them
    assert got["worker"] is not None, "the worker waited for the pipeline call's lock"
    assert got["worker"].keys() == got["here"].keys()
    assert all(torch.equal(got["worker"][k], got["here"][k]) for k in got["here"])


# ------------------------------------------------------------------ 5. the review of these fixes
def test_a_merged_blocks_own_error_stays_the_context_of_a_failing_restore(monkeypatch):
    """``merged()`` leaves through an ExitStack under the lock: when the block raised and restoring the weights then
    fails too, the block's error is still in the chain (as the context of the restore's error), as when the inner
    contexts were entered directly."""
    from lorweb_fast import flux

    model = small_model()
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))

    def broken_restore(layer, original):
        raise OSError("restore failed")

    monkeypatch.setattr(flux, "_swap_back", broken_restore)
    with pytest.raises(RuntimeError, match="could not restore the original weights") as caught:
        with lf.merged(model, "full"):
            raise RuntimeError("the block's own error")
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert "the block's own error" in chain, chain


def test_leaving_merged_interrupted_while_waiting_for_the_lock_still_restores(monkeypatch):
    """Ctrl-C while leaving ``merged()`` waits for the model's lock: the weights are restored anyway (not left
    merged, with loads and ``set_query`` refused) and the interrupt goes on."""
    from lorweb_fast import flux

    model = small_model()
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))
    before = {n: l.base_layer.weight.detach().clone() for n, l in lf.lorweb_layers(model).items()}

    class InterruptedOnLeaving:
        calls = 0

        def __enter__(self):
            type(self).calls += 1
            if type(self).calls == 2:  # the first is entering the block
                raise KeyboardInterrupt
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(flux, "holding_analogy", lambda model: InterruptedOnLeaving())
    with pytest.raises(KeyboardInterrupt) as caught:  # the traceback kept, as a notebook keeps it
        with lf.merged(model, "full"):
            assert not all(torch.equal(l.base_layer.weight, before[n]) for n, l in lf.lorweb_layers(model).items())
    assert caught.value.__traceback__ is not None
    assert all(torch.equal(l.base_layer.weight, before[n]) for n, l in lf.lorweb_layers(model).items())
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))  # not left merged


def test_a_second_save_with_config_into_a_folder_another_thread_just_filled_is_refused(tmp_path, monkeypatch):
    """Two threads save two models with ``config`` under different names into one (empty) folder: B passes the
    early "folder holds other checkpoints" check while A is writing, then waits for A's folder lock; it checks again
    under the lock and is refused by name, so the folder never holds two checkpoints and one config.yaml."""
    from lorweb_fast.official_config import LoRWeBConfigError

    models = {"A": small_model(1), "B": small_model(2)}
    folder = tmp_path / "run"
    a_renaming, a_released = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if threading.current_thread().name == "A" and os.fspath(dst).endswith("a.safetensors"):
            a_renaming.set()
            a_released.wait(REACH_S)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    real_lock = _locks.folder_files_lock

    def folder_lock(directory):
        if threading.current_thread().name == "B":
            a_released.set()  # B passed the early check and now waits for A's lock
        return real_lock(directory)

    monkeypatch.setattr(_locks, "folder_files_lock", folder_lock)

    def save_b():
        assert a_renaming.wait(REACH_S)
        lf.save_lorweb_weights(models["B"], folder / "b.safetensors", metadata={"encoder": "enc-B"}, config={})

    _, errors = run_threads({"A": lambda: lf.save_lorweb_weights(models["A"], folder / "a.safetensors",
                                                                  metadata={"encoder": "enc-A"}, config={}),
                             "B": save_b})
    assert set(errors) == {"B"} and isinstance(errors["B"], LoRWeBConfigError), errors
    assert "holds other checkpoints (a.safetensors)" in str(errors["B"])
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "config.yaml"]


def test_get_coefficients_publishing_keeps_no_coefficients_alive():
    """What ``set_query`` publishes for ``get_coefficients`` holds weak references only: after ``clear_query`` the
    coefficients (and, in training, their autograd graph) are freed, and ``get_coefficients`` says there are none."""
    import gc
    import weakref

    model = small_model()
    with torch.no_grad():
        coefficients = lf.set_query(model, torch.randn(2, 6))
    refs = [weakref.ref(t) for t in coefficients.values()]
    assert lf.get_coefficients(model).keys() == coefficients.keys()
    del coefficients
    lf.clear_query(model)
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert lf.get_coefficients(model) == {}
