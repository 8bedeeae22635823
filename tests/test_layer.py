"""LoRWeBLinear: parameter layout, peft equivalence, coefficients handling, quantized bases."""

import math

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import reference
from lorweb_fast.testing import check_forward


def test_parameter_layout_and_init():
    base = nn.Linear(40, 24)
    layer = lf.LoRWeBLinear(base, num_loras=5, rank=3, key_dim=16, query_dim=12, heads=2)
    assert layer.lora_A.shape == (5, 40, 3) and layer.lora_B.shape == (5, 3, 24)
    assert layer.lora_keys.shape == (5, 16) and layer.att_lora_to_q.weight.shape == (16, 12)
    assert layer.att_lora_to_q.bias is None
    assert torch.count_nonzero(layer.lora_B) == 0
    # kaiming_uniform(a=sqrt(5)) over the whole (N, in, r) tensor: fan_in = in * r, bound = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(40 * 3)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.scale == 1.0 and lf.LoRWeBLinear(base, rank=4, lora_alpha=8).scale == 2.0
    names = {n for n, _ in layer.named_parameters()}
    assert {"lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight", "base_layer.weight"} <= names


def test_base_is_wrapped_not_copied_or_unfrozen():
    base = nn.Linear(8, 6)
    base.requires_grad_(False)
    w = base.weight
    layer = lf.LoRWeBLinear(base, num_loras=2, rank=2, key_dim=4, query_dim=6)
    assert layer.base_layer is base and layer.base_layer.weight is w and not w.requires_grad


def test_forward_without_coefficients_raises():
    layer = lf.LoRWeBLinear(nn.Linear(8, 6), num_loras=2, rank=2, key_dim=4, query_dim=6)
    with pytest.raises(RuntimeError, match="no coefficients.*set_query"):
        layer(torch.randn(2, 3, 8))
    layer.set_coefficients(torch.rand(2, 2))
    with pytest.raises(ValueError, match="batch size 2 but the input has batch size 3"):
        layer(torch.randn(3, 8))
    kept = layer.coefficients
    with pytest.raises(ValueError, match=r"\(B, N=2\)"):
        layer.set_coefficients(torch.rand(2, 3))
    assert layer.coefficients is kept  # the failed call left the coefficients in place


