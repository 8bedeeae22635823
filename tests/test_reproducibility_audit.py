"""Reproducibility and determinism audit: what a user who reruns things expects to get back bit for bit, and what
hidden process-wide state (global RNGs, PYTHONHASHSEED, thread count, the file system's listing order, free memory)
could change the result.

Inference (tiny random FLUX.1-Kontext pipeline loaded with ``from_pretrained``, fp32, one intra-op thread): the same
generator gives bit-identical b' twice in a process, whatever ran in between (other analogies, strengths, merges,
fuse / unfuse, other step counts), and in a fresh process with another PYTHONHASHSEED; ``generator=None`` is the
documented seed 50 and ignores the global RNG; a batch gives each analogy its solo b' (fp32 tolerance); the merge
strategies agree (full / offload / jit bit for bit, since ``merge="auto"`` picks among them by free memory).
Training: two ``train()`` runs with one config and seed give identical checkpoints whatever the global RNG state,
the file system's listing order of the data folder, or PYTHONHASHSEED; another seed gives other weights; a run leaves
the process's global state alone. ``data prepare`` and ``eval generate``: byte-identical outputs across runs, listing
orders and resumes.

Known limits (not defects, documented here): results depend on ``torch.get_num_threads()`` at the fp32 rounding
level (CPU GEMM blocking), so every comparison runs on one intra-op thread (``test_thread_count...`` bounds the
difference); a batch differs from solo calls by fp32 rounding only, as the README says.
"""

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lorweb_fast as lf
from lorweb_fast import cli, demo, flux, training
from lorweb_fast.evaluation import tiny
from lorweb_fast.testing import (build_tiny_lorweb_assets, file_tree, one_intra_op_thread, random_analogy,
                                 relation252k_folder, tiny_lorweb_linear_model, tiny_train_config,
                                 tiny_training_assets, tolerance)

