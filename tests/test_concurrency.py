"""Thread-safety audit: one process, several threads, as a web server (FastAPI / gradio thread pools) or a notebook
running jobs in threads uses the package (CPU only, tiny models, one intra-op thread so that results are bit-equal).

LoRWeB keeps the analogy on the model: ``set_query`` stores every layer's coefficients on the layer, ``merged()`` /
``fuse_lora`` change the weights in place, the strength (``set_lorweb_scale``, the per-call
``joint_attention_kwargs={"scale": s}``) is layer state. Stock diffusers pipelines are
not thread-safe either (the scheduler's timesteps and step index live on it); diffusers' own server example gives
each request a pipeline of its own that shares the models (``Pipeline.from_pipe(shared, scheduler=fresh)``), which
is correct for stock models because their forward is stateless. A user may expect concurrent calls to be correct,
serialized by the library, or refused with a clear error (or a documented rule): never an image generated with
another request's coefficients.

What always worked: pipelines that own their transformer, forwards of a model whose analogy nobody changes
(unmerged, ``merged("full")``, ``merged("jit")``), the run-folder lock between threads of one process (``flock``
locks belong to the open file description), and ``eval`` generate / score into different folders.

What the audit found, fixed by serializing (``lorweb_fast._locks``; each case is forced with events inside step
callbacks or wrapped hooks, and every wait has a timeout, so the serialized library passes instead of deadlocking):
a shared pipeline, diffusers' per-request pipelines sharing the transformer (every merge mode), the per-call
strength (left changed for good), ``fuse_lora`` from another thread, torn concurrent ``set_query``, concurrent
``train()`` runs (the global RNG seeds the basis, accelerate's process-wide state), the loss plot (matplotlib's
mathtext is not thread-safe), concurrent model loading (accelerate's ``init_empty_weights`` patches
``nn.Module.register_parameter`` process-wide and two overlapping loads left it patched: every later module of the
process was created on the meta device), and a README that stated no threading rule.
"""

import contextlib
import copy
import json
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import _files, demo, flux, lora_api, training
from lorweb_fast.testing import (at_first_step, build_tiny_lorweb_assets, generate_random_analogy, one_intra_op_thread,
                                 random_analogy, run_threads, small_lorweb_sequential, tiny_lorweb_kontext_pipeline,
                                 tiny_train_config, tiny_training_assets)

