"""The analogy query computed from the control grid as the official code does, in every official query mode, with a
tiny CLIP and a tiny SigLIP2 built locally (nothing downloaded).

Each expected value comes from a small reference written from the official source, not from lorweb_fast's code:
extensions_built_in/flux_kontext.py ``CustomFluxKontextPipeline.get_external_query`` (the crops and modes, PIL path
used by inference.py), ``CustomFluxKontextPipeline.encode_image`` (image_embeds / patch tokens / SigLIP2
pooler_output), ``FluxKontextModel.load_model`` (slow CLIPImageProcessor with size = crop = image_size, NaFlex
Siglip2ImageProcessor), toolkit/models/AttLoRA.py (query (B, k, D) flattened to (B, k*D); query_dim x3 for "cat-")
and jobs/process/BaseSDTrainProcess.py (external_query_dim: projection_dim, hidden_size for patch modes).
"""

import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import demo, flux, training
from lorweb_fast.official_config import PATCH_QUERY_MODES, QUERY_MODES
from lorweb_fast.testing import reference_clip_pixels



@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP with 16 layers (the "3" modes read hidden states -16, -8, -1), image size 32."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    d = tmp_path_factory.mktemp("clip16")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8, num_hidden_layers=16,
                           num_attention_heads=2, image_size=32, patch_size=8)
    CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    # saved with other sizes on purpose: the official code overrides them with the model's image_size
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_encoder(clip_dir):
    return flux.AnalogyEncoder(clip_dir)


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    d = tmp_path_factory.mktemp("siglip2")
    torch.manual_seed(0)
    cfg = Siglip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              num_patches=16, patch_size=8)
    Siglip2VisionModel(cfg).save_pretrained(d)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(d)
    return d


def picture(seed, size):
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    px = im.load()
    for x in range(size[0]):
        for y in range(size[1]):
            if (x * 7 + y * 3 + seed) % 5 == 0:
                px[x, y] = tuple(rng.randrange(256) for _ in range(3))
    return im


# ------------------------------------------------------------------------------------------------- references
def reference_clip_encode(model, img, mode):
    """encode_image: image_embeds as (1, 1, D), or for a "p" mode the tokens of embeddings -> pre_layrnorm ->
    encoder layers, last layer (1, T, D) or hidden states -16, -8, -1 concatenated on the tokens."""
    px = reference_clip_pixels(img, model.config.image_size)
    if mode is None or not mode.startswith(("paa'b", "cat-paa'b")):
        return model(pixel_values=px).image_embeds[:, None]
    vm = model.vision_model
    h = vm.pre_layrnorm(vm.embeddings(px, interpolate_pos_encoding=False))
    states = [h]
    for layer in vm.encoder.layers:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
        states.append(h)
    return torch.cat([states[-16], states[-8], states[-1]], dim=1) if mode.endswith("3") else states[-1]


def reference_query(encode, grid: Image.Image, mode: str, pooling: str = "avg") -> torch.Tensor:
    """get_external_query on one PIL grid, then AttLoRA's reshape (B, k, D) -> (B, k*D). Patch tokens are pooled
    per encoded image with ``pooling`` (lorweb_fast's reading, see AnalogyEncoder.query_from_grid)."""
    s = grid.size[0] // 2

    def enc(img):
        out = encode(img, mode)
        if out.shape[1] > 1:  # patch tokens
            out = (out.mean(dim=1) if pooling == "avg" else out.max(dim=1).values)[:, None]
        return out

    if mode in ("aa'bb'", "caa'bb'"):
        q = enc(grid)
    elif mode in ("caa'b", "paa'b", "paa'b3"):
        z = grid.copy()
        z.paste(0, (s, s, grid.size[0], grid.size[1]))
        q = enc(z)
    elif mode == "caa'":
        q = enc(grid.crop((0, 0, grid.size[0], s)))
    else:
        a = enc(grid.crop((0, 0, s, s)))
        a2 = enc(grid.crop((s, 0, grid.size[0], s)))
        if mode == "ca'-ca":
            q = a2 - a
        else:
            b = enc(grid.crop((0, s, s, grid.size[1])))
            q = a2 - a + b if mode == "ca'-ca+cb" else torch.cat([a, a2, b], dim=1)
    return q.reshape(q.shape[0], -1)


