"""Audit: quantized base layers (GGUF, torchao, optimum-quanto, bitsandbytes) COMBINED with diffusers' and
accelerate's offloading while LoRWeB is injected, on CPU (no GPU needed).

Combinations: ``transformer.enable_group_offload`` (block_level / leaf_level in memory, CPU -> CPU, no streams; and
``offload_to_disk_path``), the hook behind ``enable_model_cpu_offload`` (accelerate's ``cpu_offload_with_hook``,
attached directly: diffusers refuses ``enable_model_cpu_offload`` without an accelerator, as
tests/test_inference_api.py does), the one behind ``enable_sequential_cpu_offload`` (accelerate's ``cpu_offload``),
and ``enable_layerwise_casting`` over a quantized model. Each base is quantized BEFORE injection and offloading is
enabled AFTER it (the order the README asks for).

Checked: set_query + forward equal the same model without offload (CPU -> CPU hooks run the same ops in the same
dtype: bit for bit; layerwise casting: every layer equals its hooked base plus the float64 mixture), merges refused
by name with the quantized bytes and coefficients untouched, save / load of the LoRWeB weights, and a training
step's gradients reaching only LoRWeB tensors. Strict xfails mark what is wrong (see /tmp/offload_quant_report.md).
The quantization audit's helpers are reused (loaded from its file).
"""

import warnings
from pathlib import Path

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import flux, lora_api
from lorweb_fast.testing import inject_random_lorweb, load_module_from_file, one_intra_op_thread, tiny_flux_inputs

diffusers = pytest.importorskip("diffusers")
HERE = Path(__file__).parent
qa = load_module_from_file(HERE / "test_quantization_backends_audit.py", "offload_quant_audit_qa")
cq = load_module_from_file(HERE / "test_compile_quantized_audit.py", "offload_quant_audit_cq")

CPU = torch.device("cpu")
KINDS = ["gguf", "torchao_int8", "quanto_qfloat8", "bnb_int8"]
WEIGHT_TYPES = {"gguf": "GGUFParameter", "torchao_int8": "Int8Tensor", "quanto_qfloat8": "WeightQBytesTensor",
                "bnb_int8": "Int8Params"}


@pytest.fixture(autouse=True)
def _one_thread_quiet():
    """Tiny models: one intra-op thread; diffusers' / quanto's deprecation chatter silenced."""
    with one_intra_op_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------------- helpers
def _model(kind, seed=0):
    """The tiny FLUX transformer, its block linears quantized by ``kind`` (every linear for torchao / quanto), then
    LoRWeB injected (random non-zero basis, inject_random_lorweb)."""
    model = qa._tiny(seed)
    if kind == "gguf":
        qa._gguf_blocks(model)
    else:
        cq._quantize_module(kind, model)
    inject_random_lorweb(model)
    return model.eval()


def _offload(model, mode, tmp_path=None):
    if mode == "block_level":
        model.enable_group_offload(CPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
    elif mode == "leaf_level":
        model.enable_group_offload(CPU, offload_device=CPU, offload_type="leaf_level")
    elif mode == "disk":
        model.enable_group_offload(CPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1,
                                   offload_to_disk_path=str(tmp_path / "offload"))
    elif mode == "model":
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(model, execution_device=CPU)
    else:
        raise ValueError(mode)
    return model


def _output(model, seed=3):
    with torch.no_grad():
        lf.set_query(model, qa._query(seed=seed))
        return model(**tiny_flux_inputs()).sample


def _coefficients(model):
    return {n: layer.coefficients.clone() for n, layer in lf.lorweb_layers(model).items()}


def _assert_refused_merges_change_nothing(model, kind):
    """merged() under every strategy and fuse_lora raise the TypeError naming the quantized weight type; the
    quantized bytes, the coefficients and the merge flags stay as they were."""
    before, coeffs = qa._base_bytes(model), _coefficients(model)
    for strategy in flux.MERGE_STRATEGIES:
        with pytest.raises(TypeError, match=f"weight {WEIGHT_TYPES[kind]}\\) has no plain tensor weight"):
            with flux.merged(model, strategy):
                pass
        with pytest.raises(TypeError, match=WEIGHT_TYPES[kind]):
            lora_api.fuse_lora(model, strategy)
        assert lora_api.fused_strategy(model) is None
    after = qa._base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(layer.coefficients, coeffs[n]) for n, layer in lf.lorweb_layers(model).items())
    assert not any(layer._merged or layer._merge_jit for layer in lf.lorweb_layers(model).values())
    with pytest.raises(TypeError, match="run it unmerged"):
        flux.choose_merge_strategy(model)


