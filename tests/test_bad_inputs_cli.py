"""The CLI's promise (issue 16, "one clear line, up front"): every bad path or option of ``lorweb-fast infer`` and
``lorweb-fast train`` ends with exit status 2 and a single line on stderr, before any model loads. The model loaders
are replaced by mocks that fail the test when called; a positive control shows that good arguments do reach them."""

import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import lorweb_fast as lf
from lorweb_fast import cli, demo, flux
from lorweb_fast.testing import cli_usage_error, infer_input_files

pytest.importorskip("diffusers")


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    """Every model loader raises ModelLoaded: a case that reaches one failed to stop up front."""
    calls = []

    def loader(*args, **kwargs):
        calls.append(args)
        raise ModelLoaded("a model loader was called")

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loader(*a)))
    monkeypatch.setattr(flux, "load_kontext_pipeline", loader)
    monkeypatch.setattr(flux, "AnalogyEncoder", loader)
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = infer_input_files(tmp_path_factory.mktemp("cli_inputs"), red_step=40)
    m = nn.Sequential(nn.Linear(6, 5))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    (root / "empty_dir").mkdir()
    lf.save_lorweb_weights(m, root / "w.safetensors", metadata={"encoder": str(root / "clip")})
    lf.save_lorweb_weights(m, root / "w_missing_encoder.safetensors", metadata={"encoder": "/nonexistent/clip-tiny"})
    state = {k: v.detach() for k, v in lf.lorweb_state_dict(m).items()}
    save_file(state, str(root / "w_nan_scale.safetensors"), metadata={"lorweb.lora_alpha_over_rank": "nan"})
    save_file(state, str(root / "w_heads_3.safetensors"), metadata={"lorweb.heads": "3", "encoder": str(root / "clip")})
    (root / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    (root / "w.bin").write_bytes(b"weights")
    (root / "weights_dir.safetensors").mkdir()
    (root / "a_file").write_text("x")
    (root / "out_dir.png").mkdir()
    demo.make_synthetic_analogies(root / "data", 2)
    Image.new("RGB", (64, 32), (200, 10, 10)).save(root / "wide_2to1.png")
    Image.new("RGB", (6, 6), (10, 200, 10)).save(root / "tiny_6px.png")
    Image.new("RGB", (64, 24), (10, 10, 200)).save(root / "wide_8to3.png")
    (root / "model" / "vae").mkdir()  # FLUX's VAE: 4 levels, scale factor 8, sides rounded to multiples of 16
    (root / "model" / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (root / "tiny_vae_model" / "vae").mkdir(parents=True)  # the demo's tiny VAE: 2 levels, multiples of 4
    (root / "tiny_vae_model" / "model_index.json").write_text("{}")
    (root / "tiny_vae_model" / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16]}))
    return root


def infer_argv(root, tmp_path, **over):
    opts = {"--a": root / "a.png", "--a-prime": root / "a_prime.png", "--b": root / "b.png", "--prompt": "flip",
            "--weights": root / "w.safetensors", "--model": root / "model", "--out": tmp_path / "out" / "b.png",
            "--steps": "2", "--resolution": "native", "--long-edge": "64", "--device": "cpu"}
    extra = over.pop("extra", [])
    opts.update(over)
    argv = ["infer"]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv + extra


def assert_one_line_exit_2(capsys, argv, fragment, no_model_load):
    line = cli_usage_error(capsys, argv)
    assert fragment in line, line
    assert no_model_load == [], "a model was loaded before the error"
    return line


