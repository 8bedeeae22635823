"""Audit of file-system path handling, as a demanding user hits it: folder and file names holding spaces, non-ASCII
("données é 数据"), characters special to globs, YAML, shells and URLs (``[x]``, ``*``, ``?``, ``#``, ``:``, ``'``,
``%20``, ``{a,b}``, ``$``, ``|``), a leading ``-``, ``~``, relative paths, symlinked folders, trailing slashes, and
``pathlib.Path`` vs ``str``; applied to ``data prepare`` / ``data check``, training output folders and resume,
checkpoint save / load (``lf.save_lorweb_weights`` / ``lf.load_lorweb_weights``, ``resolve_checkpoint``,
``LoRWeBKontextPipeline.from_pretrained`` / ``load_lora_weights`` / ``save_pretrained``), config.yaml and the model
card's YAML front matter, ``lorweb-fast infer``, ``eval generate`` / ``eval score`` and ``demo --out``
(``python -m lorweb_fast.aot`` is left out: slow, and its work folder is a fresh temporary one).

Also: a local path that looks like a Hugging Face Hub repo id ("org/name" that exists here) is read locally, never
looked up on the Hub; a glob-special folder name is never glob-expanded (a sibling it would match is not read); a
path that does not exist gives a one-line error naming it. ``~`` is not documented as expanded; what is tested is
that the commands treat it consistently (the check that accepts a path is the one the loader uses).

Defects are kept as strict xfails asserting the correct behaviour (their reasons say what goes wrong). Everything
runs offline on the tiny random models of ``lorweb_fast.testing`` (no test reaches the Hub: the tests that could
refuse ``huggingface_hub``'s download functions).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import data, demo, lora_api, training
from lorweb_fast import official_config as oc
from lorweb_fast.model import checkpoint_metadata
from lorweb_fast.testing import (build_tiny_lorweb_assets, cli_usage_error, fake_checkpoint, infer_input_files,
                                 relation252k_folder, run_cli_in_process, small_train_config,
                                 tiny_lorweb_linear_model, tiny_train_config, tiny_training_assets)

pytest.importorskip("diffusers")

#: one folder name holding every kind of special character the audit covers (glob, YAML, shell, URL, non-ASCII)
SPECIAL = "données é 数据 [x] *? #1 {a,b} it's %20 a:b"
#: names each special in its own way (a leading "-", "~" inside, a backslash, ...)
NAMES = ["sp ace", "données é 数据", "[x]", "a*b", "q?", "h #1", "c: d", "it's", "p%20q", "{a,b}", "-dash", "~tilde",
         "x\\y", "$HOME", "v1|v2"]
#: the tiny pipeline's CLI options: native resolution at 64 px, one step, fp32 on the CPU
TINY_INFER = ["--steps", "1", "--dtype", "fp32", "--resolution", "native", "--long-edge", "64", "--device", "cpu",
              "--quiet"]


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def no_hub(monkeypatch):
    """huggingface_hub's listing and download functions refused: a local path must never reach them."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hugging Face Hub was asked for {args} {kwargs}")

    for name in ("list_repo_files", "snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``build_tiny_lorweb_assets`` under a folder named SPECIAL: pipe/, clip/ and lorweb.safetensors (its encoder
    recorded as the absolute clip/ path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny_lorweb_assets(tmp_path_factory.mktemp("paths") / SPECIAL)


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    """``tiny_training_assets`` (pipe/, clip/, data/ of 4 analogies) under a folder named SPECIAL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_training_assets(tmp_path_factory.mktemp("paths_train") / SPECIAL, 4)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """Random LPIPS backbone weights in a TORCH_HOME whose path holds SPECIAL."""
    from lorweb_fast.evaluation import tiny

    home = tmp_path / f"torch home {SPECIAL}"
    tiny.save_random_lpips_backbone(home)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home


def random_linear_model(seed):
    """``tiny_lorweb_linear_model`` with every LoRWeB tensor drawn from ``seed`` (B non-zero)."""
    torch.manual_seed(seed)
    model = tiny_lorweb_linear_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name or "att_lora_to_q" in name:
                p.normal_()
    return model


def lorweb_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


run_cli = run_cli_in_process  # ``lorweb-fast argv`` in-process: (exit status, stdout, stderr)


def write_inputs(folder):
    """a, a', b images named with a leading "-", "%20" and "[1]" in ``folder`` (created); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stem in enumerate(("a", "a_prime", "b")):
        path = folder / f"-{stem} %20 [1].png"
        Image.new("RGB", (32, 32), (60 * i, 80, 120)).save(path)
        paths.append(path)
    return paths


def table_cells(line):
    """The cells of one Markdown table row (``|`` escaped as ``\\|`` stays inside its cell)."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


# -------------------------------------------------------------------------------------- checkpoints: save / load
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spelling", ["str", "Path", "relative str", "relative Path"])
def test_weights_save_and_load_under_special_folder_names(tmp_path, monkeypatch, name, spelling):
    """``lf.save_lorweb_weights`` / ``lf.load_lorweb_weights`` write and read exactly the file named, whatever the
    folder's characters and however the path is spelled (str or Path, absolute or relative)."""
    monkeypatch.chdir(tmp_path)
    rel = Path(name) / "w é.safetensors"
    path = {"str": str(tmp_path / rel), "Path": tmp_path / rel, "relative str": str(rel),
            "relative Path": rel}[spelling]
    source = random_linear_model(1)
    lf.save_lorweb_weights(source, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # created where named, nothing beside it
    assert [p.name for p in (tmp_path / name).iterdir() if not p.name.startswith(".")] == ["w é.safetensors"]
    loaded = random_linear_model(2)
    lf.load_lorweb_weights(loaded, path)
    assert same_state(lorweb_state(loaded), lorweb_state(source))


@pytest.mark.parametrize("spelling", ["relative", "relative/", "./relative", "Path", "absolute", "absolute/",
                                      "symlink", "symlink/"])
def test_a_checkpoint_folder_resolves_the_same_however_spelled(tmp_path, monkeypatch, spelling):
    """``resolve_checkpoint`` (``--weights DIR``, ``from_pretrained``, ``load_lora_weights``) picks the same file in a
    SPECIAL folder spelled relative, with ``./``, with a trailing slash, as a Path, absolute, or through a symlink."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / SPECIAL
    lf.save_lorweb_weights(random_linear_model(1), folder / "lorweb.safetensors")
    os.symlink(folder, tmp_path / "link to run")
    spelled = {"relative": SPECIAL, "relative/": SPECIAL + "/", "./relative": "./" + SPECIAL, "Path": Path(SPECIAL),
               "absolute": str(folder), "absolute/": str(folder) + "/", "symlink": "link to run",
               "symlink/": str(tmp_path / "link to run") + "/"}[spelling]
    file, config = lora_api.resolve_checkpoint(spelled)
    assert file.resolve() == (folder / "lorweb.safetensors").resolve() and config is None


def test_glob_special_folder_names_are_not_glob_expanded(tmp_path, monkeypatch):
    """A folder named ``ckpt[12]`` beside ``ckpt1`` (which the glob ``ckpt[12]`` matches): loading ``ckpt[12]`` reads
    its own checkpoint, and a run folder ``run[12]`` has no checkpoint while ``run1`` has one."""
    monkeypatch.chdir(tmp_path)
    lf.save_lorweb_weights(random_linear_model(1), tmp_path / "ckpt1" / "lorweb.safetensors")
    own = random_linear_model(2)
    lf.save_lorweb_weights(own, tmp_path / "ckpt[12]" / "lorweb.safetensors")
    for spelled in ("ckpt[12]", tmp_path / "ckpt[12]", "ckpt[12]/lorweb.safetensors"):
        loaded = random_linear_model(3)
        lf.load_lorweb_weights(loaded, lora_api.resolve_weight_file(spelled))
        assert same_state(lorweb_state(loaded), lorweb_state(own)), spelled
    fake_checkpoint(tmp_path / "run1", 2, small_train_config(tmp_path / "run1"))
    (tmp_path / "run[12]").mkdir()
    assert training.latest_checkpoint(tmp_path / "run1") is not None
    assert training.latest_checkpoint(tmp_path / "run[12]") is None
    assert training.latest_checkpoint("run[12]") is None


def test_a_local_folder_named_like_a_hub_repo_is_read_locally(tmp_path, monkeypatch, no_hub):
    """``org/name`` that exists here is a local folder (never listed or downloaded from the Hub), also as a Path or
    with a trailing slash; ``org/typo`` beside the local ``org/`` is a mistyped local path: not found, naming it,
    without asking the Hub (the README's rule)."""
    monkeypatch.chdir(tmp_path)
    lf.save_lorweb_weights(random_linear_model(1), tmp_path / "org" / "name" / "lorweb.safetensors")
    for spelled in ("org/name", Path("org/name"), "org/name/"):
        assert lora_api.hub_repo_id(spelled) is None
        file, _ = lora_api.resolve_checkpoint(spelled)
        assert file.resolve() == (tmp_path / "org" / "name" / "lorweb.safetensors").resolve()
    with pytest.raises(FileNotFoundError, match="org/typo"):
        lora_api.resolve_checkpoint("org/typo")
    with pytest.raises(FileNotFoundError, match="runs/my model"):
        lora_api.resolve_checkpoint("runs/my model")  # a space: no repo id, so a path


def test_missing_or_folder_weights_are_named(tmp_path):
    """A missing checkpoint file or folder, and a folder where a file is expected, raise errors naming the path."""
    missing = tmp_path / SPECIAL / "w.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        lf.load_lorweb_weights(random_linear_model(1), missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing.parent))):
        lora_api.resolve_checkpoint(str(missing.parent) + "/")
    missing.parent.mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(f"{missing.parent} is a folder")):
        lf.load_lorweb_weights(random_linear_model(1), missing.parent)


# ---------------------------------------------------------------------------------------------- YAML: config.yaml
YAML_VALUES = ["/data/my models: v2/clip", "/data/run #3/clip", "[x] clip", "{a,b}/clip", "*clip", "it's/clip",
               "%20/clip", "-dash/clip", "données é 数据/clip", "@org/x", "`t`", "~", "null", "yes", "1e3", "- x",
               " lead", "trail ", "C:\\models\\clip", "&anchor", "!tag", "|", "x: y", "x #y", '"dq"']


def test_config_yaml_round_trips_paths_and_names(tmp_path):
    """config.yaml (``write_config_yaml``, written by training and ``save_pretrained``) keeps the encoder path, the base
    model path and the run name exactly, whatever YAML would otherwise read into them (comments, mappings, flow
    collections, anchors, tags, booleans, nulls, numbers)."""
    changed = []
    for value in YAML_VALUES:
        path = oc.write_config_yaml(tmp_path / SPECIAL / "config.yaml", {"encoder": value}, name=value, model=value)
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        got = (oc.read_config_yaml(path)["encoder"], doc["config"]["name"],
               doc["config"]["process"][0]["model"]["name_or_path"])
        if got != (value, value, value):
            changed.append((value, got))
    assert changed == []


def test_config_yaml_is_read_as_utf8_whatever_the_locale(tmp_path):
    """A UTF-8 config.yaml naming a non-ASCII encoder folder reads back the same under the C locale (ASCII)."""
    encoder = "/models/données é 数据/clip"
    text = oc.config_yaml_text({"encoder": "ENCODER"}).replace("ENCODER", encoder)  # as a user edits it
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    code = ("import sys\nfrom lorweb_fast.official_config import read_config_yaml\n"
            "sys.stdout.buffer.write(read_config_yaml(sys.argv[1])['encoder'].encode('utf-8'))\n")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-600:]
    assert proc.stdout.decode("utf-8") == encoder


# ------------------------------------------------------------------------------------ the pipeline's save / load
def test_pipeline_loads_and_saves_through_special_and_hub_like_paths(assets, tmp_path, monkeypatch, no_hub):
    """``from_pretrained`` from a SPECIAL model folder (a Path) and a weights folder spelled with a trailing slash;
    ``save_pretrained`` into ``org/name`` (a local folder named like a Hub repo) and into ``ckpt[12]`` under a
    ``weight_name`` with spaces, brackets and accents; ``load_lora_weights`` reads each back locally, bit for bit."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    monkeypatch.chdir(tmp_path)
    pipe = LoRWeBKontextPipeline.from_pretrained(assets / "pipe", str(assets) + "/", resolution="native",
                                                 long_edge=64)
    (tmp_path / "org").mkdir()
    transformer = pipe.transformer
    saved = lorweb_state(transformer)
    pipe.save_pretrained("org/name")
    pipe.save_lora_weights("ckpt[12]/", weight_name="w [1] é #2.safetensors")
    assert sorted(os.listdir(tmp_path / "org" / "name")) == ["README.md", "config.yaml", "lorweb.safetensors"]
    assert sorted(os.listdir(tmp_path / "ckpt[12]")) == ["README.md", "config.yaml", "w [1] é #2.safetensors"]
    for args, kwargs in ((("org/name",), {}), ((Path("ckpt[12]"),), {"weight_name": "w [1] é #2.safetensors"})):
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora" in name:
                    p.add_(1.0)
        assert not same_state(lorweb_state(transformer), saved)
        pipe.load_lora_weights(*args, **kwargs)
        assert same_state(lorweb_state(transformer), saved), args
    # the saved folder loads as the weights of a new pipeline, from its hub-like relative name
    again = LoRWeBKontextPipeline.from_pretrained(assets / "pipe", "org/name", resolution="native", long_edge=64)
    assert same_state(lorweb_state(again.transformer), saved)


def test_model_card_front_matter_keeps_a_local_base_model_path(assets, tmp_path):
    """``save_pretrained`` of a pipeline loaded from a SPECIAL folder: the model card's YAML front matter parses and
    its ``base_model`` is that folder, as the config.yaml records it."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    pipe = LoRWeBKontextPipeline.from_pretrained(str(assets / "pipe"), assets / "lorweb.safetensors",
                                                 resolution="native", long_edge=64)
    pipe.save_pretrained(tmp_path / "card")
    front = (tmp_path / "card" / "README.md").read_text(encoding="utf-8").split("---\n")[1]
    assert yaml.safe_load(front)["base_model"] == str(assets / "pipe")
    for base in ("[x] models/flux", "/data/my models: v2/flux", "%20/flux", "@org/flux"):
        card = lora_api.model_card(pipe.transformer, base_model=base)
        assert yaml.safe_load(card.split("---\n")[1])["base_model"] == base


