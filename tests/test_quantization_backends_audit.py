"""Audit of quantization backends the rest of the suite does not test, on tiny FLUX transformers built locally.

Each backend quantizes the base linears BEFORE LoRWeB is injected, except where a test says otherwise:

* diffusers' GGUF support (``GGUFQuantizationConfig``, ``GGUFLinear`` / ``GGUFParameter``, Q8_0 data made with
  ``gguf.quants``), loaded the way users load FLUX.1-Kontext GGUF files (``from_single_file``) or swapped in by hand;
* torchao (``torchao.quantization.quantize_`` with the CPU-capable int8 / float8 weight-only configs, and diffusers'
  ``TorchAoConfig`` loading);
* diffusers' own BFL ``fp8r`` / ``nvfp4`` single-file quantizer (no extra package) and diffusers' ``QuantoConfig``.

Checked per backend: injection, forward == base(x) + the float64 LoRWeB delta (torch backend; Triton under its CPU
interpreter in one subprocess), a training step's gradients, merge / fuse refusals that leave the quantized weights
untouched, save / load of the LoRWeB weights, and quantizing after injection. The audit found (fixed, tested here):
a whole-model torchao quantization after injection slipping past the query-projection check (errors from inside
torchao, a partial load, a per-forward query silently on the fp8 projection), ``unfuse_lora`` after the bases were
quantized while fused silently adding the mixture twice, ``dequantize()`` leaving the wrapped bases trainable, every
diffusers-quantized model reported as bitsandbytes, and ``choose_merge_strategy`` answering a refused merge; the
rules these fixes rest on are also tested with a tensor-subclass stand-in, without torchao. Needs ``gguf`` (the test
extra) / ``torchao`` (optional: its releases follow torch's) for the backend tests (skipped without them).
"""

import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import flux, lora_api, reference, training
from lorweb_fast.layer import has_plain_weight
from lorweb_fast.testing import inject_random_lorweb, one_intra_op_thread, tiny_flux_config, tiny_flux_inputs

diffusers = pytest.importorskip("diffusers")

QUERY_DIM = 24  # inject_random_lorweb's query width
LORWEB_SUFFIXES = ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (no thread spinning on a shared CPU)."""
    with one_intra_op_thread():
        yield


# ----------------------------------------------------------------------------------------------------- helpers
def _query(batch=2, seed=3):
    return torch.randn(batch, QUERY_DIM, generator=torch.Generator().manual_seed(seed))


def _tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(**tiny_flux_config()).to(dtype).eval()


def _is_lorweb(name):
    return any(s in name for s in LORWEB_SUFFIXES)


def _assert_every_layer_is_base_plus_delta(model, *, backend="torch", dtype=torch.float32, rtol=1e-5):
    """Every LoRWeB layer's output on a random input equals the quantized base layer's own output plus the float64
    reference mixture (``reference.mixed_lora_delta``) with the coefficients set_query gave it."""
    layers = lf.lorweb_layers(model)
    assert layers
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.backend = backend
            x = torch.randn(2, 5, layer.in_features, generator=g).to(dtype)
            y = layer(x)
            want = layer.base_layer(x).double() + reference.mixed_lora_delta(
                x, layer.lora_A, layer.lora_B, layer.coefficients, layer.scale)
            tol = rtol * max(1.0, want.abs().max().item())
            err = (y.double() - want).abs().max().item()
            assert err <= tol, f"{name}: |y - (base(x) + delta)| = {err:.3g} > {tol:.3g}"


def _training_step(model):
    """One forward/backward/AdamW step; returns the names of the parameters that got a gradient."""
    model.train()
    lf.set_query(model, _query())  # with autograd: lora_keys / att_lora_to_q train too
    model(**tiny_flux_inputs()).sample.square().mean().backward()
    got = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad(set_to_none=True)
    lf.clear_query(model)
    model.eval()
    return got


def _assert_only_lorweb_gets_gradients(got, model):
    assert got, "no parameter got a gradient"
    assert all(_is_lorweb(n) for n in got), [n for n in got if not _is_lorweb(n)][:5]
    every = {n for n, p in model.named_parameters() if _is_lorweb(n) and p.requires_grad}
    assert every == set(got)


def _base_bytes(model):
    """{layer name: the raw quantized storage of its base weight} (to check nothing writes into it)."""
    out = {}
    for name, layer in lf.lorweb_layers(model).items():
        w = layer.base_layer.weight
        raw = next((getattr(w, a) for a in ("qdata", "_data") if isinstance(getattr(w, a, None), torch.Tensor)),
                   None)
        if raw is None:
            raw = w.as_tensor() if hasattr(w, "as_tensor") else w
        raw = raw.detach()
        out[name] = (raw.view(torch.uint8) if raw.dtype.itemsize == 1 else raw).clone()
    return out


def _assert_merges_refused(model, pattern):
    """Every merge strategy, ``fuse_lora`` included, is refused with a TypeError matching ``pattern`` and no quantized
    weight changes."""
    before = _base_bytes(model)
    with torch.no_grad():
        lf.set_query(model, _query(1))
    for strategy in ("full", "offload", "jit"):
        with pytest.raises(TypeError, match=pattern):
            with flux.merged(model, strategy):
                pass
        with pytest.raises(TypeError, match=pattern):
            lora_api.fuse_lora(model, strategy)
        assert lora_api.fused_strategy(model) is None
    after = _base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(layer._merged or layer._merge_jit for layer in lf.lorweb_layers(model).values())


def _assert_save_load_roundtrip(model, fresh, path):
    """save_lorweb_weights then load_lorweb_weights into a fresh quantized model (layers injected by the load): the
    same LoRWeB tensors and the same model output."""
    lf.save_lorweb_weights(model, path)
    lf.load_lorweb_weights(fresh, path)
    a, b = lf.lorweb_state_dict(model), lf.lorweb_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        lf.set_query(model, _query())
        lf.set_query(fresh, _query())
        assert torch.equal(model(**inputs).sample, fresh(**inputs).sample)


# ------------------------------------------------------------------------------------------------------- GGUF
def _gguf_linear(linear, compute_dtype=torch.float32):
    """diffusers' GGUFLinear holding ``linear``'s weight as GGUF Q8_0 blocks (quantized by ``gguf.quants``)."""
    gguf = pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    q8 = gguf.GGMLQuantizationType.Q8_0
    layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype)
    data = gguf.quants.quantize(linear.weight.detach().float().numpy(), q8)
    layer.weight = GGUFParameter(torch.from_numpy(data), quant_type=q8)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def _swap_linears(module, make):
    """Every plain nn.Linear under ``module`` whose input width is a multiple of 32 replaced by ``make(linear)``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and child.in_features % 32 == 0:
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def _gguf_blocks(transformer, compute_dtype=torch.float32):
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        _swap_linears(blocks, lambda lin: _gguf_linear(lin, compute_dtype))
    return transformer


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """(config folder, a .gguf file) of the seed-0 tiny transformer, its block weights stored as Q8_0 under the
    diffusers key names (``from_single_file`` then loads them without conversion), the rest as F32."""
    gguf = pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    model = _tiny()
    model.save_pretrained(root / "config")
    writer = gguf.GGUFWriter(str(root / "tiny.gguf"), "flux")
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if value.dim() == 2 and "transformer_blocks" in key and array.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return root / "config", root / "tiny.gguf"


