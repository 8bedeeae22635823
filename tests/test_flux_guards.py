"""Guards for lorweb_fast/flux.py found by a mutation audit: which image lands in which grid cell, the grid sizes of
the official and native resolutions (max_size cap, cell rounding), the crop of b' out of the generated grid, the
arguments the wrapper hands to the stock FluxKontextPipeline (official defaults: 28 steps, guidance 2.5, seed 50,
max_area 1024**2 with _auto_resize; native: the grid's own area), the prompts of a batch, the query each resolution
computes, and the merge strategy choice.

Expected values come from small references written here from the official source (NVlabs/LoRWeB inference.py
``process_control_image_with_replace`` and ``main``; extensions_built_in/flux_kontext.py ``get_external_query``) or
by hand on tiny inputs. The stock pipeline's ``__call__`` is replaced by a recorder in the pipeline tests, so
nothing is denoised and the file stays fast; nothing is downloaded.
"""

import contextlib
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lorweb_fast import flux
from lorweb_fast.testing import (device_recording_generator, random_rgb_image, reference_clip_pixels,
                                 tiny_kontext_with_encoder)

pytest.importorskip("diffusers")

RED, GREEN, BLUE, WHITE = (200, 0, 0), (0, 200, 0), (0, 0, 200), (250, 250, 250)
QUADRANTS = ((10, 0, 0), (0, 10, 0), (0, 0, 10), (200, 100, 50))  # TL, TR, BL, BR of a fake generated grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny in-memory FluxKontextPipeline with a random LoRWeB basis and a tiny CLIP encoder (fp32)."""
    return tiny_kontext_with_encoder(tmp_path_factory.mktemp("flux_guards"))


def solid(size, color):
    return Image.new("RGB", size, color)


def picture(seed, size):
    """A deterministic picture with structure (so that different crops give different embeddings)."""
    rng = np.random.default_rng(seed)
    return random_rgb_image(rng, size[0], size[1])


