"""Degenerate-shape and layout audit: what ``nn.Linear`` (and a peft LoRA layer) handles, LoRWeB must handle too.

Checked forward and backward (every gradient) against the float64 reference (``lorweb_fast.reference``) with
tolerances derived from the dtype (``lorweb_fast.testing``), for the torch backend and ``backend=None`` on CPU, and
for the triton backend under Triton's CPU interpreter (``TRITON_INTERPRET=1``, which must be set before triton is
imported: those cases run once in a subprocess, ``interpreter_results``, and are reported one test each):

1. empty inputs: B = 0, zero tokens, 2-D x with M = 0 (the functional ops, the layer, the merges, ``set_query``);
2. tiny dimensions: in / out features, N, r, key_dim, query_dim of 1, heads = key_dim;
3. layouts: transposed, strided, expanded (stride 0) and offset views of x, of the coefficients, of the basis, of
   the base weight and bias; (B, H, W, in) inputs; parameters made non-contiguous; output strides as nn.Linear's;
4. batch rules: one coefficient row per sample, 2-D x rows are samples, a mismatch is refused naming both sizes;
5. dtypes on CPU: x in another dtype than the base weight, coefficients of any floating dtype, float64 end to end.

The two defects the audit found are fixed and pinned here: the fused backends refused layers of 0 input or output
features (an ambiguous reshape), and the plain unmerged layer cast the base weight to x's dtype outside autocast
(a per-call copy of W) where nn.Linear, peft, the layer's other paths and every merge raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lorweb_fast as lf
from lorweb_fast import ops, reference
from lorweb_fast.flux import merged_weight
from lorweb_fast.testing import (ROUNDINGS, accumulation_depths, assert_within_bound, assert_within_rss_bound,
                                 dtype_eps, random_problem, tolerance)

KEYS = ("x", "weight", "bias", "lora_a", "lora_b", "coeffs")
DELTA_KEYS = ("x", "lora_a", "lora_b", "coeffs")
CPU_BACKENDS = ["torch", None]
LOW = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------- helpers
def _tol(dtype: torch.dtype, depth: int) -> float:
    """``testing.tolerance``; in float64 (where nothing is accumulated in fp32) the same count in float64 eps."""
    if dtype == torch.float64:
        return (ROUNDINGS + depth) * dtype_eps(torch.float64)
    return tolerance(dtype, depth)


def _check_built(fn, problem: dict, build=lambda a: a, *, with_base: bool = True, grad_seed: int = 1):
    """Run ``fn(x, weight, bias, lora_a, lora_b, coeffs, scale)`` (``fn(x, lora_a, lora_b, coeffs, scale)`` when
    ``with_base`` is False) on ``build(leaves)`` and the float64 reference on ``build(float64 leaves)``; check the
    output and the gradient of every leaf with the worst-case and the statistical bounds of ``lorweb_fast.testing``.
    ``build`` lays the leaves out with differentiable views (a transpose, a step, an expand, an offset), so a leaf's
    gradient is what autograd sums through that layout. Returns the output."""
    dtype = problem["x"].dtype
    keys = KEYS if with_base else DELTA_KEYS
    names = [k for k in keys if problem.get(k) is not None]

    def run(impl, f, scale):
        leaves = {k: f(problem[k].detach()).requires_grad_(True) for k in names}
        args = build({**problem, **leaves})
        return impl(*(args[k] for k in keys), scale), leaves

    out, leaves = run(fn, torch.clone, problem["scale"])
    assert out.dtype == dtype, (out.dtype, dtype)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(dtype)
    out.backward(dy)
    ref_fn = reference.lorweb_linear if with_base else reference.mixed_lora_delta
    results = {}
    for kind, f, scale, g in (("ref", lambda t: t.double(), problem["scale"], dy.double()),
                              ("abs", lambda t: t.double().abs(), abs(problem["scale"]), dy.double().abs()),
                              ("sq", lambda t: t.double().square(), problem["scale"] ** 2, dy.double().square())):
        r_out, r_leaves = run(ref_fn, f, scale)
        r_out.backward(g)
        results[kind] = (r_out.detach(), {k: r_leaves[k].grad for k in names})
    depth = accumulation_depths(build(dict(problem)))
    checks = [("output", out.detach(), "output", lambda r: r[0])]
    checks += [(f"grad {k}", leaves[k].grad, k, lambda r, k=k: r[1][k]) for k in names]
    for label, got, key, pick in checks:
        ref, ref_abs, rss = pick(results["ref"]), pick(results["abs"]), pick(results["sq"]).sqrt()
        assert_within_bound(label, got, ref, ref_abs, dtype, depth[key])
        assert_within_rss_bound(label, got, ref, rss, dtype, depth[key])
    return out


def _fn(kind: str, backend):
    """The functional op ``kind`` with ``backend`` in ``_check_built``'s calling convention."""
    if kind == "lorweb_linear":
        return lambda *a: lf.lorweb_linear(*a, backend=backend)
    return lambda *a: lf.mixed_lora_delta(*a, backend=backend)


