"""Guards of the checkpoint path (save, load, injection, configuration, checkpoint discovery) that a mutation audit of
lorweb_fast/model.py and lorweb_fast/official_config.py found untested: every refused checkpoint raises the named
error with a message fragment and leaves the model bit-identical (no LoRWeB layer added), every refused save leaves
the files as they were, and the configuration defaults and discovery rules are the official ones."""

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import lorweb_fast as lf
from lorweb_fast import model as lmodel, official_config as oc
from lorweb_fast.model import LoRWeBCheckpointError
from lorweb_fast.testing import rewrite_safetensors, tiny_lorweb_pair, official_style_checkpoint

QUERY_DIM = 6
CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=r"\d")


# ----------------------------------------------------------------------------------------------------- helpers
def tiny_model(seed=0, config=CONFIG):
    """Two injected linear layers (6 -> 5 -> 4), random non-zero basis."""
    return tiny_lorweb_pair(config, seed)


def fresh_model(seed=0):
    """The same base layers without LoRWeB layers (load_lorweb_weights injects them)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).eval()


def bits(t):
    return t.detach().contiguous().view(torch.uint8)


def snapshot(m):
    return ({k: v.detach().clone() for k, v in m.state_dict().items()},
            {n: type(mod) for n, mod in m.named_modules()})


def assert_unchanged(m, snap):
    """state_dict bit-identical (NaN included) and the same modules (no LoRWeB layer added, removed or nested)."""
    state, types = snap
    assert {n: type(mod) for n, mod in m.named_modules()} == types
    now = m.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(bits(now[k]), bits(state[k])), k


def _saved(tmp_path, seed=0, config=CONFIG, name="w.safetensors"):
    path = tmp_path / name
    lf.save_lorweb_weights(tiny_model(seed, config), path)
    return path


def _state(seed=1):
    """An in-memory checkpoint (no metadata) of another tiny model, detached from it."""
    return {k: v.clone() for k, v in lf.lorweb_state_dict(tiny_model(seed)).items()}


def small_config(path, linear=2, **network_kwargs):
    doc = {"job": "extension", "config": {"name": "LoRWeB", "process": [{"type": "sd_trainer", "network": {
        "type": "attlora", "linear": linear, "linear_alpha": linear,
        "network_kwargs": {"loras_num": 3, "lora_keys_dim": 8, "lora_heads": 1, "lora_softmax": True,
                           "mixing_coeffs_type": "mean", "external_query": True, "pooling_type": "avg",
                           "query_projection_type": "linear", "query_mode": "cat-aa'b",
                           "external_query_model": "openai/clip-vit-large-patch14", **network_kwargs}}}]}}
    Path(path).write_text(yaml.safe_dump(doc))
    return path


# ------------------------------------------------------------------------------------ shapes on a fresh model
SHAPE_CASES = {  # module "1": N=3, r=2, in 5, out 4, key_dim 4, query_dim 6
    "lora_B_one_more_lora": ("lora_B", (4, 2, 4), "transformer.1.lora_B has shape (4, 2, 4), expected (3, 2, 4)"),
    "lora_keys_one_more_row": ("lora_keys", (4, 4), "transformer.1.lora_keys has shape (4, 4), expected (3, key_dim)"),
    "att_lora_to_q_one_more_row": ("att_lora_to_q.weight", (5, QUERY_DIM),
                                   "transformer.1.att_lora_to_q.weight has shape (5, 6), expected (4, query_dim)"),
}


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_mismatched_basis_shapes_are_refused_before_injecting(tmp_path, case):
    """A checkpoint whose lora_B or lora_keys holds one basis LoRA more than lora_A, or whose att_lora_to_q has one
    row more than lora_keys has columns, loaded into a model without LoRWeB layers: a LoRWeBCheckpointError naming
    the shape, not a copy error half way through, and no LoRWeB layer is injected."""
    suffix, shape, fragment = SHAPE_CASES[case]
    bad = rewrite_safetensors(_saved(tmp_path), tmp_path / "bad.safetensors",
                   tensors={f"transformer.1.{suffix}": torch.randn(*shape)})
    m = fresh_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError, match=re.escape(fragment)):
        lf.load_lorweb_weights(m, bad)
    assert not lf.lorweb_layers(m)
    assert_unchanged(m, snap)


def test_rank_zero_is_a_checkpoint_error(tmp_path):
    """lora_A (N, in, 0) / lora_B (N, 0, out): refused as a LoRWeBCheckpointError naming N and r, not as the layer
    constructor's plain ValueError; the model is unchanged."""
    path = _saved(tmp_path)
    bad = rewrite_safetensors(path, tmp_path / "bad.safetensors",
                   tensors={"transformer.1.lora_A": torch.randn(3, 5, 0), "transformer.1.lora_B": torch.randn(3, 0, 4)})
    m = fresh_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError, match=re.escape("transformer.1.lora_A has shape (3, 5, 0): N and r "
                                                              "must be at least 1")):
        lf.load_lorweb_weights(m, bad)
    assert not lf.lorweb_layers(m)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("source", ["state_dict", "file"])