INFER_CASES = {
    "steps 0": (dict(**{"--steps": "0"}), "--steps must be an integer in [1, 10000]"),
    "steps negative": (dict(**{"--steps": "-3"}), "--steps must be an integer in [1, 10000]"),
    "steps not an int": (dict(**{"--steps": "2.5"}), "invalid int value"),
    "guidance nan": (dict(**{"--guidance-scale": "nan"}), "--guidance-scale must be finite"),
    "guidance inf": (dict(**{"--guidance-scale": "inf"}), "--guidance-scale must be finite"),
    "guidance negative": (dict(**{"--guidance-scale": "-1"}), "--guidance-scale must be in [0.0, 10000.0], got -1"),
    "guidance huge": (dict(**{"--guidance-scale": "1e308"}), "--guidance-scale must be in [0.0, 10000.0]"),
    "steps huge": (dict(**{"--steps": "99999999999999999999"}), "--steps must be an integer in [1, 10000]"),
    "long edge 0": (dict(**{"--long-edge": "0"}), "--long-edge must be an integer >= 32"),
    "long edge 16": (dict(**{"--long-edge": "16"}), "--long-edge must be an integer >= 32"),
    "seed negative": (dict(**{"--seed": "-1"}), "--seed must be an integer in [0,"),
    "out is a folder": ({"--out": "{root}/out_dir.png"}, "is a folder; give a file name"),
    "out extension unknown": ({"--out": "{tmp}/b.xyz"}, "unknown file extension '.xyz'"),
    "out without extension": ({"--out": "{tmp}/b_prime"}, "unknown file extension '(none)'"),
    "out format cannot hold RGB": ({"--out": "{tmp}/b.xbm"}, "unknown file extension '.xbm'"),
    "out under a file": ({"--out": "{root}/a_file/b.png"}, "a_file is a file, not a folder"),
    "plot extension unknown": ({"--coefficients-plot": "{tmp}/c.xyz"}, "--coefficients-plot"),
    "plot is a folder": ({"--coefficients-plot": "{root}/out_dir.png"}, "is a folder; give a file name"),
    "plot needs LaTeX": ({"--coefficients-plot": "{tmp}/c.pgf"}, "unknown file extension '.pgf'"),
    "plot is the out file": ({"--coefficients-plot": "{tmp}/out/b.png"}, "b.png is the --out file: the plot would "
                                                                         "replace b'"),
    "out is an input": ({"--out": "{root}/a.png"}, "a.png is the input image --a: b' would replace it"),
    "weights folder": ({"--weights": "{root}/weights_dir.safetensors"}, "no complete LoRWeB checkpoint"),
    "weights not safetensors": ({"--weights": "{root}/w.bin"}, "must be a .safetensors file"),
    "weights missing": ({"--weights": "{root}/nope.safetensors"}, "does not exist"),
    "weights corrupt": ({"--weights": "{root}/corrupt.safetensors"}, "corrupt or truncated"),
    "weights nan scale": ({"--weights": "{root}/w_nan_scale.safetensors"}, "lora_alpha_over_rank='nan'"),
    "weights heads not dividing key_dim": ({"--weights": "{root}/w_heads_3.safetensors"},
                                           "heads=3 (the checkpoint metadata) does not divide the checkpoint's "
                                           "key_dim=4"),
    "pipe-arg unknown": ({"extra": ["--pipe-arg", "foo=1"]}, "--pipe-arg foo: unknown or unsupported"),
    "pipe-arg tensor-only": ({"extra": ["--pipe-arg", "latents=1"]}, "--pipe-arg latents: unknown or unsupported"),
    "pipe-arg owned": ({"extra": ["--pipe-arg", "height=64"]}, "--pipe-arg height is set by lorweb-fast"),
    "pipe-arg max_area owned": ({"extra": ["--pipe-arg", "max_area=4096"]},
                                "--pipe-arg max_area is set by lorweb-fast itself (use max_area / max_size "
                                "(--max-area / --max-size) with resolution 'official'"),
    "pipe-arg nan": ({"extra": ["--pipe-arg", "true_cfg_scale=NaN"]}, "true_cfg_scale must be finite"),
    "pipe-arg bad int": ({"extra": ["--pipe-arg", "max_sequence_length=0"]}, "--pipe-arg max_sequence_length must be"),
    "pipe-arg bad type": ({"extra": ["--pipe-arg", "negative_prompt=3"]}, "negative_prompt must be a string"),
    "pipe-arg not key=value": ({"extra": ["--pipe-arg", "foo"]}, "expected KEY=VALUE"),
    "device unknown": ({"--device": "banana"}, "--device 'banana' is not a device"),
    "device meta": ({"--device": "meta"}, "--device meta: the meta device holds no data"),
    "merge and no-merge": ({"extra": ["--merge", "jit", "--no-merge"]}, "not allowed with argument --merge"),
    "max size 1": ({"--max-size": "1"}, "--max-size must be an integer >= 32"),
    "max size 16": ({"--max-size": "16"}, "--max-size must be an integer >= 32"),
    "max area 0": ({"--max-area": "0"}, "--max-area must be an integer >= 1024"),
    "max area 1000": ({"--max-area": "1000"}, "--max-area must be an integer >= 1024"),
    "long edge with the official resolution": ({"--resolution": "official"},
                                               "--long-edge applies to --resolution native"),
    "max area with the native resolution": ({"--max-area": "4096"}, "--max-area and --max-size apply to "
                                                                    "--resolution official"),
    "max size with the native resolution": ({"--max-size": "64"}, "--max-area and --max-size apply to "
                                                                  "--resolution official"),
    "query source images with a grid mode": ({"extra": ["--query-source", "images", "--query-mode", "caa'b"]},
                                             "--query-source images encodes a, a', b separately"),
    "encoder from metadata absent": ({"--weights": "{root}/w_missing_encoder.safetensors"}, "pass --encoder"),
    "encoder path missing": ({"--encoder": "{root}/no_encoder"}, "--encoder"),
    "encoder is a file": ({"--encoder": "{root}/a_file"}, "is a file; give a model folder"),
    "model is a file": ({"--model": "{root}/a_file"}, "is a file; give a model folder"),
    "model path missing": ({"--model": "./no/such/model"}, "does not exist on this machine"),
    "model folder not a pipeline": ({"--model": "{root}/empty_dir"}, "has no model_index.json"),
    "encoder folder not a model": ({"--encoder": "{root}/empty_dir"}, "has no config.json"),
    "image missing": ({"--b": "{root}/nope.png"}, "image not found"),
    "steps disagree with sigmas": ({"extra": ["--pipe-arg", "sigmas=[1.0, 0.5, 0.25]"]},
                                   "--steps 2 disagrees with --pipe-arg sigmas, which sets 3 steps"),
    "pooling type outside the patch modes": ({"extra": ["--pooling-type", "max"]},
                                             "--pooling-type applies to the patch query modes (paa'b, paa'b3, "
                                             "cat-paa'b, cat-paa'b3), which pool CLIP's patch tokens; query mode "
                                             "\"cat-aa'b\" (from official default) does not pool"),
    "pooling type with an explicit grid mode": ({"extra": ["--pooling-type", "avg", "--query-mode", "caa'b"]},
                                                "query mode \"caa'b\" (from --query-mode) does not pool"),
    "weight name with a weights file": ({"extra": ["--weight-name", "other.safetensors"]},
                                        "--weight-name picks a checkpoint inside a --weights folder or Hub repo"),
    # official resolution: the cells take a's shape, so a 2:1 a leaves no bottom row for b's crop (inference.py)
    "a 2:1 at the official resolution": ({"--a": "{root}/wide_2to1.png", "--resolution": "official",
                                          "--long-edge": None},
                                         "wide_2to1.png is 64x32: at the official resolution the cells take a's "
                                         "shape, and a 128x64 grid is too wide"),
    "a grid scaled below 16 px by --max-size": ({"--a": "{root}/wide_8to3.png", "--resolution": "official",
                                                 "--long-edge": None, "--max-size": "32"},
                                                "the 128x48 control grid of cells at a's size is scaled to 32x12 by "
                                                "--max-size=32"),
    "a too small at the official resolution": ({"--a": "{root}/tiny_6px.png", "--resolution": "official",
                                                "--long-edge": None},
                                               "use a larger a (at least 8 px on a side) or --resolution native"),
    "image is a folder": ({"--a": "{root}/model"}, "is a folder; give an image file"),
    "image not an image": ({"--a-prime": "{root}/w.bin"}, "is not a readable image"),
}