def test_save_pretrained_records_local_folders_as_absolute_paths(assets, tmp_path, monkeypatch):
    """A pipeline built from relative local folders (``pipe``, ``encoder="clip"``) saves a checkpoint that names
    them by absolute path, usable from any working directory; ``push_to_hub`` names them as given."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    monkeypatch.chdir(assets)
    pipe = LoRWeBKontextPipeline.from_pretrained("pipe", "lorweb.safetensors", encoder="clip", resolution="native",
                                                 long_edge=64)
    pipe.save_pretrained(tmp_path / "saved")
    clip = str((assets / "clip").resolve())
    assert oc.read_config_yaml(tmp_path / "saved" / "config.yaml")["encoder"] == clip
    assert checkpoint_metadata(tmp_path / "saved" / "lorweb.safetensors")["encoder"] == clip
    doc = yaml.safe_load((tmp_path / "saved" / "config.yaml").read_text(encoding="utf-8"))
    assert doc["config"]["process"][0]["model"]["name_or_path"] == str((assets / "pipe").resolve())
    pushed = []  # push_to_hub publishes the names as given, not this machine's absolute folders
    monkeypatch.setattr(lora_api, "push_to_hub", lambda model, repo_id, **kwargs: pushed.append(kwargs) or "url")
    assert pipe.push_to_hub("me/repo") == "url"
    assert (pushed[0]["encoder"], pushed[0]["base_model"]) == ("clip", "pipe")


# ------------------------------------------------------------------------------------------------------- infer
def test_infer_with_special_absolute_paths(assets, tmp_path, capsys):
    """``infer`` with inputs named ``-a %20 [1].png`` in a SPECIAL folder, an explicit ``--config`` of a SPECIAL name,
    and ``--out`` / ``--coefficients-plot`` in new SPECIAL folders: b' and the plot are written exactly there."""
    a, a_prime, b = write_inputs(tmp_path / SPECIAL / "in *?")
    config = oc.write_config_yaml(tmp_path / SPECIAL / "config [1] é #2.yaml",
                                  {"encoder": str(assets / "clip"), "rank": 2, "num_loras": 3, "key_dim": 8})
    out = tmp_path / SPECIAL / "out ü *?" / "-b' [1] #2.png"
    plot = tmp_path / SPECIAL / "plots {a,b}" / "c %20.png"
    rc, stdout, err = run_cli(capsys, ["infer", "--a", a, "--a-prime", a_prime, "--b", b,
                                       "--prompt", "make it: 'é' # {a,b}", "--weights", assets / "lorweb.safetensors",
                                       "--config", config, "--model", assets / "pipe", f"--out={out}",
                                       "--coefficients-plot", plot, *TINY_INFER])
    assert rc == 0, err
    assert stdout.splitlines()[-1] == f"wrote {out} and {plot}"
    assert Image.open(out).mode == "RGB" and Image.open(plot).size[0] > 0
    assert sorted(os.listdir(out.parent)) == [out.name] and sorted(os.listdir(plot.parent)) == [plot.name]