def test_att_lora_to_q_in_only_some_modules_is_a_missing_key(tmp_path, source):
    """When some modules have att_lora_to_q weights, the checkpoint is a "linear" one: a module without them is
    missing a key (not silently loaded as query_projection_type="none"); the fresh model is unchanged."""
    state = _state()
    del state["transformer.1.att_lora_to_q.weight"]
    if source == "file":
        save_file(state, str(tmp_path / "partial.safetensors"))
        state = tmp_path / "partial.safetensors"
    m = fresh_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError, match=r"missing key transformer\.1\.att_lora_to_q\.weight"):
        lf.load_lorweb_weights(m, state)
    assert not lf.lorweb_layers(m)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("into", ["fresh", "injected"])
def test_integer_tensors_are_refused(tmp_path, into):
    """An int32 lora_A (values that would copy into the float parameters without error) is refused as a non-float
    dtype; the model is unchanged."""
    path = _saved(tmp_path, seed=1)
    lora_a = load_file(str(path))["transformer.0.lora_A"]
    bad = rewrite_safetensors(path, tmp_path / "bad.safetensors",
                              tensors={"transformer.0.lora_A": (lora_a * 3).to(torch.int32)})
    m = fresh_model() if into == "fresh" else tiny_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError, match=r"transformer\.0\.lora_A has non-float dtype torch\.int32"):
        lf.load_lorweb_weights(m, bad)
    assert_unchanged(m, snap)


def test_keys_inside_an_injected_layer_are_refused():
    """Keys for "<layer>.base_layer.*" (a LoRWeB basis for the linear layer an injected LoRWeB layer wraps) are
    refused as being inside a LoRWeB layer: no LoRWeB layer is nested in another; the model is unchanged."""
    state = _state()
    state.update({k.replace("transformer.0.", "transformer.0.base_layer."): v.clone()
                  for k, v in list(state.items()) if k.startswith("transformer.0.")})
    m = tiny_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError, match=r"transformer\.0\.base_layer\.\*: '0\.base_layer' is inside a "
                                                    "LoRWeB layer"):
        lf.load_lorweb_weights(m, state)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("into", ["fresh", "injected"])
def test_a_stray_key_of_a_module_the_model_lacks_is_unexpected_not_incomplete(into):
    """One stray key ``transformer.foo.lora_A`` (no such module) is named as a module the model lacks, not as a
    module missing its lora_B, lora_keys and projection; a stray non-linear module likewise; the model is
    unchanged."""
    for stray, reason in (("transformer.foo.lora_A", r"the model has no module 'foo'"),
                          ("transformer.lora_A", r"module '' is a Sequential, not a linear layer"),
                          ("transformer.0.weight.lora_A", r"the model has no module '0\.weight'")):
        state = dict(_state(), **{stray: torch.randn(3, 6, 2)})
        m = fresh_model() if into == "fresh" else tiny_model()
        snap = snapshot(m)
        with pytest.raises(LoRWeBCheckpointError) as info:
            lf.load_lorweb_weights(m, state)
        text = str(info.value)
        assert re.search(reason, text) and "(1 problem)" in text, text
        assert "missing key" not in text, text
        assert_unchanged(m, snap)


@pytest.mark.parametrize("field,value", [("activation", "tanh"), ("reduce", "sum"), ("lora_alpha", 4.0),
                                         ("query_projection_type", "none")])
def test_injected_model_refuses_a_checkpoint_of_another_configuration(tmp_path, field, value):
    """A model injected with softmax / mean / scale 1 / linear projection refuses a checkpoint saved with another
    activation, reduction, lora_alpha or projection type (its layers would otherwise compute with the wrong
    settings); the model is unchanged."""
    over = {field: value}
    if field == "query_projection_type":
        over["query_dim"] = CONFIG.key_dim  # "none" feeds the query to the keys directly
    other = lf.LoRWeBConfig(**{**CONFIG.__dict__, **over})
    path = _saved(tmp_path, seed=1, config=other)
    m = tiny_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError, match="but the injected layer has"):
        lf.load_lorweb_weights(m, path)
    assert_unchanged(m, snap)


def test_explicit_lora_alpha_contradicting_the_metadata_scale_conflicts(tmp_path):
    """settings={"lora_alpha": ...} giving another scale than the file's lorweb.lora_alpha_over_rank is a
    configuration conflict naming both (the model is unchanged); an agreeing lora_alpha loads."""
    from lorweb_fast.official_config import LoRWeBConfigError

    path = _saved(tmp_path)  # rank 2, scale 1
    m = fresh_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBConfigError, match=r"conflicting lora_alpha / rank: argument gives 2\.0 but the "
                                                r"checkpoint metadata says 1\.0"):
        lf.load_lorweb_weights(m, path, settings={"lora_alpha": 4.0})
    assert not lf.lorweb_layers(m)
    assert_unchanged(m, snap)
    assert lf.load_lorweb_weights(m, path, settings={"lora_alpha": 2.0}) == ["0", "1"]
    assert {layer.scale for layer in lf.lorweb_layers(m).values()} == {1.0}


