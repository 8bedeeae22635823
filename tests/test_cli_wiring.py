"""How the command line wires its options to the library (from a mutation audit of lorweb_fast/cli.py: each test
failed a hand-made change of cli.py that the rest of the suite let pass): infer's device and generator, train's
closing line, the demo's inference options and outputs, the command's logging and progress bars, and
``python -m lorweb_fast.cli``'s exit status. Nothing real is loaded, trained or generated: the pipeline, the trainer
and the demo's builders are stand-ins.
"""

import json
import shutil
import sys

import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import cli, demo, flux, training
from lorweb_fast.testing import infer_input_files, tiny_lorweb_pair


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """As tests/test_cli_guards.py: three images, marker-only model/ and clip/ folders, a checkpoint."""
    root = infer_input_files(tmp_path_factory.mktemp("cli_guards_d"), widths=(32, 40, 48))
    (root / "w").mkdir()
    m = tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    lf.save_lorweb_weights(m, root / "w" / "w.safetensors", metadata={"encoder": str(root / "clip")})
    return root


class FakePipeline:
    """A loaded LoRWeBKontextPipeline's stand-in: records its call, returns a solid b'; its stock pipeline's
    execution device is ``device``."""

    transformer = "the transformer"

    def __init__(self, calls, device="cpu"):
        self.calls = calls
        self.pipe = type("Stock", (), {"_execution_device": torch.device(device)})()

    def __call__(self, *args, **kwargs):
        self.calls["call"] = (args, kwargs)
        return [Image.new("RGB", (16, 16), (1, 2, 3))]


def record_loader(monkeypatch, calls, device="cpu"):
    def from_pretrained(cls, *args, **kwargs):
        calls["load"] = (args, kwargs)
        return FakePipeline(calls, device)

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", classmethod(from_pretrained))


def record_generators(monkeypatch, calls):
    """torch.Generator recorded: the device each one is made for (a CPU generator is returned, so nothing needs
    that device)."""
    real = torch.Generator

    def generator(device="cpu"):
        calls.setdefault("generator_devices", []).append(torch.device(device))
        return real()

    monkeypatch.setattr(torch, "Generator", generator)


def infer(files, tmp_path, *extra):
    return ["infer", "--a", str(files / "a.png"), "--a-prime", str(files / "a_prime.png"), "--b", str(files / "b.png"),
            "--prompt", "mirror it", "--weights", str(files / "w" / "w.safetensors"), "--model", str(files / "model"),
            "--out", str(tmp_path / "b_prime.png"), *extra]