def _load_gguf(gguf_file, compute_dtype=torch.float32):
    config, path = gguf_file
    return diffusers.FluxTransformer2DModel.from_single_file(
        str(path), config=str(config), torch_dtype=torch.float32,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=compute_dtype)).eval()


def test_gguf_from_single_file_injects_and_every_layer_is_base_plus_delta(gguf_file):
    """A GGUF Q8_0 transformer loaded with ``from_single_file``: inject_lorweb wraps the GGUFLinear layers (fp32
    LoRWeB tensors, the GGUF weights frozen), and every layer returns GGUFLinear(x) + the float64 mixture."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    model = _load_gguf(gguf_file)
    inject_random_lorweb(model)
    layers = lf.lorweb_layers(model)
    assert len(layers) == 20 and all(isinstance(layer.base_layer, GGUFLinear) for layer in layers.values())
    assert all(layer.lora_A.dtype == torch.float32 for layer in layers.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if not _is_lorweb(n))
    with torch.no_grad():
        lf.set_query(model, _query())
    _assert_every_layer_is_base_plus_delta(model)


def test_gguf_layer_matches_the_float64_reference_on_the_dequantized_weight():
    """A LoRWeBLinear over a GGUFLinear equals ``reference.lorweb_linear`` on the dequantized Q8_0 weight (what
    diffusers' GGUFLinear multiplies by on a CPU), forward and the basis / input gradients against torch autograd
    of the same float64 expression."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    torch.manual_seed(0)
    base = _gguf_linear(nn.Linear(64, 48))
    layer = lf.LoRWeBLinear(base, num_loras=3, rank=4, key_dim=8, query_dim=12, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    coeffs = torch.softmax(torch.randn(2, 3), -1)
    layer.set_coefficients(coeffs)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    w = dequantize_gguf_tensor(base.weight).double()
    a, b = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    want = reference.lorweb_linear(xd, w, base.bias, a, b, coeffs, layer.scale)
    assert (y.double() - want).abs().max() < 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy.double())
    for got, ref in ((x.grad, xd.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    assert base.weight.grad is None


def test_gguf_bf16_compute_dtype_returns_the_base_output_dtype():
    """GGUF layers computing in bf16 (the usual FLUX setting) with bf16 inputs: fp32 LoRWeB tensors (the default for
    a quantized base), a bf16 output equal to GGUFLinear(x) + the mixture within bf16 rounding; an fp32 input is
    refused by GGUFLinear itself (as without LoRWeB)."""
    torch.manual_seed(0)
    base = _gguf_linear(nn.Linear(32, 16), compute_dtype=torch.bfloat16)
    layer = lf.LoRWeBLinear(base, num_loras=3, rank=2, key_dim=8, query_dim=12)
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.set_coefficients(torch.softmax(torch.randn(2, 3), -1))
    with pytest.raises(RuntimeError, match="same dtype"):
        layer(torch.randn(2, 5, 32))
    for dtype in (torch.bfloat16,):
        x = torch.randn(2, 5, 32).to(dtype)
        with torch.no_grad():
            y = layer(x)
            want = base(x).double() + reference.mixed_lora_delta(x, layer.lora_A, layer.lora_B, layer.coefficients,
                                                                  layer.scale)
        assert y.dtype == torch.bfloat16
        assert (y.double() - want).abs().max() < 0.02 * max(1.0, want.abs().max().item())
    layer.adapter_precision = "fp32"  # the trainer's official arithmetic: the mixture in fp32, added in bf16
    with torch.no_grad():
        y32 = layer(x)
    assert y32.dtype == torch.bfloat16
    assert (y32.double() - want).abs().max() < 0.02 * max(1.0, want.abs().max().item())


def test_gguf_training_step_reaches_only_lorweb_and_leaves_the_gguf_bytes(gguf_file):
    """A training step on the GGUF transformer: every LoRWeB tensor gets a gradient, nothing else does, and the
    Q8_0 bytes are unchanged after the optimizer step."""
    model = _load_gguf(gguf_file)
    inject_random_lorweb(model)
    before = _base_bytes(model)
    got = _training_step(model)
    _assert_only_lorweb_gets_gradients(got, model)
    after = _base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_gguf_merges_and_fuse_lora_are_refused_by_name(gguf_file):
    """merged("full" / "offload" / "jit") and fuse_lora refuse GGUF bases with a TypeError naming GGUFLinear, before
    anything changes (no GGUF byte written, nothing left marked merged)."""
    model = _load_gguf(gguf_file)
    inject_random_lorweb(model)
    _assert_merges_refused(model, r"GGUFLinear \(weight GGUFParameter\) has no plain tensor weight")


def test_gguf_save_and_load_of_lorweb_weights(gguf_file, tmp_path):
    """save_lorweb_weights from a GGUF transformer and load_lorweb_weights into a fresh one (which injects the
    layers): the same tensors and outputs."""
    model = _load_gguf(gguf_file)
    inject_random_lorweb(model)
    _assert_save_load_roundtrip(model, _load_gguf(gguf_file), tmp_path / "lorweb.safetensors")


def test_gguf_remove_lorweb_gives_the_gguf_model_back(gguf_file):
    """remove_lorweb on a GGUF transformer puts the very GGUFLinear modules back (their Q8_0 bytes untouched): the
    output equals the stock GGUF model's."""
    stock = _load_gguf(gguf_file)
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        want = stock(**inputs).sample
    inject_random_lorweb(stock)
    bases = {name: layer.base_layer for name, layer in lf.lorweb_layers(stock).items()}
    with torch.no_grad():
        lf.set_query(stock, _query())
        assert not torch.equal(stock(**inputs).sample, want)  # the mixture is not zero
    lf.remove_lorweb(stock)
    assert not lf.lorweb_layers(stock)
    assert all(stock.get_submodule(name) is base for name, base in bases.items())
    with torch.no_grad():
        assert torch.equal(stock(**inputs).sample, want)


def test_gguf_pipeline_runs_unmerged_under_auto_and_refuses_named_merges(tmp_path):
    """A LoRWeBKontextPipeline whose transformer blocks are GGUF: merge="auto" runs unmerged (the same image as
    merge="none"), merge="full" / "offload" / "jit" and the pipeline's fuse_lora raise naming GGUFLinear."""
    from lorweb_fast import demo
    from lorweb_fast.flux import AnalogyEncoder, LoRWeBKontextPipeline
    from lorweb_fast.testing import generate_random_analogy, random_analogy

    pytest.importorskip("gguf")
    demo.build_tiny_clip(tmp_path / "clip")
    pipe = demo.build_tiny_kontext_pipeline()
    _gguf_blocks(pipe.transformer)
    inject_random_lorweb(pipe.transformer)
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    lp = LoRWeBKontextPipeline(pipe, AnalogyEncoder(tmp_path / "clip"), resolution="native", long_edge=64)
    lp.set_progress_bar_config(disable=True)
    assert (generate_random_analogy(lp, 0, merge="auto") == generate_random_analogy(lp, 0, merge="none")).all()
    for strategy in ("full", "offload", "jit"):
        with pytest.raises(TypeError, match="GGUFLinear"):
            generate_random_analogy(lp, 0, merge=strategy)
    lp.set_analogy(*random_analogy(0))
    with pytest.raises(TypeError, match="GGUFLinear"):
        lp.fuse_lora()
    assert lp.num_fused_loras == 0


def test_gguf_dequantize_after_injection_keeps_the_wrapped_base_frozen(gguf_file):
    """transformer.dequantize() after inject_lorweb: the outputs stay the same, and the wrapped base layers (now
    plain nn.Linear) stay frozen, as LoRWeBLinear promises for its base."""
    from packaging.version import Version

    if Version(diffusers.__version__) < Version("0.41") and not torch.cuda.is_available():
        pytest.skip("diffusers < 0.41's GGUF dequantize() moves a CPU model to torch.accelerator's current device, "
                    "CUDA on a CUDA build of torch even without a GPU")
    model = _load_gguf(gguf_file)
    inject_random_lorweb(model)
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        lf.set_query(model, _query())
        before = model(**inputs).sample
    model.dequantize()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).sample, before, atol=1e-5)
    assert all(type(layer.base_layer) is nn.Linear for layer in lf.lorweb_layers(model).values())
    assert not any(layer.base_layer.weight.requires_grad for layer in lf.lorweb_layers(model).values())


def test_quantization_kind_tells_gguf_from_bitsandbytes(gguf_file):
    """A diffusers GGUF transformer is not reported as bitsandbytes, and a pipeline holding one is refused for
    quantize_base="int8" (which means bitsandbytes LLM.int8)."""
    model = _load_gguf(gguf_file)
    assert training.quantization_kind(model) == "gguf"
    with pytest.raises(ValueError, match="quantize_base='int8'"):
        training._check_given_quantization(types.SimpleNamespace(transformer=model), "int8")


# ----------------------------------------------------------------------------------------------------- torchao
def _torchao_configs():
    tq = pytest.importorskip("torchao.quantization")
    return {"int8wo": tq.Int8WeightOnlyConfig, "fp8wo": tq.Float8WeightOnlyConfig}


def _torchao_model(kind="int8wo", dtype=torch.float32, seed=0):
    """The tiny transformer with every nn.Linear quantized by ``torchao.quantization.quantize_`` (as diffusers'
    TorchAoConfig does), before any injection."""
    quantize_ = pytest.importorskip("torchao.quantization").quantize_

    model = _tiny(seed, dtype)
    quantize_(model, _torchao_configs()[kind]())
    return model


def _quantized_weight(t):
    return type(t) not in (nn.Parameter, torch.Tensor) and hasattr(t, "dequantize")


@pytest.mark.parametrize("kind", ["int8wo", "fp8wo"])
def test_torchao_quantize_then_inject_every_layer_is_base_plus_delta(kind):
    """torchao int8 / float8 weight-only quantization (both run on CPU), then inject_lorweb: the layers wrap the
    quantized linears (fp32 LoRWeB tensors), take the delta-only path, and every layer returns base(x) + the float64
    mixture; the whole model equals the dequantized model plus the mixture (unquantized float copy as control)."""
    model = _torchao_model(kind)
    inject_random_lorweb(model)
    layers = lf.lorweb_layers(model)
    assert len(layers) == 20
    assert all(_quantized_weight(layer.base_layer.weight) for layer in layers.values())
    assert not has_plain_weight(next(iter(layers.values())).base_layer)
    assert all(layer.lora_A.dtype == torch.float32 for layer in layers.values())
    with torch.no_grad():
        lf.set_query(model, _query())
    _assert_every_layer_is_base_plus_delta(model)


def test_torchao_bf16_model_runs_in_bf16():
    """A bf16 transformer quantized by torchao int8 weight-only: fp32 LoRWeB masters, bf16 outputs equal to
    base(x) + the mixture within bf16 rounding."""
    model = _torchao_model("int8wo", torch.bfloat16)
    inject_random_lorweb(model)
    with torch.no_grad():
        lf.set_query(model, _query())
        assert model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                        for k, v in tiny_flux_inputs().items()}).sample.dtype == torch.bfloat16
    _assert_every_layer_is_base_plus_delta(model, dtype=torch.bfloat16, rtol=2e-2)