# ------------------------------------------------------------------------------------------------------ saving
def test_config_query_settings_are_mirrored_into_the_metadata(tmp_path):
    """save_lorweb_weights(metadata={"lorweb.query_mode": X}, config={"query_mode": Y}): config.yaml and the
    metadata both say Y (the same for pooling_type), so the file loads back without a conflict."""
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(tiny_model(), path, metadata={"lorweb.query_mode": "paa'b", "lorweb.pooling_type": "max"},
                           config={"query_mode": "cat-paa'b", "pooling_type": "avg"})
    meta = lmodel.checkpoint_metadata(path)
    assert (meta["lorweb.query_mode"], meta["lorweb.pooling_type"]) == ("cat-paa'b", "avg")
    written = oc.read_config_yaml(tmp_path / "config.yaml")
    assert (written["query_mode"], written["pooling_type"]) == ("cat-paa'b", "avg")
    resolved = lmodel.resolve_checkpoint_settings(path)
    assert (resolved["query_mode"], resolved["pooling_type"]) == ("cat-paa'b", "avg")
    assert lf.load_lorweb_weights(fresh_model(), path) == ["0", "1"]


@pytest.mark.parametrize("key", lmodel.QUERY_METADATA)
def test_bogus_query_metadata_is_refused_before_writing(tmp_path, key):
    """metadata={"lorweb.query_mode" / "lorweb.pooling_type" / "lorweb.query_source": "bogus"}: a ValueError naming
    the key, and no file is written."""
    with pytest.raises(ValueError, match=re.escape(f"metadata[{key!r}] must be one of")):
        lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors", metadata={key: "bogus"})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fails", ["config.yaml", "weights"])
def test_a_failed_write_keeps_the_previous_files(tmp_path, monkeypatch, fails):
    """Weights, config.yaml and extra files are written to temporary files before any is renamed into place: when
    writing config.yaml's (the first) or the weights' (the last, after the card's) fails, the previous files are
    byte-identical and no temporary file remains."""
    import safetensors.torch

    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(tiny_model(seed=1), path, config={}, extra_files={"README.md": "one"})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert sorted(before) == ["README.md", "config.yaml", "w.safetensors"]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    if fails == "config.yaml":  # while its temporary file is written (the first; the weights' is written last)
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            if "config.yaml" in os.readlink(f"/proc/self/fd/{fd}"):
                os.close(fd)
                disk_full()
            return real_fdopen(fd, *args, **kwargs)

        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        lf.save_lorweb_weights(tiny_model(seed=2), path, config={}, extra_files={"README.md": "two"})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_a_folder_with_other_checkpoints_is_refused_for_a_config_yaml(tmp_path):
    """An official run folder (LoRWeB.safetensors, config.yaml with heads 2 and tanh): saving another model there
    with a config rewrote the config.yaml that LoRWeB.safetensors loads with (it then loaded with softmax and one
    head, silently), and even with the same settings a second final file made loading the folder ambiguous.
    Refused, naming the folder and the other checkpoint, every file as it was; saving the same file name again
    (a folder of its own) and saving without a config are allowed."""
    run = tmp_path / "run"
    cfg = lf.LoRWeBConfig(**{**CONFIG.__dict__, "heads": 2, "activation": "tanh"})
    lf.save_lorweb_weights(tiny_model(seed=1, config=cfg), run / "LoRWeB.safetensors", config={})
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    for model in (tiny_model(seed=2), tiny_model(seed=3, config=cfg)):  # other settings, then the same ones
        with pytest.raises(oc.LoRWeBConfigError, match=re.escape(
                f"refusing to save other.safetensors with a config.yaml into {run}: it holds other checkpoints "
                "(LoRWeB.safetensors), which load with the folder's config.yaml")):
            lf.save_lorweb_weights(model, run / "other.safetensors", config={})
        assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before
    lf.save_lorweb_weights(tiny_model(seed=3, config=cfg), run / "LoRWeB.safetensors", config={})  # its own name
    lf.save_lorweb_weights(tiny_model(seed=2), run / "plain.safetensors")  # no config: the folder's is untouched
    assert oc.read_config_yaml(run / "config.yaml")["heads"] == 2


def test_a_failed_save_removes_the_folder_it_created(tmp_path, monkeypatch):
    """A save that fails while writing into a folder it created leaves no empty folder behind."""
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lf.save_lorweb_weights(tiny_model(), tmp_path / "new" / "w.safetensors", config={})
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError, match="No space left"):  # every folder it made, not only the innermost
        lf.save_lorweb_weights(tiny_model(), tmp_path / "a" / "b" / "c" / "w.safetensors", config={})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fails_at", ["config.yaml", "README.md", "w.safetensors"])