# ------------------------------------------------------------------------------------------------------- infer
def test_infer_explicit_device_wins_over_a_visible_gpu(files, tmp_path, monkeypatch):
    """``--device cpu`` on a machine with a GPU loads on cpu (the existing wiring test runs with no GPU visible, so
    ``_device(None)`` and ``_device("cpu")`` agree there and an ignored --device passed)."""
    calls = {}
    record_loader(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(infer(files, tmp_path, "--device", "cpu")) == 0
    assert calls["load"][1]["device"] == "cpu"


def test_infer_generator_is_made_on_the_pipelines_execution_device(files, tmp_path, monkeypatch):
    """The seeded generator is created on the stock pipeline's execution device (official inference.py: a CUDA
    generator when the pipeline runs on CUDA, so a seed gives the official noise), not on the CPU by default."""
    calls = {}
    record_loader(monkeypatch, calls, device="cuda:1")
    record_generators(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(infer(files, tmp_path, "--seed", "9")) == 0
    assert calls["generator_devices"] == [torch.device("cuda:1")]
    assert calls["call"][1]["generator"].initial_seed() == 9


# -------------------------------------------------------------------------------------------------------- train
@pytest.fixture
def train_inputs(tmp_path, monkeypatch):
    """A data folder, marker-only model/ and clip/ folders, and training.train replaced by a stand-in returning
    step 3 (what run_train prints)."""
    root = infer_input_files(tmp_path)
    demo.make_synthetic_analogies(tmp_path / "data", 2)
    seen = {}

    def train(cfg):
        seen["cfg"] = cfg
        return {"step": 3, "out": cfg.out}

    monkeypatch.setattr(training, "train", train)
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", str(root / "model"),
            "--encoder", str(root / "clip"), "--quiet"]
    return argv, seen


def test_train_closing_line_names_the_step_and_the_weights_file(train_inputs, tmp_path, capsys):
    """``train`` ends with ``trained to step N; weights in OUT/lorweb.safetensors`` on stdout: the file a user passes to
    ``infer --weights`` (no test read the line in-process)."""
    argv, seen = train_inputs
    assert cli.main(argv) == 0
    assert seen["cfg"].out == str(tmp_path / "run")
    assert capsys.readouterr().out == f"trained to step 3; weights in {tmp_path / 'run' / 'lorweb.safetensors'}\n"


def test_train_closing_line_only_on_rank_0(train_inputs, monkeypatch, capsys):
    """Under a process group only rank 0 prints the closing line (accelerate launch with N processes: once, not N
    times); checked in-process, without the slow two-process launch."""
    argv, _ = train_inputs
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for rank, printed in ((1, False), (0, True)):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
        assert cli.main(argv) == 0
        assert ("trained to step 3" in capsys.readouterr().out) is printed, rank


@pytest.mark.parametrize("started_by", ["train", "caller"])
def test_train_ends_the_process_group_it_started(train_inputs, tmp_path, monkeypatch, started_by):
    """A process group that training started (``accelerate launch lorweb-fast train``: the Accelerator initializes
    it) is destroyed when the command ends, as accelerate's ``end_training`` does; one the caller had started
    before ``cli.main`` is left to the caller."""
    import torch.distributed as dist

    argv, seen = train_inputs
    store = f"file://{tmp_path / 'store'}"
    if started_by == "caller":
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    else:
        def train(cfg):
            dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
            seen["cfg"] = cfg
            return {"step": 3, "out": cfg.out}

        monkeypatch.setattr(training, "train", train)
    try:
        assert cli.main(argv) == 0
        assert seen["cfg"].out == str(tmp_path / "run")
        assert dist.is_initialized() is (started_by == "caller")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("flag,checkpoint,hint", [
    (None, True, "the newest checkpoint is step-00000004: run the same command with --resume to continue from it"),
    ("--resume", True, "the newest checkpoint is step-00000004: run the same command again to continue from it"),
    ("--overwrite", True, "the newest checkpoint in {out} is step-00000004: run the same command with --resume "
                          "instead of --overwrite to continue from it, or the same command to start over"),
    (None, False, "no checkpoint was written to {out} yet"),
])
def test_train_interrupted_says_how_to_continue(train_inputs, tmp_path, monkeypatch, capsys, flag, checkpoint, hint):
    """Ctrl-C (KeyboardInterrupt) in ``train`` ends the command with status 130 and one line naming the newest
    complete checkpoint and the flag that continues from it (``--resume``, which ``--overwrite`` excludes), not a
    traceback; an older checkpoint and a half-written one are not named."""
    argv, _ = train_inputs
    out = tmp_path / "run"

    def interrupted(cfg):
        if checkpoint:
            for step, files in ((2, (training.WEIGHTS_NAME, training.TRAINER_STATE_NAME)),
                                (4, (training.WEIGHTS_NAME, training.TRAINER_STATE_NAME)), (6, ())):
                ckpt = out / "checkpoints" / f"step-{step:08d}"
                ckpt.mkdir(parents=True)
                for name in files:
                    (ckpt / name).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert cli.main(argv + ([flag] if flag else [])) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"lorweb-fast train: interrupted; {hint.format(out=out)}\n"


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_interrupted_line_comes_from_the_main_rank_only(train_inputs, monkeypatch, capsys, rank, printed):
    """Under `accelerate launch` the launcher passes Ctrl-C on to every rank, and a failed train has ended its
    (gloo) process group by the time the line is printed: the launcher's RANK variable then tells the main process,
    which alone prints it. Status 130 on every rank."""
    argv, _ = train_inputs

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    monkeypatch.setenv("RANK", rank)
    assert cli.main(argv) == 130
    assert ("interrupted" in capsys.readouterr().err) is printed


def test_interrupted_commands_say_whether_running_them_again_continues(tmp_path, monkeypatch, capsys):
    """``data prepare`` and ``eval generate`` continue where an interrupted run stopped when run again (what they
    wrote is kept), and their interruption line says so; a command without a way to continue (``data check``) says
    only that it was interrupted. Status 130 each time."""
    from lorweb_fast import data
    from lorweb_fast.evaluation import generate
    from lorweb_fast.testing import relation252k_folder

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12), (16, 12)]}, seed=1)
    monkeypatch.setattr(data, "write_analogy", interrupt)
    assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "prepared"), "--quiet"]) == 130
    assert capsys.readouterr().err == ("lorweb-fast data prepare: interrupted; run the same command again to "
                                       "continue (the analogies written are kept)\n")

    monkeypatch.setattr(generate, "run_generate", interrupt)
    weights = tmp_path / "lorweb.safetensors"
    weights.write_bytes(b"x")
    assert cli.main(["eval", "generate", "--evalset", str(tmp_path / "rel"), "--weights", str(weights), "--model",
                     "m", "--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet"]) == 130
    assert capsys.readouterr().err == ("lorweb-fast eval generate: interrupted; run the same command again to "
                                       "continue (the images written are kept)\n")

    demo.make_synthetic_analogies(tmp_path / "data", 2)
    monkeypatch.setattr(data, "check_folder", interrupt)
    assert cli.main(["data", "check", str(tmp_path / "data"), "--quiet"]) == 130
    assert capsys.readouterr().err == "lorweb-fast data check: interrupted\n"