@pytest.mark.parametrize("case", sorted(INFER_CASES))
def test_infer_bad_input_stops_up_front(files, tmp_path, capsys, no_model_load, case):
    over, fragment = INFER_CASES[case]
    over = {k: ([x.format(root=files, tmp=tmp_path) for x in v] if isinstance(v, list)
                else v if v is None else v.format(root=files, tmp=tmp_path)) for k, v in over.items()}
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **over), fragment, no_model_load)
    assert not (tmp_path / "out").exists()


def test_infer_rounds_the_official_grid_as_the_models_vae_does(files, tmp_path, capsys, no_model_load):
    """The up-front size check uses the model's own rounding (2 x its VAE scale factor, from vae/config.json): a 6 px
    a, whose 12 px grid FLUX rounds to 0, is fine for a model whose VAE rounds to multiples of 4 (it reaches the
    loader), and is refused for FLUX's."""
    argv = infer_argv(files, tmp_path, **{"--a": files / "tiny_6px.png", "--resolution": "official",
                                          "--long-edge": None, "--model": files / "tiny_vae_model"})
    with pytest.raises(ModelLoaded):
        cli.main(argv)
    loads = len(no_model_load)
    line = cli_usage_error(capsys, infer_argv(files, tmp_path, **{"--a": files / "tiny_6px.png",
                                                                 "--resolution": "official", "--long-edge": None}))
    assert "rounds its sides down to multiples of 16" in line and len(no_model_load) == loads


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_infer_device_cuda_without_gpu(files, tmp_path, capsys, no_model_load, device):
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **{"--device": device}), "no CUDA GPU is visible",
                           no_model_load)


