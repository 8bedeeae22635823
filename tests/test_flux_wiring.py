"""How lorweb_fast/flux.py wires images, encoders, merges and the pipeline wrapper together (from a mutation audit
of lorweb_fast/flux.py: each test failed a hand-made change that the rest of the suite let pass): load_image's RGB
conversion and type error, the bicubic cells of the native grid, the crop check that only the grid query needs,
merged_weight's one-analogy check, the bytes, free memory and headroom behind choose_merge_strategy, the analogy
encoder (frozen on its device, the "caa'" training crops, its error paths), analogy coefficients without autograd
history, a call on a fused pipeline, from_pretrained's device, and the wrapper's refusals (a transformer without
LoRWeB layers, unfuse_lora without the transformer); from a second pass: merge="auto" counting images per prompt and
seeing a fused pipeline, safe_fusing's scope, a run folder's config.yaml, the dtype keyword of the installed
diffusers, to() moving the encoder, delete_adapters after an unload, the query settings pushed to the hub, the
encoder's pooling checked at load, and the layer count of the three-layer query modes. The comment above each test
names the mutant it kills.

Everything runs on tiny random models built here (lorweb_fast.testing); nothing is downloaded.
"""

import types
import warnings

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
    """A PIL image of any mode comes back RGB, with the pixels of ``convert("RGB")`` (as a file does; a 16-bit one
    with a warning that the conversion clips it)."""
    src = picture(0, (12, 10)).convert(mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = flux.load_image(src)
    assert [str(w.message)[:41] for w in caught] == (["an image has more than 8 bits per channel"] if mode == "I;16"
                                                     else [])
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



# ------------------------------------------------------------------------------ second audit pass (95 more mutants)
# mutant: __call__ asks merge_strategy for ``count`` samples instead of ``count * num_images_per_prompt`` (merge="auto"
# then merges the weights for a batch of several images, which it runs unmerged)
def test_auto_merge_counts_the_images_per_prompt(tiny, monkeypatch):
    from diffusers import FluxKontextPipeline

    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    merged_in_call = []

    def fake_call(self, **kwargs):
        layers = lf.lorweb_layers(self.transformer).values()
        merged_in_call.append([bool(layer._merged or layer._merge_jit) for layer in layers])
        n = int(kwargs.get("num_images_per_prompt") or 1)
        return types.SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"])) for _ in range(n)])

    monkeypatch.setattr(FluxKontextPipeline, "__call__", fake_call)
    lp(*analogy(), "p", progress=False, merge="auto", num_inference_steps=1)
    assert merged_in_call and all(merged_in_call[-1])  # one image: merged (the control of this test)
    out = lp(*analogy(), "p", progress=False, merge="auto", num_inference_steps=1, num_images_per_prompt=2)
    assert len(out) == 2 and not any(merged_in_call[-1])


# mutant: merge_strategy's "already fused (fuse_lora)" check dropped (merge="auto" then names a merge, though a call
# on a fused pipeline runs unmerged)
@pytest.mark.parametrize("strategy", ["full", "jit"])
def test_auto_merge_strategy_of_a_fused_pipeline_is_none(tiny, strategy):
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    lp.set_analogy(*analogy(0))
    assert lp.merge_strategy("auto", 1) != "none"  # the control: unfused, one sample merges
    lp.fuse_lora(strategy)
    try:
        assert lp.merge_strategy("auto", 1) == "none"
    finally:
        lp.unfuse_lora()


# mutant: fuse_lora(safe_fusing=True) checks the base weights under strategy "jit" too (nothing is fused into them:
# a base weight that is not finite then makes a jit fuse raise)
def test_safe_fusing_checks_only_weights_that_hold_the_fused_mixture(tiny):
    from lorweb_fast import lora_api

    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    lp.set_analogy(*analogy(0))
    weight = next(iter(lf.lorweb_layers(pipe.transformer).values())).base_layer.weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="safe_fusing: the fused weights of .* are not finite"):
            lp.fuse_lora("full", safe_fusing=True)  # the control: a merged weight that is not finite
        assert lora_api.fused_strategy(pipe.transformer) is None
        lp.fuse_lora("jit", safe_fusing=True)
        assert lora_api.fused_strategy(pipe.transformer) == "jit"
        lp.unfuse_lora()
    finally:
        with torch.no_grad():
            weight.copy_(kept)


# mutant: from_pretrained drops the config.yaml that resolve_checkpoint found (``config = config``): a run folder's
# top config.yaml, which is not beside its checkpoints/step-*/lorweb.safetensors, then goes unread
def test_from_pretrained_reads_the_config_of_a_run_folder(tiny, tmp_path, monkeypatch):
    import shutil

    from lorweb_fast import lora_api
    from lorweb_fast.model import save_lorweb_weights

    pipe, encoder = tiny
    lora_api.save_pretrained(pipe.transformer, tmp_path / "saved", encoder=encoder.name, pooling_type="max")
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    shutil.copy(tmp_path / "saved" / "config.yaml", run / "config.yaml")
    save_lorweb_weights(pipe.transformer, step / "lorweb.safetensors", metadata={"encoder": encoder.name})
    monkeypatch.setattr(flux, "load_kontext_pipeline", lambda model, dtype=None: pipe)
    lp = flux.LoRWeBKontextPipeline.from_pretrained("a-local-stand-in", run)
    assert lp.encoder.pooling_type == "max"


