"""Audit: the diffusers 0.42.1 inference features a demanding diffusers user turns on together with a LoRWeB pipeline,
which the rest of the suite never touches.

Audited: the denoiser caches (``transformer.enable_cache`` with FirstBlockCache, PyramidAttentionBroadcast,
FasterCache, TaylorSeer, MagCache; ``disable_cache``) under every merge strategy of ``LoRWeBKontextPipeline`` and
``fuse_lora``, across analogies and after a failed generation; the attention backends (``set_attention_backend``,
the ``attention_backend`` context manager); ``fuse_qkv_projections`` with LoRWeB layers outside the attention or only
in part of it; VAE tiling and slicing; ``pipe.to(torch.bfloat16)`` after injection; ``FluxKontextPipeline.from_pipe``
of a LoRWeB pipeline; a stock ``save_pretrained`` / ``from_pretrained`` round trip; ``num_parameters``,
``get_memory_footprint``, ``enable_gradient_checkpointing`` at inference and ``diffusers.hooks.HookRegistry`` hooks
on the wrapped layers.

How: the reference for "the same feature without LoRWeB semantics" is the equivalent stock model, a stock
``FluxKontextPipeline`` whose transformer holds one analogy's mixture baked into plain ``nn.Linear`` weights
(``set_analogy`` + ``fuse_lora("full")`` + ``unload_lora_weights()``, the README's way to bake), called with exactly
the arguments the LoRWeB pipeline passes (its control grid, size, prompt, seed) and cropped to b' as it crops.
LoRWeB + feature must equal stock-merged + feature; each feature that changes the computation (a cache that skips
work, tiling) must move b' by more than ten tolerances, so a feature silently ignored on either side fails; a different
analogy gives a b' that differs by far more (checked once, ``test_the_reference_is_the_lorweb_model_merged``).

Models: the tiny random FLUX.1-Kontext of ``lorweb_fast.demo`` (1 double + 1 single block) with the seeded basis of
``testing.inject_random_lorweb`` (or the same draw on other targets), the tiny CLIP encoder, native resolution, 64 px
grids, CPU, fp32 (bf16 where the dtype is the point); every component in eval mode. Cache tests run 5 steps (caches
skip work only after the first ones; an odd count, so that a state carried over from a previous generation shifts
the skip phase of the step-counting caches and shows), the others 2.

Tolerances, derived from the dtype of the run: fp32 runs of one computation arranged differently (fused vs merged
vs stock weights, attention kernels) differ by a few ulps of the image (observed <= 1e-6, 8 eps); the bound is
256 eps(fp32) ~ 3e-5, far below one 8-bit level. In bf16 the unmerged path rounds the mixture in bf16 at every
layer while the merged weights are rounded once (observed 0.012 ~ 3 eps(bf16)); the bound is 8 eps(bf16) = 0.031,
against 0.69 between two analogies.

The three defects the audit found are fixed and pinned here: a failed generation resets the transformer's stateful
cache hooks (the next analogy reused the failed one's residuals), and ``fuse_qkv_projections()`` (which stopped half
way) and a stock ``save_pretrained`` (which wrote a folder no stock loader reads back) are refused by name while the
transformer holds LoRWeB layers they cannot handle. Not applicable here and not tested: FasterCache's and
the caches' GPU speed, SeaCache (needs per-step ``cache_context(step_index=, sigma=, num_inference_steps=)``, which
FluxKontextPipeline does not give: diffusers runs it fail-open), TextKVCache (NucleusMoE blocks only),
``pipe.enable_attention_slicing`` (no FLUX.1-Kontext component has ``set_attention_slice`` in 0.42.1: a no-op),
``pipe.fuse_qkv_projections`` / ``enable_vae_tiling`` / ``enable_vae_slicing`` (not on FluxKontextPipeline in 0.42.1),
the flash / sage / xformers / NPU / XLA attention backends (need CUDA or packages absent here), and
``output_type="latent"|"pt"`` / ``return_dict`` on the wrapper (refused by name: ``tests/test_pipeline_call_args.py``;
the stock pipeline's latents are compared in the ``from_pipe`` test).
"""

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, flux
from lorweb_fast.testing import at_first_step, inject_random_lorweb, random_analogy