def test_torchao_diffusers_torchaoconfig_loading(tmp_path):
    """diffusers' own path (``from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))``,
    torchao >= 0.15 for diffusers 0.42): inject, every layer base(x) + delta, merges refused."""
    configs = _torchao_configs()
    _tiny().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            tmp_path, torch_dtype=torch.float32,
            quantization_config=diffusers.TorchAoConfig(configs["int8wo"]())).eval()
    inject_random_lorweb(model)
    assert all(_quantized_weight(layer.base_layer.weight) for layer in lf.lorweb_layers(model).values())
    with torch.no_grad():
        lf.set_query(model, _query())
    _assert_every_layer_is_base_plus_delta(model)
    _assert_merges_refused(model, "no plain tensor weight")


def test_torchao_training_step_reaches_only_lorweb():
    """A training step on the torchao int8 transformer: every LoRWeB tensor gets a gradient, nothing else, and the
    int8 data is unchanged after the optimizer step."""
    model = _torchao_model("int8wo")
    inject_random_lorweb(model)
    before = _base_bytes(model)
    _assert_only_lorweb_gets_gradients(_training_step(model), model)
    after = _base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_torchao_merges_and_fuse_lora_are_refused():
    """merged() under every strategy and fuse_lora refuse torchao bases before anything changes."""
    model = _torchao_model("int8wo")
    inject_random_lorweb(model)
    _assert_merges_refused(model, "no plain tensor weight")


