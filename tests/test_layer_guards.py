"""Guards for lorweb_fast/layer.py found by a mutation audit (CPU only, no GPU, no interpreter).

``LoRWeBLinear``'s construction refusals, which bases are read directly and which are called (subclasses with their
own forward, integer weights, hooks of unknown registries, tensor-parallel weights), the dtype plumbing of the
unfused forward (an fp32 basis on a bf16 base, a base that returns another dtype), the official "fp32" adapter
precision on a basis stored in bf16 (coefficients, mixture and strength in fp32), the merged weights (float64
accumulation, the per-sample "jit" path in bf16, identical rows as one weight), the "jit" forward's own errors,
the identity projection of ``query_projection_type="none"`` in state dicts, and the coefficients dropped or kept by
``load_state_dict``. Expected values come from lorweb_fast.reference (float64); tolerances from the dtype's eps.
"""

import types
import warnings

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import flux, lora_api, reference
from lorweb_fast.layer import has_forward_hooks, has_plain_weight
from lorweb_fast.testing import ROUNDINGS, assert_within_bound, check_forward, tolerance

KW = dict(num_loras=3, rank=2, key_dim=4, query_dim=6)


def _layer(base=None, seed=0, **kw):
    """A LoRWeBLinear on ``base`` (default nn.Linear(8, 6)) with a random non-zero basis."""
    torch.manual_seed(seed)
    layer = lf.LoRWeBLinear(nn.Linear(8, 6) if base is None else base, **{**KW, **kw})
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _coeffs(batch, n=KW["num_loras"], seed=1):
    return torch.rand(batch, n, generator=torch.Generator().manual_seed(seed))


def _bound(got, want, want_abs, dtype, depth):
    assert_within_bound("output", got.detach(), want.detach(), want_abs.detach(), dtype, depth)


# ------------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("case,exc,fragment", [
    ("wrapped", TypeError, "already a LoRWeBLinear"),
    ("heads", ValueError, "key_dim=4 is not divisible by heads=3"),
    ("none_width", ValueError, "key_dim must equal query_dim"),
    ("backend", ValueError, "unknown backend 'cublas'"),
])
def test_constructor_refuses_bad_settings_before_touching_the_base(case, exc, fragment):
    """Each refused setting raises by name, and the base layer is left as it was (still trainable)."""
    base = nn.Linear(8, 6)
    kw = {"heads": dict(heads=3), "none_width": dict(query_projection_type="none"),
          "backend": dict(backend="cublas")}.get(case, {})
    target = lf.LoRWeBLinear(base, **KW) if case == "wrapped" else base
    if case == "wrapped":
        target.base_layer.requires_grad_(True)
    with pytest.raises(exc, match=fragment):
        lf.LoRWeBLinear(target, **{**KW, **kw})
    assert all(p.requires_grad for p in base.parameters())


def test_parameters_are_created_on_the_base_weights_device():
    """The basis is created where the base weight lives, not on the default device (here meta, as inside a
    ``with torch.device("meta")`` block); a meta base weight gives the default device instead."""
    base = nn.Linear(8, 6)
    with torch.device("meta"):
        layer = lf.LoRWeBLinear(base, **KW)
    assert {t.device.type for t in layer.lorweb_tensors().values()} == {"cpu"}
    meta = lf.LoRWeBLinear(nn.Linear(8, 6, device="meta"), **KW)
    assert {t.device.type for t in meta.lorweb_tensors().values()} == {"cpu"}


# -------------------------------------------------------------------------------------- bases read or called
class _DoublingLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (as quantized or patched layers have): it must be called."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_with_its_own_forward_is_called_not_read():
    """The output is the subclass's own output plus the mixture (reading its weight would drop the doubling), and
    the merged weight, which would bypass that forward, is refused by name."""
    torch.manual_seed(0)
    base = _DoublingLinear(8, 6)
    assert not has_plain_weight(base)
    layer = _layer(base)
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        got = layer(x)
        want = 2 * (x.double() @ base.weight.double().T + base.bias.double()) + reference.mixed_lora_delta(
            x, layer.lora_A, layer.lora_B, coeffs, layer.scale)
        want_abs = 2 * (x.abs().double() @ base.weight.abs().double().T + base.bias.abs().double()) + \
            reference.mixed_lora_delta(x.abs(), layer.lora_A.abs(), layer.lora_B.abs(), coeffs, layer.scale)
    _bound(got, want, want_abs, torch.float32, 8 + KW["num_loras"] * KW["rank"])
    with pytest.raises(TypeError, match="cannot merge into a _DoublingLinear: no plain tensor weight"):
        layer.merged_weight_for(coeffs[0])


