"""LoRWeBKontextPipeline.__call__ argument by argument, as a diffusers user calls it: every argument of the stock
``FluxKontextPipeline.__call__`` that can reach it through ``**pipe_kwargs``, and the wrapper's own ones.

Each argument either works and gives what diffusers gives (result type and size, the coefficients every sample runs
with, checked against one-by-one calls with the same seeds), or is refused with a one-line error naming it before any
model runs (analogy encoder, text encoders, VAE, transformer: forward hooks record them), leaving the pipeline as it
was (weights, coefficients, strength, progress-bar settings, merged / fused state).

The pipeline is the tiny in-memory FLUX.1-Kontext of ``tiny_kontext_with_encoder`` (native resolution, 64 px grids,
one or two denoising steps), fp32, its components put in eval mode: built directly (not loaded), the text encoders
are in training mode and their dropout would make two identical calls differ by ~1e-3.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import demo, flux, lora_api
from lorweb_fast.testing import random_analogy, tiny_kontext_with_encoder

pytest.importorskip("diffusers")

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
# fp32 end to end: batched and one-by-one runs differ only by summation order (~1e-6 here, see
# test_flux_pipeline.py); 1e-4 is far above that and far below one 8-bit grey level
FP32_IMAGE_ATOL = 1e-4
X0, X1 = random_analogy(0), random_analogy(1)  # (a, a', b): 32 px a / a', 40 px b -> 64 px grids, 32 px b'
BATCH = [list(images) for images in zip(X0, X1)]  # [[a0, a1], [a0', a1'], [b0, b1]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe, encoder = tiny_kontext_with_encoder(tmp_path_factory.mktemp("call_args"), eval_mode=True)
    wrapper = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    wrapper.set_progress_bar_config(disable=True, desc="call-args")
    return wrapper


@pytest.fixture
def work(tiny, monkeypatch):
    """Names of the models that ran a forward during the test (analogy encoder, text encoders, VAE, transformer),
    and "merge" for every ``merged()`` entered (merge="auto" on FLUX.1-Kontext: a copy of every adapted weight)."""
    ran, handles = [], []
    real_merged = flux.merged
    monkeypatch.setattr(flux, "merged", lambda *args, **kwargs: ran.append("merge") or real_merged(*args, **kwargs))
    models = {"analogy encoder": tiny.encoder.model, "text_encoder": tiny.pipe.text_encoder,
              "text_encoder_2": tiny.pipe.text_encoder_2, "vae encoder": tiny.pipe.vae.encoder,
              "vae decoder": tiny.pipe.vae.decoder, "transformer": tiny.transformer}
    for name, model in models.items():
        handles.append(model.register_forward_pre_hook(lambda *args, name=name: ran.append(name)))
    yield ran
    for handle in handles:
        handle.remove()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def call(pipe, a, a_prime, b, prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("max_sequence_length", MSL)
    kwargs.setdefault("generator", gen(1))
    return pipe(a, a_prime, b, prompt, **kwargs)


def np_call(pipe, a, a_prime, b, prompt, **kwargs):
    """Two steps, unmerged, float output: what the comparisons need."""
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("merge", "none")
    return call(pipe, a, a_prime, b, prompt, output_type="np", **kwargs)


def state(pipe):
    """Everything a failed call must leave as it was."""
    t = pipe.transformer
    return dict(weights={k: v.clone() for k, v in t.state_dict().items()},
                coefficients={k: v.clone() for k, v in lf.get_coefficients(t).items()},
                strength=lora_api.get_lorweb_scale(t), bar=dict(pipe.pipe._progress_bar_config),
                merged=[(layer._merged, layer._merge_jit) for layer in lf.lorweb_layers(t).values()],
                fused=lora_api.fused_strategy(t), adapters=pipe.get_active_adapters())


def assert_same_state(before, after):
    assert before["weights"].keys() == after["weights"].keys()
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert before["coefficients"].keys() == after["coefficients"].keys()
    assert all(torch.equal(before["coefficients"][k], after["coefficients"][k]) for k in before["coefficients"])
    assert {k: v for k, v in before.items() if k not in ("weights", "coefficients")} == \
        {k: v for k, v in after.items() if k not in ("weights", "coefficients")}


def first_coefficients(pipe):
    return next(iter(lf.get_coefficients(pipe.transformer).values())).clone()


def refused_before_model_work(pipe, work, excs, names, fn):
    """``fn()`` raises one of ``excs`` whose one-line message names one of ``names``, before any model ran, and the
    pipeline (set to analogy X1 first) is left as it was. Returns the message."""
    call(pipe, *X1, "swap", merge="none")  # a previous analogy, which the failed call must keep
    before = state(pipe)
    work.clear()
    with pytest.raises(excs) as info:
        fn()
    message = str(info.value)
    assert any(name in message for name in names), message
    assert "\n" not in message, message
    assert work == [], f"models ran before the error: {sorted(set(work))}"
    assert_same_state(before, state(pipe))
    return message


# ------------------------------------------------------------------------------------------ output and shape
def test_pil_and_np_outputs_are_the_same_b_prime(tiny):
    pil = call(tiny, *X0, "flip", num_inference_steps=2, merge="none")
    arr = np_call(tiny, *X0, "flip")
    assert len(pil) == len(arr) == 1
    assert isinstance(pil[0], Image.Image) and pil[0].mode == "RGB" and pil[0].size == (32, 32)
    assert isinstance(arr[0], np.ndarray) and arr[0].shape == (32, 32, 3) and arr[0].dtype == np.float32
    assert 0.0 <= arr[0].min() and arr[0].max() <= 1.0
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("output_type", ["latent", "pt", None, "PIL"])
def test_other_output_types_are_refused_before_model_work(tiny, work, output_type):
    refused_before_model_work(tiny, work, ValueError, ["output_type"],
                              lambda: call(tiny, *X0, "flip", output_type=output_type, progress=True))


@pytest.mark.parametrize("name,value", [("return_dict", False), ("height", 64), ("width", 64), ("max_area", 4096),
                                        ("_auto_resize", False), ("image", X0[0])])
def test_arguments_the_pipeline_sets_itself_are_refused_by_name(tiny, work, name, value):
    """The grid fixes image, height, width, max_area and _auto_resize; the result is always a list of b'."""
    message = refused_before_model_work(tiny, work, ValueError, [repr(name)],
                                        lambda: call(tiny, *X0, "flip", **{name: value}))
    assert "set by the LoRWeB pipeline" in message