pytest.importorskip("diffusers")
from diffusers import FluxKontextPipeline  # noqa: E402
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, MagCacheConfig,  # noqa: E402
                             ModelHook, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
from diffusers.models.attention_dispatch import (AttentionBackendName, _AttentionBackendRegistry,  # noqa: E402
                                                 attention_backend)

STEPS = 2
CACHE_STEPS = 5
MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
IMAGE_ATOL = {torch.float32: 2 ** 8 * torch.finfo(torch.float32).eps,
              torch.bfloat16: 2 ** 3 * torch.finfo(torch.bfloat16).eps}
ATOL = IMAGE_ATOL[torch.float32]
ACTIVE = 10 * ATOL  # a feature that changes the computation moves b' by more than this
MERGES = ("none", "full", "offload", "jit")
QUERY_CONFIG = dict(num_loras=3, rank=2, key_dim=8, query_dim=24)  # inject_random_lorweb's basis


# ------------------------------------------------------------------------------------------------- helpers
def make_lorweb(encoder, target_modules=None) -> flux.LoRWeBKontextPipeline:
    """A fresh tiny LoRWeB pipeline: ``inject_random_lorweb``'s seeded basis on the default targets, or the same
    draw on ``target_modules``; eval mode, native resolution, 64 px grids, no progress bar."""
    pipe = demo.build_tiny_kontext_pipeline()
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    with torch.random.fork_rng():
        if target_modules is None:
            inject_random_lorweb(pipe.transformer)
        else:
            torch.manual_seed(1)
            lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(**QUERY_CONFIG, target_modules=target_modules))
            with torch.no_grad():
                for layer in lf.lorweb_layers(pipe.transformer).values():
                    layer.lora_B.normal_(0, 0.5)
                    layer.lora_keys.normal_(0, 3.0)
    wrapper = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    wrapper.set_progress_bar_config(disable=True)
    return wrapper


def baked_stock(encoder, seed: int, dtype=None) -> FluxKontextPipeline:
    """The equivalent stock model of analogy ``seed``: a stock FluxKontextPipeline whose plain Linear layers hold
    that analogy's mixture (fuse_lora("full") + unload_lora_weights(), as the README bakes an analogy)."""
    lp = make_lorweb(encoder)
    if dtype is not None:
        lp.to(dtype)
    lp.set_analogy(*random_analogy(seed))
    lp.fuse_lora(strategy="full")
    lp.unload_lora_weights()
    assert not lf.lorweb_layers(lp.pipe.transformer)
    return lp.pipe


def lorweb_b_prime(lp, seed: int, steps: int = STEPS, merge: str = "none", **kwargs) -> np.ndarray:
    """b' (H, W, 3) floats of ``random_analogy(seed)`` by the LoRWeB pipeline, generator seeded with ``seed``."""
    a, a_prime, b = random_analogy(seed)
    return lp(a, a_prime, b, "flip", num_inference_steps=steps, merge=merge, output_type="np",
              max_sequence_length=MSL, generator=torch.Generator().manual_seed(seed), **kwargs)[0]


def stock_call(lp, stock, seed: int, steps: int = STEPS, **kwargs):
    """The stock pipeline ``stock`` called with what ``lp`` passes for ``random_analogy(seed)``: its grid, size,
    prompt and generator (native resolution: generated at the grid's own size)."""
    a, a_prime, b = random_analogy(seed)
    grid = lp.control_grids([a], [a_prime], [b])[0]
    width, height = grid.size
    return stock(image=grid, prompt="flip", height=height, width=width, num_inference_steps=steps,
                 guidance_scale=2.5, generator=torch.Generator().manual_seed(seed), max_area=width * height,
                 _auto_resize=False, max_sequence_length=MSL, **kwargs)


def stock_b_prime(lp, stock, seed: int, steps: int = STEPS, **kwargs) -> np.ndarray:
    """b' of the stock pipeline's generated grid (its bottom-right quarter, as the LoRWeB pipeline crops)."""
    image = stock_call(lp, stock, seed, steps, output_type="np", **kwargs).images[0]
    return image[image.shape[0] // 2:, image.shape[1] // 2:]


def assert_close(got, want, atol=ATOL, what=""):
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


def moved(got, want) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max())