def test_an_integer_weight_is_not_a_plain_weight():
    """An nn.Linear holding an integer (quantized) weight is not read as a plain weight: the basis is created in
    fp32 (not in the weight's integer dtype) and merging into it is refused."""
    base = nn.Linear(8, 6)
    base.weight = nn.Parameter(torch.randint(-8, 8, (6, 8), dtype=torch.int8), requires_grad=False)
    assert not has_plain_weight(base)
    layer = _layer(base)
    assert {t.dtype for t in layer.lorweb_tensors().values()} == {torch.float32}
    with pytest.raises(TypeError, match="no plain tensor weight"):
        layer.merged_weight_for(_coeffs(1)[0])


@pytest.mark.parametrize("registry,hooked", [
    (types.SimpleNamespace(hooks={}), False),
    (types.SimpleNamespace(hooks={"layerwise_casting": object()}), True),
    (types.SimpleNamespace(_hooks={}), False),
    (types.SimpleNamespace(_hooks={"group_offloading": object()}), True),
    (types.SimpleNamespace(), True),  # a registry of unknown layout counts as hooked (the safe side)
], ids=["hooks-empty", "hooks", "_hooks-empty", "_hooks", "unknown"])
def test_diffusers_hook_registries_count_as_hooks_when_they_hold_any(registry, hooked):
    """has_forward_hooks reads diffusers' registry (``hooks`` or older ``_hooks``): an empty one is no hook, a
    registry it cannot read is treated as hooked, so the base layer is called rather than read."""
    base = nn.Linear(8, 6)
    base._diffusers_hook = registry
    assert has_forward_hooks(base) is hooked


class _PlacedLinear(nn.Module):
    """A linear-like layer whose ``weight`` reports DTensor placements (tensor parallelism) and computes with an
    inner nn.Linear."""

    def __init__(self, shard):
        super().__init__()
        self.inner = nn.Linear(8, 6)
        self.in_features, self.out_features = 8, 6
        self.weight = types.SimpleNamespace(placements=(types.SimpleNamespace(is_shard=lambda: shard),))

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("shard", [True, False], ids=["sharded", "replicated"])
def test_a_tensor_parallel_sharded_base_weight_is_refused(shard):
    """A base weight sharded by tensor parallelism (a Shard placement) is refused by name at the forward (the basis
    is not sharded); a replicated one runs as any called base: its output plus the mixture."""
    base = _PlacedLinear(shard)
    layer = _layer(base)
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8)
    if shard:
        with pytest.raises(NotImplementedError, match="tensor-parallel sharded weight.*context parallelism"):
            layer(x)
        return
    with torch.no_grad():
        got = layer(x)
        want = base(x).double() + reference.mixed_lora_delta(x, layer.lora_A, layer.lora_B, coeffs, layer.scale)
        want_abs = base(x).abs().double() + reference.mixed_lora_delta(x.abs(), layer.lora_A.abs(),
                                                                       layer.lora_B.abs(), coeffs, layer.scale)
    _bound(got, want, want_abs, torch.float32, KW["num_loras"] * KW["rank"] + 8)


# ------------------------------------------------------------------------------------------ unfused dtypes
def test_an_fp32_basis_on_a_bf16_base_runs_in_the_inputs_dtype():
    """A basis created in fp32 (the trainer's ``dtype=torch.float32``) on a bf16 base, with a bf16 input and no
    autocast: the mixture runs in bf16 with the basis rounded to bf16, the output is bf16 (mixed dtypes were not
    handed to the fused op)."""
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = _layer(base, dtype=torch.float32)
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    check_forward("fp32 basis, bf16 base", y, dict(x=x, weight=base.weight, bias=base.bias,
                                                    lora_a=layer.lora_A.detach().to(torch.bfloat16),
                                                    lora_b=layer.lora_B.detach().to(torch.bfloat16),
                                                    coeffs=coeffs, scale=layer.scale))