def _assert_save_load(model, twin, other, path, want):
    """save_lorweb_weights from the offloaded model holds its real LoRWeB tensors (those of ``twin``, the same model
    without offloading); load_lorweb_weights of it into ``other`` (offloaded, other LoRWeB values) gives ``want``."""
    from safetensors.torch import load_file

    reference = {k: v.clone() for k, v in lf.lorweb_state_dict(twin).items()}
    lf.save_lorweb_weights(model, path)
    saved = load_file(path)
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    lf.load_lorweb_weights(other, path)
    torch.testing.assert_close(_output(other), want, rtol=0, atol=0)


def _pair(kind, mode, tmp_path=None):
    """(offloaded model, the same model without offloading, its output)."""
    twin = _model(kind)
    want = _output(twin)
    return _offload(_model(kind), mode, tmp_path), twin, want


# ------------------------------------------------------------------------------ group offloading in memory
@pytest.mark.parametrize("mode", ["block_level", "leaf_level"])
@pytest.mark.parametrize("kind", KINDS)
def test_group_offload_in_memory_over_quantized_bases(kind, mode, tmp_path):
    """Block- and leaf-level group offloading (CPU -> CPU, use_stream=False) over quantized bases: set_query + the
    forward equal the model without offloading bit for bit, merges are refused naming the quantized weight type
    (nothing changed), and the LoRWeB weights save (their real values) and load into another offloaded model."""
    model, twin, want = _pair(kind, mode)
    torch.testing.assert_close(_output(model), want, rtol=0, atol=0)
    _assert_refused_merges_change_nothing(model, kind)
    other = _offload(_model(kind), mode)
    with torch.no_grad():
        for layer in lf.lorweb_layers(other).values():
            layer.lora_B.mul_(-1)  # other LoRWeB values: the load must bring the model's back
    _assert_save_load(model, twin, other, tmp_path / "w.safetensors", want)


@pytest.mark.parametrize("mode", ["block_level", "leaf_level"])
@pytest.mark.parametrize("kind", ["gguf", "torchao_int8", "bnb_int8"])
def test_group_offload_training_step_reaches_only_lorweb(kind, mode):
    """A training step under in-memory group offloading over quantized bases: every LoRWeB tensor gets a gradient,
    nothing else does, and the quantized bytes are unchanged after the optimizer step."""
    model = _offload(_model(kind), mode)
    before = qa._base_bytes(model)
    qa._assert_only_lorweb_gets_gradients(qa._training_step(model), model)
    after = qa._base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="upstream, reproduced WITHOUT LoRWeB (stock quanto model, inputs requiring grad): the "
                          "offload's group_module.to() (diffusers hooks/group_offloading.py:339) cannot swap a "
                          "QLinear weight held by the autograd graph, torch's '_apply(): Couldn't swap "
                          "QLinear.weight'; lorweb_fast (training.py / model.py) does not name the problem")
@pytest.mark.parametrize("mode", ["block_level", "leaf_level"])
def test_group_offload_training_step_over_quanto(mode):
    """A training step under group offloading over optimum-quanto qfloat8 bases works (or is refused clearly)."""
    model = _offload(_model("quanto_qfloat8"), mode)
    qa._assert_only_lorweb_gets_gradients(qa._training_step(model), model)


# ------------------------------------------------------------------------------------- group offloading to disk
@pytest.mark.parametrize("kind", ["gguf", "bnb_int8"])
def test_disk_group_offload_refuses_set_query_loads_and_merges_by_name(kind, tmp_path):
    """offload_to_disk_path over GGUF / bitsandbytes bases: set_query, load_lorweb_weights and every merge raise the
    RuntimeError naming offload_to_disk_path, leaving the coefficients set before offloading as they were."""
    model = _model(kind)
    with torch.no_grad():
        lf.set_query(model, qa._query())
    coeffs = _coefficients(model)
    lf.save_lorweb_weights(_model(kind, seed=1), tmp_path / "w.safetensors")
    _offload(model, "disk", tmp_path)
    with pytest.raises(RuntimeError, match="group-offloaded to disk"):
        lf.set_query(model, qa._query(seed=9))
    with pytest.raises(RuntimeError, match="offload_to_disk_path"):
        lf.load_lorweb_weights(model, tmp_path / "w.safetensors")
    for strategy in flux.MERGE_STRATEGIES:
        with pytest.raises(RuntimeError, match="offload_to_disk_path"):
            with flux.merged(model, strategy):
                pass
    assert all(torch.equal(layer.coefficients, coeffs[n]) for n, layer in lf.lorweb_layers(model).items())


