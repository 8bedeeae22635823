"""FLUX integration pieces: analogy grids, the batch-1 merged fast path, coefficient heat maps."""

import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import flux
from lorweb_fast.testing import tiny_flux_config, tolerance

diffusers = pytest.importorskip("diffusers")
QUERY_DIM = 12


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(**tiny_flux_config()).eval()
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM))
    with torch.no_grad():
        for layer in lf.lorweb_layers(m).values():
            layer.lora_B.normal_(0, 2.0)
    return m.to(dtype)


def flux_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 6, 8, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 4, 24, generator=g).to(dtype),
                pooled_projections=torch.randn(1, 20, generator=g).to(dtype),
                timestep=torch.rand(1, generator=g).to(dtype), guidance=torch.full((1,), 3.5, dtype=dtype),
                img_ids=torch.randn(6, 3, generator=g), txt_ids=torch.zeros(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged(dtype):
    m = tiny_model(dtype)
    lf.set_query(m, torch.randn(1, QUERY_DIM))
    with torch.no_grad():
        want = m(**flux_inputs(dtype)).sample.float()
        with lf.merged(m):
            got = m(**flux_inputs(dtype)).sample.float()
    assert not torch.equal(got, flux_inputs()["hidden_states"])
    # Same math with the mixture folded into W: the difference is rounding only, amplified by the network depth
    # (a handful of layers): the dtype's tolerance relative to the output scale.
    bound = tolerance(dtype, 64) * want.abs().max()
    assert (got - want).abs().max() <= bound
    # The bound is tight enough to notice a missing mixture: with zero coefficients (the base model) the output
    # moves by more than twice the bound, so the comparison above is not vacuous.
    for layer in lf.lorweb_layers(m).values():
        layer.set_coefficients(torch.zeros(1, 3))
    with torch.no_grad():
        base = m(**flux_inputs(dtype)).sample.float()
    assert (base - want).abs().max() > 2 * bound


def test_1000_merge_restore_cycles_leave_weights_bit_identical():
    m = tiny_model(torch.bfloat16)
    lf.set_query(m, torch.randn(1, QUERY_DIM))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tensors = {n: p.data for n, p in m.named_parameters()}
    changed = False
    for _ in range(1000):
        with lf.merged(m):
            if not changed:
                changed = any(not torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert changed
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) and p.data.data_ptr() == tensors[n].data_ptr(), n


def test_merge_restores_on_error_and_refuses_bad_states():
    m = tiny_model()
    with pytest.raises(RuntimeError, match="without coefficients"):
        with lf.merged(m):
            pass
    lf.set_query(m, torch.randn(2, QUERY_DIM))
    with pytest.raises(ValueError, match="batch size 1"):
        with lf.merged(m):
            pass
    lf.set_query(m, torch.randn(1, QUERY_DIM))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(KeyError):
        with lf.merged(m):
            raise KeyError("boom")
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert not any(layer._merged for layer in lf.lorweb_layers(m).values())
    with lf.merged(m):
        with pytest.raises(RuntimeError, match="already merged"):
            with lf.merged(m):
                pass


def test_a_copy_taken_inside_a_jit_block_runs_unmerged_and_can_merge_again():
    """``copy.deepcopy`` / pickling inside a bare ``merged(model, "jit")`` block (no weight holds a mixture, so the
    copy is allowed): the block is the original's, so the copy runs unmerged (equal to the original outside the
    block), is not left marked "jit" after the block ends, and can be merged and have its layers removed."""
    import copy
    import io

    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, torch.randn(1, QUERY_DIM))
        with lf.merged(m, "jit"):
            copied = copy.deepcopy(m)
            buffer = io.BytesIO()
            torch.save(m, buffer)
        buffer.seek(0)
        pickled = torch.load(buffer, weights_only=False)
        want = m(**flux_inputs()).sample
        for other in (copied, pickled):
            assert not any(layer._merge_jit for layer in lf.lorweb_layers(other).values())
            torch.testing.assert_close(other(**flux_inputs()).sample, want, rtol=0, atol=0)
            with lf.merged(other, "full"):
                pass
            assert lf.remove_lorweb(other)


def test_grids_and_bottom_right_cell():
    a, a2, b = (Image.new("RGB", (300, 200), c) for c in ("red", "green", "blue"))
    b2 = Image.new("RGB", (300, 200), "white")
    grid = flux.control_grid(a, a2, b, long_edge=512)
    assert grid.size[0] <= 512 and grid.size[0] % 32 == 0 and grid.size[1] % 32 == 0
    w, h = grid.size
    assert grid.getpixel((w // 4, h // 4)) == (255, 0, 0) and grid.getpixel((3 * w // 4, h // 4)) == (0, 128, 0)
    assert grid.getpixel((w // 4, 3 * h // 4)) == (0, 0, 255) == grid.getpixel((3 * w // 4, 3 * h // 4))
    target = flux.target_grid(a, a2, b, b2)
    cell = flux.bottom_right_cell(target)
    assert cell.size == (w // 2, h // 2) and cell.getpixel((5, 5)) == (255, 255, 255)


def test_plot_coefficients_writes_a_heat_map(tmp_path):
    m = tiny_model()
    with pytest.raises(RuntimeError, match="set_query"):
        lf.plot_coefficients(m, tmp_path / "c.png")
    lf.set_query(m, torch.randn(1, QUERY_DIM))
    path = lf.plot_coefficients(m, tmp_path / "c.png")
    img = Image.open(path).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 50  # not blank


def test_analogy_encoder_from_a_saved_tiny_clip(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = flux.AnalogyEncoder(tmp_path)
    assert enc.query_dim == 48
    imgs = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue", "white")]
    q = enc([imgs[0], imgs[3]], [imgs[1], imgs[1]], [imgs[2], imgs[0]])
    assert q.shape == (2, 48) and q.dtype == torch.float32
    single = enc(imgs[3], imgs[1], imgs[0])
    torch.testing.assert_close(single[0], q[1], rtol=1e-5, atol=1e-5)  # batching does not mix analogies
    assert not torch.allclose(q[0], q[1])
    torch.testing.assert_close(q[0, :16], enc.embed([imgs[0]])[0])  # a's embedding comes first
    with pytest.raises(ValueError, match="same number of images"):
        enc([imgs[0]], imgs[:2], [imgs[2]])