def test_a_base_returning_another_dtype_keeps_its_output_dtype():
    """A called base (here a forward hook) that returns fp32 for a bf16 input: the bf16 mixture is added to its fp32
    output, which keeps its dtype and precision (peft's LoRA layers return the base layer's dtype too: a drop-in
    wrapper does not change what the layer returns); gradients reach x and the basis."""
    base = nn.Linear(8, 6).to(torch.bfloat16)
    base.register_forward_hook(lambda module, args, out: out.float())
    layer = _layer(base)
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8).to(torch.bfloat16).requires_grad_()
    got = layer(x)
    with torch.no_grad():
        base_out = base(x).double()
        delta = reference.mixed_lora_delta(x, layer.lora_A, layer.lora_B, coeffs, layer.scale)
        delta_abs = reference.mixed_lora_delta(x.abs(), layer.lora_A.abs(), layer.lora_B.abs(), coeffs, layer.scale)
    assert got.dtype == torch.float32
    _bound(got - base_out.float(), delta, delta_abs, torch.bfloat16, KW["num_loras"] * KW["rank"] + 8)
    got.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_a_quantized_bf16_base_called_with_fp32_keeps_the_bases_output_dtype():
    """optimum-quanto qfloat8 over a bf16 linear returns bf16 for an fp32 x; the wrapper returns bf16 too (it
    returned fp32, unlike the layer it wraps), the mixture added to the base output."""
    quanto = pytest.importorskip("optimum.quanto")
    model = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    quanto.quantize(model, weights=quanto.qfloat8)
    quanto.freeze(model)
    base = model[0]
    layer = _layer(base)
    coeffs = _coeffs(1)
    layer.set_coefficients(coeffs)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        want_dtype = base(x).dtype
        got = layer(x)
        delta = reference.mixed_lora_delta(x, layer.lora_A, layer.lora_B, coeffs, layer.scale)
    assert want_dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert torch.allclose(got.double() - base(x).double(), delta, atol=0.05, rtol=0.05)


def test_a_called_base_under_autocast_runs_in_the_autocast_dtype():
    """Under CPU bf16 autocast a called base (here one with a forward hook) returns bf16 for an fp32 input, as
    nn.Linear does; the mixture is computed in bf16 too (x and the basis rounded to bf16, what autocast computes
    with) and the output is bf16, not fp32."""
    base = nn.Linear(8, 6)
    base.register_forward_hook(lambda module, args, out: out)
    layer = _layer(base)
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    rounded = {k: t.detach().to(torch.bfloat16) for k, t in (("x", x), ("weight", base.weight), ("bias", base.bias),
                                                             ("lora_a", layer.lora_A), ("lora_b", layer.lora_B))}
    check_forward("autocast bf16, called base", y, {**rounded, "coeffs": coeffs, "scale": layer.scale})


@pytest.mark.parametrize("hooked", [False, True], ids=["read", "called"])
def test_the_strength_scales_the_unfused_mixture(hooked):
    """set_lorweb_scale(s) multiplies the coefficients of the unfused forward (fused kernels reading W, and a called
    base): the float64 reference with s * coefficients."""
    base = nn.Linear(8, 6)
    if hooked:
        base.register_forward_hook(lambda module, args, out: out)
    layer = _layer(base)
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    lora_api.set_lorweb_scale(nn.Sequential(layer), -0.5)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        y = layer(x)
    check_forward("strength -0.5", y, dict(x=x, weight=base.weight, bias=base.bias, lora_a=layer.lora_A.detach(),
                                           lora_b=layer.lora_B.detach(), coeffs=-0.5 * coeffs, scale=layer.scale))