def cache_config(name: str, pipe):
    """The cache ``name`` set to skip work on the tiny model within ``CACHE_STEPS`` steps; ``pipe`` (the diffusers
    pipeline of the transformer that gets it) gives the timestep callbacks."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    if name == "first_block":
        return FirstBlockCacheConfig(threshold=10.0)
    if name == "pyramid_attention_broadcast":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1001),
                                               current_timestep_callback=timestep)
    if name == "faster":  # guidance-distilled FLUX: the attention skips only (steps below t=681)
        return FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep,
                                 is_guidance_distilled=True, attention_weight_callback=lambda _: 0.5)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)
    if name == "mag":
        return MagCacheConfig(threshold=10.0, max_skip_steps=3, retention_ratio=0.0, num_inference_steps=CACHE_STEPS,
                              mag_ratios=[1.0] * CACHE_STEPS)
    raise ValueError(name)


CACHES = ("first_block", "pyramid_attention_broadcast", "faster", "taylorseer", "mag")
#: FluxKontextPipeline (0.42.1) calls its transformer outside any cache_context; these caches' state needs one, so
#: the user wraps the call in ``transformer.cache_context("cond")`` (FluxPipeline does it per branch itself)
NEEDS_CONTEXT = {"first_block", "taylorseer"}


def cache_scope(name: str, transformer):
    return transformer.cache_context("cond") if name in NEEDS_CONTEXT else contextlib.nullcontext()


def interrupted():
    raise RuntimeError("interrupted by the user")


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_audit")
    demo.build_tiny_clip(root / "clip")
    return flux.AnalogyEncoder(root / "clip")


@pytest.fixture(scope="module")
def shared_lp(encoder):
    return make_lorweb(encoder)


@pytest.fixture(scope="module")
def shared_stock0(encoder):
    return baked_stock(encoder, 0)


@pytest.fixture(scope="module")
def refs(shared_lp, shared_stock0):
    """Uncached, default-backend b' of the shared pipelines: LoRWeB for analogies 0 and 1 at 2 and 5 steps (every
    merge strategy for analogy 0), the stock model of analogy 0 at both step counts."""
    out = {}
    for steps in (STEPS, CACHE_STEPS):
        out[steps] = {m: lorweb_b_prime(shared_lp, 0, steps, merge=m) for m in MERGES}
        out[steps]["other"] = lorweb_b_prime(shared_lp, 1, steps)
        out[steps]["stock"] = stock_b_prime(shared_lp, shared_stock0, 0, steps)
    return out


@pytest.fixture(scope="module")
def cached_stock(shared_lp, shared_stock0):
    """cache name -> b' of analogy 0 by the stock model with that cache (freshly enabled, then disabled), computed
    once."""
    done = {}

    def get(cache):
        if cache not in done:
            transformer = shared_stock0.transformer
            transformer.enable_cache(cache_config(cache, shared_stock0))
            try:
                with cache_scope(cache, transformer):
                    done[cache] = stock_b_prime(shared_lp, shared_stock0, 0, CACHE_STEPS)
            finally:
                transformer.disable_cache()
        return done[cache]

    return get


@pytest.fixture
def lp(shared_lp, shared_stock0, monkeypatch):
    """The shared LoRWeB pipeline, given back as found: no cache, default attention backends (the process-wide
    active backend included, which ``set_attention_backend`` changes for good), strength 1, not fused."""
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    yield shared_lp
    for transformer in (shared_lp.transformer, shared_stock0.transformer):
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        transformer.reset_attention_backend()
    assert lf.lora_api.fused_strategy(shared_lp.transformer) is None
    lf.set_lorweb_scale(shared_lp.transformer, 1.0)


@pytest.fixture
def stock0(lp, shared_stock0):
    return shared_stock0


# ------------------------------------------------------------------------------------------------ reference
def test_the_reference_is_the_lorweb_model_merged(lp, stock0, refs):
    """The stock model with analogy 0 baked in gives the LoRWeB pipeline's b' for analogy 0 (every strategy), and
    analogy 1 is far outside the tolerance: the comparisons below separate analogies."""
    for steps in (STEPS, CACHE_STEPS):
        for merge in MERGES:
            assert_close(refs[steps][merge], refs[steps]["stock"], what=f"{steps} steps, merge={merge}")
        assert moved(refs[steps]["other"], refs[steps]["stock"]) > 1000 * ATOL


# ------------------------------------------------------------------------------------------------ 1. caches
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("cache", CACHES)
def test_a_cache_on_lorweb_equals_the_same_cache_on_the_merged_stock_model(lp, stock0, refs, cached_stock, cache,
                                                                          merge):
    """``transformer.enable_cache(config)`` on the LoRWeB pipeline gives what the same cache gives on the stock model
    holding the analogy's mixture, unmerged and under every merge strategy; the cache really skips work (b' moves)."""
    want = cached_stock(cache)
    lp.transformer.enable_cache(cache_config(cache, lp.pipe))
    with cache_scope(cache, lp.transformer):
        got = lorweb_b_prime(lp, 0, CACHE_STEPS, merge=merge)
    assert moved(want, refs[CACHE_STEPS]["stock"]) > ACTIVE, "the cache changed nothing: the test would not see it"
    assert_close(got, want)


@pytest.mark.parametrize("strategy", ["full", "jit"])
@pytest.mark.parametrize("cache", CACHES)
def test_a_cache_on_a_fused_pipeline_equals_the_same_cache_on_the_merged_stock_model(lp, cached_stock, cache,
                                                                                    strategy):
    """``set_analogy`` + ``fuse_lora(strategy)`` (diffusers' fused-LoRA workflow), then a cached call of that
    analogy: the stock model's cached b'; ``unfuse_lora()`` afterwards."""
    lp.set_analogy(*random_analogy(0))
    lp.fuse_lora(strategy=strategy)
    try:
        lp.transformer.enable_cache(cache_config(cache, lp.pipe))
        with cache_scope(cache, lp.transformer):
            got = lorweb_b_prime(lp, 0, CACHE_STEPS)
    finally:
        lp.unfuse_lora()
    assert_close(got, cached_stock(cache))


@pytest.mark.parametrize("cache", CACHES)
def test_cache_state_is_reset_between_generations_and_disable_cache_gives_the_plain_model(lp, refs, cache):
    """Analogy 0, then analogy 1 under one cache: analogy 1 gives what it gives with a freshly enabled cache (the
    cached residuals / attention outputs / Taylor factors of analogy 0, computed with its coefficients, do not carry
    over: diffusers resets the stateful hooks at the end of each call); ``disable_cache()`` then gives the uncached
    b' and merges again."""
    lp.transformer.enable_cache(cache_config(cache, lp.pipe))
    with cache_scope(cache, lp.transformer):
        fresh = lorweb_b_prime(lp, 1, CACHE_STEPS)
    lp.transformer.disable_cache()
    lp.transformer.enable_cache(cache_config(cache, lp.pipe))
    with cache_scope(cache, lp.transformer):
        lorweb_b_prime(lp, 0, CACHE_STEPS, merge="full")
    with cache_scope(cache, lp.transformer):
        after = lorweb_b_prime(lp, 1, CACHE_STEPS)
    assert moved(fresh, refs[CACHE_STEPS]["other"]) > ACTIVE, "the cache changed nothing: the test would not see it"
    assert_close(after, fresh, what="the previous analogy's cache state leaked into this generation")
    lp.transformer.disable_cache()
    assert lp.merge_strategy("auto", 1) == "full"
    assert_close(lorweb_b_prime(lp, 0, CACHE_STEPS, merge="auto"), refs[CACHE_STEPS]["full"])


@pytest.mark.parametrize("cache", CACHES)
def test_a_failed_generation_leaves_no_cache_state_for_the_next_analogy(lp, cache):
    """A generation interrupted after its first step (an exception in the step callback, as Ctrl-C would), then
    another analogy: it gives what it gives after a completed generation."""
    lp.transformer.enable_cache(cache_config(cache, lp.pipe))
    with cache_scope(cache, lp.transformer):
        clean = lorweb_b_prime(lp, 1, CACHE_STEPS)
    with pytest.raises(RuntimeError, match="interrupted by the user"):
        with cache_scope(cache, lp.transformer):
            lorweb_b_prime(lp, 0, CACHE_STEPS, callback_on_step_end=at_first_step(interrupted))
    with cache_scope(cache, lp.transformer):
        after = lorweb_b_prime(lp, 1, CACHE_STEPS)
    assert_close(after, clean, what="the failed generation's cache state leaked into the next analogy")


@pytest.mark.parametrize("cache", sorted(NEEDS_CONTEXT))
def test_a_cache_that_needs_a_cache_context_says_so_and_the_failed_call_changes_nothing(lp, stock0, cache):
    """Without ``cache_context`` (FluxKontextPipeline does not open one) FirstBlockCache and TaylorSeer raise
    diffusers' error naming ``cache_context``, the same as on the stock pipeline; the LoRWeB call (merge="auto":
    inside a "full" merge) leaves the weights bit-identical, nothing merged and the previous analogy in place."""
    lorweb_b_prime(lp, 2)
    before_coefficients = lf.get_coefficients(lp.transformer)
    before_params = params(lp.transformer)
    lp.transformer.enable_cache(cache_config(cache, lp.pipe))
    stock0.transformer.enable_cache(cache_config(cache, stock0))
    with pytest.raises(ValueError, match=r"cache_context") as stock_error:
        stock_b_prime(lp, stock0, 0)
    with pytest.raises(ValueError, match=r"cache_context") as lorweb_error:
        lorweb_b_prime(lp, 0, merge="auto")
    assert str(lorweb_error.value) == str(stock_error.value)
    after = lf.get_coefficients(lp.transformer)
    assert after.keys() == before_coefficients.keys()
    assert all(torch.equal(after[n], before_coefficients[n]) for n in after)
    assert all(torch.equal(p, before_params[n]) for n, p in params(lp.transformer).items())
    assert not any(layer._merged or layer._merge_jit for layer in lf.lorweb_layers(lp.transformer).values())


# ------------------------------------------------------------------------------------- 2. attention backends
def counting_backend(monkeypatch, backend: str) -> list:
    """Count the calls of the attention backend ``backend``'s kernel (wrapped in diffusers' registry)."""
    name = AttentionBackendName(backend)
    real, calls = _AttentionBackendRegistry._backends[name], []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counted)
    return calls


CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_set_attention_backend_matches_the_default_and_the_stock_model(lp, stock0, refs, monkeypatch, backend):
    """``transformer.set_attention_backend(name)`` for each backend that runs on a CPU (math-equivalent to the
    default SDPA): q/k/v come from LoRWeB's to_q/to_k/to_v/add_*_proj layers, the chosen kernel runs, and b' is the
    default one and the stock model's with the same backend, unmerged and merged."""
    calls = counting_backend(monkeypatch, backend)
    lp.transformer.set_attention_backend(backend)
    stock0.transformer.set_attention_backend(backend)
    for merge in MERGES:
        del calls[:]
        got = lorweb_b_prime(lp, 0, merge=merge)
        assert calls, f"the {backend} kernel did not run (merge={merge})"
        assert_close(got, refs[STEPS][merge], what=f"merge={merge}")
    assert_close(got, stock_b_prime(lp, stock0, 0))


@pytest.mark.parametrize("merge", MERGES)
def test_attention_backend_context_manager_matches_the_default(lp, refs, monkeypatch, merge):
    """``with attention_backend("_native_math"):`` (the process-wide active backend) around a LoRWeB call."""
    calls = counting_backend(monkeypatch, "_native_math")
    with attention_backend("_native_math"):
        got = lorweb_b_prime(lp, 0, merge=merge)
    assert calls, "the _native_math kernel did not run"
    assert_close(got, refs[STEPS][merge])


