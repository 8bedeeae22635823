"""LoRWeBKontextPipeline on a tiny random FLUX.1-Kontext pipeline saved with save_pretrained and loaded back with
from_pretrained; analogy encoders (CLIP, SigLIP); the CLI's infer errors."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast.testing import build_tiny_lorweb_assets, random_analogy
from lorweb_fast import cli, demo, flux

pytest.importorskip("diffusers")
STEPS = 3
# fp32 end to end: batched and one-by-one runs differ only by the summation order inside GEMMs/convolutions
# (a few fp32 ulps per operation, ~1e-6 relative), carried through STEPS denoising steps and the VAE decoder;
# 1e-4 on images in [0, 1] is two orders of magnitude above that and far below one 8-bit grey level (3.9e-3).
FP32_IMAGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny pipeline + CLIP on disk, and an official-format LoRWeB checkpoint with a non-zero basis."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_lorweb_assets(root)
    return root


@pytest.fixture(scope="module")
def lorweb_pipe(assets):
    return flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      resolution="native", long_edge=64)




def run(pipe, analogies, prompts, *, merge=False, seeds=None):
    a, a2, b = (list(x) for x in zip(*analogies))
    generators = [torch.Generator().manual_seed(s) for s in (seeds or range(len(a)))]
    return pipe(a, a2, b, prompts, num_inference_steps=STEPS, generator=generators, merge=merge,
                output_type="np", max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, progress=False)


def test_encoder_runs_in_the_pipeline_dtype_by_default(assets):
    """inference.py loads CLIPVisionModelWithProjection ``.to(args.device, dtype=torch.bfloat16)``, the dtype of
    the FLUX pipeline: the encoder follows the pipeline's dtype unless ``encoder_dtype`` says otherwise."""
    bf16 = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      dtype=torch.bfloat16)
    assert bf16.pipe.transformer.dtype == torch.bfloat16
    assert next(bf16.encoder.model.parameters()).dtype == torch.bfloat16
    fp32 = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      dtype=torch.bfloat16, encoder_dtype=torch.float32)
    assert next(fp32.encoder.model.parameters()).dtype == torch.float32
    a, a2, b = random_analogy(0)
    grids = bf16.control_grids(a, a2, b)
    q16, q32 = bf16.encoder.query_from_grid(grids), fp32.encoder.query_from_grid(grids)
    assert q16.dtype == q32.dtype == torch.float32  # queries are returned in fp32 either way
    torch.testing.assert_close(q16, q32, atol=0.1, rtol=0.05)  # bf16 rounding only...
    assert not torch.equal(q16, q32)  # ...but rounding there is
    with pytest.raises(TypeError, match="encoder_dtype must be a floating point torch.dtype, got 'bf16'"):
        flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                   encoder_dtype="bf16")


def test_from_pretrained_takes_torch_dtype_and_refuses_unknown_options_before_loading(assets, monkeypatch):
    """diffusers' ``torch_dtype`` is an alias of ``dtype``; an unknown option or a bad dtype is refused before the
    pipeline loads (with FLUX.1-Kontext-dev that takes minutes)."""
    pipe = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      torch_dtype=torch.bfloat16)
    assert pipe.pipe.transformer.dtype == torch.bfloat16
    loads = []
    monkeypatch.setattr(flux, "load_kontext_pipeline", lambda *a, **k: loads.append(a))
    with pytest.raises(TypeError, match=r"unexpected options \['guidance_scale'\]"):
        flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors", guidance_scale=2.5)
    with pytest.raises(ValueError, match="disagree"):
        flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                   dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be a floating point torch.dtype"):
        flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors", dtype="bf16")
    assert loads == []


def test_returns_b_prime_of_the_cell_size(lorweb_pipe):
    a, a2, b = random_analogy(0)  # b is 40x40: the 64-px grid has 32x32 cells
    (out,) = lorweb_pipe(a, a2, b, "mirror the image", num_inference_steps=STEPS, progress=False,
                         max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)
    grid = lorweb_pipe.control_grids(a, a2, b)[0]
    assert grid.size == (64, 64)
    assert isinstance(out, Image.Image) and out.size == (32, 32)
    assert np.asarray(out).std() > 0


def test_query_is_set_once_per_generation(lorweb_pipe, monkeypatch):
    calls, forwards = [], []
    real_set_query = flux.set_query
    monkeypatch.setattr(flux, "set_query", lambda m, q, **kw: calls.append(q.shape) or real_set_query(m, q, **kw))
    handle = lorweb_pipe.transformer.register_forward_hook(lambda *a: forwards.append(1))
    try:
        run(lorweb_pipe, [random_analogy(0), random_analogy(1)], ["flip", "swap"])
    finally:
        handle.remove()
    assert calls == [torch.Size([2, 24])]
    assert len(forwards) == STEPS