pytest.importorskip("diffusers")
from diffusers import FluxKontextPipeline  # noqa: E402

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
STEPS = 2
#: how long a forced interleaving waits for the other thread: a library that serializes calls makes it time out
WAIT_S = 2.0
#: what a clear refusal of concurrent use would say
CLEAR_ERROR = re.compile(r"thread|concurren|another call|in progress|already running|at a time|busy", re.I)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LoRWeBKontextPipeline (eval mode, native resolution, 64 px grids, no bar)."""
    return tiny_lorweb_kontext_pipeline(tmp_path_factory.mktemp("concurrency-pipe"))


def request_pipe(lp, *, own_transformer=False):
    """diffusers' per-request pipeline (examples/server): a fresh scheduler and tokenizers, the other components
    shared (the transformer too, unless ``own_transformer``), wrapped with the same analogy encoder. The tokenizers
    are copied because a shared fast tokenizer is not thread-safe (found here: diffusers' CLIP prompt encoding sets
    its padding per call, and another thread's call then pads differently; upstream, not lorweb_fast)."""
    kwargs = {"scheduler": lp.pipe.scheduler.from_config(lp.pipe.scheduler.config),
              "tokenizer": copy.deepcopy(lp.pipe.tokenizer), "tokenizer_2": copy.deepcopy(lp.pipe.tokenizer_2)}
    if own_transformer:
        kwargs["transformer"] = copy.deepcopy(lp.transformer)
    inner = FluxKontextPipeline.from_pipe(lp.pipe, **kwargs)
    wrapper = flux.LoRWeBKontextPipeline(inner, lp.encoder, resolution="native", long_edge=64)
    wrapper.set_progress_bar_config(disable=True)
    return wrapper


def generate(lp, seed: int, merge: str = "none", **kwargs):
    """b' (an array) of ``random_analogy(seed)`` with a generator seeded with ``seed``."""
    return generate_random_analogy(lp, seed, steps=STEPS, merge=merge, **kwargs)


def assert_own_result_or_clear_error(results, errors, refs) -> None:
    """Each thread got the result of its call run alone, or an error that names the concurrent use."""
    for name, ref in refs.items():
        if name in errors:
            assert CLEAR_ERROR.search(str(errors[name])), f"{name}: unclear error {errors[name]!r}"
        else:
            assert np.array_equal(results[name], ref), f"{name}: generated with another call's analogy"


def paused_call(lp, seed, inside, resume, merge="none", **kwargs):
    """``generate`` that, after its first step, sets ``inside`` and waits (at most WAIT_S) for ``resume``."""
    def pause():
        inside.set()
        resume.wait(WAIT_S)
    return generate(lp, seed, merge, callback_on_step_end=at_first_step(pause), **kwargs)


def after(event, job, done=None):
    """``job`` once ``event`` is set (at most WAIT_S); sets ``done`` when it ends, also on error."""
    def run():
        event.wait(WAIT_S)
        try:
            return job()
        finally:
            if done is not None:
                done.set()
    return run


def small_model():
    """Four 8 -> 8 linears with LoRWeB (N=3, r=2, query 6), a random non-zero basis and spread keys, eval mode."""
    return small_lorweb_sequential()


# ------------------------------------------------------------------------------------- what works (passing)
@pytest.mark.parametrize("merge", ["none", "auto", "jit"])
def test_pipelines_that_own_their_transformer_match_solo_calls_under_threads(tiny, merge):
    """Three threads, each with its own pipeline (own transformer, scheduler and tokenizers; text encoders, VAE and
    analogy encoder shared), start together 20 times with different analogies: every b' is bit-equal to the same
    call run alone. The safe pattern: LoRWeB state lives on the transformer, so a transformer per concurrent
    request."""
    pipes = {seed: request_pipe(tiny, own_transformer=True) for seed in (1, 2, 3)}
    refs = {seed: generate(pipes[seed], seed, merge) for seed in pipes}
    assert not np.array_equal(refs[1], refs[2])  # the premise: the analogies give different images
    for _ in range(20):
        barrier = threading.Barrier(len(pipes))

        def job(seed):
            return lambda: (barrier.wait(), generate(pipes[seed], seed, merge))[1]

        results, errors = run_threads({seed: job(seed) for seed in pipes})
        assert not errors
        assert all(np.array_equal(results[seed], refs[seed]) for seed in pipes)


@pytest.mark.parametrize("strategy", ["none", "full", "jit"])
def test_forwards_of_a_model_whose_analogy_nobody_changes_are_reentrant(strategy):
    """With the analogy set once (and merged with "full" / "jit"), 4 threads run forwards of different inputs 50
    times each: every output is bit-equal to the same forward run alone (the forward keeps no per-call state)."""
    model = small_model()
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))
    inputs = [torch.randn(1, 5, 8) for _ in range(4)]
    context = contextlib.nullcontext() if strategy == "none" else lf.merged(model, strategy)
    with torch.no_grad(), context:
        refs = [model(x) for x in inputs]
        barrier = threading.Barrier(len(inputs))

        def job(i):
            def run():
                barrier.wait()
                with torch.no_grad():  # grad mode is per thread
                    return all(torch.equal(model(inputs[i]), refs[i]) for _ in range(50))
            return run

        results, errors = run_threads({i: job(i) for i in range(len(inputs))})
    assert not errors and all(results.values())


