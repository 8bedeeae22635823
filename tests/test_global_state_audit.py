"""Global-state hygiene audit: what a torch / diffusers / peft user expects of a library, namely that calling it leaves
process-wide state as it found it (after a success and after a failure), and that it works under the common global
settings (another default dtype, deterministic algorithms, grad mode off, inference mode, anomaly detection).

State compared (``global_state``): torch's default dtype and device, grad / inference / anomaly / forward-AD modes,
deterministic algorithms (and warn-only), float32 matmul precision, ``torch.backends`` flags (cuDNN benchmark /
deterministic / enabled and the TF32 switches of torch's fp32_precision API (which the legacy allow_tf32 flags set
too; reading those raises once a process has used the new API), CUDA matmul TF32 and reduced-precision reductions, the
four SDPA backends, mkldnn), the CPU autocast state, torch's / numpy's / Python's global RNG states,
``warnings.filters``, ``showwarning`` / ``formatwarning``, the level / handlers / propagation of the root, diffusers,
transformers, accelerate and lorweb_fast loggers and ``logging.disable``, diffusers' / transformers' verbosity and
progress bars, huggingface_hub's bars, ``os.environ``, the working directory, ``sys.path``, ``torch._dynamo.config``,
torch's intra- and inter-op thread counts, torch's global module hooks and matplotlib's rcParams. Entry points: the
functional ops and ``LoRWeBLinear`` (every backend; the Triton interpreter in a subprocess), the model-level API
(inject / remove / set_query / merged / save / load / plot), the FLUX.1-Kontext pipeline, training, the evaluation
metrics, data preparation and the in-process CLI, on tiny local models (nothing downloads).

The defects the audit found (LPIPS drawing from the caller's RNG and following the default dtype, the demo builders
reseeding torch's RNG, training draws in the default dtype, ``from_pretrained(dtype=None)`` under a float64 default,
``train`` under ``no_grad``) are fixed and pinned here. The cuDNN-SDPA item ("training
toggles cuDNN SDPA process-wide"): only on CUDA devices, for the duration of the run (training.py, ``_train``), and
given back in its ``finally`` on success and failure; pinned here on CPU (untouched during the run, the caller's
flags kept after).
"""

import contextlib
import io
import logging
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo.config

import lorweb_fast as lf
from lorweb_fast import cli, data, demo, flux, training
from lorweb_fast.evaluation import metrics as M
from lorweb_fast.evaluation import score as S
from lorweb_fast.evaluation import tiny
from lorweb_fast.testing import (build_tiny_lorweb_assets, one_intra_op_thread, pair_config, pair_query,
                                 random_analogy, random_problem, relation252k_folder, tiny_pair_model,
                                 tiny_train_config, tiny_training_assets)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
# imported now: their own import-time configuration (accelerate's lr_scheduler filter, diffusers' and transformers'
# logger handlers, scipy's filters) is theirs, not a call of ours
for _name in ("scipy", "matplotlib.figure", "lpips", "torchvision", "huggingface_hub.utils.tqdm",
              "diffusers.utils.logging", "transformers.utils.logging", "safetensors.torch"):
    with contextlib.suppress(ImportError):
        __import__(_name)

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
LOGGERS = ("", "diffusers", "transformers", "accelerate", "lorweb_fast", "lorweb_fast.training")
#: the default dtypes a user sets around building and using models
OTHER_DEFAULTS = [torch.float64, torch.bfloat16]


# ------------------------------------------------------------------------------------------------------- helpers
def _logger_state(name: str) -> tuple:
    lg = logging.getLogger(name)
    return lg.level, tuple(lg.handlers), lg.propagate, lg.disabled


def _library_switches() -> tuple:
    import importlib

    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (``utils.tqdm`` is the class)
    return (dl.get_verbosity(), tl.get_verbosity(), dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled(),
            hub_tqdm.are_progress_bars_disabled(), dict(getattr(hub_tqdm, "progress_bar_states", {}) or {}))


def _matplotlib_state():
    mpl = sys.modules.get("matplotlib")
    if mpl is None:
        return None
    pyplot = sys.modules.get("matplotlib.pyplot")
    # read as a plain dict: rcParams["backend"] would resolve the automatic backend (a change made by the reading)
    return repr(sorted(dict.items(mpl.rcParams))), None if pyplot is None else tuple(pyplot.get_fignums())