def reference_training_query(encode, grid: Image.Image, mode: str) -> torch.Tensor:
    """get_external_query on the training tensor. The trainer's control tensor is the grid through ``ToTensor`` and
    ``RescaleTransform`` (``x * 2 - 1``, toolkit/data_loader.py), and SDTrainer.py ``before_unet_predict`` passes
    ``batch.control_tensor / 2 + 0.5``, shape (B, 3, H, W), with ``do_rescale=False``: ``oneside = image.shape[2] //
    2`` (H // 2) and tensor slices a = [:s, :s], a' = [:s, s:], b = [s:, :s], zeroed [s:, s:], "caa'" = [:s, :].
    Each float crop then reaches the slow processor, which converts it to PIL for the resize as transformers 4.56
    ``image_transforms.to_pil_image`` does for floats in [0, 1] that are not all integers: ``rescale(x, 255)``
    (float64 product stored as float32), then ``astype(uint8)``."""
    t = torch.from_numpy(np.array(grid.convert("RGB"))).permute(2, 0, 1).float().div(255)  # ToTensor
    image = (t * 2 - 1)[None] / 2 + 0.5  # RescaleTransform; before_unet_predict
    s = image.shape[2] // 2

    def enc(x):
        arr = x[0].permute(1, 2, 0).numpy()
        assert not np.allclose(arr, arr.astype(int))  # else the processor would not rescale (not these pictures)
        levels = (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
        return encode(Image.fromarray(np.ascontiguousarray(levels)), mode)

    if mode in ("aa'bb'", "caa'bb'"):
        q = enc(image)
    elif mode in ("caa'b", "paa'b", "paa'b3"):
        z = image.clone()
        z[:, :, s:, s:] = 0
        q = enc(z)
    elif mode == "caa'":
        q = enc(image[:, :, :s, :])
    else:
        a, a2 = enc(image[:, :, :s, :s]), enc(image[:, :, :s, s:])
        if mode == "ca'-ca":
            q = a2 - a
        else:
            b = enc(image[:, :, s:, :s])
            q = a2 - a + b if mode == "ca'-ca+cb" else torch.cat([a, a2, b], dim=1)
    return q.reshape(q.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------- tests
def test_clip_processor_is_the_slow_one_at_the_model_size(clip_encoder):
    enc = clip_encoder
    assert type(enc.processor).__name__ in ("CLIPImageProcessorPil", "CLIPImageProcessor")
    assert "Fast" not in type(enc.processor).__name__ and "Torchvision" not in type(enc.processor).__mro__[1].__name__
    img = picture(1, (50, 37))
    got = enc.processor(images=[img], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, reference_clip_pixels(img, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", QUERY_MODES)
@pytest.mark.parametrize("size", [(64, 48), (48, 80)])  # wide and tall cells: crops of side W/2 all the same
def test_every_clip_mode_matches_the_official_query(clip_encoder, mode, size):
    enc = clip_encoder
    grids = [picture(3, size), picture(4, (size[0] // 2 * 2, size[1]))]
    got = enc.query_from_grid(grids, query_mode=mode)
    with torch.no_grad():
        want = torch.cat([reference_query(lambda im, m: reference_clip_encode(enc.model, im, m), g, mode)
                          for g in grids])
    assert got.shape == (2, enc.query_dim_for(mode))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["cat-aa'b", "caa'b", "caa'", "ca'-ca", "ca'-ca+cb"])
def test_bf16_query_is_the_official_bf16_chain_bit_for_bit(clip_dir, mode):
    """The official chain, and the default one (encoder dtype = the pipeline's bf16), is bf16: pixel values cast to
    bf16 (FluxKontextModel.load_model puts the encoder in the training dtype; encode_image casts its input), bf16
    image_embeds, and get_external_query's sums on those bf16 tensors, so "ca'-ca+cb" rounds after each operation
    (lorweb_fast summed fp32 copies, one rounding: some entries one bf16 step off). Equal bit for bit."""
    enc = flux.AnalogyEncoder(clip_dir, dtype=torch.bfloat16, query_mode=mode)

    def encode(img, m):
        px = reference_clip_pixels(img, enc.model.config.image_size).to(torch.bfloat16)
        return enc.model(pixel_values=px).image_embeds[:, None]  # bf16, as the official encode_image returns it

    grids = [picture(seed, (64, 48)) for seed in range(40)]
    got = torch.cat([enc.query_from_grid([g], query_mode=mode) for g in grids])
    with torch.no_grad():
        want = torch.cat([reference_query(encode, g, mode) for g in grids])
    assert want.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert torch.equal(got, want.float())


@pytest.mark.parametrize("mode", ["paa'b", "cat-paa'b3"])
def test_patch_modes_pool_max(clip_dir, mode):
    enc = flux.AnalogyEncoder(clip_dir, query_mode=mode, pooling_type="max")
    grid = picture(5, (64, 64))
    with torch.no_grad():
        want = reference_query(lambda im, m: reference_clip_encode(enc.model, im, m), grid, mode, "max")
    torch.testing.assert_close(enc.query_from_grid(grid), want, atol=2e-5, rtol=1e-4)
    avg = flux.AnalogyEncoder(clip_dir, query_mode=mode, pooling_type="avg").query_from_grid(grid)
    assert not torch.allclose(avg, want)


def test_query_dims_follow_mode_and_encoder(clip_dir, clip_encoder):
    """BaseSDTrainProcess: projection_dim for global modes, hidden_size for patch modes; AttLoRA: x3 for cat-."""
    enc = clip_encoder
    assert flux.AnalogyEncoder(clip_dir, query_mode="caa'b").query_dim == 8
    dims = {m: enc.query_dim_for(m) for m in QUERY_MODES}
    assert dims == {m: (3 if m.startswith("cat-") else 1) * (16 if m in PATCH_QUERY_MODES else 8)
                    for m in QUERY_MODES}


def test_siglip2_official_way(siglip2_dir):
    """SigLIP2: Siglip2VisionModel with the NaFlex Siglip2ImageProcessor, pooler_output (encode_image)."""
    from transformers import Siglip2VisionModel

    enc = flux.AnalogyEncoder(siglip2_dir)
    assert isinstance(enc.model, Siglip2VisionModel) and "Siglip2ImageProcessor" in type(enc.processor).__name__
    assert enc.query_dim == 48
    grid = picture(6, (64, 48))

    import transformers

    # the slow (PIL) processor as the checkpoint folder configures it, loaded here on its own
    processor_class = getattr(transformers, "Siglip2ImageProcessorPil", None) or transformers.Siglip2ImageProcessor
    processor = processor_class.from_pretrained(siglip2_dir)

    def encode(img, mode):
        x = processor(images=img, return_tensors="pt")
        return enc.model(pixel_values=x.pixel_values, pixel_attention_mask=x.pixel_attention_mask.float(),
                         spatial_shapes=x.spatial_shapes).pooler_output[:, None]

    with torch.no_grad():
        for mode in ("cat-aa'b", "caa'b", "ca'-ca+cb"):
            torch.testing.assert_close(enc.query_from_grid(grid, mode), reference_query(encode, grid, mode),
                                       atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="patch tokens.*siglip2"):
        flux.AnalogyEncoder(siglip2_dir, query_mode="paa'b")


def test_bad_settings_and_grids(clip_dir):
    with pytest.raises(ValueError, match="query_mode must be one of"):
        flux.AnalogyEncoder(clip_dir, query_mode="aab")
    with pytest.raises(ValueError, match="pooling_type"):
        flux.AnalogyEncoder(clip_dir, pooling_type="sum")
    with pytest.raises(ValueError, match="query_source"):
        flux.AnalogyEncoder(clip_dir, query_source="files")
    with pytest.raises(ValueError, match="hidden states -16"):
        flux.AnalogyEncoder(demo.build_tiny_clip(clip_dir.parent / "clip1"),
                            query_mode="paa'b3").query_from_grid(picture(0, (64, 64)))
    with pytest.raises(ValueError, match="too wide"):
        flux.AnalogyEncoder(clip_dir).query_from_grid(Image.new("RGB", (64, 32)))


@pytest.mark.parametrize("mode", QUERY_MODES)
def test_wide_grids_in_modes_without_a_bottom_crop(clip_encoder, mode):
    """A grid no taller than half its width (cells of 2:1 or wider): get_external_query's PIL path pads the crops
    past the edge, so only the modes that crop b ("ca'-ca+cb", "cat-*": the official crop raises or is empty) have
    nothing to cut; the others run as the official code does ("caa'b", "paa'b*": its ``paste(0, (s, s, W, H))``
    paints nothing, so the whole grid is encoded)."""
    enc = clip_encoder
    grid = picture(16, (120, 50))
    if mode == "ca'-ca+cb" or mode.startswith("cat-"):
        with pytest.raises(ValueError, match=re.escape(f"too wide for the official crops of query mode {mode!r}")):
            enc.query_from_grid(grid, query_mode=mode)
        return
    with torch.no_grad():
        want = reference_query(lambda im, m: reference_clip_encode(enc.model, im, m), grid, mode)
    torch.testing.assert_close(enc.query_from_grid(grid, query_mode=mode), want, atol=2e-5, rtol=1e-4)


def test_images_source_keeps_the_original_query(clip_dir):
    """query_source="images" (not official): a, a', b files encoded separately, as before."""
    enc = flux.AnalogyEncoder(clip_dir, query_source="images")
    a, a2, b = picture(7, (30, 40)), picture(8, (30, 40)), picture(9, (50, 20))
    torch.testing.assert_close(enc.query(a=a, a_prime=a2, b=b),
                               torch.cat([enc.embed([a]), enc.embed([a2]), enc.embed([b])], dim=1))
    with pytest.raises(ValueError, match="needs a, a_prime and b"):
        enc.query(grids=[picture(1, (64, 64))])


@pytest.mark.parametrize("mode", ["cat-aa'b", "caa'b", "caa'", "ca'-ca+cb"])
@pytest.mark.parametrize("size", [(96, 64), (48, 80)])  # wide and tall b' cells: H // 2 differs from W // 2
def test_training_crops_follow_the_official_tensor_path(clip_dir, mode, size):
    """The official trainer (SDTrainer.py ``before_unet_predict``) passes the control tensor to
    ``get_external_query`` (extensions_built_in/flux_kontext.py), whose crops have side ``image.shape[2] // 2``
    (H // 2) and stop at the grid's edge; ``training.batch_query`` computes exactly that, and for non-square cells
    it differs from the inference (PIL, W // 2) query."""
    enc = flux.AnalogyEncoder(clip_dir, query_mode=mode)
    grids = [picture(13, size), picture(14, size)]
    got = training.batch_query(enc, {"control": grids, "target": grids}, "cpu")
    with torch.no_grad():
        want = torch.cat([reference_training_query(lambda im, m: reference_clip_encode(enc.model, im, m), g, mode)
                          for g in grids])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, enc.query_from_grid(grids), atol=1e-3)  # the inference crops are other boxes


def test_training_levels_follow_the_official_float_round_trip(clip_dir):
    """Levels 1..63 reach the processor one lower through the official float path (``reference_training_query``);
    for square cells the training crops are the inference ones, so the two queries differ by those levels alone."""
    assert [k for k, v in enumerate(flux.OFFICIAL_TRAINING_LEVELS) if v != k] == list(range(1, 64))
    assert all(flux.OFFICIAL_TRAINING_LEVELS[k] == k - 1 for k in range(1, 64))
    enc = flux.AnalogyEncoder(clip_dir)
    square = [picture(15, (64, 64))]
    training_query = enc.query_from_grid(square, crops="training")
    with torch.no_grad():
        want = reference_training_query(lambda im, m: reference_clip_encode(enc.model, im, m), square[0], "cat-aa'b")
    torch.testing.assert_close(training_query, want, atol=2e-5, rtol=1e-4)
    lowered = [square[0].point(flux.OFFICIAL_TRAINING_LEVELS * 3)]
    torch.testing.assert_close(training_query, enc.query_from_grid(lowered))
    assert not torch.allclose(training_query, enc.query_from_grid(square), atol=1e-4)


@pytest.mark.parametrize("mode", ["cat-aa'b", "caa'b"])
def test_siglip2_training_query_follows_the_official_tensor_path(siglip2_dir, mode):
    """SigLIP2 in training: SDTrainer.py ``before_unet_predict`` passes ``control_tensor / 2 + 0.5`` to
    extensions_built_in/flux_kontext.py ``get_external_query`` (crops of side H // 2, b' zeroed for "caa'b"), whose
    ``encode_image`` runs each float crop through the NaFlex processor with ``do_rescale=False`` and takes
    ``pooler_output``. Reference: those steps on the float tensor with the slow (PIL) processor loaded on its own
    (transformers 5's ``Siglip2ImageProcessor`` is another implementation, off by up to 0.017); wide cells, so
    H // 2 is not W // 2."""
    import transformers

    enc = flux.AnalogyEncoder(siglip2_dir, query_mode=mode)
    processor_class = getattr(transformers, "Siglip2ImageProcessorPil", None) or transformers.Siglip2ImageProcessor
    processor = processor_class.from_pretrained(siglip2_dir)
    grids = [picture(21, (96, 64)), picture(22, (96, 64))]
    got = training.batch_query(enc, {"control": grids, "target": grids}, "cpu")

    def encode(x):  # (1, 3, h, w), floats in [0, 1]
        p = processor(images=x[0], return_tensors="pt", do_rescale=False)
        return enc.model(pixel_values=p.pixel_values, pixel_attention_mask=p.pixel_attention_mask.float(),
                         spatial_shapes=p.spatial_shapes).pooler_output[:, None]

    want = []
    with torch.no_grad():
        for grid in grids:
            image = (torch.from_numpy(np.array(grid)).permute(2, 0, 1).float().div(255) * 2 - 1)[None] / 2 + 0.5
            s = image.shape[2] // 2
            if mode == "caa'b":
                zeroed = image.clone()
                zeroed[:, :, s:, s:] = 0
                q = encode(zeroed)
            else:
                q = torch.cat([encode(image[:, :, :s, :s]), encode(image[:, :, :s, s:]),
                               encode(image[:, :, s:, :s])], dim=1)
            want.append(q.reshape(1, -1))
    torch.testing.assert_close(got, torch.cat(want), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, enc.query_from_grid(grids), atol=1e-3)  # the inference crops are other boxes


def test_training_crops_of_a_too_tall_grid_and_bad_crops(clip_dir):
    enc = flux.AnalogyEncoder(clip_dir)
    with pytest.raises(ValueError, match=r"a 30x64 grid is too tall for the official training crops: a' = "
                                         r"\[:32, 32:30\] is empty"):
        enc.query_from_grid(Image.new("RGB", (30, 64)), crops="training")
    enc.query_from_grid(Image.new("RGB", (30, 64)), "caa'b", crops="training")  # no a' crop in this mode
    with pytest.raises(ValueError, match="crops must be one of"):
        enc.query_from_grid(Image.new("RGB", (64, 64)), crops="tensor")


def test_trainer_batch_query_uses_the_control_grids(clip_dir):
    """SDTrainer.before_unet_predict: the query comes from the control grids in the configured mode."""
    controls, targets = [picture(10, (64, 64)), picture(11, (64, 64))], [picture(12, (64, 64))] * 2
    batch = {"control": controls, "target": targets}
    for mode in ("cat-aa'b", "caa'b"):
        enc = flux.AnalogyEncoder(clip_dir, query_mode=mode)
        torch.testing.assert_close(training.batch_query(enc, batch, "cpu"),
                                   enc.query_from_grid(controls, crops="training"))
    enc = flux.AnalogyEncoder(clip_dir, query_source="images")
    cells = [flux.grid_cells(t) for t in targets]
    torch.testing.assert_close(training.batch_query(enc, batch, "cpu"),
                               enc(*[[c[i] for c in cells] for i in range(3)]))


def test_query_projection_none(clip_dir):
    """AttLoRA query_projection_type "none": nn.Identity, so key_dim must equal query_dim; no att_lora_to_q is
    saved, and such a checkpoint loads back as "none"."""
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="key_dim must equal query_dim"):
        lf.inject_lorweb(base, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=24,
                                               query_projection_type="none", target_modules=["0"]))
    lf.inject_lorweb(base, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=8, activation="softmax",
                                           query_projection_type="none", target_modules=["0"]))
    layer = base[0]
    assert "att_lora_to_q.weight" not in layer.lorweb_tensors() and not layer.att_lora_to_q.weight.requires_grad
    # a buffer, not a parameter: model.requires_grad_(True) (a custom training loop) cannot make it trainable, and
    # it is in no state dict (a trained identity would have been silently lost at save)
    base.requires_grad_(True)
    assert not layer.att_lora_to_q.weight.requires_grad
    assert all(p is not layer.att_lora_to_q.weight for p in base.parameters())
    assert not any(k.endswith("att_lora_to_q.weight") for k in base.state_dict())
    assert torch.equal(layer.att_lora_to_q.weight, torch.eye(8))
    base.requires_grad_(False)
    # a module state_dict saved when the identity was a parameter still loads strictly; a non-identity is refused
    old = dict(base.state_dict(), **{"0.att_lora_to_q.weight": torch.eye(8)})
    base.load_state_dict(old)
    with pytest.raises(RuntimeError, match="holds another tensor"):
        base.load_state_dict(dict(old, **{"0.att_lora_to_q.weight": 2 * torch.eye(8)}))
    q = torch.randn(2, 8)
    keys = layer.lora_keys.detach()
    want = torch.softmax(q @ keys.t() / 8 ** 0.5, dim=-1)  # AttLoRA: q (identity) . keys / sqrt(d), softmax
    torch.testing.assert_close(layer.coefficients_from_query(q), want)
    state = lf.lorweb_state_dict(base)
    assert not any(k.endswith("att_lora_to_q.weight") for k in state)
    other = torch.nn.Sequential(torch.nn.Linear(6, 5))
    lf.load_lorweb_weights(other, state)
    assert other[0].query_projection_type == "none" and other[0].query_dim == 8
    with pytest.raises(ValueError, match="conflicting query_projection_type"):
        lf.load_lorweb_weights(torch.nn.Sequential(torch.nn.Linear(6, 5)), state,
                               settings={"query_projection_type": "linear"})


@pytest.mark.parametrize("mode", QUERY_MODES)
@pytest.mark.parametrize("size", [(96, 40), (40, 96), (64, 64)])  # wide, tall and square cells
def test_cells_crops_cut_the_grids_own_cells(clip_encoder, mode, size):
    """crops="cells" (the native resolution, not official): the boxes of the grid's own cells, split at
    (W // 2, H // 2); square cells give the official crops."""
    enc = clip_encoder
    grid = picture(17, size)
    w, h = size
    x, y = w // 2, h // 2
    with torch.no_grad():
        def emb(im):
            return reference_clip_encode(enc.model, im, mode if mode in PATCH_QUERY_MODES else None)

        if mode in PATCH_QUERY_MODES:
            pool = (lambda t: t.mean(dim=1))
        else:
            pool = (lambda t: t[:, 0])
        if mode in ("aa'bb'", "caa'bb'"):
            want = pool(emb(grid))
        elif mode in ("caa'b", "paa'b", "paa'b3"):
            z = grid.copy()
            z.paste(0, (x, y, w, h))
            want = pool(emb(z))
        elif mode == "caa'":
            want = pool(emb(grid.crop((0, 0, w, y))))
        else:
            a, a2, b = (pool(emb(grid.crop(box))) for box in ((0, 0, x, y), (x, 0, w, y), (0, y, x, h)))
            want = {"ca'-ca": a2 - a, "ca'-ca+cb": a2 - a + b}.get(mode, torch.cat([a, a2, b], dim=1))
    got = enc.query_from_grid(grid, query_mode=mode, crops="cells")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if w == h:
        torch.testing.assert_close(got, enc.query_from_grid(grid, query_mode=mode), atol=2e-5, rtol=1e-4)

