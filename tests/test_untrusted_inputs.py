"""Files a user receives from someone else (a shared run folder, a downloaded checkpoint, a dataset folder, an
evaluation set or runs folder): names inside them never lead a writer outside its output folder, nothing in them is
unpickled or executed, oversized images / headers are clear errors, and no writer or cleanup writes or deletes
through a symlink planted in them.

The problems the audit found (writes through planted symlinks, deletes outside the folder, deeply nested JSON, a
FIFO named like an image, the AOT report's clean-up) are fixed; their tests guard the fixes."""

import ast
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorweb_fast import training
from lorweb_fast._files import FolderLock
from lorweb_fast.data import AnalogyDataError, AnalogyFolder, check_folder, prepare_relation252k, relation252k_pairs
from lorweb_fast.evaluation import tiny
from lorweb_fast.evaluation.evalsets import EvalInputError, read_evalset
from lorweb_fast.testing import (fake_checkpoint, random_rgb_image, relation252k_folder, small_train_config,
                                 tiny_train_config, tiny_training_assets)

PACKAGE = Path(training.__file__).resolve().parent
PRECIOUS = "precious user data\n"


def _victim(path: Path, text: str = PRECIOUS) -> Path:
    """A file of the user's outside every folder under test, holding ``text``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _files_under(root: Path) -> set:
    """Every file (or symlink) under ``root``, resolved to an absolute path (symlinked folders not followed)."""
    return {p.absolute() for p in Path(root).rglob("*") if p.is_file() or p.is_symlink()}


class _RunsCode:
    """Pickles to ``open(marker, "w")``: unpickling it (what ``weights_only=False`` would do) creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ------------------------------------------------------------------------------------------------ code execution
def _call_name(func) -> str:
    """``torch.load`` for ``torch.load(...)``, ``eval`` for ``eval(...)``, "" for anything else."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def test_source_has_no_unsafe_deserialisation_shell_or_disabled_image_limits():
    """Static scan of every module of the package: torch.load always with weights_only=True, no yaml.load /
    full_load / unsafe_load (only safe_load), no pickle / marshal / dill loads, no numpy allow_pickle, no builtin
    eval / exec, no subprocess call with shell=True, and nothing assigns PIL's MAX_IMAGE_PIXELS or
    LOAD_TRUNCATED_IMAGES (which would switch off the decompression-bomb and truncation checks)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                name = _call_name(node.func)
                kwargs = {k.arg: k.value for k in node.keywords if k.arg}
                if name == "torch.load":
                    wo = kwargs.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if name in ("yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load", "yaml.unsafe_load_all",
                            "pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load", "dill.loads"):
                    problems.append(f"{where}: {name}")
                if name in ("eval", "exec"):
                    problems.append(f"{where}: builtin {name}")
                shell = kwargs.get("shell")
                if isinstance(shell, ast.Constant) and shell.value is True:
                    problems.append(f"{where}: {name or 'call'} with shell=True")
                pickle_ok = kwargs.get("allow_pickle")
                if isinstance(pickle_ok, ast.Constant) and pickle_ok.value is True:
                    problems.append(f"{where}: {name} with allow_pickle=True")
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("MAX_IMAGE_PIXELS", "LOAD_TRUNCATED_IMAGES"):
                    problems.append(f"{where}: assigns {target.attr}")
    assert not problems, "\n".join(problems)


def test_importing_the_package_leaves_pillows_decompression_bomb_limit_in_place():
    """Importing every entry point (CLI, data, training, pipeline, evaluation) keeps PIL.Image.MAX_IMAGE_PIXELS at
    Pillow's default: no module switches the decompression-bomb check off at import time."""
    import importlib

    for name in ("cli", "data", "training", "flux", "demo", "lora_api", "official_config", "evaluation.cli",
                 "evaluation.evalsets", "evaluation.generate", "evaluation.score", "evaluation.judge",
                 "evaluation.report", "evaluation.metrics", "evaluation.tiny"):
        importlib.import_module(f"lorweb_fast.{name}")
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