def global_state() -> dict:
    """The process-wide state a library call could change behind its caller's back (see the module docstring)."""
    b = torch.backends
    np_state = np.random.get_state()
    return {
        "default dtype": torch.get_default_dtype(), "default device": str(torch.get_default_device()),
        "grad": torch.is_grad_enabled(), "inference mode": torch.is_inference_mode_enabled(),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "forward AD": torch._C._is_fwd_grad_enabled(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "matmul precision": torch.get_float32_matmul_precision(),
        "cudnn": (b.cudnn.benchmark, b.cudnn.deterministic,
                  b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cudnn.enabled),
        "cuda matmul": (b.fp32_precision, b.cuda.matmul.fp32_precision,
                        b.cuda.matmul.allow_fp16_reduced_precision_reduction,
                        b.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "sdpa": (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(),
                 b.cuda.cudnn_sdp_enabled()),
        "mkldnn": b.mkldnn.enabled,
        "autocast cpu": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "torch rng": torch.get_rng_state().numpy().tobytes(),
        "numpy rng": (np_state[0], np_state[1].tobytes(), *np_state[2:]),
        "python rng": random.getstate(),
        "warning filters": list(warnings.filters),
        "warning display": (warnings.showwarning, warnings.formatwarning),
        "loggers": {name: _logger_state(name) for name in LOGGERS},
        "logging.disable": logging.root.manager.disable,
        "library verbosity and bars": _library_switches(),
        "environ": dict(os.environ), "cwd": os.getcwd(), "sys.path": list(sys.path),
        "dynamo config": repr(sorted(torch._dynamo.config.get_config_copy().items())),
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "global module hooks": tuple(len(getattr(torch.nn.modules.module, t)) for t in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks", "_global_module_registration_hooks",
            "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")),
        "matplotlib": _matplotlib_state(),
    }


def changed(before: dict, after: dict, ignore=()) -> list:
    return [key for key in before if key not in ignore and before[key] != after[key]]


def assert_state_kept(fn, *, raises=None, ignore=()):
    """Run ``fn()`` (expecting ``raises`` when given) and assert that no global state changed but ``ignore``;
    returns fn's result (None when it raised)."""
    before = global_state()
    result = None
    if raises is None:
        result = fn()
    else:
        with pytest.raises(raises):
            fn()
    after = global_state()
    assert changed(before, after, ignore) == [], {k: (before[k], after[k]) for k in changed(before, after, ignore)}
    return result


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


#: the global settings under which a training-free call must give the same result
SETTINGS = {"deterministic": deterministic, "anomaly": lambda: torch.autograd.set_detect_anomaly(True),
            "no_grad": torch.no_grad, "grad off globally": lambda: torch.set_grad_enabled(False),
            "inference_mode": torch.inference_mode,
            "float64 default": lambda: default_dtype(torch.float64),
            "bfloat16 default": lambda: default_dtype(torch.bfloat16)}


def quiet(fn):
    """fn() with stdout / stderr captured (the in-process CLI prints)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


def same(a, b) -> bool:
    """Bit-equal nested results: tensors (dtype too), arrays, dicts, tuples / lists, other values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for the module (bit-exact comparisons; the tiny models run faster)."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def lorweb_assets(tmp_path_factory):
    """A tiny saved Kontext pipeline, tiny CLIP and LoRWeB checkpoint; a folder evaluation set and a runs folder."""
    root = build_tiny_lorweb_assets(tmp_path_factory.mktemp("lorweb"))
    tiny.make_folder_evalset(root / "evalset", tasks=("flip",), per_task=1, size=(32, 32))
    tiny.make_runs_folder(root / "runs", root / "evalset", seed=1)
    tiny.save_random_lpips_backbone(root / "torch_home")
    return root


@pytest.fixture(scope="module")
def pipe(lorweb_assets):
    p = flux.LoRWeBKontextPipeline.from_pretrained(lorweb_assets / "pipe", lorweb_assets / "lorweb.safetensors",
                                                   resolution="native", long_edge=64)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("train"), 6)