def test_batch_of_two_equals_one_by_one(lorweb_pipe):
    analogies, prompts = [random_analogy(0), random_analogy(1)], ["mirror the image", "swap the colours"]
    batched = run(lorweb_pipe, analogies, prompts, seeds=[5, 6])
    coeffs = next(iter(lf.get_coefficients(lorweb_pipe.transformer).values()))
    assert not torch.allclose(coeffs[0], coeffs[1])  # two different analogies, two different mixtures
    singles = [run(lorweb_pipe, [x], [p], seeds=[s])[0] for x, p, s in zip(analogies, prompts, [5, 6])]
    for got, want in zip(batched, singles):
        assert got.shape == want.shape == (32, 32, 3)
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_IMAGE_ATOL)
    assert np.abs(batched[0] - batched[1]).max() > 100 * FP32_IMAGE_ATOL


def test_merged_pipeline_matches_unmerged(lorweb_pipe, monkeypatch):
    entered = []
    real_merged = flux.merged
    monkeypatch.setattr(flux, "merged", lambda m, *args: entered.append(1) or real_merged(m, *args))
    x = [random_analogy(3)]
    auto = run(lorweb_pipe, x, ["flip"], merge="auto")[0]
    assert entered == [1]  # batch 1, plain weights: merged automatically
    plain = run(lorweb_pipe, x, ["flip"], merge=False)[0]
    assert entered == [1]
    np.testing.assert_allclose(auto, plain, rtol=0, atol=FP32_IMAGE_ATOL)
    run(lorweb_pipe, [random_analogy(3), random_analogy(4)], ["flip", "flip"], merge="auto")
    assert entered == [1]  # never for a batch of different analogies


def test_lorweb_changes_the_output(assets, lorweb_pipe):
    """The basis is in the loop: zeroing lora_B changes b'."""
    x = [random_analogy(7)]
    with_basis = run(lorweb_pipe, x, ["flip"])[0]
    saved = {n: l.lora_B.detach().clone() for n, l in lf.lorweb_layers(lorweb_pipe.transformer).items()}
    try:
        with torch.no_grad():
            for layer in lf.lorweb_layers(lorweb_pipe.transformer).values():
                layer.lora_B.zero_()
        without = run(lorweb_pipe, x, ["flip"])[0]
    finally:
        with torch.no_grad():
            for n, layer in lf.lorweb_layers(lorweb_pipe.transformer).items():
                layer.lora_B.copy_(saved[n])
    assert np.abs(with_basis - without).max() > 100 * FP32_IMAGE_ATOL