@pytest.mark.parametrize("name,value", [("timesteps", [1000, 500]), ("callback", print), ("strength", 0.5)])
def test_arguments_the_stock_pipeline_does_not_take_are_refused_by_name(tiny, work, name, value):
    message = refused_before_model_work(tiny, work, ValueError, [repr(name)],
                                        lambda: call(tiny, *X0, "flip", **{name: value}))
    assert "unknown pipeline argument" in message


def test_lists_of_one_are_a_single_analogy(tiny):
    """[a], [a'], [b], ["p"] (and tuples, and a list of one generator) give exactly what a, a', b, "p" gives."""
    single = np_call(tiny, *X0, "flip", generator=gen(3))
    listed = np_call(tiny, [X0[0]], [X0[1]], [X0[2]], ["flip"], generator=[gen(3)])
    tupled = np_call(tiny, (X0[0],), (X0[1],), (X0[2],), ("flip",), generator=gen(3))
    assert len(single) == len(listed) == len(tupled) == 1
    np.testing.assert_array_equal(single[0], listed[0])
    np.testing.assert_array_equal(single[0], tupled[0])
    assert first_coefficients(tiny).shape[0] == 1


def test_one_step_and_guidance_zero(tiny, work):
    """num_inference_steps=1 runs the transformer once; guidance_scale 0 is a valid embedded guidance that changes
    the result (the tiny transformer has guidance embeddings)."""
    work.clear()
    zero = np_call(tiny, *X0, "flip", num_inference_steps=1, guidance_scale=0.0)[0]
    assert work.count("transformer") == 1
    default = np_call(tiny, *X0, "flip", num_inference_steps=1)[0]
    assert np.abs(zero - default).max() > 100 * FP32_IMAGE_ATOL


