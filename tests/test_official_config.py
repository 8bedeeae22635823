"""The official config.yaml: read (with precedence and conflict errors), written so that the official inference.py
accepts it, fp16 checkpoints with ai-toolkit metadata and ``<name>_<step:09d>.safetensors`` names, checkpoint
discovery, and the training run's outputs (save dtype, metadata, config.yaml, exact resume from fp32 masters)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save, save_file

import lorweb_fast as lf
from lorweb_fast import cli, official_config as oc, training
from lorweb_fast.testing import official_style_checkpoint

# the released model: LoRWeB_default_PROMPTS.yaml with the README's overrides (--linear 4 --linear_alpha 4
# --loras_num 32 --lora_softmax true --query_mode "cat-aa'b"), as ai-toolkit dumps it (BaseTrainProcess
# .save_training_config: yaml.dump(job.raw_config))
OFFICIAL_YAML = """
job: extension
config:
  name: LoRWeB_default_PROMPTS
  process:
  - type: sd_trainer
    training_folder: output
    network:
      type: attlora
      linear: 4
      linear_alpha: 4
      network_kwargs:
        lora_keys_dim: 128
        lora_heads: 1
        mixing_coeffs_type: mean
        external_query: true
        pooling_type: avg
        query_projection_type: linear
        external_query_model: openai/clip-vit-large-patch14
        loras_num: 32
        lora_softmax: true
        query_mode: cat-aa'b
    save:
      dtype: float16
meta:
  name: '[name]'
  version: '1.0'