def test_an_image_over_the_decompression_bomb_limit_is_one_named_error(tmp_path, monkeypatch, capsys):
    """Pillow's DecompressionBombError (more than twice Image.MAX_IMAGE_PIXELS pixels) is a plain Exception that
    no image-error wrapper caught: the CLI printed a traceback, data check --skip-bad did not skip. Now load_image,
    the training folder scan (skippable) and the evaluation reader name the file, the limit and how to raise it."""
    from lorweb_fast import cli
    from lorweb_fast.data import AnalogyDataError, AnalogyFolder
    from lorweb_fast.evaluation.evalsets import EvalInputError, image_size, load_rgb

    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100: a bomb
    fragment = "big.png is too large to decode (Image size (1600 pixels) exceeds limit"
    with pytest.raises(ValueError, match=re.escape(fragment) + ".*raise PIL.Image.MAX_IMAGE_PIXELS"):
        flux.load_image(tmp_path / "big.png")
    for read in (load_rgb, image_size):
        with pytest.raises(EvalInputError, match=re.escape(fragment)):
            read(tmp_path / "big.png")
    root = tmp_path / "data"
    for sub in ("control", "target"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (6, 2)).save(root / "control" / "s0.png")
    Image.new("RGB", (2, 2)).save(root / "target" / "s0.png")
    (root / "target" / "s0.txt").write_text("make it red")
    (root / "control" / "s1.png").write_bytes((tmp_path / "big.png").read_bytes())
    (root / "target" / "s1.png").write_bytes((tmp_path / "big.png").read_bytes())
    with pytest.raises(AnalogyDataError, match=re.escape("s1.png is too large to decode")):
        AnalogyFolder(root, resize="long-edge")
    with pytest.warns(UserWarning, match="skipping training sample s1"):
        ds = AnalogyFolder(root, resize="long-edge", skip_bad=True)
    assert [ds.name(i) for i in range(len(ds))] == ["s0"]
    out = tmp_path / "out"
    assert cli.main(["infer", "--weights", str(tmp_path / "w.safetensors"), "--a", str(tmp_path / "big.png"),
                     "--a-prime", str(tmp_path / "big.png"), "--b", str(tmp_path / "big.png"), "--prompt", "x",
                     "--out", str(out / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err


def test_pipeline_rejects_bad_inputs(lorweb_pipe, tmp_path):
    a, a2, b = random_analogy(0)
    layers = lf.lorweb_layers(lorweb_pipe.transformer)
    lorweb_pipe(a, a2, b, "x", num_inference_steps=1, progress=False,
                max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)  # coefficients in place before the bad calls
    coefficients = {n: layer.coefficients.clone() for n, layer in layers.items()}
    state = {k: v.clone() for k, v in lorweb_pipe.transformer.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="missing.png"):
        lorweb_pipe(tmp_path / "missing.png", a2, b, "x")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        lorweb_pipe(a, tmp_path / "notes.png", b, "x")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="dir.png is a folder; give an image file"):
        lorweb_pipe(a, a2, tmp_path / "dir.png", "x")
    with pytest.raises(ValueError, match="https://example.com/a.png is a URL: lorweb_fast does not download"):
        lorweb_pipe("https://example.com/a.png", a2, b, "x")
    with pytest.raises(ValueError, match=r"the image has no pixels \(0x5\)"):
        lorweb_pipe(a, Image.new("RGB", (0, 5)), b, "x")
    with pytest.raises(ValueError, match="same number of images"):
        lorweb_pipe([a, a], [a2], [b, b], "x")
    with pytest.raises(ValueError, match="3 prompts for 2 analogies"):
        lorweb_pipe([a, a], [a2, a2], [b, b], ["x"] * 3)
    with pytest.raises(ValueError, match="1 prompts for 2 analogies"):  # a list is not broadcast (a str is)
        lorweb_pipe([a, a], [a2, a2], [b, b], ["x"])
    # the refused calls changed neither the coefficients nor any weight
    assert all(torch.equal(layers[n].coefficients, c) for n, c in coefficients.items())
    assert all(torch.equal(v, state[k]) for k, v in lorweb_pipe.transformer.state_dict().items())


def test_encoder_query_dim_must_match(assets):
    pipe = flux.load_kontext_pipeline(assets / "pipe")
    lf.load_lorweb_weights(pipe.transformer, assets / "lorweb.safetensors")
    demo.build_tiny_clip(assets / "clip4", projection_dim=4)
    with pytest.raises(ValueError, match="12 features.*query_dim \\[24\\]"):
        flux.LoRWeBKontextPipeline(pipe, flux.AnalogyEncoder(assets / "clip4"))


def _siglip(tmp_path):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    return SiglipVisionModel(cfg).eval()


def _siglip2(tmp_path):
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    cfg = Siglip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              patch_size=8, num_patches=16)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path)
    return Siglip2VisionModel(cfg).eval()


@pytest.mark.parametrize("build", [_siglip, _siglip2], ids=["siglip", "siglip2"])
def test_siglip_encoders(tmp_path, build):
    torch.manual_seed(0)
    model = build(tmp_path)
    model.save_pretrained(tmp_path)
    enc = flux.AnalogyEncoder(tmp_path)
    assert enc.query_dim == 48
    imgs = [random_analogy(i) for i in range(2)]
    q = enc([x[0] for x in imgs], [x[1] for x in imgs], [x[2] for x in imgs])
    assert q.shape == (2, 48)
    inputs = enc.processor(images=[imgs[1][1]], return_tensors="pt")
    with torch.no_grad():
        want = model(**inputs).pooler_output[0]
    torch.testing.assert_close(q[1, 16:32], want)  # a' of the second analogy, same computation


def test_unsupported_encoder(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="unsupported analogy encoder"):
        flux.AnalogyEncoder(tmp_path)


