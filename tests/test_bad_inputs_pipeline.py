"""LoRWeBKontextPipeline's options (issue 16, "numeric options" and "warnings"): every option is checked for type,
range and finiteness before anything runs (no encoder call, no set_query: coefficients and parameters unchanged);
unknown or reserved pipeline arguments are refused; batches with mixed or extreme aspect ratios warn."""

import math
import re
import warnings

import pytest
import torch
from PIL import Image
from torch import nn

import lorweb_fast as lf
from lorweb_fast import flux
from lorweb_fast.validation import warn_aspect_ratios

diffusers = pytest.importorskip("diffusers")


class EncoderReached(Exception):
    pass


class FakeEncoder:
    name, query_dim, query_source, query_mode = "fake", 6, "grid", "cat-aa'b"

    def __call__(self, *images):
        raise EncoderReached

    def query(self, **inputs):
        raise EncoderReached


class FakeKontext:
    """Has the stock FluxKontextPipeline.__call__ signature (the pipeline-argument check reads it); never runs."""

    __call__ = diffusers.FluxKontextPipeline.__call__
    _execution_device = torch.device("cpu")

    def __init__(self):
        torch.manual_seed(0)
        self.transformer = nn.Sequential(nn.Linear(6, 5))
        lf.inject_lorweb(self.transformer, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6,
                                                           target_modules=r"\d"))
        with torch.no_grad():
            lf.set_query(self.transformer, torch.randn(1, 6))

    def set_progress_bar_config(self, **kwargs):
        pass


@pytest.fixture
def pipe():
    return flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution="native", long_edge=64)


def picture(w=32, h=32):
    return Image.new("RGB", (w, h), (10, 200, 30))


def state(p):
    t = p.transformer
    return ({k: v.clone() for k, v in t.state_dict().items()},
            {n: l.coefficients.clone() for n, l in lf.lorweb_layers(t).items()})


BAD_OPTIONS = [
    ("num_inference_steps", 0, ValueError, r"num_inference_steps must be an integer in \[1, 10000\]"),
    ("num_inference_steps", -4, ValueError, r"num_inference_steps must be an integer in \[1, 10000\]"),
    ("num_inference_steps", 10 ** 20, ValueError, r"num_inference_steps must be an integer in \[1, 10000\]"),
    ("num_inference_steps", 2.5, TypeError, "num_inference_steps must be an integer"),
    ("num_inference_steps", True, TypeError, "num_inference_steps must be an integer"),
    ("guidance_scale", math.nan, ValueError, "guidance_scale must be finite"),
    ("guidance_scale", math.inf, ValueError, "guidance_scale must be finite"),
    ("guidance_scale", -1.0, ValueError, r"guidance_scale must be in \[0.0, 10000.0\]"),
    ("guidance_scale", 1e308, ValueError, r"guidance_scale must be in \[0.0, 10000.0\]"),
    ("guidance_scale", "2.5", TypeError, "guidance_scale must be a real number"),
    ("long_edge", 0, ValueError, "long_edge must be an integer >= 32"),
    ("long_edge", 16, ValueError, "long_edge must be an integer >= 32"),
    ("long_edge", 64.0, TypeError, "long_edge must be an integer"),
    ("merge", "yes", ValueError, "merge must be 'auto', 'none'"),
    ("output_type", "jpg", ValueError, "output_type must be 'pil' or 'np'"),
    ("foo", 1, ValueError, "unknown pipeline argument 'foo'"),
    ("height", 64, ValueError, "'height' is set by the LoRWeB pipeline"),
    ("image", None, ValueError, "'image' is set by the LoRWeB pipeline"),
    ("return_dict", False, ValueError, "'return_dict' is set by the LoRWeB pipeline"),
    ("num_images_per_prompt", 0, ValueError, "num_images_per_prompt must be an integer >= 1"),
    ("true_cfg_scale", math.nan, ValueError, "true_cfg_scale must be finite"),
    ("max_sequence_length", 0, ValueError, "max_sequence_length must be"),
]