def test_a_failed_rename_puts_back_the_files_renamed_before_it(tmp_path, monkeypatch, fails_at):
    """The files are renamed into place one after another (config.yaml, the card, the weights last): when one
    rename fails, those renamed before it get their previous contents back, so the folder never pairs a new
    config.yaml with old weights; no temporary or kept copy remains. Into a new folder, nothing is left."""
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(tiny_model(seed=1), path, config={}, extra_files={"README.md": "one"})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == fails_at and ".tmp" in os.path.basename(src):
            raise OSError("Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    heads2 = lf.LoRWeBConfig(**{**CONFIG.__dict__, "heads": 2})
    with pytest.raises(OSError, match="Input/output error"):
        lf.save_lorweb_weights(tiny_model(seed=2, config=heads2), path, config={}, extra_files={"README.md": "two"})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    with pytest.raises(OSError, match="Input/output error"):
        lf.save_lorweb_weights(tiny_model(seed=2), tmp_path / "new" / "w.safetensors", config={},
                               extra_files={"README.md": "two"})
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    lf.load_lorweb_weights(fresh_model(), path)  # the folder is consistent: it loads


def _hetero_model(field, value):
    """tiny_model with its second layer re-injected with another num_loras / rank / key_dim."""
    model = tiny_model(seed=1)
    lf.remove_lorweb(model)
    lf.inject_lorweb(model, lf.LoRWeBConfig(**{**CONFIG.__dict__, "target_modules": ["0"]}))
    lf.inject_lorweb(model, lf.LoRWeBConfig(**{**CONFIG.__dict__, field: value, "target_modules": ["1"]}))
    return model


@pytest.mark.parametrize("field,value", [("num_loras", 5), ("rank", 3), ("key_dim", 2)])
def test_layers_of_different_sizes_save_without_a_config_yaml_only(tmp_path, field, value):
    """Each layer loads from its own tensor shapes, so a model whose layers differ in num_loras, rank or key_dim
    round-trips through a plain file (as files of earlier versions did); a config.yaml describes one basis size
    (it recorded the first layer's values, which its own loader then refused), so saving one is refused first,
    nothing written."""
    model = _hetero_model(field, value)
    with pytest.raises(ValueError, match=r"layer 1 has \(num_loras, rank, key_dim\) = .* one config.yaml describes "
                                         r"one basis size"):
        lf.save_lorweb_weights(model, tmp_path / "run" / "w.safetensors", config={})
    assert os.listdir(tmp_path) == []
    lf.save_lorweb_weights(model, tmp_path / "w.safetensors")
    fresh = fresh_model()
    assert lf.load_lorweb_weights(fresh, tmp_path / "w.safetensors") == ["0", "1"]
    got, want = lf.lorweb_state_dict(fresh), lf.lorweb_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_file_holding_fewer_layers_than_it_records_is_partial(tmp_path):
    """Our files record their layer count (lorweb.layers): a file with a layer's tensors removed is refused by name
    instead of injecting only the rest; official files (no count) still load a subset of layers."""
    path = _saved(tmp_path)
    assert lmodel.checkpoint_metadata(path)["lorweb.layers"] == "2"
    meta = dict(lmodel.checkpoint_metadata(path))
    kept = {k: v for k, v in load_file(path).items() if not k.startswith("transformer.1.")}
    partial = tmp_path / "partial.safetensors"
    save_file(kept, partial, metadata=meta)
    fresh = fresh_model()
    snap = snapshot(fresh)
    with pytest.raises(LoRWeBCheckpointError, match=r"records lorweb.layers='2' but the file holds 1 LoRWeB layers: "
                                                    r"a partial or edited file"):
        lf.load_lorweb_weights(fresh, partial)
    assert_unchanged(fresh, snap)
    for odd in ("\u00b2", "-1", " 2", "2.0"):  # not an ASCII count: '²'.isdigit() holds but int('²') raises
        save_file(load_file(path), partial, metadata={**meta, "lorweb.layers": odd})
        with pytest.raises(LoRWeBCheckpointError, match=rf"records lorweb.layers={re.escape(repr(odd))} but"):
            lf.load_lorweb_weights(fresh, partial)
        assert_unchanged(fresh, snap)
    del meta["lorweb.layers"]
    save_file(kept, partial, metadata=meta)
    assert lf.load_lorweb_weights(fresh_model(), partial) == ["0"]
    with pytest.raises(ValueError, match=r"metadata may not set \['lorweb.layers'\]"):
        lf.save_lorweb_weights(tiny_model(), tmp_path / "x.safetensors", metadata={"lorweb.layers": "9"})


@pytest.mark.parametrize("case", ["empty", "extra key", "missing layer", "other shape", "not a tensor", "meta",
                                  "sparse"])
def test_a_given_state_dict_must_hold_the_models_tensors(tmp_path, case):
    """save_lorweb_weights(state_dict=...) writes only the model's LoRWeB tensors in the layers' shapes (anything
    else made a file its own loader refuses): refused by name, an existing file kept byte-identical."""
    model = tiny_model(seed=1)
    path = _saved(tmp_path)
    before = path.read_bytes()
    state = {k: v.detach().clone() for k, v in lf.lorweb_state_dict(model).items()}
    bad = {"empty": {}, "extra key": {**state, "foo": torch.zeros(1)},
           "missing layer": {k: v for k, v in state.items() if not k.startswith("transformer.1.")},
           "other shape": {**state, "transformer.0.lora_A": torch.randn(5, 6, 2)},
           "not a tensor": {**state, "transformer.0.lora_A": state["transformer.0.lora_A"].numpy()},
           "meta": {**state, "transformer.0.lora_A": state["transformer.0.lora_A"].to("meta")},
           "sparse": {**state, "transformer.1.lora_B": state["transformer.1.lora_B"].to_sparse()}}[case]
    fragment = {"empty": r"missing 8 \(e.g. transformer.0.att_lora_to_q.weight\)",
                "extra key": r"unexpected 1 \(e.g. foo\)", "missing layer": r"missing 4 \(e.g. transformer.1.",
                "other shape": r"has shape \(5, 6, 2\) but the layer's tensor has \(3, 6, 2\)",
                "not a tensor": "is a ndarray, not a tensor", "meta": "is on the meta device",
                "sparse": r"\['transformer.1.lora_B'\] has layout torch.sparse_coo: give dense tensors"}[case]
    with pytest.raises(LoRWeBCheckpointError, match=fragment):
        lf.save_lorweb_weights(model, path, state_dict=bad)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    lf.save_lorweb_weights(model, path, state_dict=state)  # the right tensors save


def test_a_sparse_state_dict_is_refused_before_the_model_changes():
    """Found by the session's review: a sparse tensor in a state dict passed the checks and failed inside the copy,
    after the first layers took the new values (a model mixing two checkpoints). Refused by name up front now."""
    model = tiny_model(seed=1)
    before = {k: v.clone() for k, v in lf.lorweb_state_dict(model).items()}
    state = {k: v.detach().clone() for k, v in lf.lorweb_state_dict(tiny_model(seed=2)).items()}
    state["transformer.1.lora_B"] = state["transformer.1.lora_B"].to_sparse()
    with pytest.raises(LoRWeBCheckpointError, match=r"'transformer.1.lora_B' has layout torch.sparse_coo"):
        lf.load_lorweb_weights(model, state)
    assert all(torch.equal(v, before[k]) for k, v in lf.lorweb_state_dict(model).items())


def test_loading_into_tensors_without_values_is_refused(tmp_path):
    """LoRWeB layers injected under torch.device("meta") (or offloaded by sequential CPU offload) cannot take the
    values: copy_ into a meta tensor does nothing, and the load reported success. Refused by name, the model
    unchanged, and their value-less tensors are not saved either; so is a load inside a torch.device("meta")
    context, where the new layers would be created on meta. A base on the meta device alone is fine: its new LoRWeB
    tensors are real and take the values (the base filled later, e.g. load_state_dict(assign=True))."""
    path = _saved(tmp_path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
        lf.inject_lorweb(model, CONFIG)
    modules = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(LoRWeBCheckpointError, match=r"transformer.0.\*: the injected layer's LoRWeB tensors are on "
                                                    r"the meta device .*loading into it would change nothing"):
        lf.load_lorweb_weights(model, path)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    with pytest.raises(ValueError, match=r"LoRWeB tensor lora_A on the meta device .*load or materialize the "
                                         r"weights before saving"):
        lf.save_lorweb_weights(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with torch.device("meta"):
        base_on_meta = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
        with pytest.raises(LoRWeBCheckpointError, match=r"the default device \(a torch.device\('meta'\) context\) "
                                                        r"is on the meta device"):
            lf.load_lorweb_weights(base_on_meta, path)
    assert lf.load_lorweb_weights(base_on_meta, path) == ["0", "1"]
    got, want = lf.lorweb_state_dict(base_on_meta), load_file(path)
    assert all(torch.equal(got[k], want[k]) for k in want)
    base_state = {f"{k.split('.')[0]}.base_layer.{k.split('.', 1)[1]}": v
                  for k, v in fresh_model().state_dict().items()}
    base_on_meta.load_state_dict(base_state, strict=False, assign=True)
    x = torch.randn(2, 6)
    lf.set_query(base_on_meta, torch.randn(2, QUERY_DIM))
    assert torch.isfinite(base_on_meta(x)).all()


@pytest.mark.parametrize("case", ["0-d lora_keys", "float8 file", "numpy value", "settings list"])
def test_odd_checkpoint_values_get_named_errors(tmp_path, case):
    """What crashed inside the loader (IndexError, isfinite not implemented for float8, AttributeError) is a named
    error or, for float8 (a floating-point format), a load of the values cast to the layer's dtype."""
    state = _state()
    fresh = fresh_model()
    snap = snapshot(fresh)
    if case == "float8 file":
        f8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
        assert lf.load_lorweb_weights(fresh, f8) == ["0", "1"]
        got = lf.lorweb_state_dict(fresh)
        assert all(torch.equal(got[k], f8[k].float()) for k in f8)
        return
    if case == "0-d lora_keys":
        call, error, fragment = (lambda: lf.load_lorweb_weights(fresh, {**state, "transformer.1.lora_keys":
                                                                        torch.tensor(1.0)}),
                                 LoRWeBCheckpointError,
                                 r"transformer.1.lora_keys has shape \(\), expected \(3, key_dim\)")
    elif case == "numpy value":
        call, error, fragment = (lambda: lf.load_lorweb_weights(fresh, {**state, "transformer.1.lora_keys":
                                                                        state["transformer.1.lora_keys"].numpy()}),
                                 LoRWeBCheckpointError, r"'transformer.1.lora_keys' is a ndarray, not a torch.Tensor")
    else:
        call, error, fragment = (lambda: lf.load_lorweb_weights(fresh, state, settings=["heads", 2]), TypeError,
                                 "settings must be a dict of LoRWeB settings, got list")
    with pytest.raises(error, match=fragment):
        call()
    assert_unchanged(fresh, snap)


@pytest.mark.parametrize("projection", ["none", "linear"])
def test_the_projection_type_is_written_to_the_metadata(tmp_path, projection):
    """The saved metadata records lorweb.query_projection_type (read back as the checkpoint's setting, e.g. by
    resolve_checkpoint_settings), "none" included, and the file loads back as that type."""
    config = lf.LoRWeBConfig(**{**CONFIG.__dict__, "query_projection_type": projection, "query_dim": CONFIG.key_dim})
    path = _saved(tmp_path, config=config)
    assert lmodel.checkpoint_metadata(path)["lorweb.query_projection_type"] == projection
    resolved = lmodel.resolve_checkpoint_settings(path)
    assert resolved["query_projection_type"] == projection
    assert resolved["sources"]["query_projection_type"] == "the checkpoint metadata"
    m = fresh_model()
    lf.load_lorweb_weights(m, path)
    assert {layer.query_projection_type for layer in lf.lorweb_layers(m).values()} == {projection}


# ------------------------------------------------------------------------------------------------ configuration
def test_config_defaults_are_the_official_release():
    """LoRWeBConfig() is the released FLUX.1-Kontext model (32 LoRAs of rank 4, key_dim 128, one head, softmax,
    mean, linear projection of a 2304-d query: 3 x CLIP ViT-L/14's 768-d embedding, mode cat-aa'b) and agrees with
    official_config.OFFICIAL_DEFAULTS."""
    cfg = lf.LoRWeBConfig()
    assert (cfg.num_loras, cfg.rank, cfg.lora_alpha, cfg.key_dim, cfg.query_dim, cfg.heads, cfg.activation,
            cfg.reduce, cfg.query_projection_type) == (32, 4, None, 128, 2304, 1, "softmax", "mean", "linear")
    for key in ("num_loras", "rank", "key_dim", "heads", "activation", "reduce", "query_projection_type"):
        assert getattr(cfg, key) == oc.OFFICIAL_DEFAULTS[key], key
    assert oc.OFFICIAL_DEFAULTS["lora_alpha"] == cfg.rank  # lora_alpha None: alpha = rank
    assert (oc.OFFICIAL_DEFAULTS["query_mode"], oc.OFFICIAL_DEFAULTS["encoder"]) == (
        "cat-aa'b", "openai/clip-vit-large-patch14")


def test_a_listed_target_matches_whole_dotted_names_only():
    """target_modules=["q"] matches a module named "q" or ending in ".q" (peft), not "attn.to_q": the injection is
    refused as matching no linear layer and the model is unchanged; ["to_q"] and ["attn.to_q"] match it."""
    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(6, 4), "proj": nn.Linear(4, 4)})})

    assert not lmodel.matches_target("attn.to_q", ["q"])
    m = model()
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"target_modules=\['q'\] matches no linear layer of ModuleDict"):
        lf.inject_lorweb(m, lf.LoRWeBConfig(**{**CONFIG.__dict__, "target_modules": ["q"]}))
    assert_unchanged(m, snap)
    for targets in (["to_q"], ["attn.to_q"]):
        assert lf.inject_lorweb(model(), lf.LoRWeBConfig(**{**CONFIG.__dict__, "target_modules": targets})) == [
            "attn.to_q"]