def _layer(in_features=4, out_features=5, *, num_loras=3, rank=2, key_dim=4, query_dim=6, dtype=torch.float32,
           seed=0, **kwargs) -> lf.LoRWeBLinear:
    """A LoRWeBLinear over a fresh nn.Linear in ``dtype``, with a non-zero lora_B (the mixture is there)."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features).to(dtype)
    layer = lf.LoRWeBLinear(base, num_loras=num_loras, rank=rank, key_dim=key_dim, query_dim=query_dim, dtype=dtype,
                            **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _layer_fn(layer: lf.LoRWeBLinear, to_input=lambda x: x):
    """``_check_built``'s convention through ``layer``: weight, bias, lora_a, lora_b put in by ``functional_call``,
    the coefficients by ``set_coefficients``; ``to_input`` turns the (B, S, in) leaf into the layer's input and the
    output is reshaped back to (B, S, out). The problem's scale must be the layer's."""
    def fn(x, weight, bias, lora_a, lora_b, coeffs, scale):
        assert scale == layer.scale
        layer.set_coefficients(coeffs)
        tensors = {"base_layer.weight": weight, "base_layer.bias": bias, "lora_A": lora_a, "lora_B": lora_b}
        y = functional_call(layer, tensors, (to_input(x),))
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return fn


def _empty_problem(shape, num_loras=3, rank=2, out_features=5, dtype=torch.float32) -> dict:
    """A problem whose x has ``shape`` (0 rows), with one coefficient row per sample of shape[0]."""
    g = torch.Generator().manual_seed(0)
    in_features = shape[-1]
    return dict(x=torch.empty(shape, dtype=dtype), weight=torch.randn(out_features, in_features, generator=g).to(dtype),
                bias=torch.randn(out_features, generator=g).to(dtype),
                lora_a=torch.randn(num_loras, in_features, rank, generator=g).to(dtype),
                lora_b=torch.randn(num_loras, rank, out_features, generator=g).to(dtype),
                coeffs=torch.rand(shape[0], num_loras, generator=g), scale=0.75)


def _assert_empty_output_and_zero_grads(kind: str, backend, problem: dict) -> None:
    """The op on an empty ``problem`` gives nn.Linear's empty output, and every input gets a zero gradient of its
    own shape (as nn.Linear's weight and bias do for an empty input)."""
    keys = KEYS if kind == "lorweb_linear" else DELTA_KEYS
    leaves = {k: problem[k].clone().requires_grad_(True) for k in keys}
    out_shape = (*problem["x"].shape[:-1], problem["lora_b"].shape[-1])
    add_to = None if kind == "lorweb_linear" else torch.randn(out_shape).to(problem["x"].dtype).requires_grad_(True)
    if kind == "lorweb_linear":
        y = lf.lorweb_linear(*(leaves[k] for k in keys), problem["scale"], backend=backend)
        want = F.linear(problem["x"], problem["weight"], problem["bias"])
        assert y.shape == want.shape and y.stride() == want.stride()
    else:
        y = lf.mixed_lora_delta(*(leaves[k] for k in keys), problem["scale"], add_to=add_to, backend=backend)
        leaves["add_to"] = add_to
    assert y.shape == out_shape and y.dtype == problem["x"].dtype
    y.sum().backward()
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert not t.grad.any(), name


# ------------------------------------------------------------------------------------------------ 1. empty
EMPTY_SHAPES = [(0, 3, 4), (2, 0, 4), (0, 4), (0, 0, 4)]


def test_nn_linear_gives_an_empty_output_and_zero_weight_gradients_for_an_empty_input():
    """The semantics the next tests hold LoRWeB to: nn.Linear on (0, S, in) returns (0, S, out) and its weight and
    bias get zero gradients of their own shapes."""
    lin = nn.Linear(4, 5)
    x = torch.empty(0, 3, 4, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.shape == (0, 3, 5) and x.grad.shape == x.shape
    assert lin.weight.grad.shape == (5, 4) and not lin.weight.grad.any() and not lin.bias.grad.any()


@pytest.mark.parametrize("kind", ["lorweb_linear", "mixed_lora_delta"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_ops_on_empty_inputs_as_nn_linear(backend, shape, kind):
    """B = 0, zero tokens, 2-D M = 0 and both: an empty output of nn.Linear's shape and strides, and a zero gradient
    for every input (x, weight, bias, the basis, the coefficients, add_to)."""
    _assert_empty_output_and_zero_grads(kind, backend, _empty_problem(shape))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 6), (0, 6), (2, 0, 6), (0, 2, 3, 6)], ids=str)
def test_layer_on_empty_inputs_gives_zero_gradients_to_every_lorweb_parameter(backend, shape):
    """A layer computing its coefficients per forward (``set_query_per_forward``, as in FSDP training) on an empty
    input: nn.Linear's empty output, and zero gradients of their own shapes for lora_A, lora_B, lora_keys and
    att_lora_to_q (nn.Linear's weight gets zeros too); the frozen base weight gets none."""
    layer = _layer(6, 5, backend=backend)
    layer.set_query_per_forward(torch.randn(shape[0], 6))
    x = torch.empty(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == layer.base_layer(x).shape == (*shape[:-1], 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.base_layer.weight.grad is None
    for name, p in layer.lorweb_tensors().items():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_merging_an_empty_batch_is_refused_and_leaves_the_weight(strategy):
    """"full" / "offload" merge one analogy: coefficients for B = 0 hold none, and the merge is refused naming the
    one-analogy rule and the way out ("jit"); the base weight is untouched and the layer is not left merged."""
    layer = _layer()
    layer.set_coefficients(torch.rand(0, 3))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"one analogy \(batch size 1\), got coefficients for an empty batch "
                       r"\(0 samples\); strategy='jit'"):
        with lf.merged(layer, strategy=strategy):
            pass
    assert torch.equal(layer.base_layer.weight, before) and not layer._merged
    assert layer(torch.empty(0, 2, 4)).shape == (0, 2, 5)  # unmerged, the empty batch runs
    with pytest.raises(ValueError, match=r"got coefficients for an empty batch \(0 samples\)$"):
        merged_weight(layer)


@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 4), (0, 2, 2, 4)], ids=str)
def test_jit_merge_of_an_empty_batch_gives_an_empty_output_and_an_x_gradient(shape):
    """merged(strategy="jit") with B = 0: nn.Linear's empty output and an x gradient of x's shape (zeros)."""
    layer = _layer()
    layer.requires_grad_(False)  # frozen basis: no "no gradient inside merged()" warning
    layer.set_coefficients(torch.rand(0, 3))
    x = torch.empty(shape, requires_grad=True)
    with lf.merged(layer, strategy="jit"):
        y = layer(x)
        y.sum().backward()
    assert y.shape == (*shape[:-1], 5) and x.grad.shape == x.shape and not x.grad.any()