@pytest.mark.parametrize("name,value,exc,fragment", BAD_OPTIONS)
def test_bad_generation_options_raise_before_anything_runs(pipe, name, value, exc, fragment):
    before = state(pipe)
    with pytest.raises(exc, match=fragment):
        pipe(picture(), picture(), picture(), "flip", **{name: value})
    after = state(pipe)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_good_options_reach_the_encoder(pipe):
    """Positive control: valid options pass the checks."""
    with pytest.raises(EncoderReached):
        pipe(picture(), picture(), picture(), "flip", num_inference_steps=3, guidance_scale=0.0, long_edge=32,
             merge=False, output_type="np", true_cfg_scale=1.0, negative_prompt="blur")


@pytest.mark.parametrize("long_edge,exc", [(0, ValueError), (31, ValueError), (64.5, TypeError), ("64", TypeError)])
def test_pipeline_long_edge_at_construction(long_edge, exc):
    with pytest.raises(exc, match="long_edge"):
        flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution="native", long_edge=long_edge)


OTHER_MODE_OPTIONS = [("official", {"long_edge": 64}, "long_edge applies to resolution='native'"),
                      ("native", {"max_area": 4096}, "max_area apply to resolution='official'"),
                      ("native", {"max_size": 64}, "max_size apply to resolution='official'"),
                      ("native", {"max_area": 4096, "max_size": 64}, "max_area and max_size apply")]


@pytest.mark.parametrize("resolution,options,fragment", OTHER_MODE_OPTIONS)
def test_options_of_the_other_resolution_mode_are_refused(resolution, options, fragment, tmp_path):
    """An option of the other resolution mode raises (it would be ignored) at construction, in from_pretrained before
    any model loads, and (long_edge) in the call and in control_grids."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution=resolution, **options)
    with pytest.raises(ValueError, match=re.escape(fragment)):  # the paths do not exist: nothing was loaded first
        flux.LoRWeBKontextPipeline.from_pretrained(tmp_path / "no-model", tmp_path / "no-weights.safetensors",
                                                   resolution=resolution, **options)
    if resolution == "official":
        pipe = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder())
        with pytest.raises(ValueError, match=re.escape(fragment)):
            pipe(picture(), picture(), picture(), "flip", long_edge=64)
        with pytest.raises(ValueError, match=re.escape(fragment)):
            pipe.control_grids(picture(), picture(), picture(), long_edge=64)


def test_each_resolution_mode_has_its_default():
    official = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder())
    native = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution="native")
    assert (official.max_area, official.long_edge) == (1024 ** 2, None)
    assert (native.long_edge, native.max_area, native.max_size) == (1024, None, None)


# ---------------------------------------------------------------------------------------------- aspect ratios
ASPECT_CASES = [  # (case, resolution, a sizes, a' sizes, b sizes, warning fragment)
    ("mixed b ratios, native", "native", [(32, 32)] * 2, [(32, 32)] * 2, [(32, 32), (64, 32)],
     "the b images of this batch have different aspect ratios"),
    ("mixed a ratios, official", "official", [(32, 32), (48, 32)], [(32, 32)] * 2, [(32, 32)] * 2,
     "the a images of this batch have different aspect ratios"),
    ("extreme b", "official", [(32, 32)], [(32, 32)], [(200, 20)], "b[0] is 200x20"),
    ("extreme a", "native", [(20, 200)], [(32, 32)], [(32, 32)], "a[0] is 20x200"),
    ("extreme a_prime", "official", [(32, 32)], [(500, 100)], [(32, 32)], "a_prime[0] is 500x100"),
]


@pytest.mark.parametrize("case,resolution,a,a2,b,fragment", ASPECT_CASES)
def test_surprising_aspect_ratios_warn(case, resolution, a, a2, b, fragment):
    """The cells take b's shape at the native resolution and a's at the official one: a batch whose shaping
    images differ is stretched to the first one's shape."""
    pipe = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution=resolution,
                                      long_edge=64 if resolution == "native" else None)
    images = [[picture(*s) for s in sizes] for sizes in (a, a2, b)]
    with pytest.warns(UserWarning, match=re.escape(fragment)):
        with pytest.raises(EncoderReached):
            pipe(*images, ["flip"] * len(b))


