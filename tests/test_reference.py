"""The float64 reference against an explicit per-LoRA loop, and gradcheck of the reference."""

import math

import pytest
import torch

from lorweb_fast import reference


def loop_coefficients(query, to_q, keys, heads, activation, reduce):
    """Per-sample, per-head, per-LoRA loops straight from METHOD.md."""
    bsz, n = query.shape[0], keys.shape[0]
    d = keys.shape[1] // heads
    out = torch.zeros(bsz, n, dtype=torch.float64)
    for b in range(bsz):
        p = to_q.double() @ query[b].double()
        per_head = []
        for h in range(heads):
            logits = torch.stack([p[h * d:(h + 1) * d] @ keys[i, h * d:(h + 1) * d].double() / math.sqrt(d)
                                  for i in range(n)])
            per_head.append(torch.softmax(logits, 0) if activation == "softmax" else torch.tanh(logits))
        c = torch.stack(per_head)
        if reduce == "mean":
            out[b] = c.mean(0)
        else:
            out[b] = c.sum(0).clamp(0.0 if activation == "softmax" else -1.0, 1.0)
    return out


def loop_delta(x, lora_a, lora_b, coeffs, scale):
    """sum over LoRAs n of coeffs[b, n] * B_n^T (A_n^T x), one LoRA and one sample at a time."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    out = torch.zeros(x3.shape[0], x3.shape[1], lora_b.shape[2], dtype=torch.float64)
    for b in range(x3.shape[0]):
        for n in range(lora_a.shape[0]):
            out[b] += coeffs[b, n].double() * (x3[b].double() @ lora_a[n].double() @ lora_b[n].double())
    out = out * scale
    return out if x.dim() == 3 else out.squeeze(1)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_coefficients_match_loop(heads, activation, reduce):
    g = torch.Generator().manual_seed(heads)
    query, to_q, keys = torch.randn(3, 24, generator=g), torch.randn(16, 24, generator=g), torch.randn(5, 16,
                                                                                                        generator=g)
    got = reference.compute_coefficients(query, to_q, keys, heads=heads, activation=activation, reduce=reduce)
    want = loop_coefficients(query, to_q, keys, heads, activation, reduce)
    assert got.dtype == torch.float64 and got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sum_clamp_is_applied():
    # Two heads that agree on LoRA 0 give a summed softmax weight of ~2 there, which the official code clamps to 1.
    to_q = torch.eye(4)
    keys = torch.tensor([[10.0, 0, 10.0, 0], [0, 0, 0, 0]])
    query = torch.tensor([[10.0, 0, 10.0, 0]])
    c = reference.compute_coefficients(query, to_q, keys, heads=2, activation="softmax", reduce="sum")
    assert c[0, 0].item() == 1.0 and 0 < c[0, 1].item() < 0.01
    t = reference.compute_coefficients(-query, to_q, keys, heads=2, activation="tanh", reduce="sum")
    assert t[0, 0].item() == -1.0


@pytest.mark.parametrize("three_d", [True, False])
def test_delta_matches_loop(three_d):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*((2, 5, 7) if three_d else (2, 7)), generator=g)
    a, b = torch.randn(3, 7, 2, generator=g), torch.randn(3, 2, 6, generator=g)
    c = torch.rand(2, 3, generator=g)
    torch.testing.assert_close(reference.mixed_lora_delta(x, a, b, c, 0.5), loop_delta(x, a, b, c, 0.5),
                               rtol=1e-12, atol=1e-12)


def test_bad_mode_names_raise():
    q, w, k = torch.randn(1, 4), torch.randn(4, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="activation"):
        reference.compute_coefficients(q, w, k, activation="relu")
    with pytest.raises(ValueError, match="reduce"):
        reference.compute_coefficients(q, w, k, reduce="max")
    with pytest.raises(ValueError, match="divisible"):
        reference.compute_coefficients(q, w, k, heads=3)


@pytest.mark.parametrize("activation,reduce,heads", [("softmax", "mean", 2), ("tanh", "sum", 1),
                                                     ("softmax", "sum", 4), ("tanh", "mean", 2)])
def test_gradcheck_full_chain(activation, reduce, heads):
    """gradcheck of delta(x, A, B, coefficients(query; to_q, keys)) w.r.t. x, A, B, to_q and keys, and of the delta
    w.r.t. the coefficients directly."""
    g = torch.Generator().manual_seed(1)
    d = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    x, a, b = d(2, 3, 5), d(3, 5, 2), d(3, 2, 4)
    query, to_q, keys = d(2, 6), d(8, 6) * 0.3, d(3, 8)
    to_q = to_q.detach().requires_grad_(True)

    def chain(x, a, b, to_q, keys):
        c = reference.compute_coefficients(query, to_q, keys, heads=heads, activation=activation, reduce=reduce)
        return reference.mixed_lora_delta(x, a, b, c, 0.5)

    assert torch.autograd.gradcheck(chain, (x, a, b, to_q, keys))
    coeffs = torch.rand(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, c: reference.mixed_lora_delta(x, a, b, c, 0.5), (x, coeffs))
    assert torch.autograd.gradcheck(lambda x2: reference.mixed_lora_delta(x2, a, b, coeffs, 0.5), (x[:, 0],))


def official_attlora_coefficients(query, to_q_weight, lora_keys, heads, lora_softmax, mixing_coeffs_type):
    """Transcribed from NVlabs/LoRWeB toolkit/network_mixins.py ``attlora_forward`` (the part after the query is
    built): the query (B, 1, D) through ``att_lora_to_q``, viewed as (B, 1, heads, head_dim) and transposed to
    (B, heads, 1, head_dim); the keys (N, key_dim) viewed as (N, heads, head_dim), transposed and expanded to
    (B, heads, N, head_dim); softmax: ``scaled_dot_product_attention`` with identity values eye(N) and scale
    head_dim ** -0.5; tanh: ``tanh(q @ k^T * scale)``; then ``sum(dim=(1, 2))`` clamped to [0 | -1, 1], or
    ``mean(dim=(1, 2))``."""
    bsz = query.shape[0]
    q = torch.nn.functional.linear(query.reshape(bsz, 1, -1), to_q_weight)
    head_dim = lora_keys.shape[-1] // heads
    q = q.view(bsz, 1, heads, head_dim).transpose(1, 2)
    k = lora_keys.view(-1, heads, head_dim).transpose(0, 1).unsqueeze(0).expand(bsz, -1, -1, -1)
    n, scale = lora_keys.shape[0], head_dim ** -0.5
    if lora_softmax:
        values = torch.eye(n, n, dtype=q.dtype).expand(bsz, heads, -1, -1)
        c = torch.nn.functional.scaled_dot_product_attention(q, k, values, dropout_p=0.0, is_causal=False,
                                                             scale=scale)
    else:
        c = torch.tanh(q @ k.transpose(-2, -1) * scale)
    if mixing_coeffs_type == "sum":
        return c.sum(dim=(1, 2)).clamp(min=0 if lora_softmax else -1, max=1)
    return c.mean(dim=(1, 2))


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_coefficients_match_the_official_attlora_forward(heads, activation, reduce):
    """The reference, the functional op and a LoRWeBLinear layer against the transcription of the official layer
    (float64, so the comparison is tight)."""
    import lorweb_fast as lf

    g = torch.Generator().manual_seed(heads)
    query = torch.randn(3, 24, generator=g, dtype=torch.float64)
    to_q = torch.randn(16, 24, generator=g, dtype=torch.float64) * 0.4
    keys = torch.randn(7, 16, generator=g, dtype=torch.float64) * 2
    want = official_attlora_coefficients(query, to_q, keys, heads, activation == "softmax", reduce)
    got = reference.compute_coefficients(query, to_q, keys, heads=heads, activation=activation, reduce=reduce)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    op = lf.compute_coefficients(query, to_q, keys, heads=heads, activation=activation, reduce=reduce)
    torch.testing.assert_close(op.double(), want, rtol=1e-12, atol=1e-12)
    layer = lf.LoRWeBLinear(torch.nn.Linear(5, 4).double(), num_loras=7, rank=2, key_dim=16, query_dim=24,
                            heads=heads, activation=activation, reduce=reduce, dtype=torch.float64)
    with torch.no_grad():
        layer.att_lora_to_q.weight.copy_(to_q)
        layer.lora_keys.copy_(keys)
    torch.testing.assert_close(layer.coefficients_from_query(query).double(), want, rtol=1e-12, atol=1e-12)
    if reduce == "sum" and heads > 1:  # the clamp is exercised (one head's softmax / tanh stays within it)
        assert bool((want == (0 if activation == "softmax" else -1)).any() or (want == 1).any())


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_bf16_coefficients_round_to_the_official_bf16_ones(heads, activation, reduce):
    """At inference the official adapter is bf16 (the base's dtype): query, att_lora_to_q and keys in bf16 through
    the transcription above give bf16 coefficients. lorweb_fast computes them from the same bf16 weights with fp32
    logits, softmax / tanh and head mean (fp32 result, README "adapter arithmetic"). For the released layer (softmax,
    one head) they round to the official bf16 values within one bf16 step (equal on the CPUs checked: SDPA also
    takes the softmax in fp32); where the official code rounds bf16 logits before tanh, or averages heads in bf16,
    they agree within a few bf16 steps of the largest coefficient. At the released sizes (key_dim 128, N 32, the
    2304-wide CLIP query)."""
    import lorweb_fast as lf

    g = torch.Generator().manual_seed(10 + heads)
    query = (torch.randn(4, 2304, generator=g) * 0.05).to(torch.bfloat16)
    to_q = (torch.randn(128, 2304, generator=g) * 2304 ** -0.5).to(torch.bfloat16)
    keys = torch.randn(32, 128, generator=g).to(torch.bfloat16)
    want = official_attlora_coefficients(query, to_q, keys, heads, activation == "softmax", reduce)
    got = lf.compute_coefficients(query, to_q, keys, heads=heads, activation=activation, reduce=reduce)
    assert want.dtype == torch.bfloat16 and got.dtype == torch.float32
    eps = torch.finfo(torch.bfloat16).eps
    assert float(want.float().abs().max()) > 1e-3  # not a comparison of zeros
    if activation == "softmax" and heads == 1:
        step = eps * want.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert bool(((got.to(torch.bfloat16).float() - want.float()).abs() <= step).all())
    else:
        torch.testing.assert_close(got, want.float(), rtol=4 * eps, atol=4 * eps * float(want.float().abs().max()))


@pytest.mark.parametrize("activation,reduce,heads", [("softmax", "mean", 1), ("tanh", "sum", 2)])
def test_coefficients_stay_fp32_under_autocast(activation, reduce, heads):
    """Training calls ``set_query`` inside the bf16 ``accelerator.autocast()``; the official trainer runs no autocast
    and computes the coefficients from the fp32 query and parameters (NVlabs/LoRWeB toolkit/network_mixins.py
    ``forward``: the external query cast to the fp32 LoRA dtype, then ``attlora_forward``). So under
    ``torch.autocast(bfloat16)`` the op, ``set_query`` and a compiled call give exactly the fp32 result computed
    without autocast, which is within fp32 roundings of the float64 transcription of the official layer."""
    import lorweb_fast as lf

    g = torch.Generator().manual_seed(7)
    query = torch.randn(3, 24, generator=g)
    to_q = torch.randn(16, 24, generator=g) * 0.4
    keys = torch.randn(7, 16, generator=g) * 2
    kw = dict(heads=heads, activation=activation, reduce=reduce)
    plain = lf.compute_coefficients(query, to_q, keys, **kw)
    official = official_attlora_coefficients(query.double(), to_q.double(), keys.double(), heads,
                                             activation == "softmax", reduce)
    torch.testing.assert_close(plain.double(), official, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lf.compute_coefficients(query, to_q, keys, **kw)
        stacked = lf.compute_coefficients(query, to_q[None].expand(2, -1, -1), keys[None].expand(2, -1, -1), **kw)
    assert got.dtype == stacked.dtype == torch.float32
    assert torch.equal(got, plain) and torch.equal(stacked[1], plain)

    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=7, rank=2, key_dim=16, query_dim=24, target_modules=["0"],
                                            **kw))
    with torch.no_grad():
        model[0].att_lora_to_q.weight.copy_(to_q)
        model[0].lora_keys.copy_(keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coeffs = lf.set_query(model, query)["0"]
    assert coeffs.dtype == torch.float32 and torch.equal(coeffs.detach(), plain)

    def under_autocast(q, w, k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lf.compute_coefficients(q, w, k, **kw)

    compiled = torch.compile(under_autocast, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(query, to_q, keys), plain, rtol=1e-6, atol=1e-7)
    # negative control: the same arithmetic left to autocast (bf16 projection and logits) is told apart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = (query @ to_q.t()).view(3, heads, -1)
        logits = torch.einsum("bhd,nhd->bhn", p, keys.view(7, heads, -1)) * (16 // heads) ** -0.5
    assert logits.dtype == torch.bfloat16
    bf16 = torch.softmax(logits.float(), -1) if activation == "softmax" else torch.tanh(logits.float())
    bf16 = bf16.mean(1) if reduce == "mean" else bf16.sum(1).clamp(-1.0, 1.0)
    assert (bf16 - plain).abs().max() > 1e-4


def test_the_reference_refuses_what_the_fast_paths_refuse():
    """The oracle checks shapes instead of letting einsum broadcast a size-1 dimension: coefficients of batch 1 for
    an input of batch 2 would otherwise pass as a batch bug's reference."""
    x, a, b = torch.randn(2, 5, 7), torch.randn(3, 7, 2), torch.randn(3, 2, 4)
    for bad in ((x, a, b, torch.rand(1, 3)), (x, a, b, torch.rand(2, 4)), (x[..., :6], a, b, torch.rand(2, 3)),
                (x, a, b[:, :1], torch.rand(2, 3)), (x.unsqueeze(1), a, b, torch.rand(2, 3))):
        with pytest.raises(ValueError, match="expected|do not match"):
            reference.mixed_lora_delta(*bad, 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        reference.compute_coefficients(torch.randn(2, 6), torch.randn(8, 6), torch.randn(3, 9))
    with pytest.raises(ValueError, match="do not chain"):
        reference.compute_coefficients(torch.randn(2, 5), torch.randn(8, 6), torch.randn(3, 8))