def test_infer_with_relative_and_hub_like_local_paths(assets, tmp_path, monkeypatch, capsys, no_hub):
    """``infer`` run inside the SPECIAL folder with relative paths: ``--weights org/name`` (a local folder named like
    a Hub repo id: read locally, never downloaded), ``--model pipe/`` (trailing slash), relative inputs and an
    ``--out=-b' é [1].png`` starting with ``-``."""
    monkeypatch.chdir(assets)
    (assets / "org" / "name").mkdir(parents=True, exist_ok=True)
    shutil.copy(assets / "lorweb.safetensors", assets / "org" / "name" / "lorweb.safetensors")
    inputs = [p.relative_to(assets) for p in write_inputs(assets / "in é")]
    out = "-b' é [1].png"
    try:
        rc, stdout, err = run_cli(capsys, ["infer", "--a", inputs[0], "--a-prime", inputs[1], "--b", inputs[2],
                                           "--prompt", "p", "--weights", "org/name", "--model", "pipe/",
                                           f"--out={out}", *TINY_INFER])
        assert rc == 0, err
        assert stdout.splitlines()[-1] == f"wrote {out}"
        assert Image.open(assets / out).mode == "RGB"
    finally:
        (assets / out).unlink(missing_ok=True)
        shutil.rmtree(assets / "org", ignore_errors=True)
        shutil.rmtree(assets / "in é", ignore_errors=True)


