"""`lorweb-fast train` under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes over gloo): a run
killed mid-way resumes bit-identically, a resume may change the number of processes, a bad sample drawn by one rank
stops every rank in bounded time with its message, a failed command ends its process group as a finished one does,
and `--overwrite` keeps the old run when a rank cannot load the models.

Every launch is bounded (300 s) and the launcher's worker processes, which torchrun starts in sessions of their
own, are killed with it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorweb_fast.data import AnalogyFolder
from lorweb_fast.testing import free_port, load_module_from_file, tiny_training_assets
from lorweb_fast.training import StepBatchSampler, batch_groups

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
HERE = Path(__file__).resolve().parent
tiny_train_cli = load_module_from_file(HERE / "test_training.py", "test_training_for_audit").tiny_train_cli
LIMIT = 300  # seconds for one launch
ENV = dict(os.environ, OMP_NUM_THREADS="1")

# Runs `lorweb-fast train` as `cli.main` does for the console script, and reports per rank what the command left
# behind: its exit status and whether a process group is still alive. MODE "late-load-failure-on-rank-1": rank 1's
# base model fails to load 5 s after the start (the main rank has loaded its models by then), as a GPU out of memory
# on one device or a download failing on one node would. A rank that failed waits 5 s before it exits, since torchrun
# terminates the other ranks as soon as one has exited.
WRAPPER = '''
import os, sys, time, torch
from lorweb_fast import cli, training
mode, argv = sys.argv[1], sys.argv[2:]
if mode == "late-load-failure-on-rank-1" and os.environ["RANK"] == "1":
    def failing_load(*args, **kwargs):
        time.sleep(5)
        raise ValueError("simulated: rank 1 could not load the base model")
    training.load_training_pipeline = failing_load
rc = cli.main(argv)
alive = torch.distributed.is_available() and torch.distributed.is_initialized()
# one write with its newline (print writes the text and the newline apart: two ranks' lines could run together)
sys.stdout.write(f"audit rank {os.environ['RANK']}: exit {rc}, process group alive: {alive}\\n")
sys.stdout.flush()
if rc:
    time.sleep(5)  # torchrun terminates the other ranks once one has exited: let them report too
sys.exit(rc)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("mp-audit"), 12)


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def train_cmd(assets, data, out, *extra: str, processes: int = 2) -> list[str]:
    """The tiny `lorweb-fast train` of tests/test_training.py under ``processes`` processes, fp32 weights files."""
    return [*launcher(processes), *tiny_train_cli(assets, data, out), "--quiet", "--save-dtype", "fp32", *extra]


def descendants(pid: int) -> list:
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing, or the process is gone
        return []


def stop(proc: subprocess.Popen) -> None:
    """End the launcher and the workers it started (torchrun puts them in sessions of their own)."""
    children = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # torchrun terminates its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` to its end within LIMIT seconds (a rank waiting forever fails the test instead of hanging it)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"still running after {LIMIT} s: {' '.join(cmd)}\n{(out + err)[-3000:]}")
    finally:
        stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def trainer_state(out, step: int) -> dict:
    return torch.load(Path(out) / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt", weights_only=True)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "lorweb-fast train: error:" in line]


# --------------------------------------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_two_process_run_killed_mid_way_resumes_bit_identically(assets, tmp_path):
    """README: "a killed run loses at most --checkpoint-every steps and the resumed result is bit-identical to an
    uninterrupted one", here for the DDP command line: a 2-process run terminated (SIGTERM to the launcher, as a
    cluster preemption) after its step-2 checkpoint, resumed with --resume by 2 processes, ends with the same
    weights, fp32 masters, optimizer state and loss log as an uninterrupted 2-process run."""
    steps = ["--steps", "16", "--checkpoint-every", "2", "--keep-checkpoints", "0"]
    full = run(train_cmd(assets, assets / "data", tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(assets, assets / "data", killed, *steps), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + LIMIT
        while not (killed / "checkpoints" / "step-00000002").is_dir() and proc.poll() is None:
            assert time.time() < deadline, "no step-2 checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode != 0 and not (killed / "checkpoints" / "step-00000016").exists()  # it was interrupted

    resumed = run(train_cmd(assets, assets / "data", killed, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resumed from") == 1
    want, got = load_file(str(tmp_path / "full" / "lorweb.safetensors")), load_file(str(killed / "lorweb.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a, b = trainer_state(tmp_path / "full", 16), trainer_state(killed, 16)
    for name, state in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], b["optimizer"]["state"][name][key]), (name, key)
    assert (a["data_position"], a["num_processes"]) == (b["data_position"], b["num_processes"]) == (32, 2)
    assert (killed / "loss.jsonl").read_text() == (tmp_path / "full" / "loss.jsonl").read_text()


@pytest.mark.slow
def test_resume_with_another_number_of_processes_continues_the_stream(assets, tmp_path):
    """README: "a resume with another number of processes continues the stream where it stopped ... with a warning
    that the global batch size changes", on the command line: 2 processes to step 2, one process (plain
    `lorweb-fast train`) to step 4, 2 processes again to step 6. Each checkpoint records the stream position (in
    bucket batches: 2 x 2, + 2 x 1, + 2 x 2) and its process count, each resume warns once, and the loss log holds
    one row per step."""
    out = tmp_path / "run"
    for processes, steps, extra in ((2, 2, ()), (1, 4, ("--resume",)), (2, 6, ("--resume",))):
        proc = run(train_cmd(assets, assets / "data", out, "--steps", str(steps), "--checkpoint-every", "2",
                             "--keep-checkpoints", "0", *extra, processes=processes))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if extra:
            was = 3 - processes
            was_text = f"{was} process{'' if was == 1 else 'es'}"  # "1 process", "2 processes"
            assert proc.stderr.count(f"resuming a run of {was_text} with {processes}") == 1, proc.stderr[-3000:]
    positions = [(trainer_state(out, s)["data_position"], trainer_state(out, s)["num_processes"]) for s in (2, 4, 6)]
    assert positions == [(4, 2), (6, 1), (10, 2)]
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------- one rank fails mid-run
def truncated_sample_drawn_by_rank_1_at_step_3(assets, tmp_path) -> tuple[Path, Path, bytes]:
    """A copy of the tiny data set where one sample that only rank 1 draws, first at step 3 (seed 0, batch 2, 2
    processes), has a truncated JPEG target: its header passes the scan before training, its draw fails. Returns
    the data folder, that file and its complete bytes."""
    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    dataset = AnalogyFolder(data, long_edge=64, resize="long-edge")
    batches = {rank: StepBatchSampler(len(dataset), 2, seed=0, start_step=0, total_steps=3, world_size=2, rank=rank,
                                      groups=batch_groups(dataset, "bucket")) for rank in (0, 1)}
    earlier = {i for rank in (0, 1) for step in (0, 1) for i in batches[rank].batch(step)} | set(batches[0].batch(2))
    index = next(i for i in batches[1].batch(2) if i not in earlier)
    target = Path(dataset.samples[index][1])
    bad = target.with_suffix(".jpg")
    Image.open(target).convert("RGB").save(bad, quality=95)
    target.unlink()
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    return data, bad, good


@pytest.mark.slow
def test_bad_sample_drawn_by_one_rank_mid_run_stops_every_rank(assets, tmp_path):
    """A training draw of a file that does not decode stops the run naming it (README): under 2 processes (no
    DataLoader workers) rank 1 hits it at step 3 while rank 0 waits in the step's loss reduction; both ranks stop
    within the time limit, the launcher exits non-zero, the error naming the file is printed once, on a line of its
    own, and the step-2 checkpoint is intact: with the file repaired, --resume finishes the run."""
    data, bad, good = truncated_sample_drawn_by_rank_1_at_step_3(assets, tmp_path)
    out = tmp_path / "run"
    steps = ["--steps", "4", "--checkpoint-every", "2"]
    proc = run(train_cmd(assets, data, out, *steps))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"lorweb-fast train: error: {bad} is not a readable image"), lines[0][:600]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    bad.write_bytes(good)
    proc = run(train_cmd(assets, data, out, *steps, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained to step 4" in proc.stdout


@pytest.mark.slow
def test_bad_sample_mid_run_error_is_one_line_naming_the_file_with_default_dataloader_workers(assets, tmp_path):
    """The same bad sample with `--num-workers 2` (train's default): the error is the one line naming the file, as
    without workers. torch re-raises a worker's AnalogyDataError with "Caught AnalogyDataError in DataLoader worker
    process 0." and the worker's whole traceback as its message, which the command line printed as one long line
    starting with the worker text (one process with workers did the same); the trainer now re-raises it with its
    own message (training._batches)."""
    data, bad, _ = truncated_sample_drawn_by_rank_1_at_step_3(assets, tmp_path)
    proc = run(train_cmd(assets, data, tmp_path / "run", "--steps", "4", "--checkpoint-every", "2",
                         "--num-workers", "2"))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"lorweb-fast train: error: {bad} is not a readable image"), lines[0][:600]
    assert "Traceback" not in lines[0] and "DataLoader worker" not in lines[0], lines[0][:600]


# ------------------------------------------------------------------------------ how a failed command ends
@pytest.fixture(scope="module")
def refused_launch(assets, tmp_path_factory):
    """`accelerate launch` (2 processes) of `lorweb-fast train` into an --out that already holds a run (a loss
    log), without --resume: every rank refuses after the process group started. Returns the launch's result."""
    root = tmp_path_factory.mktemp("refused")
    (root / "run").mkdir()
    (root / "run" / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (root / "wrapper.py").write_text(WRAPPER)
    cmd = [*launcher(2), str(root / "wrapper.py"), "none",
           *tiny_train_cli(assets, assets / "data", root / "run")[2:], "--quiet"]
    return run(cmd)


@pytest.mark.slow
def test_failed_train_command_destroys_its_process_group(refused_launch):
    """A failed `lorweb-fast train` (here a refused --out on every rank, after the process group started) ends the
    gloo process group it started, as a finished one does (README): each rank exits with status 2 and no group
    alive. It used to be destroyed after a successful run only; a gloo rank under torch 2.15 could then abort at
    exit with another status than 2."""
    text = refused_launch.stdout + refused_launch.stderr
    assert refused_launch.returncode != 0
    # found anywhere in the text: another process's output may share a line with a report
    reports = sorted(re.findall(r"audit rank \d+: exit -?\d+, process group alive: (?:True|False)", text))
    assert [r.split(":")[0] for r in reports] == ["audit rank 0", "audit rank 1"], text[-3000:]
    assert all("exit 2," in r for r in reports), reports  # the refusal, on every rank
    assert all(r.endswith("process group alive: False") for r in reports), reports


@pytest.mark.slow
def test_refusal_under_two_processes_is_printed_once(refused_launch):
    """The refusal of a used --out, which the main process decides and every rank raises, is printed once (every
    rank used to print it), on a line of its own: `print` wrote a message and its newline separately, so two
    ranks' copies sometimes ran together ("... start overlorweb-fast train: error: ...")."""
    err = refused_launch.stderr
    assert refused_launch.returncode != 0
    assert err.count("already holds a training run") == 1, err[-3000:]
    assert all(line.count("lorweb-fast train: error:") == 1 for line in error_lines(err)), err[-3000:]


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_when_another_rank_fails_to_load_the_models(assets, tmp_path):
    """README: "`--overwrite` deletes them only once the base model and the encoder have loaded, so a call that
    fails before ... keeps the old run", under 2 processes: the main rank deleted the old run as soon as its own
    models had loaded; when rank 1's load fails (here 5 s late; a GPU out of memory on one device, a download
    failing on one node), the launch fails and the old run stays (every rank's load is awaited first)."""
    out = tmp_path / "run"
    first = run(train_cmd(assets, assets / "data", out, "--steps", "2", "--checkpoint-every", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    cmd = [*launcher(2), str(tmp_path / "wrapper.py"), "late-load-failure-on-rank-1",
           *tiny_train_cli(assets, assets / "data", out)[2:], "--quiet", "--overwrite"]
    proc = run(cmd)
    assert proc.returncode != 0
    assert "simulated: rank 1 could not load the base model" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


@pytest.mark.parametrize("message", ["/data/t/7.jpg is not a readable image (OSError: image file is truncated)",
                                     "two lines:\nthe second: with a colon"])
def test_a_worker_error_comes_out_with_its_own_message(message):
    """training._batches: an AnalogyDataError a DataLoader worker raised (torch's ExceptionWrapper, as the worker
    loop sends it; raised here while another error is handled, so its traceback holds two) comes out as an
    AnalogyDataError with the worker's message, the re-raised one as its cause; another error, or an
    AnalogyDataError raised in the main process, comes out unchanged; the batches before it are yielded."""
    from torch._utils import ExceptionWrapper

    from lorweb_fast.data import AnalogyDataError
    from lorweb_fast.training import _batches

    try:
        try:
            raise OSError("image file is truncated")
        except OSError:
            raise AnalogyDataError(message)
    except AnalogyDataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")

    def loader(error):
        yield "batch 0"
        if isinstance(error, ExceptionWrapper):
            error.reraise()
        raise error

    seen = []
    with pytest.raises(AnalogyDataError) as info:
        for batch in _batches(loader(wrapped)):
            seen.append(batch)
    assert seen == ["batch 0"] and str(info.value) == message
    assert str(info.value.__cause__).startswith("Caught AnalogyDataError in DataLoader worker process 1.")
    for error in (AnalogyDataError("Caught nothing: " + message), RuntimeError("Caught AnalogyDataError in "
                                                                               "DataLoader worker process 0.")):
        with pytest.raises(type(error)) as info:
            list(_batches(loader(error)))
        assert info.value is error