def test_run_folder_lock_refuses_a_second_thread_of_the_same_process(train_assets, tmp_path):
    """``FolderLock`` uses ``flock``, whose locks belong to the open file description: a second thread of the same
    process that opens the lock file again is refused, naming this process (or "unknown" when it comes between the
    first thread's flock and its writing the holder; threads start together, 10 rounds);
    ``train()`` in a thread while another thread holds the run folder's lock is refused before loading anything."""
    import os

    for i in range(10):
        barrier = threading.Barrier(2)
        locks = [_files.FolderLock(tmp_path / f"out{i}", training.RUN_LOCK_NAME, "training run") for _ in range(2)]

        def take(lock):
            return lambda: (barrier.wait(), lock.acquire())[1]

        results, errors = run_threads({k: take(lock) for k, lock in enumerate(locks)})
        try:
            assert len(errors) == 1, errors
            error = next(iter(errors.values()))
            # the holder is written just after the flock: a refusal in between names it "unknown" (harmless)
            assert isinstance(error, _files.FolderInUseError)
            assert f"process {os.getpid()}" in str(error) or "(unknown, which holds" in str(error)
        finally:
            for lock in locks:
                lock.release()
    held = _files.FolderLock(tmp_path / "held", training.RUN_LOCK_NAME, "training run")
    held.acquire()
    try:
        cfg = tiny_train_config(train_assets, tmp_path / "held")
        _, errors = run_threads({"train": lambda: training.train(cfg)})
        assert isinstance(errors.get("train"), _files.FolderInUseError)
    finally:
        held.release()