@pytest.mark.parametrize("command", ["infer --model", "train --encoder"])
def test_a_tilde_model_path_is_refused_as_missing(train_assets, tmp_path, monkeypatch, capsys, command):
    """``--model ~/pipe`` / ``--encoder ~/clip`` (quoted, so not expanded by a shell; ``~`` is never expanded by
    the package): refused up front as a path that does not exist, with the hint; never a Hub repo-id error, and
    nothing written, although ``$HOME/pipe`` exists."""
    monkeypatch.setenv("HOME", str(train_assets))
    monkeypatch.chdir(tmp_path)
    if command == "infer --model":
        build_tiny_lorweb_assets(tmp_path / "w")  # its own encoder recorded absolute
        a, a_prime, b = write_inputs(tmp_path / "in")
        argv = ["infer", "--a", a, "--a-prime", a_prime, "--b", b, "--prompt", "p",
                "--weights", tmp_path / "w" / "lorweb.safetensors", "--model", "~/pipe", "--out", "b.png",
                *TINY_INFER]
        done = tmp_path / "b.png"
    else:
        argv = ["train", "--data", train_assets / "data", "--out", "run", "--model", train_assets / "pipe",
                "--encoder", "~/clip", "--steps", "1", "--batch-size", "2", "--mixed-precision", "no",
                "--long-edge", "64", "--resize", "long-edge", "--num-loras", "2", "--rank", "2", "--key-dim", "4",
                "--num-workers", "0", "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH), "--optimizer",
                "adamw", "--quiet"]
        done = tmp_path / "run" / "lorweb.safetensors"
    rc, _, err = run_cli(capsys, argv)
    assert "Repo id" not in err and "repo id" not in err, err
    assert rc == 2 and "~/" in err and "does not exist" in err and "quoted ~ is not expanded" in err, err
    assert not done.exists()


