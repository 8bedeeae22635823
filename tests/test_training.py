"""Training on tiny random FLUX.1-Kontext / CLIP models and a synthetic analogy set: the loss goes down, checkpoints
are official-format and atomic, resume after a kill is exact, DDP keeps ranks identical, the data folder is
validated, and ``lorweb-fast demo`` writes its images."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import lorweb_fast as lf
from lorweb_fast import cli, demo, flux, training
from lorweb_fast.training import AnalogyDataError, AnalogyFolder, TrainConfig

pytest.importorskip("diffusers")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    demo.build_tiny_kontext_pipeline(root / "pipe")
    demo.build_tiny_clip(root / "clip")
    demo.make_synthetic_analogies(root / "data", 12)
    return root


def config(assets, out, **overrides) -> TrainConfig:
    values = dict(data=str(assets / "data"), out=str(out), model=str(assets / "pipe"), encoder=str(assets / "clip"),
                  steps=8, batch_size=2, learning_rate=1e-2, mixed_precision="no", long_edge=64,
                  max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, num_loras=4, rank=2, key_dim=8,
                  checkpoint_every=4, num_workers=0, progress=False,
                  save_dtype="fp32")  # bit-exact save/load comparisons; fp16 (the default) is tested separately
    values.update(overrides)
    return TrainConfig(**values)


def weights(path) -> dict:
    return load_file(str(path))


def trainer_state(out, step: int) -> dict:
    return torch.load(Path(out) / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt", weights_only=False)


def test_training_lowers_the_loss_and_only_trains_lorweb(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", steps=24, checkpoint_every=8)
    dataset = AnalogyFolder(cfg.data, long_edge=cfg.long_edge)
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
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert np.asarray(Image.open(run / "loss.png").convert("L")).std() > 0

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

    seen = []
    resumed = training.train(dataclasses.replace(killed_cfg, resume=True), step_callback=lambda s, l: seen.append(s))
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
    cfg = config(assets, tmp_path / "ddp", steps=3, checkpoint_every=3)
    ranks, _ = launch(cfg, tmp_path)
    assert ranks[0]["meta"]["world_size"] == "2" and ranks[0]["meta"]["distributed_type"].endswith("MULTI_CPU")
    r0 = assert_ranks_identical(ranks)
    assert any(r0[k].abs().max() > 0 for k in r0 if k.endswith("lora_B"))  # it did train
    saved = weights(tmp_path / "ddp" / "lorweb.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in r0)
    rows = (tmp_path / "ddp" / "loss.jsonl").read_text().splitlines()
    assert len(rows) == 3  # one line per step, written by the main process only


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

    # the FSDP checkpoint (full tensors keyed by parameter name) resumes in one process, optimizer state included
    seen = []
    result = training.train(dataclasses.replace(fsdp_cfg, steps=5, resume=True),
                            step_callback=lambda s, l: seen.append(s))
    assert seen == [5] and result["step"] == 5
    assert all(int(s["step"]) == 5 for s in trainer_state(tmp_path / "fsdp", 5)["optimizer"]["state"].values())


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_and_unwrapped_warning(assets, tmp_path):
    """FSDP2 with accelerate's bf16 MixedPrecisionPolicy: the LoRWeB masters and the checkpoint stay fp32, ranks
    stay identical, the loss is finite. Without an auto-wrap policy (only the root sharded) training still works
    and a warning says that the whole transformer is gathered at once."""
    cfg = config(assets, tmp_path / "bf16", steps=2, checkpoint_every=2, optimizer="adamw", mixed_precision="bf16")
    ranks, log = launch(cfg, tmp_path, "fsdp2-cpu", "no-auto-wrap")
    assert "LoRWeB layers (e.g. transformer_blocks.0." in log and "TRANSFORMER_BASED_WRAP" in log
    assert ranks[0]["meta"]["sharded"] == "True"
    r0 = assert_ranks_identical(ranks)
    saved = weights(tmp_path / "bf16" / "lorweb.safetensors")
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], r0[k]) for k in r0)
    assert any(saved[k].abs().max() > 0 for k in saved if k.endswith("lora_B"))
    rows = [json.loads(l) for l in (tmp_path / "bf16" / "loss.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


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


def test_missing_data_folder(tmp_path):
    with pytest.raises(AnalogyDataError, match="does not exist"):
        AnalogyFolder(tmp_path / "nothing")


def test_broken_samples_error_or_skip(assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    (data / "captions" / "0003.txt").unlink()
    (data / "target" / "0005.png").write_bytes(b"garbage")
    with pytest.raises(AnalogyDataError, match="0003 has no caption"):
        AnalogyFolder(data)
    (data / "captions" / "0003.txt").write_text("flip")
    with pytest.raises(AnalogyDataError, match="0005.png is not a readable image"):
        AnalogyFolder(data)
    (data / "target" / "0007.png").unlink()
    with pytest.warns(UserWarning, match="skipping training sample"):
        ds = AnalogyFolder(data, skip_bad=True, long_edge=64)
    assert len(ds) == 10 and ds.skipped == ["0005", "0007"]
    item = ds[0]
    assert item["control"].size == item["target"].size == (64, 64)
    assert item["caption"]


def test_cli_train(assets, tmp_path):
    out = tmp_path / "cli"
    argv = ["train", "--data", str(assets / "data"), "--out", str(out), "--model", str(assets / "pipe"),
            "--encoder", str(assets / "clip"), "--steps", "2", "--batch-size", "2", "--mixed-precision", "no",
            "--long-edge", "64", "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH), "--num-loras", "4",
            "--rank", "2", "--key-dim", "8", "--checkpoint-every", "1", "--num-workers", "0", "--no-progress",
            "--weighting-scheme", "logit_normal", "--no-gradient-checkpointing"]
    assert cli.main(argv) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["weighting_scheme"] == "logit_normal" and saved["gradient_checkpointing"] is False
    assert saved["optimizer"] == "adamw8bit" and saved["betas"] == [0.9, 0.99]  # paper defaults
    assert training.latest_checkpoint(out).name == "step-00000002"
    with safe_open(str(out / "lorweb.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_A").shape == (4, 32, 2)


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