@pytest.fixture(scope="module")
def eval_assets(tmp_path_factory):
    """A tiny CLIP, random LPIPS backbone weights, a 2 x 2 folder evaluation set, runs and baseline folders and a
    replay judge file (as tests/test_repeated_use.py builds them)."""
    from lorweb_fast.evaluation import tiny as eval_tiny

    root = tmp_path_factory.mktemp("concurrency-eval")
    demo.build_tiny_clip(root / "clip")
    eval_tiny.save_random_lpips_backbone(root / "torch_home")
    evalset = eval_tiny.make_folder_evalset(root / "evalset", tasks=("flip", "swap"), per_task=2, size=(48, 40))
    eval_tiny.make_runs_folder(root / "ours", evalset, seed=1)
    eval_tiny.make_runs_folder(root / "base", evalset, seed=2)
    ids = [f"{t}/{i:03d}" for t in ("flip", "swap") for i in range(2)]
    rows = [{"id": i, "kind": "score", "response": json.dumps({"metrics": {"accuracy": 6, "consistency": 7}})}
            for i in ids] + [{"id": i, "kind": "pairwise", "response": json.dumps({"better": 1})} for i in ids]
    (root / "replay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_eval_generate_and_score_into_different_folders_from_threads(tiny, eval_assets, tmp_path, monkeypatch):
    """``evaluation.generate`` from 2 threads (each with its own pipeline, the safe pattern) and ``score`` from 3
    threads, each into its own folder, started together: the b' files and the metrics equal those of solo runs."""
    from PIL import Image

    from lorweb_fast.evaluation import generate as G, read_evalset, score as S
    from lorweb_fast.evaluation.judge import make_judge

    monkeypatch.setenv("TORCH_HOME", str(eval_assets / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    triplets = read_evalset(eval_assets / "evalset")
    pipes = [request_pipe(tiny, own_transformer=True) for _ in range(2)]

    def gen(k, out):
        return G.generate(pipes[k], triplets[k::2], out, seeds=(k,), batch_size=2, num_inference_steps=1,
                          progress=False, pipe_kwargs={"max_sequence_length": MSL})

    def b_primes(out):
        return {p.relative_to(out).as_posix(): np.asarray(Image.open(p)) for p in sorted(out.glob("*/*/b_prime.png"))}

    for k in range(2):
        gen(k, tmp_path / f"solo{k}")
    barrier = threading.Barrier(2)
    _, errors = run_threads({k: lambda k=k: (barrier.wait(), gen(k, tmp_path / f"gen{k}"))[1] for k in range(2)})
    assert not errors
    for k in range(2):
        solo, got = b_primes(tmp_path / f"solo{k}"), b_primes(tmp_path / f"gen{k}")
        assert solo and solo.keys() == got.keys() and all(np.array_equal(solo[n], got[n]) for n in solo)

    def scoring(out):
        report = S.score({"ours": eval_assets / "ours"}, out, encoder=str(eval_assets / "clip"),
                         judge=make_judge(f"replay:{eval_assets / 'replay.jsonl'}"),
                         against={"base": eval_assets / "base"}, batch_size=3, progress=False)
        return json.dumps({k: v for k, v in report.items() if k != "settings"}, sort_keys=True)

    ref = scoring(tmp_path / "report-solo")
    barrier = threading.Barrier(3)
    results, errors = run_threads({k: lambda k=k: (barrier.wait(), scoring(tmp_path / f"report{k}"))[1]
                                   for k in range(3)})
    assert not errors and all(result == ref for result in results.values())


# --------------------------------------------------------------------------- what does not (strict xfails)
def test_shared_pipeline_concurrent_calls_get_their_own_analogy(tiny):
    """Call 1 (analogy 1) pauses after its first step while call 2 (analogy 2) runs on the same pipeline from
    another thread; then call 1 finishes. Each must get its solo result (or a clear error about concurrent use)."""
    refs = {1: generate(tiny, 1), 2: generate(tiny, 2)}
    inside, done = threading.Event(), threading.Event()
    results, errors = run_threads({1: lambda: paused_call(tiny, 1, inside, done),
                                   2: after(inside, lambda: generate(tiny, 2), done)})
    assert_own_result_or_clear_error(results, errors, refs)


@pytest.mark.parametrize("merge", ["none", "auto", "jit"])
def test_request_scoped_pipelines_sharing_a_transformer_get_their_own_analogy(tiny, merge):
    """diffusers' documented server pattern: each request builds ``from_pipe(shared, scheduler=fresh)``. Request 1
    pauses after its first step while request 2 (another analogy) runs; each must get its solo result (or a clear
    error about concurrent use, not "set_query inside a merged() block" / "nested merged() blocks")."""
    refs = {seed: generate(request_pipe(tiny), seed, merge) for seed in (1, 2)}
    inside, done = threading.Event(), threading.Event()
    first, second = request_pipe(tiny), request_pipe(tiny)
    results, errors = run_threads({1: lambda: paused_call(first, 1, inside, done, merge),
                                   2: after(inside, lambda: generate(second, 2, merge), done)})
    assert_own_result_or_clear_error(results, errors, refs)


def test_per_call_strength_is_not_left_behind_by_overlapping_calls(tiny):
    """Two requests (per-request pipelines sharing the transformer) with ``joint_attention_kwargs={"scale": 0.5}``
    overlap: request 1 enters, request 2 enters, request 1 leaves, request 2 leaves. Afterwards the strength must
    be 1.0 again, and each b' must be its solo result at scale 0.5."""
    kwargs = {"joint_attention_kwargs": {"scale": 0.5}}
    refs = {seed: generate(request_pipe(tiny), seed, **kwargs) for seed in (1, 2)}
    one_inside, two_inside, one_done = threading.Event(), threading.Event(), threading.Event()
    first, second = request_pipe(tiny), request_pipe(tiny)

    def request_one():
        try:
            return paused_call(first, 1, one_inside, two_inside, **kwargs)
        finally:
            one_done.set()

    def request_two():
        return paused_call(second, 2, two_inside, one_done, **kwargs)

    try:
        results, errors = run_threads({1: request_one, 2: after(one_inside, request_two)})
        assert lora_api.get_lorweb_scale(tiny.transformer) == 1.0
        assert_own_result_or_clear_error(results, errors, refs)
    finally:
        lora_api.set_lorweb_scale(tiny.transformer, 1.0)


def test_fuse_lora_from_another_thread_does_not_change_a_running_call(tiny):
    """Call 1 (analogy 1, unmerged) pauses after its first step; another thread runs ``set_analogy(analogy 2)``
    and ``fuse_lora("full")``; call 1 finishes. It must give its solo result (or a clear error)."""
    refs = {1: generate(tiny, 1)}
    inside, fused = threading.Event(), threading.Event()

    def fuse():
        tiny.set_analogy(*random_analogy(2))
        tiny.fuse_lora("full")

    try:
        results, errors = run_threads({1: lambda: paused_call(tiny, 1, inside, fused),
                                       "fuse": after(inside, fuse, fused)})
        assert "fuse" not in errors or CLEAR_ERROR.search(str(errors["fuse"]))
        assert_own_result_or_clear_error(results, errors, refs)
    finally:
        tiny.unfuse_lora()


def test_concurrent_set_query_leaves_one_analogy_on_every_layer(monkeypatch):
    """Thread A's ``set_query`` is held after its first layer while thread B's ``set_query`` (another analogy)
    runs; then A finishes. Every layer must then hold the coefficients of the same analogy (A's or B's)."""
    model = small_model()
    queries = {"A": torch.randn(1, 6), "B": torch.randn(1, 6)}
    with torch.no_grad():
        expected = {k: {n: c.clone() for n, c in lf.set_query(model, q).items()} for k, q in queries.items()}
    a_started, b_done = threading.Event(), threading.Event()
    original = lf.LoRWeBLinear.set_coefficients

    def set_coefficients(self, coeffs, **kwargs):
        original(self, coeffs, **kwargs)
        if threading.current_thread().name == "A" and not a_started.is_set():
            a_started.set()
            b_done.wait(WAIT_S)

    monkeypatch.setattr(lf.LoRWeBLinear, "set_coefficients", set_coefficients)

    def query(name):
        with torch.no_grad():
            lf.set_query(model, queries[name])

    thread_a = threading.Thread(target=query, args=("A",), name="A")
    thread_b = threading.Thread(target=after(a_started, lambda: query("B"), b_done), name="B")
    for thread in (thread_a, thread_b):
        thread.start()
    for thread in (thread_a, thread_b):
        thread.join(30)
    got = lf.get_coefficients(model)
    sources = {next((k for k, coeffs in expected.items() if torch.equal(coeffs[n], c)), None) for n, c in got.items()}
    assert len(sources) == 1 and None not in sources, f"layers hold analogies {sources}"


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    """The tiny pipeline, CLIP and 4 synthetic analogies that ``tiny_train_config`` trains on."""
    return tiny_training_assets(tmp_path_factory.mktemp("concurrency-train"), 4)


def test_two_train_calls_in_threads_match_solo_runs(train_assets, tmp_path, monkeypatch):
    """Two ``train()`` runs (own pipeline each, loaded beforehand; different seeds and ``--out``) in two threads,
    both seeded before either injects its basis: each run's weights must equal the same run alone (or one of them
    is refused clearly), and accelerate's process-wide state is left as found (empty)."""
    from accelerate.state import AcceleratorState, GradientState

    def config(name, seed):
        return tiny_train_config(train_assets, tmp_path / name, steps=2, checkpoint_every=2, batch_size=1, seed=seed)

    def models():
        return {"pipe": flux.load_kontext_pipeline(train_assets / "pipe"),
                "encoder": flux.AnalogyEncoder(train_assets / "clip")}

    def weights(result):
        return {k: v.detach().clone() for k, v in lf.lorweb_state_dict(result["transformer"]).items()}

    AcceleratorState._reset_state(reset_partial_state=True)  # the premise: no state from an earlier test
    GradientState._reset_state()
    try:
        refs = {seed: weights(training.train(config(f"solo{seed}", seed), **models())) for seed in (3, 4)}
        given = {seed: models() for seed in refs}
        both_seeded = threading.Barrier(2, timeout=WAIT_S)
        original = training.inject_lorweb

        def inject(*args, **kwargs):
            with contextlib.suppress(threading.BrokenBarrierError):
                both_seeded.wait()
            return original(*args, **kwargs)

        monkeypatch.setattr(training, "inject_lorweb", inject)
        results, errors = run_threads({seed: lambda seed=seed: weights(training.train(config(f"run{seed}", seed),
                                                                                      **given[seed]))
                                       for seed in refs})
        assert not any(training._accelerate_state())  # as before the two runs: no accelerate state
        for seed, ref in refs.items():
            if seed in errors:
                assert CLEAR_ERROR.search(str(errors[seed])), f"unclear error {errors[seed]!r}"
            else:
                assert all(torch.equal(results[seed][k], ref[k]) for k in ref), f"run {seed} differs from solo"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_plot_loss_from_concurrent_threads(tmp_path):
    """4 threads draw the loss plot of the same log at once, up to 10 rounds: no error, every PNG written."""
    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 10.0 / (i + 1)}) + "\n" for i in range(8)))
    for rnd in range(10):
        barrier = threading.Barrier(4)
        paths = [tmp_path / f"loss{rnd}-{k}.png" for k in range(4)]
        _, errors = run_threads({k: lambda k=k: (barrier.wait(), training.plot_loss(log, paths[k]))[1]
                                 for k in range(4)})
        assert not errors, errors
        assert all(path.is_file() for path in paths)