@pytest.mark.parametrize("where", ["argument", "config.yaml"])
@pytest.mark.parametrize("key,field", [("heads", "lora_heads"), ("num_loras", "loras_num"),
                                       ("key_dim", "lora_keys_dim"), ("rank", "linear")])
def test_zero_sizes_are_refused_as_settings(tmp_path, key, field, where):
    """heads / num_loras / key_dim / rank = 0, given as an argument or in config.yaml, is a LoRWeBConfigError asking
    for a positive integer."""
    if where == "argument":
        with pytest.raises(oc.LoRWeBConfigError, match=f"the explicit arguments: {key} must be a positive integer, "
                                                       "got 0"):
            oc.resolve_settings({key: 0})
    else:
        path = small_config(tmp_path / "config.yaml", **{field: 0})
        with pytest.raises(oc.LoRWeBConfigError, match=f"config.yaml: {key} must be a positive integer, got 0"):
            oc.read_config_yaml(path)


@pytest.mark.parametrize("value", [True, "abc", "4", float("nan"), float("inf"), -float("inf"), [4]])
@pytest.mark.parametrize("key", ["rank", "num_loras", "key_dim", "heads"])
def test_a_size_setting_that_is_no_number_is_refused_by_name(key, value):
    """A bool (True passed as 1), a string, NaN, an infinity or a list as a size setting is the LoRWeBConfigError
    naming the source and the key: it was accepted (True), a bare ``int()`` ValueError or an OverflowError (inf),
    which callers catching LoRWeBConfigError missed. 4 and YAML's 4.0 pass."""
    with pytest.raises(oc.LoRWeBConfigError, match=f"the explicit arguments: {key} must be a positive integer, got "):
        oc.resolve_settings({key: value})
    assert oc.resolve_settings({key: 4})[key] == 4 and oc.resolve_settings({key: 4.0})[key] == 4