def test_infer_offline_hub_encoder_absent(files, tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    lf_m = nn.Sequential(nn.Linear(6, 5))
    lf.inject_lorweb(lf_m, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    lf.save_lorweb_weights(lf_m, tmp_path / "w.safetensors", metadata={"encoder": "someone/absent-encoder"})
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **{"--weights": tmp_path / "w.safetensors"}),
                           "pass --encoder", no_model_load)


@pytest.mark.parametrize("extra", [[], ["--pipe-arg", "true_cfg_scale=1.0", "--pipe-arg", "negative_prompt=blur",
                                        "--coefficients-plot", "plot.pdf", "--guidance-scale", "0"]])
def test_infer_good_arguments_reach_the_loader(files, tmp_path, capsys, no_model_load, extra):
    """Positive control: the checks above are not blanket refusals."""
    argv = infer_argv(files, tmp_path, extra=[str(tmp_path / x) if x.endswith(".pdf") else x for x in extra])
    with pytest.raises(ModelLoaded):
        cli.main(argv)
    assert len(no_model_load) == 1


def test_infer_weights_from_the_hub_reach_the_loader_as_a_local_file(files, tmp_path, capsys, no_model_load,
                                                                     monkeypatch):
    """--weights owner/name downloads (huggingface_hub.list_repo_files and snapshot_download, mocked: nothing
    downloads) before any model loads, and the run loads the downloaded file, the only one downloaded; --revision
    and --weight-name go with it. --revision on a local path, and a repo that cannot be had, are one-line errors."""
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache, calls = tmp_path / "cache", []

    def snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns, kwargs))
        if repo_id != "owner/lorweb":
            raise LocalEntryNotFoundError(f"{repo_id}: not cached and offline")
        (cache / "sub").mkdir(parents=True, exist_ok=True)
        shutil.copy(files / "w.safetensors", cache / "sub" / "w.safetensors")
        return str(cache)

    def list_repo_files(repo_id, *, revision=None, token=None):
        calls.append(("listed", repo_id, revision))
        if repo_id != "owner/lorweb":
            raise LocalEntryNotFoundError(f"{repo_id}: offline")
        return ["README.md", "sub/w.safetensors"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    argv = infer_argv(files, tmp_path, **{"--weights": "owner/lorweb"}, extra=["--revision", "v1"])
    with pytest.raises(ModelLoaded):
        cli.main(argv)
    assert no_model_load == [(str(files / "model"), str(cache / "sub" / "w.safetensors"))]
    assert calls == [("listed", "owner/lorweb", "v1"),
                     ("owner/lorweb", ["sub/w.safetensors", "config.yaml", "sub/config.yaml"], {"revision": "v1"})]
    with pytest.raises(ModelLoaded):
        cli.main(infer_argv(files, tmp_path, **{"--weights": "owner/lorweb"}, extra=["--weight-name",
                                                                                     "sub/w.safetensors"]))
    assert calls[-1][1] == ["sub/w.safetensors", "config.yaml", "sub/config.yaml"]
    assert no_model_load[-1] == (str(files / "model"), str(cache / "sub" / "w.safetensors"))
    no_model_load.clear()
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, extra=["--revision", "v1"]),
                           "--revision is for a Hugging Face Hub repo id", no_model_load)
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **{"--weights": "owner/missing"}),
                           "--weights: LoRWeB checkpoint 'owner/missing' is no local path", no_model_load)
    # options that need no checkpoint are refused before anything is downloaded
    calls.clear()
    for extra, message in ((["--steps", "0"], "--steps must be"), (["--seed", "-1"], "--seed must be"),
                           (["--device", "tpu"], "--device")):
        assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **{"--weights": "owner/lorweb"}, extra=extra),
                               message, no_model_load)
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **{"--weights": "owner/lorweb", "--out":
                                                                   str(tmp_path / "out.txt")}),
                           "--out", no_model_load)
    assert calls == []


# ------------------------------------------------------------------------------------------------------ train
def train_argv(root, tmp_path, *extra, out=None):
    return ["train", "--data", str(root / "data"), "--out", str(out or tmp_path / "run"), "--model",
            str(root / "model"), "--encoder", str(root / "clip"), "--steps", "2", "--num-workers", "0",
            "--mixed-precision", "no",  # one AcceleratorState per process: every test uses the same precision
            "--resize", "long-edge",  # the tiny test images fit no official 512 bucket
            "--no-progress", *extra]