def test_a_model_hub_id_beside_a_folder_named_like_its_owner_is_still_a_hub_id(tmp_path, monkeypatch):
    """``--model`` / ``--encoder``: an "owner/name" of which nothing exists here is a Hub id even beside a local
    folder named like the owner (the default encoder ``openai/clip-vit-large-patch14`` must load from a folder that
    holds ``openai/``), and a name starting with "_" is one too; so ``models/pipe_typo`` beside ``models/`` is left to
    the Hub (its error names it). ``--weights`` keeps the stricter rule (a mistyped local run folder)."""
    from lorweb_fast.validation import check_model_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "pipe").mkdir(parents=True)
    (tmp_path / "openai").mkdir()
    assert lora_api.hub_repo_id("models/pipe_typo") is None  # the weights' rule
    for name in ("openai/clip-vit-large-patch14", "models/pipe_typo", "owner/_name"):
        assert check_model_source("--model", name, "model_index.json") == name


# ------------------------------------------------------------------------------------------------ missing paths
def _missing_argv(tmp_path, case, missing):
    """argv of ``case`` with ``missing`` (a path that does not exist) where the case puts it; the other inputs
    exist (marker-only model / clip folders: every case fails before any model loads)."""
    from lorweb_fast.evaluation import tiny

    root = infer_input_files(tmp_path)
    lf.save_lorweb_weights(tiny_lorweb_linear_model(), root / "w.safetensors",
                           metadata={"encoder": str(root / "clip")})
    ev = tiny.make_folder_evalset(root / "ev", tasks=("flip",), per_task=1)
    tiny.make_runs_folder(root / "runs", ev)
    images = ["--a", root / "a.png", "--a-prime", root / "a_prime.png", "--b", root / "b.png", "--prompt", "p"]
    infer = ["infer", *images, "--weights", root / "w.safetensors", "--model", root / "model"]
    train = ["train", "--data", root / "ev", "--out", root / "run", "--model", root / "model",
             "--encoder", root / "clip"]
    gen = ["eval", "generate", "--evalset", root / "ev", "--weights", root / "w.safetensors", "--model",
           root / "model", "--out", root / "r", "--quiet"]
    score = ["eval", "score", "--runs", root / "runs", "--out", root / "rep", "--quiet"]

    def put(argv, flag, value):
        return [value if i > 0 and argv[i - 1] == flag else a for i, a in enumerate(argv)]

    return {
        "infer --a": put(infer, "--a", f"{missing}.png"),
        "infer --weights file": put(infer, "--weights", f"{missing}.safetensors"),
        "infer --weights folder/": put(infer, "--weights", f"{missing}/"),
        "infer --config": infer + ["--config", f"{missing}.yaml"],
        "infer --model": put(infer, "--model", missing),
        "infer --encoder": infer + ["--encoder", missing],
        "train --data": put(train, "--data", missing),
        "train --model": put(train, "--model", missing),
        "train --encoder": put(train, "--encoder", missing),
        "data check": ["data", "check", missing],
        "data prepare": ["data", "prepare", missing, root / "prepared"],
        "data prepare --filter-json": ["data", "prepare", root, root / "prepared", "--filter-json", f"{missing}.json"],
        "eval generate --evalset": put(gen, "--evalset", missing),
        "eval generate --weights": put(gen, "--weights", missing),
        "eval score --runs": put(score, "--runs", missing),
        "eval score --against": score + ["--against", missing, "--judge", f"replay:{root / 'x.jsonl'}"],
        "eval score --lpips-weights": score + ["--metrics", "lpips", "--lpips-weights", f"{missing}.pth"],
        "eval score replay": score + ["--metrics", "vlm", "--judge", f"replay:{missing}.jsonl"],
    }[case]


MISSING_CASES = ["infer --a", "infer --weights file", "infer --weights folder/", "infer --config", "infer --model",
                 "infer --encoder", "train --data", "train --model", "train --encoder", "data check", "data prepare",
                 "data prepare --filter-json", "eval generate --evalset", "eval generate --weights",
                 "eval score --runs", "eval score --against", "eval score --lpips-weights", "eval score replay"]


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("case", MISSING_CASES)
def test_a_missing_path_is_named_in_one_line(tmp_path, monkeypatch, capsys, no_hub, case, relative):
    """Every path option given a SPECIAL path that does not exist: exit status 2 and one line naming the path (no
    traceback, no Hub lookup), before any model loads."""
    monkeypatch.chdir(tmp_path)
    missing = SPECIAL + " nope" if relative else str(tmp_path / (SPECIAL + " nope"))
    argv = [str(a) for a in _missing_argv(tmp_path, case, missing)]
    line = cli_usage_error(capsys, argv)
    assert missing in line, line