# ----------------------------------------------------------------------------------- images per prompt
@pytest.mark.parametrize("merge", ["none", "auto", "full", "jit"])
def test_images_per_prompt_share_the_analogy(tiny, merge):
    """num_images_per_prompt=2 for one analogy: two different b' of the same analogy; the first is the single
    image of the same seed (a CPU generator draws the batch's noise in order)."""
    single = np_call(tiny, *X0, "flip", generator=gen(4))[0]
    coefficients = first_coefficients(tiny)
    two = np_call(tiny, *X0, "flip", generator=gen(4), num_images_per_prompt=2, merge=merge)
    assert len(two) == 2 and all(x.shape == (32, 32, 3) for x in two)
    got = first_coefficients(tiny)
    assert got.shape[0] == 2
    torch.testing.assert_close(got, coefficients.expand(2, -1), rtol=0, atol=0)
    np.testing.assert_allclose(two[0], single, rtol=0, atol=FP32_IMAGE_ATOL)
    assert np.abs(two[0] - two[1]).max() > 100 * FP32_IMAGE_ATOL  # two noises, two images


def test_images_per_prompt_take_one_generator_each(tiny):
    two = np_call(tiny, *X0, "flip", generator=[gen(4), gen(5)], num_images_per_prompt=2)
    ones = [np_call(tiny, *X0, "flip", generator=gen(s))[0] for s in (4, 5)]
    for got, want in zip(two, ones):
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_IMAGE_ATOL)


def test_images_per_prompt_for_a_batch_of_analogies_is_refused(tiny, work):
    refused_before_model_work(tiny, work, ValueError, ["num_images_per_prompt"],
                              lambda: call(tiny, *BATCH, "flip", num_images_per_prompt=2))


# ------------------------------------------------------------------------------------- true CFG, prompts
@pytest.mark.parametrize("negative", ["blurry", ["blurry", "dark"]])
def test_true_cfg_runs_each_sample_with_its_own_coefficients(tiny, negative):
    """negative_prompt + true_cfg_scale on a batch of two analogies: the negative branch runs each sample with its
    own mixture, so the batch equals one-by-one calls with the same seeds (a string negative prompt is every
    sample's)."""
    options = dict(true_cfg_scale=3.0, negative_prompt=negative)
    batched = np_call(tiny, *BATCH, ["flip", "swap"], generator=[gen(5), gen(6)], **options)
    coefficients = first_coefficients(tiny)
    assert not torch.allclose(coefficients[0], coefficients[1])
    negatives = [negative] * 2 if isinstance(negative, str) else negative
    singles = [np_call(tiny, *x, p, generator=gen(s), true_cfg_scale=3.0, negative_prompt=n)[0]
               for x, p, s, n in zip((X0, X1), ("flip", "swap"), (5, 6), negatives)]
    for got, want in zip(batched, singles):
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_IMAGE_ATOL)
    plain = np_call(tiny, *X0, "flip", generator=gen(5))[0]
    assert np.abs(plain - singles[0]).max() > 100 * FP32_IMAGE_ATOL  # the negative branch did run


def test_prompt_2_and_max_sequence_length_reach_the_text_encoders(tiny):
    one = np_call(tiny, *X0, "flip")[0]
    other = np_call(tiny, *X0, "flip", prompt_2="a completely different second prompt")[0]
    assert np.abs(one - other).max() > 10 * FP32_IMAGE_ATOL  # the tiny T5 changes b' a little, but surely
    batched = np_call(tiny, *BATCH, ["flip", "swap"], prompt_2=["p", "q"], generator=[gen(1), gen(2)])
    single = np_call(tiny, *X1, "swap", prompt_2="q", generator=gen(2))[0]
    np.testing.assert_allclose(batched[1], single, rtol=0, atol=FP32_IMAGE_ATOL)
    assert np_call(tiny, *X0, "flip", max_sequence_length=8)[0].shape == (32, 32, 3)


