"""How lorweb_fast/flux.py wires images, encoders, merges and the pipeline wrapper together (from a mutation audit
of lorweb_fast/flux.py: each test failed a hand-made change that the rest of the suite let pass): load_image's RGB
conversion and type error, the bicubic cells of the native grid, the crop check that only the grid query needs,
merged_weight's one-analogy check, the bytes, free memory and headroom behind choose_merge_strategy, the analogy
encoder (frozen on its device, the "caa'" training crops, its error paths), analogy coefficients without autograd
history, a call on a fused pipeline, from_pretrained's device, and the wrapper's refusals (a transformer without
LoRWeB layers, unfuse_lora without the transformer). The comment above each test names the mutant it kills.

Everything runs on tiny random models built here (lorweb_fast.testing); nothing is downloaded.
"""

import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lorweb_fast as lf
from lorweb_fast import flux
from lorweb_fast.testing import random_rgb_image, tiny_kontext_with_encoder, tiny_lorweb_linear_model

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny in-memory FluxKontextPipeline with a random LoRWeB basis and a tiny CLIP encoder (fp32)."""
    return tiny_kontext_with_encoder(tmp_path_factory.mktemp("flux_wiring"))


def picture(seed, size):
    return random_rgb_image(np.random.default_rng(seed), size[0], size[1])


def analogy(seed=0):
    return picture(seed, (16, 16)), picture(seed + 1, (16, 16)), picture(seed + 2, (16, 16))


@pytest.fixture
def recorder(monkeypatch):
    """FluxKontextPipeline.__call__ replaced by a recorder of its keyword arguments that 'generates' grey grids:
    nothing is denoised."""
    from diffusers import FluxKontextPipeline

    calls = []

    def fake_call(self, **kwargs):
        calls.append(kwargs)
        n = (len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1) * int(
            kwargs.get("num_images_per_prompt") or 1)
        return types.SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]), (99, 99, 99))
                                             for _ in range(n)])

    monkeypatch.setattr(FluxKontextPipeline, "__call__", fake_call)
    return calls


# ----------------------------------------------------------------------------------------------------- images
# mutant: load_image returns a PIL image as given (``im = image``) instead of ``image.convert("RGB")``
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_load_image_converts_a_pil_image_to_rgb(mode):
    """A PIL image of any mode comes back RGB, with the pixels of ``convert("RGB")`` (as a file does)."""
    src = picture(0, (12, 10)).convert(mode)
    got = flux.load_image(src)
    assert got.mode == "RGB" and got.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(src.convert("RGB")))


# mutant: load_image's ``isinstance(image, (str, os.PathLike))`` check dropped (Path() then fails with its own text)
@pytest.mark.parametrize("bad", [3, None, b"a.png", np.zeros((4, 4, 3), np.uint8)])
def test_load_image_names_what_it_takes(bad):
    with pytest.raises(TypeError, match="expected a PIL image or a path, got "):
        flux.load_image(bad)


# mutant: make_grid resizes its cells with Image.BILINEAR instead of Image.BICUBIC
def test_native_grid_cells_are_resized_bicubic():
    """make_grid / control_grid: every cell is its image resized (bicubic) to the cell size, pasted in place."""
    a, a2, b = picture(0, (40, 30)), picture(1, (24, 36)), picture(2, (50, 50))
    grid = flux.control_grid(a, a2, b, long_edge=64)
    assert grid.size == (64, 64)
    for im, box in ((a, (0, 0, 32, 32)), (a2, (32, 0, 64, 32)), (b, (0, 32, 32, 64)), (b, (32, 32, 64, 64))):
        want = np.asarray(im.resize((32, 32), Image.BICUBIC))
        np.testing.assert_array_equal(np.asarray(grid.crop(box)), want)


# mutant: official_grid_problem checks the official inference crops for query_source="images" too
def test_a_wide_a_is_a_problem_of_the_grid_query_only():
    """query_source="images" encodes a, a', b themselves: a 2:1 a leaves no b to crop in the grid (a problem for
    "grid") but is fine for "images"; a grid too small for the pipeline is a problem for both."""
    kw = dict(query_mode="cat-aa'b")
    assert "too wide for the official crops" in flux.official_grid_problem((32, 16), query_source="grid", **kw)
    assert flux.official_grid_problem((32, 16), query_source="images", **kw) is None
    assert flux.official_grid_problem((30, 16), query_source="grid", **kw) is None
    assert "rounds its sides down" in flux.official_grid_problem((40, 6), query_source="images", **kw)


# ------------------------------------------------------------------------------------------------ merging
# mutant: merged_weight's one_analogy check dropped (it then merges sample 0's mixture for every sample)
def test_merged_weight_needs_coefficients_of_one_analogy():
    model = tiny_lorweb_linear_model()
    layer = lf.lorweb_layers(model)["0"]
    with pytest.raises(RuntimeError, match="call set_query first"):
        flux.merged_weight(layer)
    with torch.no_grad():
        lf.set_query(model, torch.randn(2, 3))
    with pytest.raises(ValueError, match="merging needs one analogy .batch size 1., got coefficients for 2"):
        flux.merged_weight(layer)
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 3).repeat(2, 1))  # the same analogy twice: one mixture
    torch.testing.assert_close(flux.merged_weight(layer), layer.merged_weight_for(layer.coefficients[0]))


# mutant: adapted_weight_bytes counts the weights of base layers without a plain weight (quantized: run unmerged)
def test_adapted_weight_bytes_leave_out_layers_that_are_never_merged():
    class OwnForward(nn.Linear):  # e.g. a quantized linear: its own forward, never merged
        def forward(self, x):
            return super().forward(x)

    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3, target_modules=["0", "1"]))
    lf.lorweb_layers(model)["1"].base_layer.__class__ = OwnForward
    assert flux.adapted_weight_bytes(model) == 5 * 6 * 4


# mutant: free_memory_bytes on the CPU reads psutil's total memory instead of the available memory
def test_free_host_memory_is_the_available_memory(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 1234, "total": 10 ** 12})())
    assert flux.free_memory_bytes(torch.device("cpu")) == 1234


# mutants: choose_merge_strategy's default headroom 0.25 changed (0.1), and "fits" as need < (1 - headroom) * free
# instead of need <= (1 - headroom) * free
def test_full_merge_needs_a_quarter_of_the_free_memory_left():
    """"full" when the copy of the adapted weights fits in 75 % of the free memory (the boundary included); a CPU
    model has no host to offload to, so "jit" otherwise."""
    model = tiny_lorweb_linear_model()
    need = flux.adapted_weight_bytes(model)
    assert need == 4 * 3 * 4
    assert flux.choose_merge_strategy(model, free_bytes=need * 4 // 3) == "full"  # need == 0.75 * free
    assert flux.choose_merge_strategy(model, free_bytes=need * 4 // 3 - 1) == "jit"
    assert flux.choose_merge_strategy(model, free_bytes=need * 6 // 5) == "jit"  # 0.9 * free would hold it
    assert flux.choose_merge_strategy(model, free_bytes=need * 6 // 5, headroom=0.1) == "full"


# mutant: free_memory_bytes returns 0 for a device it cannot read instead of raising
def test_free_memory_of_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="cannot read the free memory of a meta device; pass merge= explicitly"):
        flux.free_memory_bytes(torch.device("meta"))
    assert flux.free_memory_bytes("cpu") > 0


# ---------------------------------------------------------------------------------------------- the encoder
# mutant: query_from_grid's "needs at least one grid" check dropped
def test_query_from_no_grids_is_refused(tiny):
    _, encoder = tiny
    with pytest.raises(ValueError, match="query_from_grid needs at least one grid"):
        encoder.query_from_grid([])


# mutant: AnalogyEncoder.query's "query_source='grid' needs the control grids" check dropped
def test_a_grid_query_without_grids_is_refused(tiny):
    _, encoder = tiny
    a, a2, b = picture(0, (16, 16)), picture(1, (16, 16)), picture(2, (16, 16))
    with pytest.raises(ValueError, match="query_source='grid' needs the control grids"):
        encoder.query(a=a, a_prime=a2, b=b)


# mutant: patch_tokens' "patch tokens need a CLIP encoder" check dropped
def test_patch_tokens_of_a_non_clip_encoder_are_refused():
    """The check comes before anything is encoded (a bare encoder object without a model is enough here)."""
    encoder = object.__new__(flux.AnalogyEncoder)
    encoder.kind, encoder.name, encoder.model_type = "siglip2", "some/siglip2", "siglip2_vision_model"
    with pytest.raises(ValueError, match="patch tokens need a CLIP encoder, some/siglip2 is siglip2_vision_model"):
        encoder.patch_tokens([picture(0, (16, 16))])


# mutant: query_crop_problem's training crops count "caa'" among the modes that cut a' (it takes the top band)
def test_caa_training_query_of_a_grid_as_wide_as_half_its_height(tiny):
    """crops="training": a grid exactly H // 2 wide has no a' = [:s, s:W] to cut, which "cat-aa'b" refuses; "caa'"
    encodes the top band [:s, :] and needs no a' crop."""
    _, encoder = tiny
    grid = picture(0, (16, 32))
    assert encoder.query_from_grid(grid, "caa'", crops="training").shape == (1, encoder.embed_dim)
    with pytest.raises(ValueError, match="too tall for the official training crops"):
        encoder.query_from_grid(grid, "cat-aa'b", crops="training")


