"""CLIP directional similarity (tiny CLIP, the slow CLIP image processor) and LPIPS (random AlexNet backbone weights
in a temporary torchvision cache, compared with the lpips package's own computation on the same weights)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lorweb_fast import demo
from lorweb_fast.evaluation import metrics as M
from lorweb_fast.evaluation import tiny
from lorweb_fast.evaluation.evalsets import EvalInputError

lpips = pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = demo.build_tiny_clip(tmp_path_factory.mktemp("clip"))
    return path


def pictures(n, seed=0, size=(40, 30)):
    rng = random.Random(seed)
    return [tiny.random_picture(rng, size) for _ in range(n)]


def test_clip_uses_the_slow_processor_with_the_model_size(clip_dir):
    """As the official query: inference.py ``main()`` builds ``CLIPImageProcessor.from_pretrained(...,
    size=image_encoder.config.image_size, crop_size=image_encoder.config.image_size)`` (the slow processor class of
    the transformers it pins) and extensions_built_in/flux_kontext.py ``encode_image`` feeds its ``pixel_values`` to
    the encoder. transformers >= 5 names that slow (PIL) class ``CLIPImageProcessorPil``; its ``CLIPImageProcessor``
    is the torchvision-backed one."""
    import transformers

    slow = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    metric = M.ClipDirectional(clip_dir)
    assert type(metric.processor) is slow
    assert metric.processor.size == {"shortest_edge": 32}
    assert metric.processor.crop_size == {"height": 32, "width": 32}


def test_clip_dir_matches_a_direct_computation(clip_dir):
    """cos(e(a') - e(a), e(b') - e(b)) with e the L2-normalised image_embeds, computed here with numpy from the model's
    embeddings of pixels prepared independently of transformers' processors (``testing.reference_clip_pixels``, a
    transcription of the slow CLIP processor)."""
    from transformers import CLIPVisionModelWithProjection

    from lorweb_fast.testing import reference_clip_pixels

    metric = M.ClipDirectional(clip_dir)
    quads = [tuple(pictures(4, seed)) for seed in range(3)]
    got = metric(quads)
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    size = model.config.image_size
    for quad, value in zip(quads, got):
        pixels = torch.cat([reference_clip_pixels(im, size) for im in quad])
        with torch.no_grad():
            emb = model(pixel_values=pixels).image_embeds
        e = emb.double().numpy()
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        u, v = e[1] - e[0], e[3] - e[2]
        ref = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        assert value == pytest.approx(ref, abs=1e-5)
    assert len(set(round(v, 6) for v in got)) == 3


def test_clip_dir_properties(clip_dir):
    metric = M.ClipDirectional(clip_dir)
    a, a2, b = pictures(3, 5)
    same, = metric([(a, a2, a, a2)])
    assert same == pytest.approx(1.0, abs=1e-5)  # the same edit on the same image
    reverse, = metric([(a, a2, a2, a)])
    assert reverse == pytest.approx(-1.0, abs=1e-5)
    zero, = metric([(a, a, b, a2)])
    assert zero == 0.0  # no edit in the reference pair: direction zero
    assert metric([]) == []


def test_clip_encoder_that_cannot_load(tmp_path):
    with pytest.raises(EvalInputError, match="cannot load the CLIP encoder .*no-clip"):
        M.ClipDirectional(tmp_path / "no-clip")


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home


def test_lpips_backbone_file_follows_torch_home(torch_home):
    assert M.lpips_backbone_file("alex") == torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"


def test_lpips_matches_the_lpips_package_on_the_same_weights(torch_home):
    """Our loading (backbone from the cache file into lpips' slices, images to [-1, 1]) against lpips' own:
    ``lpips.LPIPS(net="alex")`` reads the same cache file through torchvision, and lpips.im2tensor converts."""
    path = tiny.save_random_lpips_backbone(torch_home, seed=3)
    ours = M.LPIPSDistance("alex")
    assert ours.weights == str(path)
    ref = lpips.LPIPS(net="alex", verbose=False).eval()
    # the package really loaded our random weights (not some other copy)
    assert torch.equal(ref.net.slice1[0].weight, torch.load(path)["features.0.weight"])
    b, b2 = pictures(2, 7, size=(48, 40))
    got = ours(b, b2)
    with torch.no_grad():
        want = ref(lpips.im2tensor(np.asarray(b)), lpips.im2tensor(np.asarray(b2))).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert got > 0
    assert ours(b, b) == pytest.approx(0.0, abs=1e-7)


def test_lpips_resizes_b_to_b_prime(torch_home):
    tiny.save_random_lpips_backbone(torch_home)
    ours = M.LPIPSDistance("alex")
    b, b2 = pictures(2, 9, size=(128, 96))
    small = b2.resize((64, 48))
    assert ours(b, small) == pytest.approx(ours(b.resize((64, 48), Image.BICUBIC), small), rel=1e-6)
    with pytest.raises(EvalInputError, match="too small for LPIPS"):
        ours(b, b2.resize((16, 12)))


def test_metric_cache_ids_follow_the_weights_files(tmp_path, clip_dir):
    """The metric cache's key (``cache_id``) names the metric, the encoder or backbone, and the signature of the
    weights (files' names, sizes and modification times): a weights file replaced at the same path gives another
    key, the same files the same key."""
    import os

    path = tiny.save_random_lpips_backbone(tmp_path / "home", seed=1)
    first = M.LPIPSDistance("alex", weights=path).cache_id
    assert first.startswith(f"lpips:alex:{path}@") and M.LPIPSDistance("alex", weights=path).cache_id == first
    tiny.save_random_lpips_backbone(tmp_path / "home", seed=2)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a replaced file, a later time
    assert M.LPIPSDistance("alex", weights=path).cache_id != first
    clip_id = M.ClipDirectional(clip_dir).cache_id
    assert clip_id == f"clip:{clip_dir}@{M.weights_signature(clip_dir)}" == M.ClipDirectional(clip_dir).cache_id
    weights = next(clip_dir.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert M.ClipDirectional(clip_dir).cache_id != clip_id


def test_lpips_missing_weights_names_the_file(torch_home):
    with pytest.raises(EvalInputError) as err:
        M.LPIPSDistance("alex")
    msg = str(err.value)
    assert str(torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in msg
    assert "--lpips-weights" in msg


def test_lpips_explicit_weights_file(tmp_path, torch_home):
    path = tiny.save_random_lpips_backbone(tmp_path / "elsewhere", seed=1)
    metric = M.LPIPSDistance("alex", weights=path)
    assert metric.weights == str(path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EvalInputError, match="cannot load LPIPS alex backbone weights from .*bad.pth"):
        M.LPIPSDistance("alex", weights=bad)
    with pytest.raises(EvalInputError, match="unknown LPIPS network"):
        M.LPIPSDistance("resnet")