pytest.importorskip("diffusers")

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
STEPS = 2
#: the longest dot products of the tiny FLUX (hidden 32): the single blocks' proj_out over attention + MLP (32 + 128)
DEPTH = 160
#: b' in [0, 1] after STEPS denoising steps and the VAE decoder, fp32: 5x the per-layer fp32 bound of
#: lorweb_fast.testing (about 1e-4; batched vs solo and merged vs unmerged differ by about 1.5e-6 here, while two
#: analogies differ by about 1.5e-2, so a wrong mixture or a mixed-up sample is far outside it)
IMAGE_ATOL = 5 * tolerance(torch.float32, DEPTH)
#: the training run every training test repeats: 4 steps of batch 2, checkpoints at steps 2 and 4
TRAIN = dict(steps=4, checkpoint_every=2)
#: data prepare's options in every run (the --max-analogies sample makes --seed matter)
PREPARE = dict(max_analogies=5, seed=1)
RELATION_SPEC = {"cat_b": [(20, 16), (24, 16), (16, 20)], "cat_a": [(16, 16), (20, 20), (18, 14)],
                 "cat_c": [(16, 16), (16, 16)]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (bit-exact comparisons need one thread count; see the module docstring)."""
    with one_intra_op_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(pipe, analogies, seeds=None, prompts=None, **kwargs) -> list:
    """b' arrays of ``analogies`` ((a, a', b) triples) in one pipeline call; one CPU generator per analogy seeded with
    ``seeds`` (None: the pipeline's default generator)."""
    a, a_prime, b = (list(x) for x in zip(*analogies))
    if seeds is not None:
        kwargs["generator"] = [gen(s) for s in seeds]
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(a, a_prime, b, prompts or ["flip"] * len(a), output_type="np", max_sequence_length=MSL,
                progress=False, **kwargs)


def seed_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def global_state() -> dict:
    """The process-wide state a library call could change behind the caller's back."""
    return {"torch rng": torch.get_rng_state(), "numpy rng": np.random.get_state()[1].copy(),
            "python rng": random.getstate(), "threads": torch.get_num_threads(),
            "interop threads": torch.get_num_interop_threads(), "grad": torch.is_grad_enabled(),
            "default dtype": torch.get_default_dtype(), "matmul precision": torch.get_float32_matmul_precision(),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def changed(before: dict, after: dict) -> list:
    def same(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, np.ndarray):
            return np.array_equal(x, y)
        return x == y
    return [key for key in before if not same(before[key], after[key])]


class _Listing:
    """What ``os.scandir`` returns (an iterator and context manager), over a list of entries."""

    def __init__(self, entries):
        self._entries = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


@contextlib.contextmanager
def reversed_listings():
    """Every directory listing of the process (``os.listdir``, ``os.scandir``, so ``os.walk``, ``Path.iterdir`` and
    ``Path.glob`` too) in the reverse of the file system's order: a file system that lists in another order (ext4
    lists in hash order whatever the creation order, tmpfs newest first, APFS sorted)."""
    real_listdir, real_scandir = os.listdir, os.scandir

    def listdir(path="."):
        return real_listdir(path)[::-1]

    def scandir(path="."):
        with real_scandir(path) as it:
            return _Listing(list(it)[::-1])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "listdir", listdir)
        mp.setattr(os, "scandir", scandir)
        yield


def copy_in_reverse_order(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` with its files created in the reverse of their sorted order."""
    for path in sorted((p for p in src.rglob("*") if p.is_file()), reverse=True):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dst


def safetensors_contents(path: Path) -> tuple:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def assert_same_values(x, y, where: str) -> None:
    """Nested dicts / lists / tensors (a loaded trainer state) equal, tensors bit for bit."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for key in x:
            assert_same_values(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same_values(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def assert_same_run(run: Path, other: Path, *, other_data: bool = False) -> None:
    """Two training run folders hold the same results: the same files; weights (tensors and metadata), trainer
    states, loss logs, plots and config.yaml equal; ``train_config.json`` equal but for ``out`` (and ``data`` when
    ``other_data``: the other run read a copy of the data folder)."""
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file())
    assert any(f.endswith("trainer_state.pt") for f in files) and "lorweb.safetensors" in files
    for name in files:
        a, b = run / name, other / name
        if name.endswith(".safetensors"):
            (ta, ma), (tb, mb) = safetensors_contents(a), safetensors_contents(b)
            assert ta.keys() == tb.keys(), name
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{name}: other weights"
            assert ma == mb, name
        elif name.endswith("trainer_state.pt"):
            sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
            if other_data:
                sa["config"].pop("data"), sb["config"].pop("data")
            assert_same_values(sa, sb, name)
        elif name == "train_config.json":
            skip = ("out", "data") if other_data else ("out",)
            ca, cb = ({k: v for k, v in json.loads(p.read_text()).items() if k not in skip} for p in (a, b))
            assert ca == cb
        else:
            assert a.read_bytes() == b.read_bytes(), name


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny pipeline, CLIP and LoRWeB checkpoint on disk, and a folder-layout evaluation set (4 triplets)."""
    root = tmp_path_factory.mktemp("repro-assets")
    build_tiny_lorweb_assets(root)
    tiny.make_folder_evalset(root / "evalset", tasks=("flip", "swap"), per_task=2, size=(32, 32))
    return root


def load_pipe(assets):
    pipe = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      resolution="native", long_edge=64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(assets):
    return load_pipe(assets)


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("repro-train"), 6)


@pytest.fixture(scope="module")
def relation_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro-relation")
    relation252k_folder(root / "src", RELATION_SPEC, seed=3)
    return root / "src"


@pytest.fixture(scope="module")
def runs(train_assets, tmp_path_factory):
    """Training runs of one config (all into folders named ``run``, as the folder name is the checkpoint's name):
    ``ref`` (seed 0); ``twin`` (the same, started from other global torch / numpy / python RNG states, with the
    global state recorded around it); ``seed1``; ``listing`` (a copy of the data folder written in the reverse
    file order, read with every directory listing reversed)."""
    base = tmp_path_factory.mktemp("repro-runs")
    out = {}
    training.train(tiny_train_config(train_assets, base / "ref" / "run", **TRAIN))
    out["ref"] = base / "ref" / "run"
    seed_global_rngs(987654321)
    before = global_state()
    training.train(tiny_train_config(train_assets, base / "twin" / "run", **TRAIN))
    out["twin"], out["twin state"] = base / "twin" / "run", (before, global_state())
    training.train(tiny_train_config(train_assets, base / "seed1" / "run", seed=1, **TRAIN))
    out["seed1"] = base / "seed1" / "run"
    copy = copy_in_reverse_order(train_assets / "data", base / "data-reversed")
    natural = os.listdir(copy / "target")
    with reversed_listings():
        out["listing order"] = (os.listdir(copy / "target"), natural)
        training.train(tiny_train_config(train_assets, base / "listing" / "run", data=str(copy), **TRAIN))
    out["listing"] = base / "listing" / "run"
    return out


FRESH_PROCESS = """
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
torch.set_num_threads(1)
from lorweb_fast import data, demo, flux, training
from lorweb_fast.testing import random_analogy, tiny_train_config
args = json.loads(sys.argv[1])
training.train(tiny_train_config(args["train_assets"], args["train_out"], **args["train"]))
data.prepare_relation252k(args["relation_src"], args["prepare_out"], progress=False, **args["prepare"])
pipe = flux.LoRWeBKontextPipeline.from_pretrained(args["pipe"], args["weights"], resolution="native", long_edge=64)
a, a_prime, b = random_analogy(0)
outs = []
for kwargs in ({}, {"generator": torch.Generator().manual_seed(11), "merge": "none"}):
    outs += pipe(a, a_prime, b, "flip", num_inference_steps=args["steps"], output_type="np",
                 max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, progress=False, **kwargs)
np.save(args["npy"], np.stack(outs))
print("hash", hash("lorweb_fast reproducibility"))
"""


@pytest.fixture(scope="module")
def fresh_process(assets, train_assets, relation_src, tmp_path_factory):
    """One fresh Python process with another PYTHONHASHSEED (one intra-op thread): the training run of ``runs``,
    the data prepare of ``test_data_prepare...`` and two b' of ``random_analogy(0)`` (the default generator, and
    seed 11 unmerged). Returns (its folder, the hash of a string there)."""
    root = tmp_path_factory.mktemp("repro-fresh")
    args = {"train_assets": str(train_assets), "train_out": str(root / "run"), "train": TRAIN,
            "relation_src": str(relation_src), "prepare_out": str(root / "prepared"), "prepare": PREPARE,
            "pipe": str(assets / "pipe"), "weights": str(assets / "lorweb.safetensors"), "steps": STEPS,
            "npy": str(root / "b_prime.npy")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONHASHSEED"] = "271828" if os.environ.get("PYTHONHASHSEED") != "271828" else "314159"
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(args)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, int(re.search(r"^hash (-?\d+)$", proc.stdout, re.M).group(1))


# ------------------------------------------------------------------------------------------------ inference
X0, X1, X2 = random_analogy(0), random_analogy(1), random_analogy(2)


def test_default_generator_is_seed_50_on_the_execution_device_whatever_the_global_rng(pipe):
    """``generator=None`` is documented (README *Inference*: seed 50 on a generator on the pipeline's execution
    device; the call's docstring): two default calls after different global torch / numpy / python seeds are
    bit-identical and equal to that generator's; ``seed=7`` is ``torch.Generator().manual_seed(7)``. A call neither
    reads nor advances the global RNGs (an explicit generator or the default one)."""
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "seed 50 on a generator on the pipeline's execution device" in readme
    doc = " ".join(flux.LoRWeBKontextPipeline.__call__.__doc__.split())
    assert "seeded with ``seed`` (50" in doc and "execution device" in doc
    seed_global_rngs(1)
    before = global_state()
    first = call(pipe, [X0])[0]
    assert changed(before, global_state()) == []
    seed_global_rngs(2)
    again = call(pipe, [X0])[0]
    np.testing.assert_array_equal(first, again)
    device = pipe.pipe._execution_device
    explicit = call(pipe, [X0], generator=torch.Generator(device=device).manual_seed(50))[0]
    np.testing.assert_array_equal(first, explicit)
    before = global_state()
    seven = call(pipe, [X0], seed=7)[0]
    assert changed(before, global_state()) == []
    np.testing.assert_array_equal(seven, call(pipe, [X0], generator=gen(7))[0])
    assert np.abs(seven - first).max() > 100 * IMAGE_ATOL  # the seed is used


def test_same_generator_gives_bit_identical_b_prime_whatever_ran_in_between(pipe):
    """b' of one analogy and seed, merged (``merge="auto"``, a full merge here) and unmerged, stays bit-identical
    after other analogies, strengths (set_lorweb_scale, set_adapters, the per-call scale, disable_lora), merges,
    ``merged()`` blocks, fuse_lora / unfuse_lora (full and jit), another step count and another grid size: nothing
    of a call stays behind in the weights, the strength, the coefficients or the scheduler."""
    def refs():
        return call(pipe, [X0], [11])[0], call(pipe, [X0], [11], merge="none")[0]

    want = refs()

    def other_strength():
        pipe.set_lorweb_scale(0.3)
        out = call(pipe, [X0], [11])[0]
        pipe.set_lorweb_scale(1.0)
        assert np.abs(out - want[0]).max() > 10 * IMAGE_ATOL  # the strength changed b'

    def adapters_strength():
        pipe.set_adapters("lorweb", adapter_weights=0.5)
        call(pipe, [X1], [3])
        pipe.set_adapters("lorweb", adapter_weights=1.0)

    def disabled():
        pipe.disable_lora()
        call(pipe, [X1], [3])
        pipe.enable_lora()

    def merged_block():
        pipe.set_analogy(*X1)
        with lf.merged(pipe.transformer, "offload"):
            pass
        with lf.merged(pipe.transformer, "full"):
            pass

    def fused(strategy):
        def run():
            pipe.set_analogy(*X1)
            pipe.fuse_lora(strategy=strategy, lora_scale=0.5)
            call(pipe, [X1], [3])
            if strategy == "jit":
                call(pipe, [X2, X0], [4, 5])  # jit follows every analogy
            pipe.unfuse_lora()
        return run

    interventions = {
        "a batch of other analogies": lambda: call(pipe, [X1, X2], [1, 2], merge="none"),
        "another analogy merged": lambda: call(pipe, [X1], [3], merge="full"),
        "another analogy offload-merged": lambda: call(pipe, [X2], [3], merge="offload"),
        "a jit batch": lambda: call(pipe, [X1, X2], [1, 2], merge="jit"),
        "another strength": other_strength,
        "set_adapters": adapters_strength,
        "a per-call scale": lambda: call(pipe, [X1], [3], joint_attention_kwargs={"scale": 0.4}),
        "disable_lora": disabled,
        "merged() blocks": merged_block,
        "fuse full": fused("full"),
        "fuse jit": fused("jit"),
        "other steps and size": lambda: call(pipe, [X1], [3], num_inference_steps=3, long_edge=32),
    }
    for what, intervention in interventions.items():
        intervention()
        got = refs()
        for g, w, mode in zip(got, want, ("merged", "unmerged")):
            assert np.array_equal(g, w), f"after {what}: {mode} b' changed by {np.abs(g - w).max():.3g}"
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0


def test_a_fresh_process_with_another_hash_seed_gives_the_same_bits(pipe, fresh_process):
    """The b' a fresh process computes (``from_pretrained``, the same thread count, another PYTHONHASHSEED) equals
    this process's bit for bit, for the default generator and an explicit one."""
    root, their_hash = fresh_process
    assert their_hash != hash("lorweb_fast reproducibility")  # the premise: another string hash seed
    theirs = np.load(root / "b_prime.npy")
    ours = np.stack([call(pipe, [X0])[0], call(pipe, [X0], [11], merge="none")[0]])
    np.testing.assert_array_equal(theirs, ours)


@pytest.mark.parametrize("merge", ["none", "jit"])
def test_a_batch_gives_each_analogy_its_solo_b_prime(pipe, merge):
    """Three analogies in one call, one generator each (README: the result then matches one-by-one runs): every b'
    equals the solo call's within fp32 rounding, in any order of the batch (unmerged fused path and per-sample jit
    merge)."""
    analogies, seeds = [X0, X1, X2], [5, 6, 7]
    solo = [call(pipe, [x], [s], merge=merge)[0] for x, s in zip(analogies, seeds)]
    for order in ([0, 1, 2], [2, 0, 1]):
        batch = call(pipe, [analogies[i] for i in order], [seeds[i] for i in order], merge=merge)
        for got, i in zip(batch, order):
            np.testing.assert_allclose(got, solo[i], rtol=0, atol=IMAGE_ATOL)
    assert min(np.abs(solo[i] - solo[j]).max() for i, j in ((0, 1), (1, 2), (0, 2))) > 100 * IMAGE_ATOL


def test_a_batch_with_a_b_of_another_size_matches_solo_or_warns(pipe):
    """README: a batch with one generator per analogy matches one-by-one runs. Where the batch cannot (all grids
    share one size), the caller must be told, as for b of different aspect ratios."""
    a, a_prime, b = X1
    small = (a, a_prime, b.resize((24, 24)))
    solo = call(pipe, [small], [6])[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = call(pipe, [X0, small], [5, 6])
    warned = [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)
              and "control grids of different sizes" in str(w.message)]
    matches = batch[1].shape == solo.shape and np.abs(batch[1] - solo).max() <= IMAGE_ATOL
    assert matches or warned, f"batched b' {batch[1].shape} vs solo {solo.shape}, no warning"
    with warnings.catch_warnings(record=True) as caught:  # b images of one size: no such warning
        warnings.simplefilter("always")
        call(pipe, [X0, X1], [5, 6])
    assert X0[2].size == X1[2].size
    assert not [w for w in caught if "control grids of different sizes" in str(w.message)]


def test_merge_strategies_agree_and_auto_does_not_depend_on_free_memory(pipe, monkeypatch):
    """One analogy: unmerged and merged b' agree within fp32 rounding; "full", "offload" and "jit" fold the same
    fp32 merged weight (README: fp32 math, one rounding), so they are bit-identical, and ``merge="auto"``, which picks
    one of them from the free memory at call time, gives the same bits whatever it picks."""
    outs = {m: call(pipe, [X2], [9], merge=m)[0] for m in ("none", "full", "offload", "jit")}
    for m in ("full", "offload", "jit"):
        np.testing.assert_allclose(outs[m], outs["none"], rtol=0, atol=IMAGE_ATOL)
        np.testing.assert_array_equal(outs[m], outs["full"])
    picked = set()
    for free in (0, 1 << 50):  # choose_merge_strategy from another amount of free memory
        monkeypatch.setattr(flux, "free_memory_bytes", lambda device, free=free: free)
        picked.add(pipe.merge_strategy("auto", 1))
        np.testing.assert_array_equal(call(pipe, [X2], [9], merge="auto")[0], outs["full"])
    assert picked == {"full", "jit"}
    # the premise: the tolerance is far below what the mixture does and below another analogy's mixture (same b)
    pipe.disable_lora()
    try:
        base = call(pipe, [X2], [9], merge="none")[0]
    finally:
        pipe.enable_lora()
    assert np.abs(outs["none"] - base).max() > 100 * IMAGE_ATOL
    other = call(pipe, [(X0[0], X0[1], X2[2])], [9], merge="none")[0]
    assert np.abs(outs["none"] - other).max() > 100 * IMAGE_ATOL


def test_thread_count_changes_b_prime_at_rounding_level_only(pipe):
    """A hidden dependence on global state that stays within rounding: the same call on 2 intra-op threads instead
    of 1 (CPU GEMM blocking differs) gives b' within the fp32 tolerance (not always bit-identical)."""
    one = call(pipe, [X0], [11], merge="none")[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = call(pipe, [X0], [11], merge="none")[0]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(two, one, rtol=0, atol=IMAGE_ATOL)


def test_loading_a_checkpoint_leaves_the_global_rng_alone(assets):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loaded = load_pipe(assets)
    assert lf.lorweb_layers(loaded.transformer)
    assert torch.equal(torch.get_rng_state(), before)


def test_reloading_a_checkpoint_into_loaded_layers_leaves_the_global_rng_alone(assets, pipe):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    pipe.load_lora_weights(assets / "lorweb.safetensors")
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------------- training
def test_two_runs_with_one_seed_give_identical_checkpoints_whatever_the_global_rng(runs):
    """Two ``train()`` runs of one config and seed, the second started from other global torch / numpy / python
    RNG states: every file of the run folders holds the same values (weights bit for bit with the same metadata,
    trainer states with the optimizer state, loss log, plot, config.yaml; train_config.json but for ``out``)."""
    assert_same_run(runs["ref"], runs["twin"])


def test_two_runs_with_one_seed_write_byte_identical_weight_files(runs):
    names = sorted(str(p.relative_to(runs["ref"])) for p in runs["ref"].rglob("*.safetensors"))
    assert len(names) == 3
    for name in names:
        assert (runs["ref"] / name).read_bytes() == (runs["twin"] / name).read_bytes(), name


def test_saving_the_same_model_twice_gives_the_same_bytes(tmp_path):
    model = tiny_lorweb_linear_model()
    first, second = tmp_path / "a" / "lorweb.safetensors", tmp_path / "b" / "lorweb.safetensors"
    lf.save_lorweb_weights(model, first)
    lf.save_lorweb_weights(model, second)
    assert safetensors_contents(first)[1] == safetensors_contents(second)[1]  # the same metadata...
    assert first.read_bytes() == second.read_bytes()  # ...in the same bytes


def test_another_seed_gives_other_weights_and_another_loss_curve(runs):
    ref, other = runs["ref"], runs["seed1"]
    wa, wb = (safetensors_contents(run / "lorweb.safetensors")[0] for run in (ref, other))
    assert wa.keys() == wb.keys()
    assert all(not torch.equal(wa[k], wb[k]) for k in wa if k.endswith(("lora_A", "lora_B", "lora_keys")))
    assert (ref / "loss.jsonl").read_text() != (other / "loss.jsonl").read_text()


def test_results_do_not_depend_on_the_listing_order_of_the_data_folder(runs):
    """A copy of the data folder whose files were created in the reverse order, read with every directory listing
    reversed: the same samples in the same order, so the same run (but for the data folder's name)."""
    listed, natural = runs["listing order"]
    assert listed == natural[::-1] != natural  # the premise: the run saw another listing order
    assert_same_run(runs["ref"], runs["listing"], other_data=True)


def test_results_do_not_depend_on_pythonhashseed_or_the_process(runs, fresh_process):
    """The same run in a fresh process with another PYTHONHASHSEED (no set or dict iteration order matters)."""
    root, their_hash = fresh_process
    assert their_hash != hash("lorweb_fast reproducibility")
    assert_same_run(runs["ref"], root / "run")


def test_train_leaves_the_callers_global_torch_rng_alone(runs):
    before, after = runs["twin state"]
    assert torch.equal(after["torch rng"], before["torch rng"])


def test_train_leaves_the_other_global_state_alone(runs):
    """numpy's and Python's RNGs, the thread counts, grad mode, default dtype, matmul precision and the
    deterministic-algorithms flag are as the caller left them."""
    before, after = runs["twin state"]
    assert [k for k in changed(before, after) if k != "torch rng"] == []


def test_a_training_run_does_not_change_a_later_inference(pipe, train_assets, tmp_path):
    """b' of the default generator and of an explicit one, before and after a ``train()`` in the same process (on
    another pipeline, as a notebook would): bit-identical."""
    before = call(pipe, [X0])[0], call(pipe, [X0], [11])[0]
    training.train(tiny_train_config(train_assets, tmp_path / "run", **TRAIN))
    after = call(pipe, [X0])[0], call(pipe, [X0], [11])[0]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ data prepare
def test_data_prepare_is_byte_identical_across_runs_processes_and_listing_orders(relation_src, fresh_process,
                                                                                    tmp_path):
    """``data prepare`` of one Relation252K folder: byte-identical output folders (JPEG strips and b', captions,
    analogy_metadata.json) from two runs, from a copy whose files were created in the reverse order and read with
    every listing reversed, and from a fresh process with another PYTHONHASHSEED; another ``--seed`` samples other
    analogies (the premise that the sample is seeded)."""
    def prepare(src, out, seed=PREPARE["seed"]):
        argv = ["data", "prepare", str(src), str(out), "--max-analogies", str(PREPARE["max_analogies"]),
                "--seed", str(seed), "--quiet"]
        assert cli.main(argv) == 0
        return file_tree(out)

    first = prepare(relation_src, tmp_path / "first")
    assert sum(name.endswith(".jpg") for name, _ in first) == 2 * PREPARE["max_analogies"]
    assert prepare(relation_src, tmp_path / "second") == first
    copy = copy_in_reverse_order(relation_src, tmp_path / "src-reversed")
    natural = os.listdir(copy)
    with reversed_listings():
        assert os.listdir(copy) == natural[::-1] != natural  # the premise: another listing order
        assert prepare(copy, tmp_path / "reversed") == first
    assert file_tree(fresh_process[0] / "prepared") == first
    assert prepare(relation_src, tmp_path / "other-seed", seed=PREPARE["seed"] + 1) != first


# ------------------------------------------------------------------------------------------------ eval generate
def generate_argv(assets, evalset, out, *extra) -> list:
    return ["eval", "generate", "--evalset", str(evalset), "--weights", str(assets / "lorweb.safetensors"),
            "--model", str(assets / "pipe"), "--out", str(out), "--steps", str(STEPS), "--dtype", "fp32",
            "--device", "cpu", "--resolution", "native", "--long-edge", "64", "--batch-size", "2",
            "--pipe-arg", f"max_sequence_length={MSL}", "--quiet", *extra]


def triplet_files(out: Path) -> dict:
    """{<task>/<id>/<file>: bytes} of every triplet's files (a, a', b, b' and prompt)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*/*")) if p.is_file()}


def test_eval_generate_gives_byte_identical_b_prime_across_runs_and_listing_orders(assets, tmp_path, capsys):
    """Two ``eval generate`` runs (batches of 2) into different folders, the second from a copy of the evaluation
    set created in the reverse file order and read with every listing reversed: the same b' bytes (and a, a', b,
    prompt) for every triplet."""
    first_out = tmp_path / "first"
    assert cli.main(generate_argv(assets, assets / "evalset", first_out)) == 0
    first = triplet_files(first_out)
    assert sum(name.endswith("b_prime.png") for name in first) == 4
    copy = copy_in_reverse_order(assets / "evalset", tmp_path / "evalset-reversed")
    with reversed_listings():
        assert cli.main(generate_argv(assets, copy, tmp_path / "second")) == 0
    assert triplet_files(tmp_path / "second") == first
    assert "4 generated" in capsys.readouterr().out


def test_eval_generate_resume_after_deleting_outputs_regenerates_the_same_bytes(assets, tmp_path, capsys):
    """A finished run whose second batch lost its outputs (one b', and a whole triplet folder): the same command
    regenerates exactly those, byte-identical to the uninterrupted run, and leaves the others untouched."""
    out = tmp_path / "runs"
    assert cli.main(generate_argv(assets, assets / "evalset", out)) == 0
    want = triplet_files(out)
    stamps = {k: (out / k).stat().st_mtime_ns for k in want if k.startswith("flip/")}
    (out / "swap" / "000" / "b_prime.png").unlink()
    shutil.rmtree(out / "swap" / "001")
    capsys.readouterr()
    assert cli.main(generate_argv(assets, assets / "evalset", out)) == 0
    assert "2 generated, 2 already done" in capsys.readouterr().out
    assert triplet_files(out) == want
    assert {k: (out / k).stat().st_mtime_ns for k in stamps} == stamps