def test_torchao_merge_refusal_names_the_quantized_weight_type():
    """The merge refusal for a torchao base names the torchao weight's type (the module is a stock nn.Linear)."""
    model = _torchao_model("int8wo")
    inject_random_lorweb(model)
    with torch.no_grad():
        lf.set_query(model, _query(1))
    weight_type = type(next(iter(lf.lorweb_layers(model).values())).base_layer.weight).__name__
    with pytest.raises(TypeError, match=weight_type):
        with flux.merged(model, "full"):
            pass


def test_torchao_save_and_load_of_lorweb_weights(tmp_path):
    """save_lorweb_weights from a torchao transformer, load_lorweb_weights into a fresh one: the same tensors and
    outputs."""
    model = _torchao_model("int8wo")
    inject_random_lorweb(model)
    _assert_save_load_roundtrip(model, _torchao_model("int8wo"), tmp_path / "lorweb.safetensors")


def _quantized_after_injection(kind="int8wo"):
    """The tiny transformer with LoRWeB injected, then torchao's ``quantize_`` over the whole model: it quantizes
    every nn.Linear's weight in place of the module, att_lora_to_q's included (the module stays an nn.Linear)."""
    quantize_ = pytest.importorskip("torchao.quantization").quantize_

    model = _tiny()
    inject_random_lorweb(model)
    quantize_(model, _torchao_configs()[kind]())
    return model