TRAIN_CASES = {
    "steps 0": (["--steps", "0"], "--steps must be at least 1"),
    "batch size 0": (["--batch-size", "0"], "--batch-size must be"),
    "learning rate nan": (["--learning-rate", "nan"], "--learning-rate must be finite"),
    "learning rate 0": (["--learning-rate", "0"], "--learning-rate must be > 0"),
    "learning rate inf": (["--learning-rate", "inf"], "--learning-rate must be finite"),
    "beta 1": (["--betas", "0.9", "1.0"], "--betas[1] must be in [0.0, 1.0)"),
    "beta nan": (["--betas", "nan", "0.99"], "--betas[0] must be finite"),
    "weight decay negative": (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    "grad norm inf": (["--max-grad-norm", "inf"], "--max-grad-norm must be finite"),
    "long edge 0": (["--long-edge", "0"], "--long-edge must be"),
    "bucket divisibility 0": (["--bucket-divisibility", "0"], "--bucket-divisibility must be an integer >= 1"),
    "bucket divisibility odd": (["--resize", "bucket", "--bucket-divisibility", "3"],
                                "--bucket-divisibility must be even"),
    "logit std 0": (["--logit-std", "0"], "--logit-std must be > 0"),
    "logit mean nan": (["--logit-mean", "nan"], "--logit-mean must be finite"),
    "mode scale inf": (["--mode-scale", "inf"], "--mode-scale must be finite"),
    "caption dropout 1.5": (["--caption-dropout", "1.5"], "--caption-dropout must be in [0, 1]"),
    "guidance nan": (["--guidance-scale", "nan"], "--guidance-scale must be finite"),
    "max sequence 0": (["--max-sequence-length", "0"], "--max-sequence-length must be"),
    "num loras 0": (["--num-loras", "0"], "--num-loras must be"),
    "rank negative": (["--rank", "-1"], "--rank must be"),
    "heads do not divide": (["--heads", "3"], "key_dim=128 is not divisible by heads=3"),
    "checkpoint every 0": (["--checkpoint-every", "0"], "--checkpoint-every must be"),
    "keep negative": (["--keep-checkpoints", "-1"], "--keep-checkpoints must be"),
    "seed negative": (["--seed", "-5"], "--seed must be"),
    "workers negative": (["--num-workers", "-1"], "--num-workers must be"),
    "resume and overwrite": (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    "activation unknown": (["--activation", "relu"], "invalid choice"),
    "adam eps 0": (["--adam-eps", "0"], "--adam-eps must be > 0"),  # a 0/0 in the update: NaN coefficients
    "adam eps negative": (["--adam-eps", "-1"], "--adam-eps must be > 0"),
    "batch size above the samples, mixed batching": (["--batch-size", "3", "--batching", "mixed"],
                                                     "batch_size (--batch-size) 3 is larger than the 2 training "
                                                     "samples: with batching 'mixed' every step would repeat"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_option_stops_up_front(files, tmp_path, capsys, no_model_load, case):
    extra, fragment = TRAIN_CASES[case]
    assert_one_line_exit_2(capsys, train_argv(files, tmp_path, *extra), fragment, no_model_load)
    assert not (tmp_path / "run").exists()


def _used_out(tmp_path, what):
    out = tmp_path / "used"
    out.mkdir()
    if what == "checkpoint":
        (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    elif what == "weights":
        (out / "lorweb.safetensors").write_bytes(b"old")
    else:
        (out / "loss.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    return out


@pytest.mark.parametrize("what", ["checkpoint", "weights", "loss log"])
def test_train_refuses_a_used_out(files, tmp_path, capsys, no_model_load, what):
    out = _used_out(tmp_path, what)
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    assert_one_line_exit_2(capsys, train_argv(files, tmp_path, out=out), "already holds a training run",
                           no_model_load)
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before


TRAIN_PATH_CASES = {
    "out is a file": (lambda r, t: ["--out", str(r / "a_file")], "is a file; give a folder"),
    "out under a file": (lambda r, t: ["--out", str(r / "a_file" / "run")], "a_file is a file, not a folder"),
    "data missing": (lambda r, t: ["--data", str(t / "nodata")], "is not a folder"),
    "model missing": (lambda r, t: ["--model", str(t / "nomodel")], "does not exist on this machine"),
    "encoder is a file": (lambda r, t: ["--encoder", str(r / "a_file")], "is a file; give a model folder"),
    "model folder not a pipeline": (lambda r, t: ["--model", str(r / "empty_dir")], "has no model_index.json"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_PATH_CASES))
def test_train_bad_path_stops_up_front(files, tmp_path, capsys, no_model_load, case):
    make, fragment = TRAIN_PATH_CASES[case]
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    assert_one_line_exit_2(capsys, train_argv(files, tmp_path) + make(files, tmp_path), fragment, no_model_load)
    assert not (tmp_path / "run").exists()  # no run folder is created by a refused command
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # nor anything beside the inputs


def test_train_good_arguments_reach_the_loader(files, tmp_path, capsys, no_model_load):
    with pytest.raises(ModelLoaded):
        cli.main(train_argv(files, tmp_path, "--mixed-precision", "no"))
    assert len(no_model_load) == 1


def test_train_overwrite_keeps_the_old_run_when_the_models_fail_to_load(files, tmp_path, no_model_load):
    """--overwrite deletes the old run only once the models have loaded: a call whose model does not load (gated,
    offline, a bad folder) leaves the run it was to replace as it was (it was deleted first, then the call failed)."""
    out = _used_out(tmp_path, "checkpoint")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ModelLoaded):
        cli.main(train_argv(files, tmp_path, "--overwrite", "--mixed-precision", "no", out=out))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_train_overwrite_clears_only_run_files_once_the_models_loaded(files, tmp_path, monkeypatch):
    """Once the pipeline and the encoder are built, --overwrite deletes the run's files (checkpoints/ and the
    RUN_FILES) and nothing else in --out."""
    from lorweb_fast import training

    class Stop(Exception):
        pass

    class Encoder:
        name, query_dim = "enc", 6

        @property
        def model(self):
            raise Stop

    monkeypatch.setattr(training, "load_training_pipeline", lambda *a, **k: object())
    monkeypatch.setattr(training, "_build_encoder", lambda *a, **k: Encoder())
    out = _used_out(tmp_path, "checkpoint")
    (out / "notes.txt").write_text("mine")
    (out / "loss.png").write_bytes(b"png")
    with pytest.raises(Stop):
        cli.main(train_argv(files, tmp_path, "--overwrite", "--mixed-precision", "no", out=out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name,content", [("config.yaml", "my: settings\n"), ("loss.png", "png"),
                                          ("train_config.json", "{\"mine\": 1}")])
def test_train_refuses_an_out_holding_files_it_would_overwrite(files, tmp_path, capsys, no_model_load, name,
                                                               content):
    """An --out without a run that holds a file training writes (a config.yaml of your own, a train_config.json
    that is no training config) was silently overwritten: refused up front, the file kept; --overwrite replaces
    it. A train_config.json of a run killed before its first step (a training config) is not refused."""
    out = tmp_path / "used"
    out.mkdir()
    (out / name).write_text(content)
    line = assert_one_line_exit_2(capsys, train_argv(files, tmp_path, out=out), f"holds {name} but no training run",
                                  no_model_load)
    assert "pass --overwrite to replace them" in line and (out / name).read_text() == content
    (out / name).unlink()
    (out / "train_config.json").write_text(json.dumps({"data": "d", "out": str(out), "model": "m", "steps": 2}))
    with pytest.raises(ModelLoaded):
        cli.main(train_argv(files, tmp_path, out=out))


# ------------------------------------------------------------------------------------------------------- demo
DEMO_CASES = {
    "steps 0": (["--steps", "0"], "--steps must be an integer >= 1"),
    "samples 0": (["--samples", "0"], "--samples must be an integer >= 1"),
    "learning rate nan": (["--learning-rate", "nan"], "--learning-rate must be finite"),
    "learning rate negative": (["--learning-rate", "-1"], "--learning-rate must be > 0"),
    "inference steps 0": (["--inference-steps", "0"], "--inference-steps must be an integer in [1, 10000]"),
    "seed negative": (["--seed", "-1"], "--seed must be an integer in [0,"),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_bad_option_stops_up_front(tmp_path, capsys, monkeypatch, case):
    built = []
    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda *a, **k: built.append(a))
    extra, fragment = DEMO_CASES[case]
    assert_one_line_exit_2(capsys, ["demo", "--out", str(tmp_path / "demo"), *extra], fragment, built)
    assert not (tmp_path / "demo").exists()


def test_demo_out_is_a_file(files, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda *a, **k: built.append(a))
    assert_one_line_exit_2(capsys, ["demo", "--out", str(files / "a_file")], "is a file; give a folder", built)


@pytest.mark.parametrize("existing", ["models", "train", "summary.json", "every output"])
def test_demo_refuses_an_out_holding_demo_outputs(tmp_path, capsys, monkeypatch, existing):
    """A second demo into the same --out stops before anything is built or written (it used to rebuild models/ and
    data/, then fail in training with advice about --resume/--overwrite, options demo does not have)."""
    from lorweb_fast.validation import DEMO_OUTPUTS

    built = []
    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda *a, **k: built.append(a))
    out = tmp_path / "demo"
    for name in (DEMO_OUTPUTS if existing == "every output" else [existing]):
        if "." in name:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("old")
        else:
            (out / name / "inner").mkdir(parents=True)
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    line = assert_one_line_exit_2(capsys, ["demo", "--out", str(out)], "which the demo writes; use another --out",
                                  built)
    assert f"already holds {existing if existing != 'every output' else ', '.join(DEMO_OUTPUTS)}," in line
    assert "--resume" not in line and "--overwrite" not in line
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before


def test_demo_accepts_an_out_with_other_files(tmp_path, monkeypatch):
    """Positive control: files the demo does not write do not stop it (and it reaches the model builder)."""
    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda *a, **k: (_ for _ in ()).throw(ModelLoaded()))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoaded):
        cli.main(["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--quiet", "--no-progress", None])
def test_train_quiet_as_every_other_command(files, tmp_path, flag):
    """``train --quiet`` turns the progress bars off as in data, demo and eval; --no-progress is an alias."""
    argv = [a for a in train_argv(files, tmp_path) if a != "--no-progress"] + ([flag] if flag else [])
    assert cli.build_parser().parse_args(argv).progress is (flag is None)


def test_multi_line_errors_read_as_one_line(tmp_path, capsys, monkeypatch):
    """A checkpoint that does not match the model: the real multi-line LoRWeBCheckpointError on one readable line
    (no ":;" after the header, "; " between problems)."""
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    lf.save_lorweb_weights(m, tmp_path / "w.safetensors")
    other = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))  # both layers' shapes differ
    lf.inject_lorweb(other, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))

    def run_infer(args):
        lf.load_lorweb_weights(other, tmp_path / "w.safetensors")

    monkeypatch.setattr(cli, "run_infer", run_infer)
    line = assert_one_line_exit_2(capsys, ["infer", "--a", "a", "--a-prime", "a", "--b", "b", "--prompt", "p",
                                           "--weights", "w"], "the model was not changed: transformer.0.lora_A", [])
    assert ":;" not in line and ";;" not in line
    assert "in_features=7; transformer.1.lora_B has shape" in line, line
    assert cli.one_line("a:\n  b\n\n  c;\nd,\ne") == "a: b; c; d, e"