# ------------------------------------------------------------------------------------ 3. fuse_qkv_projections
FEED_FORWARD = r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.proj_mlp"


def fused_parts(transformer) -> list:
    return [n for n, m in transformer.named_modules()
            if getattr(m, "fused_projections", False) or hasattr(m, "to_qkv") or hasattr(m, "to_added_qkv")]


def test_fuse_qkv_projections_with_lorweb_outside_the_attention_keeps_the_mixture(encoder):
    """LoRWeB on the feed-forward layers only (custom targets): ``fuse_qkv_projections()`` fuses every attention,
    b' stays what it was under every strategy with the mixture applied, and ``unfuse_qkv_projections()`` too."""
    lp = make_lorweb(encoder, FEED_FORWARD)
    want = {m: lorweb_b_prime(lp, 0, merge=m) for m in MERGES}
    lp.set_lorweb_scale(0.0)
    base = lorweb_b_prime(lp, 0)
    lp.set_lorweb_scale(1.0)
    assert moved(want["none"], base) > ACTIVE
    lp.transformer.fuse_qkv_projections()
    assert len(fused_parts(lp.transformer)) == 2
    for merge in MERGES:
        assert_close(lorweb_b_prime(lp, 0, merge=merge), want[merge], what=f"merge={merge}")
    lp.transformer.unfuse_qkv_projections()
    assert not fused_parts(lp.transformer)
    assert_close(lorweb_b_prime(lp, 0), want["none"])