def fake_grid(width, height):
    """What the recorder 'generates': a grid whose four quadrants (split at W // 2, H // 2) have known colours."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    x, y = width // 2, height // 2
    arr[:y, :x], arr[:y, x:], arr[y:, :x], arr[y:, x:] = QUADRANTS
    return arr


@pytest.fixture
def recorder(monkeypatch):
    """Replace FluxKontextPipeline.__call__ (and set_query as flux uses it) by recorders; returns the records."""
    from diffusers import FluxKontextPipeline

    calls, queries = [], []

    def fake_call(self, **kwargs):
        calls.append(kwargs)
        n = len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1
        n *= int(kwargs.get("num_images_per_prompt") or 1)
        arrays = [fake_grid(kwargs["width"], kwargs["height"]) for _ in range(n)]
        if kwargs.get("output_type") == "np":
            return types.SimpleNamespace(images=np.stack(arrays).astype(np.float32) / 255)
        return types.SimpleNamespace(images=[Image.fromarray(a) for a in arrays])

    real_set_query = flux.set_query

    def spy_set_query(model, query, *args, **kwargs):
        queries.append(query.detach().clone())
        return real_set_query(model, query, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", fake_call)
    monkeypatch.setattr(flux, "set_query", spy_set_query)
    return types.SimpleNamespace(calls=calls, queries=queries)


def reference_official_grid(a, a2, b, max_size=None):
    """inference.py ``process_control_image_with_replace``: cells at a's size (a', b bicubic), [a a'; b b]; with
    max_size, a grid whose side exceeds it is resized (bicubic) to (max_size, int(h*max_size/w)) when w > h, else
    (int(w*max_size/h), max_size)."""
    w, h = a.size
    grid = Image.new("RGB", (2 * w, 2 * h))
    grid.paste(a.resize((w, h), Image.BICUBIC), (0, 0))
    grid.paste(a2.resize((w, h), Image.BICUBIC), (w, 0))
    grid.paste(b.resize((w, h), Image.BICUBIC), (0, h))
    grid.paste(b.resize((w, h), Image.BICUBIC), (w, h))
    if max_size is not None and (2 * w > max_size or 2 * h > max_size):
        size = (max_size, int(h * max_size / w)) if w > h else (int(w * max_size / h), max_size)
        grid = grid.resize(size, Image.BICUBIC)
    return grid


def reference_clip_query(encoder, boxes, grid):
    """concat of the tiny CLIP's image_embeds of the crops ``boxes`` (the "cat-aa'b" query), computed with the raw
    transformers model and a hand-written slow CLIP processor (get_external_query / encode_image)."""
    size = encoder.model.config.image_size
    with torch.no_grad():
        embeds = [encoder.model(pixel_values=reference_clip_pixels(grid.crop(box), size)).image_embeds
                  for box in boxes]
    return torch.cat(embeds, dim=1)


# ----------------------------------------------------------------------------------------------------- grids
def test_official_grid_puts_each_image_in_its_cell_at_a_size():
    """[a a'; b b] with every cell at a's size (not b's), b also in the bottom-right cell."""
    grid = flux.official_control_grid(solid((20, 12), RED), solid((30, 30), GREEN), solid((10, 40), BLUE))
    assert grid.size == (40, 24)
    px = grid.load()
    assert [px[10, 6], px[30, 6], px[10, 18], px[30, 18]] == [RED, GREEN, BLUE, BLUE]


@pytest.mark.parametrize("a_size, max_size, want", [
    ((40, 10), 60, (60, 15)),   # only the width exceeds: the official test is "or"
    ((10, 40), 60, (15, 60)),   # only the height exceeds
    ((30, 13), 50, (50, 21)),   # int(13 * 50 / 30) = int(21.67) truncates
    ((13, 30), 50, (21, 50)),
    ((20, 20), 100, (40, 40)),  # within the cap: unchanged
])
def test_official_max_size_cap(a_size, max_size, want):
    """inference.py ``-m``: the long edge capped at max_size, the other side truncated, "or" of both sides."""
    a, a2, b = picture(0, a_size), picture(1, (17, 23)), picture(2, (25, 9))
    grid = flux.official_control_grid(a, a2, b, max_size=max_size)
    assert grid.size == want
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(reference_official_grid(a, a2, b, max_size)))


def test_official_max_size_below_two_is_refused():
    """A cap below 2 pixels leaves no cell to resize to: refused by name."""
    with pytest.raises(ValueError, match="at least 2"):
        flux.official_control_grid(solid((20, 12), RED), solid((8, 8), GREEN), solid((8, 8), BLUE), max_size=1)


def test_bottom_right_cell_of_odd_grids():
    """The official crop (W // 2, H // 2, W, H): on a 7x5 grid the 4x3 block starting at (3, 2)."""
    arr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    cell = flux.bottom_right_cell(Image.fromarray(arr))
    assert cell.size == (4, 3)
    np.testing.assert_array_equal(np.asarray(cell), arr[2:, 3:])


@pytest.mark.parametrize("b_size, long_edge, cell", [
    ((100, 50), 64, (32, 16)),   # scale 64 / 200 = 0.32
    ((20, 10), 512, (16, 16)),   # never upscaled; floored to 16, at least 16
    ((40, 25), 512, (32, 16)),   # floored, not rounded up
    ((100, 30), 64, (32, 16)),   # 9.6 px high -> at least 16
])
def test_native_grid_cell_size_from_b(b_size, long_edge, cell):
    """Native cells: b's aspect, grid long edge <= long_edge, sides floored to multiples of 16 (at least 16); a's
    shape plays no part."""
    a = solid((b_size[1], b_size[0]), RED)  # a of the transposed shape
    grid = flux.make_grid(a, a, solid(b_size, BLUE), solid(b_size, BLUE), long_edge=long_edge)
    assert grid.size == (2 * cell[0], 2 * cell[1])
    grid = flux.control_grid(a, a, solid(b_size, BLUE), long_edge=long_edge)
    assert grid.size == (2 * cell[0], 2 * cell[1])


def test_make_grid_and_control_grid_cell_order():
    """make_grid is [tl tr; bl br] in reading order; control_grid repeats b bottom-right."""
    cw, ch = 32, 16
    grid = flux.make_grid(solid((8, 4), RED), solid((8, 4), GREEN), solid((8, 4), BLUE), solid((8, 4), WHITE),
                          cell_size=(cw, ch))
    px = grid.load()
    assert [px[5, 5], px[cw + 5, 5], px[5, ch + 5], px[cw + 5, ch + 5]] == [RED, GREEN, BLUE, WHITE]
    grid = flux.control_grid(solid((64, 32), RED), solid((64, 32), GREEN), solid((64, 32), BLUE), long_edge=64)
    px = grid.load()
    assert grid.size == (64, 32)
    assert [px[5, 5], px[37, 5], px[5, 21], px[37, 21]] == [RED, GREEN, BLUE, BLUE]


# -------------------------------------------------------------------------------------------------- pipeline
def test_official_call_hands_the_official_arguments_to_the_stock_pipeline(tiny, recorder):
    """inference.py main: pipe(image=grid, height/width of the grid, guidance 2.5, the pipeline's default 28 steps,
    a generator seeded 50 on the device) at max_area 1024**2 with the control image snapped (_auto_resize);
    b' is the bottom-right quarter of the output."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    a, a2, b = picture(0, (24, 20)), picture(1, (30, 30)), picture(2, (16, 40))
    (out,) = lp(a, a2, b, "mirror", progress=False)
    (kw,) = recorder.calls
    grid = reference_official_grid(a, a2, b)
    np.testing.assert_array_equal(np.asarray(kw["image"]), np.asarray(grid))
    assert (kw["width"], kw["height"]) == grid.size == (48, 40)
    assert kw["num_inference_steps"] == 28 and kw["guidance_scale"] == 2.5
    assert kw["max_area"] == 1024 ** 2 and kw["_auto_resize"] is True
    assert torch.equal(kw["generator"].get_state(), torch.Generator().manual_seed(50).get_state())
    assert out.size == (24, 20)
    assert (np.asarray(out) == np.array(QUADRANTS[3], np.uint8)).all()


def test_the_default_generator_lives_on_the_execution_device(tiny, recorder, monkeypatch):
    """inference.py main seeds ``torch.Generator(device=...)`` on the device the pipeline runs on (a CPU and a CUDA
    generator draw different noise from one seed): the default generator is made on ``_execution_device``, here
    pretended to be a GPU (the stand-in generator is a CPU one, so nothing needs a GPU)."""
    from diffusers import FluxKontextPipeline

    pipe, encoder = tiny
    made, real = [], torch.Generator
    monkeypatch.setattr(FluxKontextPipeline, "_execution_device", property(lambda self: torch.device("cuda", 1)))
    monkeypatch.setattr(torch, "Generator", device_recording_generator(made))
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    lp(picture(0, (24, 20)), picture(1, (30, 30)), picture(2, (16, 40)), "mirror", progress=False)
    assert made == [torch.device("cuda", 1)]
    assert torch.equal(recorder.calls[0]["generator"].get_state(), real().manual_seed(50).get_state())


def test_official_max_area_and_max_size_reach_the_call(tiny, recorder):
    """max_area given to the wrapper is the area the stock pipeline generates; max_size caps the grid."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, max_area=48 * 48, max_size=40)
    a, a2, b = picture(0, (30, 20)), picture(1, (30, 30)), picture(2, (16, 40))
    lp(a, a2, b, "mirror", progress=False, num_inference_steps=1)
    (kw,) = recorder.calls
    assert kw["max_area"] == 48 * 48 and kw["_auto_resize"] is True
    assert (kw["width"], kw["height"]) == kw["image"].size == (40, 26)


def test_native_call_generates_at_the_grid_size(tiny, recorder):
    """Native: the grid at b's aspect (a per-call long_edge overrides the pipeline's), generated at the grid's own
    area with _auto_resize off; np output is the bottom-right quarter of a non-square grid."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=128)
    a, a2, b = picture(0, (40, 40)), picture(1, (30, 30)), picture(2, (100, 50))
    (out,) = lp(a, a2, b, "mirror", progress=False, long_edge=64, output_type="np", num_inference_steps=1)
    (kw,) = recorder.calls
    assert (kw["width"], kw["height"]) == kw["image"].size == (64, 32)
    assert kw["max_area"] == 64 * 32 and kw["_auto_resize"] is False
    assert out.shape == (16, 32, 3)
    np.testing.assert_allclose(out, np.broadcast_to(np.array(QUADRANTS[3], np.float32) / 255, out.shape))


def test_official_non_square_np_output_is_the_bottom_right_quarter(tiny, recorder):
    """np output of a non-square grid: rows H // 2 onwards, columns W // 2 onwards."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    (out,) = lp(picture(0, (24, 16)), picture(1, (8, 8)), picture(2, (8, 8)), "x", progress=False,
                output_type="np", num_inference_steps=1)
    assert out.shape == (16, 24, 3)
    np.testing.assert_allclose(out, np.broadcast_to(np.array(QUADRANTS[3], np.float32) / 255, out.shape))


def test_batch_prompts_are_passed_per_analogy(tiny, recorder):
    """B analogies get their B prompts (a string is broadcast); a prompt list of another length is refused."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    a = [picture(0, (16, 16)), picture(3, (16, 16))]
    a2 = [picture(1, (16, 16)), picture(4, (16, 16))]
    b = [picture(2, (16, 16)), picture(5, (16, 16))]
    outs = lp(a, a2, b, ["one", "two"], progress=False, num_inference_steps=1)
    assert len(outs) == 2 and recorder.calls[-1]["prompt"] == ["one", "two"]
    lp(a, a2, b, "both", progress=False, num_inference_steps=1)
    assert recorder.calls[-1]["prompt"] == ["both", "both"]
    with pytest.raises(ValueError, match="prompts for 2 analogies"):
        lp(a, a2, b, ["only one"], progress=False, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        lp(a, a2, b, "x", progress=False, num_inference_steps=1, num_images_per_prompt=2)


def test_each_resolution_queries_its_own_crops(tiny, recorder):
    """Official: squares of side W // 2 cut from the official grid (get_external_query, PIL path); native: the
    grid's own cells (non-square here, so the two differ)."""
    pipe, encoder = tiny
    a, a2, b = picture(0, (24, 16)), picture(1, (30, 30)), picture(2, (60, 20))
    flux.LoRWeBKontextPipeline(pipe, encoder)(a, a2, b, "x", progress=False, num_inference_steps=1)
    grid = reference_official_grid(a, a2, b)
    s, (w, h) = grid.size[0] // 2, grid.size
    want = reference_clip_query(encoder, [(0, 0, s, s), (s, 0, w, s), (0, s, s, h)], grid)
    torch.testing.assert_close(recorder.queries[-1], want, rtol=1e-4, atol=1e-5)

    native = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    native(a, a2, b, "x", progress=False, num_inference_steps=1)
    grid = recorder.calls[-1]["image"]
    (w, h), (x, y) = grid.size, (grid.size[0] // 2, grid.size[1] // 2)
    assert (w, h) == (64, 32)
    want = reference_clip_query(encoder, [(0, 0, x, y), (x, 0, w, y), (0, y, x, h)], grid)
    torch.testing.assert_close(recorder.queries[-1], want, rtol=1e-4, atol=1e-5)


def test_merge_strategy_choice(tiny):
    """merge=True is "full"; "auto" runs a batch of several analogies unmerged."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    assert lp.merge_strategy(True, 1) == "full"
    assert lp.merge_strategy(False, 1) == lp.merge_strategy("none", 1) == "none"
    assert lp.merge_strategy("auto", 2) == "none"
    assert lp.merge_strategy("auto", 3) == "none"


def test_aspect_warning_follows_the_images_that_shape_the_cells(tiny, recorder):
    """Official cells take a's shape: a batch whose a's differ in aspect warns, one whose b's differ does not."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    sq, wide = picture(0, (16, 16)), picture(1, (24, 16))
    with pytest.warns(UserWarning, match="the a images of this batch"):
        lp([sq, wide], [sq, sq], [sq, sq], "x", progress=False, num_inference_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp([sq, sq], [sq, sq], [sq, wide], "x", progress=False, num_inference_steps=1)


def test_long_edge_is_refused_at_the_official_resolution(tiny):
    """long_edge is the native cap: given with the official resolution it raises instead of being ignored."""
    pipe, encoder = tiny
    with pytest.raises(ValueError, match="long_edge applies to resolution='native'"):
        flux.LoRWeBKontextPipeline(pipe, encoder, long_edge=64)
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    with pytest.raises(ValueError, match="long_edge applies"):
        lp(picture(0, (16, 16)), picture(1, (16, 16)), picture(2, (16, 16)), "x", long_edge=64, progress=False)


def test_training_crops_refuse_a_grid_whose_a_prime_is_empty(tiny):
    """Training crops have side s = H // 2: a grid exactly s wide leaves a' = [:s, s:W] empty and is refused by name
    (one pixel wider is accepted)."""
    _, encoder = tiny
    with pytest.raises(ValueError, match="too tall for the official training crops"):
        encoder.query_from_grid(picture(0, (16, 32)), crops="training")
    assert encoder.query_from_grid(picture(0, (17, 32)), crops="training").shape == (1, encoder.query_dim)


# ------------------------------------------------------------------------------------ merges, strength, encoder
def test_full_merge_refuses_layers_sharing_one_weight():
    """"full" and "offload" put each layer's merged weight in place of its base weight: two layers tied to one
    weight tensor cannot hold two mixtures and are refused before anything changes; "jit" serves them."""
    from lorweb_fast.model import LoRWeBConfig, inject_lorweb, lorweb_layers, set_query

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)).eval()
    m[1].weight = m[0].weight
    inject_lorweb(m, LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=3, target_modules=["0", "1"]))
    with torch.no_grad():
        for layer in lorweb_layers(m).values():
            layer.lora_B.normal_()
        set_query(m, torch.randn(1, 3))
    before = m[0].base_layer.weight.detach().clone()
    for strategy in ("full", "offload"):
        with pytest.raises(ValueError, match="shares its weight storage"):
            with flux.merged(m, strategy):
                pass
        assert torch.equal(m[0].base_layer.weight, before)
    with flux.merged(m, "jit"):
        pass