@pytest.mark.parametrize("per_forward", [False, True])
def test_set_query_refuses_an_empty_batch_naming_it_and_keeps_the_analogy(per_forward):
    """lf.set_query with a (0, query_dim) query (also with per_forward=True) raises naming ``B >= 1`` and the
    shape, and the coefficients in use stay as they were."""
    model = nn.Sequential(nn.Linear(4, 5))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=["0"]))
    with torch.no_grad():
        kept = lf.set_query(model, torch.randn(2, 6))["0"]
    with pytest.raises(ValueError, match=r"B >= 1, got shape \(0, 6\)"):
        lf.set_query(model, torch.zeros(0, 6), per_forward=per_forward)
    assert model[0].coefficients is kept


def test_compute_coefficients_of_an_empty_batch_match_the_reference():
    """compute_coefficients with B = 0 (one layer and a stack of two) gives (0, N) / (2, 0, N), as the reference."""
    q, w, k = torch.randn(0, 6), torch.randn(4, 6), torch.randn(3, 4)
    assert lf.compute_coefficients(q, w, k, heads=2).shape == reference.compute_coefficients(q, w, k, heads=2).shape
    assert lf.compute_coefficients(q, torch.stack([w, w]), torch.stack([k, k])).shape == (2, 0, 3)


# ---------------------------------------------------------------------------------------------- 2. tiny dims
TINY_DIMS = [(1, 1, 1, 1), (1, 5, 1, 1), (3, 1, 2, 1), (1, 1, 3, 2), (2, 3, 1, 4)]  # (in, out, N, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("seq", [3, None], ids=["3d", "2d"])
@pytest.mark.parametrize("dims", TINY_DIMS, ids=lambda d: "in{}-out{}-N{}-r{}".format(*d))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_dimensions_forward_and_every_gradient(backend, dims, seq, dtype):
    """in / out features, N and r down to 1, 2-D and 3-D x, in every dtype: lorweb_linear and mixed_lora_delta
    against the float64 reference (output and every gradient)."""
    in_f, out_f, n, r = dims
    p = random_problem(2, seq, in_f, out_f, n, r, dtype, seed=sum(dims))
    _check_built(_fn("lorweb_linear", backend), p)
    _check_built(_fn("mixed_lora_delta", backend), p, with_base=False)