def test_prompt_embeds_instead_of_the_prompt_for_one_analogy(tiny):
    """diffusers' prompt_embeds / pooled_prompt_embeds (and the negative ones) with prompt=None give what the
    prompts give."""
    pipe = tiny.pipe
    embeds, pooled, _ = pipe.encode_prompt(prompt="flip", prompt_2=None, max_sequence_length=MSL)
    neg, neg_pooled, _ = pipe.encode_prompt(prompt="blurry", prompt_2=None, max_sequence_length=MSL)
    want = np_call(tiny, *X0, "flip", negative_prompt="blurry", true_cfg_scale=2.0)[0]
    got = np_call(tiny, *X0, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                  negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=2.0)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_IMAGE_ATOL)


def test_prompts_for_another_number_of_analogies_are_refused(tiny, work):
    refused_before_model_work(tiny, work, ValueError, ["2 prompts for 1 analogies"],
                              lambda: call(tiny, *X0, ["a", "b"]))
    refused_before_model_work(tiny, work, ValueError, ["1 prompts for 2 analogies"],
                              lambda: call(tiny, *BATCH, ["a"]))


# ----------------------------------------------------------------------------- callbacks, latents, sigmas
def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents(tiny):
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((type(pipe).__name__, step, tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {}

    np_call(tiny, *BATCH, ["flip", "swap"], generator=[gen(1), gen(2)], callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s[:2] for s in seen] == [("FluxKontextPipeline", 0), ("FluxKontextPipeline", 1)]
    assert all(s[2][0] == 2 and s[3][0] == 2 for s in seen)
    plain = np_call(tiny, *X0, "flip")[0]
    zeroed = np_call(tiny, *X0, "flip",
                     callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])})[0]
    assert np.abs(plain - zeroed).max() > 100 * FP32_IMAGE_ATOL


def test_given_latents_replace_the_generators_noise(tiny):
    """64 px grid, 2x VAE, 2x2 packing: (1, 16 * 16, 8) packed latents; with them the generator no longer
    matters."""
    latents = torch.randn(1, 256, 8, generator=gen(9))
    one = np_call(tiny, *X0, "flip", latents=latents, generator=gen(1))[0]
    two = np_call(tiny, *X0, "flip", latents=latents, generator=gen(2))[0]
    np.testing.assert_array_equal(one, two)
    assert np.abs(one - np_call(tiny, *X0, "flip", generator=gen(1))[0]).max() > 100 * FP32_IMAGE_ATOL


def test_sigmas_set_one_step_each(tiny, work):
    """As in diffusers, sigmas override num_inference_steps: one transformer step per sigma (a list, or a numpy
    array as diffusers' examples pass them)."""
    work.clear()
    np_call(tiny, *X0, "flip", num_inference_steps=1, sigmas=[1.0, 0.6, 0.3])
    assert work.count("transformer") == 3
    work.clear()
    np_call(tiny, *X0, "flip", num_inference_steps=1, sigmas=np.linspace(1.0, 0.5, 2))
    assert work.count("transformer") == 2


# ------------------------------------------------------------------------------------------------- images
def test_image_modes_and_sizes_are_read_as_rgb(tiny):
    """a RGBA, a' L, b P, all of different sizes: the same b' as their RGB conversions (convert("RGB"), as the
    official inference.py opens its inputs); b' has the cell size of the 64 px grid at b's aspect ratio."""
    rgba = X0[0].resize((30, 20)).convert("RGBA")
    rgba.putalpha(128)
    gray = X0[1].resize((24, 24)).convert("L")
    palette = X0[2].resize((40, 28)).convert("P")
    got = np_call(tiny, rgba, gray, palette, "flip")[0]
    want = np_call(tiny, rgba.convert("RGB"), gray.convert("RGB"), palette.convert("RGB"), "flip")[0]
    np.testing.assert_array_equal(got, want)
    assert got.shape == (16, 32, 3)  # cells of 32 x 16 px: b's 40 x 28 rounded down to multiples of 16


# --------------------------------------------------------------------------------- failed calls change nothing
FAILING_CALLS = {
    "callback raises": dict(callback_on_step_end=lambda *a: 1 / 0),
    "generator list too long": dict(generator=[gen(0), gen(1), gen(2)]),
    "latents of another batch": dict(latents=torch.zeros(2, 256, 8)),
    "ip adapter without one": dict(ip_adapter_image=X0[0]),
}