@pytest.mark.parametrize("shape", [(3, 5, 20), (3, 20)])
def test_2d_and_3d_inputs_with_per_sample_coefficients(shape):
    torch.manual_seed(0)
    base = nn.Linear(20, 11)
    layer = lf.LoRWeBLinear(base, num_loras=4, rank=2, key_dim=8, query_dim=6)
    nn.init.normal_(layer.lora_B)
    coeffs = torch.rand(3, 4)
    layer.set_coefficients(coeffs)
    x = torch.randn(*shape)
    want = reference.lorweb_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B, coeffs, layer.scale)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_matches_peft_lora_with_one_basis_lora():
    """N=1, coefficient 1 (softmax over one LoRA): LoRWeBLinear is peft's LoRA Linear with the same A, B, scaling."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    torch.manual_seed(0)
    base = nn.Linear(30, 17)
    rank, alpha = 4, 6.0
    ours = lf.LoRWeBLinear(base, num_loras=1, rank=rank, lora_alpha=alpha, key_dim=8, query_dim=12)
    nn.init.normal_(ours.lora_B)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["base"])
    peft_layer = PeftLoraLinear(nn.Linear(30, 17), adapter_name="default", config=config, r=rank, lora_alpha=alpha)
    peft_layer.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A[0].T)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B[0].T)
    assert peft_layer.scaling["default"] == ours.scale
    query = torch.randn(2, 12)
    ours.set_coefficients(ours.coefficients_from_query(query))
    assert torch.equal(ours.coefficients, torch.ones(2, 1))
    x = torch.randn(2, 9, 30)
    torch.testing.assert_close(ours(x), peft_layer(x), rtol=1e-5, atol=1e-5)


def _bnb_or_skip(kind):
    bnb = pytest.importorskip("bitsandbytes")
    base = nn.Linear(32, 24)
    try:
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(32, 24, has_fp16_weights=False, threshold=0.0)
        else:
            q = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.float32)
        q.load_state_dict(base.state_dict())
        q = q.to("cpu")
        q(torch.randn(1, 32))
    except Exception as exc:  # pragma: no cover - depends on the installed bitsandbytes
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run {kind} layers on this CPU: {exc}")
    return q


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_wraps_bitsandbytes_layers(kind):
    q = _bnb_or_skip(kind)
    weight = q.weight
    layer = lf.LoRWeBLinear(q, num_loras=3, rank=2, key_dim=8, query_dim=6)
    assert layer.base_layer is q and layer.base_layer.weight is weight
    assert layer.lora_A.dtype == torch.float32
    nn.init.normal_(layer.lora_B)
    coeffs = torch.rand(2, 3)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 5, 32)
    want = q(x).double() + reference.mixed_lora_delta(x, layer.lora_A, layer.lora_B, coeffs, layer.scale)
    out = layer(x)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_wraps_optimum_quanto_qfloat8_layers():
    """An optimum-quanto QLinear with fp8 weights (what ``--quantize-base qfloat8`` and the official
    ``quantize: true`` make) is wrapped through the delta-only path: the output is the QLinear's own output plus the
    mixture, the quantized weight is neither read nor changed, and the gradients reach x and the basis."""
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(37, 21))
    quanto.quantize(q, weights=quanto.qfloat8)
    quanto.freeze(q)
    q = q[0]
    assert not lf.layer.has_plain_weight(q)  # its forward is quanto's, not F.linear on .weight
    data, scale = q.weight._data.clone(), q.weight._scale.clone()
    layer = lf.LoRWeBLinear(q, num_loras=3, rank=2, key_dim=8, query_dim=6)
    assert layer.lora_A.dtype == torch.float32
    nn.init.normal_(layer.lora_B)
    coeffs = torch.rand(2, 3)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 5, 37, requires_grad=True)
    with torch.no_grad():
        base_out = q(x)
    want = base_out.double() + reference.mixed_lora_delta(x.detach().double(), layer.lora_A.double(),
                                                            layer.lora_B.double(), coeffs.double(), layer.scale)
    out = layer(x)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert torch.equal(q.weight._data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(q.weight._scale, scale)


def test_explicit_parameter_dtype_initialises_in_that_dtype():
    """``dtype=torch.float32`` on a bf16 base creates and initialises the LoRWeB parameters in fp32 (the official
    AttLoRAModule is built in fp32): the same draws as an fp32 base from the same seed, not bf16-rounded values.
    Without ``dtype`` the parameters follow the base weight (bf16), as inference expects; other dtypes are refused."""
    kw = dict(num_loras=3, rank=2, key_dim=8, query_dim=12)
    fp32_base, base = nn.Linear(40, 24), nn.Linear(40, 24).to(torch.bfloat16)
    torch.manual_seed(5)
    want = lf.LoRWeBLinear(fp32_base, **kw)
    torch.manual_seed(5)
    got = lf.LoRWeBLinear(base, dtype=torch.float32, **kw)
    for name, tensor in got.lorweb_tensors().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want.lorweb_tensors()[name]), name
    assert not torch.equal(got.lora_A, got.lora_A.bfloat16().float())
    assert all(t.dtype == torch.bfloat16 for t in lf.LoRWeBLinear(base, **kw).lorweb_tensors().values())

    model = nn.Sequential(nn.Linear(40, 24).to(torch.bfloat16))
    torch.manual_seed(5)
    lf.inject_lorweb(model, lf.LoRWeBConfig(target_modules=["0"], **kw), dtype=torch.float32)
    assert all(torch.equal(t, want.lorweb_tensors()[n]) for n, t in model[0].lorweb_tensors().items())
    for bad in (torch.int8, "float32"):
        with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
            lf.LoRWeBLinear(nn.Linear(4, 4), dtype=bad, **kw)
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="dtype must be"):
        lf.inject_lorweb(plain, lf.LoRWeBConfig(target_modules=["0"], **kw), dtype=torch.int64)
    assert type(plain[0]) is nn.Linear  # nothing injected


@pytest.mark.parametrize("freeze_base_model", [True, False])
def test_injection_leaves_only_lorweb_trainable_as_peft(freeze_base_model):
    """As peft's injection (``inject_adapter_in_model``, diffusers' ``add_adapter``): every parameter but the LoRWeB
    tensors stops requiring grad, the wrapped layer's W included (frozen in LoRWeB), so an optimizer built from
    ``requires_grad`` trains LoRWeB only; ``freeze_base_model=False`` freezes the wrapped layers only and leaves the
    model's other layers as they were; a refused construction changes nothing; ``remove_lorweb`` does not unfreeze
    (as peft's unload)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    with pytest.raises(ValueError):
        lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, heads=3,
                                                target_modules=["0"]))
    assert all(p.requires_grad for p in model.parameters())
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=["0"]),
                     freeze_base_model=freeze_base_model)
    layer = model[0]
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert all(p.requires_grad for p in layer.lorweb_tensors().values())
    assert [p.requires_grad for p in model[1].parameters()] == [not freeze_base_model] * 2
    assert {id(p) for p in model.parameters() if p.requires_grad} == (
        {id(p) for p in layer.lorweb_tensors().values()} | (set() if freeze_base_model else
                                                            {id(p) for p in model[1].parameters()}))
    lf.set_query(model, torch.randn(2, 6))
    model(torch.randn(2, 3, 6)).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.lora_B.grad is not None
    assert (model[1].weight.grad is None) == freeze_base_model
    lf.remove_lorweb(model)
    assert [p.requires_grad for p in model.parameters()] == [False, False] + [not freeze_base_model] * 2


