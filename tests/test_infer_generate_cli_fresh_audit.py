"""Fresh audit of the inference and generation command lines (``lorweb-fast infer`` and ``lorweb-fast eval
generate``) as a demanding user meets them. Each test below FAILS on the code as audited and states the behaviour
it expects; report: /tmp/rev/infer_generate_cli.md.

Found:
- infer: ``--coefficients-plot`` naming one of the input images (``--a`` / ``--a-prime`` / ``--b``) is accepted, and the
  heat map then replaces that input picture (``--out`` is refused for the same mistake: "b' would replace it").
- eval generate, official resolution: an a of aspect ratio 2:1 or wider (any ``official_grid_problem``) is
  found only after the models loaded, after run.json and evalset.json were written (and after earlier batches
  ran), with an API-worded message ("a[0] is ...; use resolution='native'") that names neither the triplet nor the
  flag; ``infer`` refuses the same input before any model loads.
- eval generate: ``--b-per-pair`` / ``--pair-seed`` with a layout that does not use them (the folder layout) are
  silently ignored (and still recorded and compared on resume), where ``--pairs`` with another layout is refused.
- eval generate: evalset.json records the input paths as typed (relative to the working directory of the call),
  while run.json records the evaluation set resolved; a record then names no file from anywhere else.
- eval generate: a resume that spells out the default ``--long-edge`` (1024) is refused as "other settings"
  (``long_edge: None -> 1024``), though it runs exactly the same generation (the step count and the encoder dtype
  are recorded resolved for that reason).

Nothing is downloaded; the models are the tiny ones of ``lorweb_fast.testing.build_tiny_lorweb_assets`` and, where
only the command line's wiring matters, the pipeline loader is replaced by a recorder.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorweb_fast import demo, flux
from lorweb_fast.evaluation import tiny
from lorweb_fast.testing import build_tiny_lorweb_assets, run_cli_in_process

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny pipeline folder ``pipe``, tiny CLIP ``clip``, checkpoint ``lorweb.safetensors`` and three input images."""
    root = build_tiny_lorweb_assets(tmp_path_factory.mktemp("infer_generate_audit"))
    for i, name in enumerate(("a", "a_prime", "b")):
        Image.new("RGB", (32, 32), (60 * i, 80, 120)).save(root / f"{name}.png")
    return root


class EchoPipe:
    """Stands in for a loaded LoRWeBKontextPipeline: records every call, returns b-sized b' images."""

    def __init__(self):
        self.calls = []
        self.pipe = type("Stock", (), {"_execution_device": torch.device("cpu")})()
        self.transformer = "the transformer"

    def __call__(self, a, a_prime, b, prompt, **kwargs):
        self.calls.append(kwargs)
        images = b if isinstance(b, list) else [b]
        return [Image.new("RGB", im.size, (7, 7, 7)) for im in images]