@contextlib.contextmanager
def at_strength(tiny, strength):
    """The shared tiny pipeline wrapped, an analogy set and the strength ``strength``; unfused and back at strength 1
    afterwards."""
    from lorweb_fast import lora_api

    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    lp.set_analogy(picture(0, (16, 16)), picture(1, (16, 16)), picture(2, (16, 16)))
    lp.set_lorweb_scale(strength)
    try:
        yield lp
    finally:
        if lora_api.fused_strategy(pipe.transformer) is not None:
            lp.unfuse_lora()
        lp.set_lorweb_scale(1.0)


def test_fuse_lora_scale_multiplies_the_strength_set_before(tiny):
    """fuse_lora(lora_scale=s) fuses at (strength before) * s and gives the strength before back on unfuse."""
    from lorweb_fast import lora_api

    with at_strength(tiny, 2.0) as lp:
        lp.fuse_lora("jit", lora_scale=0.25)
        assert lora_api.get_lorweb_scale(lp.transformer) == 0.5
        lp.unfuse_lora()
        assert lora_api.get_lorweb_scale(lp.transformer) == 2.0


def test_images_query_source_needs_the_cat_mode(tiny):
    """query_source='images' encodes a, a', b separately: any other query mode is refused."""
    _, encoder = tiny
    with pytest.raises(ValueError, match="cannot be combined"):
        flux.AnalogyEncoder(encoder.name, query_mode="caa'", query_source="images")


