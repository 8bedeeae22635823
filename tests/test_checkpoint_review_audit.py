"""Checkpoint save/load defects found by a review of lorweb_fast's checkpoint code (lora_api.py, model.py's
save_lorweb_weights / lorweb_state_dict / load_lorweb_weights): each test fails on the code as reviewed."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorweb_fast as lf
from lorweb_fast.model import LoRWeBCheckpointError
from lorweb_fast.testing import free_port, official_style_checkpoint, pair_config, tiny_lorweb_pair


def stock_pair(seed=0):
    """The base layers of ``tiny_lorweb_pair(seed)`` (6 -> 5 -> 4), without LoRWeB layers, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).eval()


def lorweb_values(model):
    return {k: v.detach().clone() for k, v in lf.lorweb_state_dict(model).items()}


def test_save_from_a_torch_compiled_model_writes_the_official_keys(tmp_path):
    """Now: ``save_lorweb_weights(torch.compile(model), path)`` (the README's ``torch.compile(fullgraph=True, ...)``
    returns a wrapper) writes ``transformer._orig_mod.<module>.*`` keys: a file that neither the official loader
    (it maps keys to the transformer's module paths) nor ``load_lorweb_weights`` on the uncompiled model can read.
    Should: the same keys as the uncompiled model, ``transformer.<module>.*``."""
    model = tiny_lorweb_pair(pair_config(), 0)
    want = set(lf.lorweb_state_dict(model))
    compiled = torch.compile(model, backend="eager")
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(compiled, path)
    assert set(load_file(path)) == want


def test_loading_into_a_torch_compiled_injected_model_replaces_its_weights(tmp_path):
    """Now: a checkpoint of the same shapes loaded into a ``torch.compile``d model (the hot swap that
    ``enable_lora_hotswap``'s message promises needs no recompile) is refused: "unexpected keys transformer.0.*: the
    model has no module '0'" and "missing keys transformer._orig_mod.0.*". Should: the weights are replaced."""
    path = tmp_path / "other.safetensors"
    lf.save_lorweb_weights(tiny_lorweb_pair(pair_config(), 1), path)
    compiled = torch.compile(tiny_lorweb_pair(pair_config(), 0), backend="eager")
    lf.load_lorweb_weights(compiled, path)
    got = lf.lorweb_state_dict(compiled._orig_mod)
    want = load_file(path)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_layers_injected_by_a_load_follow_the_models_eval_mode(tmp_path):
    """Now: ``load_lorweb_weights`` into a model in eval mode swaps in LoRWeBLinear modules in train mode
    (``model.training`` False, ``model[0].training`` True), so a forward with autograd enabled after an analogy set
    under no_grad warns "a training forward (train mode, autograd enabled) ..." on an eval-mode model. Should: each
    new layer takes the training flag of the linear it replaces (as the rest of the model)."""
    path = tmp_path / "official.safetensors"
    official_style_checkpoint(path)
    model = stock_pair()
    lf.load_lorweb_weights(model, path)
    assert [n for n, m in model.named_modules() if m.training] == []