def test_eval_generate_refuses_a_missing_model_folder_before_loading(assets, tmp_path, monkeypatch, capsys):
    """``eval generate --model <missing folder>``: one line naming it as a path that does not exist, as ``infer``
    says it, before any model loads."""
    from lorweb_fast import flux
    from lorweb_fast.evaluation import tiny

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before --model was checked")

    monkeypatch.setattr(flux, "AnalogyEncoder", no_load)
    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=1)
    missing = tmp_path / (SPECIAL + " nope")
    rc, _, err = run_cli(capsys, ["eval", "generate", "--evalset", ev, "--weights", assets / "lorweb.safetensors",
                                  "--model", missing, "--out", tmp_path / "runs", *TINY_INFER])
    assert rc == 2 and f"--model {missing} does not exist" in err, err


def test_eval_score_names_a_missing_encoder_folder_as_missing(tmp_path, capsys):
    from lorweb_fast.evaluation import tiny

    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=1)
    tiny.make_runs_folder(tmp_path / "runs", ev)
    missing = tmp_path / (SPECIAL + " clip")
    line = cli_usage_error(capsys, ["eval", "score", "--runs", str(tmp_path / "runs"), "--encoder", str(missing),
                                    "--metrics", "clip_dir", "--out", str(tmp_path / "rep"), "--quiet"])
    assert str(missing) in line and "does not exist" in line and "Repo id" not in line, line