def test_official_resolution_ignores_mixed_b_ratios():
    """At the official resolution b's shape does not set the cells, so mixed b ratios are no reason to warn."""
    pipe = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution="official")
    images = [[picture(32, 32)] * 2, [picture(32, 32)] * 2, [picture(32, 32), picture(64, 32)]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(EncoderReached):
            pipe(*images, ["flip"] * 2)


@pytest.mark.parametrize("sizes", [[(32, 32), (48, 48)], [(64, 32), (128, 64)], [(40, 10)]])
def test_ordinary_aspect_ratios_do_not_warn(sizes):
    ims = [picture(*s) for s in sizes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_aspect_ratios(ims, ims, ims)


# ---------------------------------------------------------------------------------------------- query crops
class CropsRecorder(FakeEncoder):
    def __init__(self):
        self.crops = []

    def query(self, **inputs):
        self.crops.append(inputs["crops"])
        raise EncoderReached


@pytest.mark.parametrize("resolution,crops", [("official", "inference"), ("native", "cells")])
def test_each_resolution_queries_its_crops(resolution, crops):
    """The official resolution takes the official inference crops; the native one, whose cells take b's shape, the
    grid's own cells (squares of side W/2 would cut across non-square cells)."""
    encoder = CropsRecorder()
    pipe = flux.LoRWeBKontextPipeline(FakeKontext(), encoder, resolution=resolution)
    with pytest.raises(EncoderReached):
        pipe(picture(), picture(), picture(64, 32), "flip")
    assert encoder.crops == [crops]


def test_official_resolution_names_an_a_too_wide_for_the_official_crops():
    """Cells take a's shape: an a of 2:1 or wider leaves the official W/2 squares no b to cut (as the official
    code); the error names a and the native resolution, before the encoder runs."""
    pipe = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder())
    with pytest.raises(ValueError, match=r"a\[1\] is 64x32: at the official resolution the cells take a's shape.*"
                                         r"resolution='native'"):
        pipe([picture(), picture(64, 32)], [picture()] * 2, [picture()] * 2, "flip")
    native = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution="native")
    with pytest.raises(EncoderReached):
        native([picture(), picture(64, 32)], [picture()] * 2, [picture()] * 2, "flip")


@pytest.mark.parametrize("size", [(1, 1), (4, 4), (7, 12), (12, 7)])
def test_official_resolution_names_an_a_too_small_for_the_pipeline(pipe, size):
    """Cells take a's size: a grid side below the pipeline's multiple (2 * vae_scale_factor, 16 for FLUX) is rounded
    to 0 by FluxKontextPipeline (a ZeroDivisionError deep inside it); the error names a, before anything runs."""
    official = flux.LoRWeBKontextPipeline(pipe.pipe, FakeEncoder())
    before = state(official)
    with pytest.raises(ValueError, match=rf"a\[0\] is {size[0]}x{size[1]}: .*multiples of 16, to 0 here"):
        official(picture(*size), picture(), picture(), "flip")
    after = state(official)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    with pytest.raises(EncoderReached):  # 8x8 cells: a 16x16 grid
        official(picture(8, 8), picture(), picture(), "flip")