# --------------------------------------------------------------------------------------------------------- demo
@pytest.fixture
def fake_demo(monkeypatch):
    """Every heavy step of ``run_demo`` replaced: the builders do nothing, training writes a 3-row loss log and a
    loss plot, the pipeline is recorded, the coefficient plot is a file; the held-out analogy is the real one."""
    calls = {}
    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda path, seed: None)
    monkeypatch.setattr(demo, "build_tiny_clip", lambda path, seed: None)
    monkeypatch.setattr(demo, "make_synthetic_analogies", lambda path, n, seed: None)

    def train(cfg):
        calls["cfg"] = cfg
        out = cfg.out
        from pathlib import Path

        Path(out).mkdir(parents=True)
        (Path(out) / "loss.png").write_bytes(b"plot")
        (Path(out) / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": l}) + "\n"
                                                      for s, l in ((1, 0.9), (2, 0.5), (3, 0.1))))
        return {"step": 3, "out": out}

    def plot(transformer, path):
        path.write_bytes(b"coefficients")
        return path

    monkeypatch.setattr(training, "train", train)
    record_loader(monkeypatch, calls)
    monkeypatch.setattr(flux, "plot_coefficients", plot)
    return calls


@pytest.mark.parametrize("extra", [[], ["--inference-steps", "3", "--seed", "5", "--quiet"]])
def test_demo_inference_gets_its_options(tmp_path, fake_demo, extra):
    """--inference-steps, --seed and --quiet reach the demo's inference (denoising steps, the generator's seed, the
    pipeline's progress bar), with the demo's short text length; its held-out analogy is demo_analogy(seed + 1),
    not one the seed also draws for training; the weights are the run's train/ folder, at native resolution, and
    training ran at the same 2-cell size; the default is 8 denoising steps."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *extra]) == 0
    steps, seed, quiet = (3, 5, True) if extra else (8, 0, False)
    (a, a_prime, b, prompt), kwargs = fake_demo["call"]
    assert kwargs["num_inference_steps"] == steps and kwargs["generator"].initial_seed() == seed
    assert kwargs["progress"] is (not quiet)
    assert kwargs["max_sequence_length"] == demo.DEMO_MAX_SEQUENCE_LENGTH
    want = demo.demo_analogy(seed=seed + 1)
    assert [im.tobytes() for im in (a, a_prime, b)] == [im.tobytes() for im in want[:3]] and prompt == want[3]
    load_args, load_kwargs = fake_demo["load"]
    assert load_args == (fake_demo["cfg"].model, out / "train")
    assert load_kwargs == {"resolution": "native", "long_edge": 2 * demo.DEMO_CELL}
    cfg = fake_demo["cfg"]  # trained at the grids' own size (2 cells), the size the inference above runs at
    assert (cfg.long_edge, cfg.resize, cfg.max_sequence_length) == \
        (2 * demo.DEMO_CELL, "long-edge", demo.DEMO_MAX_SEQUENCE_LENGTH)


def test_demo_summary_and_analogy_strip(tmp_path, fake_demo):
    """summary.json records the run's first and last loss and step count and the files written; analogy.png is
    a | a' | b | b' in that order (README), b' the pipeline's output."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "3", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["first_loss"], summary["last_loss"]) == (3, 0.9, 0.1)
    assert summary["files"] == {"b_prime": str(out / "b_prime.png"), "analogy": str(out / "analogy.png"),
                                "loss_plot": str(out / "loss.png"), "coefficients": str(out / "coefficients.png")}
    assert (out / "loss.png").read_bytes() == b"plot"
    a, a_prime, b, _ = demo.demo_analogy(seed=1)
    with Image.open(out / "analogy.png") as strip:
        w, h = 16, 16  # b''s size
        cells = [strip.crop((i * (w + 4), 0, i * (w + 4) + w, h)) for i in range(4)]
        for got, im in zip(cells, (a, a_prime, b)):
            assert got.tobytes() == im.convert("RGB").resize((w, h)).tobytes()
        assert cells[3].getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------------------------- logging and progress bars
