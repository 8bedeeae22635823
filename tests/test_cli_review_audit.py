"""Command-line defects found by a review of ``lorweb-fast`` (cli.py, evaluation/cli.py, demo): each test fails on
the current code and describes what the user sees now and what they should see.

Nothing is downloaded: the models are tiny local ones (``lorweb_fast.testing``, ``lorweb_fast.evaluation.tiny``), and
the loaders that would take minutes on real models are replaced by stand-ins that record whether they were called.
"""

import pytest

from lorweb_fast import cli, demo, flux, training
from lorweb_fast.evaluation import tiny
from lorweb_fast.testing import build_tiny_lorweb_assets


class Reached(Exception):
    """Raised by a stand-in loader: the command got past its up-front checks."""


def run_cli(capsys, argv):
    """(exit status, stderr, whether a stand-in loader was reached) of ``lorweb-fast <argv>`` in-process."""
    try:
        rc, reached = cli.main([str(a) for a in argv]), False
    except Reached:
        rc, reached = None, True
    except SystemExit as exc:
        rc, reached = exc.code, False
    return rc, capsys.readouterr().err, reached


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Kontext pipeline, CLIP and official-format checkpoint, and a folder-layout evaluation set."""
    root = build_tiny_lorweb_assets(tmp_path_factory.mktemp("cli_review"))
    tiny.make_folder_evalset(root / "evalset", per_task=1)
    return root


# ------------------------------------------------------------------------------------------------------- demo
def test_demo_refuses_inference_steps_above_the_pipelines_limit_before_writing_anything(tmp_path, capsys,
                                                                                         monkeypatch):
    """``lorweb-fast demo --out D --inference-steps 10001``: now the up-front check accepts any value >= 1, so the
    demo builds its models, writes its data, trains, and only then the pipeline call refuses it ("num_inference_steps
    must be an integer in [1, 10000]", not naming --inference-steps), leaving models/, data/, train/ and loss.png in
    D; running the corrected command again is then refused ("--out D already holds models, data, train, loss.png").
    It should be refused up front, naming --inference-steps, with nothing written (as infer's --steps)."""

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", reached)
    out = tmp_path / "demo"
    rc, err, got_there = run_cli(capsys, ["demo", "--out", out, "--inference-steps", "10001", "--quiet"])
    assert not got_there, "the demo started building and training with an --inference-steps it refuses at the end"
    assert rc == 2 and "--inference-steps" in err, err
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------ eval generate
@pytest.mark.parametrize("pipe_arg", ["negative_prompt=5", "latents=1", "callback_on_step_end=1", "sigmas=[2.0, 1.0]",
                                      'joint_attention_kwargs={"scale": "x"}', "joint_attention_kwargs=[1]"])
def test_eval_generate_checks_pipe_arg_values_before_loading_or_writing(assets, tmp_path, capsys, monkeypatch,
                                                                       pipe_arg):
    """``lorweb-fast eval generate ... --pipe-arg negative_prompt=5`` (or ``latents=1``, ``callback_on_step_end=1``,
    ``sigmas=[2.0, 1.0]``): now only the key is checked up front, so the models load and run.json is written before
    the first pipeline call fails: with a TypeError traceback and exit status 1 (negative_prompt, latents, callback),
    or a one-line error (sigmas); a rerun with the corrected --pipe-arg is then refused ("holds a run with other
    settings (pipe_kwargs: ...)"). Values should be checked as infer checks them (CLI_PIPE_ARGS: unknown or
    tensor-only keys refused, types and ranges checked), in one line with exit status 2, before any model loads or
    file is written, as the README promises for eval generate's bad input."""

    def reached(cls, *args, **kwargs):
        raise Reached

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", classmethod(reached))
    out = tmp_path / "runs"
    rc, err, got_there = run_cli(capsys, [
        "eval", "generate", "--evalset", assets / "evalset", "--weights", assets / "lorweb.safetensors",
        "--model", assets / "pipe", "--dtype", "fp32", "--resolution", "native", "--long-edge", "64", "--quiet",
        "--out", out, "--pipe-arg", pipe_arg])
    assert not got_there, f"--pipe-arg {pipe_arg} passed the up-front checks: the models load before it fails"
    assert rc == 2 and "--pipe-arg" in err and "Traceback" not in err, err
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("command", ["eval generate", "infer"])
def test_the_per_call_strength_passes_the_pipe_arg_checks(assets, tmp_path, capsys, monkeypatch, command):
    """``--pipe-arg 'joint_attention_kwargs={"scale": 0.5}'`` is the command line's way to run at another LoRWeB
    strength (the pipeline scales the mixture by it); the value checks added to ``eval generate`` refused it, a key
    infer did not list. Both commands now take it (its scale checked) and reach the model loader."""

    def reached(cls, *args, **kwargs):
        raise Reached

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", classmethod(reached))
    strength = ["--pipe-arg", 'joint_attention_kwargs={"scale": 0.5}']
    if command == "infer":
        image = assets / "evalset" / sorted(p.name for p in (assets / "evalset").iterdir())[0]
        images = sorted(p for p in image.rglob("*.png"))[:3]
        argv = ["infer", "--a", images[0], "--a-prime", images[1], "--b", images[2], "--prompt", "x",
                "--weights", assets / "lorweb.safetensors", "--model", assets / "pipe", "--out", tmp_path / "o.png",
                "--dtype", "fp32", *strength]
    else:
        argv = ["eval", "generate", "--evalset", assets / "evalset", "--weights", assets / "lorweb.safetensors",
                "--model", assets / "pipe", "--dtype", "fp32", "--resolution", "native", "--long-edge", "64",
                "--quiet", "--out", tmp_path / "runs", *strength]
    rc, err, got_there = run_cli(capsys, argv)
    assert got_there, err


# --------------------------------------------------------------------------------------------------- train
@pytest.fixture
def train_paths(tmp_path, monkeypatch):
    """A data folder, model and encoder folders (their marker files), and ``training.train`` replaced by a
    stand-in that raises Reached."""
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")

    def reached(cfg):
        raise Reached

    monkeypatch.setattr(training, "train", reached)
    return ["train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--model", tmp_path / "model",
            "--encoder", tmp_path / "clip"]


def test_train_refuses_a_learning_rate_that_overflows_float32_up_front(train_paths, capsys):
    """``lorweb-fast train ... --learning-rate 1e39`` (any value above float32's largest, ~3.4e38; also
    ``demo --learning-rate 1e39``): now accepted by the up-front checks (only > 0 and finite); the base model
    loads, the first optimizer step ends with a traceback ("RuntimeError: value cannot be converted to type float
    without overflow", in bitsandbytes' AdamW8bit and in torch's AdamW alike), exit status 1, and --out keeps
    loss.jsonl and train_config.json. It should be a one-line error naming --learning-rate, exit 2, before any
    model loads."""
    rc, err, got_there = run_cli(capsys, [*train_paths, "--learning-rate", "1e39", "--optimizer", "adamw"])
    assert not got_there, "--learning-rate 1e39 reached train(): it crashes at the first optimizer step"
    assert rc == 2 and "--learning-rate" in err, err


def test_train_refuses_pooling_type_outside_the_patch_query_modes(train_paths, capsys):
    """``lorweb-fast train ... --pooling-type max`` with the default query mode "cat-aa'b" (or any non-patch
    mode): now accepted silently, trained without any pooling, and ``pooling_type: max`` recorded in config.yaml.
    ``infer`` refuses the same option outside the patch modes ("--pooling-type applies to the patch query modes ...
    rather than ignored", README). train should refuse it the same way: one line naming --pooling-type, exit 2."""
    rc, err, got_there = run_cli(capsys, [*train_paths, "--pooling-type", "max"])
    assert not got_there, "--pooling-type max with query mode cat-aa'b reached train(), where it is ignored"
    assert rc == 2 and "--pooling-type" in err, err


# --------------------------------------------------------------------------------------------------- eval score
def test_eval_score_names_a_missing_local_judge_folder(assets, tmp_path, capsys, monkeypatch):
    """``lorweb-fast eval score --runs R --metrics vlm --judge gemma3:/abs/path/typo --out REP``: now the error reads
    "cannot load the Gemma-3 judge '/abs/path/typo': Repo id must be in the form 'repo_name' or
    'namespace/repo_name': ... Use `repo_type` argument if needed." (huggingface_hub's wording about Hub ids),
    which does not say that the folder does not exist. It should say so, as --model / --encoder do ("... does not
    exist on this machine")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tiny.make_runs_folder(tmp_path / "runs", assets / "evalset")
    missing = tmp_path / "no_such_gemma"
    rc, err, _ = run_cli(capsys, ["eval", "score", "--runs", runs, "--metrics", "vlm",
                                  "--judge", f"gemma3:{missing}", "--quiet", "--out", tmp_path / "report"])
    assert rc == 2, err
    assert "Repo id must be" not in err and ("does not exist" in err or "not found" in err), err
