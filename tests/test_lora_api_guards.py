"""Guards for lorweb_fast/lora_api.py found by a mutation audit (CPU only, no GPU, nothing downloaded).

The fused-analogy check (``check_fused_query``: "jit" follows every analogy, a nearby analogy is another one, the
fused coefficients are a copy), the strength's refusals and bookkeeping while fused, ``unload_lora_weights`` keeping
the weight Parameters (and their ``requires_grad``), the config.yaml found beside a checkpoint's folder, query
settings that a checkpoint does not record, and ``save_pretrained`` / ``push_to_hub`` / ``resolve_checkpoint`` edge
cases (argument checks first, local folders read at their top only, Hub listings picking a folder two levels
down or naming what is missing). Everything runs on a tiny two-layer ``nn.Sequential``
(``lorweb_fast.testing.tiny_lorweb_pair``); the Hub calls are replaced by recorders.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import lora_api
from lorweb_fast import model as lmodel
from lorweb_fast.model import LoRWeBCheckpointError
from lorweb_fast.testing import official_style_checkpoint, tiny_lorweb_pair

QUERY_DIM = 6
CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=r"\d")


def tiny_model(seed=0, config=CONFIG):
    """Two injected linear layers (6 -> 5 -> 4), random non-zero basis, spread-out keys."""
    return tiny_lorweb_pair(config, seed, key_std=2.0)


def query(b=1, seed=0):
    return torch.randn(b, QUERY_DIM, generator=torch.Generator().manual_seed(seed))


def weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(m, before):
    now = m.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------------- fusing
@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_check_fused_query_tells_a_nearby_analogy_apart(strategy):
    """Fused with "full"/"offload": the fused query (also repeated over a batch) passes, while a query whose
    coefficients differ by more than fp32 rounding (here by a few 1e-3) is another analogy and raises."""
    m = tiny_model()
    q = query()
    with torch.no_grad():
        lf.set_query(m, q)
        lora_api.fuse_lora(m, strategy)
        try:
            lora_api.check_fused_query(m, q)
            lora_api.check_fused_query(m, q.expand(3, -1))
            near = q * 1.01
            layer = next(iter(lf.lorweb_layers(m).values()))
            shift = (layer.coefficients_from_query(near) - layer.coefficients).abs().max()
            assert 1e-3 < shift < 5e-2  # the premise: close, but far beyond fp32 rounding
            with pytest.raises(RuntimeError, match="fused for another analogy"):
                lora_api.check_fused_query(m, near)
        finally:
            lora_api.unfuse_lora(m)


def test_check_fused_query_lets_jit_follow_any_analogy():
    """A "jit" fuse merges the coefficients current at each forward: any new analogy is accepted."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
        lora_api.fuse_lora(m, "jit")
        lora_api.check_fused_query(m, query(2, seed=5))
        lora_api.unfuse_lora(m)