def test_loading_that_injects_layers_freezes_the_base_model_as_injection_does(tmp_path):
    """load_lorweb_weights injecting the missing layers freezes the rest as inject_lorweb does (default), or only the
    wrapped layers with freeze_base_model=False; loading into layers already there changes no requires_grad."""
    config = lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=["0"])
    source = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    lf.inject_lorweb(source, config)
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(source, path)
    for freeze in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
        lf.load_lorweb_weights(model, path, freeze_base_model=freeze)
        assert [p.requires_grad for p in model[1].parameters()] == [not freeze] * 2
        assert all(p.requires_grad for p in model[0].lorweb_tensors().values())
        assert not any(p.requires_grad for p in model[0].base_layer.parameters())
    model[1].requires_grad_(True)
    lf.load_lorweb_weights(model, path)  # the layers are there: nothing injected, nothing frozen
    assert all(p.requires_grad for p in model[1].parameters())


def test_inputs_with_more_dimensions_are_one_samples_tokens():
    """(B, H, W, in), as nn.Linear takes it: every token of sample b gets sample b's coefficients (reference computed
    here per sample and LoRA with einsum)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_B.normal_()
        lf.set_query(model, torch.randn(2, 6))
    x = torch.randn(2, 3, 4, 6)
    y = model(x)
    assert y.shape == (2, 3, 4, 5)
    layer = model[0]
    c = layer.coefficients  # (B, N)
    delta = torch.einsum("bhwi,nir,bn,nro->bhwo", x, layer.lora_A, c, layer.lora_B) * layer.scale
    torch.testing.assert_close(y, layer.base_layer(x) + delta)
    assert delta.abs().max() > 1e-2  # the mixture is there
    with pytest.raises(ValueError, match="with a batch dimension"):
        model(torch.randn(6))


@pytest.mark.parametrize("shape", [(0, 3, 2, 8), (2, 0, 3, 8), (0, 8), (0, 4, 8)])
def test_empty_inputs_of_any_rank_as_nn_linear(shape):
    """An empty batch or token dimension of a 2-D, 3-D or 4-D input gives nn.Linear's empty output (the 4-D reshape
    spells out the token count: -1 is ambiguous with 0 elements), unmerged and in merged(strategy="jit")."""
    base = nn.Linear(8, 6)
    layer = lf.LoRWeBLinear(base, num_loras=2, rank=2, key_dim=4, query_dim=6)
    layer.set_coefficients(torch.rand(shape[0], 2))
    x = torch.randn(*shape)
    assert layer(x).shape == base(x).shape == (*shape[:-1], 6)
    with lf.merged(layer, strategy="jit"):
        assert layer(x).shape == (*shape[:-1], 6)


def test_autocast_casts_only_what_autocast_casts():
    """Under CPU bf16 autocast an fp32 input runs in bf16 (as nn.Linear), a float64 input stays float64 (autocast
    leaves doubles alone), and an integer input is refused by dtype as without autocast."""
    base = nn.Linear(8, 6)
    layer = lf.LoRWeBLinear(base, num_loras=2, rank=2, key_dim=4, query_dim=6)
    nn.init.normal_(layer.lora_B)
    coeffs = torch.rand(2, 2)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == base(x).dtype == torch.bfloat16
    # the bf16 run's values: x, W, b and the basis rounded to bf16 (what autocast computes with), then float64
    rounded = {k: t.detach().to(torch.bfloat16) for k, t in (("x", x), ("weight", base.weight), ("bias", base.bias),
                                                             ("lora_a", layer.lora_A), ("lora_b", layer.lora_B))}
    check_forward("autocast bf16", y, {**rounded, "coeffs": coeffs, "scale": layer.scale})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer64, base64 = layer.double(), base.double()
        layer64.set_coefficients(coeffs)
        y64 = layer64(x.double())
        assert y64.dtype == base64(x.double()).dtype == torch.float64
        with pytest.raises(TypeError, match="dtype"):
            layer64(torch.ones(2, 3, 8, dtype=torch.long))
    want = reference.lorweb_linear(x, base64.weight, base64.bias, layer64.lora_A, layer64.lora_B, coeffs, layer.scale)
    torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-12)


def test_set_backend_applies_to_every_layer_and_a_named_backend_that_cannot_run_raises():
    """lf.set_backend(model, name) is the model-wide LoRWeBLinear(backend=...): the torch backend on CPU gives the
    default's result, an unusable named backend raises BackendUnavailableError at the forward (no silent fallback),
    an unknown name is refused at once and changes nothing."""
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
    for layer in lf.lorweb_layers(model).values():
        nn.init.normal_(layer.lora_B)
    lf.set_query(model, torch.randn(2, 6))
    x = torch.randn(2, 3, 8)
    want = model(x)
    lf.set_backend(model, "torch")
    assert {layer.backend for layer in lf.lorweb_layers(model).values()} == {"torch"}
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown backend 'cuBLAS'"):
        lf.set_backend(model, "cuBLAS")
    assert {layer.backend for layer in lf.lorweb_layers(model).values()} == {"torch"}
    lf.set_backend(model, "cuda")
    with pytest.raises(lf.BackendUnavailableError):
        model(x)
    lf.set_backend(model, None)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LoRWeB layers"):
        lf.set_backend(nn.Linear(2, 2), "torch")