@pytest.mark.parametrize("merge", ["auto", "none", "jit"])
@pytest.mark.parametrize("case", list(FAILING_CALLS))
def test_a_failed_call_leaves_the_pipeline_as_it_was(tiny, case, merge):
    """Analogy X1 at strength 0.7 and a hidden progress bar before; a call for X0 (bar shown) fails late: the
    weights, X1's coefficients, the strength, the bar settings and the unmerged state are all still there."""
    call(tiny, *X1, "swap", merge="none")
    tiny.set_lorweb_scale(0.7)
    try:
        before = state(tiny)
        with pytest.raises(Exception):
            call(tiny, *X0, "flip", merge=merge, progress=True, **FAILING_CALLS[case])
        assert_same_state(before, state(tiny))
        assert before["strength"] == 0.7 and before["bar"] == {"disable": True, "desc": "call-args"}
    finally:
        tiny.set_lorweb_scale(1.0)


def test_a_failed_call_on_a_fused_pipeline_keeps_it_fused(tiny):
    tiny.set_analogy(*X0)
    tiny.fuse_lora(strategy="full")
    try:
        before = state(tiny)
        assert before["fused"] == "full"
        with pytest.raises(ZeroDivisionError):
            call(tiny, *X0, "flip", callback_on_step_end=lambda *a: 1 / 0)
        assert_same_state(before, state(tiny))
    finally:
        tiny.unfuse_lora()
    assert lora_api.fused_strategy(tiny.transformer) is None


# ------------------------------------------------------------- found by this audit, fixed (each failed before)
@pytest.mark.parametrize("merge", ["none", "auto", "jit"])
def test_joint_attention_kwargs_scale_is_the_lorweb_strength(tiny, merge):
    """diffusers' LoRA idiom ``joint_attention_kwargs={"scale": s}`` scales the LoRA for one call (apply_lora_scale
    -> scale_lora_layers). It scales only peft layers, so LoRWeB's mixture used to run at full strength: a silent
    wrong result. It acts as set_lorweb_scale(s) for that call, on top of the strength set (given back after)."""
    got = np_call(tiny, *X0, "flip", merge=merge, joint_attention_kwargs={"scale": 0.5})[0]
    assert lora_api.get_lorweb_scale(tiny.transformer) == 1.0
    full = np_call(tiny, *X0, "flip", merge=merge)[0]
    tiny.set_lorweb_scale(0.5)
    try:
        half = np_call(tiny, *X0, "flip", merge=merge)[0]
        quarter_by_call = np_call(tiny, *X0, "flip", merge=merge, joint_attention_kwargs={"scale": 0.5})[0]
        assert lora_api.get_lorweb_scale(tiny.transformer) == 0.5
        tiny.set_lorweb_scale(0.25)
        quarter = np_call(tiny, *X0, "flip", merge=merge)[0]
    finally:
        tiny.set_lorweb_scale(1.0)
    assert np.abs(full - half).max() > 100 * FP32_IMAGE_ATOL  # the strength shows on this basis
    np.testing.assert_allclose(got, half, rtol=0, atol=FP32_IMAGE_ATOL)
    assert np.abs(half - quarter).max() > 10 * FP32_IMAGE_ATOL
    np.testing.assert_allclose(quarter_by_call, quarter, rtol=0, atol=FP32_IMAGE_ATOL)


def test_joint_attention_kwargs_scale_on_a_fused_pipeline_is_refused(tiny, work):
    """Fused with "full", the strength is in the weights: a per-call scale other than 1 cannot apply (refused
    before any model runs, the pipeline left fused); a scale of 1 changes nothing and runs."""
    tiny.set_analogy(*X0)
    tiny.fuse_lora(strategy="full")
    try:
        before = state(tiny)
        work.clear()
        with pytest.raises(RuntimeError, match=r"joint_attention_kwargs\['scale'\].*unfuse_lora"):
            call(tiny, *X0, "flip", joint_attention_kwargs={"scale": 0.5})
        assert work == []
        assert_same_state(before, state(tiny))
        call(tiny, *X0, "flip", joint_attention_kwargs={"scale": 1.0})
    finally:
        tiny.unfuse_lora()