@pytest.mark.parametrize("targets", [r"single_transformer_blocks\..*", r".*\.add_[qkv]_proj"],
                         ids=["single_blocks_only", "added_projections_only"])
def test_a_refused_fuse_qkv_projections_changes_nothing(encoder, targets):
    """LoRWeB on part of the attention projections (custom targets): a fuse_qkv_projections() that fails on them
    leaves b' as it was (it does today) and no attention fused or holding a fused copy (it does not)."""
    lp = make_lorweb(encoder, targets)
    want = lorweb_b_prime(lp, 0)
    with pytest.raises((AttributeError, ValueError, TypeError, RuntimeError), match="LoRWeB"):
        lp.transformer.fuse_qkv_projections()  # today diffusers' "'LoRWeBLinear' object has no attribute 'weight'"
    for merge in MERGES:  # no silent wrong result: the mixture still runs
        assert_close(lorweb_b_prime(lp, 0, merge=merge), want, what=f"merge={merge}")
    assert not fused_parts(lp.transformer), "the refused fuse_qkv_projections() fused part of the attention"


# ------------------------------------------------------------------------------------------- 4. VAE, dtype, from_pipe
@pytest.mark.parametrize("merge", ["none", "full", "jit"])
def test_vae_tiling_gives_the_stock_models_tiled_b_prime(lp, stock0, refs, merge):
    """``vae.enable_tiling()`` (tiles of 32 px so that the 64 px grid is tiled) on both pipelines."""
    vaes = (lp.vae, stock0.vae)
    sizes = [(v.tile_sample_min_size, v.tile_latent_min_size) for v in vaes]
    try:
        for vae in vaes:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 16
        want = stock_b_prime(lp, stock0, 0)
        got = lorweb_b_prime(lp, 0, merge=merge)
    finally:
        for vae, (sample, latent) in zip(vaes, sizes):
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = sample, latent
    assert moved(want, refs[STEPS]["stock"]) > ACTIVE, "tiling changed nothing: the test would not see it"
    assert_close(got, want)