def test_a_load_that_cannot_copy_into_inference_tensors_changes_nothing(tmp_path):
    """Now: layers injected by a load under ``torch.inference_mode()`` hold inference tensors; a later load outside
    it writes the first tensor (transformer.0.lora_A), then fails ("Inplace update to inference tensor outside
    InferenceMode"), and its rollback fails too ("Setting requires_grad=True on inference tensor ..."): the model is
    left half loaded, one tensor from the new checkpoint and the rest from the old. Should: the load either
    succeeds whole or is refused before anything changes, with a message naming inference mode."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    official_style_checkpoint(first, seed=1)
    official_style_checkpoint(second, seed=7)
    model = stock_pair()
    with torch.inference_mode():
        lf.load_lorweb_weights(model, first)
    before = lorweb_values(model)
    try:
        lf.load_lorweb_weights(model, second)
    except Exception as exc:  # refused: nothing may have changed, and the message names the cause
        after = lorweb_values(model)
        assert all(torch.equal(after[k], before[k]) for k in before), "a failed load left the model half changed"
        assert "inference" in str(exc).lower()
    else:
        after, want = lorweb_values(model), load_file(second)
        assert all(torch.equal(after[k], want[k].float()) for k in want)


def test_a_float16_save_that_overflows_names_the_cast(tmp_path):
    """Now: ``save_lorweb_weights(model, path, dtype=torch.float16)`` (the official trainer's save dtype) of a finite
    fp32 model with a value beyond float16's range is refused with "refusing to save 1 LoRWeB tensors that are not
    finite floating-point values ...": the model is finite, the message blames its values. Should: the message
    names the cast (the value overflows float16; save in another dtype)."""
    model = tiny_lorweb_pair(pair_config(), 0)
    with torch.no_grad():
        lf.lorweb_layers(model)["0"].lora_B[0, 0, 0] = 1e5
    with pytest.raises(LoRWeBCheckpointError) as info:
        lf.save_lorweb_weights(model, tmp_path / "w.safetensors", dtype=torch.float16)
    assert "float16" in str(info.value)
    assert not (tmp_path / "w.safetensors").exists()


def test_loading_into_fsdp2_sharded_layers_loads_or_is_refused_by_name(tmp_path, monkeypatch):
    """Now: ``load_lorweb_weights`` into a model whose LoRWeB layers are sharded with FSDP2 (``fully_shard``; the
    parameters are DTensors, which ``lorweb_state_dict`` gathers for saving) passes validation and then fails inside
    ``param.copy_`` with torch's "aten.copy_.default got mixed torch.Tensor and DTensor, need to convert all
    torch.Tensor to DTensor ...". Should: the sharded parameters receive the checkpoint (distributed like them), or
    the load is refused up front with a LoRWeBCheckpointError naming the sharding."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    path = tmp_path / "other.safetensors"
    lf.save_lorweb_weights(tiny_lorweb_pair(pair_config(), 1), path)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_lorweb_pair(pair_config(), 0)
        for layer in lf.lorweb_layers(model).values():
            fully_shard(layer)
        fully_shard(model)
        try:
            lf.load_lorweb_weights(model, path)
        except LoRWeBCheckpointError as exc:
            assert any(word in str(exc) for word in ("FSDP", "shard", "DTensor"))
        else:
            got, want = lf.lorweb_state_dict(model), load_file(path)
            assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        dist.destroy_process_group()


def test_a_load_into_inference_tensors_outside_inference_mode_is_refused_before_anything_changes(tmp_path):
    """Layers built by a load are never inference tensors now (the test above), but a model moved or rebuilt inside
    ``torch.inference_mode()`` can still hold them: a load outside the mode is refused by name, nothing changed;
    inside the mode it loads."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    official_style_checkpoint(first, seed=1)
    official_style_checkpoint(second, seed=7)
    model = stock_pair()
    lf.load_lorweb_weights(model, first)
    layer = lf.lorweb_layers(model)["1"]
    with torch.inference_mode():
        layer.lora_B = nn.Parameter(layer.lora_B.detach().clone(), requires_grad=False)
    assert layer.lora_B.is_inference()
    before = lorweb_values(model)
    with pytest.raises(LoRWeBCheckpointError, match=r"transformer\.1\.\*: the layer's LoRWeB tensors are inference "
                                                    r"tensors .* load inside torch\.inference_mode\(\)"):
        lf.load_lorweb_weights(model, second)
    after = lorweb_values(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.inference_mode():
        lf.load_lorweb_weights(model, second)
    after, want = lorweb_values(model), load_file(second)
    assert all(torch.equal(after[k], want[k].float()) for k in want)


def test_save_from_a_ddp_wrapped_model_writes_the_official_keys(tmp_path, monkeypatch):
    """``DistributedDataParallel`` puts ``module.`` into every module name, as torch.compile puts ``_orig_mod.``: a
    save from the wrapper writes the wrapped model's keys, and a load into it reads them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_lorweb_pair(pair_config(), 0)
        want = set(lf.lorweb_state_dict(model))
        wrapped = torch.compile(DistributedDataParallel(model), backend="eager")
        path = tmp_path / "w.safetensors"
        lf.save_lorweb_weights(wrapped, path)
        assert set(load_file(path)) == want
        other = tmp_path / "other.safetensors"
        lf.save_lorweb_weights(tiny_lorweb_pair(pair_config(), 1), other)
        assert lf.load_lorweb_weights(wrapped, other) == sorted(name.split(".")[1] for name in want if
                                                                  name.endswith("lora_A"))
        got = lf.lorweb_state_dict(model)
        assert all(torch.equal(got[k], v) for k, v in load_file(other).items())
    finally:
        dist.destroy_process_group()


def test_a_model_moved_inside_inference_mode_still_takes_a_load_outside_it(tmp_path):
    """``model.to(dtype)`` inside ``torch.inference_mode()`` (serving code decorated with it) replaces the parameters'
    data with inference tensors that keep their version counters: torch allows writes into them outside the mode,
    and a load there worked before the inference-tensor refusal; it still loads (only tensors created inside the
    mode, which torch refuses to write, are refused)."""
    second = tmp_path / "second.safetensors"
    lf.save_lorweb_weights(tiny_lorweb_pair(pair_config(), 1), second)
    model = tiny_lorweb_pair(pair_config(), 0)
    with torch.inference_mode():
        model.to(torch.bfloat16)
    assert all(t.is_inference() for t in lf.lorweb_state_dict(model).values())
    lf.load_lorweb_weights(model, second)
    after, want = lorweb_values(model), load_file(second)
    assert all(torch.equal(after[k], want[k].to(torch.bfloat16)) for k in want)


def test_blocks_compiled_one_by_one_save_and_load_the_official_keys(tmp_path):
    """Regional compilation by hand (``model[i] = torch.compile(model[i])``) puts each block's layers under
    ``<i>._orig_mod.``: a save wrote those names into the keys (a file only that wrapping could read), and a load of
    an official file into such a model found no module for its keys. Keys are the modules' names without the
    wrappers' ``_orig_mod`` levels, both ways; a stock model with compiled blocks takes an official file too."""
    model = tiny_lorweb_pair(pair_config(), 0)
    want = {k: v.clone() for k, v in lf.lorweb_state_dict(model).items()}
    model[0] = torch.compile(model[0], backend="eager")
    assert any("_orig_mod" in name for name in lf.lorweb_layers(model))
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(model, path)
    saved = load_file(path)
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
    other = tmp_path / "other.safetensors"
    lf.save_lorweb_weights(tiny_lorweb_pair(pair_config(), 1), other)
    assert lf.load_lorweb_weights(model, other) == ["0", "1"]
    got = lf.lorweb_state_dict(model)
    assert all(torch.equal(got[k], v) for k, v in load_file(other).items())

    official = tmp_path / "official.safetensors"
    official_style_checkpoint(official)
    stock = stock_pair()
    stock[1] = torch.compile(stock[1], backend="eager")
    assert lf.load_lorweb_weights(stock, official) == ["0", "1"]
    assert isinstance(stock[0], lf.LoRWeBLinear)  # a compiled leaf linear's wrapper gives way to its LoRWeB layer
    assert isinstance(getattr(stock[1], "_orig_mod", stock[1]), lf.LoRWeBLinear)
    got, want = lf.lorweb_state_dict(stock), load_file(official)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].float()) for k in want)