def test_a_text_model_or_a_folder_without_weights_as_encoder_is_a_value_error(tmp_path):
    """A CLIP *text* model (a FLUX pipeline's text_encoder/ folder, an easy mix-up) passed the model_type check and
    failed inside transformers with a RuntimeError (a traceback from the CLI); a CLIP folder without weights raised
    transformers' OSError: both are ValueErrors naming the encoder (one line, exit status 2 from the CLI)."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    CLIPTextConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   projection_dim=8).save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match=r"'.*text' is a text model \(model_type 'clip_text_model'\); the analogy "
                                         r"encoder encodes images"):
        flux.AnalogyEncoder(tmp_path / "text")
    CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     projection_dim=8, image_size=32, patch_size=16).save_pretrained(tmp_path / "noweights")
    with pytest.raises(ValueError, match=r"cannot load the analogy encoder '.*noweights' \(clip_vision_model\): "):
        flux.AnalogyEncoder(tmp_path / "noweights")


def test_a_three_layer_query_mode_needs_16_encoder_layers_before_any_weights_load(tmp_path):
    """The "...3" query modes read hidden states -16, -8, -1: an encoder with fewer layers is refused from its
    config, before its weights load (it failed at the first query: for training, after FLUX had loaded)."""
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     projection_dim=8, image_size=32, patch_size=16).save_pretrained(tmp_path / "clip2")
    for mode in ("paa'b3", "cat-paa'b3"):
        with pytest.raises(ValueError, match=rf"query mode {re.escape(repr(mode))} uses the hidden states -16, -8 "
                                             r"and -1 of the vision model; the analogy encoder '.*clip2' has only 2 "
                                             "layers"):
            flux.AnalogyEncoder(tmp_path / "clip2", query_mode=mode)  # no weights file: refused before loading


@pytest.mark.parametrize("index,fragment", [('{"transformer": ["diffusers", "FluxTransformer2DModel"]}',
                                             "names no pipeline class (_class_name)"),
                                            ("{not json", "is not valid JSON")])
def test_a_broken_model_index_is_a_value_error_naming_it(tmp_path, index, fragment):
    """A model_index.json without _class_name failed inside diffusers with KeyError('_class_name') (a traceback from
    the CLI): a ValueError naming the model and the file."""
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(ValueError, match=rf"cannot load the FLUX.1-Kontext model '.*': .*model_index.json "
                                         rf"{re.escape(fragment)}"):
        flux.load_kontext_pipeline(tmp_path, torch.float32)


# ------------------------------------------------------------------------------------------------ CLI infer
def cli_infer(assets, tmp_path, **overrides):
    a, a2, b = random_analogy(0)
    paths = {}
    for name, im in (("a", a), ("a_prime", a2), ("b", b)):
        paths[name] = tmp_path / f"{name}.png"
        im.save(paths[name])
    paths.update(overrides)
    out = tmp_path / "out" / "b_prime.png"
    argv = ["infer", "--a", str(paths["a"]), "--a-prime", str(paths["a_prime"]), "--b", str(paths["b"]),
            "--prompt", "mirror the image", "--weights", str(paths.get("weights", assets / "lorweb.safetensors")),
            "--model", str(assets / "pipe"), "--out", str(out), "--steps", "2", "--dtype", "fp32",
            "--resolution", "native", "--long-edge", "64",
            "--coefficients-plot", str(tmp_path / "out" / "coefficients.png"),
            "--pipe-arg", f"max_sequence_length={demo.DEMO_MAX_SEQUENCE_LENGTH}", *paths.get("extra", [])]
    return cli.main(argv), out


def test_cli_infer_writes_b_prime(assets, tmp_path):
    rc, out = cli_infer(assets, tmp_path)
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (32, 32)
        assert np.asarray(im).std() > 0
    assert (tmp_path / "out" / "coefficients.png").stat().st_size > 0


def test_cli_infer_mismatched_weights(assets, tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    cfg = dict(lf.testing.tiny_flux_config(), attention_head_dim=8, axes_dims_rope=(2, 2, 4))
    other = FluxTransformer2DModel(**cfg)  # narrower model: every shape differs
    lf.inject_lorweb(other, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=24))
    lf.save_lorweb_weights(other, tmp_path / "other.safetensors", metadata={"encoder": str(assets / "clip")})
    rc, out = cli_infer(assets, tmp_path, weights=tmp_path / "other.safetensors")
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "does not match" in err and "lora_A has shape" in err


def test_cli_infer_weights_folder_with_config(assets, tmp_path, capsys):
    """--weights DIR: the newest complete checkpoint with its config.yaml (inference.py's folder rule); a config
    that contradicts an explicit option is an error naming both values."""
    import shutil

    from lorweb_fast import official_config as oc

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in (250, 500):
        shutil.copyfile(assets / "lorweb.safetensors", run_dir / f"LoRWeB_{step:09d}.safetensors")
    (run_dir / "LoRWeB_000000750.safetensors").write_bytes(b"partial")
    oc.write_config_yaml(run_dir / "config.yaml", {"num_loras": 3, "rank": 2, "lora_alpha": 2, "key_dim": 8,
                                                   "query_mode": "cat-aa'b", "encoder": str(assets / "clip")})
    rc, out = cli_infer(assets, tmp_path, weights=run_dir)
    assert rc == 0 and out.is_file()
    out.unlink()
    rc, out = cli_infer(assets, tmp_path, weights=run_dir, extra=["--query-mode", "caa'b"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "conflicting query_mode: argument says \"caa'b\" but" in err and "config.yaml says \"cat-aa'b\"" in err