def test_written_linear_alpha_defaults_to_the_rank(tmp_path):
    """official_config / write_config_yaml for rank 2 without lora_alpha write linear_alpha 2 (alpha = rank, the
    official network), with no warning, and read back without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network = oc.official_config({"rank": 2})["config"]["process"][0]["network"]
        assert (network["linear"], network["linear_alpha"]) == (2, 2)
        assert type(network["linear_alpha"]) is int
        path = oc.write_config_yaml(tmp_path / "config.yaml", {"rank": 2})
        assert oc.read_config_yaml(path)["rank"] == 2
    assert yaml.safe_load(path.read_text())["config"]["process"][0]["network"]["linear_alpha"] == 2


# ------------------------------------------------------------------------------------------ checkpoint discovery
def test_a_truncated_final_file_falls_back_to_the_newest_complete_step(tmp_path):
    """A final LoRWeB.safetensors cut short (a crash while saving) beside complete step files: find_checkpoint
    picks the newest complete step file, with a warning naming the skipped file (never silently)."""
    run = tmp_path / "run"
    run.mkdir()
    official_style_checkpoint(run / "LoRWeB_000000250.safetensors")
    official_style_checkpoint(run / "LoRWeB_000000500.safetensors")
    official_style_checkpoint(run / "full.safetensors")
    blob = (run / "full.safetensors").read_bytes()
    (run / "full.safetensors").unlink()
    (run / "LoRWeB.safetensors").write_bytes(blob[:len(blob) // 2])
    small_config(run / "config.yaml")
    with pytest.warns(UserWarning, match=r"skipped the unreadable checkpoint file\(s\) LoRWeB.safetensors .*using "
                                         r"LoRWeB_000000500.safetensors"):
        assert oc.find_checkpoint(run) == (run / "LoRWeB_000000500.safetensors", run / "config.yaml")
    # a truncated newest step file is named too; with nothing readable left the error names what was skipped
    (run / "LoRWeB_000000500.safetensors").write_bytes(blob[:100])
    with pytest.warns(UserWarning, match=r"LoRWeB.safetensors, LoRWeB_000000500.safetensors .*using "
                                         r"LoRWeB_000000250.safetensors"):
        assert oc.find_checkpoint(run)[0] == run / "LoRWeB_000000250.safetensors"
    (run / "LoRWeB_000000250.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no complete LoRWeB checkpoint .*\(unreadable: LoRWeB.safetensors, "
                                                 r"LoRWeB_000000500.safetensors, LoRWeB_000000250.safetensors\)"):
        oc.find_checkpoint(run)


def test_the_config_beside_the_file_wins_over_the_run_folders(tmp_path):
    """With config.yaml both in the run folder and beside the chosen checkpoint, the one beside the file is used;
    the run folder's is the fallback for a file without its own."""
    run = tmp_path / "run"
    for step in (4, 8):
        (run / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        official_style_checkpoint(run / "checkpoints" / f"step-{step:08d}" / "lorweb.safetensors")
    small_config(run / "config.yaml")
    small_config(run / "checkpoints" / "step-00000008" / "config.yaml", lora_heads=2)
    newest = run / "checkpoints" / "step-00000008" / "lorweb.safetensors"
    assert oc.find_checkpoint(run) == (newest, newest.parent / "config.yaml")
    assert oc.config_beside(newest, run) == newest.parent / "config.yaml"
    older = run / "checkpoints" / "step-00000004" / "lorweb.safetensors"
    assert oc.config_beside(older, run) == run / "config.yaml"


def test_hidden_files_are_never_checkpoints(tmp_path):
    """A complete hidden ".x_000009999.safetensors" (a higher step) is skipped by find_checkpoint and
    pick_checkpoint_name: the visible step file is picked."""
    run = tmp_path / "run"
    run.mkdir()
    official_style_checkpoint(run / "LoRWeB_000000250.safetensors")
    official_style_checkpoint(run / ".x_000009999.safetensors")
    assert oc.find_checkpoint(run)[0] == run / "LoRWeB_000000250.safetensors"
    assert oc.pick_checkpoint_name(sorted(os.listdir(run)), "run") == "LoRWeB_000000250.safetensors"


@pytest.mark.parametrize("broken", ["stray module first", "lora_A missing", "lora_A not 3-D", "r = 0"])
def test_an_explicit_lora_alpha_does_not_hide_the_checkpoints_problems(broken):
    """``settings={"lora_alpha": ...}`` (the scale of an official checkpoint) takes the rank from the tensors: a first
    module without a usable lora_A (a stray key, an incomplete or misshapen module) is named in the one
    LoRWeBCheckpointError, as without the setting, not a KeyError / IndexError / ZeroDivisionError; the model is
    unchanged."""
    state = _state()
    first = sorted(k for k in state if k.endswith(".lora_A"))[0]
    if broken == "stray module first":
        state, reason = {"transformer.foo.lora_keys": torch.randn(3, 4), **state}, "the model has no module 'foo'"
    elif broken == "lora_A missing":
        state, reason = {k: v for k, v in state.items() if k != first}, f"missing key {first}"
    elif broken == "lora_A not 3-D":
        state, reason = {first: torch.randn(6), **{k: v for k, v in state.items() if k != first}}, first
    else:
        state, reason = {first: torch.randn(3, 6, 0), **{k: v for k, v in state.items() if k != first}}, first
    m = fresh_model()
    snap = snapshot(m)
    with pytest.raises(LoRWeBCheckpointError) as info:
        lf.load_lorweb_weights(m, state, settings={"lora_alpha": 4.0})
    assert reason in str(info.value), str(info.value)
    assert_unchanged(m, snap)


# ---------------------------------------------------------------- official-format files adapting fewer layers
def _tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel

    from lorweb_fast.testing import tiny_flux_config

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**tiny_flux_config()).eval()