@pytest.mark.parametrize("mode", ["block_level", "leaf_level"])
def test_disk_group_offload_save_is_refused_by_name(mode, tmp_path):
    """save_lorweb_weights (and lorweb_state_dict) on a GGUF model group-offloaded to disk raises the RuntimeError
    naming offload_to_disk_path and writes nothing: outside a group's forward its tensors are diffusers'
    placeholders (the audit found all 80 saved as placeholders with leaf_level, silently)."""
    model = _model("gguf")
    model.enable_group_offload(CPU, offload_device=CPU, offload_type=mode, offload_to_disk_path=str(tmp_path / "d"),
                               **({"num_blocks_per_group": 1} if mode == "block_level" else {}))
    with pytest.raises(RuntimeError, match="save_lorweb_weights: .* offload_to_disk_path"):
        lf.save_lorweb_weights(model, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(RuntimeError, match="offload_to_disk_path"):
        lf.lorweb_state_dict(model)


def test_torchao_disk_group_offload_is_refused_by_diffusers_and_changes_nothing(tmp_path):
    """diffusers refuses offload_to_disk_path for torchao tensors (a clear ValueError); the LoRWeB model then runs as
    before."""
    fresh = _model("torchao_int8")
    want = _output(fresh)
    with pytest.raises(ValueError, match="Disk offloading is not supported for TorchAO"):
        _offload(fresh, "disk", tmp_path)
    torch.testing.assert_close(_output(fresh), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- accelerate: model / sequential
@pytest.mark.parametrize("kind", KINDS)
def test_model_cpu_offload_hook_over_quantized_bases(kind, tmp_path):
    """The hook behind enable_model_cpu_offload (accelerate's cpu_offload_with_hook, CPU -> CPU) over quantized
    bases: same output bit for bit, merges refused with nothing changed, save / load, and a training step whose
    gradients reach only the LoRWeB tensors."""
    model, twin, want = _pair(kind, "model")
    torch.testing.assert_close(_output(model), want, rtol=0, atol=0)
    _assert_refused_merges_change_nothing(model, kind)
    other = _offload(_model(kind, seed=0), "model")
    with torch.no_grad():
        for layer in lf.lorweb_layers(other).values():
            layer.lora_B.mul_(-1)
    _assert_save_load(model, twin, other, tmp_path / "w.safetensors", want)
    qa._assert_only_lorweb_gets_gradients(qa._training_step(model), model)


@pytest.mark.parametrize("kind", ["torchao_int8", "bnb_int8"])
def test_sequential_cpu_offload_over_quantized_bases_is_refused_by_name(kind):
    """accelerate's cpu_offload (enable_sequential_cpu_offload) over torchao / bitsandbytes bases: set_query and
    saving raise the ValueError naming the meta device (and the offload modes that work)."""
    from accelerate import cpu_offload

    model = cpu_offload(_model(kind), execution_device=CPU)
    with pytest.raises(ValueError, match="meta device .*enable_model_cpu_offload"):
        lf.set_query(model, qa._query())
    with pytest.raises(ValueError, match="meta device"):
        lf.lorweb_state_dict(model)


def test_sequential_cpu_offload_failing_on_gguf_then_set_query_names_the_meta_tensors():
    """accelerate's cpu_offload over GGUF bases fails inside diffusers (accelerate re-creates a GGUFParameter without
    its quant_type), after moving some LoRWeB tensors to the meta device; set_query must then raise the ValueError
    naming the meta device, not an error from inside torch."""
    from accelerate import cpu_offload

    model = _model("gguf")
    with pytest.raises(KeyError):
        cpu_offload(model, execution_device=CPU)
    with pytest.raises(ValueError, match="meta device"):
        lf.set_query(model, qa._query())


# --------------------------------------------------------------------------------- layerwise casting (fp8 store)
@pytest.mark.parametrize("kind", ["gguf", "torchao_int8", "bnb_int8"])
def test_layerwise_casting_over_quantized_bases(kind):
    """enable_layerwise_casting(float8 storage, fp32 compute) after injection over quantized bases: the LoRWeB
    tensors stay fp32 (att_lora_to_q skipped), every layer equals its (hooked) base plus the float64 mixture, merges
    are refused with nothing changed, and a training step's gradients reach only the LoRWeB tensors."""
    model = _model(kind)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert all(t.dtype == torch.float32 for layer in lf.lorweb_layers(model).values()
               for t in layer.lorweb_tensors().values())
    with torch.no_grad():
        lf.set_query(model, qa._query())
    qa._assert_every_layer_is_base_plus_delta(model)
    _assert_refused_merges_change_nothing(model, kind)
    qa._assert_only_lorweb_gets_gradients(qa._training_step(model), model)


def test_layerwise_casting_refused_by_quanto_leaves_the_model_working():
    """enable_layerwise_casting over quanto bases is refused by quanto ('The dtype of a weights Tensor cannot be
    changed'); the model then gives the output it gave before."""
    model = _model("quanto_qfloat8")
    want = _output(model)
    with pytest.raises(ValueError, match="dtype of a weights Tensor cannot be changed"):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    torch.testing.assert_close(_output(model), want, rtol=0, atol=0)