def _saved_other_lorweb(path):
    other = _tiny()
    inject_random_lorweb(other, seed=5)
    lf.save_lorweb_weights(other, path)
    return path


@pytest.mark.parametrize("what", ["set_query", "save", "load"])
def test_torchao_quantize_after_injection_is_refused_clearly(what, tmp_path):
    """torchao quantization of the whole model after inject_lorweb: set_query, save_lorweb_weights and
    load_lorweb_weights are refused with the ValueError naming att_lora_to_q (as for quanto's QLinear)."""
    model = _quantized_after_injection()
    calls = {"set_query": lambda: lf.set_query(model, _query()),
             "save": lambda: lf.save_lorweb_weights(model, tmp_path / "x.safetensors"),
             "load": lambda: lf.load_lorweb_weights(model, _saved_other_lorweb(tmp_path / "o.safetensors"))}
    with pytest.raises(ValueError, match="att_lora_to_q"):
        with torch.no_grad():
            calls[what]()


def test_torchao_quantize_after_injection_failed_load_changes_nothing(tmp_path):
    """Whatever the error, a load into a model quantized after injection leaves its LoRWeB tensors as they were
    (no partial load)."""
    model = _quantized_after_injection()
    path = _saved_other_lorweb(tmp_path / "o.safetensors")
    before = {name: {k: (v.dequantize() if _quantized_weight(v) else v).detach().clone()
                     for k, v in layer.lorweb_tensors().items()} for name, layer in lf.lorweb_layers(model).items()}
    with pytest.raises(ValueError, match="att_lora_to_q weight is a"):
        lf.load_lorweb_weights(model, path)
    for name, layer in lf.lorweb_layers(model).items():
        for k, v in layer.lorweb_tensors().items():
            assert torch.equal(v.dequantize() if _quantized_weight(v) else v, before[name][k]), (name, k)


def test_torchao_float8_after_injection_per_forward_is_refused():
    """set_query(..., per_forward=True) on a model float8-quantized after injection is refused naming att_lora_to_q,
    as set_query without per_forward is for quanto."""
    model = _quantized_after_injection("fp8wo")
    layer = next(iter(lf.lorweb_layers(model).values()))
    assert not layer.att_lora_to_q.weight.requires_grad  # what quantize_ did to the trainable projection
    with pytest.raises(ValueError, match="att_lora_to_q"):
        lf.set_query(model, _query(), per_forward=True)
        model(**tiny_flux_inputs())


def test_torchao_quantizing_only_the_wrapped_bases_after_injection_works():
    """quantize_ restricted to the LoRWeB layers' base layers after injection (att_lora_to_q left alone): set_query
    works, the layers switch to the delta-only path and return base(x) + the mixture, and merges are refused."""
    quantize_ = pytest.importorskip("torchao.quantization").quantize_

    model = _tiny()
    inject_random_lorweb(model)
    quantize_(model, _torchao_configs()["int8wo"](), filter_fn=lambda m, fqn: fqn.endswith(".base_layer"))
    layers = lf.lorweb_layers(model)
    assert all(_quantized_weight(layer.base_layer.weight) for layer in layers.values())
    assert not any(_quantized_weight(layer.att_lora_to_q.weight) for layer in layers.values())
    with torch.no_grad():
        lf.set_query(model, _query())
    _assert_every_layer_is_base_plus_delta(model)
    _assert_merges_refused(model, "no plain tensor weight")


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_quantizing_while_fused_then_unfuse_never_double_counts(strategy):
    """fuse_lora(strategy), torchao quantize_ of the wrapped bases while fused, then unfuse_lora(): "full" and
    "offload" raise naming the quantization (the layers stay marked merged, their output is the fused one: the
    original cannot be put back into a quantized weight); "jit" changed no weight and is back to base(x) + the
    mixture (within the int8 rounding); never the merged weight plus the mixture again."""
    quantize_ = pytest.importorskip("torchao.quantization").quantize_

    model = _tiny()
    inject_random_lorweb(model)
    inputs = tiny_flux_inputs(batch=1)
    with torch.no_grad():
        lf.set_query(model, _query(1))
        want = model(**inputs).sample
    lora_api.fuse_lora(model, strategy)
    quantize_(model, _torchao_configs()["int8wo"](), filter_fn=lambda m, fqn: fqn.endswith(".base_layer"))
    if strategy != "jit":  # the bases hold the merged weights, quantized: refused, the layers stay merged
        with pytest.raises(RuntimeError, match="quantized or replaced while merged"):
            lora_api.unfuse_lora(model)
        assert all(layer._merged for layer in lf.lorweb_layers(model).values())
        return
    lora_api.unfuse_lora(model)
    with torch.no_grad():
        lf.set_query(model, _query(1))
        got = model(**inputs).sample
    assert (got - want).abs().max() < 0.01 * max(1.0, want.abs().max().item())