@pytest.mark.parametrize("scale", [math.nan, "0.5", None, [0.5]], ids=["nan", "str", "none", "list"])
def test_a_bad_joint_attention_scale_is_refused_before_model_work(tiny, work, scale):
    refused_before_model_work(tiny, work, (TypeError, ValueError), ["joint_attention_kwargs['scale']"],
                              lambda: call(tiny, *X0, "flip", joint_attention_kwargs={"scale": scale}))


def test_prompt_embeds_serve_a_batch_of_analogies(tiny):
    """prompt_embeds for two analogies (prompt=None, as in diffusers) used to fail with "got 1 prompts for 2
    analogies" (and prompt=[None, None] with diffusers' "Cannot forward both prompt and prompt_embeds")."""
    embeds, pooled, _ = tiny.pipe.encode_prompt(prompt=["flip", "swap"], prompt_2=None, max_sequence_length=MSL)
    want = np_call(tiny, *BATCH, ["flip", "swap"], generator=[gen(1), gen(2)])
    got = np_call(tiny, *BATCH, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                  generator=[gen(1), gen(2)])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=FP32_IMAGE_ATOL)


def test_a_prompt_and_prompt_embeds_together_are_one_line_refused_before_model_work(tiny, work):
    """diffusers' own error prints the whole prompt_embeds tensor (many lines), after the analogy encoder ran."""
    embeds, pooled, _ = tiny.pipe.encode_prompt(prompt="flip", prompt_2=None, max_sequence_length=MSL)
    refused_before_model_work(tiny, work, ValueError, ["prompt_embeds"],
                              lambda: call(tiny, *X0, "flip", prompt_embeds=embeds, pooled_prompt_embeds=pooled))


@pytest.mark.parametrize("name,prompt,kwargs", [
    ("prompt", None, {}),
    ("prompt", 3, {}),
    ("pooled_prompt_embeds", None, dict(prompt_embeds=torch.zeros(1, MSL, 24))),
    ("callback_on_step_end_tensor_inputs", "flip", dict(callback_on_step_end=lambda *a: {},
                                                       callback_on_step_end_tensor_inputs=["noise_pred"])),
])
def test_the_stock_pipelines_input_checks_come_before_model_work(tiny, work, name, prompt, kwargs):
    """diffusers' check_inputs refuses these with one line naming the argument, but only inside the stock call:
    after the analogy encoder ran and, with merge="auto", after every adapted weight was merged (a copy of ~24 GB
    on FLUX.1-Kontext)."""
    refused_before_model_work(tiny, work, (ValueError, TypeError), [name],
                              lambda: call(tiny, *X0, prompt, merge="auto", **kwargs))


@pytest.mark.parametrize("analogies,generator,per_prompt", [
    ("one", [gen(0), gen(1), gen(2)], 1),
    ("two", [gen(0)], 1),
    ("one", [gen(0)], 2),
])
def test_a_generator_list_of_the_wrong_length_is_refused_before_model_work(tiny, work, analogies, generator,
                                                                           per_prompt):
    """Used to fail inside diffusers' prepare_latents, after the analogy encoder, both text encoders and the VAE
    encoder had run."""
    images, prompt = (X0, "flip") if analogies == "one" else (BATCH, ["flip", "swap"])
    refused_before_model_work(tiny, work, ValueError, ["generator"],
                              lambda: call(tiny, *images, prompt, generator=generator,
                                           num_images_per_prompt=per_prompt))


def test_num_images_per_prompt_none_is_one_image(tiny, work):
    """The signature's ``int | None``; the wrapper counts None as 1 (merge choice, query) but used to hand None on,
    and diffusers failed in encode_prompt with a TypeError from ``repeat()``."""
    got = np_call(tiny, *X0, "flip", num_images_per_prompt=None)
    want = np_call(tiny, *X0, "flip")
    assert len(got) == 1
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("sigmas", [[], [math.nan, 0.5], [2.0, 0.5], ["1", 0.5]],
                         ids=["empty", "nan", "above-1", "str"])
