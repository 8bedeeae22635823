"""Guards for ``lorweb_fast/cli.py`` found by a mutation audit: each test here failed on a hand-made mutant of the
command line that the other tests let pass, and passes on the original.

What they pin: every ``infer`` option reaches the argument of ``LoRWeBKontextPipeline.from_pretrained`` or of the
pipeline call that it configures (a, a', b in that order, the seed of the generator, each ``--pipe-arg``, the output
path, the coefficient plot), the documented ``infer`` defaults (official LoRWeB inference: FLUX.1-Kontext-dev, bf16
with the encoder in the same dtype, the official resolution, merge auto), ``cuda`` as the default device when one is
visible, ``demo``'s options reaching its training configuration, which errors become a one-line exit 2, a missing
sub-command, TrainConfig errors written with the flag that sets the field, and the demo's a | a' | b | b' strip.

The pipeline and the trainer are replaced by recording stand-ins: nothing is loaded, trained or generated.
"""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import cli, demo, flux, official_config as oc, training
from lorweb_fast.testing import infer_input_files, tiny_lorweb_pair


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three distinct images, a model and an encoder folder (their marker files only), a checkpoint whose metadata
    names the encoder, and an official config.yaml in another folder."""
    root = infer_input_files(tmp_path_factory.mktemp("cli_guards"), widths=(32, 40, 48))
    (root / "w").mkdir()
    m = tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    lf.save_lorweb_weights(m, root / "w" / "w.safetensors", metadata={"encoder": str(root / "clip")})
    (root / "cfg").mkdir()
    oc.write_config_yaml(root / "cfg" / "config.yaml", {"num_loras": 2, "rank": 1, "lora_alpha": 1, "key_dim": 4,
                                                        "query_mode": "cat-aa'b", "encoder": str(root / "clip")})
    return root


class FakePipeline:
    """Stands in for a loaded LoRWeBKontextPipeline: records its call and returns a solid b'."""

    transformer = "the transformer"

    def __init__(self, calls):
        self.calls = calls
        self.pipe = type("Stock", (), {"_execution_device": torch.device("cpu")})()

    def __call__(self, *args, **kwargs):
        self.calls["call"] = (args, kwargs)
        return [Image.new("RGB", (8, 8), (1, 2, 3))]