# ----------------------------------------------------------------------------------- adapter_precision="fp32"
@pytest.mark.parametrize("per_forward", [False, True], ids=["set_query", "per_forward"])
def test_fp32_adapter_precision_computes_a_bf16_basis_in_fp32(per_forward):
    """adapter_precision="fp32" on a basis stored in bf16 over an fp32 base: the query (per-forward: cast to fp32,
    not to the basis' dtype), the projection and keys are cast to fp32 for the coefficients, the mixture runs in
    fp32 with the basis cast to fp32, and the set_lorweb_scale strength multiplies it. Checked against the float64
    reference at fp32 precision (a bf16 step anywhere is ~2**-8 off)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = _layer(base, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_keys.normal_(0, 2.0)
    model = nn.Sequential(layer)
    layer.adapter_precision = "fp32"
    lora_api.set_lorweb_scale(model, 0.5)
    query = torch.randn(2, KW["query_dim"])
    if per_forward:
        layer.set_query_per_forward(query)
    else:
        layer.set_coefficients(layer.coefficients_from_query(query, fp32=True))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        got = layer(x)
        c = 0.5 * reference.compute_coefficients(query, layer.att_lora_to_q.weight, layer.lora_keys)
        want = reference.lorweb_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B, c, layer.scale)
        want_abs = reference.lorweb_linear(x.abs(), base.weight.abs(), base.bias.abs(), layer.lora_A.abs(),
                                           layer.lora_B.abs(), c, layer.scale)
    assert got.dtype == torch.float32
    # the coefficients' own fp32 roundings (a length-query_dim product, a softmax) come on top of the output's
    depth = 8 + KW["num_loras"] * KW["rank"] + KW["query_dim"] + KW["key_dim"]
    _bound(got, want, want_abs, torch.float32, depth)


def test_coefficients_from_query_fp32_on_a_bf16_layer():
    """``coefficients_from_query(fp32=True)`` on a bf16 layer computes from the fp32 query with the projection and
    keys cast to fp32: fp32-accurate against the float64 reference (in bf16 they are ~2**-8 off)."""
    layer = _layer(nn.Linear(8, 6).to(torch.bfloat16))
    with torch.no_grad():
        layer.lora_keys.normal_(0, 2.0)
    query = torch.randn(3, KW["query_dim"], generator=torch.Generator().manual_seed(2))
    got = layer.coefficients_from_query(query, fp32=True)
    want = reference.compute_coefficients(query, layer.att_lora_to_q.weight, layer.lora_keys)
    assert got.dtype == torch.float32
    tol = tolerance(torch.float32, KW["query_dim"] + KW["key_dim"] + KW["num_loras"])
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- merged weights
@pytest.fixture(params=[(1, None), (5, None), (1, 4), (None, None)],
                ids=["row_by_row", "blocks_of_5_rows", "at_most_4_blocks", "default_blocks"])
def merge_block_rows(request, monkeypatch):
    """merged_weight_for builds its result in blocks of rows of MERGE_BLOCK_BYTES of work each, MERGE_MAX_BLOCKS
    blocks at most: returns ``set_block(in_features, itemsize)``, which sizes the blocks to this many rows for one
    analogy (half as many for a batch of two; 5 divides neither 6 nor 24 rows), or to a quarter of the rows (2 of 6,
    6 of 24), or leaves the defaults (one block at these sizes)."""
    rows, max_blocks = request.param

    def set_block(in_features, itemsize):
        if rows is not None:
            monkeypatch.setattr(lf.layer, "MERGE_BLOCK_BYTES", rows * in_features * itemsize)
            monkeypatch.setattr(lf.layer, "MERGE_MAX_BLOCKS", max_blocks or 10 ** 9)
    return set_block


def test_float64_merged_weight_accumulates_in_float64(merge_block_rows):
    """A float64 layer's merged weight W + scale * strength * sum_n c_n (A_n B_n)^T is accumulated in float64,
    for one analogy (out, in) and per sample (B, out, in), whatever the blocks of rows it is built in."""
    layer = _layer().double()
    merge_block_rows(layer.in_features, 8)
    lora_api.set_lorweb_scale(nn.Sequential(layer), 0.5)
    coeffs = _coeffs(2).double()
    w = layer.base_layer.weight.detach()
    delta = torch.einsum("nir,bn,nro->boi", layer.lora_A.detach(), coeffs, layer.lora_B.detach())
    want = w + 0.5 * layer.scale * delta
    want_abs = w.abs() + 0.5 * layer.scale * torch.einsum("nir,bn,nro->boi", layer.lora_A.detach().abs(), coeffs,
                                                           layer.lora_B.detach().abs())
    # float64 roundings only (testing.tolerance adds an fp32 accumulation term, too loose to tell fp32 apart)
    tol = (ROUNDINGS + KW["num_loras"] * KW["rank"]) * torch.finfo(torch.float64).eps
    for got, ref, ref_abs in ((layer.merged_weight_for(coeffs[0]), want[0], want_abs[0]),
                              (layer.merged_weight_for(coeffs), want, want_abs)):
        assert got.dtype == torch.float64
        assert ((got - ref).abs() <= tol * ref_abs).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merged_weight_is_rounded_once(dtype, merge_block_rows):
    """A bf16 / fp16 layer's merged weight is W + scale * sum_n c_n (A_n B_n)^T accumulated in fp32 and rounded once to
    W's dtype: it equals the float64 value rounded once (fp32 accumulation differs from it only within ~2^-24 of a
    rounding midpoint, probability ~2^-13 per entry), where accumulating in W's dtype rounds the delta and the sum
    apart and misses in many entries; whatever the blocks of rows it is built in."""
    torch.manual_seed(5)  # the base weight drawn here, whatever ran before
    layer = _layer(nn.Linear(40, 24).to(dtype), num_loras=4, rank=4)
    merge_block_rows(40, 4)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.5)
    coeffs = _coeffs(2, n=4)
    w = layer.base_layer.weight.detach().double()
    delta = torch.einsum("nir,bn,nro->boi", layer.lora_A.detach().double(), coeffs.double(),
                         layer.lora_B.detach().double()) * layer.scale
    want = (w + delta).to(dtype)
    for got, ref in ((layer.merged_weight_for(coeffs[0]), want[0]), (layer.merged_weight_for(coeffs), want)):
        assert got.dtype == dtype and got.shape == ref.shape
        exact = (got == ref).double().mean().item()
        assert exact >= 0.99, f"{1 - exact:.1%} of the entries differ from the once-rounded value"
        ulp = torch.finfo(dtype).eps * ref.double().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got.double() - ref.double()).abs() <= ulp).all()


def test_jit_batch_of_different_analogies_in_bf16():
    """merged(strategy="jit") on a bf16 layer with different analogies per sample: each sample's merged weight is
    rounded once to bf16 and applied in bf16; the output is bf16 and matches the float64 reference."""
    layer = _layer(nn.Linear(8, 6).to(torch.bfloat16))
    coeffs = _coeffs(2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    with torch.no_grad(), flux.merged(layer, "jit"):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    check_forward("jit bf16 batch", y, dict(x=x, weight=layer.base_layer.weight, bias=layer.base_layer.bias,
                                             lora_a=layer.lora_A.detach(), lora_b=layer.lora_B.detach(),
                                             coeffs=coeffs, scale=layer.scale))


def test_jit_identical_rows_use_the_one_analogy_weight():
    """A batch repeating one analogy takes the single merged weight: bit for bit what merged(strategy="full")
    computes, not the per-sample batched matmul."""
    layer = _layer()
    layer.set_coefficients(_coeffs(1).expand(4, -1).contiguous())
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        with flux.merged(layer, "full"):
            want = layer(x)
        with flux.merged(layer, "jit"):
            got = layer(x)
    assert torch.equal(got, want)


def test_jit_forward_errors_name_the_cause():
    """Inside merged(strategy="jit"): a per-forward query (no fixed coefficients) and an input without a batch
    dimension are refused by name."""
    layer = _layer()
    layer.set_coefficients(_coeffs(1))
    with flux.merged(layer, "jit"), torch.no_grad():
        with pytest.raises(ValueError, match="with a batch dimension, got shape \\(8,\\)"):
            layer(torch.randn(8))
        layer.set_query_per_forward(torch.randn(1, KW["query_dim"]))
        with pytest.raises(RuntimeError, match="no coefficients for merged\\(strategy='jit'\\).*without per_forward"):
            layer(torch.randn(1, 8))


def test_merged_forward_with_a_frozen_basis_does_not_warn():
    """The "no gradient inside merged()" warning is for a trainable basis only: with the LoRWeB parameters frozen
    (inference with autograd on), a merged forward stays silent."""
    layer = _layer()
    layer.requires_grad_(False)
    layer.set_coefficients(_coeffs(1))
    x = torch.randn(1, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for strategy in ("full", "jit"):
            with flux.merged(layer, strategy):
                layer(x).sum().backward()


def test_a_layer_left_merged_by_a_failed_restore_refuses_loads():
    """When a merge cannot be undone (here the weight was replaced by a sparse tensor) the layer stays marked
    merged after the block; a load_state_dict into it is then refused by the layer itself and loads nothing."""
    layer = _layer()
    layer.set_coefficients(_coeffs(1))
    other = _layer(seed=5).state_dict()
    lorweb_keys = {k: other[k] for k in ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight")}
    with pytest.raises(RuntimeError, match="could not restore"):
        with flux.merged(layer, "full"):
            base = layer.base_layer
            base.weight = nn.Parameter(base.weight.detach().to_sparse(), requires_grad=False)
    assert layer._merged
    before = {k: t.detach().clone() for k, t in layer.lorweb_tensors().items()}
    with pytest.raises(RuntimeError, match="load_state_dict inside a merged\\(\\) block"):
        layer.load_state_dict(lorweb_keys, strict=False)
    assert all(torch.equal(t, before[k]) for k, t in layer.lorweb_tensors().items())


# ------------------------------------------------------------------------------------- state dicts and loads
def test_set_coefficients_stores_a_view_with_an_offset_as_a_copy():
    """One layer's slice of a stacked (L, B, N) result (a view with a storage offset) is stored as a copy with
    offset 0 and the same values (torch.compile guards on the offset)."""
    layer = _layer()
    stacked = torch.rand(3, 2, KW["num_loras"])
    layer.set_coefficients(stacked[1])
    assert layer.coefficients.storage_offset() == 0 and torch.equal(layer.coefficients, stacked[1])


def test_set_query_per_forward_refuses_a_query_of_another_width():
    """A per-forward query of the wrong width is refused by name and the coefficients in use are kept."""
    layer = _layer()
    kept = _coeffs(2)
    layer.set_coefficients(kept)
    with pytest.raises(ValueError, match="query must be \\(B, query_dim=6\\), got \\(2, 7\\)"):
        layer.set_query_per_forward(torch.randn(2, 7))
    assert layer.coefficients is kept and layer._query is None


def _none_layer(seed=0):
    return _layer(seed=seed, key_dim=6, query_projection_type="none")


def test_identity_projection_is_neither_saved_nor_required():
    """query_projection_type="none": the identity projection is not in the state dict, and a state dict without it
    loads strictly into another such layer."""
    layer, other = _none_layer(), _none_layer(seed=3)
    state = layer.state_dict()
    assert "att_lora_to_q.weight" not in state
    other.load_state_dict(state)
    assert all(torch.equal(t, layer.lorweb_tensors()[k]) for k, t in other.lorweb_tensors().items())


@pytest.mark.parametrize("kind", ["identity", "other_square", "other_shape"])
def test_an_old_state_dict_holding_the_identity_projection(kind):
    """A state dict saved when the identity was still persistent holds ``att_lora_to_q.weight``: the identity is
    accepted (and left out); any other tensor is reported by name (as torch reports load errors: after loading the
    rest) and the identity projection stays."""
    layer = _none_layer()
    layer.set_coefficients(_coeffs(1))
    state = _none_layer(seed=4).state_dict()
    state["att_lora_to_q.weight"] = {"identity": torch.eye(6), "other_square": 2 * torch.eye(6),
                                     "other_shape": torch.eye(6)[:5]}[kind]
    if kind == "identity":
        layer.load_state_dict(state)
        assert torch.equal(layer.lora_A, state["lora_A"]) and layer.coefficients is None
        return
    with pytest.raises(RuntimeError, match="att_lora_to_q.weight: query_projection_type='none' has the identity"):
        layer.load_state_dict(state)
    assert torch.equal(layer.att_lora_to_q.weight, torch.eye(6))  # the identity stays


@pytest.mark.parametrize("keys", [("lora_B",), ("lora_A", "lora_B", "lora_keys")], ids=["partial", "none_full"])
def test_loading_any_lorweb_tensor_drops_the_coefficients(keys):
    """Coefficients were computed from the old parameters: loading any one LoRWeB tensor (strict=False), or every
    tensor of a query_projection_type="none" layer (which has no projection to load), drops them."""
    layer = _none_layer()
    layer.set_coefficients(_coeffs(1))
    new = _none_layer(seed=6).state_dict()
    layer.load_state_dict({k: new[k] for k in keys}, strict=False)
    assert layer.coefficients is None
    layer.set_coefficients(_coeffs(1))
    layer.load_state_dict({"base_layer.bias": new["base_layer.bias"]}, strict=False)
    assert layer.coefficients is not None  # a base tensor alone keeps them


# --------------------------------------------------------------------------------------- group offloading (fakes)
class _Registry:
    """diffusers' HookRegistry as lorweb_fast reads it: a "group_offloading" hook holding a ModuleGroup."""

    def __init__(self, **group):
        self.hooks = {"group_offloading": types.SimpleNamespace(group=types.SimpleNamespace(**group))}

    def get_hook(self, name):
        return self.hooks.get(name)