def _flux_file_without(path, names_to_drop, seed=0):
    """An official-format file (no lorweb_fast metadata) of a tiny FLUX transformer with the default (official)
    targets, without the tensors of the modules in ``names_to_drop``."""
    t = _tiny_flux(seed)
    lf.inject_lorweb(t, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM))
    state = lf.lorweb_state_dict(t)
    save_file({k: v.contiguous() for k, v in state.items()
               if not any(k.startswith(f"transformer.{n}.") for n in names_to_drop)}, str(path))
    return path


def test_an_official_file_adapting_fewer_layers_than_the_official_targets_warns_and_names_one(tmp_path):
    """The official LoRWeB adapts every linear of the transformer blocks (METHOD.md "Where it is applied"): an
    official-format file (no ``lorweb.layers`` count) covering fewer loads, with a warning naming the count and a layer
    left without adapter; a complete file and the same tensors as a state dict (which never records a count) load
    silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = lf.load_lorweb_weights(_tiny_flux(), _flux_file_without(tmp_path / "full.safetensors", []))
    dropped = "single_transformer_blocks.0.proj_out"
    assert dropped in names
    partial = _flux_file_without(tmp_path / "partial.safetensors", [dropped])
    with pytest.warns(UserWarning, match=rf"adapts {len(names) - 1} of the {len(names)} linear layers.*"
                                         rf"1 \(e\.g\. '{re.escape(dropped)}'\) run without an adapter"):
        loaded = lf.load_lorweb_weights(_tiny_flux(), partial)
    assert dropped not in loaded and len(loaded) == len(names) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.load_lorweb_weights(_tiny_flux(), load_file(partial))


def test_an_own_file_trained_on_fewer_targets_loads_without_the_coverage_warning(tmp_path):
    """Our files record their layer count (``lorweb.layers``): a basis trained with narrower ``target_modules`` is
    complete as recorded, so loading it does not warn about the layers it leaves alone."""
    t = _tiny_flux()
    lf.inject_lorweb(t, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM,
                                        target_modules=r"transformer_blocks\.0\.attn\.to_[qkv]"))
    lf.save_lorweb_weights(t, tmp_path / "w.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(lf.load_lorweb_weights(_tiny_flux(), tmp_path / "w.safetensors")) == 3


# ------------------------------------------------------------------------------------ saving: names, layouts, copies
def test_a_successful_save_over_existing_files_leaves_no_kept_copies(tmp_path):
    """The hidden ``.<name>.<random>.kept`` copies of replaced files exist only while a save renames its files: after
    a save over weights, config.yaml and an extra file, the folder holds exactly those three, with the new contents."""
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(tiny_model(seed=1), path, config={}, extra_files={"README.md": "one"})
    lf.save_lorweb_weights(tiny_model(seed=2), path, config={}, extra_files={"README.md": "two"})
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.yaml", "w.safetensors"]
    assert (tmp_path / "README.md").read_text() == "two"
    want = lf.lorweb_state_dict(tiny_model(seed=2))
    assert all(torch.equal(load_file(path)[k], want[k]) for k in want)


def test_a_state_dict_of_strided_tensors_saves_and_round_trips(tmp_path):
    """safetensors refuses non-contiguous tensors: a ``state_dict=`` whose tensors are transposed views (what a
    gathered or re-laid-out copy can hold) is written contiguous, with the same values."""
    model = tiny_model(seed=3)
    strided = {k: v.detach().clone().transpose(0, -1).contiguous().transpose(0, -1)
               for k, v in lf.lorweb_state_dict(model).items()}
    assert not all(v.is_contiguous() for v in strided.values())
    lf.save_lorweb_weights(model, tmp_path / "w.safetensors", state_dict=strided)
    got = load_file(tmp_path / "w.safetensors")
    assert got.keys() == strided.keys() and all(torch.equal(got[k], strided[k]) for k in strided)


def test_an_upper_case_safetensors_extension_saves_and_loads(tmp_path):
    """The extension check ignores case, as the loader and the command line do: W.SAFETENSORS is a weights file."""
    path = tmp_path / "W.SAFETENSORS"
    lf.save_lorweb_weights(tiny_model(seed=4), path)
    assert lf.load_lorweb_weights(fresh_model(), path) == ["0", "1"]


@pytest.mark.parametrize("name", ["w.safetensors", "sub/README.md", "config.yaml"])
def test_extra_files_that_would_clash_are_refused_before_writing(tmp_path, name):
    """An extra file named like the weights (it would be written, then replaced by them), a path rather than a plain
    name, or config.yaml when a config is written is refused, and nothing is written."""
    with pytest.raises(ValueError, match=rf"extra_files: {re.escape(repr(name))} is not a plain file name of its own"):
        lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors", config={}, extra_files={name: "x"})
    assert os.listdir(tmp_path) == []


def test_a_key_without_the_transformer_prefix_is_named_as_it_is(tmp_path):
    """Official keys start with ``transformer.``; a key without it (a file for another component, or a stripped
    prefix) is an unexpected key named in full, not read as a module of the transformer."""
    state = {k.removeprefix("transformer."): v for k, v in lf.lorweb_state_dict(tiny_model()).items()}
    fresh = fresh_model()
    snap = snapshot(fresh)
    with pytest.raises(LoRWeBCheckpointError, match=r"unexpected key 0\.lora_A\b"):
        lf.load_lorweb_weights(fresh, state)
    assert_unchanged(fresh, snap)