@pytest.fixture(scope="module")
def reference_weights(train_assets, tmp_path_factory):
    """The weights of a 2-step run under the float32 default dtype, grad on."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("ref") / "run"
    training.train(tiny_train_config(train_assets, out, steps=2, checkpoint_every=2))
    return load_file(str(out / "lorweb.safetensors"))


@pytest.fixture()
def torch_home(lorweb_assets, monkeypatch):
    """TORCH_HOME at the random LPIPS backbone (set before any snapshot of os.environ)."""
    monkeypatch.setenv("TORCH_HOME", str(lorweb_assets / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


ANALOGY = random_analogy(0)


def b_prime(pipe, **kwargs):
    a, a_prime, b = ANALOGY
    kwargs.setdefault("generator", torch.Generator().manual_seed(1))
    return pipe(a, a_prime, b, "flip", num_inference_steps=2, output_type="np", max_sequence_length=MSL,
                progress=False, **kwargs)[0]


# --------------------------------------------------------------------------------------- layer and functional ops
@pytest.mark.parametrize("backend", [None, *lf.BACKENDS])
def test_layer_forward_backward_leaves_global_state_alone_for_every_backend(backend):
    """LoRWeBLinear forward + backward with each backend (torch and None run on CPU; triton without
    TRITON_INTERPRET=1 and cuda without a GPU raise BackendUnavailableError): no global state changes, the global
    RNG included, whether the call succeeds or fails."""
    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(torch.nn.Linear(6, 5), num_loras=3, rank=2, key_dim=4, query_dim=6, backend=backend)
    coeffs = torch.softmax(torch.randn(2, 3), -1)
    x = torch.randn(2, 4, 6, requires_grad=True)

    def step():
        layer.set_coefficients(coeffs)
        layer(x).sum().backward()

    runnable = lf.ops._unavailable_reason(backend or "torch", x.device) is None
    assert_state_kept(step, raises=None if runnable else lf.BackendUnavailableError)


def test_layer_forward_without_coefficients_fails_leaving_global_state_alone():
    """A forward before any coefficients were set raises, changing nothing process-wide."""
    layer = lf.LoRWeBLinear(torch.nn.Linear(6, 5), num_loras=3, rank=2, key_dim=4, query_dim=6)
    x = torch.randn(2, 6)
    assert_state_kept(lambda: layer(x), raises=RuntimeError)


def test_functional_ops_leave_global_state_alone_on_success_and_error():
    """lorweb_linear, mixed_lora_delta and compute_coefficients with autograd, and a call with a wrong coefficient
    shape (ValueError): no global state changes."""
    p = random_problem(2, 3, 6, 5, 3, 2, torch.float32)
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")}
    query, to_q, keys = (torch.randn(*s, requires_grad=True) for s in ((2, 6), (4, 6), (3, 4)))

    def calls():
        lf.lorweb_linear(*(leaves[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")), 0.5).sum() \
            .backward()
        lf.mixed_lora_delta(leaves["x"], leaves["lora_a"], leaves["lora_b"], leaves["coeffs"], 0.5).sum().backward()
        lf.compute_coefficients(query, to_q, keys, heads=2, activation="tanh", reduce="sum").sum().backward()
        lf.backend_status()

    assert_state_kept(calls)
    assert_state_kept(lambda: lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                                               p["coeffs"][:1], 0.5), raises=ValueError)


TRITON_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import lorweb_fast as lf
    from lorweb_fast.testing import random_problem
    sys.path.insert(0, sys.argv[1])
    from test_global_state_audit import changed, deterministic, global_state, same
    torch.set_num_threads(1)
    p = random_problem(2, 5, 17, 19, 3, 2, torch.float32)
    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(torch.nn.Linear(17, 19), num_loras=3, rank=2, key_dim=4, query_dim=6, backend="triton")
    with torch.no_grad():
        layer.lora_B.copy_(p["lora_b"])
    def run():
        leaves = {k: p[k].clone().requires_grad_(True) for k in ("x", "lora_a", "lora_b", "coeffs")}
        y = lf.lorweb_linear(leaves["x"], p["weight"], p["bias"], leaves["lora_a"], leaves["lora_b"],
                             leaves["coeffs"], 0.5, backend="triton")
        y.sum().backward()
        layer.set_coefficients(p["coeffs"])
        z = layer(leaves["x"])
        z.sum().backward()
        grads = {n: t.grad.clone() for n, t in layer.named_parameters() if t.grad is not None}
        layer.zero_grad(set_to_none=True)
        return y.detach(), z.detach(), {k: t.grad for k, t in leaves.items()}, grads
    ref = run()  # warm-up: triton's own first-use setup is not a call of ours
    before = global_state()
    again = run()
    leaks = changed(before, global_state())
    with deterministic():
        det = run()
    with torch.autograd.set_detect_anomaly(True):
        anomaly = run()
    print("RESULT", leaks, same(ref, again), same(ref, det), same(ref, anomaly))
""")