@pytest.mark.parametrize("option", ["--out", "--coefficients-plot", "existing --out file"])
def test_infer_unwritable_paths_by_access_check(files, tmp_path, capsys, no_model_load, monkeypatch, option):
    """The writability check itself (root bypasses permissions, so os.access is patched to deny one folder/file)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / ("plot.png" if option == "--coefficients-plot" else "b.png")
    if option.startswith("existing"):
        target.write_bytes(b"old")
        denied = target
    else:
        denied = locked
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(denied) else real_access(p, mode))
    flag = "--coefficients-plot" if option == "--coefficients-plot" else "--out"
    assert_one_line_exit_2(capsys, infer_argv(files, tmp_path, **{flag: target}), "not writable", no_model_load)
    assert [p.name for p in locked.iterdir()] == ([target.name] if option.startswith("existing") else [])


@pytest.mark.parametrize("change,fragment", [(["--learning-rate", "0.5"], "learning_rate: 0.001 -> 0.5"),
                                             (["--rank", "8"], "rank: 4 -> 8"),
                                             (["--seed", "7"], "seed: 0 -> 7")])
def test_train_resume_with_a_different_config(files, tmp_path, capsys, no_model_load, change, fragment):
    from lorweb_fast import training

    out = tmp_path / "run"
    cfg = cli._train_config(cli.build_parser().parse_args(train_argv(files, tmp_path, out=out)))
    ckpt = out / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    m = nn.Sequential(nn.Linear(6, 5))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    lf.save_lorweb_weights(m, ckpt / "lorweb.safetensors")
    torch.save({"step": 1, "optimizer": {"state": {}, "param_groups": []},
                "config": training._comparable_config(cfg)}, ckpt / "trainer_state.pt")
    line = assert_one_line_exit_2(capsys, train_argv(files, tmp_path, "--resume", *change, out=out),
                                  "only the step budget and options that change no computed value may change",
                                  no_model_load)
    assert fragment in line


def test_a_base_model_that_cannot_be_fetched_is_one_line(files, tmp_path, capsys, monkeypatch):
    """diffusers raises OSError for a base model it cannot fetch (offline, the gated official repo without a token,
    a mistyped id): ``infer``, ``train`` and ``eval generate`` printed its traceback and exited 1. The loaders now
    turn it into an error naming the model and what to do, printed as one line with exit status 2."""
    import diffusers

    def unreachable(*args, **kwargs):
        raise OSError("Cannot load model black-forest-labs/FLUX.1-Kontext-dev: the model is not fully cached "
                      "locally and the Hub cannot be reached")

    monkeypatch.setattr(diffusers.FluxKontextPipeline, "from_pretrained", unreachable)
    with pytest.raises(ValueError, match=r"cannot load the FLUX.1-Kontext model 'black-forest-labs/FLUX.1-Kontext-dev'"
                                         r" .*gated.*hf auth login.*not fully cached"):
        flux.load_kontext_pipeline("black-forest-labs/FLUX.1-Kontext-dev", torch.float32)

    # the pipeline's loader reaches it (after every up-front check has passed)
    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained",
                        classmethod(lambda cls, model, *a, **k: flux.load_kontext_pipeline(model, torch.float32)))
    assert cli.main(infer_argv(files, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "lorweb-fast infer: error: cannot load the FLUX.1-Kontext model" in err


@pytest.mark.parametrize("argv", [["data", "check", "{data}", "--quiet"], ["train", "--quiet"]])
def test_quiet_turns_the_libraries_progress_bars_off(files, tmp_path, monkeypatch, argv):
    """--quiet also silences diffusers', transformers' and huggingface_hub's own bars (loading pipeline components
    and weights, writing shards) for the command, and puts them back after it."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    from lorweb_fast import data as data_mod

    def states():
        return (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
                not hub_utils.are_progress_bars_disabled())

    seen = []
    monkeypatch.setattr(data_mod, "check_folder", lambda *a, **k: seen.append(states()) or {})
    monkeypatch.setattr(cli, "run_train", lambda args: seen.append(states()))  # build_parser reads it at main()
    before = states()
    assert before == (True, True, True)
    argv = [a.format(data=files / "data") for a in argv]
    if argv[0] == "train":
        argv = train_argv(files, tmp_path, "--quiet")
    try:
        cli.main(argv)
    except (AttributeError, TypeError, KeyError):
        pass  # the stubbed check_folder returns no report: only the state inside the command matters
    assert seen == [(False, False, False)]
    assert states() == before


