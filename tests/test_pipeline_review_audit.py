"""Review audit of ``LoRWeBKontextPipeline`` inference (lorweb_fast/flux.py) against the official inference
(NVlabs/LoRWeB inference.py and extensions_built_in/flux_kontext.py ``CustomFluxKontextPipeline.__call__``, whose
sizing is diffusers' ``FluxKontextPipeline.__call__``). One test per confirmed defect; each fails on the code as
reviewed. Tiny in-memory models, CPU, one denoising step."""

import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import demo, flux
from lorweb_fast.testing import random_analogy, tiny_kontext_with_encoder

pytest.importorskip("diffusers")

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
FP32_IMAGE_ATOL = 1e-4
#: a small list of preferred Kontext resolutions, patched in so that the official resolution stays fast on CPU
SMALL_RESOLUTIONS = [(48, 80), (64, 64), (72, 56), (80, 48)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe, encoder = tiny_kontext_with_encoder(tmp_path_factory.mktemp("pipeline_review"), eval_mode=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, encoder


@pytest.fixture
def small_resolutions(monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext

    monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", SMALL_RESOLUTIONS)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def picture(seed, size):
    return demo._random_picture(random.Random(seed), max(size)).resize(size, Image.BICUBIC)


def test_official_batch_of_nearly_equal_aspect_ratios_matches_solo_or_warns(tiny, small_resolutions):
    """Official resolution, a batch whose a images differ in aspect ratio by less than the 1% tolerance of
    ``validation.warn_aspect_ratios`` (128x127 vs 64x64), one generator per analogy.

    Now: the second analogy's b' comes out at another size than in a call of its own (24x24 instead of 24x22:
    ``__call__`` generates every grid at ``grids[0].size``'s aspect, and the stock pipeline floors
    ``round(sqrt(max_area * aspect))`` to the multiple, so a 0.8% aspect difference moves a side across a multiple),
    and no warning says so (``warn_grid_sizes``' docstring claims the official resolution needs none).
    Should: match the solo call (``generator`` docstring: one per analogy "matches one-by-one runs"), or warn that
    the batch changes its size. The official inference (inference.py ``main``, flux_kontext.py
    ``CustomFluxKontextPipeline.__call__``) generates each analogy at the size its own grid gives."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, max_area=2260)
    x0 = (picture(0, (64, 64)), picture(1, (64, 64)), picture(2, (64, 64)))
    x1 = (picture(3, (128, 127)), picture(4, (64, 64)), picture(5, (64, 64)))
    kw = dict(num_inference_steps=1, max_sequence_length=MSL, output_type="np", merge="none", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (solo,) = lp(*x1, "flip", generator=gen(6), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = lp(*[[p, q] for p, q in zip(x0, x1)], ["flip", "flip"], generator=[gen(5), gen(6)], **kw)
    warned = [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)]
    matches = batch[1].shape == solo.shape and np.abs(batch[1] - solo).max() <= FP32_IMAGE_ATOL
    assert matches or warned, f"batched b' {batch[1].shape} vs solo {solo.shape}, no warning"


def test_a_tuple_of_generators_works_like_a_list(tiny):
    """``generator=(g0, g1)``: ``validation.check_pipe_call`` accepts a tuple (``isinstance(generator, (list,
    tuple))``), as the wrapper accepts tuples of images and prompts, but ``__call__`` hands the tuple to diffusers,
    whose ``randn_tensor`` tests ``isinstance(generator, list)`` only.

    Now: ``AttributeError: 'tuple' object has no attribute 'device'`` from inside diffusers, after the analogy
    encoder and the text encoders ran. Should: the same b' as ``generator=[g0, g1]`` (or a one-line refusal before
    any model runs). The official inference.py passes one ``torch.Generator``; diffusers takes a list."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    x0, x1 = random_analogy(0), random_analogy(1)
    a, a_prime, b = ([p, q] for p, q in zip(x0, x1))
    kw = dict(num_inference_steps=1, max_sequence_length=MSL, output_type="np", merge="none", progress=False)
    want = lp(a, a_prime, b, ["flip", "flip"], generator=[gen(5), gen(6)], **kw)
    got = lp(a, a_prime, b, ["flip", "flip"], generator=(gen(5), gen(6)), **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=FP32_IMAGE_ATOL)


def test_official_generation_side_rounded_to_zero_is_named_before_model_work(tiny, small_resolutions):
    """Official resolution with an accepted ``max_area`` (>= ``validation.MIN_MAX_AREA``) and an elongated a:
    the stock pipeline's generation size, ``round(sqrt(max_area * aspect))`` floored to the multiple
    (2 * vae_scale_factor), is 0 on one side. ``_query`` / ``official_grid_problem`` check only the control
    grid's sides, not the generation size.

    Now: every model runs, then the VAE decoder fails with ``RuntimeError: Calculated padded input size per
    channel ... Kernel size can't be greater than actual input size`` (the stock pipeline logs "adjusted to 296 and
    0"). Should: a ValueError naming a and max_area before any model runs, as for an a too small for the grid
    (diffusers ``FluxKontextPipeline.__call__`` / flux_kontext.py ``CustomFluxKontextPipeline.__call__`` compute
    that size)."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, max_area=1024)
    a = Image.new("RGB", (8, 700), (200, 10, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="max_area"):
            lp(a, a, a, "flip", num_inference_steps=1, max_sequence_length=MSL, output_type="np", merge="none",
               progress=False)