def test_choose_merge_strategy_does_not_recommend_a_refused_merge():
    """choose_merge_strategy on a model whose LoRWeB bases are all quantized does not answer a strategy that
    merged() refuses: it raises the TypeError naming the layer and the weight type."""
    model = _torchao_model("int8wo")
    inject_random_lorweb(model)
    with torch.no_grad():
        lf.set_query(model, _query(1))
    weight_type = type(next(iter(lf.lorweb_layers(model).values())).base_layer.weight).__name__
    with pytest.raises(TypeError, match=f"no merge strategy .*weight {weight_type}.* run it unmerged"):
        flux.choose_merge_strategy(model)


# ------------------------------------------------------------------- the same rules without torchao or gguf
class _QuantizedStandIn(torch.Tensor):
    """A tensor subclass standing in for a quantized weight (torchao's Int8Tensor, GGUFParameter): a weight of a
    stock nn.Linear that is no plain tensor."""


def _swap_in_stand_in(linear):
    linear.weight = nn.Parameter(linear.weight.detach().clone().as_subclass(_QuantizedStandIn), requires_grad=False)
    assert type(linear.weight) is _QuantizedStandIn


@pytest.mark.parametrize("what", ["set_query", "per_forward", "save", "load"])
def test_a_query_projection_weight_quantized_after_injection_is_refused_by_type(what, tmp_path):
    """att_lora_to_q (a stock nn.Linear) whose weight became a tensor subclass after injection (what torchao's
    quantize_ of the whole model does): set_query (with or without per_forward), saving and loading are refused with
    a ValueError naming att_lora_to_q and the weight's type, before anything changes."""
    model = _tiny()
    inject_random_lorweb(model)
    for layer in lf.lorweb_layers(model).values():
        _swap_in_stand_in(layer.att_lora_to_q)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calls = {"set_query": lambda: lf.set_query(model, _query()),
             "per_forward": lambda: lf.set_query(model, _query(), per_forward=True),
             "save": lambda: lf.save_lorweb_weights(model, tmp_path / "x.safetensors"),
             "load": lambda: lf.load_lorweb_weights(model, _saved_other_lorweb(tmp_path / "o.safetensors"))}
    with pytest.raises(ValueError, match="att_lora_to_q weight is a _QuantizedStandIn"):
        calls[what]()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not (tmp_path / "x.safetensors").exists()


def test_merges_and_the_strategy_choice_name_a_quantized_base_weight():
    """A base nn.Linear with a tensor-subclass weight: every merge strategy and fuse_lora refuse naming the weight
    type, and choose_merge_strategy refuses instead of answering a strategy that merged() refuses."""
    model = _tiny()
    inject_random_lorweb(model)
    for layer in lf.lorweb_layers(model).values():
        _swap_in_stand_in(layer.base_layer)
    _assert_merges_refused(model, r"Linear \(weight _QuantizedStandIn\) has no plain tensor weight")
    with pytest.raises(TypeError, match="no merge strategy .*weight _QuantizedStandIn.* run it unmerged"):
        flux.choose_merge_strategy(model)


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_a_base_quantized_while_fused_is_not_unfused_into_a_double_mixture(strategy):
    """fuse_lora, then a base weight swapped for a tensor subclass holding the merged values (a quantization while
    fused), then unfuse_lora: refused naming it, the layer stays marked merged (its output stays the fused one,
    never the merged weight plus the mixture again); the other layers are restored."""
    model = _tiny()
    inject_random_lorweb(model)
    inputs = tiny_flux_inputs(batch=1)
    with torch.no_grad():
        lf.set_query(model, _query(1))
    lora_api.fuse_lora(model, strategy)
    with torch.no_grad():
        fused_want = model(**inputs).sample
    name, layer = next(iter(lf.lorweb_layers(model).items()))
    _swap_in_stand_in(layer.base_layer)
    with pytest.raises(RuntimeError, match=f"{name}: TypeError: .*quantized or replaced while merged"):
        lora_api.unfuse_lora(model)
    layers = lf.lorweb_layers(model)
    assert layers[name]._merged and not any(l._merged for n, l in layers.items() if n != name)
    with torch.no_grad():  # the other layers unmerged: base + mixture; this one: its merged weight alone
        assert torch.allclose(model(**inputs).sample, fused_want, atol=1e-5)


def test_a_per_forward_query_set_before_a_quantization_of_its_projection_is_refused_at_the_forward():
    """set_query(per_forward=True), then the query projections' weights swapped for a tensor subclass (a
    whole-model quantization after set_query): the next forward raises the ValueError naming att_lora_to_q and the
    weight type instead of computing coefficients from the quantized (and frozen) projection."""
    model = _tiny()
    inject_random_lorweb(model)
    lf.set_query(model, _query(), per_forward=True)
    for layer in lf.lorweb_layers(model).values():
        _swap_in_stand_in(layer.att_lora_to_q)
    with pytest.raises(ValueError, match="att_lora_to_q weight is a _QuantizedStandIn"):
        model(**tiny_flux_inputs())