def stub_infer(monkeypatch, body):
    monkeypatch.setattr(cli, "run_infer", body)
    return ["infer", "--a", "a", "--a-prime", "a", "--b", "b", "--prompt", "p", "--weights", "w"]


def test_command_logging_keeps_records_off_root_and_gives_the_logger_back(monkeypatch, capsys):
    """While a command runs, the package's records reach only the command's one-line stderr handler, not the root
    logger's handlers (no second copy of every line under a logging setup: accelerate, a notebook); afterwards the
    package logger's own level and propagation are back. The existing test compares with the state before the call,
    which an earlier cli.main in the same session may already have left at INFO / no propagation: here the state
    is set first."""
    import logging

    package, root = logging.getLogger("lorweb_fast"), logging.getLogger()
    saved = (package.level, package.propagate)
    seen = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Record(level=logging.DEBUG)
    root.addHandler(handler)
    package.setLevel(logging.WARNING)
    package.propagate = True
    try:
        argv = stub_infer(monkeypatch, lambda args: logging.getLogger("lorweb_fast.training").info("inside"))
        assert cli.main(argv) == 0
        assert capsys.readouterr().err == "lorweb-fast infer: info: inside\n"
        assert seen == []
        assert (package.level, package.propagate) == (logging.WARNING, True)
        logging.getLogger("lorweb_fast.training").warning("after")
        assert seen == ["after"]
    finally:
        root.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]


def test_quiet_leaves_bars_that_were_off_off(monkeypatch):
    """--quiet in-process (cli.main from a script or notebook) puts each library's progress bar back as it was:
    one the caller had turned off stays off (the existing test starts with every bar on)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    try:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        with cli.library_progress_bars(enabled=False):
            pass
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        import huggingface_hub.utils as hub_utils
        hub_utils.enable_progress_bars()


# ------------------------------------------------------------------------------------------ python -m entry
def test_python_m_lorweb_fast_cli_exits_with_the_commands_status(tmp_path):
    """``python -m lorweb_fast.cli`` (what ``accelerate launch -m lorweb_fast.cli`` runs) exits with main()'s status:
    2 for a refused command, not 0. Only the slow two-process accelerate test covered this."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lorweb_fast.cli", "train", "--data", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("lorweb-fast train: error: --data ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("stdout_gone, status, line", [
    (True, 141, "lorweb-fast train: stopped: the reader of its output has gone; no checkpoint was written to {out} "
                "yet\n"),
    (False, 1, "lorweb-fast train: error: [Errno 32] Broken pipe; no checkpoint was written to {out} yet\n"),
])
def test_a_broken_pipe_in_train_is_a_quiet_stop_only_when_it_is_stdouts(train_inputs, tmp_path, monkeypatch, capsys,
                                                                         stdout_gone, status, line):
    """``lorweb-fast train ... | head`` whose reader has gone: the run stops as a Unix filter does (status 141,
    128 + SIGPIPE), with the one line that says how to continue, since a training run continues. A BrokenPipeError
    from anything else (stdout still has its reader: a worker's pipe) is an error as before (status 1), never
    taken for a closed stdout (``cli.stdout_reader_gone`` asks the file descriptor)."""
    argv, _ = train_inputs

    def broken(cfg):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(training, "train", broken)
    monkeypatch.setattr(cli, "stdout_reader_gone", lambda: stdout_gone)
    monkeypatch.setattr(cli, "_discard_stdout", lambda: None)  # (pytest's captured stdout has no descriptor)
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    assert captured.err == line.format(out=tmp_path / "run")


def test_stdout_reader_gone_asks_the_file_descriptor(tmp_path, monkeypatch):
    """``stdout_reader_gone``: True for a pipe whose read end is closed, False for one with its reader, for a
    regular file and for a stdout without a descriptor (captured)."""
    import io
    import os

    read, write = os.pipe()
    try:
        with os.fdopen(write, "w") as out:
            monkeypatch.setattr(sys, "stdout", out)
            assert cli.stdout_reader_gone() is False
            os.close(read)
            read = None
            assert cli.stdout_reader_gone() is True
    finally:
        if read is not None:
            os.close(read)
    with open(tmp_path / "file", "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert cli.stdout_reader_gone() is False
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.stdout_reader_gone() is False