# ----------------------------------------------------------------------------------------------- pipeline
# mutant: LoRWeBKontextPipeline.__init__'s "transformer has no LoRWeB layers" check dropped
def test_a_pipeline_without_lorweb_layers_is_refused(tiny):
    _, encoder = tiny

    class StockPipe:
        transformer = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError, match="the pipeline's transformer has no LoRWeB layers: load weights with"):
        flux.LoRWeBKontextPipeline(StockPipe(), encoder)


# mutant: unfuse_lora's ``components`` check dropped (fuse_lora has its own)
def test_unfuse_lora_refuses_components_without_the_transformer(tiny):
    from lorweb_fast import lora_api

    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    lp.set_analogy(picture(0, (16, 16)), picture(1, (16, 16)), picture(2, (16, 16)))
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    lp.fuse_lora()
    try:
        with pytest.raises(ValueError, match="components=\\['text_encoder'\\] leaves it out"):
            lp.unfuse_lora(components=["text_encoder"])
        assert lora_api.fused_strategy(pipe.transformer) == "full"  # still fused
    finally:
        lp.unfuse_lora(components=["transformer"])
    assert lora_api.fused_strategy(pipe.transformer) is None
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())


# mutant: the ``torch.no_grad()`` around set_query dropped in __call__ (set_analogy's is pinned elsewhere)
def test_analogy_coefficients_carry_no_autograd_history(tiny, recorder):
    """Inference: the coefficients set by set_analogy and by a call hold no autograd graph (which would keep the
    query projection's activations alive and make every merge differentiable), whatever the parameters'
    requires_grad."""
    pipe, encoder = tiny
    params = list(pipe.transformer.parameters())
    grads = [p.requires_grad for p in params]
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    try:
        pipe.transformer.requires_grad_(True)
        for coeffs in (lp.set_analogy(*analogy(0)), None):
            if coeffs is None:
                lp(*analogy(3), "x", progress=False, num_inference_steps=1, merge="none")
                coeffs = lf.get_coefficients(pipe.transformer)
            assert coeffs and not any(c.requires_grad or c.grad_fn is not None for c in coeffs.values())
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)