def test_a_base_weight_offloaded_to_disk_is_refused_even_when_the_basis_is_not():
    """A disk group holding only the base weight (not the LoRWeB tensors) still makes set_query and merges
    refuse by name: the merge would be written into a placeholder that the next onload replaces."""
    model = nn.Sequential(_layer())
    layer = model[0]
    layer.set_coefficients(_coeffs(1))
    kept = layer.coefficients
    layer.base_layer._diffusers_hook = _Registry(parameters=[layer.base_layer.weight], offload_to_disk_path="/d")
    with pytest.raises(RuntimeError, match="0 is group-offloaded to disk"):
        lf.set_query(model, torch.randn(1, KW["query_dim"]))
    with pytest.raises(RuntimeError, match="group-offloaded to disk"):
        with flux.merged(model, "jit"):
            pass
    assert layer.coefficients is kept and not layer._merge_jit


def test_any_disk_group_refuses_layers_added_under_an_in_memory_block():
    """Groups fixed on disk keep their tables whatever other groups do: with a disk group before an in-memory
    block group, a layer injected under that block is still refused and nothing is injected."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6)))
    model[0]._diffusers_hook = _Registry(modules=[model[0]], offload_to_disk_path="/d")
    model[1]._diffusers_hook = _Registry(modules=[model[1]])
    with pytest.raises(RuntimeError, match="load the LoRWeB adapter first, then enable group offloading"):
        lf.inject_lorweb(model, lf.LoRWeBConfig(target_modules=["1.0"], **KW))
    assert not lf.lorweb_layers(model)


# ------------------------------------------------------------------------------------------- layer-level audit
@pytest.mark.parametrize("setter", ["coefficients", "per_forward_query"])
def test_meta_coefficients_or_query_are_refused_even_without_the_finite_check(setter):
    """``check_finite=False`` skips the finiteness check only: coefficients (or a per-forward query) on the meta
    device hold no values and are refused by name at once, not by torch's "Cannot copy out of meta tensor" at the
    next forward; what was set before is kept."""
    layer = _layer()
    kept = _coeffs(2)
    layer.set_coefficients(kept)
    with pytest.raises(ValueError, match="meta device"):
        if setter == "coefficients":
            layer.set_coefficients(_coeffs(2).to("meta"), check_finite=False)
        else:
            layer.set_query_per_forward(torch.randn(2, KW["query_dim"], device="meta"), check_finite=False)
    assert layer.coefficients is kept and layer._query is None


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_meta_forward_gives_the_shape_as_nn_linear(precision):
    """A shape dry run on the meta device (layer and input on meta) works as for nn.Linear: torch.autocast has no
    meta device type, so the forward must not ask it (it raised "unknown device type for autocast" / "unsupported
    scalarType")."""
    layer = _layer()
    layer.set_coefficients(_coeffs(2))
    layer.to("meta")
    layer.adapter_precision = precision
    for shape in ((2, 5, 8), (2, 8), (2, 3, 4, 8)):
        y = layer(torch.empty(shape, device="meta"))
        assert y.device.type == "meta" and y.shape == (*shape[:-1], 6)


def test_merged_weight_for_names_wrong_coefficients():
    """``merged_weight_for`` takes (N,) or (B, N) floating-point coefficients: another shape is named instead of a
    broadcasting error from inside the merge, and integer coefficients are refused as by set_coefficients."""
    layer = _layer()
    for bad in (torch.rand(KW["num_loras"] + 1), torch.rand(1, 2, KW["num_loras"])):
        with pytest.raises(ValueError, match=r"coeffs must be \(N=3,\) or \(B, N=3\), got shape"):
            layer.merged_weight_for(bad)
    with pytest.raises(TypeError, match="coeffs must be a floating-point tensor"):
        layer.merged_weight_for(torch.ones(KW["num_loras"], dtype=torch.int64))
    assert layer.merged_weight_for(_coeffs(2)).shape == (2, 6, 8)


def test_injection_refuses_the_out_proj_of_nn_multiheadattention():
    """nn.MultiheadAttention reads ``out_proj.weight`` and never calls ``out_proj``: a LoRWeB layer there would be
    unused (and the attention's forward failed with "'LoRWeBLinear' object has no attribute 'weight'"). Refused by
    name before anything is injected."""
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.MultiheadAttention(8, 2, batch_first=True)])
    with pytest.raises(ValueError, match="transformer_blocks.0.out_proj is the out_proj of an nn.MultiheadAttention"):
        lf.inject_lorweb(model, lf.LoRWeBConfig(**KW))
    assert not lf.lorweb_layers(model) and model.transformer_blocks[0].out_proj.weight.requires_grad
    # a checkpoint naming it is refused the same way by load_lorweb_weights (which would inject the layer)
    donor = nn.Module()
    donor.transformer_blocks = nn.ModuleList([nn.Module()])
    donor.transformer_blocks[0].out_proj = nn.Linear(8, 8)
    lf.inject_lorweb(donor, lf.LoRWeBConfig(**KW))
    with pytest.raises(lf.LoRWeBCheckpointError, match="transformer_blocks.0.out_proj is the out_proj of an "
                                                       "nn.MultiheadAttention"):
        lf.load_lorweb_weights(model, lf.lorweb_state_dict(donor))
    assert not lf.lorweb_layers(model)