@pytest.mark.parametrize("tracer", ["export", "make_fx"])
@pytest.mark.filterwarnings("ignore:The tensor attribute .* was assigned during export")  # (set_query's state)
def test_set_query_traces_with_torchs_own_tensor_subclasses(tracer):
    """The query-projection check accepts torch's own tensor subclasses: a step that calls set_query (per_forward
    and not) traces under torch.export (non-strict: FakeTensor parameters) and make_fx over functional_call
    (FunctionalTensor / FakeTensor), and gives the eager output. (The first version of the check refused them as
    'quantized'.)"""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(12, 10))
    lf.inject_lorweb(inner, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=6, target_modules=["0"]))

    class Step(nn.Module):
        def __init__(self, per_forward):
            super().__init__()
            self.inner, self.per_forward = inner, per_forward

        def forward(self, x, q):
            lf.set_query(self.inner, q, per_forward=self.per_forward, check_finite=False)
            return self.inner(x)

    x, q = torch.randn(2, 5, 12), torch.randn(2, 6)
    for per_forward in (False, True):
        step = Step(per_forward)
        with torch.no_grad():
            want = step(x, q)
            if tracer == "export":
                got = torch.export.export(step, (x, q), strict=False).module()(x, q)
            else:
                params = dict(step.named_parameters())
                traced = make_fx(lambda p, x, q: torch.func.functional_call(step, p, (x, q)),
                                 tracing_mode="fake")(params, x, q)
                got = traced(params, x, q)
        torch.testing.assert_close(got, want)
        lf.clear_query(inner)


def test_dequantize_keeps_every_frozen_layer_frozen_not_only_the_wrapped_bases(gguf_file):
    """transformer.dequantize() on a GGUF model where LoRWeB wraps only the attention query projections: every layer
    diffusers replaces (wrapped or not) stays frozen, as inject_lorweb's freeze_base_model left the model; only the
    LoRWeB tensors require grad."""
    from packaging.version import Version

    if Version(diffusers.__version__) < Version("0.41") and not torch.cuda.is_available():
        pytest.skip("diffusers < 0.41's GGUF dequantize() moves a CPU model to CUDA (see above)")
    model = _load_gguf(gguf_file)
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM,
                                            target_modules=r".*attn\.to_q"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        _is_lorweb(n) for n, p in model.named_parameters() if p.requires_grad)
    model.dequantize()
    assert not any(type(m).__name__ == "GGUFLinear" for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(_is_lorweb(n) for n in trainable), [n for n in trainable if not _is_lorweb(n)][:5]


def test_a_model_pickled_with_the_old_guard_name_loads():
    """Whole-model pickles made before the guards were renamed (``_RefusedWhileInjected``) load, and their guard
    still refuses save_pretrained while LoRWeB layers are in."""
    import io

    model = _tiny()
    inject_random_lorweb(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    data = buffer.getvalue()
    old = data.replace(b"_GuardedWhileInjected", b"_RefusedWhileInjected")  # (same length: a valid pickle)
    assert old != data
    loaded = torch.load(io.BytesIO(old), weights_only=False)
    with pytest.raises(TypeError, match="LoRWeB"):
        loaded.save_pretrained("never-written")


# ------------------------------------------------------------------------------- the trainer on GGUF / torchao
@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    from lorweb_fast.testing import tiny_training_assets

    return tiny_training_assets(tmp_path_factory.mktemp("train"), 4)


@pytest.mark.parametrize("kind", ["gguf", "torchao"])
def test_trainer_trains_a_pipeline_quantized_beforehand(train_assets, tmp_path, kind):
    """train(cfg, pipe=pipe) on a pipeline whose block linears were quantized beforehand (GGUF Q8_0 layers swapped
    in by hand; torchao int8 weight-only): the loss is finite, the LoRWeB basis moves and the quantized base data
    stays bit for bit."""
    import math

    from lorweb_fast.testing import tiny_train_config

    pipe = flux.load_kontext_pipeline(train_assets / "pipe")
    transformer = pipe.transformer
    if kind == "gguf":
        pytest.importorskip("gguf")
        _gguf_blocks(transformer)
    else:
        quantize_ = pytest.importorskip("torchao.quantization").quantize_

        quantize_(transformer, _torchao_configs()["int8wo"](),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "transformer_blocks" in fqn)
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    frozen = (weight.qdata if kind == "torchao" else weight.as_tensor()).clone()
    cfg = tiny_train_config(train_assets, tmp_path / "run", steps=2, checkpoint_every=2, optimizer="adamw")
    result = training.train(cfg, pipe=pipe)
    assert math.isfinite(result["loss"])
    layer = transformer.transformer_blocks[0].attn.to_q
    assert layer.lora_B.abs().max() > 0
    weight = layer.base_layer.weight
    assert torch.equal(weight.qdata if kind == "torchao" else weight.as_tensor(), frozen)


# ------------------------------------------------------------------------ Triton's interpreter (one subprocess)
TRITON_SCRIPT = r"""
import sys
import torch
import lorweb_fast as lf

torch.manual_seed(0)
lin = torch.nn.Linear(64, 48)
if sys.argv[1] == "gguf":
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    q8 = gguf.GGMLQuantizationType.Q8_0
    base = GGUFLinear(64, 48, True, compute_dtype=torch.float32)
    base.weight = GGUFParameter(torch.from_numpy(gguf.quants.quantize(lin.weight.detach().numpy(), q8)),
                                quant_type=q8)
    base.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
else:
    from torchao.quantization import quantize_, Int8WeightOnlyConfig

    a = torch.nn.Sequential(lin)
    quantize_(a, Int8WeightOnlyConfig())
    base = a[0]
worst = 0.0
results = {}
for backend in ("torch", "triton"):
    torch.manual_seed(1)
    layer = lf.LoRWeBLinear(base, num_loras=3, rank=4, key_dim=8, query_dim=12, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.set_coefficients(torch.softmax(torch.randn(2, 3), -1))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    results[backend] = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
for t, r in zip(results["triton"], results["torch"]):
    worst = max(worst, ((t - r).abs().max() / r.abs().max().clamp(min=1)).item())
print("WORST", worst)
"""


@pytest.mark.parametrize("kind", ["gguf", "torchao"])
def test_triton_interpreter_delta_only_path_on_gguf_and_torchao_bases(tmp_path, kind):
    """backend='triton' under TRITON_INTERPRET=1 (a subprocess: it must be set before triton is imported) over a
    GGUF Q8_0 and a torchao int8 base: the delta-only path's output and the input / basis gradients equal the torch
    backend's."""
    pytest.importorskip(kind)
    pytest.importorskip("triton")
    script = tmp_path / "triton_check.py"
    script.write_text(textwrap.dedent(TRITON_SCRIPT))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), kind], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = float(done.stdout.split("WORST")[-1])
    assert worst < 1e-5, done.stdout