def test_quiet_puts_back_huggingface_hubs_own_state():
    """transformers' enable_progress_bar also turns huggingface_hub's bars on, and huggingface_hub's global switch
    clears its per-group states: both are put back as they were (huggingface_hub last)."""
    import huggingface_hub.utils as hub_utils

    try:
        hub_utils.disable_progress_bars()
        with cli.library_progress_bars(enabled=False):
            assert hub_utils.are_progress_bars_disabled()
        assert hub_utils.are_progress_bars_disabled()
        hub_utils.enable_progress_bars()
        hub_utils.disable_progress_bars("huggingface_hub.lfs_upload")
        with cli.library_progress_bars(enabled=False):
            pass
        assert hub_utils.are_progress_bars_disabled("huggingface_hub.lfs_upload")
        assert not hub_utils.are_progress_bars_disabled()
    finally:
        hub_utils.enable_progress_bars()


def test_train_warns_about_a_batch_size_above_the_samples_with_bucket_batching(files, tmp_path, capsys,
                                                                              no_model_load):
    """Bucket batching (official) with --batch-size above the samples: every batch is one bucket's samples, which
    training may go on with; a warning says so."""
    with pytest.raises(ModelLoaded), pytest.warns(UserWarning, match=re.escape(
            "batch_size (--batch-size) 3 is larger than the 2 training samples: every step holds at most the "
            "samples of one bucket")):
        cli.main(train_argv(files, tmp_path, "--batch-size", "3"))
    # --resume of a run with mixed batching started before the refusal existed: a warning, not a refusal
    with pytest.raises(ModelLoaded), pytest.warns(UserWarning, match="every step repeats samples"):
        cli.main(train_argv(files, tmp_path, "--batch-size", "3", "--batching", "mixed", "--resume"))


def test_the_package_log_lines_reach_the_command_line_on_one_line(monkeypatch, capsys):
    """The package's INFO and WARNING log lines (the trainer's buckets, "resumed from ...") reach stderr while a
    command runs, one line each in the command's format (Python's default showed only warnings, without the
    command); the package logger's level, propagation and handlers are given back afterwards."""
    import logging

    package = logging.getLogger("lorweb_fast")
    before = (package.level, package.propagate, list(package.handlers))

    def run_infer(args):
        logging.getLogger("lorweb_fast.training").info("3 training buckets:\n512x512: 6")
        logging.getLogger("lorweb_fast.training").debug("not shown")

    monkeypatch.setattr(cli, "run_infer", run_infer)
    assert cli.main(["infer", "--a", "a", "--a-prime", "a", "--b", "b", "--prompt", "p", "--weights", "w"]) == 0
    assert capsys.readouterr().err == "lorweb-fast infer: info: 3 training buckets: 512x512: 6\n"
    assert (package.level, package.propagate, list(package.handlers)) == before