# --------------------------------------------------------------------------- what is remembered about coefficients
def test_holds_one_analogy_follows_the_coefficients_and_their_in_place_changes():
    """``holds_one_analogy`` is decided once per coefficient tensor (no sync per forward) and decided again when the
    coefficients are replaced or changed in place."""
    layer = _layer()
    same = _coeffs(1).expand(3, -1).clone()
    layer.set_coefficients(same)
    assert layer.holds_one_analogy() is True
    assert layer.holds_one_analogy() is True  # remembered
    with torch.no_grad():
        layer.coefficients[2, 0] += 0.5  # in place: the version changes
    assert layer.holds_one_analogy() is False
    layer.set_coefficients(_coeffs(3))
    assert layer.holds_one_analogy() is False
    layer.set_coefficients(_coeffs(1).expand(3, -1).clone())  # (``same`` itself was changed in place above)
    assert layer.holds_one_analogy() is True
    layer.set_coefficients(_coeffs(1))
    assert layer.holds_one_analogy() is True
    layer.set_coefficients(None)
    assert layer.holds_one_analogy() is False


@pytest.mark.parametrize("check_finite", [True, False])
def test_set_query_decides_one_analogy_as_one_analogy_does(check_finite):
    """``set_query`` with its finiteness check decides every layer's ``holds_one_analogy`` in the same
    synchronisation; the answers are those of ``layer.one_analogy`` on the coefficients set."""
    from lorweb_fast.layer import one_analogy
    from lorweb_fast.testing import pair_query, tiny_pair_model

    model = tiny_pair_model()
    repeated = pair_query(1).expand(3, -1).clone()
    for query, want in ((repeated, True), (pair_query(3), False), (pair_query(1), True)):
        with torch.no_grad():
            lf.set_query(model, query, check_finite=check_finite)
        for layer in lf.lorweb_layers(model).values():
            if check_finite and query.shape[0] > 1:  # decided by set_query, before any forward
                assert layer._one_analogy_memo_for(layer.coefficients) is want
            assert layer.holds_one_analogy() is one_analogy(layer.coefficients) is want