# ------------------------------------------------------------------------------------------------- data prepare
def _relation252k(src):
    """A Relation252K folder with SPECIAL-like category names and one image renamed ``-img %20 #?*[1] é.png`` whose
    edit instruction holds ':', '#', quotes and accents. Returns that caption."""
    relation252k_folder(src, {"cat [x] é #1": [(16, 16)] * 3, "-dash: it's {a,b}": [(16, 16)] * 2,
                              "plain": [(16, 16)] * 2}, seed=0)
    group = src / "plain" / "Group1"
    labels = json.loads((group / "labels.json").read_text())
    caption = "make it: 'é' # not a comment {a,b}"
    os.rename(group / "img0.png", group / "-img %20 #?*[1] é.png")
    labels[0].update(img_name="-img %20 #?*[1] é.png", edit_instruction=caption)
    (group / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    return caption


def test_data_prepare_and_check_with_special_names(tmp_path, monkeypatch, capsys):
    """``data prepare`` from a SPECIAL Relation252K folder (relative, trailing slash) into a SPECIAL output: every
    analogy written there and nowhere else, ids keeping the category and image names, the caption kept exactly
    (also as the trainer reads it); ``data check --dump`` into a SPECIAL folder; ``--filter-categories`` matches a
    name holding ``[x]`` literally and treats ``cat [x]*`` as a name, not a pattern."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / f"Relation 252K {SPECIAL}"
    caption = _relation252k(src)
    out = "out é [x] #1 {a,b}"
    rc, stdout, err = run_cli(capsys, ["data", "prepare", src.name + "/", out + "/", "--quiet"])
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out])
    meta = json.loads((tmp_path / out / "analogy_metadata.json").read_text(encoding="utf-8"))
    assert len(meta) == 5
    for entry in meta:
        for key in ("control_image_path", "target_image_path", "caption_path"):
            assert (tmp_path / out / entry[key]).is_file(), entry[key]
    special = next(e for e in meta if e["category"] == "plain")
    assert special["analogy_id"] == "analogy_plain_-img %20 #?*[1] é.png_plain_img1.png_0004"
    assert (tmp_path / out / special["caption_path"]).read_text(encoding="utf-8") == caption
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = data.AnalogyFolder(tmp_path / out)
        captions = {folder[i]["name"]: folder[i]["caption"] for i in range(len(folder))}
    # the official caption normalisation (split on commas, stripped, joined with ", ") is the only change
    assert captions[special["analogy_id"]] == ", ".join(part.strip() for part in caption.split(","))
    rc, stdout, err = run_cli(capsys, ["data", "check", out, "--dump", "dump ü [1]/", "--quiet"])
    assert rc == 0 and stdout.startswith("5 samples (0 skipped); layouts: strip 5"), err
    dumped = tmp_path / "dump ü [1]" / f"{special['analogy_id']}_caption.txt"
    assert dumped.read_text(encoding="utf-8") == captions[special["analogy_id"]] + "\n"
    rc, stdout, err = run_cli(capsys, ["data", "prepare", src, "only [x]", "--quiet",
                                       "--filter-categories", "cat [x] é #1"])
    assert rc == 0 and {e["category"] for e in json.loads(
        (tmp_path / "only [x]" / "analogy_metadata.json").read_text(encoding="utf-8"))} == {"cat [x] é #1"}, err
    line = cli_usage_error(capsys, ["data", "prepare", str(src), "none", "--quiet", "--filter-categories", "cat [x]*"])
    assert "cat [x]*" in line and not (tmp_path / "none").exists()


@pytest.mark.parametrize("spelling", ["-- -out", "./-out", "symlink/"])
def test_data_prepare_out_starting_with_dash_or_through_a_symlink(tmp_path, monkeypatch, capsys, spelling):
    """An output folder named ``-out`` (after ``--``, or as ``./-out``), or an existing folder reached through a
    symlink (with a trailing slash): the files land in that folder."""
    monkeypatch.chdir(tmp_path)
    relation252k_folder(tmp_path / "src", {"c": [(16, 16)] * 2}, seed=0)
    target = tmp_path / ("real out" if spelling == "symlink/" else "-out")
    if spelling == "symlink/":
        target.mkdir()
        os.symlink(target, tmp_path / "link out")
    argv = {"-- -out": ["data", "prepare", "--quiet", "--", "src", "-out"],
            "./-out": ["data", "prepare", "src", "./-out", "--quiet"],
            "symlink/": ["data", "prepare", "src", "link out/", "--quiet"]}[spelling]
    rc, _, err = run_cli(capsys, argv)
    assert rc == 0, err
    assert sorted(os.listdir(target / "target")) == ["analogy_c_img0.png_c_img1.png_0000.jpg",
                                                     "analogy_c_img0.png_c_img1.png_0000.txt"]


def test_data_prepare_fails_only_the_analogy_whose_name_is_too_long(tmp_path, capsys):
    """A category whose analogy ids exceed the file system's name limit fails its analogies (listed as failed); the
    other categories are prepared and listed in analogy_metadata.json."""
    src = tmp_path / "src"
    relation252k_folder(src, {"数据集" * 20: [(16, 16)] * 2, "short": [(16, 16)] * 2}, seed=0)
    rc, stdout, err = run_cli(capsys, ["data", "prepare", src, tmp_path / "out", "--quiet"])
    assert rc == 0, err
    meta = json.loads((tmp_path / "out" / "analogy_metadata.json").read_text(encoding="utf-8"))
    assert [e["category"] for e in meta] == ["short"]
    assert "1 failed" in stdout


# ---------------------------------------------------------------------------------------------------- training
def _train_argv(assets, data_path, out, steps, *extra):
    """``lorweb-fast train`` with the options of ``tiny_train_config`` (and num_loras 2, key_dim 4, checkpoints every
    step, torch AdamW)."""
    return ["train", "--data", data_path, f"--out={out}", "--steps", str(steps), "--batch-size", "2",
            "--learning-rate", "1e-2", "--mixed-precision", "no", "--long-edge", "64", "--resize", "long-edge",
            "--num-loras", "2", "--rank", "2", "--key-dim", "4", "--num-workers", "0", "--quiet",
            "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH), "--checkpoint-every", "1",
            "--optimizer", "adamw", "--save-dtype", "fp32", *extra]


def test_training_out_folders_and_resume_however_spelled(train_assets, tmp_path, monkeypatch, capsys):
    """A run into a SPECIAL ``-run`` folder started from Python with ``pathlib.Path`` fields, resumed from the command
    line with relative, absolute, trailing-slash, ``./`` and symlinked spellings of --data / --out / --model /
    --encoder, then moved to a new SPECIAL folder and resumed there: every resume continues (step by step, one loss
    row per step), and config.yaml names the model and encoder by their absolute paths."""
    monkeypatch.chdir(train_assets)
    out = tmp_path / SPECIAL / "-run é *?"
    cfg = tiny_train_config(train_assets, out, steps=1, num_loras=2, key_dim=4, checkpoint_every=1,
                            optimizer="adamw")
    cfg.data, cfg.out, cfg.model, cfg.encoder = Path("data"), out, Path("pipe"), train_assets / "clip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert training.train(cfg)["step"] == 1
    spellings = [  # (data, out, model, encoder)
        (str(train_assets / "data") + "/", str(out) + "/", "./pipe/", "clip"),
        ("./data", str(tmp_path / "link to run"), str(train_assets / "pipe"), "./clip/"),
    ]
    os.symlink(out, tmp_path / "link to run")
    for step, (data_path, out_path, model, encoder) in enumerate(spellings, start=2):
        rc, stdout, err = run_cli(capsys, _train_argv(train_assets, data_path, out_path, step, "--resume",
                                                      "--model", model, "--encoder", encoder))
        assert rc == 0, err
        assert stdout == f"trained to step {step}; weights in {Path(out_path) / 'lorweb.safetensors'}\n"
    moved = tmp_path / f"moved {SPECIAL}"
    shutil.move(str(out), str(moved))
    rc, stdout, err = run_cli(capsys, _train_argv(train_assets, "data", moved, 4, "--resume", "--model", "pipe",
                                                  "--encoder", "clip"))
    assert rc == 0, err
    assert [p.name for p in training.checkpoint_dirs(moved)] == [f"step-{s:08d}" for s in range(1, 5)]
    assert len((moved / "loss.jsonl").read_text().splitlines()) == 4
    doc = yaml.safe_load((moved / "config.yaml").read_text(encoding="utf-8"))
    kwargs = doc["config"]["process"][0]["network"]["network_kwargs"]
    assert kwargs["external_query_model"] == str((train_assets / "clip").resolve())
    assert doc["config"]["process"][0]["model"]["name_or_path"] == str((train_assets / "pipe").resolve())
    assert checkpoint_metadata(moved / "lorweb.safetensors")["encoder"] == str((train_assets / "clip").resolve())
    assert not any(p.name.startswith(".") for p in moved.iterdir())  # no temporaries or stray files left


# -------------------------------------------------------------------------------------------------- evaluation
def test_eval_generate_and_score_with_special_paths(assets, tmp_path, monkeypatch, capsys, torch_home):
    """``eval generate`` from a SPECIAL evaluation set (task names with brackets, accents, '#', ':' and a leading
    '-') into a relative SPECIAL --out with a trailing slash; resumed with absolute spellings (nothing regenerated),
    restricted by ``--tasks`` to a name holding ``[x]``; ``eval score`` of it as ``NAME=PATH`` into an
    ``--out=-report ...`` folder: the prompts and ids are kept exactly, and nothing is written elsewhere."""
    from lorweb_fast.evaluation import tiny

    monkeypatch.chdir(tmp_path)
    ev = tiny.make_folder_evalset(tmp_path / f"evalset {SPECIAL}", tasks=("flip [x] é", "-swap #1: it's"),
                                  per_task=1)
    prompt = "make it: 'é' # {a,b} %20"
    (ev / "flip [x] é" / "000" / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    runs = "runs ü [1] {a,b}"
    base = ["--weights", assets / "lorweb.safetensors", *TINY_INFER]
    rc, stdout, err = run_cli(capsys, ["eval", "generate", "--evalset", ev.name + "/", "--model",
                                       str(assets / "pipe") + "/", "--out", runs + "/", *base])
    assert rc == 0 and stdout == f"eval generate: 2 generated, 0 already done, in {runs}\n", err
    ids = ["-swap #1: it's/000", "flip [x] é/000"]
    assert sorted(r["id"] for r in json.loads((tmp_path / runs / "evalset.json").read_text())) == ids
    assert (tmp_path / runs / "flip [x] é" / "000" / "prompt.txt").read_text(encoding="utf-8") == prompt + "\n"
    rc, stdout, err = run_cli(capsys, ["eval", "generate", "--evalset", ev, "--model", "./" + os.path.relpath(
        assets / "pipe"), "--out", tmp_path / runs, "--tasks", "flip [x] é", *base])
    assert rc == 0 and stdout == f"eval generate: 0 generated, 1 already done, in {tmp_path / runs}\n", err
    report = "-report #1 *? é"
    rc, stdout, err = run_cli(capsys, ["eval", "score", "--runs", f"ours={runs}/", "--encoder", assets / "clip",
                                       f"--out={report}/", "--device", "cpu", "--quiet"])
    assert rc == 0, err
    metrics = json.loads((tmp_path / report / "metrics.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in metrics["per_triplet"]] == ids and metrics["method"] == "ours"
    assert all(r["clip_dir"] is not None and r["lpips"] is not None for r in metrics["per_triplet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ev.name, runs, report, torch_home.name])


def test_eval_score_takes_a_runs_folder_name_holding_dollars(tmp_path, capsys, torch_home):
    from lorweb_fast.evaluation import tiny

    demo.build_tiny_clip(tmp_path / "clip")
    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2)
    tiny.make_runs_folder(tmp_path / "cost_$5_vs_$10", ev)
    rc, _, err = run_cli(capsys, ["eval", "score", "--runs", tmp_path / "cost_$5_vs_$10", "--encoder",
                                  tmp_path / "clip", "--out", tmp_path / "rep", "--device", "cpu", "--quiet"])
    assert rc == 0, err
    assert (tmp_path / "rep" / "preservation_vs_accuracy.png").is_file()


def test_summary_md_keeps_a_runs_folder_name_holding_a_bar_in_one_cell(tmp_path, capsys, torch_home):
    from lorweb_fast.evaluation import tiny

    demo.build_tiny_clip(tmp_path / "clip")
    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2)
    tiny.make_runs_folder(tmp_path / "v1|v2", ev)
    rc, _, err = run_cli(capsys, ["eval", "score", "--runs", tmp_path / "v1|v2", "--encoder", tmp_path / "clip",
                                  "--out", tmp_path / "rep", "--device", "cpu", "--quiet"])
    assert rc == 0, err
    lines = (tmp_path / "rep" / "summary.md").read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Model | Pres. (VLM)"))
    row = table_cells(lines[header + 2])
    assert len(row) == len(table_cells(lines[header])) and row[0].strip().replace("\\|", "|") == "v1|v2", row


# -------------------------------------------------------------------------------------------------------- demo
def test_demo_out_with_special_characters_and_a_leading_dash(tmp_path, monkeypatch, capsys):
    """``demo --out=-demo ... /`` (relative, a leading '-', a trailing slash, SPECIAL characters): every output is
    written in that folder, and summary.json names files that exist."""
    monkeypatch.chdir(tmp_path)
    out = f"-demo {SPECIAL}"
    rc, stdout, err = run_cli(capsys, ["demo", f"--out={out}/", "--steps", "1", "--samples", "2",
                                       "--inference-steps", "1", "--quiet"])
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == [out]
    assert sorted(os.listdir(tmp_path / out)) == ["analogy.png", "b_prime.png", "coefficients.png", "data",
                                                  "loss.png", "models", "summary.json", "train"]
    summary = json.loads((tmp_path / out / "summary.json").read_text(encoding="utf-8"))
    assert all(Path(f).is_file() and Path(f).resolve().parent == (tmp_path / out).resolve()
               for f in summary["files"].values())