def test_a_trainer_state_that_pickles_code_is_refused_without_running_it(tmp_path):
    """A shared run folder's checkpoints/step-*/trainer_state.pt whose pickle calls a function (here open(marker,
    "w")) is refused when a resume looks for a checkpoint (weights_only load): ValueError naming the file, and the
    pickled call never runs."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    cfg = small_train_config(out)
    state = {"step": 2, "optimizer": {"state": {}, "param_groups": []}, "config": training._comparable_config(cfg),
             "extra": _RunsCode(marker)}
    fake_checkpoint(out, 2, cfg, state=state)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="trainer_state.pt"):
        training.find_resumable_checkpoint(out)
    assert not marker.exists()


def test_lpips_weights_that_pickle_code_are_refused_without_running_it(tmp_path):
    """``eval score --lpips-weights FILE`` with a downloaded file whose pickle calls a function: EvalInputError
    naming the file (weights_only load), the call never runs."""
    pytest.importorskip("lpips")
    from lorweb_fast.evaluation.metrics import LPIPSDistance

    marker, weights = tmp_path / "pwned", tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": _RunsCode(marker)}, weights)
    with pytest.raises(EvalInputError, match="alexnet.pth"):
        LPIPSDistance("alex", weights=weights)
    assert not marker.exists()


def test_a_config_yaml_with_python_tags_is_refused_without_running_them(tmp_path):
    """A checkpoint folder's config.yaml with a ``!!python/object/apply`` tag is read with yaml.safe_load:
    LoRWeBConfigError naming the file, the tag's call never runs."""
    from lorweb_fast.official_config import LoRWeBConfigError, read_config_yaml

    marker = tmp_path / "pwned"
    config = tmp_path / "config.yaml"
    config.write_text(f"config: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(LoRWeBConfigError, match="config.yaml"):
        read_config_yaml(config)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- resource exhaustion
def _strip_dataset(root: Path, names=("s0", "s1"), *, seed: int = 0) -> Path:
    """control/<name>.png a|a'|b strips (3 x 20x14 cells), target/<name>.png b' (24x18), target/<name>.txt."""
    rng = np.random.default_rng(seed)
    for sub in ("control", "target"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        random_rgb_image(rng, 60, 14).save(root / "control" / f"{name}.png")
        random_rgb_image(rng, 24, 18).save(root / "target" / f"{name}.png")
        (root / "target" / f"{name}.txt").write_text(f"caption of {name}")
    return root


def test_decompression_bombs_are_clear_errors_in_data_check_and_prepare(tmp_path, monkeypatch):
    """An image over twice PIL.Image.MAX_IMAGE_PIXELS (limit lowered here so tiny files count as bombs) is an
    AnalogyDataError naming the file and the limit in the training-folder scan, and a skipped, reported image in
    ``data prepare``'s Relation252K reader, never a decode of the whole image."""
    root = _strip_dataset(tmp_path / "data")
    src = tmp_path / "rel"
    relation252k_folder(src, {"cat": [(16, 16), (16, 16)]}, seed=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 60 x 14 = 840 pixels > 2 x 100
    with pytest.raises(AnalogyDataError, match="too large to decode.*MAX_IMAGE_PIXELS"):
        AnalogyFolder(root, resize="long-edge")
    unreadable = []
    with pytest.warns(UserWarning, match="cannot be decoded"):
        pairs = relation252k_pairs(src, progress=False, unreadable=unreadable)
    assert pairs == [] and len(unreadable) == 2
    assert all("DecompressionBombError" in error for _, error in unreadable)


def test_decompression_bombs_are_clear_errors_in_eval_generate(tmp_path, monkeypatch):
    """``eval generate`` checks every input of a downloaded evaluation set before any model loads: an image over
    Pillow's limit is an EvalInputError naming the file and the limit."""
    from lorweb_fast.evaluation.generate import _check_inputs_decode

    evalset = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=1, size=(32, 32))
    triplets = read_evalset(evalset)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 = 1024 pixels > 2 x 100
    with pytest.raises(EvalInputError, match="too large to decode.*MAX_IMAGE_PIXELS"):
        _check_inputs_decode(triplets, progress=False)


@pytest.mark.parametrize("header", [
    pytest.param(struct.pack("<Q", 2 ** 62) + b"{}", id="header-length-2^62"),
    pytest.param(b"\xff" * 8, id="header-length-max"),
    pytest.param(None, id="tensor-beyond-the-file"),
])
def test_absurd_safetensors_headers_are_checkpoint_errors(tmp_path, header):
    """A downloaded .safetensors whose header length or tensor offsets are absurd (a 2^62-byte header, a 4 TB
    tensor in a tiny file) is a LoRWeBCheckpointError naming the file, raised from the header alone: no
    allocation of the claimed sizes, no hang."""
    from lorweb_fast.model import LoRWeBCheckpointError, checkpoint_metadata, read_checkpoint

    if header is None:
        text = json.dumps({"x": {"dtype": "F32", "shape": [10 ** 12], "data_offsets": [0, 4 * 10 ** 12]}}).encode()
        header = struct.pack("<Q", len(text)) + text
    path = tmp_path / "lorweb.safetensors"
    path.write_bytes(header)
    for read in (checkpoint_metadata, read_checkpoint):
        with pytest.raises(LoRWeBCheckpointError, match="lorweb.safetensors"):
            read(path)


NESTED = "[" * 200_000 + "]" * 200_000  # a small file (400 KB) nested far beyond Python's recursion limit


def _nested_analogy_metadata(tmp_path):
    root = _strip_dataset(tmp_path / "data")
    (root / "analogy_metadata.json").write_text(NESTED)
    return lambda: AnalogyFolder(root, resize="long-edge"), AnalogyDataError


def _nested_prepare_labels(tmp_path):
    src = tmp_path / "rel"
    relation252k_folder(src, {"cat": [(16, 16), (16, 16)]}, seed=0)
    (src / "cat" / "Group1" / "labels.json").write_text(NESTED)
    return lambda: relation252k_pairs(src, progress=False), AnalogyDataError


def _nested_eval_labels(tmp_path):
    src = tmp_path / "rel"
    relation252k_folder(src, {"cat": [(16, 16), (16, 16)]}, seed=0)
    (src / "cat" / "Group1" / "labels.json").write_text(NESTED)
    return lambda: read_evalset(src, "relation252k"), EvalInputError


def _nested_run_json(tmp_path):
    from lorweb_fast.evaluation.generate import check_run_settings

    out = tmp_path / "runs"
    out.mkdir()
    (out / "run.json").write_text(NESTED)
    return lambda: check_run_settings(out, {}, write=False), EvalInputError


@pytest.mark.parametrize("case", [
    pytest.param(_nested_analogy_metadata, id="analogy_metadata.json"),
    pytest.param(_nested_prepare_labels, id="prepare-labels.json"),
    pytest.param(_nested_eval_labels, id="evalset-labels.json"),
    pytest.param(_nested_run_json, id="run.json"),
])
def test_deeply_nested_json_is_the_readers_error_naming_the_file(tmp_path, case):
    """A received JSON file nested 200000 levels deep (analogy_metadata.json of a dataset, a Relation252K
    labels.json, a resumed runs folder's run.json) is the reader's own error (AnalogyDataError / EvalInputError,
    which the CLI prints as one line, exit 2) naming the file, not an uncaught RecursionError."""
    call, error = case(tmp_path)
    with pytest.raises(error, match="json"):
        call()


def test_a_fifo_in_the_target_folder_does_not_hang_the_dataset_scan(tmp_path):
    """A dataset folder (e.g. unpacked from a tar archive) with a FIFO named like a target image: the scan must
    finish (the entry skipped as not a file, or an AnalogyDataError naming it), not block on opening it. Control
    images, captions and the evaluation readers already skip what is not a regular file."""
    root = _strip_dataset(tmp_path / "data", names=("s0",))
    (root / "control" / "s1.png").write_bytes((root / "control" / "s0.png").read_bytes())
    fifo = root / "target" / "s1.png"
    os.mkfifo(fifo)
    result = {}

    def scan():
        try:
            result["dataset"] = AnalogyFolder(root, resize="long-edge", skip_bad=True)
        except AnalogyDataError as exc:
            result["error"] = exc

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    if not hung:  # skipped by name (skip_bad), the other sample kept
        assert result["dataset"].skipped == ["s1"] and "not a regular file" in result["dataset"].problems[0]
    if hung:  # unblock the reader: open the FIFO for writing and close it (the reader then sees EOF)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(5)
    assert not hung, "AnalogyFolder blocked on the FIFO target/s1.png"


# ------------------------------------------------------------------------------------- path traversal, reading
def test_data_prepare_labels_with_traversal_names_write_nothing_outside_out(tmp_path):
    """A downloaded Relation252K labels.json whose img_name is ``../../outside/x.png`` or an absolute path: the image
    may be read (reading through a name is allowed) but the analogy id would hold a path separator, so its analogies
    fail (reported in ``failed``, left out of analogy_metadata.json) and nothing is written outside ``out``; the
    other analogies are written as usual."""
    src, out, outside = tmp_path / "rel", tmp_path / "prepared", tmp_path / "outside"
    relation252k_folder(src, {"cat": [(16, 16), (16, 16)]}, seed=0)
    outside.mkdir()
    pair = np.concatenate([np.full((16, 16, 3), 90, np.uint8), np.full((16, 16, 3), 160, np.uint8)], axis=1)
    for name in ("x.png", "y.png"):
        Image.fromarray(pair).save(outside / name)
    labels_path = src / "cat" / "Group1" / "labels.json"
    labels = json.loads(labels_path.read_text())
    for name in ("../../../outside/x.png", str(outside / "y.png")):
        labels.append({"img_name": name, "edit_instruction": "e", "left_image_description": "l",
                       "right_image_description": "r"})
    labels_path.write_text(json.dumps(labels))
    outside_before = {p: p.read_bytes() for p in outside.iterdir()}
    everything_before = _files_under(tmp_path)
    report = prepare_relation252k(src, out, progress=False)
    assert report["analogies"] == 6 and report["written"] == 1 and len(report["failed"]) == 5
    assert all("path separator" in error for _, error in report["failed"])
    new = _files_under(tmp_path) - everything_before
    assert new and all(out.absolute() in p.parents for p in new), sorted(map(str, new))
    assert {p: p.read_bytes() for p in outside.iterdir()} == outside_before
    entries = json.loads((out / "analogy_metadata.json").read_text())
    assert [e["analogy_id"] for e in entries] == ["analogy_cat_img0.png_cat_img1.png_0000"]


def test_data_check_dump_stays_inside_dump_and_replaces_planted_symlinks(tmp_path):
    """``data check --dump`` of a received dataset: analogy_metadata.json entries whose ids and file paths hold
    ``..`` or absolute paths are only captions keyed by name (never opened), a nested target's name is flattened
    (``sub/s2`` -> ``sub__s2``), a symlinked target image pointing outside the folder is read (allowed), and the dump
    writes only inside its folder: a symlink planted there under an output name is replaced, its target untouched."""
    root, dump = _strip_dataset(tmp_path / "data"), tmp_path / "dump"
    outside_image, victim = tmp_path / "outside" / "b.png", _victim(tmp_path / "outside" / "victim.txt")
    random_rgb_image(np.random.default_rng(5), 24, 18).save(outside_image)
    (root / "target" / "sub").mkdir()
    random_rgb_image(np.random.default_rng(6), 24, 18).save(root / "target" / "sub" / "s2.png")
    random_rgb_image(np.random.default_rng(7), 60, 14).save(root / "control" / "s2.png")
    random_rgb_image(np.random.default_rng(8), 60, 14).save(root / "control" / "s3.png")
    os.symlink(outside_image, root / "target" / "s3.png")
    (root / "analogy_metadata.json").write_text(json.dumps([
        {"analogy_id": "../../outside/evil", "edit_prompt": "x", "control_image_path": str(victim),
         "target_image_path": "../../outside/victim.txt", "caption_path": "/etc/passwd"},
        {"analogy_id": "s0", "edit_prompt": "from the metadata", "control_image_path": "../../outside/victim.txt"}]))
    dump.mkdir()
    os.symlink(victim, dump / "s0_target.png")
    os.symlink(victim, dump / "s0_caption.txt")
    before = _files_under(tmp_path)
    report = check_folder(root, dump=dump, resize="long-edge", progress=False)
    assert report["samples"] == 4 and report["problems"] == []
    assert victim.read_text() == PRECIOUS
    new = _files_under(tmp_path) - before
    assert all(p.parent == dump.absolute() for p in new), sorted(map(str, new))
    assert {p.name for p in dump.iterdir()} == {f"{n}_{kind}" for n in ("s0", "s1", "sub__s2", "s3")
                                                for kind in ("target.png", "control.png", "caption.txt")}
    assert not (dump / "s0_target.png").is_symlink() and (dump / "s0_caption.txt").read_text() == \
        "from the metadata\n"


def _fake_pipe(a, a_prime, b, prompts, **kwargs):
    """Stands in for LoRWeBKontextPipeline in ``generate``: b' = b."""
    return list(b)


def test_eval_generate_writes_only_inside_out_for_an_evalset_with_traversal_names(tmp_path):
    """A downloaded Relation252K-layout evaluation set whose labels name images as ``../../../outside/x.png`` and by
    absolute path, plus a symlinked task folder pointing outside the set: the images are read (allowed), but every
    file ``eval generate`` writes lies under ``--out`` (task and id come from folder names and file stems, never a
    path), and a symlink planted in a resumed runs folder under an output name is replaced, its target untouched."""
    from lorweb_fast.evaluation.generate import generate

    ev, out, outside = tmp_path / "ev", tmp_path / "runs", tmp_path / "outside"
    relation252k_folder(ev, {"cat": [(16, 16), (16, 16)]}, seed=0)
    relation252k_folder(outside / "elsewhere", {"linked": [(16, 16), (16, 16)]}, seed=1)
    os.symlink(outside / "elsewhere" / "linked", ev / "linked")
    pair = np.concatenate([np.full((16, 16, 3), 90, np.uint8), np.full((16, 16, 3), 160, np.uint8)], axis=1)
    Image.fromarray(pair).save(outside / "x.png")
    Image.fromarray(pair).save(outside / "y.png")
    labels_path = ev / "cat" / "Group1" / "labels.json"
    labels = json.loads(labels_path.read_text())
    labels += [{"img_name": "../../../outside/x.png", "edit_instruction": "e"},
               {"img_name": str(outside / "y.png"), "edit_instruction": "e"}]
    labels_path.write_text(json.dumps(labels))
    victim = _victim(outside / "victim.txt")
    triplets = read_evalset(ev, "relation252k")
    assert {t.task for t in triplets} == {"cat", "linked"} and len(triplets) == 6
    before = _files_under(tmp_path)
    assert generate(_fake_pipe, triplets, out, seeds=(1,), device="cpu", progress=False)["generated"] == 6
    new = _files_under(tmp_path) - before
    assert new and all(out.absolute() in p.parents for p in new), sorted(map(str, new))
    item = out / triplets[0].task / triplets[0].id
    (item / "a.png").unlink()
    os.symlink(victim, item / "a.png")
    (item / "b_prime.png").unlink()  # unfinished: the resumed run writes this triplet again
    assert generate(_fake_pipe, triplets, out, seeds=(1,), device="cpu", progress=False)["generated"] == 1
    assert victim.read_text() == PRECIOUS and not (item / "a.png").is_symlink()


# --------------------------------------------------------------------------------- writing through symlinks
@pytest.mark.parametrize("name", [".lorweb-train.lock", ".lorweb-generate.lock", ".lorweb-prepare.lock"])
def test_a_planted_lock_symlink_does_not_overwrite_its_target(tmp_path, name):
    """A received run / runs / dataset folder holding its lock file as a symlink to a file of the user's: taking
    and releasing the folder's lock (every ``train``, ``eval generate`` and ``data prepare`` run does) leaves that
    file as it was (the lock replaces the symlink, or refuses it)."""
    out, victim = tmp_path / "shared", _victim(tmp_path / "home" / ".bashrc")
    out.mkdir()
    os.symlink(victim, out / name)
    lock = FolderLock(out, name, "run")
    try:
        lock.acquire()  # the symlink is replaced by the lock file
        assert (out / name).is_file() and not (out / name).is_symlink()
    finally:
        lock.release()
    assert victim.read_text() == PRECIOUS and not (out / name).exists()


def test_data_prepare_into_a_folder_with_a_planted_lock_symlink_keeps_its_target(tmp_path):
    """End to end: ``data prepare SRC OUT`` where OUT (a dataset folder received to be extended) holds
    ``.lorweb-prepare.lock`` as a symlink to the user's file: the file is not overwritten."""
    src, out, victim = tmp_path / "rel", tmp_path / "prepared", _victim(tmp_path / "home" / "notes.txt")
    relation252k_folder(src, {"cat": [(16, 16), (16, 16)]}, seed=0)
    out.mkdir()
    os.symlink(victim, out / ".lorweb-prepare.lock")
    try:
        prepare_relation252k(src, out, progress=False)
    except (AnalogyDataError, ValueError):
        pass  # refusing the symlink is a fix too
    assert victim.read_text() == PRECIOUS


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    """The tiny FLUX.1-Kontext pipeline, CLIP and a 4-sample dataset of ``tiny_training_assets``."""
    return tiny_training_assets(tmp_path_factory.mktemp("untrusted_train"), 4)


def _train(assets, out, **over):
    cfg = tiny_train_config(assets, out, **{"steps": 1, "checkpoint_every": 1, **over})
    return training.train(cfg)


def test_resuming_a_shared_run_never_writes_through_symlinked_run_files(train_assets, tmp_path):
    """A run folder received from someone (a real run, one checkpoint) in which loss.jsonl and train_config.json
    were replaced by symlinks to the user's files: ``train --resume`` into it (refused, or resumed with the symlinks
    replaced) leaves those files as they were. Today the resume truncates the loss.jsonl target and overwrites the
    train_config.json target."""
    out = tmp_path / "shared_run"
    _train(train_assets, out)
    log_victim = _victim(tmp_path / "home" / ".bashrc")
    config_victim = _victim(tmp_path / "home" / ".profile")
    for name, victim in (("loss.jsonl", log_victim), ("train_config.json", config_victim)):
        (out / name).unlink()
        os.symlink(victim, out / name)
    try:
        _train(train_assets, out, steps=2, resume=True)
    except ValueError:
        pass  # refusing the symlinks is a fix too
    assert log_victim.read_text() == PRECIOUS
    assert config_victim.read_text() == PRECIOUS


def test_training_into_a_folder_with_dangling_symlinks_creates_nothing_outside_it(train_assets, tmp_path):
    """A received folder holding only dangling symlinks named like the run's files and temporaries
    (``.lorweb.safetensors.tmp``, ``.config.yaml.tmp``, ``loss.jsonl``, ``train_config.json``) pointing to paths
    outside it: ``train`` into it (refused, or run with the links replaced) creates no file outside the folder.
    Today every one of them is created, and lorweb.safetensors / config.yaml end up as symlinks to the outside."""
    out, home = tmp_path / "run", tmp_path / "home"
    out.mkdir()
    home.mkdir()
    for name in (".lorweb.safetensors.tmp", ".config.yaml.tmp", "loss.jsonl", "train_config.json"):
        os.symlink(home / f"created-through-{name.lstrip('.')}", out / name)
    try:
        _train(train_assets, out)
    except ValueError:
        pass  # refusing the symlinks is a fix too
    assert sorted(p.name for p in home.iterdir()) == []


def test_overwrite_unlinks_symlinked_run_files_and_keeps_their_targets(train_assets, tmp_path):
    """``train --overwrite`` into a folder whose run files (loss.jsonl, train_config.json, config.yaml,
    lorweb.safetensors) are symlinks to the user's files deletes the links only (clear_run unlinks), never the
    files they point to, and the new run's files are regular files in the run folder."""
    out = tmp_path / "run"
    out.mkdir()
    victims = {name: _victim(tmp_path / "home" / f"{name}.bak") for name in
               ("loss.jsonl", "train_config.json", "config.yaml", "lorweb.safetensors")}
    for name, victim in victims.items():
        os.symlink(victim, out / name)
    _train(train_assets, out, overwrite=True)
    assert all(v.read_text() == PRECIOUS for v in victims.values())
    assert all((out / name).is_file() and not (out / name).is_symlink() for name in victims)


def test_overwrite_with_a_symlinked_checkpoints_folder_keeps_what_it_points_to(train_assets, tmp_path):
    """``train --overwrite`` into a run folder whose checkpoints/ is a symlink to another run's checkpoints: the
    other run's step folders survive (the link is removed, or the overwrite refused); today the new step-00000001
    replaces the other run's step-00000001 through the link."""
    other = tmp_path / "other_run" / "checkpoints" / "step-00000001"
    other.mkdir(parents=True)
    marker = _victim(other / "marker.txt", "the other run's checkpoint\n")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(other.parent, out / "checkpoints")
    with pytest.raises(ValueError, match=r"checkpoints/ is a symlink .*--overwrite deletes a run's checkpoints only "
                                         r"inside --out"):
        _train(train_assets, out, overwrite=True, keep_checkpoints=1, keep_milestone_every=0)
    assert marker.is_file() and marker.read_text() == "the other run's checkpoint\n"
    assert (out / "checkpoints").is_symlink()


def test_startup_cleanup_does_not_delete_through_a_symlinked_step_folder(tmp_path):
    """A received run folder whose checkpoints/step-00000002 is a symlink to a folder of the user's: the start-up
    cleanup of a killed run's temporaries (every ``train`` into the folder runs it) deletes nothing in that folder,
    whatever ``train`` then decides about the run."""
    mine = tmp_path / "home" / "project"
    keep = _victim(mine / ".draft.kept")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    os.symlink(mine, out / "checkpoints" / "step-00000002")
    try:
        training.prepare_output(small_train_config(out, resume=True))
    except ValueError:
        pass  # no usable checkpoint: refused, after the cleanup
    assert keep.is_file()


def test_checkpoint_rotation_does_not_delete_through_a_symlinked_step_folder(tmp_path):
    """Rotation of old checkpoints (``keep_checkpoints``) over a checkpoints/ folder in which an old step-* entry is a
    symlink to a folder of the user's: the folder and its files survive (shutil.rmtree refuses symlinks)."""
    mine = tmp_path / "home" / "project"
    keep = _victim(mine / "notes.txt")
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)
    os.symlink(mine, out / "checkpoints" / "step-00000002")
    training.rotate_checkpoints(out, keep=1, milestone_every=0)
    assert keep.read_text() == PRECIOUS


def test_resumed_scoring_does_not_append_through_a_symlinked_metric_cache(tmp_path):
    """``eval score`` into a report folder received from someone (to resume its caches) whose
    cache/<run>/metrics.jsonl is a symlink to the user's file: the file is left as it was (the cache is written
    beside it, or the symlink refused). The judge cache and the report files are already written atomically."""
    from lorweb_fast import demo
    from lorweb_fast.evaluation.score import score

    demo.build_tiny_clip(tmp_path / "clip")
    runs = tiny.make_runs_folder(tmp_path / "ours",
                                 tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=1))
    report, victim = tmp_path / "report", _victim(tmp_path / "home" / ".bashrc")
    (report / "cache" / "ours").mkdir(parents=True)
    os.symlink(victim, report / "cache" / "ours" / "metrics.jsonl")
    try:
        score({"ours": runs}, report, metrics=["clip_dir"], encoder=str(tmp_path / "clip"), progress=False,
              device="cpu")
    except (EvalInputError, ValueError):
        pass  # refusing the symlink is a fix too
    assert victim.read_text() == PRECIOUS