def test_bad_sigmas_are_refused_before_model_work(tiny, work, sigmas):
    """The CLI checks --pipe-arg sigmas (a non-empty list of numbers in [0, 1]); the Python call did not: [] ran no
    denoising step and returned the decoded noise, NaN returned a garbage image (NaN cast to uint8)."""
    refused_before_model_work(tiny, work, (ValueError, TypeError), ["sigmas"],
                              lambda: call(tiny, *X0, "flip", sigmas=sigmas))


@pytest.mark.parametrize("name,value", [("ip_adapter_image", X0[0]),
                                        ("ip_adapter_image_embeds", [torch.zeros(1, 1, 8)]),
                                        ("negative_ip_adapter_image", X0[0])])
def test_ip_adapter_arguments_without_an_ip_adapter_are_refused_before_model_work(tiny, work, name, value):
    """Without ``load_ip_adapter`` they failed after the text encoders with "'FluxTransformer2DModel' object has no
    attribute 'encoder_hid_proj'" from torch."""
    refused_before_model_work(tiny, work, ValueError, [name], lambda: call(tiny, *X0, "flip", **{name: value}))


PER_SAMPLE_MISMATCHES = {
    # one analogy, two negative prompts: merge="auto" silently returned two images, merge="none" named set_query
    "negative_prompt": ("one", dict(negative_prompt=["a", "b"], true_cfg_scale=2.0)),
    "prompt_2": ("two", dict(prompt_2=["a", "b", "c"])),
    "negative_prompt_2": ("two", dict(negative_prompt="n", negative_prompt_2=["a", "b", "c"], true_cfg_scale=2.0)),
    "latents": ("two", dict(latents=torch.zeros(1, 256, 8))),
    # one analogy, three prompt embeddings: merge="auto" silently returned three images
    "prompt_embeds": ("one", dict(prompt_embeds=torch.zeros(3, MSL, 24), pooled_prompt_embeds=torch.zeros(3, 20))),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE_MISMATCHES))
def test_per_sample_arguments_of_another_batch_size_are_refused_before_model_work(tiny, work, name):
    analogies, kwargs = PER_SAMPLE_MISMATCHES[name]
    images, prompt = (X0, "flip") if analogies == "one" else (BATCH, ["flip", "swap"])
    if "prompt_embeds" in kwargs:
        prompt = None
    refused_before_model_work(tiny, work, ValueError, [name], lambda: call(tiny, *images, prompt, merge="auto",
                                                                          **kwargs))


@pytest.mark.parametrize("name,kwargs", [
    ("generator", dict(generator=5)),
    ("generator", dict(generator=[5])),
    ("negative_prompt", dict(negative_prompt=3, true_cfg_scale=2.0)),
    ("joint_attention_kwargs", dict(joint_attention_kwargs=3)),
    ("callback_on_step_end", dict(callback_on_step_end=3)),
    ("prompt_2", dict(prompt_2=7)),
])
def test_a_pass_through_argument_of_the_wrong_type_is_named_before_model_work(tiny, work, name, kwargs):
    """These failed inside diffusers ("'int' object has no attribute 'device'", "object of type 'int' has no
    len()", "'int' object has no attribute 'get'"), mostly after the text encoders had run."""
    refused_before_model_work(tiny, work, (TypeError, ValueError), [name],
                              lambda: call(tiny, *X0, "flip", **kwargs))


def test_a_16_bit_image_is_warned_about(tiny, tmp_path):
    """PIL's convert("RGB") of an I;16 image clips every value above 255: a 16-bit PNG comes out almost all white.
    The official inference.py reads it the same way (kept), so it is warned about, for an image and for a file;
    an 8-bit image is not."""
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    b16 = Image.fromarray(ramp)
    assert b16.mode == "I;16"
    with pytest.warns(lf.LoRWeBWarning, match=r"^b has more than 8 bits per channel \(mode I;16\).*white"):
        call(tiny, X0[0], X0[1], b16, "flip")
    with pytest.warns(lf.LoRWeBWarning):
        read = np.asarray(flux.load_image(b16))
    assert (read == 255).mean() > 0.9  # the official reading, kept
    path = tmp_path / "b16.png"
    b16.save(path)
    with pytest.warns(lf.LoRWeBWarning, match=r"b16\.png has more than 8 bits per channel"):
        flux.load_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flux.load_image(X0[2])
