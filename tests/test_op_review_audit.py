"""Review of lorweb_fast/ops.py and lorweb_fast/layer.py from a PyTorch user's view: one test per confirmed defect,
each failing on the code as reviewed (CPU only)."""

import torch
from torch import nn

import lorweb_fast as lf


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = lf.LoRWeBLinear(nn.Linear(8, 6), num_loras=3, rank=2, key_dim=4, query_dim=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _reference(layer, x, coeffs):
    """float64 y = x W^T + b + scale * sum_n coeffs[b, n] (x A_n) B_n."""
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    delta = torch.einsum("bsi,nir,nro,bn->bso", x.double(), layer.lora_A.double(), layer.lora_B.double(),
                         coeffs.double()) * layer.scale
    return x.double() @ w.t() + b + delta


def test_jit_merge_of_different_analogies_under_autocast_returns_autocasts_dtype():
    """LoRWeBLinear.jit_merged_forward, per-sample path (a batch of different analogies): under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` the batched matmul gives bf16 and the fp32 bias is then added
    with type promotion, so the layer returns float32 now, while the unmerged forward, the jit path for one analogy
    and nn.Linear return bfloat16 (LoRWeBLinear.forward documents autocast's dtype). Should return bfloat16, with
    values within bf16 rounding of the float64 reference."""
    layer = _layer()
    model = nn.Sequential(layer).requires_grad_(False)
    coeffs = torch.rand(2, 3)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 5, 8)
    want = _reference(layer, x, coeffs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unmerged = model(x)
        with lf.merged(model, strategy="jit"):
            got = model(x)
    assert unmerged.dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16, f"jit merge of a batch under autocast returned {got.dtype}"
    assert (got.double() - want).abs().max().item() < 0.05