@pytest.fixture
def recorded(monkeypatch):
    """``from_pretrained``, the pipeline call and ``plot_coefficients`` recorded (keys "load", "call", "plot")."""
    calls = {}

    def from_pretrained(cls, *args, **kwargs):
        calls["load"] = (args, kwargs)
        return FakePipeline(calls)

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(flux, "plot_coefficients", lambda transformer, path: calls.setdefault("plot", (transformer,
                                                                                                       path)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def infer(files, tmp_path, *extra):
    return ["infer", "--a", str(files / "a.png"), "--a-prime", str(files / "a_prime.png"), "--b", str(files / "b.png"),
            "--prompt", "mirror it", "--weights", str(files / "w" / "w.safetensors"), "--model", str(files / "model"),
            "--out", str(tmp_path / "new" / "b_prime.png"), *extra]


# (extra argv, "load" or "call", argument, expected value; "{root}" is the fixture folder)
WIRING = [
    ([], "load", "dtype", torch.bfloat16),  # official inference.py: the pipeline in bfloat16 ...
    ([], "load", "encoder_dtype", None),  # ... and the analogy encoder in the pipeline's dtype (--encoder-dtype auto)
    ([], "load", "resolution", "official"),
    ([], "load", "device", "cpu"),
    ([], "call", "merge", "auto"),
    ([], "call", "num_inference_steps", 28),
    ([], "call", "guidance_scale", 2.5),
    ([], "call", "progress", None),  # the pipeline's own set_progress_bar_config applies
    (["--quiet"], "call", "progress", False),
    (["--encoder", "{root}/clip"], "load", "encoder", "{root}/clip"),
    (["--config", "{root}/cfg/config.yaml"], "load", "config", "{root}/cfg/config.yaml"),
    (["--query-mode", "caa'b"], "load", "query_mode", "caa'b"),
    (["--query-mode", "cat-paa'b", "--pooling-type", "max"], "load", "pooling_type", "max"),
    (["--pipe-arg", "sigmas=[1.0, 0.5, 0.25]"], "call", "num_inference_steps", 3),  # one step per sigma
    (["--pipe-arg", "sigmas=[1.0, 0.5, 0.25]", "--steps", "3"], "call", "num_inference_steps", 3),
    (["--pipe-arg", "sigmas=[1.0, 0.5, 0.25]"], "call", "sigmas", [1.0, 0.5, 0.25]),
    (["--query-source", "images"], "load", "query_source", "images"),
    (["--dtype", "fp16"], "load", "dtype", torch.float16),
    (["--encoder-dtype", "fp32"], "load", "encoder_dtype", torch.float32),
    (["--device", "cpu"], "load", "device", "cpu"),
    (["--resolution", "native"], "load", "resolution", "native"),
    (["--resolution", "native", "--long-edge", "96"], "load", "long_edge", 96),
    (["--max-area", "4096"], "load", "max_area", 4096),
    (["--max-size", "640"], "load", "max_size", 640),
    (["--steps", "3"], "call", "num_inference_steps", 3),
    (["--guidance-scale", "0"], "call", "guidance_scale", 0.0),
    (["--merge", "offload"], "call", "merge", "offload"),
    (["--pipe-arg", "negative_prompt=a=b", "--pipe-arg", "true_cfg_scale=1.5"], "call", "negative_prompt", "a=b"),
    (["--pipe-arg", "negative_prompt=a=b", "--pipe-arg", "true_cfg_scale=1.5"], "call", "true_cfg_scale", 1.5),
]


@pytest.mark.parametrize("extra,where,key,want", WIRING, ids=[f"{w[1]}.{w[2]}:{' '.join(w[0])}" for w in WIRING])
def test_infer_options_reach_the_argument_they_configure(files, tmp_path, recorded, extra, where, key, want):
    """Each option arrives, with its value, as the loader's or the pipeline call's argument it sets; the defaults
    are the official ones (README: seed 50, guidance 2.5, 28 steps, bf16, encoder in the pipeline's dtype)."""
    extra = [x.replace("{root}", str(files)) for x in extra]
    assert cli.main(infer(files, tmp_path, *extra)) == 0
    kwargs = recorded[where][1]
    want = want.replace("{root}", str(files)) if isinstance(want, str) else want
    assert kwargs[key] == want and type(kwargs[key]) is type(want)


def test_infer_size_options_are_passed_only_when_given(files, tmp_path, recorded):
    """Unset --max-area / --max-size / --long-edge are left out, so the pipeline applies its own defaults (official:
    max_area 1024**2, no grid cap)."""
    assert cli.main(infer(files, tmp_path)) == 0
    assert not {"max_area", "max_size", "long_edge"} & set(recorded["load"][1])


@pytest.mark.parametrize("seed", [None, "0", "7"])
def test_infer_images_prompt_seed_out_and_plot(files, tmp_path, recorded, capsys, seed):
    """a, a', b and the prompt are passed in that order, the generator is seeded with --seed (default 50, official)
    on the execution device, b' is written to exactly --out (its folder created) and --coefficients-plot plots the
    pipeline's transformer to that path."""
    plot = tmp_path / "plot.pdf"
    extra = ["--coefficients-plot", str(plot)] + (["--seed", seed] if seed is not None else [])
    assert cli.main(infer(files, tmp_path, *extra)) == 0
    args, kwargs = recorded["call"]
    for got, name in zip(args[:3], ("a", "a_prime", "b")):
        with Image.open(files / f"{name}.png") as want:
            assert got.size == want.size and got.tobytes() == want.convert("RGB").tobytes()
    assert args[3:] == ("mirror it",)
    assert kwargs["generator"].initial_seed() == (50 if seed is None else int(seed))
    assert kwargs["generator"].device == torch.device("cpu")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["b_prime.png"]
    with Image.open(tmp_path / "new" / "b_prime.png") as out:
        assert out.getpixel((0, 0)) == (1, 2, 3)
    assert recorded["plot"] == ("the transformer", str(plot))
    assert capsys.readouterr().out == f"wrote {tmp_path / 'new' / 'b_prime.png'} and {plot}\n"


def test_infer_documented_defaults():
    """The defaults README's synopsis documents: the official base model, --out b_prime.png, native --long-edge
    unset (an official-resolution run with a default --long-edge would always be refused), no --encoder/--device."""
    args = cli.build_parser().parse_args(["infer", "--a", "a", "--a-prime", "b", "--b", "c", "--prompt", "p",
                                          "--weights", "w"])
    assert (args.model, args.out, args.long_edge, args.encoder, args.device, args.merge, args.no_merge,
            args.dtype, args.encoder_dtype, args.pipe_kwargs) == \
        ("black-forest-labs/FLUX.1-Kontext-dev", "b_prime.png", None, None, None, "auto", False, "bf16", "auto", [])


@pytest.mark.parametrize("cuda", [True, False])
def test_default_device_is_cuda_when_visible(monkeypatch, cuda):
    """Without --device the pipeline goes to cuda when a GPU is visible, else cpu; an explicit one is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert cli._device(None) == ("cuda" if cuda else "cpu")
    assert cli._device("cpu") == "cpu"


# ---------------------------------------------------------------------------------------------------------- demo
class Stop(Exception):
    pass


@pytest.mark.parametrize("extra", [[], ["--steps", "1", "--seed", "3", "--learning-rate", "0.5", "--quiet"]])
def test_demo_options_reach_the_builders_and_the_training_config(tmp_path, monkeypatch, extra):
    """--steps, --samples, --seed, --learning-rate and --quiet reach the tiny models, the synthetic data and the
    TrainConfig (a checkpoint at least every step: --steps 1 gives checkpoint_every 1, not an invalid 0); the
    defaults are README's (--steps 40, --samples 16)."""
    seen = {}
    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda path, seed: seen.setdefault("flux", seed))
    monkeypatch.setattr(demo, "build_tiny_clip", lambda path, seed: seen.setdefault("clip", seed))
    monkeypatch.setattr(demo, "make_synthetic_analogies", lambda path, n, seed: seen.setdefault("data", (n, seed)))

    def train(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(training, "train", train)
    with pytest.raises(Stop):
        cli.main(["demo", "--out", str(tmp_path / "demo"), "--samples", "5", *extra])
    steps, seed, lr, quiet = (1, 3, 0.5, True) if extra else (40, 0, 1e-2, False)
    cfg = seen["cfg"]
    assert seen["flux"] == seen["clip"] == seed and seen["data"] == (5, seed)
    assert (cfg.steps, cfg.seed, cfg.learning_rate, cfg.progress) == (steps, seed, lr, not quiet)
    assert cfg.checkpoint_every == max(1, steps // 2)
    cfg.validate()
    defaults = cli.build_parser().parse_args(["demo", "--out", "o"])
    assert (defaults.steps, defaults.samples) == (40, 16)


def test_demo_strip_is_a_a_prime_b_b_prime_with_white_gaps():
    """The demo's analogy.png: a | a' | b | b', each resized to b''s size, 4 white pixels between them."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    ims = [Image.new("RGB", size, c) for size, c in zip([(10, 20), (5, 5), (30, 6), (12, 8)], colours)]
    strip = cli.analogy_strip(*ims)
    assert strip.size == (4 * 12 + 3 * 4, 8)
    for i, c in enumerate(colours):
        assert strip.getpixel((i * 16 + 6, 4)) == c
        if i < 3:
            assert strip.getpixel((i * 16 + 13, 4)) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("error", ["BackendUnavailableError", "FileNotFoundError", "UsageError", "AnalogyDataError"])
def test_each_user_error_is_one_line_and_exit_2(monkeypatch, capsys, error):
    """The errors a command reports (an unavailable kernel backend, a missing file, a bad option, a broken data
    folder) end with ``lorweb-fast <command>: error: ...`` on one stderr line and exit status 2, no traceback."""
    from lorweb_fast.data import AnalogyDataError
    from lorweb_fast.ops import BackendUnavailableError
    from lorweb_fast.validation import UsageError

    exc = {"BackendUnavailableError": BackendUnavailableError, "FileNotFoundError": FileNotFoundError,
           "UsageError": UsageError, "AnalogyDataError": AnalogyDataError}[error]

    def run_infer(args):
        raise exc("the 'triton' backend is not available:\n  no GPU")

    monkeypatch.setattr(cli, "run_infer", run_infer)
    rc = cli.main(["infer", "--a", "a", "--a-prime", "a", "--b", "b", "--prompt", "p", "--weights", "w"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err == "lorweb-fast infer: error: the 'triton' backend is not available: no GPU\n"


@pytest.mark.parametrize("argv,prefix", [
    (["data", "check", "{missing}"], "lorweb-fast data check: error: training data folder"),
    (["data", "prepare", "{missing}", "{out}"], "lorweb-fast data prepare: error: "),
    (["eval", "score", "--runs", "{missing}", "--out", "{out}"], "lorweb-fast eval score: error: "),
])
def test_errors_of_a_subcommand_name_it_as_argparse_does(tmp_path, capsys, argv, prefix):
    """``data check`` / ``data prepare`` / ``eval score`` errors are prefixed with the whole subcommand, as
    argparse's own usage errors are (``lorweb-fast eval score: error: the following arguments are required``), not
    with ``lorweb-fast data:`` / ``lorweb-fast eval:``."""
    argv = [a.format(missing=tmp_path / "missing", out=tmp_path / "out") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err


ONE_LINE_WARNINGS_SCRIPT = """
import argparse, sys, warnings
from lorweb_fast import cli

def run_check(args):
    warnings.warn("3 training samples have no caption:\\n  a\\n  b", stacklevel=2)
    warnings.warn("old option", FutureWarning, stacklevel=2)

class Parser:
    def parse_args(self, argv):
        return argparse.Namespace(command="data", data_command="check", quiet=True, func=run_check)

cli.build_parser = Parser
original = warnings.formatwarning
assert cli.main(["data", "check", "somewhere"]) == 0
assert warnings.formatwarning is original
warnings.warn("after the command")
"""


def test_warnings_of_a_command_are_one_line_and_name_it():
    """A warning shown while a command runs reads ``lorweb-fast <command>: warning: <message>`` on one line (not
    Python's file:line: UserWarning and source line); another category keeps its name; the format is put back
    afterwards (a warning after the command is Python's own), and warnings still reach a
    ``catch_warnings(record=True)`` block (pytest) unchanged. In a subprocess: Python's own display of warnings,
    which pytest replaces."""
    import warnings

    proc = subprocess.run([sys.executable, "-W", "always", "-c", ONE_LINE_WARNINGS_SCRIPT], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[:2] == ["lorweb-fast data check: warning: 3 training samples have no caption: a; b",
                         "lorweb-fast data check: warning: FutureWarning: old option"], proc.stderr
    assert "UserWarning: after the command" in lines[2], proc.stderr
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with cli.one_line_warnings("train"):
            warnings.warn("recorded")
    assert [str(w.message) for w in seen] == ["recorded"]


RANKED_LINES_SCRIPT = """
import argparse, logging, sys, warnings
from lorweb_fast import cli

def run_check(args):
    warnings.warn("a warning", stacklevel=2)
    logging.getLogger("lorweb_fast.training").info("an info line")
    logging.getLogger("lorweb_fast.training").warning("a logged warning")

class Parser:
    def parse_args(self, argv):
        return argparse.Namespace(command="train", func=run_check)

cli.build_parser = Parser
show = warnings.showwarning
assert cli.main(["train"]) == 0
assert warnings.showwarning is show
warnings.warn("after the command")
"""


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_warnings_and_log_lines_show_on_the_main_rank_only(rank):
    """Under a launcher (``RANK`` set) a command's warnings and log lines show once, from rank 0, not once per rank
    (every rank loads the same model and data); without a launcher, and on rank 0, they show. Python's own display
    is put back after the command on every rank."""
    env = {k: v for k, v in os.environ.items() if k != "RANK"} | ({} if rank is None else {"RANK": rank})
    proc = subprocess.run([sys.executable, "-W", "always", "-c", RANKED_LINES_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    command_lines = ["lorweb-fast train: warning: a warning", "lorweb-fast train: info: an info line",
                     "lorweb-fast train: warning: a logged warning"]
    assert lines[:-1] == ([] if rank == "1" else command_lines), proc.stderr
    assert "UserWarning: after the command" in lines[-1], proc.stderr


def test_a_missing_command_is_one_line_and_exit_2(capsys):
    """``lorweb-fast`` alone: argparse's one-line usage error naming the commands, exit 2 (not a traceback)."""
    with pytest.raises(SystemExit) as info:
        cli.main([])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "error: the following arguments are required: {infer,train,data,demo,eval}" in err


@pytest.mark.parametrize("message,want", [
    ("progress must be True or False, got 1", "--quiet must be True or False, got 1"),
    ("betas[1] must be in [0.0, 1.0), got 1", "--betas[1] must be in [0.0, 1.0), got 1"),
    ("data must be a non-empty string, got ''", "--data must be a non-empty string, got ''"),
    ("out must be a non-empty string, got ''", "--out must be a non-empty string, got ''"),
    ("start_position must be a non-negative integer", "start_position must be a non-negative integer"),
    ("key_dim=6 is not divisible by heads=4", "key_dim=6 is not divisible by heads=4"),
])
def test_train_config_errors_name_the_flag(message, want):
    """A TrainConfig error is written with the flag that sets its field (--quiet for progress, --betas for
    betas[i], --data / --out for the folders); a message about anything that is not a field is left as it is."""
    assert cli.as_flag_message(message) == want


def test_train_empty_data_names_the_flag(tmp_path, capsys):
    """``train --data ''``: the one-line error names --data, as every other train error names its flag."""
    assert cli.main(["train", "--data", "", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "lorweb-fast train: error: --data must be a non-empty string, got ''\n"


def test_keep_checkpoints_0_keeps_every_checkpoint_and_the_help_says_so(tmp_path, capsys):
    """--keep-checkpoints 0 keeps every checkpoint (training.rotate_checkpoints deletes nothing, milestones or not);
    the help said only "checkpoints kept", which reads as keeping none. A keep of 2 deletes the older non-milestones
    (the control)."""
    from lorweb_fast.training import rotate_checkpoints

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "0: keep every checkpoint" in " ".join(capsys.readouterr().out.split())
    for step in (2, 4, 6, 8, 10):
        (tmp_path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    assert rotate_checkpoints(tmp_path, 0, milestone_every=4) == []
    assert len(list((tmp_path / "checkpoints").iterdir())) == 5
    deleted = rotate_checkpoints(tmp_path, 2, milestone_every=4)
    assert sorted(p.name for p in deleted) == ["step-00000002", "step-00000006"]


def test_every_option_of_every_command_has_help():
    """`--help` of every subcommand explains every option (eval generate's --guidance-scale, eval score's
    --judge-max-new-tokens, data prepare's --min-pairs-per-category had none); the eval and data options the README
    gives defaults for say them in the help."""
    import argparse

    missing, helps = [], {}

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            else:
                key = (" ".join(path), (action.option_strings or [action.dest])[-1])
                helps[key] = action.help
                if action.help is None:
                    missing.append(key)

    walk(cli.build_parser(), [])
    assert len(helps) > 100 and missing == []
    for command, option, says in [("eval generate", "--guidance-scale", "default 2.5"),
                                  ("eval generate", "--steps", "default 28"),
                                  ("eval generate", "--batch-size", "default 4"),
                                  ("eval generate", "--input-long-edge", "default 1024"),
                                  ("eval score", "--judge-max-new-tokens", "default 1024"),
                                  ("eval score", "--lpips-net", "default alex"),
                                  ("data prepare", "--min-pairs-per-category", "default 2")]:
        assert says in helps[(command, option)], (command, option)


# ------------------------------------------------------------------------------------- atomic image and plot writes
def _failing_after_partial_write():
    """A stand-in for ``Image.save`` / ``Figure.savefig`` that leaves half a file in the temporary, then fails (a
    full disk, say)."""
    def write(self, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")
    return write


def test_infer_output_that_fails_to_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """b' is written through a temporary and a rename: a save that fails part-way keeps what ``--out`` held (an earlier
    result) and leaves no temporary; a save that succeeds writes the format the extension names."""
    out = tmp_path / "b_prime.png"
    out.write_bytes(b"earlier result")
    image = Image.new("RGB", (5, 3), (10, 200, 30))
    monkeypatch.setattr(Image.Image, "save", _failing_after_partial_write())
    with pytest.raises(OSError, match="No space left"):
        cli._save_image(image, out)
    assert out.read_bytes() == b"earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["b_prime.png"]
    monkeypatch.undo()
    for name, fmt in (("b_prime.png", "PNG"), ("b.JPG", "JPEG"), ("sub/b.webp", "WEBP")):
        with Image.open(cli._save_image(image, tmp_path / name)) as saved:
            assert saved.format == fmt and saved.size == (5, 3)
    with pytest.raises(ValueError, match=r"unknown image file extension '\.xyz'"):
        cli._save_image(image, tmp_path / "b.xyz")
    assert not (tmp_path / "b.xyz").exists()


def test_coefficient_and_loss_plots_that_fail_to_save_keep_the_previous_file(tmp_path, monkeypatch):
    """``plot_coefficients`` and the training loss plot go through ``save_figure_atomically``: a failing savefig keeps
    the earlier plot and leaves no temporary; a working one writes the format the extension names."""
    import matplotlib.figure

    model = tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))
    log = tmp_path / "loss.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n')
    plots = {"coefficients.png": lambda p: flux.plot_coefficients(model, p),
             "loss.png": lambda p: training.plot_loss(log, p)}
    for name, plot in plots.items():
        (tmp_path / name).write_bytes(b"earlier plot")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _failing_after_partial_write())
    for name, plot in plots.items():
        with pytest.raises(OSError, match="No space left"):
            plot(tmp_path / name)
        assert (tmp_path / name).read_bytes() == b"earlier plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coefficients.png", "loss.jsonl", "loss.png"]
    monkeypatch.undo()
    assert flux.plot_coefficients(model, tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    assert training.plot_loss(log, tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