# mutant: load_kontext_pipeline passes ``torch_dtype=`` (every diffusers we admit, 0.40 on, takes ``dtype=`` and
# warns that ``torch_dtype=`` is deprecated)
def test_load_kontext_pipeline_passes_the_dtype_as_dtype(monkeypatch):
    from diffusers import FluxKontextPipeline

    calls = []
    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained",
                        classmethod(lambda cls, model, **kwargs: calls.append((model, kwargs)) or "loaded"))
    assert flux.load_kontext_pipeline("some/model") == "loaded"
    assert flux.load_kontext_pipeline("some/model", torch.bfloat16) == "loaded"
    assert calls == [("some/model", {"dtype": torch.float32}),  # None: float32, whatever torch's default dtype
                     ("some/model", {"dtype": torch.bfloat16})]


# mutant: LoRWeBKontextPipeline.to no longer moves the analogy encoder to the transformer's device
def test_to_moves_the_encoder_to_the_device_of_the_transformer(tiny, monkeypatch):
    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    moved, encoder_moved = [], []
    monkeypatch.setattr(type(pipe), "to", lambda self, *args, **kwargs: moved.append((args, kwargs)) or self)
    monkeypatch.setattr(encoder.model, "to", lambda *args, **kwargs: encoder_moved.append((args, kwargs)))
    assert lp.to("cpu", torch.float16) is lp
    assert moved == [(("cpu", torch.float16), {})]
    assert encoder_moved == [((torch.device("cpu"),), {})]  # the device only: the encoder keeps its dtype


# mutant: delete_adapters accepts this adapter's name once it is unloaded (it then unloads nothing, silently)
def test_delete_adapters_refuses_once_the_adapter_is_unloaded(tmp_path):
    pipe, encoder = tiny_kontext_with_encoder(tmp_path)
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    (name,) = lp.get_list_adapters()["transformer"]
    lp.delete_adapters(name)
    assert not lf.lorweb_layers(pipe.transformer) and lp.get_list_adapters() == {}
    with pytest.raises(ValueError, match=r"unknown adapter names .*holds no LoRWeB adapter"):
        lp.delete_adapters(name)


# mutant: push_to_hub no longer hands the encoder's query_source to lora_api.push_to_hub (save_pretrained does)
def test_push_to_hub_records_the_query_settings_of_the_encoder(tiny, monkeypatch):
    from lorweb_fast import lora_api

    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    pushed = []
    monkeypatch.setattr(lora_api, "push_to_hub", lambda model, repo_id, **kwargs: pushed.append(kwargs) or "url")
    assert lp.push_to_hub("me/repo") == "url"
    assert pushed[0]["encoder"] == encoder.name
    assert {k: pushed[0][k] for k in ("query_mode", "pooling_type", "query_source")} == {
        "query_mode": encoder.query_mode, "pooling_type": encoder.pooling_type, "query_source": encoder.query_source}


# mutant: LoRWeBKontextPipeline.load_lora_weights no longer hands the encoder's pooling_type to the checkpoint check
# (in a patch query mode, a checkpoint trained with another pooling then loads; the encoder's mode is patched
# here, its width kept)
def test_load_lora_weights_checks_the_pooling_of_the_encoder(tiny, tmp_path, monkeypatch):
    from lorweb_fast import lora_api

    pipe, encoder = tiny
    lp = flux.LoRWeBKontextPipeline(pipe, encoder)
    width = encoder.query_dim  # the checkpoint's: the query width stays that of the pipeline's mode
    monkeypatch.setattr(type(encoder), "query_dim", property(lambda self: width))
    monkeypatch.setattr(encoder, "query_mode", "paa'b")
    monkeypatch.setattr(encoder, "pooling_type", "avg")
    lora_api.save_pretrained(pipe.transformer, tmp_path / "max", encoder=encoder.name, query_mode="paa'b",
                             pooling_type="max")
    before = {k: v.clone() for k, v in lf.lorweb_state_dict(pipe.transformer).items()}
    with pytest.raises(lf.LoRWeBCheckpointError, match="pooling_type: checkpoint 'max', pipeline 'avg'"):
        lp.load_lora_weights(tmp_path / "max")
    after = lf.lorweb_state_dict(pipe.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)


# mutant: the "...3" query modes' depth check allows 15 layers (``layers < 15``): hidden state -16 of a 15-layer
# encoder is its embedding output, not a layer's
def test_three_layer_query_modes_need_exactly_16_layers_or_more():
    with pytest.raises(ValueError, match="uses the hidden states -16, -8 and -1 .* has only 15 layers"):
        flux._check_three_layer_depth("tiny-clip", "paa'b3", 15)
    flux._check_three_layer_depth("tiny-clip", "paa'b3", 16)