def test_check_fused_query_compares_with_the_coefficients_of_the_fuse():
    """fuse_lora keeps its own copy of the fused coefficients: coefficients handed to set_coefficients and changed in
    place afterwards (a reused buffer) do not make another analogy pass the check, the weights still hold the
    first one."""
    m = tiny_model()
    q, other = query(), query(seed=3)
    layers = lf.lorweb_layers(m)
    with torch.no_grad():
        buffers = {name: layer.coefficients_from_query(q) for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.set_coefficients(buffers[name])
        lora_api.fuse_lora(m, "full")
        try:
            lora_api.check_fused_query(m, q)
            for name, layer in layers.items():
                buffers[name].copy_(layer.coefficients_from_query(other))
            with pytest.raises(RuntimeError, match="fused for another analogy"):
                lora_api.check_fused_query(m, other)
        finally:
            lora_api.unfuse_lora(m)


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_a_strength_change_on_fused_weights_names_the_fuse(strategy):
    """set_lorweb_scale on weights fused with "full"/"offload" is refused naming the fuse and its strategy (not
    only a merged block), and the strength stays."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    lora_api.fuse_lora(m, strategy)
    try:
        with pytest.raises(RuntimeError, match=f"fused into the weights \\(strategy='{strategy}'\\).*unfuse_lora"):
            lora_api.set_lorweb_scale(m, 0.5)
        assert lora_api.get_lorweb_scale(m) == 1.0
    finally:
        lora_api.unfuse_lora(m)


def test_get_lorweb_scale_refuses_layers_at_different_strengths():
    """Strengths set on part of the model cannot be reported as one: the values are named. A numpy or tensor
    scalar is stored as a Python float."""
    m = tiny_model()
    lora_api.set_lorweb_scale(m[0], np.float32(0.5))
    with pytest.raises(ValueError, match=r"different strengths \[0.5, 1.0\]"):
        lora_api.get_lorweb_scale(m)
    for scalar in (np.float32(0.25), torch.tensor(0.25)):
        lora_api.set_lorweb_scale(m, scalar)
        assert type(lora_api.get_lorweb_scale(m)) is float and lora_api.get_lorweb_scale(m) == 0.25


# ----------------------------------------------------------------------------------------------------- unload
def test_unload_after_a_jit_fuse_keeps_the_weight_parameters():
    """Baking a "jit" fuse writes the merged weight into the existing Parameter (the object an optimizer or a tied
    module holds), frozen as it was; layers that shared one Parameter get their own, frozen too."""
    m = tiny_model()
    params = {name: layer.base_layer.weight for name, layer in lf.lorweb_layers(m).items()}
    with torch.no_grad():
        lf.set_query(m, query())
        lora_api.fuse_lora(m, "jit")
        lora_api.unload_lora_weights(m)
    assert all(m.get_submodule(n).weight is p and not p.requires_grad for n, p in params.items())

    tied = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    tied[1].weight = tied[0].weight
    lf.inject_lorweb(tied, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=QUERY_DIM,
                                           target_modules=r"\d"))
    with torch.no_grad():
        lf.set_query(tied, query())
        lora_api.fuse_lora(tied, "jit")
        lora_api.unload_lora_weights(tied)
    assert tied[0].weight is not tied[1].weight
    assert not tied[0].weight.requires_grad and not tied[1].weight.requires_grad


# ------------------------------------------------------------------------------------------------------- load
def _tanh_config_yaml(tmp_path):
    """An official config.yaml for the official-style (N=3, r=2, key_dim=8, query_dim=12) pair, saying tanh."""
    config = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12, activation="tanh", target_modules=r"\d")
    lora_api.save_pretrained(tiny_lorweb_pair(config), tmp_path / "cfg")
    return tmp_path / "cfg" / "config.yaml"


def test_a_folders_config_yaml_applies_to_a_checkpoint_in_a_subfolder(tmp_path):
    """load_lora_weights(folder, weight_name="sub/file"): the folder's config.yaml (none beside the file) gives the
    settings the official-style file does not record (here activation tanh instead of the softmax default)."""
    top = tmp_path / "repo"
    (top / "sub").mkdir(parents=True)
    official_style_checkpoint(top / "sub" / "w.safetensors")
    shutil.copy(_tanh_config_yaml(tmp_path), top / "config.yaml")
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    file, names = lora_api.load_lora_weights(m, top, weight_name="sub/w.safetensors")
    assert file == top / "sub" / "w.safetensors" and names == ["0", "1"]
    assert {layer.activation for layer in lf.lorweb_layers(m).values()} == {"tanh"}


def test_query_settings_a_checkpoint_does_not_record_are_not_compared(tmp_path):
    """A checkpoint that records no query settings (official style, no config.yaml) loads into a pipeline using
    any query mode and pooling: only recorded settings can contradict the pipeline's."""
    official_style_checkpoint(tmp_path / "w.safetensors")
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    lora_api.load_lora_weights(m, tmp_path / "w.safetensors",
                               query_settings={"query_mode": "paa'b", "pooling_type": "max"})
    assert len(lf.lorweb_layers(m)) == 2


@pytest.mark.parametrize("recorded,pipeline,differs", [
    ({"query_mode": "paa'b", "pooling_type": "max"}, {"query_mode": "paa'b", "pooling_type": "avg"}, "pooling_type"),
    ({"query_mode": "caa'b"}, {"query_mode": "cat-aa'b", "pooling_type": "avg"}, "query_mode"),
])
def test_query_settings_recorded_only_in_the_metadata_are_compared(tmp_path, recorded, pipeline, differs):
    """A bare .safetensors (no config.yaml) whose metadata records the query mode / pooling it was trained with
    (``lorweb.query_mode``, ``lorweb.pooling_type``) is refused by a pipeline whose encoder queries otherwise, naming
    the setting, and the model is left as it was; the matching settings load."""
    lf.save_lorweb_weights(tiny_model(seed=1), tmp_path / "w.safetensors",
                           metadata={f"lorweb.{k}": v for k, v in recorded.items()})
    assert not (tmp_path / "config.yaml").exists()
    m = tiny_model()
    before = weights(m)
    with pytest.raises(LoRWeBCheckpointError, match=rf"other query settings.*{differs}: checkpoint "
                                                    rf"{re.escape(repr(recorded[differs]))}.*not changed"):
        lora_api.load_lora_weights(m, tmp_path / "w.safetensors", query_settings=pipeline)
    assert same(m, before)
    lora_api.load_lora_weights(m, tmp_path / "w.safetensors", query_settings={**pipeline, **recorded})
    assert not same(m, before)


def test_a_query_source_mismatch_changes_nothing(tmp_path):
    """A checkpoint recording query_source="images" is refused for a "grid" encoder, the model left as it was."""
    src = tiny_model(seed=1)
    lf.save_lorweb_weights(src, tmp_path / "w.safetensors", metadata={"lorweb.query_source": "images"})
    m = tiny_model()
    before = weights(m)
    with pytest.raises(LoRWeBCheckpointError, match="query_source='images'.*query_source='grid'.*not changed"):
        lora_api.load_lora_weights(m, tmp_path / "w.safetensors", query_source="grid")
    assert same(m, before)
    lora_api.load_lora_weights(m, tmp_path / "w.safetensors", query_source="images")
    assert not same(m, before)


# ------------------------------------------------------------------------------------------- save / push / resolve
def test_save_pretrained_into_an_existing_file_is_refused(tmp_path):
    """A target path that is a file is refused by name before anything is written; the file is left as it was."""
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        lora_api.save_pretrained(tiny_model(), target)
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_save_pretrained_that_fails_writing_the_card_changes_no_file(tmp_path, monkeypatch):
    """The weights, config.yaml and the README.md card are renamed into place together: a README.md that is a folder
    is refused before anything is written, and a card whose write fails (disk full) leaves the previous save's three
    files byte-identical (no new weights beside an old card), with no temporary file left."""
    import os

    out = lora_api.save_pretrained(tiny_model(seed=1), tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["README.md", "config.yaml", "lorweb.safetensors"]
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if "README" in os.readlink(f"/proc/self/fd/{fd}"):
            f.close()
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError, match="No space left on device"):
        lora_api.save_pretrained(tiny_model(seed=2), out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "card" / "README.md").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="README.md: it is a folder"):
        lora_api.save_pretrained(tiny_model(seed=2), tmp_path / "card")
    assert [p.name for p in (tmp_path / "card").iterdir()] == ["README.md"]