def forced_overlap(original):
    """A stand-in for the context-manager factory ``original`` whose first two blocks (entered from two threads)
    overlap the bad way when nothing serializes them: the second is entered while the first is open (both wait for
    each other, at most WAIT_S) and the first is left first. Serialized callers just wait WAIT_S once."""
    order_lock, entered = threading.Lock(), []
    both_inside, first_left = threading.Barrier(2, timeout=WAIT_S), threading.Event()

    @contextlib.contextmanager
    def overlapping(*args, **kwargs):
        with order_lock:
            context = original(*args, **kwargs)
            context.__enter__()
            rank = len(entered)
            entered.append(rank)
        try:
            if rank < 2:
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_inside.wait()
            yield
        finally:
            if rank == 1:
                first_left.wait(WAIT_S)
            context.__exit__(None, None, None)
            if rank == 0:
                first_left.set()

    return overlapping


def test_loading_pipelines_from_two_threads_leaves_no_meta_parameters(tmp_path, monkeypatch):
    """Two threads load ``LoRWeBKontextPipeline.from_pretrained`` at once, the first two ``init_empty_weights``
    blocks overlapping (the second entered while the first is open, the first left first): both pipelines hold real
    weights and a new ``nn.Linear`` of the process is not on the meta device. (The patched methods are put back.)"""
    from accelerate import big_modeling

    assets = build_tiny_lorweb_assets(tmp_path)
    saved = (nn.Module.register_parameter, nn.Module.register_buffer)
    monkeypatch.setattr(big_modeling, "init_on_device", forced_overlap(big_modeling.init_on_device))

    def load():
        pipe = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                          resolution="native", long_edge=64)
        models = [m for m in pipe.components.values() if isinstance(m, nn.Module)] + [pipe.encoder.model]
        return sum(p.is_meta for m in models for p in m.parameters())

    try:
        results, errors = run_threads({k: load for k in range(2)})
        leaked = nn.Linear(2, 2).weight.is_meta
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = saved
    assert not errors and results == {0: 0, 1: 0} and not leaked