def test_a_none_projection_layer_whose_identity_was_made_inside_inference_mode_is_refused_by_name(tmp_path):
    """With ``query_projection_type="none"`` the identity ``att_lora_to_q.weight`` is a buffer the load writes in
    again; made inside ``torch.inference_mode()`` (``model.to()`` there replaces buffers with inference tensors that
    keep no version counter), a load outside it failed half way with torch's "Inplace update to inference tensor"
    instead of the named refusal, which covers that buffer too; nothing changes."""
    cfg = dataclasses.replace(pair_config(), query_projection_type="none", key_dim=pair_config().query_dim)
    model = tiny_lorweb_pair(cfg, 0)
    path = tmp_path / "none.safetensors"
    lf.save_lorweb_weights(tiny_lorweb_pair(cfg, 1), path)
    with torch.inference_mode():
        model.to(torch.float64)
    before = lorweb_values(model)
    with pytest.raises(LoRWeBCheckpointError, match="inference tensors created inside torch.inference_mode"):
        lf.load_lorweb_weights(model, path)
    after = lorweb_values(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_failed_load_puts_back_a_compiled_leaf_linear_with_its_wrapper(tmp_path, monkeypatch):
    """A load into a model whose leaf linear is ``torch.compile(nn.Linear)`` swaps the LoRWeB layer in place of the
    wrapper; when the load then fails (out of memory while staging), the attribute gets back what it held, the
    compile wrapper, not the bare linear inside it."""
    from lorweb_fast import model as model_module

    official = tmp_path / "official.safetensors"
    official_style_checkpoint(official)
    stock = stock_pair()
    wrapper = stock[1] = torch.compile(stock[1], backend="eager")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(model_module, "_staged_for_copy", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        lf.load_lorweb_weights(stock, official)
    assert stock[1] is wrapper and isinstance(stock[0], nn.Linear) and not lf.lorweb_layers(stock)