def test_triton_interpreter_backend_leaves_global_state_alone_and_runs_under_global_settings(tmp_path):
    """backend='triton' through Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1 set before triton is
    imported): forward + backward of the functional op and of a layer change no global state, and run (bit-equal)
    under torch.use_deterministic_algorithms(True) (the kernels use no atomics) and set_detect_anomaly(True)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(Path(__file__).parent)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 and "unavailable" in proc.stderr:
        pytest.skip(f"the Triton interpreter cannot run here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert lines[0] == "RESULT [] True True True", lines[0]


# ----------------------------------------------------------------------------------------------- model-level API
def test_model_level_api_leaves_global_state_alone(tmp_path):
    """set_query (with and without autograd) + forward/backward, get/set strength, merged() with every strategy,
    save, load into a fresh model and again into its loaded layers, remove, plot_coefficients, clear_query: nothing
    process-wide changes, torch's global RNG included (the load builds its layers without drawing values)."""
    m = tiny_pair_model()
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    q2, q1, x2 = pair_query(2), pair_query(1, seed=1), torch.randn(2, 6)
    path = tmp_path / "w.safetensors"

    def calls():
        m.train()
        lf.set_query(m, q2)
        m(x2).sum().backward()
        m.eval()
        with torch.no_grad():
            lf.set_query(m, q1)
            lf.set_lorweb_scale(m, 0.5)
            lf.get_coefficients(m)
            for strategy in ("full", "offload", "jit"):
                with lf.merged(m, strategy=strategy):
                    m(x2[:1])
        lf.set_lorweb_scale(m, 1.0)
        lf.plot_coefficients(m, tmp_path / "c.png")
        lf.save_lorweb_weights(m, path)
        lf.load_lorweb_weights(fresh, path)
        lf.load_lorweb_weights(fresh, path)
        lf.lorweb_state_dict(fresh)
        lf.set_backend(fresh, "torch")
        lf.clear_query(m)
        lf.remove_lorweb(fresh)

    assert_state_kept(calls)


def test_model_level_failures_leave_global_state_alone(tmp_path):
    """Failing calls: set_query with a wrong query width, merged('full') of two analogies, an exception inside a
    merged() block, a checkpoint of the wrong shape, a missing checkpoint, inject with a pattern matching nothing,
    a second inject: no global state changes, torch's RNG included."""
    m = tiny_pair_model()
    lf.save_lorweb_weights(m, tmp_path / "w.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    bad_query, q2, q1 = torch.randn(2, 5), pair_query(2), pair_query(1)

    def merged_two():
        with torch.no_grad():
            lf.set_query(m, q2)
            with lf.merged(m, strategy="full"):
                pass

    def raising_inside_merged():
        with torch.no_grad():
            lf.set_query(m, q1)
        with lf.merged(m):
            raise KeyError("inside")

    for fn, error in ((lambda: lf.set_query(m, bad_query), ValueError), (merged_two, ValueError),
                      (raising_inside_merged, KeyError),
                      (lambda: lf.load_lorweb_weights(other, tmp_path / "w.safetensors"), lf.LoRWeBCheckpointError),
                      (lambda: lf.load_lorweb_weights(other, tmp_path / "nope.safetensors"), FileNotFoundError),
                      (lambda: lf.inject_lorweb(other, pair_config(target_modules="zzz")), ValueError),
                      (lambda: lf.inject_lorweb(m, pair_config()), ValueError)):
        assert_state_kept(fn, raises=error)


def test_inject_draws_only_its_documented_initial_values():
    """inject_lorweb changes nothing process-wide but torch's RNG (it draws the initial keys / lora_A, as any module
    construction does, and as peft's injection does)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    assert_state_kept(lambda: lf.inject_lorweb(model, pair_config()), ignore=("torch rng",))


# ------------------------------------------------------------------------------------- under common global settings
@pytest.mark.parametrize("dtype", OTHER_DEFAULTS + [torch.float16], ids=str)
def test_layer_tensors_follow_the_base_layer_not_the_default_dtype(dtype):
    """Under torch.set_default_dtype(dtype), a LoRWeBLinear over an explicit fp32 nn.Linear holds fp32 LoRWeB tensors
    with the values it gets under the fp32 default (same seed), and one over a base built in the default dtype holds
    that dtype (the base's, as documented; peft would upcast to fp32, nn.Linear follows the default)."""
    def build():
        torch.manual_seed(3)
        return lf.LoRWeBLinear(torch.nn.Linear(6, 5, dtype=torch.float32), num_loras=3, rank=2, key_dim=4,
                               query_dim=6)

    ref = {k: v.clone() for k, v in build().state_dict().items()}
    with default_dtype(dtype):
        got = build().state_dict()
        in_default = lf.LoRWeBLinear(torch.nn.Linear(6, 5), num_loras=3, rank=2, key_dim=4, query_dim=6)
    assert same(ref, dict(got))
    assert {t.dtype for t in in_default.lorweb_tensors().values()} == {dtype}


def _model_results(m, q, x):
    """Forward, x / parameter gradients, coefficients, and merged vs unmerged outputs of ``m`` for query ``q``."""
    m.train()
    lf.set_query(m, q)
    xx = x.clone().requires_grad_(True)
    y = m(xx)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for p in m.parameters():
        p.grad = None
    coeffs = lf.get_coefficients(m)
    lf.clear_query(m)
    m.eval()
    with torch.no_grad():
        lf.set_query(m, q[:1])
        plain = m(x[:1])
        merged = {}
        for strategy in ("full", "offload", "jit"):
            with lf.merged(m, strategy=strategy):
                merged[strategy] = m(x[:1])
        lf.clear_query(m)
    return y.detach(), xx.grad, grads, coeffs, plain, merged


@pytest.mark.parametrize("setting", ["deterministic", "anomaly", "float64 default", "bfloat16 default"])
def test_fp32_model_gives_bit_identical_results_under_global_settings(setting):
    """An fp32 model: forward, backward (input and LoRWeB gradients), coefficients and every merge strategy give
    bit-identical results under deterministic algorithms (no error: nothing nondeterministic is used), anomaly
    detection during the backward, and a float64 / bfloat16 default dtype (no factory call follows the default)."""
    m, q, x = tiny_pair_model(), pair_query(2), torch.randn(2, 6)
    ref = _model_results(m, q, x)
    with SETTINGS[setting]():
        got = _model_results(m, q, x)
    assert same(ref, got)


@pytest.mark.parametrize("setting", ["no_grad", "grad off globally", "inference_mode", "deterministic",
                                     "float64 default", "bfloat16 default"])
def test_training_free_model_calls_work_under_global_settings(setting, tmp_path):
    """set_query + forward, merged(), save and load into a fresh model under each setting give the results of the
    plain calls; afterwards (setting gone) the model still trains: set_query with autograd and a backward work."""
    m, q, x = tiny_pair_model(), pair_query(1), torch.randn(1, 6)

    def calls(tag):
        with torch.no_grad():
            lf.set_query(m, q)
            out = m(x).clone()
            with lf.merged(m):
                merged = m(x).clone()
        lf.save_lorweb_weights(m, tmp_path / f"{tag}.safetensors")
        fresh = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float32),
                                    torch.nn.Linear(5, 4, dtype=torch.float32))
        lf.load_lorweb_weights(fresh, tmp_path / f"{tag}.safetensors")
        lf.clear_query(m)
        return out, merged, {k: v.clone() for k, v in lf.lorweb_state_dict(fresh).items()}

    with torch.no_grad():
        ref = calls("ref")
    with SETTINGS[setting]():
        got = calls("got")
    assert same(ref, got)
    m.train()
    lf.set_query(m, q)
    m(x).sum().backward()
    assert all(layer.lora_A.grad is not None for layer in lf.lorweb_layers(m).values())