def test_clip_loads_from_two_threads_leave_transformers_weight_tying_on(eval_assets, monkeypatch):
    """The evaluation's CLIP (``ClipDirectional``) and the analogy encoder (``AnalogyEncoder``) loaded from two
    threads at once, their transformers ``no_tie_weights`` blocks forced to overlap the bad way: that block swaps
    ``PreTrainedModel.tie_weights`` for a no-op process-wide and puts back what it found, so unserialized loads leave
    the no-op behind, and every later T5 load keeps its tied ``embed_tokens`` on the meta device (a CI run's
    "Cannot copy out of meta tensor" in the two-train test). Both load and weight tying is left on."""
    from transformers import PreTrainedModel, initialization

    from lorweb_fast.evaluation.metrics import ClipDirectional

    original = PreTrainedModel.tie_weights
    monkeypatch.setattr(initialization, "no_tie_weights", forced_overlap(initialization.no_tie_weights))
    jobs = {"clip": lambda: ClipDirectional(eval_assets / "clip"), "encoder": lambda: flux.AnalogyEncoder(
        eval_assets / "clip")}
    try:
        _, errors = run_threads(jobs)
        left = PreTrainedModel.tie_weights
    finally:
        PreTrainedModel.tie_weights = original
    assert not errors, errors
    assert left is original, "a no-op PreTrainedModel.tie_weights was left behind"


