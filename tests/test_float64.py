"""float64 stays float64 on the torch backend (gradcheck, research use); fused backends refuse it clearly."""

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import ops, reference
from lorweb_fast.layer import LoRWeBLinear


def _problem(seed=0, batch=2, seq=3, k=5, out=4, n=3, r=2):
    g = torch.Generator().manual_seed(seed)
    d = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    coeffs = torch.rand(batch, n, generator=g, dtype=torch.float64).requires_grad_(True)
    return d(batch, seq, k), d(out, k), d(out), d(n, k, r), d(n, r, out), coeffs


def test_functional_api_keeps_float64():
    x, w, b, a, bb, c = _problem()
    y = lf.lorweb_linear(x, w, b, a, bb, c, 0.5, backend="torch")
    d = lf.mixed_lora_delta(x, a, bb, c, 0.5)  # backend=None picks torch for float64
    assert y.dtype == d.dtype == torch.float64
    want = reference.lorweb_linear(x, w, b, a, bb, c, 0.5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, reference.mixed_lora_delta(x, a, bb, c, 0.5), rtol=1e-12, atol=1e-12)


def test_gradcheck_lorweb_linear_and_delta_float64():
    x, w, b, a, bb, c = _problem()
    assert torch.autograd.gradcheck(lambda *t: lf.lorweb_linear(*t, 0.7, backend="torch"), (x, w, b, a, bb, c))
    add = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, bb, c, add: lf.mixed_lora_delta(x, a, bb, c, 0.7, add_to=add),
                                    (x, a, bb, c, add))
    x2 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)  # (B, in) inputs
    assert torch.autograd.gradcheck(lambda x2, a, bb, c: lf.mixed_lora_delta(x2, a, bb, c, 0.7), (x2, a, bb, c))


@pytest.mark.parametrize("activation,reduce", [("softmax", "mean"), ("tanh", "sum")])
def test_compute_coefficients_float64_logits_and_gradcheck(activation, reduce):
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    to_q = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got = lf.compute_coefficients(query, to_q, keys, heads=2, activation=activation, reduce=reduce)
    assert got.dtype == torch.float64
    want = reference.compute_coefficients(query, to_q, keys, heads=2, activation=activation, reduce=reduce)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)  # fp32 logits would miss this by ~1e-7
    fn = lambda q, w, k: lf.compute_coefficients(q, w, k, heads=2, activation=activation, reduce=reduce)  # noqa
    assert torch.autograd.gradcheck(fn, (query, to_q, keys))
    stacked = lf.compute_coefficients(query, to_q[None].expand(2, -1, -1), keys[None].expand(2, -1, -1), heads=2,
                                      activation=activation, reduce=reduce)
    assert stacked.dtype == torch.float64 and torch.equal(stacked[1], got)


def test_layer_in_float64_end_to_end_gradcheck():
    torch.manual_seed(0)
    layer = LoRWeBLinear(torch.nn.Linear(5, 4).double(), num_loras=3, rank=2, key_dim=4, query_dim=6,
                         backend="torch")
    assert layer.lora_A.dtype == torch.float64
    with torch.no_grad():
        layer.lora_B.normal_()
    query = torch.randn(2, 6, dtype=torch.float64)
    layer.set_coefficients(layer.coefficients_from_query(query))
    assert layer.coefficients.dtype == torch.float64
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float64
    base = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    want = base + reference.mixed_lora_delta(x, layer.lora_A, layer.lora_B, layer.coefficients, layer.scale)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)

    def through_query(keys, to_q, x):  # gradients reach the keys and the query projection through the mixture
        c = lf.compute_coefficients(query, to_q, keys)
        return lf.lorweb_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, c,
                                layer.scale)
    assert torch.autograd.gradcheck(through_query, (layer.lora_keys.detach().requires_grad_(),
                                                    layer.att_lora_to_q.weight.detach().requires_grad_(), x))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_refuse_float64(backend):
    x, w, b, a, bb, c = (t.detach() for t in _problem())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, a, bb, c = (t.to(device) for t in (x, w, b, a, bb, c))
    usable = ops._unavailable_reason(backend, x.device) is None
    match = "does not support float64" if usable else "is unavailable"
    with pytest.raises(lf.BackendUnavailableError, match=match):
        lf.lorweb_linear(x, w, b, a, bb, c, 0.5, backend=backend)
    with pytest.raises(lf.BackendUnavailableError, match=match):
        lf.mixed_lora_delta(x, a, bb, c, 0.5, backend=backend)