@pytest.fixture
def loader(monkeypatch):
    """``LoRWeBKontextPipeline.from_pretrained`` recorded (returns an EchoPipe) and ``plot_coefficients`` recorded:
    nothing loads, nothing is drawn. Returns the list of loads."""
    loads = []

    def from_pretrained(*args, **kwargs):
        loads.append((args, kwargs))
        return EchoPipe()

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(flux, "plot_coefficients", lambda transformer, path: Path(path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return loads


def generate_argv(assets, evalset, out, *extra):
    return ["eval", "generate", "--evalset", str(evalset), "--weights", str(assets / "lorweb.safetensors"),
            "--model", str(assets / "pipe"), "--out", str(out), "--steps", "2", "--dtype", "fp32", "--device", "cpu",
            "--pipe-arg", f"max_sequence_length={demo.DEMO_MAX_SEQUENCE_LENGTH}", "--quiet", *map(str, extra)]


# --------------------------------------------------------------------------------------------------------- infer
@pytest.mark.parametrize("role", ["a", "a_prime", "b"])
def test_infer_refuses_a_coefficients_plot_that_is_an_input_image(assets, tmp_path, loader, capsys, role):
    """cli.py ``run_infer`` / validation.py ``check_infer_args``: ``--coefficients-plot`` naming one of the input
    images is refused before any model loads (one line naming the flag, exit 2), as ``--out`` naming an input is
    ("b' would replace it"). As audited it is accepted and the heat map is written over the input picture (seen
    end to end with the tiny models: a.png became a 720x528 RGBA matplotlib figure)."""
    inputs = {}
    for name in ("a", "a_prime", "b"):
        inputs[name] = tmp_path / f"{name}.png"
        shutil.copy(assets / f"{name}.png", inputs[name])
    argv = ["infer", "--a", inputs["a"], "--a-prime", inputs["a_prime"], "--b", inputs["b"], "--prompt", "p",
            "--weights", assets / "lorweb.safetensors", "--model", assets / "pipe", "--resolution", "native",
            "--out", tmp_path / "b_prime.png", "--coefficients-plot", inputs[role]]
    rc, _, err = run_cli_in_process(capsys, argv)
    assert rc == 2, f"--coefficients-plot {inputs[role].name} (an input image) was accepted"
    line = err.strip()
    assert "--coefficients-plot" in line and "\n" not in line
    assert loader == []  # refused before any model loads


# ------------------------------------------------------------------------------------------------- eval generate
def test_eval_generate_refuses_an_a_the_official_resolution_cannot_use_before_loading(assets, tmp_path, monkeypatch,
                                                                                     capsys):
    """evaluation/generate.py ``run_generate``: at the official resolution (the default) an a that the official
    crops cannot use (here 96x32, aspect ratio 3:1: the official query has no b to crop; likewise the other
    ``official_grid_problem`` cases) is refused before any model loads and before anything is written, in one line
    naming the triplet (or its a file) and ``--resolution native``, as ``infer`` refuses it (validation.py
    ``check_infer_args`` with flux.py ``official_grid_problem``; README "Resolution": "an a of aspect ratio 2:1 or
    wider leaves the official crops no b (as in the official code): an error naming a and the native mode"). As
    audited the command loads the models, writes run.json and evalset.json, and then fails inside the pipeline call
    with "a[0] is 96x32: ... use resolution='native' ..." (the API's words; no triplet named)."""

    def no_load(*args, **kwargs):
        raise AssertionError("the models were loaded before the evaluation set's a was checked")

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", staticmethod(no_load))
    evalset = tmp_path / "evalset"
    item = evalset / "flip" / "000"
    item.mkdir(parents=True)
    for i, name in enumerate(("a", "a_prime", "b")):
        Image.new("RGB", (96, 32), (60 * i, 80, 120)).save(item / f"{name}.png")
    (item / "prompt.txt").write_text("mirror the image\n")
    out = tmp_path / "runs"
    rc, _, err = run_cli_in_process(capsys, generate_argv(assets, evalset, out))
    line = err.strip()
    assert rc == 2 and "\n" not in line
    assert "--resolution native" in line
    assert "flip/000" in line or str(evalset / "flip" / "000" / "a.png") in line
    assert not out.exists()


@pytest.mark.parametrize("extra", [("--b-per-pair", "3"), ("--pair-seed", "7")])
def test_eval_generate_does_not_silently_ignore_b_choice_options_of_another_layout(assets, tmp_path, loader, capsys,
                                                                                  extra):
    """evaluation/generate.py ``run_generate`` / evalsets.py ``read_evalset``: ``--b-per-pair`` and ``--pair-seed``
    choose b images in the released LoRWeB set (and ``--pair-seed`` in Relation252k); the folder layout fixes every
    b, so with it they change nothing. Given explicitly there, they are refused before any model loads (one line
    naming the flag, exit 2) or at least warned about naming the flag, as ``--pairs`` with another layout is refused
    (README "Bad input ... --pairs with a layout other than the released set"). As audited they are silently
    ignored: ``--b-per-pair 3`` still gives one b per (a, a'), and both are recorded in run.json and compared on
    resume."""
    evalset = tiny.make_folder_evalset(tmp_path / "evalset", tasks=("flip",), per_task=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_cli_in_process(capsys, generate_argv(assets, evalset, tmp_path / "runs", "--resolution",
                                                              "native", *extra))
    flag = extra[0]
    refused = rc == 2 and flag in err and loader == []
    warned = rc == 0 and any(flag in str(w.message) for w in caught)
    assert refused or warned, f"{' '.join(extra)} with the folder layout was silently ignored (exit {rc})"


def test_eval_generate_evalset_json_names_the_inputs_from_any_directory(assets, tmp_path, loader, capsys,
                                                                        monkeypatch):
    """evaluation/generate.py ``_record_triplets`` (evalsets.py ``ImageRef.describe``): evalset.json says "where every
    input came from" (README "Runs folders"); a record must name its file whatever the directory it is read from:
    an absolute path, or a path relative to the evaluation set run.json records (resolved). As audited the paths
    are recorded as typed, relative to the working directory of the call ("evalset/flip/000/a.png"), which names no
    file from elsewhere (and a resume typed from another directory rewrites the records in another form)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    tiny.make_folder_evalset(workdir / "evalset", tasks=("flip",), per_task=1)
    monkeypatch.chdir(workdir)
    rc, _, err = run_cli_in_process(capsys, generate_argv(assets, "evalset", "runs", "--resolution", "native"))
    assert rc == 0, err
    run = json.loads((workdir / "runs" / "run.json").read_text())
    records = json.loads((workdir / "runs" / "evalset.json").read_text())
    monkeypatch.chdir(tmp_path)  # read back from elsewhere
    for record in records:
        for role in ("a", "a_prime", "b"):
            recorded = Path(record[role]["path"])
            named = recorded if recorded.is_absolute() else Path(run["evalset"]) / recorded
            assert named.is_file(), f"evalset.json records {record['id']} {role} as {recorded}: no such file"


def test_eval_generate_resume_spelling_out_the_default_long_edge_is_the_same_run(assets, tmp_path, loader, capsys):
    """evaluation/generate.py ``run_generate`` / ``check_run_settings``: ``--long-edge`` not given means the
    pipeline's 1024 (help: "default: the pipeline's"; flux.py ``DEFAULT_LONG_EDGE``), so a resume that spells out
    ``--long-edge 1024`` runs the same generation and continues the run (the step count and the encoder dtype are
    recorded resolved for the same reason). As audited it is refused: "holds a run with other settings (long_edge:
    None -> 1024)"."""
    evalset = tiny.make_folder_evalset(tmp_path / "evalset", tasks=("flip",), per_task=2)
    out = tmp_path / "runs"
    first = generate_argv(assets, evalset, out, "--resolution", "native", "--max-per-task", "1")
    rc, _, err = run_cli_in_process(capsys, first)
    assert rc == 0, err
    rc, stdout, err = run_cli_in_process(capsys, generate_argv(assets, evalset, out, "--resolution", "native",
                                                               "--long-edge", "1024"))
    assert rc == 0, err.strip()
    assert "1 generated, 1 already done" in stdout