# --------------------------------------------------------------------------------------------- pipeline (flux.py)
def test_pipeline_calls_leave_global_state_alone(pipe):
    """Pipeline calls (explicit generator, the default seed-50 generator, a progress bar shown, merge full / jit /
    offload / none), set_analogy, fuse_lora / unfuse_lora, the encoder and the grid helpers: nothing process-wide
    changes, torch's global RNG included (every draw comes from the call's generator)."""
    a, a_prime, b = ANALOGY

    def calls():
        b_prime(pipe)
        b_prime(pipe, generator=None)
        pipe(a, a_prime, b, "flip", num_inference_steps=1, output_type="np", max_sequence_length=MSL, progress=True)
        for merge in ("full", "jit", "offload", "none"):
            b_prime(pipe, merge=merge)
        pipe.set_analogy(a, a_prime, b)
        pipe.fuse_lora()
        pipe.unfuse_lora()
        pipe.encoder(a, a_prime, b)
        flux.official_control_grid(a, a_prime, b)

    quiet(lambda: assert_state_kept(calls))


def test_pipeline_failures_leave_global_state_alone(pipe, lorweb_assets):
    """A refused argument, a missing image, a KeyboardInterrupt from a step callback, a missing checkpoint in
    from_pretrained: no global state changes."""
    a, a_prime, b = ANALOGY

    def interrupt(*args):
        raise KeyboardInterrupt

    for fn, error in ((lambda: b_prime(pipe, guidance_scale=float("nan")), ValueError),
                      (lambda: pipe(a, a_prime, None, "flip", progress=False), TypeError),
                      (lambda: b_prime(pipe, callback_on_step_end=interrupt), KeyboardInterrupt),
                      (lambda: flux.LoRWeBKontextPipeline.from_pretrained(
                          lorweb_assets / "pipe", lorweb_assets / "nope.safetensors"), FileNotFoundError)):
        assert_state_kept(fn, raises=error)


def test_loading_the_pipeline_leaves_global_state_alone(lorweb_assets):
    """LoRWeBKontextPipeline.from_pretrained and the AnalogyEncoder change nothing process-wide (torch's RNG
    included: nothing is drawn while loading)."""
    quiet(lambda: assert_state_kept(lambda: flux.LoRWeBKontextPipeline.from_pretrained(
        lorweb_assets / "pipe", lorweb_assets / "lorweb.safetensors", resolution="native", long_edge=64)))
    assert_state_kept(lambda: flux.AnalogyEncoder(lorweb_assets / "clip"))


@pytest.mark.parametrize("setting", ["deterministic", "anomaly", "no_grad", "inference_mode", "grad off globally",
                                     "float64 default", "bfloat16 default"])