def test_coefficients_on_another_device_are_moved_once_and_again_after_a_change():
    """The coefficients set by set_query, needed on another device (model CPU offload: the meta device stands in for
    the GPU here), are copied once and the copy kept until they are replaced or changed in place; coefficients with
    autograd history are copied at every call (never kept with their graph)."""
    layer = _layer()
    layer.set_coefficients(_coeffs(2))
    meta = torch.device("meta")
    first = layer._coefficients_on(layer.coefficients, meta)
    assert first.device == meta and layer._coefficients_on(layer.coefficients, meta) is first
    assert layer._coefficients_on(layer.coefficients, torch.device("cpu")) is layer.coefficients  # same device
    with torch.no_grad():
        layer.coefficients.mul_(1.0)
    assert layer._coefficients_on(layer.coefficients, meta) is not first
    layer.set_coefficients(_coeffs(2, seed=3))
    assert layer._moved_coefficients is None  # nothing kept about the old coefficients
    tracked = _coeffs(2).requires_grad_(True) * 1.0
    layer.set_coefficients(tracked, check_finite=False)
    assert layer._coefficients_on(tracked, meta) is not layer._coefficients_on(tracked, meta)
    assert layer._moved_coefficients is None


def test_coefficients_set_and_changed_under_inference_mode_are_seen():
    """Found by the session's review: inference tensors have no version counter, so what was remembered about
    coefficients set under ``torch.inference_mode`` missed an in-place change there ("jit" applied row 0 to every
    sample). ``set_coefficients`` stores such coefficients as a normal tensor, whose version shows the change; a copy
    moved to another device inside inference mode is not reused outside it (autograd cannot save it)."""
    layer = _layer()
    with torch.inference_mode():
        layer.set_coefficients(_coeffs(1).expand(2, -1).clone())
        assert not layer.coefficients.is_inference()
        assert layer.holds_one_analogy() is True
        layer.coefficients[1, 0] += 0.5
        assert layer.holds_one_analogy() is False
        meta = torch.device("meta")
        inside = layer._coefficients_on(layer.coefficients, meta)
        assert layer._coefficients_on(layer.coefficients, meta) is inside
    outside = layer._coefficients_on(layer.coefficients, meta)
    assert outside is not inside and not outside.is_inference()
    with pytest.raises(TypeError, match="takes a bool"):
        layer.remember_one_analogy(lf.lorweb_layers(nn.Sequential(layer)))


@pytest.mark.parametrize("strategy", ["jit", "full"])
def test_a_merge_follows_coefficients_changed_in_place_under_inference_mode(strategy):
    """The same through a merged forward: identical rows, then one row changed in place under inference mode: the
    merged forward gives each sample its own mixture (as the unmerged forward)."""
    model = nn.Sequential(_layer())
    layer = model[0]
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        layer.set_coefficients(_coeffs(1).expand(2, -1).clone())
        with lf.merged(model, "jit"):
            model(x)  # decided: one analogy
        layer.coefficients[1] += 0.5
        want = model(x)
        if strategy == "full":
            with pytest.raises(ValueError, match="merges one analogy"):
                with lf.merged(model, strategy):
                    pass
            return
        with lf.merged(model, strategy):
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[0], want[1])