TINY_LAYERS = [
    dict(in_features=1, out_features=1, num_loras=1, rank=1, key_dim=1, query_dim=1),
    dict(in_features=1, out_features=3, num_loras=2, rank=1, key_dim=2, query_dim=1, heads=2, activation="tanh",
         reduce="sum"),
    dict(in_features=2, out_features=1, num_loras=3, rank=1, key_dim=3, query_dim=1, heads=3),
    dict(in_features=3, out_features=2, num_loras=2, rank=2, key_dim=1, query_dim=1,
         query_projection_type="none"),
    dict(in_features=2, out_features=2, num_loras=3, rank=1, key_dim=4, query_dim=1, heads=4, reduce="sum"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", TINY_LAYERS, ids=lambda c: "-".join(f"{k[:3]}{v}" for k, v in c.items()))
def test_tiny_layer_end_to_end_against_the_float64_chain(config, dtype):
    """A tiny layer (key_dim / query_dim of 1, heads = key_dim, N and r of 1) computing its coefficients from the
    query in its forward: output and the gradients of x, lora_A, lora_B, lora_keys and att_lora_to_q match the
    float64 chain reference.compute_coefficients -> reference.lorweb_linear."""
    layer = _layer(**config, dtype=dtype, seed=3)
    query = torch.randn(2, config["query_dim"], dtype=dtype)
    layer.set_query_per_forward(query)
    x = torch.randn(2, 3, config["in_features"], dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    params = {"x": x, **layer.lorweb_tensors()}
    ref_leaves = {k: t.detach().double().requires_grad_(True) for k, t in params.items()}
    projection = ref_leaves.get("att_lora_to_q.weight", layer.att_lora_to_q.weight.double())
    coeffs = reference.compute_coefficients(query, projection, ref_leaves["lora_keys"], heads=layer.heads,
                                            activation=layer.activation, reduce=layer.reduce)
    base = layer.base_layer
    want = reference.lorweb_linear(ref_leaves["x"], base.weight, base.bias, ref_leaves["lora_A"],
                                   ref_leaves["lora_B"], coeffs, layer.scale)
    want.backward(dy.double())
    depth = config["query_dim"] + config["key_dim"] + config["num_loras"] * (config["rank"] + 1) + 6
    tol = _tol(dtype, depth)
    assert y.dtype == dtype
    torch.testing.assert_close(y.detach().double(), want.detach(), rtol=tol, atol=tol * want.abs().max().item())
    for name, leaf in ref_leaves.items():
        got, ref = params[name].grad, leaf.grad
        assert got is not None and got.shape == ref.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1.0),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # nn.Linear's own warning
@pytest.mark.parametrize("features", [(0, 5), (4, 0)], ids=["no inputs", "no outputs"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_width_layers_as_nn_linear(backend, features):
    """nn.Linear(0, out) returns its bias broadcast, nn.Linear(in, 0) an empty output: the layer returns exactly
    that (unmerged, with the bias gradient the row count and zero basis gradients; and inside each merge), and
    mixed_lora_delta adds nothing to an add_to."""
    in_f, out_f = features
    layer = _layer(in_f, out_f, backend=backend)
    layer.base_layer.requires_grad_(True)
    layer.set_coefficients(torch.rand(2, 3))
    x = torch.randn(2, 3, in_f, requires_grad=True)
    want = layer.base_layer(x).detach()
    y = layer(x)
    assert torch.equal(y, want)
    y.backward(torch.ones_like(y))
    assert torch.equal(layer.base_layer.bias.grad, torch.full((out_f,), 6.0)) and x.grad.shape == x.shape
    assert layer.lora_A.grad.shape == layer.lora_A.shape and not layer.lora_A.grad.any()
    assert layer.lora_B.grad.shape == layer.lora_B.shape and not layer.lora_B.grad.any()
    delta = lf.mixed_lora_delta(x.detach(), layer.lora_A, layer.lora_B, layer.coefficients, 1.0, add_to=want,
                                backend=backend)
    assert torch.equal(delta, want)
    layer.requires_grad_(False)
    layer.set_coefficients(torch.rand(1, 3))
    for strategy in ("full", "offload", "jit"):
        with torch.no_grad(), lf.merged(layer, strategy=strategy):
            assert torch.equal(layer(x[:1]), want[:1]), strategy


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
@pytest.mark.parametrize("config", TINY_LAYERS[:3], ids=["1x1", "heads2", "heads3"])
def test_tiny_layer_merged_equals_unmerged_and_restores_the_weight(config, strategy):
    """Every merge strategy on a tiny layer (out or in features of 1) gives the unmerged output within the fp32
    bound and restores the base weight bit for bit (strides included)."""
    layer = _layer(**config, seed=4)
    layer.requires_grad_(False)
    with torch.no_grad():
        layer.set_coefficients(layer.coefficients_from_query(torch.randn(1, config["query_dim"])))
    x = torch.randn(1, 3, config["in_features"])
    weight, stride = layer.base_layer.weight.detach().clone(), layer.base_layer.weight.stride()
    with torch.no_grad():
        want = layer(x)
        with lf.merged(layer, strategy=strategy):
            got = layer(x)
    tol = _tol(torch.float32, config["in_features"] + config["num_loras"] * config["rank"])
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert torch.equal(layer.base_layer.weight, weight) and layer.base_layer.weight.stride() == stride


# ------------------------------------------------------------------------------------------------ 3. layouts
def _x_step(t):  # every other token of a twice as long sequence (token stride 2 * in)
    return torch.stack([t, torch.zeros_like(t)], dim=-2).flatten(-3, -2)[..., ::2, :]


def _feature_step(t):  # every other feature (unit stride 2)
    return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]


def _offset(t, pad=3):  # the same values at storage offset ``pad``
    return torch.cat([t.new_zeros(pad), t.flatten()])[pad:].view(t.shape)


def _transposed(dims):
    def lay(t):
        return t.transpose(*dims).contiguous().transpose(*dims)
    return lay


def _only(key, lay):
    return lambda a: {**a, key: lay(a[key])}


def _leaf(key, index):
    """prep: the problem's ``key`` replaced by its part ``index`` (the leaf a build then expands)."""
    return lambda p: {**p, key: p[key][index].contiguous()}


#: name -> (prep: the problem's leaves, build: their layout), on a (B=2, S=3, in=5) -> 7, N=2, r=2 problem
LAYOUTS = {
    "x batch-major transposed": (None, _only("x", _transposed((0, 1)))),
    "x feature-major": (None, _only("x", lambda t: t.permute(2, 0, 1).contiguous().permute(1, 2, 0))),
    "x token step": (None, _only("x", _x_step)),
    "x feature step": (None, _only("x", _feature_step)),
    "x storage offset": (None, _only("x", _offset)),
    "x tokens expanded": (_leaf("x", (slice(None), slice(0, 1))), _only("x", lambda t: t.expand(2, 3, 5))),
    "x every row expanded": (_leaf("x", (0, 0)), _only("x", lambda t: t.expand(2, 3, 5))),
    "coeffs transposed": (None, _only("coeffs", _transposed((0, 1)))),
    "coeffs one row expanded": (_leaf("coeffs", slice(0, 1)), _only("coeffs", lambda t: t.expand(2, 2))),
    "coeffs storage offset": (None, _only("coeffs", _offset)),
    "basis in peft layout": (None, lambda a: {**a, "lora_a": _transposed((1, 2))(a["lora_a"]),
                                              "lora_b": _transposed((1, 2))(a["lora_b"])}),
    "lora_a in-major": (None, _only("lora_a", lambda t: t.permute(1, 0, 2).contiguous().permute(1, 0, 2))),
    "weight transposed": (None, _only("weight", _transposed((0, 1)))),
    "weight column slice with offset": (None, _only("weight", lambda t: torch.cat([t.new_zeros(7, 3), t], 1)[:, 3:])),
    "bias step": (None, _only("bias", _feature_step)),
}


def _layout_problem(name: str, dtype=torch.float32, seq=3) -> dict:
    prep = LAYOUTS[name][0]
    p = random_problem(2, seq, 5, 7, 2, 2, dtype, seed=11)
    return p if prep is None else prep(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_layouts_against_float64(backend, layout, dtype):
    """Non-contiguous, strided, stride-0 (expanded) and offset views of each input: lorweb_linear's output and every
    gradient (summed through the view) against the float64 reference; the output has nn.Linear's strides."""
    p = _layout_problem(layout, dtype)
    build = LAYOUTS[layout][1]
    y = _check_built(_fn("lorweb_linear", backend), p, build)
    args = build(dict(p))
    assert y.stride() == F.linear(args["x"], args["weight"], args["bias"]).stride()
    if not layout.startswith(("weight", "bias")):
        _check_built(_fn("mixed_lora_delta", backend), p, build, with_base=False)


@pytest.mark.parametrize("layout", ["transposed", "rows expanded", "column step"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_layouts_of_a_2d_input(backend, layout):
    """2-D x (M = B rows) transposed, with one row expanded over all rows (stride 0), or with a column step."""
    p = random_problem(4, None, 5, 7, 2, 2, torch.float32, seed=12)
    builds = {"transposed": _transposed((0, 1)), "rows expanded": lambda t: t.expand(4, 5),
              "column step": _feature_step}
    if layout == "rows expanded":
        p = _leaf("x", slice(0, 1))(p)
    _check_built(_fn("lorweb_linear", backend), p, _only("x", builds[layout]))


@pytest.mark.parametrize("kind", ["expanded", "transposed", "token step"])
def test_add_to_layouts(kind):
    """mixed_lora_delta's add_to as an expanded, transposed or strided view: add_to + delta exactly as the float64
    reference within the fp32 bound; add_to's gradient is the output gradient."""
    p = random_problem(2, 3, 5, 7, 2, 2, torch.float32, seed=13)
    raw = {"expanded": torch.randn(1, 1, 7).expand(2, 3, 7), "transposed": torch.randn(3, 2, 7).transpose(0, 1),
           "token step": torch.randn(2, 6, 7)[:, ::2]}[kind]
    add_to = raw.detach().requires_grad_(True) if kind != "expanded" else raw
    y = lf.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], add_to=add_to)
    want = raw.double() + reference.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    want_abs = raw.double().abs() + reference.mixed_lora_delta(p["x"].abs(), p["lora_a"].abs(), p["lora_b"].abs(),
                                                               p["coeffs"].abs(), p["scale"])
    assert_within_bound("add_to + delta", y.detach(), want, want_abs, torch.float32, 5 + 4 + 2)
    if add_to.requires_grad:
        dy = torch.randn_like(y)
        y.backward(dy)
        assert torch.equal(add_to.grad, dy)


def _to_4d(x):
    """(2, 12, in) -> (2, 3, 4, in) laid out (B, W, H, in) and transposed back: a non-contiguous (B, H, W, in)."""
    return x.view(2, 3, 4, x.shape[-1]).transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_on_a_non_contiguous_4d_input_against_float64(backend):
    """(B, H, W, in) as nn.Linear takes it, not contiguous: every token of sample b gets sample b's coefficients;
    output and the gradients of x, W, b, the basis and the coefficients against the float64 reference; the output
    has nn.Linear's shape and strides."""
    layer = _layer(5, 7, num_loras=2, rank=2, lora_alpha=1.5, backend=backend)  # scale 0.75, as random_problem's
    p = random_problem(2, 12, 5, 7, 2, 2, torch.float32, seed=14)
    _check_built(_layer_fn(layer, _to_4d), p)
    x4 = _to_4d(p["x"])
    assert not x4.is_contiguous()
    layer.set_coefficients(p["coeffs"])
    y, want = layer(x4), layer.base_layer(x4)
    assert y.shape == want.shape == (2, 3, 4, 7) and y.stride() == want.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_basis_gradients_do_not_depend_on_whether_x_requires_grad(backend):
    """x with or without requires_grad: the same output and the same basis and coefficient gradients (bit for
    bit); x gets a gradient only when it asks for one."""
    p = random_problem(2, 3, 5, 7, 2, 2, torch.float32, seed=15)
    results = []
    for x_grad in (True, False):
        leaves = {k: p[k].clone().requires_grad_(k != "x" or x_grad) for k in ("x", "lora_a", "lora_b", "coeffs")}
        y = lf.lorweb_linear(leaves["x"], p["weight"], p["bias"], leaves["lora_a"], leaves["lora_b"],
                             leaves["coeffs"], p["scale"], backend=backend)
        y.sum().backward()
        assert (leaves["x"].grad is not None) == x_grad
        results.append([y.detach()] + [leaves[k].grad for k in ("lora_a", "lora_b", "coeffs")])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _make_parameters_non_contiguous(layer: lf.LoRWeBLinear) -> None:
    """The ``.t().contiguous().t()`` trick on every parameter (as a transposed state dict loaded with assign=True
    leaves them): the same values, other strides."""
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_keys, layer.att_lora_to_q.weight, layer.base_layer.weight):
            p.data = p.data.transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_parameters_train_save_and_merge_as_contiguous_ones(tmp_path, backend):
    """Every parameter non-contiguous: set_query with autograd, forward and backward give a contiguous twin's output
    and gradients (within the fp32 bound), the gradients keep their parameter's shape; the checkpoint round trip is
    bit for bit, and every merge strategy equals the unmerged output and restores the weight with its strides."""
    model, twin = (nn.Sequential(nn.Linear(6, 5)) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=["0"]))
        lf.set_backend(m, backend)
    with torch.no_grad():
        model[0].lora_B.normal_()
    twin[0].load_state_dict(model[0].state_dict())
    _make_parameters_non_contiguous(model[0])
    assert not any(t.is_contiguous() for t in model[0].lorweb_tensors().values())
    query, x = torch.randn(2, 6), torch.randn(2, 3, 6)
    outs = []
    for m in (model, twin):
        lf.set_query(m, query)
        y = m(x)
        y.sum().backward()
        outs.append((y.detach(), {k: t.grad for k, t in m[0].lorweb_tensors().items()}))
    tol = _tol(torch.float32, 6 + 6 + 6)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=tol, atol=tol)
    for k, g in outs[0][1].items():
        assert g.shape == outs[1][1][k].shape, k
        torch.testing.assert_close(g, outs[1][1][k], rtol=tol, atol=tol, msg=lambda m, k=k: f"grad {k}: {m}")
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(model, path)
    fresh = nn.Sequential(nn.Linear(6, 5))
    lf.load_lorweb_weights(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(lf.lorweb_state_dict(model).values(),
                                                   lf.lorweb_state_dict(fresh).values()))
    model.requires_grad_(False)
    weight = model[0].base_layer.weight
    before, stride = weight.detach().clone(), weight.stride()
    with torch.no_grad():
        lf.set_query(model, query[:1])
        want = model(x[:1])
        for strategy in ("full", "offload", "jit"):
            with lf.merged(model, strategy=strategy):
                torch.testing.assert_close(model(x[:1]), want, rtol=tol, atol=tol * want.abs().max().item())
            assert torch.equal(model[0].base_layer.weight, before) and model[0].base_layer.weight.stride() == stride


def test_a_transposed_state_dict_loaded_with_assign_gives_the_same_layer():
    """load_state_dict(assign=True) of a state dict whose tensors are transposed views (non-contiguous parameters
    afterwards): the output of the layer it came from (within the fp32 bound)."""
    layer = _layer(6, 5)
    layer.set_coefficients(torch.rand(2, 3))
    state = {k: v.detach().clone().transpose(0, -1).contiguous().transpose(0, -1)
             for k, v in layer.state_dict().items()}
    other = lf.LoRWeBLinear(nn.Linear(6, 5), num_loras=3, rank=2, key_dim=4, query_dim=6)
    other.load_state_dict(state, assign=True)
    assert not other.lora_A.is_contiguous()
    other.set_coefficients(layer.coefficients)
    x = torch.randn(2, 3, 6)
    want = layer(x).detach()
    tol = _tol(torch.float32, 6 + 6)
    torch.testing.assert_close(other(x).detach(), want, rtol=tol, atol=tol * want.abs().max().item())


# -------------------------------------------------------------------------------------------- 4. batch rules
@pytest.mark.parametrize("kind", ["lorweb_linear", "mixed_lora_delta"])
@pytest.mark.parametrize("coeff_rows", [1, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_batch_mismatch_names_both_shapes(backend, coeff_rows, kind):
    """Coefficients of 1 row (one analogy for all) or of another batch than x's: refused, naming x's shape, the
    expected (B, N) and the shape given (no silent broadcast)."""
    p = random_problem(3, 2, 4, 5, 3, 2, torch.float32, seed=16)
    coeffs = p["coeffs"][:coeff_rows]
    base = (p["weight"], p["bias"]) if kind == "lorweb_linear" else ()
    args = (p["x"], *base, p["lora_a"], p["lora_b"], coeffs, 1.0)
    with pytest.raises(ValueError, match=rf"\(3, 3\) for x \(3, 2, 4\).*got shape \({coeff_rows}, 3\)"):
        getattr(lf, kind)(*args, backend=backend)


@pytest.mark.parametrize("merge", [None, "jit"])
@pytest.mark.parametrize("x_shape", [(3, 2, 4), (3, 4), (3, 2, 2, 4)], ids=str)
def test_layer_batch_mismatch_names_both_batch_sizes(x_shape, merge):
    """A layer holding one coefficient row, called with a batch of 3 (2-D, 3-D, 4-D x), unmerged or merged "jit":
    refused, naming both batch sizes and set_query."""
    layer = _layer()
    layer.requires_grad_(False)
    layer.set_coefficients(torch.rand(1, 3))
    x = torch.randn(x_shape)
    match = "coefficients are set for batch size 1 but the input has batch size 3; call set_query"
    with pytest.raises(ValueError, match=match):
        if merge is None:
            layer(x)
        else:
            with lf.merged(layer, strategy=merge):
                layer(x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_2d_input_rows_are_samples(backend):
    """x (B, in) with coefficients (B, N): row b is sample b (as its own (1, in) call, and as a (B, 1, in) input):
    the output against the float64 reference row by row."""
    p = random_problem(4, None, 5, 7, 3, 2, torch.float32, seed=17)
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"],
                         backend=backend)
    three_d = lf.lorweb_linear(p["x"][:, None], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"],
                               p["scale"], backend=backend)
    tol = _tol(torch.float32, 5 + 6)
    for b in range(4):
        want = reference.lorweb_linear(p["x"][b:b + 1], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                                       p["coeffs"][b:b + 1], p["scale"])
        torch.testing.assert_close(y[b:b + 1].double(), want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(three_d[:, 0], y, rtol=tol, atol=tol)


def test_expanded_coefficient_rows_are_one_analogy():
    """Coefficients (1, N) expanded to (B, N) (stride 0): the layer takes them as B identical rows (the output of
    the contiguous copy, bit for bit), holds one analogy, and merges them with "full" to the unmerged output."""
    layer = _layer()
    layer.requires_grad_(False)
    row = torch.rand(1, 3)
    x = torch.randn(3, 2, 4)
    layer.set_coefficients(row.repeat(3, 1))
    want = layer(x)
    layer.set_coefficients(row.expand(3, 3))
    assert layer.coefficients.stride() == (0, 1) and layer.holds_one_analogy()
    assert torch.equal(layer(x), want)
    tol = _tol(torch.float32, 4 + 6)
    with torch.no_grad(), lf.merged(layer, strategy="full"):
        torch.testing.assert_close(layer(x), want, rtol=tol, atol=tol * want.abs().max().item())


# -------------------------------------------------------------------------------------------------- 5. dtypes
MIXED = [(torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float64),
         (torch.bfloat16, torch.float32)]
MIXED_IDS = [f"base {str(b)[6:]} x {str(x)[6:]}" for b, x in MIXED]


@pytest.mark.parametrize("argument", ["lora_a", "weight"])
@pytest.mark.parametrize("dtypes", MIXED, ids=MIXED_IDS)
def test_functional_ops_refuse_mixed_dtypes_naming_the_argument(dtypes, argument):
    """x in another dtype than the basis or the weight (no autocast): TypeError naming the argument and both dtypes,
    where nn.Linear raises too."""
    base_dtype, x_dtype = dtypes
    p = random_problem(2, 3, 4, 5, 2, 2, x_dtype, seed=18)
    p[argument] = p[argument].to(base_dtype)
    with pytest.raises(RuntimeError, match="dtype"):
        F.linear(p["x"], p["weight"].to(base_dtype))
    with pytest.raises(TypeError, match=f"{argument} has dtype {base_dtype} but x has dtype {x_dtype}"):
        lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], 1.0)


def _mixed_layer(base_dtype, path):
    layer = _layer(dtype=base_dtype)
    layer.requires_grad_(False)
    layer.set_coefficients(torch.rand(1, 3).repeat(2, 1))  # one analogy: every merge strategy takes it
    if path == "hooked base":
        layer.base_layer.register_forward_hook(lambda module, args, out: None)  # a no-op hook: base is called
    elif path == "adapter_precision fp32":
        layer.adapter_precision = "fp32"
    return layer


@pytest.mark.parametrize("path", ["hooked base", "adapter_precision fp32", "merged full", "merged jit"])
@pytest.mark.parametrize("dtypes", MIXED, ids=MIXED_IDS)
def test_layer_paths_that_call_the_base_refuse_an_input_in_another_dtype(dtypes, path):
    """A base weight in one dtype, x in another, no autocast: the layer with a (no-op) hooked base, with
    adapter_precision="fp32", and inside merged() raise nn.Linear's own dtype error, as nn.Linear and peft do."""
    base_dtype, x_dtype = dtypes
    layer = _mixed_layer(base_dtype, path)
    x = torch.randn(2, 3, 4, dtype=x_dtype)
    with pytest.raises(RuntimeError, match="dtype"):
        layer.base_layer(x)
    with pytest.raises(RuntimeError, match="dtype"):
        if path.startswith("merged"):
            with lf.merged(layer, strategy=path.split()[1]):
                layer(x)
        else:
            layer(x)


@pytest.mark.parametrize("dtypes", MIXED, ids=MIXED_IDS)
def test_plain_unmerged_layer_refuses_an_input_in_another_dtype_as_nn_linear(dtypes):
    """The plain (fused-kernel) path must agree with nn.Linear and with the layer's other paths: x in another
    dtype than the base weight, without autocast, is refused."""
    base_dtype, x_dtype = dtypes
    layer = _mixed_layer(base_dtype, "plain")
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        layer(torch.randn(2, 3, 4, dtype=x_dtype))


@pytest.mark.parametrize("coeff_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coefficients_of_any_floating_dtype(backend, coeff_dtype):
    """Coefficients in fp16 / bf16 / float64 with fp32 x: the output stays fp32, matches the float64 reference on
    those coefficient values, and the coefficients' gradient comes back in their own dtype."""
    p = random_problem(2, 3, 5, 7, 2, 2, torch.float32, seed=19)
    p["coeffs"] = p["coeffs"].to(coeff_dtype)
    coeffs = p["coeffs"].clone().requires_grad_(True)
    y = lf.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], coeffs, p["scale"],
                         backend=backend)
    assert y.dtype == torch.float32
    want = reference.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"])
    want_abs = reference.lorweb_linear(p["x"].abs(), p["weight"].abs(), p["bias"].abs(), p["lora_a"].abs(),
                                       p["lora_b"].abs(), p["coeffs"].abs(), p["scale"])
    assert_within_bound("output", y.detach(), want, want_abs, torch.float32, 5 + 4)
    y.sum().backward()
    assert coeffs.grad.dtype == coeff_dtype and coeffs.grad.shape == coeffs.shape


def test_float64_layer_end_to_end_with_empty_and_non_contiguous_inputs():
    """A float64 layer (backend None on CPU picks torch): a non-contiguous 4-D input and an empty batch run in
    float64 end to end (output and x gradient float64), the output within float64 rounding of the reference."""
    layer = _layer(5, 7, dtype=torch.float64)
    layer.set_coefficients(torch.rand(2, 3, dtype=torch.float64))
    x = _to_4d(torch.randn(2, 12, 5, dtype=torch.float64)).requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == layer.lora_A.grad.dtype == torch.float64
    want = reference.lorweb_linear(x.detach().reshape(2, 12, 5), layer.base_layer.weight, layer.base_layer.bias,
                                   layer.lora_A, layer.lora_B, layer.coefficients, layer.scale)
    tol = _tol(torch.float64, 5 + 6)
    torch.testing.assert_close(y.detach().reshape(2, 12, 7), want, rtol=tol, atol=tol * want.abs().max().item())
    layer.set_coefficients(torch.rand(0, 3, dtype=torch.float64))
    assert layer(torch.empty(0, 2, 5, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------------- triton under the CPU interpreter
def _interpreter_empty(shape, kind):
    return lambda: _assert_empty_output_and_zero_grads(kind, "triton", _empty_problem(shape))


def _interpreter_tiny(dims, seq, dtype=torch.float32):
    def case():
        p = random_problem(2, seq, *dims, dtype, seed=sum(dims))
        _check_built(_fn("lorweb_linear", "triton"), p)
        _check_built(_fn("mixed_lora_delta", "triton"), p, with_base=False)
    return case


def _interpreter_layout(name, dtype=torch.float32):
    def case():
        p = _layout_problem(name, dtype)
        build = LAYOUTS[name][1]
        y = _check_built(_fn("lorweb_linear", "triton"), p, build)
        assert y.is_contiguous()
        if not name.startswith(("weight", "bias")):
            _check_built(_fn("mixed_lora_delta", "triton"), p, build, with_base=False)
    return case


def _interpreter_layer_4d():
    layer = _layer(5, 7, num_loras=2, rank=2, lora_alpha=1.5, backend="triton")
    with torch.no_grad():
        layer.lora_A.data = layer.lora_A.data.transpose(1, 2).contiguous().transpose(1, 2)
    _check_built(_layer_fn(layer, _to_4d), random_problem(2, 12, 5, 7, 2, 2, torch.float32, seed=14))


def _interpreter_zero_features(in_features, out_features, kind):
    """nn.Linear's result for a layer with no input (or no output) features: y = bias broadcast (or an empty
    output), the bias gradient the row count, every other gradient zero of its own shape."""
    def case():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, in_features, generator=g).requires_grad_(True)
        w = torch.randn(out_features, in_features, generator=g).requires_grad_(True)
        b = torch.randn(out_features, generator=g).requires_grad_(True)
        a = torch.randn(2, in_features, 2, generator=g).requires_grad_(True)
        bb = torch.randn(2, 2, out_features, generator=g).requires_grad_(True)
        c = torch.rand(2, 2, generator=g).requires_grad_(True)
        want = F.linear(x, w, b)
        if kind == "lorweb_linear":
            y = lf.lorweb_linear(x, w, b, a, bb, c, 0.5, backend="triton")
        else:
            y = lf.mixed_lora_delta(x, a, bb, c, 0.5, add_to=want.detach(), backend="triton")
        assert y.shape == want.shape and torch.equal(y, want.detach())
        y.backward(torch.ones_like(y))
        for t in ((x, w, b, a, bb, c) if kind == "lorweb_linear" else (x, a, bb, c)):
            assert t.grad is not None and t.grad.shape == t.shape
        assert not any(t.grad.any() for t in (a, bb, c))
        if kind == "lorweb_linear":
            assert torch.equal(b.grad, torch.full_like(b, 6.0))
    return case


INTERPRETER_CASES = {
    **{f"empty {kind} {shape}": _interpreter_empty(shape, kind) for shape in EMPTY_SHAPES
       for kind in ("lorweb_linear", "mixed_lora_delta")},
    **{"tiny in{}-out{}-N{}-r{} {}".format(*dims, "3d" if seq else "2d"): _interpreter_tiny(dims, seq)
       for dims in TINY_DIMS for seq in (3, None)},
    "tiny in1-out1-N3-r2 3d bfloat16": _interpreter_tiny((1, 1, 3, 2), 3, torch.bfloat16),
    **{f"layout {name}": _interpreter_layout(name) for name in LAYOUTS},
    "layout x every row expanded bfloat16": _interpreter_layout("x every row expanded", torch.bfloat16),
    "layer 4-d non-contiguous input, peft-layout lora_A": _interpreter_layer_4d,
    "no output features lorweb_linear": _interpreter_zero_features(4, 0, "lorweb_linear"),
    "no input features lorweb_linear": _interpreter_zero_features(0, 5, "lorweb_linear"),
    "no input features mixed_lora_delta": _interpreter_zero_features(0, 5, "mixed_lora_delta"),
    "no output features mixed_lora_delta with add_to": _interpreter_zero_features(4, 0, "mixed_lora_delta"),
}

#: the interpreter cases that fail (none: zero-width layers, once refused by an ambiguous reshape in
#: ops._fused_linear, give nn.Linear's result)
INTERPRETER_XFAIL: dict = {}


def run_interpreter_cases() -> dict:
    """Every INTERPRETER_CASES entry: "ok", or the error it raised (run under TRITON_INTERPRET=1)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, case in INTERPRETER_CASES.items():
        try:
            case()
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported to the parent test by name
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
    return results


_RUNNER = ("import importlib.util, json, sys\n"
           "spec = importlib.util.spec_from_file_location('degenerate_shapes_audit', sys.argv[1])\n"
           "module = importlib.util.module_from_spec(spec)\n"
           "spec.loader.exec_module(module)\n"
           "print('RESULTS ' + json.dumps(module.run_interpreter_cases()))\n")


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    """INTERPRETER_CASES run once in a subprocess with TRITON_INTERPRET=1 set before triton is imported."""
    triton = pytest.importorskip("triton")
    if ops._TRITON_KERNELS is None:
        pytest.skip("the Triton kernels do not import here")
    if ops._version_tuple(triton.__version__) < ops.MIN_INTERPRETER_TRITON:
        pytest.skip(f"the CPU interpreter of triton {triton.__version__} cannot run the kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, __file__], cwd=tmp_path_factory.mktemp("interp"), env=env,
                          capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, tail
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=INTERPRETER_XFAIL[name]))
    if name in INTERPRETER_XFAIL else name for name in INTERPRETER_CASES])
def test_triton_under_the_interpreter(interpreter_results, case):
    """The triton backend (Triton's CPU interpreter) on the same degenerate shapes and layouts: empty inputs give
    nn.Linear's empty output and zero gradients, tiny dims and every layout match the float64 reference (output
    and every gradient, contiguous output), a layer on a non-contiguous 4-D input with a peft-layout basis too, and
    zero-width layers give nn.Linear's result."""
    assert interpreter_results[case] == "ok", interpreter_results[case]