def test_pipeline_gives_the_same_b_prime_under_global_settings(pipe, setting):
    """An fp32 pipeline gives bit-identical b' under each global setting (no error under deterministic
    algorithms, nothing computed in the default dtype)."""
    ref = b_prime(pipe)
    with SETTINGS[setting]():
        got = b_prime(pipe)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", OTHER_DEFAULTS, ids=str)
def test_encoder_loads_in_fp32_whatever_the_default_dtype(lorweb_assets, dtype):
    """AnalogyEncoder (dtype float32 by default) loads and computes the same query under another default dtype."""
    a, a_prime, b = ANALOGY
    ref = flux.AnalogyEncoder(lorweb_assets / "clip")(a, a_prime, b)
    with default_dtype(dtype):
        got = flux.AnalogyEncoder(lorweb_assets / "clip")(a, a_prime, b)
    assert same(ref, got)


def test_pipeline_loaded_without_dtype_works_under_a_float64_default(lorweb_assets, pipe):
    """from_pretrained without a dtype under torch.set_default_dtype(torch.float64): the documented fp32 pipeline,
    whose call gives the b' of the one loaded under the fp32 default."""
    ref = b_prime(pipe)
    with default_dtype(torch.float64):
        loaded = quiet(lambda: flux.LoRWeBKontextPipeline.from_pretrained(
            lorweb_assets / "pipe", lorweb_assets / "lorweb.safetensors", resolution="native", long_edge=64))
        got = b_prime(loaded)
    assert loaded.dtype == torch.float32
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------------- evaluation
def test_evaluation_metrics_leave_global_state_alone(lorweb_assets, torch_home, tmp_path):
    """ClipDirectional and LPIPSDistance built and called, score() on a runs folder, and score() failing on a
    missing runs folder: nothing process-wide changes (torch's global RNG included)."""
    a, a_prime, b = ANALOGY

    def calls():
        clip = M.ClipDirectional(lorweb_assets / "clip")
        clip([(a, a_prime, b, b)])
        M.LPIPSDistance()(b, a_prime)
        S.score({"ours": lorweb_assets / "runs"}, tmp_path / "report", metrics=["clip_dir", "lpips"],
                encoder=str(lorweb_assets / "clip"), progress=False)

    assert_state_kept(calls)
    assert_state_kept(lambda: S.score({"ours": tmp_path / "nope"}, tmp_path / "r2", metrics=["clip_dir"],
                                      encoder=str(lorweb_assets / "clip"), progress=False), raises=ValueError)


def test_clip_directional_leaves_the_global_rng_alone(lorweb_assets):
    """Loading the CLIP metric draws nothing from torch's global RNG (transformers' loader)."""
    assert_state_kept(lambda: M.ClipDirectional(lorweb_assets / "clip"))


def test_lpips_distance_leaves_the_global_rng_alone(torch_home):
    """Building the LPIPS metric is a load: it leaves torch's global RNG as found (as load_lorweb_weights and
    diffusers' / transformers' loaders do)."""
    assert_state_kept(lambda: M.LPIPSDistance())


@pytest.mark.parametrize("dtype", OTHER_DEFAULTS, ids=str)
def test_lpips_distance_is_independent_of_the_default_dtype(torch_home, dtype):
    """LPIPS(b, b') computed by a metric built under another default dtype equals the fp32 one (fp32 networks)."""
    _, a_prime, b = ANALOGY
    ref = M.LPIPSDistance()(b, a_prime)
    with default_dtype(dtype):
        metric = M.LPIPSDistance()
        got = metric(b, a_prime)
    assert {p.dtype for p in metric.model.parameters()} == {torch.float32}
    assert got == ref


def test_eval_commands_in_process_leave_global_state_alone(lorweb_assets, torch_home, tmp_path):
    """`eval generate` (success and a missing evaluation set) and `eval score` run through cli.main: nothing
    process-wide changes (warning display, loggers, bars given back; torch's RNG included)."""
    gen = ["eval", "generate", "--evalset", str(lorweb_assets / "evalset"), "--weights",
           str(lorweb_assets / "lorweb.safetensors"), "--model", str(lorweb_assets / "pipe"), "--steps", "1",
           "--dtype", "fp32", "--device", "cpu", "--resolution", "native", "--long-edge", "64", "--pipe-arg",
           f"max_sequence_length={MSL}", "--quiet"]
    assert quiet(lambda: assert_state_kept(lambda: cli.main([*gen, "--out", str(tmp_path / "gen")]))) == 0
    bad = [*gen, "--out", str(tmp_path / "gen2")]
    bad[bad.index("--evalset") + 1] = str(tmp_path / "nope")
    assert quiet(lambda: assert_state_kept(lambda: cli.main(bad))) == 2
    score = ["eval", "score", "--runs", str(lorweb_assets / "runs"), "--encoder", str(lorweb_assets / "clip"),
             "--out", str(tmp_path / "report"), "--device", "cpu"]
    assert quiet(lambda: assert_state_kept(lambda: cli.main(score))) == 0