def test_official_resolution_names_max_size_when_it_makes_the_grid_too_small(pipe):
    """A 64x20 a is large enough, but max_size=32 scales its 128x40 grid to 32x10: the error names max_size, not
    "a larger a (at least 8 px on a side)", which a already is."""
    official = flux.LoRWeBKontextPipeline(pipe.pipe, FakeEncoder(), max_size=32)
    with pytest.raises(ValueError, match=r"a\[0\] is 64x20: .*128x40 control grid .* scaled to 32x10 by "
                                         r"max_size=32.*to 0 here; use a less elongated a or a larger max_size"):
        official(picture(64, 20), picture(), picture(), "flip")


def test_seed_is_not_checked_when_a_generator_is_given(pipe):
    """seed is used only without a generator: generator=g with seed=None (a caller forwarding an unset seed) runs
    as before the seed check came."""
    with pytest.raises(EncoderReached):
        pipe(picture(), picture(), picture(), "flip", generator=torch.Generator().manual_seed(1), seed=None)
    with pytest.raises(TypeError, match="seed must be an integer"):
        pipe(picture(), picture(), picture(), "flip", seed=None)


def test_set_adapters_takes_diffusers_per_component_weights(pipe):
    """diffusers' ``set_adapters(name, {"transformer": s})`` sets the strength; a component LoRWeB does not adapt
    is named and changes nothing."""
    pipe.set_adapters("lorweb", {"transformer": 0.25})
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.25
    pipe.set_adapters(["lorweb"], [{"transformer": 0.5}])
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.5
    with pytest.raises(ValueError, match=r"components \['text_encoder'\]: LoRWeB adapts the transformer only"):
        pipe.set_adapters("lorweb", {"transformer": 2.0, "text_encoder": 0.5})
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.5


def test_a_pipeline_without_its_adapter_names_load_lora_weights(pipe):
    """After unload_lora_weights() an analogy has nothing to set: the call and set_analogy name the way back
    instead of failing inside the merge choice or set_query."""
    pipe.unload_lora_weights()
    for merge in ("auto", "none", "full"):
        with pytest.raises(ValueError, match=r"holds no LoRWeB adapter.*pipe\.load_lora_weights"):
            pipe(picture(), picture(), picture(), "flip", merge=merge)
    with pytest.raises(ValueError, match="holds no LoRWeB adapter"):
        pipe.set_analogy(picture(), picture(), picture())


@pytest.mark.parametrize("progress", ["yes", 1])
def test_progress_must_be_a_bool_or_none(pipe, progress):
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        pipe(picture(), picture(), picture(), "flip", progress=progress)


@pytest.mark.parametrize("seed,exc", [("50", TypeError), (50.0, TypeError), (-1, ValueError)])
def test_a_seed_that_is_no_non_negative_integer_is_named(pipe, seed, exc):
    """As --seed: named before anything runs, not torch.Generator.manual_seed's "expected a long" or a negative
    seed that the CLI refuses."""
    with pytest.raises(exc, match="seed must be an integer"):
        pipe(picture(), picture(), picture(), "flip", seed=seed)


@pytest.mark.parametrize("resolution", ["official", "native"])
def test_an_empty_batch_is_named(resolution):
    pipe = flux.LoRWeBKontextPipeline(FakeKontext(), FakeEncoder(), resolution=resolution)
    with pytest.raises(ValueError, match="no analogies given"):
        pipe([], [], [], "flip")


@pytest.mark.parametrize("options,exc,fragment", [({"resolution": "foo"}, ValueError, "resolution must be one of"),
                                                  ({"resolution": "native", "long_edge": 8}, ValueError, "long_edge"),
                                                  ({"max_area": -5}, ValueError, "max_area"),
                                                  ({"max_size": 1}, ValueError, "max_size"),
                                                  ({"max_area": 1.5}, TypeError, "max_area")])
def test_from_pretrained_checks_option_values_before_loading(options, exc, fragment, tmp_path):
    """The paths do not exist: an option value is refused before anything (encoder, pipeline) loads."""
    with pytest.raises(exc, match=fragment):
        flux.LoRWeBKontextPipeline.from_pretrained(tmp_path / "no-model", tmp_path / "no-weights.safetensors",
                                                   **options)
