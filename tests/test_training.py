"""Training on tiny random FLUX.1-Kontext / CLIP models and a synthetic analogy set: the loss goes down, checkpoints
are official-format and atomic, resume after a kill is exact, DDP keeps ranks identical, the data folder is
validated, and ``lorweb-fast demo`` writes its images."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import lorweb_fast as lf
from lorweb_fast import cli, demo, flux, training
from lorweb_fast.data import AnalogyDataError, AnalogyFolder
from lorweb_fast.testing import NanGradient, free_port, random_rgb_image, tiny_train_config, tiny_training_assets
from lorweb_fast.training import TrainConfig

pytest.importorskip("diffusers")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("train"), 12)


# weights saved in fp32 for bit-exact save/load comparisons; fp16 (the default) is tested separately
config = tiny_train_config


def weights(path) -> dict:
    return load_file(str(path))


def trainer_state(out, step: int) -> dict:
    return torch.load(Path(out) / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt", weights_only=True)


def test_training_lowers_the_loss_and_only_trains_lorweb(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", steps=24, checkpoint_every=8, keep_checkpoints=2)
    dataset = AnalogyFolder(cfg.data, long_edge=cfg.long_edge, resize=cfg.resize)
    encoder = flux.AnalogyEncoder(cfg.encoder)

    fresh = flux.load_kontext_pipeline(cfg.model)
    lf.inject_lorweb(fresh.transformer, lf.LoRWeBConfig(num_loras=4, rank=2, key_dim=8, query_dim=encoder.query_dim))
    before = training.evaluation_loss(fresh, encoder, dataset, cfg)  # lora_B starts at zero: the base model

    pipe = flux.load_kontext_pipeline(cfg.model)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    result = training.train(cfg, pipe=pipe, encoder=encoder)
    assert result["step"] == 24
    after = training.evaluation_loss(pipe, encoder, dataset, cfg)
    assert after < 0.97 * before, (before, after)

    # frozen: every base tensor is bit-identical; the LoRWeB tensors moved
    trained = pipe.transformer.state_dict()
    for key, value in base.items():
        name = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        got = trained[key] if key in trained else trained[name]
        assert torch.equal(got, value), key
    assert all(l.lora_B.abs().max() > 0 for l in lf.lorweb_layers(pipe.transformer).values())

    # outputs: official-format checkpoints (kept 2), the loss log and its plot
    run = Path(cfg.out)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000016", "step-00000024"]
    with safe_open(str(run / "lorweb.safetensors"), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
        assert f.metadata()["encoder"] == cfg.encoder
        # ai-toolkit's job name is the run's: name and ss_output_name in the metadata, config.name in config.yaml
        assert f.metadata()["name"] == f.metadata()["ss_output_name"] == run.name == "run"
        # 12 samples of one size in batches of 2: 6 batches a pass; the 24th batch is the last of the 4th pass
        assert json.loads(f.metadata()["training_info"]) == {"step": 24, "epoch": 3}
    with safe_open(str(run / "checkpoints" / "step-00000016" / "lorweb.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["training_info"]) == {"step": 16, "epoch": 2}
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert np.asarray(Image.open(run / "loss.png").convert("L")).std() > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["config"]["name"] == "run"

    # save -> load gives the same outputs
    reloaded = flux.load_kontext_pipeline(cfg.model)
    lf.load_lorweb_weights(reloaded.transformer, run / "lorweb.safetensors")
    assert training.evaluation_loss(reloaded, encoder, dataset, cfg) == after
    lp_a = flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)
    lp_b = flux.LoRWeBKontextPipeline(reloaded, encoder, resolution="native", long_edge=64)
    a, a2, b, prompt = demo.demo_analogy()
    outs = [p(a, a2, b, prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
              max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, progress=False)[0] for p in (lp_a, lp_b)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_resume_continues_the_data_stream_the_checkpoint_records(assets, tmp_path, monkeypatch):
    """The trainer state's data_position (where the stream stopped) is what the resumed sampler starts from, and a
    changed num_processes is warned about: here the checkpoint is edited to say a 2-process run wrote it (its
    stream at 2 steps of 2 processes), and the one-process resume draws its step-3 batch from there (from start_step
    alone it would have drawn the batch at 2 steps of one process, already seen)."""
    cfg = config(assets, tmp_path / "run", steps=2, checkpoint_every=2)
    training.train(cfg)
    path = training.latest_checkpoint(cfg.out) / training.TRAINER_STATE_NAME
    state = torch.load(path, weights_only=True)
    unit = 1 if cfg.batching == "bucket" else cfg.batch_size
    assert (state["data_position"], state["num_processes"]) == (2 * unit, 1)
    state["data_position"], state["num_processes"] = 2 * 2 * unit, 2
    torch.save(state, path)
    drawn = []
    batch = training.StepBatchSampler.batch
    monkeypatch.setattr(training.StepBatchSampler, "batch",
                        lambda self, step: drawn.append((step, self.stream_position(step))) or batch(self, step))
    with pytest.warns(lf.LoRWeBWarning, match="resuming a run of 2 processes with 1"):
        training.train(dataclasses.replace(cfg, steps=3, resume=True))
    assert drawn[0] == (2, 4 * unit)
    assert trainer_state(tmp_path / "run", 3)["data_position"] == 5 * unit


def test_resume_after_kill_is_exact(assets, tmp_path):
    straight = training.train(config(assets, tmp_path / "straight", steps=8, checkpoint_every=3))

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    killed_cfg = config(assets, tmp_path / "killed", steps=8, checkpoint_every=3)
    with pytest.raises(Killed):
        training.train(killed_cfg, step_callback=kill_at_5)
    ckpt = training.latest_checkpoint(killed_cfg.out)
    assert ckpt.name == "step-00000003"  # at most checkpoint_every steps are lost
    log = Path(killed_cfg.out) / "loss.jsonl"  # a run stopped while appending: a torn last line
    log.write_text(log.read_text() + '{"step": 5, "lo')

    seen = []
    with pytest.warns(UserWarning, match="1 incomplete line"):
        resumed = training.train(dataclasses.replace(killed_cfg, resume=True),
                                 step_callback=lambda s, l: seen.append(s))
    assert seen == [4, 5, 6, 7, 8]
    assert resumed["step"] == straight["step"] == 8

    a, b = weights(tmp_path / "straight" / "lorweb.safetensors"), weights(tmp_path / "killed" / "lorweb.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = trainer_state(tmp_path / "straight", 8), trainer_state(tmp_path / "killed", 8)
    assert sa["step"] == sb["step"] == 8
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert int(pa["step"]) == int(pb["step"]) == 8
        for key in pa:
            if isinstance(pa[key], torch.Tensor):
                assert torch.equal(pa[key], pb[key]), key
    log_a = [json.loads(l) for l in (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "killed" / "loss.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_the_loss_scalers_state_resumes(assets, tmp_path, monkeypatch):
    """fp16 training scales the loss (accelerate's GradScaler on a GPU): its scale and growth tracker are saved in the
    trainer state and restored on resume. Without that a resumed run restarted at the initial scale and skipped an
    overflowing step the uninterrupted run did not. On CPU the scaler is attached as accelerate attaches it on a GPU,
    with an initial scale so large that the tiny model overflows at first."""
    import accelerate

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126, growth_interval=2)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    straight = config(assets, tmp_path / "straight", steps=6, checkpoint_every=3, optimizer="adamw")
    training.train(straight)

    class Killed(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    killed = config(assets, tmp_path / "killed", steps=6, checkpoint_every=3, optimizer="adamw")
    with pytest.raises(Killed):
        training.train(killed, step_callback=kill_at_5)
    state = trainer_state(tmp_path / "killed", 3)
    assert state["grad_scaler"]["scale"] != 2.0 ** 126  # it has moved (grown, or backed off after an overflow)
    training.train(dataclasses.replace(killed, resume=True))
    a, b = weights(tmp_path / "straight" / "lorweb.safetensors"), weights(tmp_path / "killed" / "lorweb.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    straight, killed = trainer_state(tmp_path / "straight", 6), trainer_state(tmp_path / "killed", 6)
    assert straight["grad_scaler"] == killed["grad_scaler"]


def test_fp16_checkpoints_resume_exactly_from_fp32_masters(assets, tmp_path):
    """The default save dtype is fp16 (official); trainer_state.pt keeps the fp32 masters, so a resume is exact."""
    kw = dict(steps=4, checkpoint_every=2, save_dtype="fp16")
    training.train(config(assets, tmp_path / "straight", **kw))

    class Killed(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    killed_cfg = config(assets, tmp_path / "killed", **kw)
    with pytest.raises(Killed):
        training.train(killed_cfg, step_callback=kill_at_3)
    training.train(dataclasses.replace(killed_cfg, resume=True))
    a, b = weights(tmp_path / "straight" / "lorweb.safetensors"), weights(tmp_path / "killed" / "lorweb.safetensors")
    assert all(v.dtype == torch.float16 for v in a.values()) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = trainer_state(tmp_path / "straight", 4)["lorweb_master_weights"]
    mb = trainer_state(tmp_path / "killed", 4)["lorweb_master_weights"]
    assert all(ma[k].dtype == torch.float32 and torch.equal(ma[k], mb[k]) for k in ma)
    assert any(not torch.equal(ma[k].half().float(), ma[k]) for k in ma)  # fp16 really rounds the masters
    assert (tmp_path / "killed" / "config.yaml").is_file()


def test_checkpoint_write_is_atomic(assets, tmp_path, monkeypatch):
    cfg = config(assets, tmp_path / "run", steps=4, checkpoint_every=2)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step-00000004" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        training.train(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000002"]  # no partial step-4 folder, no temporary left behind
    assert training.latest_checkpoint(cfg.out).name == "step-00000002"


def official_clean_up_saves(saved: list[int], keep: int, milestone: int = 500) -> list[int]:
    """The steps left after ai-toolkit's jobs/process/BaseSDTrainProcess.py ``clean_up_saves`` (run after every
    save): the saves before the newest ``max_step_saves_to_keep`` (``items[:-keep]``, nothing for keep 0) are
    removed, except those for which ``is_milestone_step(filename, milestone=500)``: step % milestone == 0.
    ``milestone=None`` drops that exception (lorweb_fast's ``keep_milestone_every=0``)."""
    removed = saved[:-keep] if saved else []
    removed = [s for s in removed if milestone is None or s % milestone != 0]
    return [s for s in saved if s not in removed]


@pytest.mark.parametrize("keep,milestone_every", [(4, 500), (2, 500), (4, 0), (3, 1000)])
def test_checkpoint_rotation_keeps_milestones_as_ai_toolkit(tmp_path, keep, milestone_every):
    """Official save_every 250, max_step_saves_to_keep 4: after step 3000 the kept saves are 2250..3000 and the
    milestones 500, 1000, 1500, 2000, not just the newest four."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6, target_modules=["0"]))
    weights = lf.lorweb_state_dict(model)
    saved = []
    for step in range(250, 3001, 250):
        training._write_checkpoint(tmp_path, step, model, weights, {"state": {}, "param_groups": []}, {}, keep,
                                   milestone_every=milestone_every)
        saved = official_clean_up_saves(saved + [step], keep, milestone_every or None)
        assert [int(p.name.split("-")[1]) for p in training.checkpoint_dirs(tmp_path)] == saved, step
    if (keep, milestone_every) == (4, 500):
        assert saved == [500, 1000, 1500, 2000, 2250, 2500, 2750, 3000]
    assert TrainConfig(data="d", out="o").keep_milestone_every == training.OFFICIAL_MILESTONE_EVERY == 500
    with pytest.raises(ValueError, match="keep_milestone_every must be >= 0"):
        TrainConfig(data="d", out="o", keep_milestone_every=-1).validate()


def test_training_keeps_milestone_checkpoints(assets, tmp_path):
    """train() hands ``keep_milestone_every`` to the rotation: with keep_checkpoints=1 and milestones every 2 steps,
    a 3-step run keeps step 2 (a milestone) and step 3 (the newest)."""
    training.train(config(assets, tmp_path / "run", steps=3, checkpoint_every=1, keep_checkpoints=1,
                          keep_milestone_every=2))
    assert [p.name for p in training.checkpoint_dirs(tmp_path / "run")] == ["step-00000002", "step-00000003"]


def launch(cfg: TrainConfig, cwd, *modes: str,
           launcher_args=("--multi_gpu", "--num_processes", "2")) -> tuple[list[dict], str]:
    """Run tests/accelerate_train_worker.py under ``accelerate launch``; returns every rank's LoRWeB tensors and
    the metadata the worker wrote (world size, backend, distributed type, whether parameters were sharded), and the
    launch's stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_machines", "1",
           "--mixed_precision", cfg.mixed_precision, "--dynamo_backend", "no", str(HERE / "accelerate_train_worker.py"),
           json.dumps(dataclasses.asdict(cfg)), *modes]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = []
    for path in sorted(Path(cfg.out).glob("rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            ranks.append({"tensors": {k: f.get_tensor(k) for k in f.keys()}, "meta": f.metadata()})
    return ranks, proc.stderr


def assert_ranks_identical(ranks: list[dict]) -> dict:
    assert len(ranks) == int(ranks[0]["meta"]["world_size"]) and ranks[0]["tensors"]
    for other in ranks[1:]:
        assert other["tensors"].keys() == ranks[0]["tensors"].keys()
        for k, v in ranks[0]["tensors"].items():
            assert torch.equal(v, other["tensors"][k]), k
    return ranks[0]["tensors"]


@pytest.mark.slow
def test_ddp_two_processes_keep_ranks_identical(assets, tmp_path):
    """Two DDP processes stay identical, also when one rank's loss is NaN at step 2: the loss is reduced over the
    ranks before backward, so every rank skips that step together (no rank waits in a gradient all-reduce that the
    other never starts)."""
    cfg = config(assets, tmp_path / "ddp", steps=3, checkpoint_every=3)
    ranks, _ = launch(cfg, tmp_path, "nan-on-last-rank-call=2")
    assert ranks[0]["meta"]["world_size"] == "2" and ranks[0]["meta"]["distributed_type"].endswith("MULTI_CPU")
    r0 = assert_ranks_identical(ranks)
    assert any(r0[k].abs().max() > 0 for k in r0 if k.endswith("lora_B"))  # it did train
    saved = weights(tmp_path / "ddp" / "lorweb.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in r0)
    rows = [json.loads(r) for r in (tmp_path / "ddp" / "loss.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # one line per step, written by the main process only
    assert [r["loss"] is None for r in rows] == [False, True, False]  # rank 1's NaN skipped the step on rank 0 too


@pytest.mark.slow
def test_ddp_with_a_qfloat8_base_keeps_ranks_identical(assets, tmp_path):
    """DDP over a transformer quantized by optimum-quanto (``--quantize-base qfloat8``): DDP's start-up broadcast of
    the module states takes quanto's fp8 weight tensors, and both ranks end with the same trained LoRWeB tensors."""
    pytest.importorskip("optimum.quanto")
    cfg = config(assets, tmp_path / "ddp", steps=2, checkpoint_every=2, quantize_base="qfloat8", optimizer="adamw")
    ranks, _ = launch(cfg, tmp_path)
    assert ranks[0]["meta"]["world_size"] == "2"
    r0 = assert_ranks_identical(ranks)
    assert any(r0[k].abs().max() > 0 for k in r0 if k.endswith("lora_B"))


@pytest.mark.slow
def test_ddp_overwrite_deletes_the_old_run_after_every_rank_has_read_it(assets, tmp_path):
    """--overwrite under two processes: the other ranks read --out only after the main process has checked it (they
    used to read it while it was being deleted: a FileNotFoundError when a folder vanished between two of their
    reads), and the old run is deleted only once every rank has read it and the models have loaded (a call whose
    model fails to load keeps it). Here the main process starts 5 s late; rank 1 still finds the old run intact when
    it reads --out. Only the run's files go, the new run writes its own checkpoint once."""
    out = tmp_path / "run"
    old = out / "checkpoints" / "step-00000004"
    old.mkdir(parents=True)
    for name in ("lorweb.safetensors", "trainer_state.pt"):
        (old / name).write_bytes(b"old")
    (out / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "notes.txt").write_text("mine")
    cfg = config(assets, out, steps=2, checkpoint_every=2, overwrite=True)
    ranks, _ = launch(cfg, tmp_path, "slow-main-prepare")
    assert_ranks_identical(ranks)
    assert (tmp_path / "prepare-rank1.txt").read_text() == "old run"
    assert [p.name for p in training.checkpoint_dirs(out)] == ["step-00000002"]
    assert (out / "notes.txt").read_text() == "mine"
    assert len((out / "loss.jsonl").read_text().splitlines()) == 2


def tiny_train_cli(assets, data, out) -> list[str]:
    """``-m lorweb_fast.cli train ...`` for a launcher: one tiny step on ``data`` into ``out``."""
    return ["-m", "lorweb_fast.cli", "train", "--data", str(data), "--out", str(out), "--model", str(assets / "pipe"),
            "--encoder", str(assets / "clip"), "--steps", "1", "--batch-size", "2", "--mixed-precision", "no",
            "--long-edge", "64", "--resize", "long-edge", "--num-loras", "4", "--rank", "2", "--key-dim", "8",
            "--num-workers", "0", "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH), "--optimizer", "adamw"]


@pytest.mark.slow
def test_two_nodes_show_one_progress_bar(assets, tmp_path):
    """Two torchrun "nodes" of one process each (on this machine): the second node's process is its node's local
    main process but not the main one, and it used to show a second training progress bar."""
    port, env = str(free_port()), dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               *tiny_train_cli(assets, assets / "data", tmp_path / "run")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "LoRWeB training" in logs[0] and "trained to step 1" in logs[0]
    assert "LoRWeB training" not in logs[1] and "trained to step 1" not in logs[1], logs[1][-3000:]


@pytest.mark.slow
def test_cli_under_two_processes_reports_once_and_refusals_stop_every_rank(assets, tmp_path):
    """`accelerate launch ... lorweb-fast train` with two processes: the data scan's warnings, the resume notice and
    the closing line come once (the other rank used to repeat each of them), and a refused --out stops both ranks
    with the message (no rank waits for the other)."""
    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    (data / "captions" / "0003.txt").unlink()  # a sample without a caption: a warning
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", *tiny_train_cli(assets, data, tmp_path / "run"), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert text.count("training samples have no caption") == 1, text[-3000:]
    assert text.count("--resume: no checkpoint") == 1, text[-3000:]
    assert text.count("trained to step 1") == 1, text[-3000:]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # used --out, no --resume
    assert proc.returncode != 0
    assert "already holds a training run" in proc.stderr and "pass --resume" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp2_matches_ddp_resumes_and_writes_portable_checkpoints(assets, tmp_path):
    """accelerate's FSDP2 preparation (transformer blocks as units; on CPU turned on by the worker, see there):
    the LoRWeB parameters are really sharded, training is the same computation as DDP, checkpoints gather the
    full LoRWeB tensors and optimizer state, a resume under FSDP continues exactly, and the FSDP checkpoint resumes
    in a plain single-process run."""
    common = dict(steps=4, checkpoint_every=2, optimizer="adamw")  # bitsandbytes cannot step DTensors (tested below)
    ddp_cfg = config(assets, tmp_path / "ddp", **common)
    fsdp_cfg = config(assets, tmp_path / "fsdp", **common)
    launch(ddp_cfg, tmp_path)
    ranks, log = launch(fsdp_cfg, tmp_path, "fsdp2-cpu", "resume-at=2")  # 2 steps, then resumed to step 4
    assert "not inside a wrapped transformer block" not in log  # every LoRWeB layer is sharded with its block
    assert ranks[0]["meta"]["distributed_type"].endswith("FSDP") and ranks[0]["meta"]["sharded"] == "True"
    r0 = assert_ranks_identical(ranks)

    # Same data, noise and mean gradient as DDP; only the summation order of fp32 reductions may differ. Adam
    # normalizes every update to at most ~lr, and a relative gradient change of a few fp32 ulps changes an update by
    # about as much, so after `steps` updates weights may differ by far less than 1e-4 * lr * steps.
    atol = 1e-4 * ddp_cfg.learning_rate * ddp_cfg.steps
    ddp, fsdp = weights(tmp_path / "ddp" / "lorweb.safetensors"), weights(tmp_path / "fsdp" / "lorweb.safetensors")
    assert ddp.keys() == fsdp.keys() == r0.keys()
    for k in ddp:
        assert fsdp[k].dtype == torch.float32 and fsdp[k].shape == ddp[k].shape, k
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=atol, msg=k)
        assert torch.equal(fsdp[k], r0[k]), k
    assert any(ddp[k].abs().max() > 0 for k in ddp if k.endswith("lora_B"))  # it did train

    sd, sf = trainer_state(tmp_path / "ddp", 4), trainer_state(tmp_path / "fsdp", 4)
    assert sd["step"] == sf["step"] == 4
    assert sd["optimizer"]["param_groups"][0]["params"] == sf["optimizer"]["param_groups"][0]["params"]
    assert sf["optimizer"]["state"].keys() == sd["optimizer"]["state"].keys()
    for name, state in sf["optimizer"]["state"].items():
        assert int(state["step"]) == 4, name
        for key in ("exp_avg", "exp_avg_sq"):
            ref = sd["optimizer"]["state"][name][key]
            assert state[key].shape == ref.shape, (name, key)
            torch.testing.assert_close(state[key], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-30,
                                       msg=f"{name} {key}")
    log_d = [json.loads(l) for l in (tmp_path / "ddp" / "loss.jsonl").read_text().splitlines()]
    log_f = [json.loads(l) for l in (tmp_path / "fsdp" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_f] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_f] == pytest.approx([r["loss"] for r in log_d], rel=1e-4)

    # the FSDP checkpoint (full tensors keyed by parameter name) resumes in one process, optimizer state included,
    # and its data stream continues where the two processes left it (it had restarted at 4 steps of one process:
    # batches the run had already seen)
    unit = 1 if fsdp_cfg.batching == "bucket" else fsdp_cfg.batch_size  # a step of one process: a batch / samples
    assert (sf["data_position"], sf["num_processes"]) == (4 * 2 * unit, 2)
    seen = []
    with pytest.warns(lf.LoRWeBWarning, match="resuming a run of 2 processes with 1"):
        result = training.train(dataclasses.replace(fsdp_cfg, steps=5, resume=True),
                                step_callback=lambda s, l: seen.append(s))
    assert seen == [5] and result["step"] == 5
    resumed = trainer_state(tmp_path / "fsdp", 5)
    assert all(int(s["step"]) == 5 for s in resumed["optimizer"]["state"].values())
    assert (resumed["data_position"], resumed["num_processes"]) == (4 * 2 * unit + unit, 1)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_and_unwrapped_warning(assets, tmp_path):
    """FSDP2 with accelerate's bf16 MixedPrecisionPolicy: the LoRWeB masters and the checkpoint stay fp32, ranks
    stay identical. Without an auto-wrap policy (only the root sharded) training still works
    and a warning says that the whole transformer is gathered at once. A NaN loss on one rank at step 2 skips that
    step everywhere; the checkpoint right after it works (FSDP2 reshards the root unit only in backward, so the
    skipped step reshards it itself) and holds the step-1 weights."""
    cfg = config(assets, tmp_path / "bf16", steps=3, checkpoint_every=1, keep_checkpoints=3, optimizer="adamw",
                 mixed_precision="bf16")
    ranks, log = launch(cfg, tmp_path, "fsdp2-cpu", "no-auto-wrap", "nan-on-last-rank-call=2")
    assert "LoRWeB layers (e.g. transformer_blocks.0." in log and "TRANSFORMER_BASED_WRAP" in log
    assert ranks[0]["meta"]["sharded"] == "True"
    # accelerate's bf16 policy reduces gradients in bf16; train() sets fp32 (the LoRWeB gradients averaged as DDP)
    assert ranks[0]["meta"]["reduce_dtypes"] == "torch.float32"
    r0 = assert_ranks_identical(ranks)
    saved = weights(tmp_path / "bf16" / "lorweb.safetensors")
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], r0[k]) for k in r0)
    assert any(saved[k].abs().max() > 0 for k in saved if k.endswith("lora_B"))
    rows = [json.loads(l) for l in (tmp_path / "bf16" / "loss.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in rows] == [False, True, False]
    assert np.isfinite(rows[0]["loss"]) and np.isfinite(rows[2]["loss"])
    w1, w2 = (weights(tmp_path / "bf16" / "checkpoints" / f"step-{k:08d}" / "lorweb.safetensors") for k in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_samples_without_official_training_query_crops_fail_before_models_load(assets, tmp_path, monkeypatch):
    """The official training query cuts a' = [:s, s:W] with s = H // 2 of the control tensor (SDTrainer.py
    ``before_unet_predict`` -> flux_kontext.py ``get_external_query``): a sample whose training grid is at least
    twice as tall as wide has an empty a'. Found for every sample before any model loads (else the run would stop at
    that sample's step, again on every resume); --skip-bad drops it with a warning."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    name = sorted(p.stem for p in (data / "target").iterdir() if p.suffix == ".png")[0]
    for sub in ("control", "target"):  # a grid four times as tall as wide
        with Image.open(data / sub / f"{name}.png") as im:
            im.resize((im.width // 2, im.height * 2)).save(data / sub / f"{name}.png")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(training, "load_training_pipeline", no_models)
    cfg = config(assets, tmp_path / "run", data=str(data))
    with pytest.raises(AnalogyDataError, match=rf"1 training samples cannot be used, e.g. {name}: at its training "
                                               r"size \(\d+, \d+\): a \d+x\d+ grid is too tall for the official "
                                               r"training crops"):
        training.train(cfg)
    assert not (tmp_path / "run").exists()
    ds = AnalogyFolder(data, long_edge=cfg.long_edge, resize=cfg.resize)
    with pytest.warns(UserWarning, match=f"skipping training sample {name}: too tall"):
        ds.skip_samples({0: "too tall"}, skip_bad=True)
    assert ds.skipped == [name] and len(ds) == 11
    monkeypatch.undo()
    monkeypatch.setattr(training, "load_training_pipeline", no_models)
    with pytest.warns(UserWarning, match=f"skipping training sample {name}: at its training size"), \
            pytest.raises(AssertionError, match="a model was loaded"):
        training.train(dataclasses.replace(cfg, skip_bad=True))  # the sample is skipped; training goes on


def test_layers_injected_by_the_caller_must_match_the_config(assets, tmp_path):
    """train(cfg, pipe=...) on a transformer that already holds LoRWeB layers writes config.yaml from cfg: layers
    with other settings are refused, naming them, before anything is written or deleted."""
    cfg = config(assets, tmp_path / "run")
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=cfg.num_loras, rank=cfg.rank, key_dim=cfg.key_dim,
                                                       query_dim=encoder.query_dim, heads=2, activation="tanh"))
    with pytest.raises(ValueError, match=r"LoRWeB layers differ from the training config \(.*heads: layer 2, config 1, "
                                         r"activation: layer 'tanh', config 'softmax'\)"):
        training.train(cfg, pipe=pipe, encoder=encoder)
    assert not (tmp_path / "run").exists()
    result = training.train(dataclasses.replace(cfg, heads=2, activation="tanh", steps=1), pipe=pipe, encoder=encoder)
    assert result["step"] == 1


def test_layers_injected_by_the_caller_in_bf16_train_as_fp32_masters(assets, tmp_path):
    """Official toolkit/models/AttLoRA.py: the LoRA parameters are fp32 (x and the query are cast to them). Layers a
    caller injected in bf16 (say, inject_lorweb's default, the base's dtype) become fp32 masters before the optimizer
    sees them: the trained tensors and the optimizer state saved in trainer_state.pt are fp32."""
    cfg = config(assets, tmp_path / "run", steps=2, checkpoint_every=2, optimizer="adamw")
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=cfg.num_loras, rank=cfg.rank, key_dim=cfg.key_dim,
                                                       query_dim=encoder.query_dim), dtype=torch.bfloat16)
    assert {p.dtype for l in lf.lorweb_layers(pipe.transformer).values() for p in l.lorweb_tensors().values()} == \
        {torch.bfloat16}
    assert training.train(cfg, pipe=pipe, encoder=encoder)["step"] == 2
    trained = [p for l in lf.lorweb_layers(pipe.transformer).values() for p in l.lorweb_tensors().values()]
    assert {p.dtype for p in trained} == {torch.float32}
    state = trainer_state(cfg.out, 2)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_train_gives_the_caller_its_transformer_forward_back(assets, tmp_path):
    """accelerate's prepare() replaces a module's forward in place with an autocast one (mixed precision bf16): in a
    one-process run the prepared model is the caller's transformer, which train() hands back with its own
    forward (inference on the same pipeline afterwards must not run under autocast)."""
    cfg = config(assets, tmp_path / "amp", steps=1, checkpoint_every=1, optimizer="adamw", mixed_precision="bf16")
    ranks, _ = launch(cfg, tmp_path, launcher_args=("--num_processes", "1"))
    assert ranks[0]["meta"]["forward_restored"] == "True"


def _recompute_run(mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "fsdp_recompute_worker.py"), str(free_port()), mode],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fsdp2_checkpointed_blocks_recompute_with_cast_inputs():
    """Found on the H200 (torch 2.11): FSDP2 skips its input cast while backward recomputes a checkpointed block, so
    FLUX's fp32 rotary embedding reached the recompute in fp32 after the forward had seen bf16, and
    torch.utils.checkpoint refused the mismatch. With ``cast_block_inputs_in_recompute`` every call of every block
    (forward and recompute) sees the param dtype and the gradients equal those of the run without checkpointing; the
    hook called by hand casts positional, nested and keyword floating inputs. Without the hook, torch versions with
    that FSDP behaviour fail exactly as on the GPU (newer ones cast in the recompute themselves)."""
    hooked = _recompute_run("hook")
    assert "error" not in hooked, hooked
    assert hooked["hooked"] == 3  # two blocks and the root
    assert hooked["seen"] == ["torch.bfloat16"] * 4, hooked["seen"]  # 2 blocks x (forward + recompute)
    assert hooked["max_grad_diff"] == 0.0
    # the hook itself, called by hand (this fails on any torch): floating inputs to bf16, integer ones untouched
    assert hooked["direct_cast"] == ["torch.bfloat16"] * 3 + ["torch.int64"]
    plain = _recompute_run("nohook")
    if "error" in plain:
        assert "CheckpointError" in plain["error"] and "torch.float32" in plain["seen"], plain
    else:
        assert plain["seen"] == ["torch.bfloat16"] * 4 and plain["max_grad_diff"] == 0.0, plain


@pytest.mark.gpu
def test_fsdp2_real_accelerate_launch_on_gpus(assets, tmp_path):
    """The documented multi-GPU FSDP2 command line on every visible GPU (one is enough to exercise the path)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n = torch.cuda.device_count()
    cfg = config(assets, tmp_path / "gpu", steps=2, checkpoint_every=2, optimizer="adamw", mixed_precision="bf16")
    ranks, _ = launch(cfg, tmp_path, launcher_args=("--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
                                                 "TRANSFORMER_BASED_WRAP", "--num_processes", str(n)))
    assert ranks[0]["meta"]["distributed_type"].endswith("FSDP") and ranks[0]["meta"]["sharded"] == "True"
    assert_ranks_identical(ranks)
    assert (tmp_path / "gpu" / "lorweb.safetensors").is_file()


def test_fsdp_setup_errors():
    plugin = types.SimpleNamespace(fsdp_version=1)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        training._check_fsdp(accelerator, TrainConfig(data="d", out="o", optimizer="adamw"))
    plugin.fsdp_version = 2
    with pytest.raises(ValueError, match="--optimizer adamw"):
        training._check_fsdp(accelerator, TrainConfig(data="d", out="o", optimizer="adamw8bit"))
    training._check_fsdp(accelerator, TrainConfig(data="d", out="o", optimizer="adamw"))
    # FSDP2's mixed-precision policy gathers the LoRWeB fp32 masters in bf16: the fp32 adapter arithmetic cannot hold
    with pytest.raises(ValueError,
                       match="--adapter-precision fp32 cannot hold under FSDP2 with --mixed-precision bf16"):
        training._check_fsdp(accelerator, TrainConfig(data="d", out="o", optimizer="adamw", adapter_precision="fp32",
                                                      mixed_precision="bf16"))
    training._check_fsdp(accelerator, TrainConfig(data="d", out="o", optimizer="adamw", adapter_precision="fp32",
                                                  mixed_precision="no"))


def test_optimizer_state_by_name_round_trip_and_mismatch():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    names = ["blocks.0.lora_A", "blocks.0.lora_B"]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        (params[0].sum() * 2 + (params[1] ** 2).sum()).backward()
        opt.step()
        opt.zero_grad()
    state = training.optimizer_state_dict(None, opt, names, sharded=False)
    assert list(state["state"]) == names and state["param_groups"][0]["params"] == names
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    training.load_optimizer_state_dict(None, fresh, state, names, sharded=False)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    with pytest.raises(ValueError, match="missing \\['blocks.0.lora_C'\\].*unexpected \\['blocks.0.lora_B'\\]"):
        training.load_optimizer_state_dict(None, fresh, state, ["blocks.0.lora_A", "blocks.0.lora_C"], sharded=False)
    with pytest.raises(ValueError, match="keyed by parameter index"):
        training.load_optimizer_state_dict(None, fresh, opt.state_dict(), names, sharded=False)


# -------------------------------------------------------------------------------------------- data folder
def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "control").mkdir()
    (tmp_path / "target").mkdir()
    with pytest.raises(AnalogyDataError, match="no training samples"):
        AnalogyFolder(tmp_path)
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no training samples" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control", "target"]  # no --out folder was created


def test_missing_data_folder(tmp_path):
    with pytest.raises(AnalogyDataError, match="does not exist"):
        AnalogyFolder(tmp_path / "nothing")


def test_broken_samples_error_or_skip(assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    (data / "captions" / "0003.txt").unlink()
    (data / "target" / "0005.png").write_bytes(b"garbage")
    with pytest.raises(AnalogyDataError, match="0003 has no caption"):
        AnalogyFolder(data, resize="long-edge", missing_caption="raise")
    (data / "captions" / "0003.txt").write_text("flip")
    with pytest.raises(AnalogyDataError, match="0005.png is not a readable image"):
        AnalogyFolder(data, resize="long-edge")
    (data / "control" / "0007.png").unlink()
    with pytest.warns(UserWarning, match="skipping training sample"):
        ds = AnalogyFolder(data, skip_bad=True, long_edge=64, resize="long-edge")
    assert len(ds) == 10 and ds.skipped == ["0005", "0007"]
    assert "0007.png has no control image" in ds.problems[1]
    item = ds[0]
    assert item["control"].size == item["target"].size == (64, 64)
    assert item["caption"]


def test_cli_train(assets, tmp_path, monkeypatch):
    out = tmp_path / "cli"
    monkeypatch.chdir(assets)  # relative model and encoder paths, as a user types them
    argv = ["train", "--data", "data", "--out", str(out), "--model", "pipe",
            "--encoder", "clip", "--steps", "2", "--batch-size", "2", "--mixed-precision", "no",
            "--long-edge", "64", "--resize", "long-edge", "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH),
            "--num-loras", "4",
            "--rank", "2", "--key-dim", "8", "--checkpoint-every", "1", "--num-workers", "0", "--no-progress",
            "--timestep-type", "diffusers", "--weighting-scheme", "logit_normal", "--no-gradient-checkpointing"]
    assert cli.main(argv) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["weighting_scheme"] == "logit_normal" and saved["gradient_checkpointing"] is False
    assert saved["optimizer"] == "adamw8bit" and saved["betas"] == [0.9, 0.99]  # paper defaults
    assert saved["adam_eps"] == 1e-6 and saved["checkpoint_every"] == 1 and saved["keep_checkpoints"] == 4
    assert training.latest_checkpoint(out).name == "step-00000002"
    with safe_open(str(out / "lorweb.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_A").shape == (4, 32, 2)
        encoder_recorded = f.metadata()["encoder"]
    # local folders are recorded as absolute paths, so the run works from any directory
    process = yaml.safe_load((out / "config.yaml").read_text())["config"]["process"][0]
    assert encoder_recorded == process["network"]["network_kwargs"]["external_query_model"] == \
        str((assets / "clip").resolve())
    assert process["model"]["name_or_path"] == str((assets / "pipe").resolve())
    assert training.recorded_location("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"


def test_bad_config_values():
    with pytest.raises(ValueError, match="weighting_scheme"):
        TrainConfig(data="d", out="o", weighting_scheme="uniform").validate()
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(data="d", out="o", optimizer="sgd").validate()


# ---------------------------------------------------------------------------------------------------- demo
def test_demo_writes_non_blank_pngs(tmp_path):
    exe = Path(sys.executable).with_name("lorweb-fast")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lorweb_fast.cli"]
    proc = subprocess.run(cmd + ["demo", "--out", str(tmp_path / "demo"), "--steps", "6", "--samples", "6",
                                 "--inference-steps", "2", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("b_prime.png", "analogy.png", "loss.png", "coefficients.png"):
        with Image.open(tmp_path / "demo" / name) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert pixels.std() > 1.0, name
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 6


# ----------------------------------------------------------------------------------- objective and numerics
def test_official_timestep_grid_and_weighted_curve():
    """Reference written from NVlabs/LoRWeB toolkit/samplers/custom_flowmatch_sampler.py
    (``CustomFlowMatchEulerDiscreteScheduler.__init__``: bell exp(-2 ((x - 500) / 1000)^2) over x = 0..999, minimum
    shifted to 0, scaled to mean 1; ``set_train_timesteps("weighted")``: linspace(1000, 1, 1000);
    ``get_weights_for_timesteps``: the bell curve at the drawn index) and jobs/process/BaseSDTrainProcess.py
    (``content_or_style: balanced`` with flowmatch: ``torch.randint(0, max_denoising_steps - 1)``, so index 999 = t 1
    is never drawn)."""
    k = np.arange(1000, dtype=np.float64)
    grid = 1000.0 - k
    bell = np.exp(-2.0 * ((k - 500.0) / 1000.0) ** 2)
    want = (bell - bell.min()) / (bell - bell.min()).mean()
    np.testing.assert_array_equal(training.official_timesteps().numpy(), grid.astype(np.float32))
    w = training.official_timestep_weights().numpy()
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    assert w[0] == 0 and abs(w.mean() - 1) < 1e-5 and w.argmax() == 500

    cfg = TrainConfig(data="d", out="o")
    assert cfg.timestep_type == "weighted"
    t, weight = training.sample_timesteps(cfg, 20000, torch.Generator().manual_seed(0))
    index = np.rint(1000.0 - t.numpy().astype(np.float64) * 1000.0).astype(int)
    np.testing.assert_allclose(t.numpy(), grid[index] / 1000.0, rtol=1e-6)
    assert index.min() == 0 and index.max() == 998
    counts = np.bincount(index // 100, minlength=10)
    assert counts.min() > 0.8 * counts.mean()  # uniform over the grid
    np.testing.assert_allclose(weight.numpy(), want[index], rtol=1e-5, atol=1e-6)

    t_lin, w_lin = training.sample_timesteps(dataclasses.replace(cfg, timestep_type="linear"), 8,
                                             torch.Generator().manual_seed(0))
    assert torch.equal(t_lin, t[:8]) and torch.equal(w_lin, torch.ones(8))

    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    cfg_d = dataclasses.replace(cfg, timestep_type="diffusers", weighting_scheme="logit_normal")
    t_d, w_d = training.sample_timesteps(cfg_d, 8, torch.Generator().manual_seed(0))
    want_t = compute_density_for_timestep_sampling("logit_normal", 8, 0.0, 1.0, 1.29,
                                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(t_d, want_t.float())
    assert torch.equal(w_d, compute_loss_weighting_for_sd3("logit_normal", want_t).float())


def test_official_hyper_parameter_defaults():
    """NVlabs/LoRWeB LoRWeB_default_PROMPTS.yaml (train: batch 6, 10000 steps, adamw8bit, betas [0.9, 0.99],
    weight_decay 0.05, lr 1e-3, timestep_type weighted, gradient checkpointing; save every 250, keep 4; caption
    dropout 0.05; datasets resolution [512], bucketed), the T5 prompt length of flux_kontext.py (512),
    toolkit/optimizer.py (AdamW8bit eps 1e-6), toolkit/config_modules.py (max_grad_norm 1.0, lr_scheduler constant)
    and README.md's command line (--linear 4 --loras_num 32 --lora_softmax true)."""
    cfg = TrainConfig(data="d", out="o")
    assert (cfg.batch_size, cfg.steps, cfg.optimizer, cfg.betas, cfg.weight_decay, cfg.learning_rate) == \
        (6, 10_000, "adamw8bit", (0.9, 0.99), 0.05, 1e-3)
    assert (cfg.adam_eps, cfg.max_grad_norm, cfg.timestep_type, cfg.gradient_checkpointing) == \
        (1e-6, 1.0, "weighted", True)
    assert (cfg.checkpoint_every, cfg.keep_checkpoints, cfg.caption_dropout, cfg.guidance_scale) == (250, 4, 0.05, 1.0)
    assert (cfg.rank, cfg.num_loras, cfg.activation, cfg.key_dim, cfg.heads, cfg.reduce) == \
        (4, 32, "softmax", 128, 1, "mean")
    assert (cfg.layout, cfg.bidirectional, cfg.adapter_precision, cfg.quantize_base) == \
        ("auto", "none", "bf16", "none")
    # extensions_built_in/flux_kontext.py FluxKontextModel.get_prompt_embeds: encode_prompts_flux(...,
    # max_length=512); the yaml's datasets "resolution: [ 512]" with aspect buckets (toolkit/dataloader_mixins.py
    # BucketsMixin: each image's bucket of about 512 x 512 pixels, then a centre crop)
    assert (cfg.max_sequence_length, cfg.long_edge, cfg.resize) == (512, 512, "bucket")
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = training._make_optimizer(params, dataclasses.replace(cfg, optimizer="adamw"))
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.9, 0.99)
    assert opt.defaults["weight_decay"] == 0.05 and opt.defaults["lr"] == 1e-3
    # the default branch: toolkit/optimizer.py get_optimizer("adamw8bit") builds
    # bitsandbytes.optim.AdamW8bit(params, lr=learning_rate, eps=1e-6, **optimizer_params) with the yaml's
    # optimizer_params (betas [0.9, 0.99], weight_decay 0.05) and bitsandbytes' other defaults
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        pytest.skip(f"bitsandbytes is not importable ({exc}): the default adamw8bit branch cannot be checked")
    assert cfg.optimizer == "adamw8bit"
    ours = training._make_optimizer(params, cfg)
    official = bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, eps=1e-6,
                                   **{"betas": [0.9, 0.99], "weight_decay": 0.05})
    assert type(ours) is bnb.optim.AdamW8bit

    def plain(defaults):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in defaults.items()}

    assert plain(ours.defaults) == plain(official.defaults)
    assert (ours.defaults["lr"], ours.defaults["eps"], ours.defaults["weight_decay"]) == (1e-3, 1e-6, 0.05)
    assert tuple(ours.defaults["betas"]) == (0.9, 0.99)
    assert vars(ours.args) == vars(official.args) and ours.args.optim_bits == 8  # 8-bit state, same block settings


class _StopAtOptimizer(Exception):
    pass


def train_until_optimizer(cfg, monkeypatch, **kwargs) -> dict:
    """Run ``training.train`` up to the creation of its optimizer and stop there (no step is taken, so the LoRWeB
    parameters keep their initial values); returns ``{"optimizer", "params" (as handed to it), "transformer",
    "layers" (lorweb_layers of the transformer)}``."""
    import lorweb_fast.model as model_module

    seen = {}
    real = training._make_optimizer

    def spy(params, train_cfg):
        seen["optimizer"] = real(params, train_cfg)
        seen["params"] = list(params)
        # taken here: train() removes the layers it injected into a caller's pipeline when it fails
        seen["layers"] = lf.lorweb_layers(seen["transformer"])
        raise _StopAtOptimizer

    real_inject = model_module.inject_lorweb

    def remember(transformer, *args, **kw):
        seen["transformer"] = transformer
        return real_inject(transformer, *args, **kw)

    monkeypatch.setattr(training, "_make_optimizer", spy)
    monkeypatch.setattr(training, "inject_lorweb", remember)
    with pytest.raises(_StopAtOptimizer):
        training.train(cfg, **kwargs)
    return seen


def test_optimizer_holds_every_lorweb_tensor_in_one_group(assets, tmp_path, monkeypatch):
    """Official toolkit/kohya_lora.py ``LoRANetwork.prepare_optimizer_params`` (called through
    toolkit/lora_special.py): one parameter group ``{"params": [p for lora in unet_loras for p in
    lora.parameters()], "lr": unet_lr}``, an AttLoRAModule's parameters being lora_down (lora_A), lora_up (lora_B),
    lora_keys and att_lora_to_q.weight, in that order; the base model is not in it."""
    cfg = config(assets, tmp_path / "opt")
    seen = train_until_optimizer(cfg, monkeypatch)
    groups = seen["optimizer"].param_groups
    assert len(groups) == 1
    want = [t for layer in seen["layers"].values()
            for t in (layer.lora_A, layer.lora_B, layer.lora_keys, layer.att_lora_to_q.weight)]
    assert len(seen["layers"]) == 20  # 14 linears of the double block + 6 of the single block
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in want]
    assert groups[0]["lr"] == cfg.learning_rate and groups[0]["weight_decay"] == 0.05
    assert all(p.requires_grad and p.dtype == torch.float32 for p in want)


def test_initial_lorweb_parameters_are_drawn_in_fp32_on_a_bf16_base(assets, tmp_path, monkeypatch):
    """The official network is created in fp32 (NVlabs/LoRWeB toolkit/models/AttLoRA.py ``AttLoRAModule.__init__``
    draws lora_keys with randn and initialises lora_down with kaiming_uniform(a=sqrt(5)) in the default fp32;
    jobs/process/BaseSDTrainProcess.py then ``network.force_to(device, dtype=torch.float32)``). So on a bf16 base
    the initial basis, keys and projections are fp32 draws, not bf16-rounded values cast to fp32 afterwards: they
    equal, layer by layer, lorweb_fast's draws (torch.manual_seed(seed); per layer in module order: keys randn,
    att_lora_to_q kaiming_uniform (nn.Linear's init), lora_A kaiming_uniform) made in fp32."""
    # the pipeline is given in bf16 (what train() loads for mixed_precision "bf16"); the accelerator stays "no"
    # because accelerate's process-wide AcceleratorState cannot change its mixed precision within one test process
    cfg = config(assets, tmp_path / "bf16init", seed=3)
    pipe = flux.load_kontext_pipeline(cfg.model, torch.bfloat16)
    seen = train_until_optimizer(cfg, monkeypatch, pipe=pipe)
    layers = seen["layers"]
    assert layers and all(l.base_layer.weight.dtype == torch.bfloat16 for l in layers.values())

    torch.manual_seed(cfg.seed)
    off_grid = False
    for name, layer in layers.items():
        keys = torch.randn(cfg.num_loras, cfg.key_dim)
        to_q = torch.empty(cfg.key_dim, layer.query_dim)
        torch.nn.init.kaiming_uniform_(to_q, a=math.sqrt(5))
        lora_a = torch.empty(cfg.num_loras, layer.in_features, cfg.rank)
        torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        for got, want in ((layer.lora_A, lora_a), (layer.lora_keys, keys), (layer.att_lora_to_q.weight, to_q)):
            assert got.dtype == torch.float32 and torch.equal(got.detach(), want), name
        assert torch.count_nonzero(layer.lora_B) == 0
        off_grid |= not torch.equal(layer.lora_A, layer.lora_A.bfloat16().float())
    assert off_grid  # not on the bf16 grid


def test_control_latents_are_sampled_as_the_official_trainer(assets):
    """NVlabs/LoRWeB extensions_built_in/flux_kontext.py ``condition_noisy_latents`` encodes the control tensor with
    toolkit/models/base_model.py ``encode_images``: ``vae.encode(images).latent_dist.sample()``, then
    ``scaling_factor * (latents - shift_factor)``. So the context tokens the transformer sees are a draw from the
    control's latent distribution (standardised by its mean and std they look like N(0, 1)), not its mean;
    ``control_latents="mode"`` (diffusers' inference encoding) gives exactly the mean."""
    from diffusers import FluxKontextPipeline

    from lorweb_fast.flux import AnalogyEncoder

    pipe = FluxKontextPipeline.from_pretrained(assets / "pipe")
    encoder = AnalogyEncoder(assets / "clip")
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=4, rank=2, key_dim=8, query_dim=encoder.query_dim))
    dataset = AnalogyFolder(assets / "data", long_edge=64, resize="long-edge")
    items = [dataset[i] for i in range(2)]
    batch = {k: [item[k] for item in items] for k in ("target", "control", "caption")}
    query = training.batch_query(encoder, batch, "cpu")
    vae, (w, h) = pipe.vae, batch["control"][0].size
    with torch.no_grad():
        dist = vae.encode(pipe.image_processor.preprocess(batch["control"], h, w)).latent_dist
    pack = FluxKontextPipeline._pack_latents
    b, c, lh, lw = dist.mean.shape
    mean = pack((dist.mean - vae.config.shift_factor) * vae.config.scaling_factor, b, c, lh, lw)
    std = pack(dist.std * vae.config.scaling_factor, b, c, lh, lw)
    seen = {}

    def spy(**inputs):
        seen.update(inputs)
        return (torch.zeros_like(inputs["hidden_states"]),)

    for control_latents in ("sample", "mode"):
        cfg = TrainConfig(data="d", out="o", control_latents=control_latents,
                          max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)
        with torch.no_grad():
            training.flow_matching_loss(spy, pipe, batch, query, cfg, torch.Generator().manual_seed(0))
        context = seen["hidden_states"][:, mean.shape[1]:]
        z = (context - mean) / std
        if control_latents == "mode":
            assert z.abs().max() < 1e-4
        else:
            assert z.numel() >= 1000 and abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15
    assert TrainConfig(data="d", out="o").control_latents == "sample"


def test_encoder_dtype_follows_the_training_dtype():
    """FluxKontextModel.load_model: the CLIP encoder is loaded ``.to(self.device, dtype=dtype)`` with the training
    dtype; encoder_dtype="auto" (the default) does that, and a stored run without the field used fp32."""
    cfg = TrainConfig(data="d", out="o")
    assert cfg.encoder_dtype == "auto" and training.RESUME_LEGACY_VALUES["encoder_dtype"] == "fp32"
    assert training.RESUME_LEGACY_VALUES["control_latents"] == "mode"


def test_new_config_values_are_checked():
    for name, value in (("timestep_type", "sigmoid"), ("layout", "rows"), ("bidirectional", "yes"),
                        ("adapter_precision", "fp16"), ("quantize_base", "fp8"), ("control_latents", "mean"),
                        ("encoder_dtype", "int8")):
        with pytest.raises(ValueError, match=name):
            TrainConfig(data="d", out="o", **{name: value}).validate()
    with pytest.raises(ValueError, match="needs timestep_type='diffusers'"):
        TrainConfig(data="d", out="o", weighting_scheme="logit_normal").validate()


@torch.no_grad()
def test_adapter_precision_fp32_is_the_official_arithmetic():
    """Reference written from NVlabs/LoRWeB toolkit/network_mixins.py (``forward``: the base output in its dtype,
    x and the external query cast to the LoRA parameters' dtype (fp32), ``attlora_forward``'s einsum
    "b s i, n i r, b n, n r o -> b s o" times the scale, the result cast to the base output's dtype and added)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12).to(torch.bfloat16)
    layer = lf.LoRWeBLinear(base, num_loras=3, rank=2, key_dim=8, query_dim=6, dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    query = torch.randn(2, 6)
    coeffs = layer.coefficients_from_query(query)  # fp32
    delta = torch.einsum("bsi,nir,bn,nro->bso", x.double(), layer.lora_A.double(), coeffs.double(),
                         layer.lora_B.double()) * layer.scale
    want = base(x) + delta.float().to(torch.bfloat16)

    layer.adapter_precision = "fp32"
    layer.set_coefficients(coeffs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    # the fp32 delta differs from the float64 one by fp32 roundings only: after the cast to bf16 and the bf16 sum
    # the result is within one bf16 ulp of the reference (in practice identical)
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
    assert ((got.float() - want.float()).abs() <= ulp).all()
    # negative control: the same einsum in bf16 (x and the parameters not cast to fp32) is told apart
    wrong = base(x) + torch.einsum("bsi,nir,bn,nro->bso", x, layer.lora_A.bfloat16(), coeffs.bfloat16(),
                                   layer.lora_B.bfloat16()) * layer.scale
    assert ((wrong.float() - want.float()).abs() > ulp).any()
    layer.set_query_per_forward(query.to(torch.bfloat16))  # per-forward: coefficients in fp32 from the cast query
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_forward = layer(x)
    want_pf = layer.coefficients_from_query(query.to(torch.bfloat16).float())
    layer.set_coefficients(want_pf)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(per_forward, layer(x))
    layer.adapter_precision = "fp64"
    with pytest.raises(ValueError, match="adapter_precision"):
        layer(x)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_base_trains_through_the_delta_only_path(assets, tmp_path, kind):
    """A tiny FLUX whose block linears are bitsandbytes layers (what diffusers' BitsAndBytesConfig loading makes on a
    GPU; diffusers refuses to quantize without one, so here they are swapped in by hand) trains on the CPU: the
    LoRWeB layers wrap the quantized linears, only the LoRWeB tensors move."""
    bnb = pytest.importorskip("bitsandbytes")
    pipe = flux.load_kontext_pipeline(assets / "pipe")

    def quantize(module):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                if kind == "int8":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=0.0)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                q.load_state_dict(child.state_dict())
                setattr(module, name, q.to("cpu"))
            else:
                quantize(child)

    try:
        for block in list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks):
            quantize(block)
    except Exception as exc:  # pragma: no cover - depends on the installed bitsandbytes
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot build {kind} layers on this CPU: {exc}")
    cfg = config(assets, tmp_path / "run", steps=2, checkpoint_every=2, quantize_base=kind, optimizer="adamw")
    frozen = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if "transformer_blocks.0.attn.to_q" in k}
    result = training.train(cfg, pipe=pipe)
    assert math.isfinite(result["loss"])
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(layer.base_layer).__module__.startswith("bitsandbytes") and layer.lora_B.abs().max() > 0
    state = pipe.transformer.state_dict()
    for key, value in frozen.items():
        assert torch.equal(state[key.replace("to_q.", "to_q.base_layer.")], value), key


def _official_qfloat8(module):
    """Reference written from NVlabs/LoRWeB toolkit/util/quantize.py ``quantize`` and extensions_built_in/
    flux_kontext.py ``FluxKontextModel.load_model`` (``quantize: true``): every named submodule of the model, walked
    as the model changes, except those whose class is already one of quanto's Q modules, goes through optimum-quanto's
    ``_quantize_submodule`` with qfloat8 weights and no activation quantization; then ``freeze(model)``. The
    transformer and, ``quantize_te`` defaulting to ``quantize``, T5 (``text_encoder_2``)."""
    from optimum.quanto import freeze, qfloat8
    from optimum.quanto.quantize import _quantize_submodule

    q_modules = ("QLinear", "QConv2d", "QEmbedding", "QBatchNorm2d", "QLayerNorm", "QConvTranspose2d", "QEmbeddingBag")
    for name, m in module.named_modules():
        if type(m).__name__ not in q_modules:
            _quantize_submodule(module, name, m, weights=qfloat8, activations=None, optimizer=None)
    freeze(module)


def _quantized_state(module) -> dict:
    """{module path: class name, plus the fp8 bytes and scales of quantized weights}."""
    state = {}
    for name, m in module.named_modules():
        state[name] = type(m).__name__
        w = getattr(m, "weight", None)
        if type(w).__name__ == "WeightQBytesTensor":
            state[name + ".weight"] = (w._data.dtype, w._data.view(torch.uint8).clone(), w._scale.clone())
    return state


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple):
            if x[0] != y[0] or not torch.equal(x[1], y[1]) or not torch.equal(x[2], y[2]):
                return False
        elif x != y:
            return False
    return True


def test_qfloat8_quantizes_as_the_official_run(assets):
    """``quantize_qfloat8`` (``--quantize-base qfloat8``) quantizes the transformer and T5 exactly as the official
    ``quantize: true`` (reference above): the same modules become QLinear with the same fp8 bytes and scales; the VAE
    and the CLIP text encoder stay as they were."""
    pytest.importorskip("optimum.quanto")
    ours = training.load_training_pipeline(assets / "pipe", torch.float32, "qfloat8")
    official = flux.load_kontext_pipeline(assets / "pipe", torch.float32)
    plain = {name: _quantized_state(getattr(official, name)) for name in ("vae", "text_encoder")}
    for name in ("transformer", "text_encoder_2"):  # quantize and quantize_te
        _official_qfloat8(getattr(official, name))
    for name in ("transformer", "text_encoder_2", "vae", "text_encoder"):
        got, want = _quantized_state(getattr(ours, name)), _quantized_state(getattr(official, name))
        assert _same_state(got, want), name
    quantized = [k for k, v in _quantized_state(ours.transformer).items() if v == "QLinear"]
    assert "x_embedder" in quantized and "transformer_blocks.0.attn.to_q" in quantized  # not only the blocks
    assert any(v == "QLinear" for v in _quantized_state(ours.text_encoder_2).values())
    for name in ("vae", "text_encoder"):
        assert _same_state(_quantized_state(getattr(ours, name)), plain[name])
        assert training.quantization_kind(getattr(ours, name)) is None
    assert training.quantization_kind(ours.transformer) == "quanto"


def test_qfloat8_base_trains_through_the_delta_only_path(assets, tmp_path):
    """``--quantize-base qfloat8`` on the CPU, from the model folder and with a pipeline quantized beforehand: the
    LoRWeB layers wrap quanto's QLinear (the official LoRASpecialNetwork adapts QLinear modules, toolkit/
    lora_special.py LINEAR_MODULES), only the LoRWeB tensors move, the fp8 weights stay bit for bit."""
    pytest.importorskip("optimum.quanto")
    result = training.train(config(assets, tmp_path / "run", steps=2, checkpoint_every=2, quantize_base="qfloat8",
                                   optimizer="adamw"))
    assert math.isfinite(result["loss"])
    layer = result["transformer"].transformer_blocks[0].attn.to_q
    assert type(layer.base_layer).__name__ == "QLinear" and layer.lora_B.abs().max() > 0
    assert (tmp_path / "run" / "lorweb.safetensors").is_file()

    pipe = training.load_training_pipeline(assets / "pipe", torch.float32, "qfloat8")
    before = {name: _quantized_state(getattr(pipe, name)) for name in training.QFLOAT8_COMPONENTS}
    result = training.train(config(assets, tmp_path / "given", steps=2, checkpoint_every=2,
                                   quantize_base="qfloat8", optimizer="adamw"), pipe=pipe)
    layers = lf.lorweb_layers(pipe.transformer)
    assert layers and all(type(l.base_layer).__name__ == "QLinear" for l in layers.values())
    assert all(l.lora_B.abs().max() > 0 for l in layers.values())
    after = _quantized_state(pipe.transformer)
    wrapped = 0
    for key, value in before["transformer"].items():
        if isinstance(value, tuple):  # a quantized weight: unchanged, in place or under its LoRWeB layer's base_layer
            inner = key[:-len(".weight")] + ".base_layer.weight"
            wrapped += inner in after
            assert _same_state({key: after[inner if inner in after else key]}, {key: value}), key
    assert wrapped == len(layers)
    assert _same_state(_quantized_state(pipe.text_encoder_2), before["text_encoder_2"])


def test_qfloat8_refusals(assets, tmp_path, monkeypatch):
    """Refused by name before anything changes: a pipeline that is not quantized (or quantized by the other
    library) for ``quantize_base``, quantizing twice, quantizing after injection, and a missing optimum-quanto (the
    old run under --overwrite survives)."""
    pytest.importorskip("optimum.quanto")
    plain = flux.load_kontext_pipeline(assets / "pipe")
    with pytest.raises(ValueError, match="transformer is not quantized: quantize it with"):
        training.train(config(assets, tmp_path / "a", quantize_base="qfloat8"), pipe=plain)
    from optimum.quanto import freeze, qint8, quantize

    half = flux.load_kontext_pipeline(assets / "pipe")  # the transformer alone, as diffusers' QuantoConfig does
    quantize(half.transformer, weights=training._import_quanto()[2])
    freeze(half.transformer)
    with pytest.raises(ValueError, match="text_encoder_2 is not quantized"):
        training.train(config(assets, tmp_path / "a", quantize_base="qfloat8"), pipe=half)
    int8 = flux.load_kontext_pipeline(assets / "pipe")  # quanto, but int8 weights
    for name in ("transformer", "text_encoder_2"):
        quantize(getattr(int8, name), weights=qint8)
        freeze(getattr(int8, name))
    with pytest.raises(ValueError, match=r"transformer has optimum-quanto \['qint8'\] weights, not qfloat8"):
        training.train(config(assets, tmp_path / "a", quantize_base="qfloat8"), pipe=int8)
    assert not (tmp_path / "a").exists()
    quantized = training.load_training_pipeline(assets / "pipe", torch.float32, "qfloat8")
    with pytest.raises(ValueError, match="quantized by quanto: load it with a diffusers BitsAndBytesConfig"):
        training.train(config(assets, tmp_path / "b", quantize_base="int8"), pipe=quantized)
    with pytest.raises(ValueError, match="quantized already"):
        training.quantize_qfloat8(quantized)
    injected = flux.load_kontext_pipeline(assets / "pipe")
    lf.inject_lorweb(injected.transformer, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=4))
    before = _quantized_state(injected.transformer)
    with pytest.raises(ValueError, match="before injecting"):
        training.quantize_qfloat8(injected)
    assert _same_state(_quantized_state(injected.transformer), before)
    assert training.quantization_kind(injected.text_encoder_2) is None

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("old run")
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ImportError, match="optimum-quanto"):
        training.train(config(assets, old, quantize_base="qfloat8", overwrite=True))
    assert (old / "keep.txt").read_text() == "old run"
    with pytest.raises(ImportError, match="optimum-quanto"):
        training.quantize_qfloat8(plain)
    assert training.quantization_kind(plain.transformer) is None


def _module_tree(module) -> dict:
    """{module path: (module object, {parameter name: (parameter object, device, dtype, values)}, buffers)}."""
    tree = {}
    for name, m in module.named_modules():
        params = {k: (p, p.device, p.dtype, p.detach().clone()) for k, p in m._parameters.items() if p is not None}
        buffers = {k: (b, b.detach().clone()) for k, b in m._buffers.items() if b is not None}
        tree[name] = (m, params, buffers)
    return tree


def _same_tree(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name, (m, params, buffers) in a.items():
        m2, params2, buffers2 = b[name]
        if m is not m2 or params.keys() != params2.keys() or buffers.keys() != buffers2.keys():
            return False
        for k, (p, device, dtype, value) in params.items():
            p2, device2, dtype2, value2 = params2[k]
            if p is not p2 or (device, dtype) != (device2, dtype2) or not torch.equal(value, value2):
                return False
        for k, (t, value) in buffers.items():
            if t is not buffers2[k][0] or not torch.equal(value, buffers2[k][1]):
                return False
    return True


@pytest.mark.parametrize("fail_at", ["quantize_t5", "freeze_t5", "interrupt_in_transformer", "move_t5",
                                     "quantize_t5_on_meta", "quantize_t5_after_data_move"])
def test_qfloat8_failure_puts_the_models_back(assets, monkeypatch, fail_at):
    """An error (out of memory) or an interrupt anywhere in ``quantize_qfloat8`` -- moving a model, quanto's
    ``quantize``, the freeze of one module, after the first model is done -- leaves both models as they were: the
    same module, parameter and buffer objects with the same values, devices and dtypes, no quanto module left; the
    same pipeline then quantizes exactly as the official run (the reference ``_official_qfloat8``)."""
    pytest.importorskip("optimum.quanto")
    pipe = flux.load_kontext_pipeline(assets / "pipe", torch.float32)
    before = {name: _module_tree(getattr(pipe, name)) for name in training.QFLOAT8_COMPONENTS}
    quantize, freeze, qfloat8 = training._import_quanto()
    t5 = pipe.text_encoder_2
    frozen = []

    def failing_quantize(model, **kw):
        quantize(model, **kw)
        if fail_at.startswith("quantize_t5") and model is t5:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory while quantizing")

    def failing_freeze(module):
        freeze(module)
        frozen.append(module)
        if fail_at == "freeze_t5" and any(module is m for m in t5.modules()):
            raise torch.OutOfMemoryError("simulated: CUDA out of memory while freezing")
        if fail_at == "interrupt_in_transformer" and len(frozen) == 3:
            raise KeyboardInterrupt

    def failing_to(self, *args, **kw):
        if self is t5:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory while moving")
        return torch.nn.Module.to(self, *args, **kw)

    def data_swapping_to(self, *args, **kw):  # a move to another device: same parameter objects, new data
        for p in self.parameters():
            p.data = torch.full_like(p.data, float("nan"))
        return self

    monkeypatch.setattr(training, "_import_quanto", lambda: (failing_quantize, failing_freeze, qfloat8))
    if fail_at == "move_t5":
        monkeypatch.setattr(type(t5), "to", failing_to)
    if fail_at.endswith("data_move"):
        monkeypatch.setattr(type(pipe.transformer), "to", data_swapping_to)
    with pytest.raises(KeyboardInterrupt if fail_at.startswith("interrupt") else torch.OutOfMemoryError):
        training.quantize_qfloat8(pipe, device=torch.device("meta" if fail_at.endswith("meta") else "cpu"))
    assert frozen, "the failure came after something was quantized"
    for name in training.QFLOAT8_COMPONENTS:
        assert training.quantization_kind(getattr(pipe, name)) is None, name
        assert _same_tree(_module_tree(getattr(pipe, name)), before[name]), name
    monkeypatch.undo()
    training.quantize_qfloat8(pipe)
    official = flux.load_kontext_pipeline(assets / "pipe", torch.float32)
    for name in training.QFLOAT8_COMPONENTS:
        _official_qfloat8(getattr(official, name))
        assert _same_state(_quantized_state(getattr(pipe, name)), _quantized_state(getattr(official, name))), name


def test_quantized_base_plumbing(assets, tmp_path):
    int8 = training.quantization_config("int8")
    nf4 = training.quantization_config("nf4", torch.bfloat16)
    assert int8.load_in_8bit and not int8.load_in_4bit
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quantize_base"):
        training.quantization_config("none")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            training.load_training_pipeline(assets / "pipe", torch.bfloat16, "nf4")
    with pytest.raises(ValueError, match="transformer is not quantized"):
        training.train(config(assets, tmp_path / "q", quantize_base="int8"),
                       pipe=flux.load_kontext_pipeline(assets / "pipe"))


def test_strip_layout_bidirectional_training_resumes_exactly(assets, tmp_path):
    """The official layout (a|a'|b strips + b') with official bidirectional draws trains, and a resumed run repeats
    the uninterrupted one bit for bit (the swaps depend only on seed and position)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "strips"
    for sub in ("control", "target"):
        (data / sub).mkdir(parents=True)
    for i in range(5):
        random_rgb_image(rng, 96, 32).save(data / "control" / f"{i}.png")
        random_rgb_image(rng, 32, 32).save(data / "target" / f"{i}.png")
        (data / "target" / f"{i}.txt").write_text("flip")
    common = dict(data=str(data), steps=4, checkpoint_every=2, bidirectional="official",
                  adapter_precision="fp32")
    straight = training.train(config(assets, tmp_path / "a", **common))
    assert all(l.adapter_precision == "fp32" for l in lf.lorweb_layers(straight["transformer"]).values())
    training.train(config(assets, tmp_path / "b", **dict(common, steps=2)))
    training.train(config(assets, tmp_path / "b", **dict(common, resume=True)))
    a, b = weights(tmp_path / "a" / "lorweb.safetensors"), weights(tmp_path / "b" / "lorweb.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_exposes_the_new_options():
    parser = cli.build_parser()
    defaults = cli._train_config(parser.parse_args(["train", "--data", "d", "--out", "o"]))
    assert defaults == TrainConfig(data="d", out="o")
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--timestep-type", "linear", "--bidirectional",
                              "official", "--adapter-precision", "fp32", "--quantize-base", "nf4", "--layout", "strip",
                              "--resize", "long-edge", "--adam-eps", "1e-8", "--bucket-divisibility", "64"])
    cfg = cli._train_config(args)
    assert (cfg.timestep_type, cfg.bidirectional, cfg.adapter_precision, cfg.quantize_base, cfg.layout, cfg.resize,
            cfg.adam_eps, cfg.bucket_divisibility) == ("linear", "official", "fp32", "nf4", "strip", "long-edge",
                                                       1e-8, 64)
    # the official bucket divisibility (FluxKontextModel.get_bucket_divisibility) is the default
    assert defaults.bucket_divisibility == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--bidirectional", "sometimes"])


def test_non_finite_gradients_stop_before_the_optimizer_step():
    """A non-finite gradient norm raises before the step, naming the parameters (found on the H200: cuDNN attention
    backward NaN led to a misleading error about the coefficients one step later); finite norms pass."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.randn(4, 3)).sum().backward()
    cfg = TrainConfig(data="d", out="o")
    training._check_gradients(torch.tensor(1.5), model, 3, cfg)
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 3; the optimizer step was not taken"
                                                 r".* 1 parameters on this rank \(e.g. 1.weight\)"):
        training._check_gradients(torch.tensor(float("nan")), model, 3, cfg)
    with pytest.raises(FloatingPointError, match="--cudnn-attention"):
        training._check_gradients(torch.tensor(float("inf")), model, 3, dataclasses.replace(cfg, cudnn_attention=True))
    # fp16's loss scaler skips overflowing steps itself and lowers the scale: no error then
    training._check_gradients(torch.tensor(float("inf")), model, 3, cfg, scaled=True)


def test_non_finite_gradients_stop_training_without_clipping_too(assets, tmp_path, monkeypatch):
    """With --max-grad-norm 0 (no clipping) the norm is still computed and a non-finite one (a finite loss whose
    backward gives NaN) stops the run before the optimizer step: the weights written before stay the last ones."""
    cfg = config(assets, tmp_path / "nan", steps=3, checkpoint_every=1, max_grad_norm=0.0)
    real = training.flow_matching_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return NanGradient.apply(loss) if len(calls) == 2 else loss

    monkeypatch.setattr(training, "flow_matching_loss", poisoned)
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 2; the optimizer step was not taken"):
        training.train(cfg)
    assert int(training.latest_checkpoint(tmp_path / "nan").name.split("-")[1]) == 1


@pytest.mark.parametrize("value, nan_loss", [(float("nan"), "raise"), (float("inf"), "skip")])
def test_non_finite_loss_stops_before_backward(assets, tmp_path, monkeypatch, value, nan_loss):
    """--nan-loss raise stops at a NaN loss, and an infinite loss always stops, before backward: nothing changed."""
    cfg = config(assets, tmp_path / "bad", steps=3, checkpoint_every=1, nan_loss=nan_loss)
    real = training.flow_matching_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * value if len(calls) == 2 else loss

    monkeypatch.setattr(training, "flow_matching_loss", poisoned)
    check = training._check_gradients

    def no_backward_at_step_2(grad_norm, model, step, *args, **kwargs):
        assert step != 2, "backward ran at the bad step"
        return check(grad_norm, model, step, *args, **kwargs)

    monkeypatch.setattr(training, "_check_gradients", no_backward_at_step_2)
    with pytest.raises(FloatingPointError, match=f"training loss is {value} at step 2; the optimizer step was not"):
        training.train(cfg)
    assert int(training.latest_checkpoint(tmp_path / "bad").name.split("-")[1]) == 1


def poison_loss(monkeypatch, at_calls):
    """Make ``training.flow_matching_loss`` return NaN (still attached to the graph) on the given 1-based calls."""
    real = training.flow_matching_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) in at_calls else loss

    monkeypatch.setattr(training, "flow_matching_loss", poisoned)


def test_nan_loss_skips_the_update_as_the_official_trainer(assets, tmp_path, monkeypatch):
    """Default --nan-loss skip, from the official SDTrainer (extensions_built_in/sd_trainer/SDTrainer.py
    ``train_single_accumulation``: ``if torch.isnan(loss): loss = torch.zeros_like(loss).requires_grad_(True)``, a
    leaf outside the graph, so backward gives no parameter a gradient; ``hook_train_loop`` then clips and steps an
    optimizer whose parameters have no gradients, which changes nothing). Reference: the step is counted, the LoRWeB
    weights and the optimizer state after it equal those before it, and the next step trains as usual; the log marks
    the step, the plot is written, and the result lists it."""
    cfg = config(assets, tmp_path / "skip", steps=3, checkpoint_every=1, keep_checkpoints=3, optimizer="adamw")
    assert TrainConfig(data="d", out="o").nan_loss == "skip"
    poison_loss(monkeypatch, at_calls=(2,))
    seen = []
    result = training.train(cfg, step_callback=lambda step, loss: seen.append((step, math.isnan(loss))))
    assert result["step"] == 3 and result["nan_loss_steps"] == [2] and math.isfinite(result["loss"])
    assert seen == [(1, False), (2, True), (3, False)]
    run = Path(cfg.out)
    w = {k: weights(run / "checkpoints" / f"step-{k:08d}" / "lorweb.safetensors") for k in (1, 2, 3)}
    assert all(torch.equal(w[1][key], w[2][key]) for key in w[1])  # the NaN step changed nothing
    assert any(not torch.equal(w[2][key], w[3][key]) for key in w[2])  # the next one trains
    s1, s2 = trainer_state(run, 1)["optimizer"]["state"], trainer_state(run, 2)["optimizer"]["state"]
    assert s1.keys() == s2.keys() and all(int(s2[k]["step"]) == 1 for k in s2)
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["nan_loss_skipped"] is True
    assert "nan_loss_skipped" not in rows[0] and math.isfinite(rows[2]["loss"])
    assert np.asarray(Image.open(run / "loss.png").convert("L")).std() > 0


def test_loss_plot_of_a_log_with_skipped_steps_only(tmp_path):
    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": k, "loss": None, "lr": 1e-3, "nan_loss_skipped": True}) + "\n"
                           for k in (1, 2)))
    training.plot_loss(log, tmp_path / "loss.png")
    assert np.asarray(Image.open(tmp_path / "loss.png").convert("L")).std() > 0


def test_nan_loss_raise_is_a_cli_choice_and_may_change_on_resume():
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--data", "d", "--out", "o"]).nan_loss == "skip"
    assert parser.parse_args(["train", "--data", "d", "--out", "o", "--nan-loss", "raise"]).nan_loss == "raise"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--nan-loss", "zero"])
    with pytest.raises(ValueError, match="nan_loss must be one of"):
        TrainConfig(data="d", out="o", nan_loss="zero").validate()
    assert "nan_loss" in training.RESUME_MAY_DIFFER


@pytest.mark.gpu
def test_bf16_training_on_gpu_turns_cudnn_attention_off_and_back(assets, tmp_path):
    """On a GPU, bf16 training runs with cuDNN SDPA off (the default; its backward gave NaN gradients for this
    model on the H200 with torch 2.11), the loss stays finite, and the process setting is restored afterwards."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seen = []
    torch.backends.cuda.enable_cudnn_sdp(True)
    result = training.train(config(assets, tmp_path / "sdp", steps=3, checkpoint_every=3, mixed_precision="bf16",
                                   optimizer="adamw"),
                            step_callback=lambda step, loss: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    assert seen == [False, False, False] and math.isfinite(result["loss"])
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_train_hands_the_callers_pipeline_back_as_found(assets, tmp_path, monkeypatch):
    """train(cfg, pipe=...) on a caller's pipeline (eval mode, no gradient checkpointing, every parameter requiring
    grad as from_pretrained leaves it): on success the trained LoRWeB layers stay and the rest is as found; when a
    step fails the layers this call injected are gone again as well, and the tqdm bar is closed."""
    import tqdm.auto

    cfg = config(assets, tmp_path / "ok", steps=2, checkpoint_every=2)
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    models = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer]
    for m in models:
        m.eval().requires_grad_(True)

    def as_found():
        assert not pipe.transformer.training and not pipe.transformer.is_gradient_checkpointing
        assert all(not m.training for m in pipe.transformer.modules())
        for m in models[:3]:  # the VAE and text encoders: flags as found
            assert all(p.requires_grad for p in m.parameters())

    result = training.train(cfg, pipe=pipe, encoder=encoder)
    assert result["step"] == 2 and len(lf.lorweb_layers(pipe.transformer)) > 0
    as_found()
    # the transformer as inject_lorweb leaves one: only the LoRWeB tensors require grad
    trainable = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{suffix}" for layer, m in lf.lorweb_layers(pipe.transformer).items()
                         for suffix in m.lorweb_tensors()}

    fresh = flux.load_kontext_pipeline(cfg.model)
    for m in [fresh.vae, fresh.text_encoder, fresh.text_encoder_2, fresh.transformer]:
        m.eval().requires_grad_(True)
    names_before = [n for n, _ in fresh.transformer.named_modules()]
    closed = []

    class RecordingBar(tqdm.auto.tqdm):
        def close(self):
            closed.append(self.n)
            super().close()

    def fail_after_1(step, loss):
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    with pytest.raises(RuntimeError, match="stopped by the test") as failure:
        training.train(config(assets, tmp_path / "failed", steps=3), pipe=fresh, encoder=encoder,
                       step_callback=fail_after_1)
    assert closed == [0], closed  # closed by train(), while the traceback still holds the bar (disabled: n = 0)
    del failure
    assert not lf.lorweb_layers(fresh.transformer)
    assert [n for n, _ in fresh.transformer.named_modules()] == names_before
    assert not fresh.transformer.training and not fresh.transformer.is_gradient_checkpointing
    assert all(p.requires_grad for p in fresh.transformer.parameters())