def test_readme_states_the_threading_rule():
    """The README tells server authors the rule for threads (the word "thread" appears with the rule)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.search(r"thread-safe|thread safe|concurrent (calls|requests)|from several threads", readme, re.I)


@pytest.mark.parametrize("change", ["set_lorweb_scale", "disable_lora", "set_adapters"])
@pytest.mark.parametrize("merge", ["none", "auto"])
def test_strength_changes_from_another_thread_wait_for_a_running_call(tiny, change, merge):
    """Found by the session review: the pipeline's strength methods (``set_lorweb_scale``, ``disable_lora``,
    ``set_adapters``, as the LoRA loading ones) took no lock, so a call paused after its first step finished with
    another strength (``merge="none"``) or the change failed with an error about a merged() block the caller never
    entered (``merge="auto"``). They now wait for the running call: its b' is its solo result, and the change
    applies after it."""
    ref = generate(tiny, 1, merge)
    inside, changed = threading.Event(), threading.Event()
    calls = {"set_lorweb_scale": lambda: tiny.set_lorweb_scale(0.3), "disable_lora": tiny.disable_lora,
             "set_adapters": lambda: tiny.set_adapters(tiny.get_active_adapters()[0], adapter_weights=0.3)}
    try:
        results, errors = run_threads({1: lambda: paused_call(tiny, 1, inside, changed, merge),
                                       2: after(inside, calls[change], changed)})
        assert not errors, errors
        assert np.array_equal(results[1], ref)
        assert lora_api.get_lorweb_scale(tiny.transformer) in (0.0, 0.3)  # applied once the call ended
    finally:
        tiny.enable_lora()
        tiny.set_lorweb_scale(1.0)


def test_get_coefficients_never_sees_half_of_another_threads_set_query(monkeypatch):
    """``get_coefficients`` (and so ``plot_coefficients``) reads under the model's analogy lock: while another
    thread's ``set_query`` is half way through setting the layers, the read waits and then sees one analogy on every
    layer, never a mix."""
    from lorweb_fast.layer import LoRWeBLinear

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=4, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
    queries = [torch.randn(1, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        lf.set_query(model, queries[0])
        first = {n: c.clone() for n, c in lf.get_coefficients(model).items()}
        lf.set_query(model, queries[1])
        second = {n: c.clone() for n, c in lf.get_coefficients(model).items()}
        lf.set_query(model, queries[0])
    assert not all(torch.equal(first[n], second[n]) for n in first)
    half_set, read_may_start = threading.Event(), threading.Event()
    original, calls = LoRWeBLinear.set_coefficients, []

    def slow_set(self, *args, **kwargs):
        calls.append(self)
        original(self, *args, **kwargs)
        if len(calls) == 2:  # two of the four layers hold the new analogy
            half_set.set()
            read_may_start.wait(0.5)

    monkeypatch.setattr(LoRWeBLinear, "set_coefficients", slow_set)

    def setter():
        with torch.no_grad():
            lf.set_query(model, queries[1])

    def reader():
        got = lf.get_coefficients(model)
        read_may_start.set()
        return got

    results, errors = run_threads({"set": setter, "read": after(half_set, reader)})
    assert not errors, errors
    got = results["read"]
    assert all(torch.equal(got[n], second[n]) for n in got) or all(torch.equal(got[n], first[n]) for n in got)