def test_an_own_checkpoints_lora_alpha_loads_without_the_linear_alpha_warning(tmp_path, recwarn):
    """lora_alpha != rank: saving warns once (the official inference.py would apply scale 1); loading the folder back
    restores the scale from the metadata without the config.yaml linear_alpha warning, which is for files whose
    metadata does not record the scale (an official config.yaml with linear_alpha != linear still warns)."""
    import warnings

    import yaml

    model = tiny_lorweb_pair(lf.LoRWeBConfig(**{**CONFIG.__dict__, "lora_alpha": 4.0}), 0)
    with pytest.warns(UserWarning, match="lora_alpha=4.0 != rank=2"):
        out = lora_api.save_pretrained(model, tmp_path / "saved")
    fresh = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_api.load_lora_weights(fresh, out)
    assert {m.scale for m in lf.lorweb_layers(fresh).values()} == {2.0}
    official = tmp_path / "official"
    official.mkdir()
    official_style_checkpoint(official / "LoRWeB.safetensors", key_dim=CONFIG.key_dim, query_dim=CONFIG.query_dim)
    doc = yaml.safe_load((out / "config.yaml").read_text())
    (official / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.warns(UserWarning, match="network.linear_alpha=4 is not read"):
        settings = lmodel.resolve_checkpoint_settings(official / "LoRWeB.safetensors")
    assert settings["rank"] == 2


def test_the_card_usage_is_python_that_names_any_base_model_and_folder():
    """The model card's usage block parses as Python and passes the base model and the weights' path exactly, also
    for names holding quotes, backslashes or non-ASCII characters (a local folder's path)."""
    import ast

    base, repo = 'C:\\models\\"flux" é', "me/it's"
    card = lora_api.model_card(tiny_model(), base_model=base, repo_id=repo, weight_name="w.safetensors")
    code = card.split("```python\n")[1].split("```")[0]
    call = next(node for node in ast.walk(ast.parse(code))
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained")
    assert [ast.literal_eval(arg) for arg in call.args] == [base, f"{repo}/w.safetensors"]
    card = lora_api.model_card(tiny_model(), base_model=Path("/models/flux kontext"))  # a Path, as str
    assert "base_model: /models/flux kontext\n" in card


def test_save_pretrained_names_the_base_model_in_the_card_and_config(tmp_path):
    """base_model goes into the model card's front matter and usage, and into config.yaml's model path."""
    import yaml

    out = lora_api.save_pretrained(tiny_model(), tmp_path / "saved", base_model="me/my-kontext")
    card = (out / "README.md").read_text()
    assert "base_model: me/my-kontext" in card and '"me/my-kontext"' in card
    assert "FLUX.1-Kontext-dev" not in card
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["config"]["process"][0]["model"]["name_or_path"] == "me/my-kontext"


def test_save_pretrained_names_a_bad_query_setting_before_the_model(tmp_path):
    """save_pretrained checks its own query settings first: on a model without LoRWeB layers a bad query_mode is
    what is named, and nothing is written."""
    with pytest.raises(ValueError, match="query_mode must be one of"):
        lora_api.save_pretrained(nn.Sequential(nn.Linear(2, 2)), tmp_path / "out", query_mode="bogus")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_reuses_an_existing_repo(monkeypatch):
    """A second push to the same repo updates it: create_repo is called with exist_ok=True."""
    import huggingface_hub

    created = []

    def create_repo(repo_id, *, private=None, token=None, exist_ok=False):
        if repo_id in created and not exist_ok:
            raise FileExistsError(f"{repo_id} exists")
        created.append(repo_id)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: kw["repo_id"])
    m = tiny_model()
    assert lora_api.push_to_hub(m, "me/lorweb") == "me/lorweb"
    assert lora_api.push_to_hub(m, "me/lorweb") == "me/lorweb"
    with pytest.raises(ValueError, match="repo_id must be a non-empty string"):
        lora_api.push_to_hub(m, "  ")


def test_none_hub_options_are_not_options(tmp_path):
    """Hub options passed as None (unset, as a wrapper forwards them) do not make a local path an error."""
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    assert lora_api.resolve_checkpoint(tmp_path / "w.safetensors", revision=None, token=None) == \
        (tmp_path / "w.safetensors", None)


@pytest.mark.parametrize("weights", [None, 3, {"transformer.0.lora_A": torch.zeros(1)}])
def test_a_checkpoint_that_is_no_path_is_named(weights):
    """None, a number or a state dict where a file, folder or repo id is expected: one error saying what is
    expected (not os.fspath's "expected str, bytes or os.PathLike object")."""
    with pytest.raises(TypeError, match="checkpoint must be a safetensors file, a folder or a Hugging Face Hub repo"):
        lora_api.resolve_checkpoint(weights)
    with pytest.raises(TypeError, match="checkpoint must be a safetensors file"):
        lora_api.load_lora_weights(tiny_model(), weights)
    if isinstance(weights, dict):  # the way to load a state dict is named
        with pytest.raises(TypeError, match=r"got dict \(a state dict: lf\.load_lorweb_weights\(model, state_dict"):
            lora_api.resolve_checkpoint(weights)


def test_a_local_folder_is_not_searched_below_its_top(tmp_path):
    """A local folder whose only checkpoint lies in a subfolder is refused (find_checkpoint's rule, as --weights DIR
    reads it): the one-folder fallback is for Hub repos. weight_name picks the file."""
    lf.save_lorweb_weights(tiny_model(), tmp_path / "top" / "sub" / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="no complete LoRWeB checkpoint"):
        lora_api.resolve_checkpoint(tmp_path / "top")
    assert lora_api.resolve_checkpoint(tmp_path / "top", "sub/w.safetensors") == \
        (tmp_path / "top" / "sub" / "w.safetensors", None)


# ------------------------------------------------------------------------------------ Hub repos (stubbed, local)
@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """huggingface_hub.list_repo_files / snapshot_download over local folders ``hub/<owner>/<name>``: the snapshot
    holds only the files huggingface_hub's own filter keeps for the allow patterns. Returns (hub root, downloads)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    root, downloads = tmp_path / "hub", []

    def list_repo_files(repo_id, revision=None, token=None):
        return sorted(f.relative_to(root / repo_id).as_posix() for f in (root / repo_id).rglob("*") if f.is_file())

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        downloads.append(allow_patterns)
        dst = tmp_path / "cache" / repo_id.replace("/", "--")
        for rel in filter_repo_objects(list_repo_files(repo_id), allow_patterns=allow_patterns):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / repo_id / rel, dst / rel)
        dst.mkdir(parents=True, exist_ok=True)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # no local "owner" folder: "owner/repo" is a repo id
    return root, downloads


def _repo(root, files, checkpoint):
    for name in files:
        (root / "owner/repo" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkpoint, root / "owner/repo" / name)


@pytest.mark.parametrize("subfolder", ["s", "s/"])
def test_a_hub_subfolder_with_a_trailing_slash_is_the_subfolder(hub, tmp_path, subfolder):
    """subfolder="s/" names the same Hub folder as "s": the listing is read under "s/", not "s//"."""
    root, _ = hub
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    _repo(root, ["s/lorweb.safetensors"], tmp_path / "w.safetensors")
    file, _ = lora_api.resolve_checkpoint("owner/repo", subfolder=subfolder)
    assert file.relative_to(tmp_path / "cache" / "owner--repo").as_posix() == "s/lorweb.safetensors"


def test_a_run_folder_in_a_hub_subfolder_brings_that_subfolders_config(hub, tmp_path):
    """A lorweb_fast run folder (checkpoints/step-*/lorweb.safetensors) in subfolder "s": the newest step is picked
    and the config.yaml of "s" (where the run keeps it) is downloaded and returned with it."""
    root, downloads = hub
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    _repo(root, [f"s/checkpoints/step-{step:08d}/lorweb.safetensors" for step in (10, 20)], tmp_path / "w.safetensors")
    shutil.copy(_tanh_config_yaml(tmp_path), root / "owner/repo/s/config.yaml")
    file, config = lora_api.resolve_checkpoint("owner/repo", subfolder="s")
    snapshot = tmp_path / "cache" / "owner--repo"
    assert file == snapshot / "s/checkpoints/step-00000020/lorweb.safetensors"
    assert config == snapshot / "s" / "config.yaml" and config.is_file()
    assert len(downloads) == 1 and not (snapshot / "s/checkpoints/step-00000010").exists()


def test_a_hub_checkpoint_two_folders_down_is_picked_from_the_listing(hub, tmp_path):
    """All of a repo's .safetensors files in one folder two levels down ("a/b/"): the listing picks that folder's
    checkpoint, as the snapshot rule would, and only it is downloaded."""
    root, downloads = hub
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    _repo(root, ["a/b/lorweb.safetensors"], tmp_path / "w.safetensors")
    file, _ = lora_api.resolve_checkpoint("owner/repo")
    assert file == tmp_path / "cache" / "owner--repo" / "a/b/lorweb.safetensors"
    assert len(downloads) == 1


@pytest.mark.parametrize("files,subfolder,fragment", [
    (["other/w.safetensors"], "s", "Hugging Face Hub repo owner/repo has no files in 's'"),
    ([], "", "Hugging Face Hub repo owner/repo has no files$"),
    (["s/.partial.safetensors"], "", r"no LoRWeB checkpoint \(\*.safetensors\) in Hugging Face Hub repo owner/repo, "
                                     "folder s"),
], ids=["empty-subfolder", "empty-repo", "hidden-only"])
def test_hub_listings_without_a_checkpoint_are_named_before_downloading(hub, tmp_path, files, subfolder, fragment):
    """A repo (or subfolder) with no files, or whose one folder of .safetensors holds no checkpoint (a hidden
    partial upload), is refused by name from the listing: nothing is downloaded."""
    root, downloads = hub
    (root / "owner/repo").mkdir(parents=True)
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    _repo(root, files, tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match=fragment):
        lora_api.resolve_checkpoint("owner/repo", subfolder=subfolder or None)
    assert downloads == []


def test_a_file_the_listing_names_but_the_download_lacks_is_named(hub, tmp_path, monkeypatch):
    """The listing picked a file that the downloaded snapshot does not hold (changed in between, or a partial
    cache): FileNotFoundError naming the file and the repo, not a later load error."""
    import huggingface_hub

    root, _ = hub
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    _repo(root, ["w.safetensors"], tmp_path / "w.safetensors")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not found: w.safetensors in Hugging Face Hub repo owner/repo, whose "
                                                "listing names it"):
        lora_api.resolve_checkpoint("owner/repo")


def test_a_subfolder_must_be_a_folder(tmp_path):
    """subfolder names a folder: one that is a file (or missing) is not found, not read as the checkpoint."""
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    for subfolder in ("w.safetensors", "missing"):
        with pytest.raises(FileNotFoundError, match=f"LoRWeB checkpoint not found: .*{subfolder}$"):
            lora_api.resolve_checkpoint(tmp_path, subfolder=subfolder)