def test_aot_report_deletes_only_the_ptx_files_of_an_earlier_report(tmp_path, monkeypatch):
    """``python -m lorweb_fast.aot --out DIR`` into a folder that also holds PTX files of the user's: only the PTX
    files an earlier report.json lists are removed as stale; the user's are kept (compilation stubbed out)."""
    pytest.importorskip("triton")
    from lorweb_fast import aot

    out = tmp_path / "ptx"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"arch": 90, "triton": "x", "kernels": [{"ptx": "old-k.ptx"}]}))
    (out / "old-k.ptx").write_text("stale")
    mine = _victim(out / "my_hand_written_kernel.ptx", "// mine\n")
    monkeypatch.setattr(aot, "plan", lambda *a, **k: ([], {}))
    monkeypatch.setattr(aot, "compile_all", lambda *a, **k: {})
    aot.build_report(90, out, progress=False)
    assert not (out / "old-k.ptx").exists()
    assert mine.read_text() == "// mine\n"


def test_a_fifo_planted_as_the_metric_cache_does_not_hang_scoring(tmp_path):
    """Found by the session review: a FIFO at ``cache/<run>/metrics.jsonl`` made the cache's append block forever
    (opening a FIFO for writing waits for a reader). ``_files.append_text`` replaces it, as a planted symlink."""
    from lorweb_fast.evaluation.score import MetricCache

    path = tmp_path / "metrics.jsonl"
    os.mkfifo(path)
    done = {}

    def put():
        cache = MetricCache(path)
        cache.put_many([("t/0", "clip_dir", "sig", 0.5)])
        done["ok"] = True

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    if hung:  # unblock it: a reader for the FIFO
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)
    assert not hung and done.get("ok")
    assert path.is_file() and MetricCache(path).get("t/0", "clip_dir", "sig") == 0.5