def test_native_default_long_edge_is_1024(tiny):
    """Native resolution without long_edge: the grid's long edge is capped at 1024 (DEFAULT_LONG_EDGE)."""
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native")
    big = solid((1200, 600), BLUE)
    (grid,) = lp.control_grids(solid((64, 64), RED), solid((64, 64), GREEN), big)
    assert grid.size == (1024, 512)


def test_a_failed_fuse_gives_the_strength_back(tiny):
    """fuse_lora(lora_scale=...) that fails (an unknown strategy) leaves the strength as it was before the call."""
    from lorweb_fast import lora_api

    with at_strength(tiny, 2.0) as lp:
        with pytest.raises(ValueError):
            lp.fuse_lora("bogus", lora_scale=0.25)
        assert lora_api.fused_strategy(lp.transformer) is None
        assert lora_api.get_lorweb_scale(lp.transformer) == 2.0


def test_offload_is_chosen_only_when_host_memory_holds_the_copy(monkeypatch):
    """choose_merge_strategy on a GPU model: "offload" needs the copy of the adapted weights (with headroom) to fit
    in free host memory, else "jit". The model is a stand-in whose weights report a CUDA device."""
    weight = types.SimpleNamespace(device=torch.device("cuda", 0))
    layer = types.SimpleNamespace(base_layer=types.SimpleNamespace(weight=weight))
    monkeypatch.setattr(flux, "lorweb_layers", lambda model: {"l": layer})
    monkeypatch.setattr(flux, "adapted_weight_bytes", lambda model: 1000)
    monkeypatch.setattr(flux, "has_plain_weight", lambda base: True)  # (the stand-in: a mergeable base)
    monkeypatch.setattr(flux, "has_forward_hooks", lambda base: False)
    monkeypatch.setattr(flux, "in_place_merge_problem", lambda model, layers, strategy: None)  # (no tensors)
    model = torch.nn.Module()
    assert flux.choose_merge_strategy(model, free_bytes=1000, host_free_bytes=1000) == "jit"  # 1000 > 0.75 * 1000
    assert flux.choose_merge_strategy(model, free_bytes=1000, host_free_bytes=1400) == "offload"
    assert flux.choose_merge_strategy(model, free_bytes=1400, host_free_bytes=0) == "full"