@pytest.mark.parametrize("merge", ["none", "jit"])
def test_vae_slicing_decodes_a_batch_of_analogies_as_one_by_one_calls(lp, merge):
    """``vae.enable_slicing()``: a batch of two different analogies is decoded one sample at a time and gives the
    one-by-one b' (per-sample coefficients in the batch; "jit": per-sample merged weights)."""
    singles = [lorweb_b_prime(lp, s) for s in (0, 1)]
    x0, x1 = random_analogy(0), random_analogy(1)
    decodes = []
    handle = lp.vae.decoder.register_forward_pre_hook(lambda *args: decodes.append(args[1][0].shape[0]))
    lp.vae.enable_slicing()
    try:
        batch = lp(*([p, q] for p, q in zip(x0, x1)), "flip", num_inference_steps=STEPS, merge=merge,
                   output_type="np", max_sequence_length=MSL,
                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    finally:
        lp.vae.disable_slicing()
        handle.remove()
    assert decodes == [1, 1]
    for got, want in zip(batch, singles):
        assert_close(got, want)


def test_pipe_to_bfloat16_casts_the_basis_and_matches_the_bf16_merged_stock_model(encoder):
    """``pipe.to(torch.bfloat16)`` after injection: returns the wrapper, casts every LoRWeB tensor with the
    transformer (the analogy encoder keeps its dtype, as documented), warns nothing of its own, and b' equals the
    bf16 stock model with the analogy baked (within the bf16 bound) under every strategy."""
    lp = make_lorweb(encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lf.LoRWeBWarning)
        assert lp.to(torch.bfloat16) is lp
    assert lp.dtype == torch.bfloat16
    assert {t.dtype for t in [*lp.transformer.parameters(), *lp.transformer.buffers()]} == {torch.bfloat16}
    assert next(lp.encoder.model.parameters()).dtype == torch.float32
    stock = baked_stock(encoder, 0, dtype=torch.bfloat16)
    want = stock_b_prime(lp, stock, 0)
    for merge in MERGES:
        assert_close(lorweb_b_prime(lp, 0, merge=merge), want, IMAGE_ATOL[torch.bfloat16], what=f"merge={merge}")
    assert moved(lorweb_b_prime(lp, 1), want) > 10 * IMAGE_ATOL[torch.bfloat16]


@pytest.mark.parametrize("source", ["stock_pipe", "wrapper"])
def test_from_pipe_shares_the_lorweb_transformer_and_its_analogy(lp, stock0, refs, source):
    """``FluxKontextPipeline.from_pipe(lp.pipe)`` (or of the wrapper itself, whose components it forwards) shares
    the LoRWeB transformer: wrapped again it gives lp's b'; called as a stock pipeline it runs the analogy last set
    (b', and the latents with output_type="latent", return_dict=False, are the baked stock model's); with no analogy
    set its forward names set_query."""
    new = FluxKontextPipeline.from_pipe(lp.pipe if source == "stock_pipe" else lp)
    new.set_progress_bar_config(disable=True)
    assert new.transformer is lp.transformer and new.vae is lp.vae
    again = flux.LoRWeBKontextPipeline(new, lp.encoder, resolution="native", long_edge=64)
    assert_close(lorweb_b_prime(again, 0), refs[STEPS]["none"])
    lp.set_analogy(*random_analogy(0))
    assert_close(stock_b_prime(lp, new, 0), refs[STEPS]["stock"])
    (latents,) = stock_call(lp, new, 0, output_type="latent", return_dict=False)
    (want,) = stock_call(lp, stock0, 0, output_type="latent", return_dict=False)
    assert_close(latents.numpy(), want.numpy())
    lf.clear_query(lp.transformer)
    with pytest.raises(RuntimeError, match="no coefficients: call lorweb_fast.set_query"):
        stock_call(lp, new, 0, output_type="latent")


# ---------------------------------------------------------------------------------------- 5. save_pretrained
def test_stock_save_pretrained_of_a_lorweb_pipeline_is_what_the_readme_says(lp, tmp_path):
    """README ("Do not save an injected transformer with its own save_pretrained"): the stock pipeline's
    save_pretrained writes the wrapped layers' weights as ``*.base_layer.*`` beside the LoRWeB tensors; a stock
    from_pretrained leaves those layers on the meta device (the first call fails), or, with
    low_cpu_mem_usage=False, initialised at random. (A save refused naming LoRWeB, the fix the next test asks for,
    passes too.)"""
    from safetensors import safe_open

    try:
        lp.pipe.save_pretrained(tmp_path)
    except (TypeError, ValueError, RuntimeError) as refused:
        assert "LoRWeB" in str(refused)
        return
    with safe_open(str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = "transformer_blocks.0.attn.to_q"
    assert {f"{name}.base_layer.weight", f"{name}.lora_A", f"{name}.lora_B", f"{name}.lora_keys",
            f"{name}.att_lora_to_q.weight"} <= keys and f"{name}.weight" not in keys
    loaded = FluxKontextPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.get_submodule(name).weight.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        stock_call(lp, loaded, 0)
    loaded = FluxKontextPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    assert not lf.lorweb_layers(loaded.transformer)
    base = lp.transformer.get_submodule(name).base_layer.weight
    assert not torch.equal(loaded.transformer.get_submodule(name).weight, base)


def test_stock_save_pretrained_of_a_lorweb_pipeline_round_trips_or_is_refused(lp, tmp_path):
    """What a user expects of ``pipe.save_pretrained`` on the stock pipeline inside a LoRWeB pipeline: a refusal
    naming LoRWeB, or a folder that a stock from_pretrained loads into the same model."""
    try:
        lp.pipe.save_pretrained(tmp_path)
    except (TypeError, ValueError, RuntimeError) as refused:
        assert "LoRWeB" in str(refused)
        return
    loaded = FluxKontextPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert not any(p.device.type == "meta" for p in loaded.transformer.parameters()), "unreadable folder"
    lp.set_analogy(*random_analogy(0))
    assert_close(stock_b_prime(lp, loaded, 0), stock_b_prime(lp, lp.pipe, 0))


def test_a_baked_analogy_survives_a_stock_save_pretrained_round_trip(lp, stock0, refs, tmp_path):
    """README: fuse_lora() then unload_lora_weights() bakes the analogy into the stock layers "e.g. before its own
    save_pretrained": the folder loads with a stock from_pretrained and gives the LoRWeB pipeline's b'."""
    stock0.save_pretrained(tmp_path)
    loaded = FluxKontextPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    got = stock_b_prime(lp, loaded, 0)
    assert_close(got, refs[STEPS]["none"])
    assert moved(got, refs[STEPS]["other"]) > 1000 * ATOL


# --------------------------------------------------------------------------------- 6. ModelMixin and hooks
def test_num_parameters_and_memory_footprint_count_base_and_basis_once(lp, stock0):
    """``num_parameters()`` / ``get_memory_footprint()``: the stock model's plus the LoRWeB tensors, each once (the
    wrapped base weights are not counted twice); only the basis is trainable (the base is frozen at injection)."""
    basis = [t for layer in lf.lorweb_layers(lp.transformer).values() for t in layer.lorweb_tensors().values()]
    count, size = sum(t.numel() for t in basis), sum(t.numel() * t.element_size() for t in basis)
    assert count > 0
    assert lp.transformer.num_parameters() == stock0.transformer.num_parameters() + count
    assert lp.transformer.num_parameters(only_trainable=True) == count
    assert lp.transformer.get_memory_footprint() == stock0.transformer.get_memory_footprint() + size


def test_gradient_checkpointing_enabled_at_inference_changes_no_output_or_merge(lp, refs):
    """``enable_gradient_checkpointing()`` left on at inference (the pipeline runs under no_grad): the same b' under
    every strategy, and merges are still allowed (no hooks)."""
    lp.transformer.enable_gradient_checkpointing()
    try:
        assert lp.transformer.is_gradient_checkpointing and lp.merge_strategy("auto", 1) == "full"
        for merge in MERGES:
            assert_close(lorweb_b_prime(lp, 0, merge=merge), refs[STEPS][merge], what=f"merge={merge}")
    finally:
        lp.transformer.disable_gradient_checkpointing()


class CountingHook(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_diffusers_hooks_on_a_lorweb_layer_and_on_its_base_layer(lp, refs):
    """``HookRegistry`` hooks: one on a LoRWeB layer runs at every forward under every strategy; one on its base layer
    is never bypassed: merge="auto" runs unmerged and calls the base (hook) at every forward, a named merge is
    refused naming the layer (the merged weight would skip the hook); removing it allows merges again."""
    name, forwards = "transformer_blocks.0.attn.to_q", STEPS
    on_layer, on_base = CountingHook(), CountingHook()
    layer_registry = HookRegistry.check_if_exists_or_initialize(lp.transformer.get_submodule(name))
    base_registry = HookRegistry.check_if_exists_or_initialize(lp.transformer.get_submodule(name + ".base_layer"))
    layer_registry.register_hook(on_layer, "audit_count_layer")
    base_registry.register_hook(on_base, "audit_count_base")
    try:
        assert lp.merge_strategy("auto", 1) == "none"
        assert_close(lorweb_b_prime(lp, 0, merge="auto"), refs[STEPS]["none"])
        assert (on_layer.calls, on_base.calls) == (forwards, forwards)
        for merge in ("full", "offload", "jit"):
            with pytest.raises(TypeError, match=rf"cannot merge into {name}: its base layer has forward hooks"):
                lorweb_b_prime(lp, 0, merge=merge)
        base_registry.remove_hook("audit_count_base")
        assert lp.merge_strategy("auto", 1) == "full"
        for merge in ("full", "offload", "jit"):
            on_layer.calls = 0
            assert_close(lorweb_b_prime(lp, 0, merge=merge), refs[STEPS][merge], what=f"merge={merge}")
            assert on_layer.calls == forwards, merge
    finally:
        layer_registry.remove_hook("audit_count_layer")
        if "audit_count_base" in base_registry.hooks:
            base_registry.remove_hook("audit_count_base")