# ------------------------------------------------------------------- diffusers' BFL fp8r / nvfp4 and QuantoConfig
@pytest.fixture(scope="module")
def bfl_files(tmp_path_factory):
    """{scheme: file} of the seed-0 tiny transformer with its block weights quantized by diffusers' BFL ``fp8r`` and
    ``nvfp4`` helpers (diffusers key names, weight_scale* beside each weight), and its config folder."""
    from safetensors.torch import save_file

    bfl = pytest.importorskip("diffusers.quantizers.bfl.utils")
    root = tmp_path_factory.mktemp("bfl")
    model = _tiny()
    model.save_pretrained(root / "config")
    files = {}
    for scheme in ("fp8r", "nvfp4"):
        state = {}
        for key, value in model.state_dict().items():
            block_weight = "transformer_blocks" in key and key.endswith(".weight")
            if value.dim() == 2 and block_weight and value.shape[1] % 16 == 0:
                prefix = key[:-len("weight")]
                if scheme == "fp8r":
                    state[key], state[prefix + "weight_scale"] = bfl.quantize_fp8r(value)
                else:
                    state[key], state[prefix + "weight_scale"], state[prefix + "weight_scale_2"] = \
                        bfl.quantize_nvfp4(value)
                    state[prefix + "input_scale"] = torch.tensor(1.0)
            else:
                state[key] = value.contiguous()
        files[scheme] = root / f"{scheme}.safetensors"
        save_file(state, files[scheme])
    return root / "config", files


@pytest.mark.parametrize("scheme", ["fp8r", "nvfp4"])
def test_bfl_single_file_quantized_base(bfl_files, scheme):
    """diffusers' BFL quantizer (``BFLQuantizationConfig``, FLUX fp8r / nvfp4 single files; dequantized per forward
    on a CPU): inject, every layer base(x) + delta, merges refused naming the BFL layer class, gradients reach the
    LoRWeB tensors only, and diffusers' dequantize() leaves the wrapped bases frozen."""
    from diffusers.quantizers.quantization_config import BFLQuantizationConfig

    config, files = bfl_files
    model = diffusers.FluxTransformer2DModel.from_single_file(
        str(files[scheme]), config=str(config), torch_dtype=torch.float32,
        quantization_config=BFLQuantizationConfig(compute_dtype=torch.float32)).eval()
    inject_random_lorweb(model)
    cls = type(next(iter(lf.lorweb_layers(model).values())).base_layer).__name__
    assert cls.startswith("BFL")
    with torch.no_grad():
        lf.set_query(model, _query())
    _assert_every_layer_is_base_plus_delta(model)
    _assert_merges_refused(model, cls)
    _assert_only_lorweb_gets_gradients(_training_step(model), model)
    model.dequantize()
    assert not any(layer.base_layer.weight.requires_grad for layer in lf.lorweb_layers(model).values())


def test_diffusers_quantoconfig_int8_base(tmp_path):
    """diffusers' (deprecated) QuantoConfig loading, int8 weights on a CPU: inject, every layer base(x) + delta,
    merges refused naming QLinear."""
    pytest.importorskip("optimum.quanto")
    _tiny().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            tmp_path, torch_dtype=torch.float32,
            quantization_config=diffusers.QuantoConfig(weights_dtype="int8")).eval()
    inject_random_lorweb(model)
    with torch.no_grad():
        lf.set_query(model, _query())
    _assert_every_layer_is_base_plus_delta(model)
    _assert_merges_refused(model, "QLinear")