"""


def official_inference_reads(path):
    """What inference.py ``main`` reads from config.yaml (yaml.safe_load(f)['config'], process[0].network
    .network_kwargs: lora_heads, lora_softmax, mixing_coeffs_type, pooling_type, query_projection_type, query_mode,
    external_query_model compared with its two known encoder names; otherwise no encoder is loaded)."""
    with open(path) as f:
        config = yaml.safe_load(f)["config"]
    kw = config["process"][0]["network"]["network_kwargs"]
    values = {k: kw[k] for k in ("lora_heads", "lora_softmax", "mixing_coeffs_type", "pooling_type",
                                 "query_projection_type", "query_mode")}
    assert kw["external_query_model"] in ("openai/clip-vit-large-patch14", "google/siglip2-base-patch16-224")
    assert isinstance(values["lora_softmax"], bool) and isinstance(values["lora_heads"], int)
    return values


def tiny_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    return m


def small_config(path, **network_kwargs):
    doc = yaml.safe_load(OFFICIAL_YAML)
    net = doc["config"]["process"][0]["network"]
    net["linear"], net["linear_alpha"] = 2, 2
    net["network_kwargs"].update({"loras_num": 3, "lora_keys_dim": 8, **network_kwargs})
    Path(path).write_text(yaml.safe_dump(doc))
    return path


def test_read_official_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(OFFICIAL_YAML)
    assert oc.read_config_yaml(path) == {
        "rank": 4, "num_loras": 32, "key_dim": 128, "heads": 1, "activation": "softmax",
        "reduce": "mean", "query_mode": "cat-aa'b", "pooling_type": "avg", "query_projection_type": "linear",
        "encoder": "openai/clip-vit-large-patch14"}
    path.write_text(OFFICIAL_YAML.replace("lora_softmax: true", "lora_softmax: false"))
    assert oc.read_config_yaml(path)["activation"] == "tanh"
    path.write_text("config: {}\n")
    with pytest.raises(oc.LoRWeBConfigError, match="config.yaml is not an official LoRWeB config"):
        oc.read_config_yaml(path)
    path.write_text(OFFICIAL_YAML.replace("query_mode: cat-aa'b", "query_mode: abc"))
    with pytest.raises(oc.LoRWeBConfigError, match="query_mode must be one of"):
        oc.read_config_yaml(path)


def test_hidden_state_queries_are_refused_by_name(tmp_path):
    """extensions_built_in/flux_kontext.py ``AttLoraLinearAdapter.update_layer`` / ``forward``: with
    ``external_query: false`` a layer's query is its own pooled input tokens (query_dim = in_features), a variant
    lorweb_fast does not implement: a config.yaml saying so is refused by name (it was read as a CLIP config and
    failed later with a projection width mismatch), also when loading a checkpoint beside it; true or absent reads
    as before."""
    path = tmp_path / "config.yaml"
    path.write_text(OFFICIAL_YAML.replace("external_query: true", "external_query: false"))
    with pytest.raises(oc.LoRWeBConfigError, match=r"external_query is false: its layers take their query from "
                                                   r"their own hidden states"):
        oc.read_config_yaml(path)
    path.write_text(OFFICIAL_YAML.replace("external_query: true", "external_query: maybe"))
    with pytest.raises(oc.LoRWeBConfigError, match="external_query must be true or false"):
        oc.read_config_yaml(path)
    path.write_text(OFFICIAL_YAML.replace("        external_query: true\n", ""))
    assert oc.read_config_yaml(path)["encoder"] == "openai/clip-vit-large-patch14"
    official_style_checkpoint(tmp_path / "LoRWeB.safetensors")
    small_config(path, external_query=False)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(oc.LoRWeBConfigError, match="external_query is false"):
        lf.load_lorweb_weights(model, tmp_path / "LoRWeB.safetensors")
    assert not lf.lorweb_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_written_config_is_accepted_by_official_inference(tmp_path):
    settings = {"num_loras": 32, "rank": 4, "key_dim": 128, "heads": 2, "activation": "tanh", "reduce": "sum",
                "query_mode": "caa'b", "pooling_type": "max", "query_projection_type": "linear",
                "encoder": "google/siglip2-base-patch16-224"}
    path = oc.write_config_yaml(tmp_path / "config.yaml", settings, name="run")
    assert official_inference_reads(path) == {"lora_heads": 2, "lora_softmax": False, "mixing_coeffs_type": "sum",
                                              "pooling_type": "max", "query_projection_type": "linear",
                                              "query_mode": "caa'b"}
    back = oc.read_config_yaml(path)
    assert back == settings
    assert yaml.safe_load(path.read_text())["config"]["process"][0]["network"]["linear_alpha"] == 4  # alpha = rank
    assert not list(tmp_path.glob(".*tmp"))


def test_linear_alpha_is_ignored_as_the_official_network_does(tmp_path):
    """NVlabs/LoRWeB toolkit/lora_special.py ``LoRASpecialNetwork.__init__``: a transformer network is in peft format,
    where ``self.alpha = self.lora_dim`` replaces the configured alpha; extensions_built_in/flux_kontext.py
    ``get_peft_kwargs`` loads with ``lora_alpha = r`` when the file stores no alpha. So a config.yaml written by
    ``run.py ... --linear 4`` (yaml ``linear_alpha: 1``) still trains and runs with scale 1."""
    official_style_checkpoint(tmp_path / "LoRWeB.safetensors")
    doc = yaml.safe_load(OFFICIAL_YAML)
    net = doc["config"]["process"][0]["network"]
    net["linear"], net["linear_alpha"] = 2, 1
    net["network_kwargs"].update({"loras_num": 3, "lora_keys_dim": 8})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.warns(UserWarning, match=r"network.linear_alpha=1 is not read: .*alpha = rank = 2 \(scale 1\)"):
        settings = oc.read_config_yaml(tmp_path / "config.yaml")
    assert "lora_alpha" not in settings and settings["rank"] == 2
    model = tiny_model()
    with pytest.warns(UserWarning, match="linear_alpha=1 is not read"):
        lf.load_lorweb_weights(model, tmp_path / "LoRWeB.safetensors")
    assert {layer.scale for layer in lf.lorweb_layers(model).values()} == {1.0}
    # an explicit lora_alpha still applies (and linear_alpha == linear reads without a warning)
    net["linear_alpha"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    model = tiny_model()
    lf.load_lorweb_weights(model, tmp_path / "LoRWeB.safetensors", settings={"lora_alpha": 1.0})
    assert {layer.scale for layer in lf.lorweb_layers(model).values()} == {0.5}
    # writing alpha != rank warns that the official inference.py will not apply it
    with pytest.warns(UserWarning, match="official inference.py ignores network.linear_alpha"):
        oc.official_config({"rank": 4, "lora_alpha": 8})


def test_precedence_and_conflicts():
    r = oc.resolve_settings({"query_mode": "caa'b"}, {"pooling_type": "max"}, {"heads": 2})
    assert (r["query_mode"], r["pooling_type"], r["heads"], r["activation"]) == ("caa'b", "max", 2, "softmax")
    assert r["sources"]["query_mode"] == "argument" and r["sources"]["activation"] == "official default"
    r = oc.resolve_settings({"heads": None}, {"heads": 2}, {"heads": 2})  # agreeing sources; None = not given
    assert r["heads"] == 2 and r["sources"]["heads"] == "config.yaml"
    with pytest.raises(oc.LoRWeBConfigError, match=r"conflicting query_mode: argument says \"caa'b\" but "
                                                   r"config.yaml says \"cat-aa'b\""):
        oc.resolve_settings({"query_mode": "caa'b"}, {"query_mode": "cat-aa'b"})
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting activation: config.yaml says 'tanh' but the "
                                                   "checkpoint metadata says 'softmax'"):
        oc.resolve_settings({}, {"activation": "tanh"}, {"activation": "softmax"})


def test_pooling_conflicts_only_in_the_patch_modes():
    """extensions_built_in/flux_kontext.py ``AttLoraLinearAdapter.forward`` reads ``query_pooling`` only for a query
    taken from the tokens; an external query is reshaped as it is. So two poolings conflict only in the patch
    modes."""
    r = oc.resolve_settings({"pooling_type": "max"}, {"pooling_type": "avg", "query_mode": "cat-aa'b"})
    assert r["pooling_type"] == "max" and r["sources"]["pooling_type"] == "argument"
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting pooling_type: argument says 'max' but config.yaml"):
        oc.resolve_settings({"pooling_type": "max"}, {"pooling_type": "avg", "query_mode": "cat-paa'b"})
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting pooling_type"):
        oc.resolve_settings({"pooling_type": "max", "query_mode": "paa'b3"}, {"pooling_type": "avg"})


def test_official_fp16_checkpoint_loads_with_its_config(tmp_path):
    state = official_style_checkpoint(tmp_path / "LoRWeB_000000250.safetensors")
    small_config(tmp_path / "config.yaml", lora_softmax=False, lora_heads=2, mixing_coeffs_type="sum")
    model = tiny_model()
    names = lf.load_lorweb_weights(model, tmp_path / "LoRWeB_000000250.safetensors")  # config.yaml beside it
    assert names == ["0", "1"]
    layer = model[0]
    assert (layer.activation, layer.heads, layer.reduce, layer.scale, layer.query_dim) == ("tanh", 2, "sum", 1.0, 12)
    torch.testing.assert_close(layer.lora_A, state["transformer.0.lora_A"].to(layer.lora_A.dtype), rtol=0, atol=0)

    # an explicit argument agreeing with the yaml is fine; one contradicting it is an error naming both
    lf.load_lorweb_weights(tiny_model(), tmp_path / "LoRWeB_000000250.safetensors", settings={"heads": 2})
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting heads: argument says 1 but .*config.yaml says 2"):
        lf.load_lorweb_weights(tiny_model(), tmp_path / "LoRWeB_000000250.safetensors", settings={"heads": 1})
    # a config contradicting the tensor shapes
    small_config(tmp_path / "other.yaml", loras_num=5)
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting num_loras: .*other.yaml says 5 but the checkpoint "
                                                   "tensors of transformer.0 have num_loras=3"):
        lf.load_lorweb_weights(tiny_model(), tmp_path / "LoRWeB_000000250.safetensors", tmp_path / "other.yaml")
    # our metadata vs the yaml
    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, target_modules=["0", "1"]))
    lf.save_lorweb_weights(model, tmp_path / "ours" / "w.safetensors")  # softmax in the metadata
    small_config(tmp_path / "ours" / "config.yaml", lora_softmax=False)
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting activation: .*'tanh' but the checkpoint metadata "
                                                   "says 'softmax'"):
        lf.load_lorweb_weights(tiny_model(), tmp_path / "ours" / "w.safetensors")


def official_adapter_output(x, base, tensors, query, *, heads, softmax, reduce):
    """float64 transcription of NVlabs/LoRWeB extensions_built_in/flux_kontext.py ``AttLoraLinearAdapter.forward``
    for an external query: the base layer, then the query reshaped to (B, 1, q) and projected by att_lora_to_q (no
    bias), split into heads of key_dim / heads, logits q k^T / sqrt(head_dim) over the N keys, softmax (SDPA with
    identity values) or tanh, summed (clamped to [0 or -1, 1]) or averaged over heads and queries, and the
    ``einsum("b s i, n i r, b n, n r o -> b s o")`` delta times scaling = lora_alpha / r = 1 (``get_peft_kwargs``
    loads with lora_alpha = r). ``tensors``: lora_A, lora_B, lora_keys, att_lora_to_q.weight as stored."""
    import torch.nn.functional as F

    a, b_, keys, to_q = (tensors[k].double() for k in ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight"))
    x = x.double()
    out = F.linear(x, base.weight.double(), base.bias.double())
    q = query.double().reshape(query.shape[0], 1, -1) @ to_q.t()
    batch, n_queries, _ = q.shape
    head_dim = keys.shape[-1] // heads
    q = q.view(batch, n_queries, heads, head_dim).transpose(1, 2)
    k = keys.view(-1, heads, head_dim).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)
    n = keys.shape[0]
    if softmax:
        eye = torch.eye(n, dtype=q.dtype).expand(batch, heads, -1, -1)
        mix = F.scaled_dot_product_attention(q, k, eye, scale=head_dim ** -0.5)
    else:
        mix = torch.tanh(q @ k.transpose(-2, -1) * head_dim ** -0.5)
    mix = mix.sum(dim=(1, 2)).clamp(min=0 if softmax else -1, max=1) if reduce == "sum" else mix.mean(dim=(1, 2))
    return out + torch.einsum("bsi,nir,bn,nro->bso", x, a, mix, b_) * 1.0


@pytest.mark.parametrize("yaml_kwargs,official", [
    ({}, dict(heads=1, softmax=True, reduce="mean")),
    ({"lora_softmax": False, "lora_heads": 2, "mixing_coeffs_type": "sum"}, dict(heads=2, softmax=False,
                                                                                  reduce="sum"))],
    ids=["softmax-mean-1head", "tanh-sum-2heads"])
def test_official_checkpoint_runs_as_the_official_adapter(tmp_path, yaml_kwargs, official):
    """An official-style fp16 checkpoint with its config.yaml, loaded into a 6 -> 5 -> 4 model: with an external
    query, each layer's output equals the float64 transcription of the official adapter's forward
    (``official_adapter_output``) run on the file's tensors under their stored names, within fp32's tolerance."""
    from safetensors.torch import load_file

    from lorweb_fast.testing import tolerance

    path = tmp_path / "LoRWeB_000000250.safetensors"
    official_style_checkpoint(path)
    small_config(tmp_path / "config.yaml", **yaml_kwargs)
    stored = load_file(str(path))
    model = tiny_model()
    bases = [torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)]
    for base, layer in zip(bases, model):
        base.load_state_dict(layer.state_dict())
    lf.load_lorweb_weights(model, path)
    g = torch.Generator().manual_seed(3)
    x, query = torch.randn(2, 7, 6, generator=g), torch.randn(2, 12, generator=g) * 3
    with torch.no_grad():
        lf.set_query(model, query)
        got = model(x)
    want = x.double()
    for name, base in zip(("0", "1"), bases):
        tensors = {k: stored[f"transformer.{name}.{k}"] for k in ("lora_A", "lora_B", "lora_keys",
                                                                  "att_lora_to_q.weight")}
        want = official_adapter_output(want, base, tensors, query, **official)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err <= tolerance(torch.float32, 64), float(err)


@pytest.mark.parametrize("name,step", [("LoRWeB_000000250.safetensors", 250), ("x_0001000000.safetensors", 1000000),
                                       ("x_0001.safetensors", 1), ("x_00000250.safetensors", 250),
                                       ("LoRWeB.safetensors", None), ("x_123456789.safetensors", None),
                                       ("x_0010.safetensors", None), ("x_000.safetensors", None),
                                       ("x_000000250.safetensors.bak", "skipped")])
def test_step_file_names_follow_the_official_lookup(name, step):
    """Which names are step files: the official inference.py ``main`` folder lookup (``re.search(r'_(000\\d+)\\.
    safetensors', prop)``: three zeros and at least one more digit before the extension; anything else ending in
    .safetensors is a final file)."""
    finals, stepped = oc.checkpoint_candidates([name])
    if step == "skipped":
        assert finals == stepped == []
    elif step is None:
        assert (finals, stepped) == ([name], [])
    else:
        assert (finals, stepped) == ([], [name])
        assert oc._STEP_FILE.match(name)["step"].lstrip("0") == str(step)


def test_find_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    official_style_checkpoint(run / "LoRWeB_000000250.safetensors")
    official_style_checkpoint(run / "LoRWeB_000000500.safetensors")
    (run / "LoRWeB_000000750.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # partial write
    (run / ".LoRWeB_000001000.safetensors").write_bytes(b"")
    small_config(run / "config.yaml")
    with pytest.warns(UserWarning, match="skipped the unreadable checkpoint file\\(s\\) LoRWeB_000000750.safetensors"):
        assert oc.find_checkpoint(run) == (run / "LoRWeB_000000500.safetensors", run / "config.yaml")
    official_style_checkpoint(run / "LoRWeB.safetensors")  # the final save wins (inference.py)
    assert oc.find_checkpoint(run)[0] == run / "LoRWeB.safetensors"
    official_style_checkpoint(run / "other.safetensors")
    with pytest.raises(oc.LoRWeBConfigError, match="several final checkpoints"):
        oc.find_checkpoint(run)
    with pytest.raises(FileNotFoundError, match="no complete LoRWeB checkpoint"):
        oc.find_checkpoint(tmp_path / "run" / "..")  # tmp_path itself holds no safetensors
    # lorweb_fast run folders: checkpoints/step-*/ without a final file
    ours = tmp_path / "ours"
    for step in (4, 8):
        (ours / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        official_style_checkpoint(ours / "checkpoints" / f"step-{step:08d}" / "lorweb.safetensors")
    small_config(ours / "checkpoints" / "step-00000008" / "config.yaml")
    assert oc.find_checkpoint(ours) == (ours / "checkpoints" / "step-00000008" / "lorweb.safetensors",
                                        ours / "checkpoints" / "step-00000008" / "config.yaml")


def test_checkpoint_writes_fp16_aitk_metadata_config_and_masters(tmp_path):
    """BaseSDTrainProcess.save: save dtype float16 by default, metadata name/version/software/training_info;
    BaseTrainProcess.save_training_config: config.yaml beside the weights."""
    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, target_modules=["0", "1"]))
    for layer in lf.lorweb_layers(model).values():
        for p in layer.lorweb_tensors().values():
            p.data = p.data.float() + 1e-4  # values fp16 rounds
    cfg = training.TrainConfig(data="d", out=str(tmp_path), num_loras=3, rank=2, key_dim=8)
    assert cfg.save_dtype == "fp16"
    weights = lf.lorweb_state_dict(model)
    settings = training.checkpoint_settings(cfg, "openai/clip-vit-large-patch14")
    final = training._write_checkpoint(tmp_path, 4, model, weights, {}, {"encoder": "openai/clip-vit-large-patch14"},
                                       2, save_dtype=cfg.save_dtype, settings=settings, name="run")
    with safe_open(str(tmp_path / "lorweb.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert meta["name"] == "run" and meta["version"] == "1.0" and json.loads(meta["training_info"])["step"] == 4
    assert json.loads(meta["software"])["name"] == "ai-toolkit" and meta["lorweb.activation"] == "softmax"
    # update_training_metadata's add_base_model_info_to_meta overwrites flux.1_kontext with its sd_1.5 default
    assert meta["ss_output_name"] == "run" and meta["ss_base_model_version"] == "sd_1.5"
    # add_model_hash_to_meta: sshs_model_hash is the SHA-256 of the tensor data (addnet_hash_safetensors: everything
    # after the 8-byte length and the header), which the written file holds unchanged
    blob = (tmp_path / "lorweb.safetensors").read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    for path in (tmp_path / "config.yaml", final / "config.yaml"):
        assert official_inference_reads(path)["query_mode"] == "cat-aa'b"
    masters = torch.load(final / "trainer_state.pt", weights_only=True)["lorweb_master_weights"]
    assert all(torch.equal(masters[k], weights[k]) for k in weights)
    # the fp16 file loads back (values rounded once)
    other = tiny_model()
    lf.load_lorweb_weights(other, tmp_path / "lorweb.safetensors")
    torch.testing.assert_close(other[0].lora_A, weights["transformer.0.lora_A"].half().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="save_dtype must be one of"):
        training.TrainConfig(data="d", out="o", save_dtype="int8").validate()


def test_checkpoint_training_info_carries_the_epoch(tmp_path):
    """BaseSDTrainProcess.get_training_info: {"step", "epoch"}."""
    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, target_modules=["0", "1"]))
    training._write_checkpoint(tmp_path, 8, model, lf.lorweb_state_dict(model), {}, {}, 2, name="run", epoch=3)
    with safe_open(str(tmp_path / "lorweb.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["training_info"]) == {"step": 8, "epoch": 3}


def test_aitk_model_hashes_match_a_reference(tmp_path):
    """Reference written from toolkit/metadata.py ``add_model_hash_to_meta`` and toolkit/train_tools.py
    ``addnet_hash_safetensors`` / ``addnet_hash_legacy``: the tensors are written with only the ``ss_`` metadata
    (here to a file with ``save_file``); the model hash is the SHA-256 of the bytes after the header, the legacy
    hash the first 8 hex digits of the SHA-256 of the 0x10000 bytes at 0x100000. A state larger than 1.1 MB puts
    data under the legacy window."""
    g = torch.Generator().manual_seed(0)
    tensors = {"transformer.b.lora_A": torch.randn(600, 1000, generator=g).half(),
               "transformer.a.lora_B": torch.randn(7, 5, generator=g)}
    meta = {"ss_output_name": "run", "ss_base_model_version": "sd_1.5", "name": "run", "training_info": "{}"}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"ss_output_name": "run",
                                                                     "ss_base_model_version": "sd_1.5"})
    blob = (tmp_path / "ref.safetensors").read_bytes()
    assert len(blob) > 0x110000
    want = {"sshs_model_hash": hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}
    # computed from a file written with all the metadata (the hashes' placeholders included), as save does
    written = tmp_path / "written.safetensors"
    save_file(tensors, str(written), metadata={**meta, **oc.AITK_HASH_PLACEHOLDERS})
    assert oc.aitk_model_hashes(written, meta) == want
    # entries other than ss_* do not enter the hashes; an ss_ entry moves the legacy window, not the data hash
    assert oc.aitk_model_hashes(written, {**meta, "name": "other"}) == want
    moved = oc.aitk_model_hashes(written, {**meta, "ss_output_name": "a much longer output name"})
    assert moved["sshs_model_hash"] == want["sshs_model_hash"] and moved["sshs_legacy_hash"] != want["sshs_legacy_hash"]
    # a file smaller than the legacy window's offset: the hash of no bytes, as ai-toolkit's slice gives
    small = tmp_path / "small.safetensors"
    save_file({"x": torch.ones(3)}, str(small), metadata={"ss_output_name": "run"})
    assert oc.aitk_model_hashes(small, meta)["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    # the saved file's own metadata holds the hashes of its ss-only serialization
    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, target_modules=["0", "1"]))
    lf.save_lorweb_weights(model, tmp_path / "saved.safetensors", metadata={"ss_output_name": "run"},
                           aitk_hashes=True)
    ref = save({k: v.contiguous() for k, v in lf.lorweb_state_dict(model).items()}, {"ss_output_name": "run"})
    with safe_open(str(tmp_path / "saved.safetensors"), framework="pt") as f:
        saved_meta = f.metadata()
    assert (saved_meta["sshs_model_hash"], saved_meta["sshs_legacy_hash"]) == (
        hashlib.sha256(ref[8 + int.from_bytes(ref[:8], "little"):]).hexdigest(),
        hashlib.sha256(ref[0x100000:0x110000]).hexdigest()[:8])


def test_cli_infer_options():
    args = cli.build_parser().parse_args(["infer", "--a", "a", "--a-prime", "b", "--b", "c", "--prompt", "p",
                                          "--weights", "DIR"])
    assert (args.seed, args.guidance_scale, args.steps, args.resolution, args.max_area, args.max_size,
            args.query_source, args.query_mode, args.config) == (50, 2.5, None, "official", None, None, None,
                                                                 None, None)  # query source: the checkpoint's
    # --steps unset: 28, official (or one per --pipe-arg sigmas)
    from lorweb_fast.validation import resolve_step_count
    assert resolve_step_count(args.steps, {}) == 28
    # --max-area unset: the pipeline's official default, 1024**2 (flux_kontext.py CustomFluxKontextPipeline.__call__)
    # (applied when max_area is None: test_bad_inputs_pipeline.py test_each_resolution_mode_has_its_default)
    from lorweb_fast import flux
    assert flux.DEFAULT_MAX_AREA == 1024 ** 2
    t = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--save-dtype", "bf16",
                                       "--query-mode", "caa'b"])
    assert (t.save_dtype, t.query_mode, t.pooling_type) == ("bf16", "caa'b", "avg")


def test_export_writes_a_config_official_inference_accepts(tmp_path):
    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, heads=2, activation="tanh",
                                            target_modules=["0", "1"]))
    lf.save_lorweb_weights(model, tmp_path / "export" / "mine.safetensors", dtype=torch.float16,
                           config={"query_mode": "caa'b"})
    assert official_inference_reads(tmp_path / "export" / "config.yaml") == {
        "lora_heads": 2, "lora_softmax": False, "mixing_coeffs_type": "mean", "pooling_type": "avg",
        "query_projection_type": "linear", "query_mode": "caa'b"}
    assert oc.read_config_yaml(tmp_path / "export" / "config.yaml")["num_loras"] == 3
    found = oc.find_checkpoint(tmp_path / "export")
    assert found == (tmp_path / "export" / "mine.safetensors", tmp_path / "export" / "config.yaml")
    resolved = lf.model.resolve_checkpoint_settings(found[0])
    assert (resolved["query_mode"], resolved["heads"], resolved["activation"]) == ("caa'b", 2, "tanh")
    other = tiny_model()
    lf.load_lorweb_weights(other, found[0])
    assert (other[0].heads, other[0].activation) == (2, "tanh")
    with pytest.raises(oc.LoRWeBConfigError, match="config heads=1 contradicts the model's layers"):
        lf.save_lorweb_weights(model, tmp_path / "bad" / "x.safetensors", config={"heads": 1})
    assert not (tmp_path / "bad" / "x.safetensors").exists() and not (tmp_path / "bad" / "config.yaml").exists()


def test_explicit_encoder_overrides_the_named_one_but_other_conflicts_raise():
    """An explicit encoder is a location (a local copy of the checkpoint's hub id), so it wins without a conflict;
    any other explicit setting that contradicts config.yaml or the metadata still raises naming both values."""
    from lorweb_fast.official_config import LoRWeBConfigError, resolve_settings

    meta = {"encoder": "openai/clip-vit-large-patch14", "query_mode": "cat-aa'b"}
    got = resolve_settings({"encoder": "/local/clip"}, {}, meta)
    assert got["encoder"] == "/local/clip" and got["sources"]["encoder"] == "argument"
    with pytest.raises(LoRWeBConfigError, match="conflicting query_mode"):
        resolve_settings({"query_mode": "caa'b"}, {}, meta)
    with pytest.raises(LoRWeBConfigError, match="conflicting encoder"):
        resolve_settings({}, {"encoder": "google/siglip2-base-patch16-224"}, meta)


def test_query_source_comes_from_the_checkpoint(tmp_path):
    """Training records lorweb.query_source; inference uses it by default ("grid" when absent) and an explicit
    value that contradicts it raises naming both."""
    from lorweb_fast.flux import resolve_query_source

    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, target_modules=r"\d"))
    lf.save_lorweb_weights(model, tmp_path / "images.safetensors", metadata={"lorweb.query_source": "images"})
    lf.save_lorweb_weights(model, tmp_path / "plain.safetensors")
    assert resolve_query_source(tmp_path / "images.safetensors") == "images"
    assert resolve_query_source(tmp_path / "plain.safetensors") == "grid"
    assert resolve_query_source(tmp_path / "plain.safetensors", "images") == "images"
    with pytest.raises(ValueError, match="conflicting query_source"):
        resolve_query_source(tmp_path / "images.safetensors", "grid")


def official_network_state_keys(transformer) -> list[str]:
    """The state_dict keys of the official network on ``transformer``, transcribed from NVlabs/LoRWeB:
    toolkit/lora_special.py ``LoRASpecialNetwork.__init__`` / ``create_modules`` (for every module whose class name
    is in FluxKontextModel.target_lora_modules, every descendant whose class name is in toolkit/models/AttLoRA.py
    ``LINEAR_MODULES``; lora_name = "." join of [prefix, name, child_name] without blanks, prefix "transformer"
    (is_transformer, peft_format forced), dots replaced by "$$"; with ``transformer_only`` (NetworkConfig default
    True), no get_transformer_block_names() and a root that has ``transformer_blocks``, names without
    "transformer_blocks" are skipped) and toolkit/kohya_lora.py ``apply_to`` (``add_module(lora.lora_name, lora)``);
    an AttLoRAModule holds the buffer ``alpha`` and the parameters lora_down, lora_up, lora_keys, att_lora_to_q."""
    linear_modules = ("Linear", "LoRACompatibleLinear")
    target_modules = ("FluxTransformer2DModel", "CustomFluxTransformer2DModel")
    keys = []
    for name, module in transformer.named_modules():
        if type(module).__name__ not in target_modules:
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ not in linear_modules:
                continue
            lora_name = ".".join(x for x in ["transformer", name, child_name] if x and x != "").replace(".", "$$")
            if hasattr(transformer, "transformer_blocks") and "transformer_blocks" not in lora_name:
                continue
            keys += [f"{lora_name}.{p}" for p in ("alpha", "lora_down", "lora_up", "lora_keys",
                                                  "att_lora_to_q.weight")]
    return keys


def official_saved_key(key: str):
    """toolkit/network_mixins.py ``get_state_dict`` (peft_format): ``.alpha`` dropped, lora_down -> lora_A,
    lora_up -> lora_B, "$$" -> "."; None for a dropped key."""
    if key.endswith(".alpha"):
        return None
    return key.replace("lora_down", "lora_A").replace("lora_up", "lora_B").replace("$$", ".")


def official_load_key(key: str) -> str:
    """toolkit/network_mixins.py ``load_weights`` (peft_format): a file key back to the network's state_dict key."""
    key = key.replace("lora_A", "lora_down").replace("lora_B", "lora_up").replace(".", "$$")
    key = key.replace("$$lora_down$$", ".lora_down.").replace("$$lora_up$$", ".lora_up.")
    key = key.replace("$$lora_down", ".lora_down").replace("$$lora_up", ".lora_up")
    key = key.replace("$$heads_out_mat", ".heads_out_mat").replace("$$lora_keys", ".lora_keys")
    key = key.replace("$$att_lora_to_q$$", ".att_lora_to_q.")
    for i in range(10):
        key = key.replace(f"att_lora_to_q.{i}$$", f"att_lora_to_q.{i}.")
    return key.replace(".att_lora_to_q.pre_proj$$", ".att_lora_to_q.pre_proj.")


def test_checkpoint_keys_of_the_tiny_flux_follow_ai_toolkit_naming(tmp_path):
    """On the tiny FluxTransformer2DModel, lorweb_fast writes exactly the keys the official network saves (derived
    from ai-toolkit's module naming, not written by hand), every one of them maps back onto the official network's
    state_dict by the official loader, and a file written with those keys (official layout, fp16) loads."""
    from diffusers import FluxTransformer2DModel

    from lorweb_fast.testing import tiny_flux_config

    n, r, key_dim, query_dim = 3, 2, 8, 12
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**tiny_flux_config())
    network_keys = official_network_state_keys(transformer)
    official_keys = [k for k in map(official_saved_key, network_keys) if k is not None]
    assert len(official_keys) == 4 * 20  # 14 linears of the double block + 6 of the single block
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A" in official_keys

    lf.inject_lorweb(transformer, lf.LoRWeBConfig(num_loras=n, rank=r, key_dim=key_dim, query_dim=query_dim))
    lf.save_lorweb_weights(transformer, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        written = set(f.keys())
    assert written == set(official_keys) == set(lf.lorweb_state_dict(transformer))
    assert {official_load_key(k) for k in written} == {k for k in network_keys if not k.endswith(".alpha")}

    # an official file: those keys, fp16, official shapes (lora_down (N, in, r), lora_up (N, r, out))
    base = {name: module for name, module in FluxTransformer2DModel(**tiny_flux_config()).named_modules()}
    g = torch.Generator().manual_seed(4)
    state = {}
    for key in official_keys:
        path = key.removeprefix("transformer.")
        suffix = next(x for x in ("att_lora_to_q.weight", "lora_A", "lora_B", "lora_keys") if path.endswith("." + x))
        linear = base[path[:-len(suffix) - 1]]
        shape = {"lora_A": (n, linear.in_features, r), "lora_B": (n, r, linear.out_features),
                 "lora_keys": (n, key_dim), "att_lora_to_q.weight": (key_dim, query_dim)}[suffix]
        state[key] = torch.randn(*shape, generator=g).half()
    save_file(state, str(tmp_path / "official.safetensors"), metadata={"format": "pt"})
    fresh = FluxTransformer2DModel(**tiny_flux_config())
    loaded = lf.load_lorweb_weights(fresh, tmp_path / "official.safetensors")
    assert len(loaded) == 20
    got = lf.lorweb_state_dict(fresh)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k].float()) for k in state)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_checkpoint_folders_follow_the_umask(tmp_path, umask):
    """The atomic writers create their temporary files with mkstemp (0600) and checkpoint folders with mkdtemp
    (0700), and the rename kept those modes: a shared machine's other users could not read a checkpoint or a prepared
    dataset. They now get what a plain open / mkdir gives: 0666 / 0777 less the umask."""
    import os

    from lorweb_fast import data

    model = tiny_model()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, target_modules=["0", "1"]))
    old = os.umask(umask)
    try:
        lf.save_lorweb_weights(model, tmp_path / "w" / "lorweb.safetensors")
        oc.write_config_yaml(tmp_path / "c" / "config.yaml", {})
        data._atomic_write(tmp_path / "d" / "x.txt", lambda p: p.write_text("x"))
        final = training._write_checkpoint(tmp_path / "run", 4, model, lf.lorweb_state_dict(model), {}, {}, 2)
    finally:
        os.umask(old)
    files = [tmp_path / "w" / "lorweb.safetensors", tmp_path / "c" / "config.yaml", tmp_path / "d" / "x.txt",
             *[p for p in final.iterdir() if p.is_file()], tmp_path / "run" / "lorweb.safetensors"]
    assert len(files) > 4
    for path in files:
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path
    assert oct(final.stat().st_mode & 0o777) == oct(0o777 & ~umask)