# ---------------------------------------------------------------------------------------------- data and CLI
def test_data_preparation_and_checks_leave_global_state_alone(tmp_path):
    """prepare_relation252k, check_folder, AnalogyFolder and their command-line forms (success and a missing source
    folder): nothing process-wide changes (their warning filters are scoped, the thread pools end)."""
    src = tmp_path / "rel"
    relation252k_folder(src, {"c1": [(16, 16), (16, 16)], "c2": [(16, 16), (16, 16)]}, seed=0)

    def calls():
        data.prepare_relation252k(src, tmp_path / "prep", progress=False)
        data.check_folder(tmp_path / "prep", progress=False)
        data.AnalogyFolder(tmp_path / "prep")
        assert cli.main(["data", "prepare", str(src), str(tmp_path / "prep2"), "--quiet"]) == 0
        assert cli.main(["data", "check", str(tmp_path / "prep2"), "--quiet"]) == 0
        assert cli.main(["data", "check", str(tmp_path / "nope")]) == 2

    quiet(lambda: assert_state_kept(calls))
    assert_state_kept(lambda: data.prepare_relation252k(tmp_path / "nope", tmp_path / "p3", progress=False),
                      raises=data.AnalogyDataError)


def test_infer_command_leaves_global_state_alone(lorweb_assets, tmp_path):
    """`lorweb-fast infer` in-process (success, a missing weights file, a usage error): nothing process-wide
    changes, torch's RNG included (its generator is its own)."""
    ev = lorweb_assets / "evalset" / "flip" / "000"
    argv = ["infer", "--model", str(lorweb_assets / "pipe"), "--weights", str(lorweb_assets / "lorweb.safetensors"),
            "--a", str(ev / "a.png"), "--a-prime", str(ev / "a_prime.png"), "--b", str(ev / "b.png"), "--prompt",
            "flip", "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--resolution", "native", "--long-edge",
            "64", "--pipe-arg", f"max_sequence_length={MSL}", "--quiet", "--out", str(tmp_path / "o.png")]
    assert quiet(lambda: assert_state_kept(lambda: cli.main(argv))) == 0
    missing = [str(tmp_path / "nope.safetensors") if a.endswith("lorweb.safetensors") else a for a in argv]
    assert quiet(lambda: assert_state_kept(lambda: cli.main(missing))) == 2
    quiet(lambda: assert_state_kept(lambda: cli.main(["infer", "--out", "x.png"]), raises=SystemExit))