# mutant: __call__ no longer runs unmerged ("none") while fuse_lora holds the mixture in the weights, whatever merge=
@pytest.mark.parametrize("merge", ["full", "offload", "jit", "auto"])
def test_a_call_on_a_fused_pipeline_runs_on_the_fused_weights(tiny, recorder, merge):
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    lp.set_analogy(*analogy(0))
    lp.fuse_lora("full")
    try:
        fused = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
        (out,) = lp(*analogy(0), "x", progress=False, num_inference_steps=1, merge=merge)
        assert out.size == (16, 16) and len(recorder) == 1
        assert all(torch.equal(p, fused[n]) for n, p in pipe.transformer.named_parameters())
    finally:
        lp.unfuse_lora()


# mutants: AnalogyEncoder without ``requires_grad_(False)``, or ignoring ``device``
def test_the_analogy_encoder_is_frozen_in_eval_mode_on_its_device(tiny):
    _, encoder = tiny
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    on_meta = flux.AnalogyEncoder(encoder.name, device="meta")
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}


# mutant: from_pretrained no longer moves the loaded pipeline to ``device``
def test_from_pretrained_moves_the_pipeline_to_the_device(tiny, tmp_path, monkeypatch):
    from lorweb_fast.model import save_lorweb_weights

    pipe, encoder = tiny
    weights = tmp_path / "lorweb.safetensors"
    save_lorweb_weights(pipe.transformer, weights, metadata={"encoder": encoder.name})
    monkeypatch.setattr(flux, "load_kontext_pipeline", lambda model, dtype=None: pipe)
    moves = []
    monkeypatch.setattr(type(pipe), "to", lambda self, *args, **kwargs: moves.append((args, kwargs)) or self)
    lp = flux.LoRWeBKontextPipeline.from_pretrained("a-local-stand-in", weights, device="cpu")
    assert lp.pipe is pipe and moves == [(("cpu",), {})]

