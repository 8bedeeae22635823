"""Fresh audit of ``lorweb-fast demo``, ``lorweb-fast data check|prepare``, ``python -m lorweb_fast.info`` and the
image inputs of ``lorweb-fast infer``, from the point of view of a new user following the README's Quick start,
Demo and data sections. Each test failed on the audited commit (608abfe) and states what the user should see instead.

CPU only, fast: the demo's builders and training are replaced by stand-ins where a test needs them, and the
Relation252K folders are the tiny ones of ``lorweb_fast.testing.relation252k_folder``.
"""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from lorweb_fast import demo, training
from lorweb_fast.testing import relation252k_folder, run_cli_in_process
from lorweb_fast.validation import DEMO_OUTPUTS


run_cli = run_cli_in_process


def snapshot(folder: Path):
    """Every path under ``folder`` with its bytes (None for folders)."""
    if not folder.exists():
        return None
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else None)
                  for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------------- demo
@pytest.fixture
def demo_interrupted_in_training(monkeypatch):
    """The demo's builders write their folders (as the real ones do, instantly), then training is interrupted
    (Ctrl-C) after it created its run folder."""

    def folder_maker(path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        return Path(path)

    def train(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "loss.jsonl").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", folder_maker)
    monkeypatch.setattr(demo, "build_tiny_clip", folder_maker)
    monkeypatch.setattr(demo, "make_synthetic_analogies", folder_maker)
    monkeypatch.setattr(training, "train", train)


def test_an_interrupted_demo_does_not_leave_a_folder_the_same_command_refuses_unsaid(tmp_path, capsys,
                                                                                     demo_interrupted_in_training):
    """cli.py ``run_demo`` / ``_continue_hint``: a demo stopped by Ctrl-C (the Quick start demo runs about a minute)
    or by a failure after its up-front checks leaves ``models/``, ``data/`` and ``train/`` in ``--out`` and prints
    only "lorweb-fast demo: interrupted"; running the same command again is then refused ("--out D already holds
    models, data, train, which the demo writes ..."). Seen for real: SIGINT during training, and
    ``--learning-rate 3e38`` (accepted up front) failing after training with advice for the Python API ("save with
    dtype=torch.bfloat16"), both leaving models/ data/ train/.

    Expected: the demo removes what this run wrote into ``--out`` when it stops early (so the same command runs
    again), or its interruption line says that ``--out`` holds a partial demo (naming the folder) to delete or
    replace. Either fix passes this test."""
    out = tmp_path / "demo_out"
    rc, _, err = run_cli(capsys, ["demo", "--out", out, "--quiet"])
    assert rc == 130, err
    left = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    interrupted = [line for line in err.splitlines() if "interrupted" in line]
    assert interrupted, err
    assert not left or str(out) in interrupted[0], (
        f"the interrupted demo left {left} in {out} (which makes the same command refuse --out) and said only "
        f"{interrupted[0]!r}")


# ---------------------------------------------------------------------------------------------- data prepare
def test_data_prepare_refuses_a_negative_seed_as_every_other_command(tmp_path, capsys):
    """validation.py ``check_data_args`` / data.py ``plan_analogies``: ``data prepare --seed -1`` is accepted, and
    ``random.Random`` seeds with the absolute value, so ``--max-analogies 2 --seed -1`` silently picks exactly the
    analogies of ``--seed 1`` (checked: identical file lists). ``infer``, ``train``, ``demo`` and ``eval generate``
    refuse a negative ``--seed`` ("--seed must be an integer in [0, ...]"). Expected: the same one-line refusal,
    exit status 2, before anything is written."""
    relation252k_folder(tmp_path / "rel", {"cat": [(16, 12)] * 4}, seed=0)
    out = tmp_path / "prepared"
    rc, _, err = run_cli(capsys, ["data", "prepare", tmp_path / "rel", out, "--max-analogies", "2", "--seed", "-1",
                                  "--quiet"])
    assert rc == 2 and "--seed" in err and len(err.strip().splitlines()) == 1, (rc, err)
    assert not out.exists()


def test_data_prepare_that_writes_no_analogy_at_all_does_not_exit_0(tmp_path, capsys):
    """data.py ``run_data`` / ``_prepare_locked``: when every analogy fails (here every Relation252K image is a palette
    PNG, whose b' the official script cannot save as JPEG either: README "a palette b' ... fails its analogy"),
    ``data prepare`` prints "3 analogies: 0 written, 0 already there, 3 failed", writes an empty
    ``analogy_metadata.json`` beside empty ``control/`` and ``target/`` folders, and exits 0; a script
    ``lorweb-fast data prepare SRC D && lorweb-fast train --data D`` goes on to a training folder with no sample.
    README: exit status 0 means done, 2 bad input. Expected: a non-zero exit status (2, with the report or one line
    saying no analogy could be written) when the run wrote no analogy and none was there before. Failing only some
    analogies (listed, run goes on) is not what this test is about."""
    relation252k_folder(tmp_path / "rel", {"cat": [(16, 12)] * 3}, seed=0)
    for image in (tmp_path / "rel" / "cat" / "Group1").glob("*.png"):
        with Image.open(image) as im:
            palette = im.convert("P")
        palette.save(image)
    out = tmp_path / "prepared"
    rc, stdout, err = run_cli(capsys, ["data", "prepare", tmp_path / "rel", out, "--quiet"])
    assert "0 written" in stdout or "no analog" in err.lower(), (stdout, err)
    assert not list((out / "target").glob("*.jpg")) if (out / "target").is_dir() else True
    assert rc != 0, f"data prepare wrote no analogy at all and exited {rc}: {stdout!r}"


def test_data_prepare_with_a_category_name_that_is_not_utf8(tmp_path, capsys):
    """data.py ``_prepare_locked``: a Relation252K category folder whose name is not UTF-8 (a zip extracted with
    Latin-1 names: ``caf\\xe9``) gets every analogy written, then the final ``analogy_metadata.json`` write fails with
    "lorweb-fast data prepare: error: 'utf-8' codec can't encode character '\\udce9' in position 36: surrogates not
    allowed" (exit 2), naming neither the file nor the category; the analogies stay without their metadata, and every
    rerun fails the same way at the end.

    Expected, either: the names are refused before anything is written, naming the category folder (exit 2); or the
    run succeeds (exit 0) with an ``analogy_metadata.json`` that lists the analogy under the id of its files (JSON's
    ``\\udce9`` escape reads back as the same Python name, which is what the loaders compare)."""
    relation252k_folder(tmp_path / "rel", {"cafe": [(16, 12)] * 2}, seed=0)
    src = tmp_path / "rel"
    os.rename(os.fsencode(src / "cafe"), os.fsencode(src) + b"/caf\xe9")
    out = tmp_path / "prepared"
    rc, _, err = run_cli(capsys, ["data", "prepare", src, out, "--quiet"])
    if rc == 0:
        metadata = out / "analogy_metadata.json"
        assert metadata.is_file()
        entries = json.loads(metadata.read_text(encoding="utf-8"))
        stems = sorted(p.stem for p in (out / "control").iterdir())
        assert sorted(e["analogy_id"] for e in entries) == stems, (entries, stems)
    else:
        assert rc == 2, err
        assert "caf" in err and "surrogates not allowed" not in err, err
        written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert written == [], f"refused after writing {written}"


# ------------------------------------------------------------------------------------------------ data check
def test_data_check_report_does_not_call_same_size_controls_saved_at_another_size(tmp_path, capsys):
    """data.py ``run_data``: ``data check DATA --layout strip`` on finished 2x2 grids (control and target of the same
    size) reports "controls shaped like their target, read as strips and stretched threefold (finished grids saved
    at another size?): 2, e.g. 0000: control 64x64, target 64x64": the hint contradicts its own example (same size).
    The library's warning for this case was fixed not to say "another size" and to name the layouts that read such
    controls as grids (tests/test_data_guards.py
    ``test_grid_like_controls_under_layout_strip_are_told_to_use_another_layout``), but ``data check`` silences that
    warning and prints this fixed line instead. Expected: the report line for same-size controls does not ask
    whether they were saved at another size (e.g. it says what the warning says: use --layout auto or grid)."""
    data = demo.make_synthetic_analogies(tmp_path / "grids", 2)
    rc, stdout, err = run_cli(capsys, ["data", "check", data, "--layout", "strip", "--quiet"])
    assert rc == 0, err
    line = next(line for line in stdout.splitlines() if "stretched threefold" in line)
    assert "control 64x64, target 64x64" in line
    assert "another size" not in line, line


def test_info_names_the_versions_of_the_libraries_the_version_bounds_are_about():
    """``python -m lorweb_fast.info`` (lorweb_fast/info.py ``collect``) printed lorweb_fast, python, torch and triton
    only: a bug report also needs diffusers, transformers, accelerate, peft, bitsandbytes and optimum-quanto (the
    README's version bounds and optional features). Each is reported from the installed metadata, "not installed"
    when absent."""
    from importlib import metadata

    from lorweb_fast import info

    collected = info.collect()
    for package in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "optimum-quanto"):
        try:
            want = metadata.version(package)
        except metadata.PackageNotFoundError:
            want = "not installed"
        assert collected[package] == want, (package, collected.get(package))