def test_demo_command_leaves_the_global_rng_alone(tmp_path):
    """`lorweb-fast demo` in-process changes nothing process-wide, torch's RNG included."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--inference-steps", "1", "--samples", "4",
            "--quiet"]
    assert quiet(lambda: assert_state_kept(lambda: cli.main(argv))) == 0


# ------------------------------------------------------------------------------------------------------ training
def test_train_leaves_global_state_alone_on_success_and_failure(train_assets, tmp_path):
    """train() succeeding, failing at its start (a missing data folder) and failing mid-run (a step callback that
    raises), and `lorweb-fast train` in-process: nothing process-wide changes, torch's RNG included (the initial
    basis is drawn under global_rng_kept)."""
    def failing_callback(step, loss):
        raise RuntimeError("stop")

    assert_state_kept(lambda: training.train(tiny_train_config(train_assets, tmp_path / "ok", steps=2)))
    assert_state_kept(lambda: training.train(tiny_train_config(train_assets, tmp_path / "bad", steps=2,
                                                               data=str(tmp_path / "nope"))),
                      raises=data.AnalogyDataError)
    assert_state_kept(lambda: training.train(tiny_train_config(train_assets, tmp_path / "mid", steps=2),
                                             step_callback=failing_callback), raises=RuntimeError)
    argv = ["train", "--data", str(train_assets / "data"), "--out", str(tmp_path / "cli"), "--model",
            str(train_assets / "pipe"), "--encoder", str(train_assets / "clip"), "--steps", "1", "--batch-size", "2",
            "--mixed-precision", "no", "--long-edge", "64", "--num-loras", "2", "--rank", "1", "--key-dim", "4",
            "--num-workers", "0", "--max-sequence-length", str(MSL), "--quiet"]
    assert quiet(lambda: assert_state_kept(lambda: cli.main(argv))) == 0


@contextlib.contextmanager
def sdpa_flags(flash: bool, mem_efficient: bool, math: bool, cudnn: bool):
    c = torch.backends.cuda
    before = (c.flash_sdp_enabled(), c.mem_efficient_sdp_enabled(), c.math_sdp_enabled(), c.cudnn_sdp_enabled())
    for enable, value in zip((c.enable_flash_sdp, c.enable_mem_efficient_sdp, c.enable_math_sdp, c.enable_cudnn_sdp),
                             (flash, mem_efficient, math, cudnn)):
        enable(value)
    try:
        yield
    finally:
        for enable, value in zip((c.enable_flash_sdp, c.enable_mem_efficient_sdp, c.enable_math_sdp,
                                  c.enable_cudnn_sdp), before):
            enable(value)


def _sdpa_now() -> tuple:
    c = torch.backends.cuda
    return c.flash_sdp_enabled(), c.mem_efficient_sdp_enabled(), c.math_sdp_enabled(), c.cudnn_sdp_enabled()


@pytest.mark.parametrize("flags", [(False, True, True, False), (True, False, True, True)])
def test_train_gives_back_the_callers_sdpa_flags(train_assets, tmp_path, flags):
    """The cuDNN-SDPA item: the caller's SDPA backend flags (cuDNN off or on, flash / efficient off) are as the caller
    set them after train() returns and after it fails mid-run; on a CPU run they are not touched during the run
    either (the step callback sees them). On CUDA the trainer turns cuDNN SDPA off for the run (process-wide, a
    documented workaround, --cudnn-attention keeps it) and gives it back in its finally."""
    seen = []

    def record(step, loss):
        seen.append(_sdpa_now())

    def failing(step, loss):
        raise RuntimeError("stop")

    with sdpa_flags(*flags):
        training.train(tiny_train_config(train_assets, tmp_path / "ok", steps=2), step_callback=record)
        assert _sdpa_now() == flags
        with pytest.raises(RuntimeError, match="stop"):
            training.train(tiny_train_config(train_assets, tmp_path / "fail", steps=2), step_callback=failing)
        assert _sdpa_now() == flags
    if not torch.cuda.is_available():
        assert seen == [flags, flags]


@pytest.mark.parametrize("setting", ["deterministic", "anomaly"])
def test_train_runs_and_gives_the_same_weights_under_global_settings(train_assets, reference_weights, tmp_path,
                                                                     setting):
    """train() under deterministic algorithms (no error) and with anomaly detection on gives the weights of the
    plain run, bit for bit."""
    from safetensors.torch import load_file

    with SETTINGS[setting]():
        training.train(tiny_train_config(train_assets, tmp_path / "run", steps=2, checkpoint_every=2))
    assert same(reference_weights, load_file(str(tmp_path / "run" / "lorweb.safetensors")))


@pytest.mark.parametrize("dtype", OTHER_DEFAULTS, ids=str)
@pytest.mark.parametrize("timestep_type", ["weighted", "linear"])
def test_training_timesteps_are_float32_whatever_the_default_dtype(dtype, timestep_type):
    """sample_timesteps returns the documented float32 (t, weight), the values drawn under the fp32 default."""
    from lorweb_fast.testing import small_train_config

    cfg = small_train_config("out", timestep_type=timestep_type)
    ref = training.sample_timesteps(cfg, 8, torch.Generator().manual_seed(0))
    with default_dtype(dtype):
        got = training.sample_timesteps(cfg, 8, torch.Generator().manual_seed(0))
        grid = training.official_timesteps()
    assert same(ref, got)
    assert grid.dtype == torch.float32 and grid[:3].tolist() == [1000.0, 999.0, 998.0]


def test_train_gives_the_same_weights_under_a_float64_default(train_assets, reference_weights, tmp_path):
    """mixed_precision='no' (fp32) training with one config and seed gives the same weights whatever torch's default
    dtype (the models are loaded in fp32 explicitly; every draw must be too)."""
    from safetensors.torch import load_file

    with default_dtype(torch.float64):
        training.train(tiny_train_config(train_assets, tmp_path / "run", steps=2, checkpoint_every=2))
    assert same(reference_weights, load_file(str(tmp_path / "run" / "lorweb.safetensors")))


def test_train_under_no_grad_trains_or_refuses_before_writing(train_assets, reference_weights, tmp_path):
    """train() called inside torch.no_grad() (a notebook cell that turned grad off) either trains as usual (autograd
    on for its own steps, torch.enable_grad(), as Lightning's fit does) or refuses up front, naming grad mode,
    before writing anything into cfg.out."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    with torch.no_grad():
        try:
            training.train(tiny_train_config(train_assets, out, steps=2, checkpoint_every=2))
        except (RuntimeError, ValueError) as exc:
            assert "no_grad" in str(exc) or "grad mode" in str(exc), exc
            assert not out.exists() or not any(out.iterdir())
            return
    assert same(reference_weights, load_file(str(out / "lorweb.safetensors")))
