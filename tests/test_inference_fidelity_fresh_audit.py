"""Fresh audit of the fidelity of lorweb_fast's model and inference to the official LoRWeB code (NVlabs/LoRWeB:
inference.py, extensions_built_in/flux_kontext.py, toolkit/models/AttLoRA.py, toolkit/network_mixins.py, run.py,
LoRWeB_default_PROMPTS.yaml, modelcard.md).

The first two tests failed on the audited commit (608abfe; fixed in the fortieth session); the last one pins the
adapted-module set and default shapes against the official model card's parameter count.
"""

from pathlib import Path

import torch
import yaml

import lorweb_fast as lf
from lorweb_fast import official_config as oc
from lorweb_fast.testing import official_style_checkpoint

# an official config.yaml as ai-toolkit dumps it (BaseTrainProcess.save_training_config), sized for
# official_style_checkpoint's tensors (N=3, r=2, key_dim=8, query_dim=12)
_CONFIG = {
    "job": "extension",
    "config": {"name": "LoRWeB", "process": [{"type": "sd_trainer", "network": {
        "type": "attlora", "linear": 2, "linear_alpha": 2,
        "network_kwargs": {"loras_num": 3, "lora_keys_dim": 8, "lora_heads": 1, "lora_softmax": True,
                           "mixing_coeffs_type": "mean", "external_query": True, "pooling_type": "avg",
                           "query_projection_type": "linear", "query_mode": "cat-aa'b",
                           "external_query_model": "openai/clip-vit-large-patch14"}}}]},
}


def _checkpoint_with_config(tmp_path: Path, **network_kwargs) -> Path:
    path = tmp_path / "LoRWeB.safetensors"
    official_style_checkpoint(path)
    doc = yaml.safe_load(yaml.safe_dump(_CONFIG))
    doc["config"]["process"][0]["network"]["network_kwargs"].update(network_kwargs)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    return path


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))


def test_quoted_lora_softmax_string_is_not_silently_read_as_tanh(tmp_path):
    """A config.yaml whose ``lora_softmax`` is the quoted string "false" describes a model the official code trains
    AND runs with softmax: toolkit/models/AttLoRA.py / toolkit/network_mixins.py ``attlora_forward`` and
    extensions_built_in/flux_kontext.py ``AttLoraLinearAdapter.forward`` test ``if lora_softmax:`` (Python truthiness,
    a non-empty string is true), and inference.py ``main`` passes the config value through unchanged (only run.py
    turns its ``--lora_softmax`` option into a bool; a hand-written config keeps the string).
    lorweb_fast/official_config.py ``read_config_yaml`` (``_bool``) reads it as False and loads the layers with
    tanh, silently: the outputs then differ from the official ones. Expected: the official reading (softmax), or a
    LoRWeBConfigError naming lora_softmax (the string is ambiguous) -- never tanh without a word."""
    path = _checkpoint_with_config(tmp_path, lora_softmax="false")
    model = _tiny_model()
    try:
        lf.load_lorweb_weights(model, path)
    except oc.LoRWeBConfigError as exc:
        assert "lora_softmax" in str(exc)
        return
    assert model[0].activation == "softmax", (
        "config.yaml lora_softmax: 'false' (a string) is softmax in the official code, loaded here as "
        f"{model[0].activation!r}")


def test_pooling_type_unused_by_the_query_mode_does_not_refuse_an_official_config(tmp_path):
    """``network_kwargs.pooling_type`` is never used with an external query in the official code (toolkit/models/
    AttLoRA.py ``__init__`` sets ``query_pooling = None`` when ``external_query``; flux_kontext.py
    ``AttLoraLinearAdapter.forward`` pools only the layer's own input), and run.py takes ``--pooling_type`` as any
    string: inference.py runs a checkpoint whose config.yaml says e.g. ``pooling_type: none`` with "cat-aa'b".
    lorweb_fast/official_config.py ``read_config_yaml`` -> ``_validate`` refuses it (LoRWeBConfigError
    "pooling_type must be one of ('avg', 'max')") although lorweb_fast itself uses pooling only in the patch modes
    (``resolve_settings`` already ignores it there for conflicts). Expected: the checkpoint loads with its config,
    and its settings resolve, for a query mode that does not pool."""
    path = _checkpoint_with_config(tmp_path, pooling_type="none")
    model = _tiny_model()
    lf.load_lorweb_weights(model, path)  # raises LoRWeBConfigError now
    assert (model[0].activation, model[0].reduce, model[0].heads) == ("softmax", "mean", 1)
    from lorweb_fast.model import resolve_checkpoint_settings

    settings = resolve_checkpoint_settings(path)
    assert settings["query_mode"] == "cat-aa'b"


def test_pinned_default_targets_and_shapes_match_the_official_parameter_count():
    """PINNED (passes now; at risk if the default targets or shapes drift): modelcard.md states "Number of model
    parameters: 835,051,520". With lorweb_fast's defaults (LoRWeBConfig: N=32, r=4, key_dim=128, query_dim=2304;
    DEFAULT_TARGET_MODULES) on the real FLUX.1-Kontext transformer shapes (19 double / 38 single blocks, width
    3072), every targeted linear costs N*r*(in+out) + N*key_dim + key_dim*query_dim parameters
    (lora_A, lora_B, lora_keys, att_lora_to_q), and the total must be exactly that number (the official AttLoRA
    module set: every nn.Linear inside transformer_blocks / single_transformer_blocks, 494 layers)."""
    from diffusers import FluxTransformer2DModel

    from lorweb_fast.layer import linear_dims
    from lorweb_fast.model import DEFAULT_TARGET_MODULES, _find_targets

    with torch.device("meta"):
        model = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    cfg = lf.LoRWeBConfig()
    names = _find_targets(model, DEFAULT_TARGET_MODULES)
    total = 0
    for name in names:
        in_f, out_f = linear_dims(model.get_submodule(name))
        total += cfg.num_loras * cfg.rank * (in_f + out_f) + cfg.num_loras * cfg.key_dim + cfg.key_dim * cfg.query_dim
    assert len(names) == 494
    assert total == 835_051_520
