"""``eval generate`` on a tiny random FLUX.1-Kontext pipeline (saved and loaded back) with a LoRWeB checkpoint:
batches of different analogies in one call (batch size 2), the same results as one-by-one runs (one fixed merge
strategy), resume after a kill, settings checks (the generation settings and what picks the triplets) and CLI
errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lorweb_fast import cli, demo
from lorweb_fast.evaluation import generate as G
from lorweb_fast.evaluation import tiny
from lorweb_fast.evaluation.evalsets import read_evalset
from lorweb_fast.testing import build_tiny_lorweb_assets, device_recording_generator

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    build_tiny_lorweb_assets(root)
    tiny.make_folder_evalset(root / "evalset", tasks=("flip", "swap"), per_task=2, size=(32, 32))
    return root


def gen_args(assets, out, *extra):
    return ["eval", "generate", "--evalset", str(assets / "evalset"), "--weights", str(assets / "lorweb.safetensors"),
            "--model", str(assets / "pipe"), "--out", str(out), "--steps", "2", "--dtype", "fp32", "--device", "cpu",
            "--resolution", "native", "--long-edge", "64",
            "--pipe-arg", f"max_sequence_length={demo.DEMO_MAX_SEQUENCE_LENGTH}", "--quiet",
            *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_generate_batched_matches_one_by_one_and_resumes(assets, tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli.main(gen_args(assets, out, "--batch-size", "2")) == 0
    assert "4 generated, 0 already done" in capsys.readouterr().out
    keys = ["flip/000", "flip/001", "swap/000", "swap/001"]
    for key in keys:
        d = out / key
        for name in ("a", "a_prime", "b", "b_prime"):
            assert (d / f"{name}.png").is_file()
        assert (d / "prompt.txt").read_text().strip() in ("mirror the image", "swap the colour channels")
        assert Image.open(d / "b_prime.png").size == (32, 32)
        assert pixels(d / "a.png").tolist() == pixels(assets / "evalset" / key / "a.png").tolist()
    settings = json.loads((out / "run.json").read_text())
    assert settings["seeds"] == [50] and settings["batch_size"] == 2
    assert len(json.loads((out / "evalset.json").read_text())) == 4
    assert not list(out.rglob(".*.tmp*"))  # atomic writes leave no temporary files

    # one by one (batch size 1) gives the same b' (fp32; 8-bit PNG rounding allows one grey level)
    single = tmp_path / "single"
    assert cli.main(gen_args(assets, single, "--batch-size", "1")) == 0
    for key in keys:
        assert np.abs(pixels(out / key / "b_prime.png") - pixels(single / key / "b_prime.png")).max() <= 1

    # a killed run: one b' missing -> only that one is generated, the others are untouched
    stamps = {k: (out / k / "b_prime.png").stat().st_mtime_ns for k in keys}
    before = pixels(out / "swap/000/b_prime.png")
    (out / "swap/000/b_prime.png").unlink()
    capsys.readouterr()
    assert cli.main(gen_args(assets, out, "--batch-size", "2")) == 0
    assert "1 generated, 3 already done" in capsys.readouterr().out
    for k in keys:
        if k != "swap/000":
            assert (out / k / "b_prime.png").stat().st_mtime_ns == stamps[k]
    assert np.abs(pixels(out / "swap/000/b_prime.png") - before).max() <= 1

    # other settings in the same folder are refused
    assert cli.main(gen_args(assets, out, "--seeds", "7")) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


class RecordingPipe:
    """Stands in for LoRWeBKontextPipeline: records the batch sizes and the merge strategy it is called with, returns
    b unchanged."""

    def __init__(self):
        self.batches = []
        self.merges = []

    def __call__(self, a, a_prime, b, prompt, *, generator=None, **kwargs):
        assert len(a) == len(a_prime) == len(b) == len(prompt) == len(generator)
        self.batches.append([im.size for im in b])
        self.merges.append(kwargs.get("merge", "<pipeline default>"))
        return [im.copy() for im in b]


class DefaultsRecordingPipe(RecordingPipe):
    """A RecordingPipe that also records the steps and guidance it is called with, and claims to run on a GPU
    (``pipe._execution_device``), as LoRWeBKontextPipeline wraps the stock pipeline in ``.pipe``."""

    def __init__(self, device):
        super().__init__()
        self.pipe = type("StockPipe", (), {"_execution_device": device})()
        self.settings = []

    def __call__(self, a, a_prime, b, prompt, *, generator=None, **kwargs):
        self.settings.append((kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return super().__call__(a, a_prime, b, prompt, generator=generator, **kwargs)


def test_generate_defaults_are_the_official_inference_settings(tmp_path, monkeypatch):
    """``generate()`` without settings runs inference.py main's: 28 steps, guidance 2.5, seed 50, one generator per
    analogy made on the pipeline's execution device (a CPU and a CUDA generator draw different noise from one
    seed; the stand-in generator is a CPU one, so nothing needs a GPU)."""
    triplets = read_evalset(tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2, size=(32, 32)))
    made = []
    monkeypatch.setattr(torch, "Generator", device_recording_generator(made))
    pipe = DefaultsRecordingPipe(torch.device("cuda", 2))
    assert G.generate(pipe, triplets, tmp_path / "runs", batch_size=1, progress=False)["generated"] == 2
    assert pipe.settings == [(28, 2.5)] * 2 and made == [torch.device("cuda", 2)] * 2
    assert sorted(p.name for p in (tmp_path / "runs" / "flip").iterdir()) == sorted(t.key.split("/")[-1]
                                                                                    for t in triplets)


def test_eval_generate_command_defaults_are_the_official_settings(assets, tmp_path, monkeypatch, capsys):
    """``lorweb-fast eval generate`` without --steps, --guidance-scale or --seeds: 28 steps, guidance 2.5 and seed 50
    reach the pipeline and run.json."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    pipe = DefaultsRecordingPipe(torch.device("cpu"))
    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *args, **kwargs: pipe))
    argv = gen_args(assets, tmp_path / "runs", "--max-per-task", "1")
    del argv[argv.index("--steps"):argv.index("--steps") + 2]
    assert cli.main(argv) == 0
    assert set(pipe.settings) == {(28, 2.5)}
    run = json.loads((tmp_path / "runs" / "run.json").read_text())
    assert (run["steps"], run["guidance_scale"], run["seeds"]) == (28, 2.5, [50])


def test_batches_group_same_sizes_and_several_seeds(tmp_path):
    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=3, size=(32, 32))
    tiny.make_folder_evalset(tmp_path / "ev", tasks=("swap",), per_task=2, size=(40, 24), seed=5)
    triplets = read_evalset(ev)
    pipe = RecordingPipe()
    result = G.generate(pipe, triplets, tmp_path / "runs", batch_size=2, seeds=(1, 2), progress=False)
    assert result == {"generated": 10, "skipped": 0}
    assert all(len(set(sizes)) == 1 for sizes in pipe.batches)  # one size per batch
    assert sorted(len(b) for b in pipe.batches) == [2, 2, 2, 2, 2]
    # every batch, whatever its size, runs the unmerged path (the pipeline's "auto" would merge a batch of one)
    assert pipe.merges == ["none"] * 5
    assert (tmp_path / "runs/flip/000_seed1/b_prime.png").is_file()
    assert (tmp_path / "runs/swap/001_seed2/b_prime.png").is_file()
    again = G.generate(pipe, triplets, tmp_path / "runs", batch_size=2, seeds=(1, 2), progress=False)
    assert again == {"generated": 0, "skipped": 10}


def test_one_merge_strategy_for_every_batch(tmp_path):
    """A batch size that leaves batches of one (3 triplets, batch size 2) still passes the chosen strategy to every
    call; strategies that merge one analogy at a time need batch size 1; pipeline arguments eval generate sets itself
    are refused in --pipe-arg. A refused call writes nothing."""
    triplets = read_evalset(tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=3, size=(32, 32)))
    pipe = RecordingPipe()
    G.generate(pipe, triplets, tmp_path / "runs", batch_size=2, merge="jit", progress=False)
    assert [len(b) for b in pipe.batches] == [2, 1] and pipe.merges == ["jit", "jit"]
    pipe = RecordingPipe()
    G.generate(pipe, triplets, tmp_path / "single", batch_size=1, merge="full", progress=False)
    assert pipe.merges == ["full"] * 3
    for kwargs, message in [({"merge": "fused"}, "merge must be one of"),
                            ({"merge": "full", "batch_size": 2}, "merges one analogy at a time: use batch size 1"),
                            ({"merge": "offload", "batch_size": 4}, "'offload' merges one analogy"),
                            ({"pipe_kwargs": {"merge": "jit"}}, "'merge' is set by eval generate itself; use --merge"),
                            ({"pipe_kwargs": {"num_inference_steps": 3}}, "use --steps"),
                            ({"pipe_kwargs": {"output_type": "np"}}, "'output_type' is set by eval generate")]:
        with pytest.raises(G.EvalInputError, match=message):
            G.generate(RecordingPipe(), triplets, tmp_path / "refused", progress=False, **kwargs)
    assert not (tmp_path / "refused").exists()


def test_saved_inputs_are_capped(tmp_path):
    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=1, size=(80, 40))
    G.generate(RecordingPipe(), read_evalset(ev), tmp_path / "runs", input_long_edge=40, progress=False)
    assert Image.open(tmp_path / "runs/flip/000/a.png").size == (40, 20)
    assert Image.open(tmp_path / "runs/flip/000/b_prime.png").size == (80, 40)  # outputs are never resized


def test_generate_bad_input_exits_2(assets, tmp_path, capsys):
    ev = tiny.make_folder_evalset(tmp_path / "ev", per_task=1)
    (ev / "flip/000/a_prime.png").unlink()
    args = gen_args(assets, tmp_path / "runs")
    args[args.index("--evalset") + 1] = str(ev)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorweb-fast eval generate: error: missing image") and "flip/000/a_prime" in err
    assert "\n" not in err
    args = gen_args(assets, tmp_path / "runs2", "--batch-size", "0")
    assert cli.main(args) == 2
    assert "batch_size (--batch-size) must be >= 1" in capsys.readouterr().err  # names the flag the user typed
    assert cli.main(gen_args(assets, tmp_path / "runs2", "--max-per-task", "0")) == 2
    assert "max_per_task (--max-per-task) must be >= 1, got 0" in capsys.readouterr().err
    args = gen_args(assets, tmp_path / "runs3")
    args[args.index("--weights") + 1] = str(tmp_path / "missing.safetensors")
    assert cli.main(args) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "runs3").exists()  # a failed call writes nothing
    args = gen_args(assets, tmp_path / "runs4")
    args[args.index("--device") + 1] = "gpu"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--device 'gpu' is not a device" in err and "\n" not in err


def test_batching_sizes_match_the_crops(tmp_path):
    """The size a batch is keyed by (from the file header) is the size ImageRef.load gives, also for the halves of
    an odd-width Relation252k pair (split at width // 2)."""
    from lorweb_fast.evaluation.evalsets import ImageRef

    for width in (63, 64, 65, 67):
        path = tmp_path / f"pair{width}.png"
        Image.new("RGB", (width, 21)).save(path)
        for box in ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)):
            for aspect in (None, 1.0, 0.75):
                ref = ImageRef(path, box=box, aspect=aspect)
                assert G._ref_size(ref) == ref.load().size, (width, box, aspect)


def test_resume_refuses_other_resolution_settings(tmp_path):
    """run.json records resolution, max_size and long_edge: a resume with other values is refused; a run.json from
    before these settings existed counts as the native resolution."""
    settings = {"weights": "w", "resolution": "official", "max_size": None, "long_edge": None, "merge": "none"}
    G.check_run_settings(tmp_path, settings)
    with pytest.raises(G.EvalInputError, match="resolution"):
        G.check_run_settings(tmp_path, {**settings, "resolution": "native"}, write=False)
    with pytest.raises(G.EvalInputError, match="max_size"):
        G.check_run_settings(tmp_path, {**settings, "max_size": 512}, write=False)
    (tmp_path / "run.json").write_text(json.dumps({"weights": "w"}))  # an older run (merge: the pipeline's "auto")
    G.check_run_settings(tmp_path, {"weights": "w", "resolution": "native", "max_size": None, "long_edge": None,
                                    "merge": "auto"}, write=False)
    with pytest.raises(G.EvalInputError, match="resolution"):
        G.check_run_settings(tmp_path, settings, write=False)


def test_resume_refuses_another_checkpoint_file_or_content(tmp_path):
    """run.json records the exact checkpoint file and its SHA-256; a run.json from before they were recorded is
    accepted (it cannot be checked)."""
    settings = {"weights": "run", "weights_file": "/x/run_000000002.safetensors", "weights_sha256": "ab" * 32,
                "resolution": "native", "merge": "none"}
    G.check_run_settings(tmp_path, settings)
    with pytest.raises(G.EvalInputError, match="weights_file: .*run_000000002.* -> .*run_000000004"):
        G.check_run_settings(tmp_path, {**settings, "weights_file": "/x/run_000000004.safetensors"}, write=False)
    with pytest.raises(G.EvalInputError, match="weights_sha256"):
        G.check_run_settings(tmp_path, {**settings, "weights_sha256": "cd" * 32}, write=False)
    (tmp_path / "run.json").write_text(json.dumps({"weights": "run"}))  # an older run (merge: the pipeline's "auto")
    G.check_run_settings(tmp_path, {**settings, "merge": "auto"}, write=False)


def test_resume_refuses_another_triplet_set_or_merge(tmp_path, monkeypatch):
    """run.json records what picks the triplets (evaluation set, format, pair seed, b per pair, the pairs file's
    SHA-256), the saved inputs' cap and the merge strategy; a resume with another value is refused. A run.json from
    before they were recorded is accepted for the new keys, except merge: it ran the pipeline's default "auto"; its
    relative evalset path is resolved against the current directory and its recorded format "auto" matches the
    detected one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ev").mkdir()
    settings = {"weights": "w", "resolution": "native", "merge": "none", "evalset": str(tmp_path / "ev"),
                "format": "lorweb", "pair_seed": 0, "b_per_pair": 2, "pairs_sha256": None, "input_long_edge": 1024,
                "generator_device": "cpu"}
    G.check_run_settings(tmp_path, settings)
    for key, value in [("evalset", str(tmp_path / "other")), ("format", "folder"), ("pair_seed", 1),
                       ("b_per_pair", 3), ("pairs_sha256", "ab" * 32), ("input_long_edge", 512), ("merge", "auto"),
                       ("generator_device", "cuda")]:  # a CUDA generator draws other noise from the same seed
        with pytest.raises(G.EvalInputError, match=f"{key}: "):
            G.check_run_settings(tmp_path, {**settings, key: value}, write=False)
    G.check_run_settings(tmp_path, {**settings, "evalset": "ev"}, write=False)  # the same folder, relative
    older = {"weights": "w", "resolution": "native", "evalset": "ev", "format": "auto", "pair_seed": 0}
    (tmp_path / "run.json").write_text(json.dumps(older))
    # before --merge existed the pipeline's default "auto" ran: resuming with another strategy would mix them
    with pytest.raises(G.EvalInputError, match="merge: 'auto' -> 'none'"):
        G.check_run_settings(tmp_path, settings, write=False)
    settings = {**settings, "merge": "auto"}
    G.check_run_settings(tmp_path, settings, write=False)
    for key, value in [("evalset", str(tmp_path / "other")), ("pair_seed", 1)]:
        with pytest.raises(G.EvalInputError, match=f"{key}: "):
            G.check_run_settings(tmp_path, {**settings, key: value}, write=False)
    G.check_run_settings(tmp_path, {**settings, "generator_device": "cuda"}, write=False)  # unrecorded before
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(G.EvalInputError, match="does not hold a JSON object"):
        G.check_run_settings(tmp_path, settings, write=False)


def test_cli_resume_with_another_pair_seed_is_refused(assets, tmp_path, monkeypatch, capsys):
    """Through the CLI (the pipeline replaced by RecordingPipe): run.json records the detected format, the resolved
    evaluation set and the triplet-picking settings; resuming with another --pair-seed, --b-per-pair,
    --input-long-edge, --merge or another evaluation set is refused before anything is written, while --tasks and
    --max-per-task (subsets of the same triplets), an explicit --format naming the detected one and a relative path to
    the same set resume."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    pipe = RecordingPipe()
    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *args, **kwargs: pipe))
    monkeypatch.chdir(tmp_path)
    ev = tiny.make_relation252k(tmp_path / "rel")
    out = tmp_path / "runs"

    def args(*extra, evalset=ev):
        a = gen_args(assets, out, *extra)
        a[a.index("--evalset") + 1] = str(evalset)
        return a

    assert cli.main(args()) == 0
    assert "6 generated" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["format"] == "relation252k" and run["evalset"] == str(ev.resolve())
    # b_per_pair None: Relation252k draws one b per (a, a'), so it chooses nothing there (not compared on resume)
    assert (run["pair_seed"], run["b_per_pair"], run["pairs_sha256"], run["input_long_edge"], run["merge"]) == \
        (0, None, None, 1024, "none")
    assert set(pipe.merges) == {"none"}
    folders = sorted(p.relative_to(out) for p in out.glob("*/*"))
    (out / folders[0] / "b_prime.png").unlink()  # a killed run
    other = tiny.make_relation252k(tmp_path / "rel2")
    for extra, evalset, key in [(("--pair-seed", "1"), ev, "pair_seed"),
                                (("--input-long-edge", "16"), ev, "input_long_edge"), (("--merge", "jit"), ev, "merge"),
                                ((), other, "evalset")]:
        assert cli.main(args(*extra, evalset=evalset)) == 2
        err = capsys.readouterr().err
        assert "holds a run with other settings" in err and f"{key}: " in err
    # --b-per-pair picks b in the released set only: Relation252k refuses it (before, it was ignored and recorded)
    assert cli.main(args("--b-per-pair", "3")) == 2
    assert "--b-per-pair applies where b images are drawn at random" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.glob("*/*")) == folders  # no second set of triplets
    assert not (out / folders[0] / "b_prime.png").exists()
    assert cli.main(args("--tasks", "2-B", "--max-per-task", "2")) == 0
    assert "0 generated, 2 already done" in capsys.readouterr().out
    # evalset.json keeps the records of the triplets the restricted run did not cover
    assert [r["id"] for r in json.loads((out / "evalset.json").read_text())] == [str(f) for f in folders]
    assert json.loads((out / "run.json").read_text())["triplets"] == 6  # what the folder holds, not this call's 2
    assert cli.main(args("--format", "relation252k", evalset="rel")) == 0
    assert "1 generated, 5 already done" in capsys.readouterr().out
    assert sorted(p.relative_to(out) for p in out.glob("*/*")) == folders


@pytest.mark.slow
def test_resume_of_a_folder_that_gained_a_newer_checkpoint_is_refused(assets, tmp_path, capsys):
    """``--weights FOLDER`` of a run still training: the evaluation records the checkpoint it used (the newest one
    at the start), and a resume after the folder gained a newer checkpoint is refused instead of mixing the b' of
    two checkpoints; the recorded file resumes fine when passed directly."""
    import shutil

    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2, size=(32, 32))
    weights = tmp_path / "run"
    weights.mkdir()
    first = weights / "run_000000002.safetensors"
    shutil.copy(assets / "lorweb.safetensors", first)
    out = tmp_path / "out"
    args = gen_args(assets, out)
    args[args.index("--evalset") + 1] = str(ev)
    args[args.index("--weights") + 1] = str(weights)
    assert cli.main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["weights"] == str(weights) and run["weights_file"] == str(first.resolve())
    assert run["weights_sha256"] == G.file_sha256(first)
    (out / "flip/001/b_prime.png").unlink()  # a killed evaluation
    shutil.copy(assets / "lorweb.safetensors", weights / "run_000000004.safetensors")  # training went on
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "run_000000004" in err
    assert not (out / "flip/001/b_prime.png").exists()  # nothing was generated
    (weights / "run_000000004.safetensors").unlink()
    assert cli.main(args) == 0
    assert "1 generated, 1 already done" in capsys.readouterr().out


@pytest.mark.parametrize("extra,fragment", [
    (("--resolution", "official"), "--long-edge applies to --resolution native"),
    (("--max-size", "64"), "--max-size applies to --resolution official")])
def test_cli_refuses_options_of_the_other_resolution_mode(assets, tmp_path, monkeypatch, capsys, extra, fragment):
    """An option of the other resolution mode would be ignored: refused before any model loads or file is written
    (gen_args gives --resolution native --long-edge 64)."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(no_load))
    ev = tiny.make_relation252k(tmp_path / "rel")
    out = tmp_path / "runs"
    a = gen_args(assets, out, *extra)
    a[a.index("--evalset") + 1] = str(ev)
    assert cli.main(a) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()



def test_resume_identity_of_hub_weights_does_not_depend_on_the_cache(tmp_path, monkeypatch):
    """eval generate records the checkpoint it ran: for a Hub repo id ``<repo>@<commit>/<path>`` (the same from any
    cache location), for a local file its resolved path."""
    from lorweb_fast.evaluation.generate import _weights_identity

    monkeypatch.chdir(tmp_path)
    for cache in ("c1", "elsewhere/c2"):
        file = tmp_path / cache / "models--o--w" / "snapshots" / "abc123" / "sub" / "w.safetensors"
        assert _weights_identity("o/w", file) == "o/w@abc123/sub/w.safetensors"
    local = tmp_path / "snapshots" / "x.safetensors"
    local.parent.mkdir()
    local.write_bytes(b"x")
    assert _weights_identity(str(local), local) == str(local.resolve())


@pytest.mark.parametrize("extra,fragment", [
    (("--steps", "0"), "--steps must be an integer in [1, 10000], got 0"),
    (("--guidance-scale", "nan"), "--guidance-scale must be finite"),
    (("--guidance-scale", "-1"), "--guidance-scale must be in [0.0, 10000.0]"),
    (("--seeds", "50", "-1"), "--seeds must be an integer in [0, "),
    (("--input-long-edge", "-5"), "--input-long-edge must be an integer >= 0, got -5"),
    (("--long-edge", "8"), "--long-edge must be an integer >= 32, got 8"),
    (("--b-per-pair", "0"), "--b-per-pair must be an integer >= 1, got 0"),
    (("--pipe-arg", "foo=1"), "--pipe-arg: unknown pipeline argument 'foo'"),
    (("--pipe-arg", "max_sequence_length=0"), "--pipe-arg: max_sequence_length must be an integer in [1, 512]"),
    (("--pipe-arg", "sigmas=[1.0, 0.5, 0.25]"), "--steps 2 disagrees with --pipe-arg sigmas, which sets 3 steps")])
def test_cli_refuses_bad_numbers_before_loading_or_writing(assets, tmp_path, monkeypatch, capsys, extra, fragment):
    """Values the pipeline would refuse only after the models loaded (and after run.json was written, so that the
    corrected rerun was refused as "a run with other settings"), and a negative --input-long-edge (which saved 1x1
    copies of a, a', b): one line naming the flag, before any model loads or file is written."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(no_load))
    out = tmp_path / "runs"
    assert cli.main(gen_args(assets, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not out.exists()


def test_cli_refuses_an_out_that_is_a_file(assets, tmp_path, monkeypatch, capsys):
    """--out naming a file: one line naming it (it was a FileExistsError traceback after the models loaded)."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(no_load))
    out = tmp_path / "runs.png"
    out.write_bytes(b"not a folder")
    assert cli.main(gen_args(assets, out)) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {out} is a file; give a folder" in err and "\n" not in err
    assert out.read_bytes() == b"not a folder"


@pytest.mark.parametrize("case", ["seeds", "not_an_image", "truncated", "folder", "out_inside"])
def test_cli_refuses_bad_inputs_before_loading(assets, tmp_path, monkeypatch, capsys, case):
    """A repeated seed (generated the same b' twice into one folder and counted it twice), an input that is not an
    image (e.g. a Git LFS pointer: found only after the models loaded and run.json was written; a truncated PNG,
    whose header reads fine: every input is decoded first, as infer does; a folder named like an image) and an
    --out inside
    a folder-layout evaluation set (read back as a task by the next run): one line, before any model loads or any
    file is written."""
    import shutil

    from lorweb_fast.flux import LoRWeBKontextPipeline

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(no_load))
    evalset = tmp_path / "evalset"
    shutil.copytree(assets / "evalset", evalset)
    argv = gen_args(assets, tmp_path / "runs")
    argv[argv.index("--evalset") + 1] = str(evalset)
    out, fragment = tmp_path / "runs", None
    if case == "seeds":
        argv += ["--seeds", "5", "7", "5"]
        fragment = "--seeds repeats 5"
    elif case == "not_an_image":
        (evalset / "swap/001/b.png").write_text("version https://git-lfs.github.com/spec/v1\n")
        fragment = "swap/001/b.png is not a readable image"
    elif case == "truncated":
        data = (evalset / "swap/001/b.png").read_bytes()
        (evalset / "swap/001/b.png").write_bytes(data[:len(data) // 2])
        fragment = "swap/001/b.png is not a readable image (OSError: "
    elif case == "folder":
        (evalset / "swap/001/b.png").unlink()
        (evalset / "swap/001/b.png").mkdir()
        fragment = "swap/001/b.png is a folder; give an image file"
    else:
        out = evalset / "runs"
        argv[argv.index("--out") + 1] = str(out)
        fragment = f"--out {out} is inside the evaluation set"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not out.exists()


def test_cli_step_count_of_sigmas_is_recorded_and_run(assets, tmp_path, monkeypatch, capsys):
    """--pipe-arg sigmas without --steps: the pipeline runs one step per sigma (diffusers' retrieve_timesteps), so
    run.json records their count as "steps" and the pipeline is called with it (it recorded the default 28)."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    calls = []

    class StepsPipe(RecordingPipe):
        def __call__(self, *args, **kwargs):
            calls.append((kwargs["num_inference_steps"], kwargs["sigmas"]))
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *a, **k: StepsPipe()))
    out = tmp_path / "runs"
    argv = gen_args(assets, out, "--pipe-arg", "sigmas=[1.0, 0.6, 0.3]")
    i = argv.index("--steps")
    del argv[i:i + 2]
    assert cli.main(argv) == 0
    assert json.loads((out / "run.json").read_text())["steps"] == 3
    assert calls and all(c == (3, [1.0, 0.6, 0.3]) for c in calls)


def _recording_cli(monkeypatch):
    from lorweb_fast.flux import LoRWeBKontextPipeline

    pipe = RecordingPipe()
    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *args, **kwargs: pipe))
    return pipe


def test_cli_resume_after_the_evalset_listing_changed_is_refused(assets, tmp_path, monkeypatch, capsys):
    """Relation252K picks each b at random from its task's listing (as the released set picks from original/): a
    picture added to a task after the run started (an interrupted, then completed download) changes the picks, and
    a resume would add new triplets (ids hold b's name) beside the old ones. run.json records each task's picks
    (b_choices): a resume is refused naming the changed task, before anything is written; a resume restricted to an
    unchanged task, and a --max-per-task run followed by the whole task (the same picks), go on."""
    _recording_cli(monkeypatch)
    ev = tiny.make_relation252k(tmp_path / "rel")
    out = tmp_path / "runs"

    def args(*extra):
        a = gen_args(assets, out, *extra)
        a[a.index("--evalset") + 1] = str(ev)
        return a

    assert cli.main(args("--max-per-task", "2")) == 0
    assert "4 generated" in capsys.readouterr().out
    assert sorted(json.loads((out / "run.json").read_text())["b_choices"]) == ["1-A", "2-B"]
    assert cli.main(args()) == 0  # the whole tasks: the picks --max-per-task made are among them
    assert "2 generated, 4 already done" in capsys.readouterr().out
    folders = sorted(p.relative_to(out) for p in out.glob("*/*"))
    group = ev / "1-A" / "Group1"
    recorded = G.b_choices_by_task(ev, read_evalset(ev))["1-A"]
    for k in range(9, 16):  # pairs added to the task until an existing pair's pick changes (the first may not)
        Image.new("RGB", (64, 32), (250, 20 * k, 9)).save(group / f"{k}.png")
        labels = json.loads((group / "labels.json").read_text())
        (group / "labels.json").write_text(json.dumps(labels + [{"img_name": f"{k}.png", "edit_instruction": "e"}]))
        now = G.b_choices_by_task(ev, read_evalset(ev))["1-A"]
        if any(now[pair] != picks for pair, picks in recorded.items()):
            break
    else:
        raise AssertionError("no existing pick changed")
    assert cli.main(args()) == 2
    err = capsys.readouterr().err
    assert "b choices differ from the ones the evaluation set gives now in 1 task(s) (1-A)" in err
    assert sorted(p.relative_to(out) for p in out.glob("*/*")) == folders
    assert cli.main(args("--tasks", "2-B")) == 0
    assert "0 generated, 3 already done" in capsys.readouterr().out


def test_cli_resume_checks_model_and_weights_by_the_files_they_name(assets, tmp_path, monkeypatch, capsys):
    """run.json records local --model / --weights paths resolved: the same files typed relative or absolute resume,
    while a relative --model typed in another directory (another model there) is refused (the typed text matched)."""
    _recording_cli(monkeypatch)
    out = tmp_path / "runs"
    monkeypatch.chdir(assets)

    def args(model, weights):
        a = gen_args(assets, out)
        a[a.index("--model") + 1], a[a.index("--weights") + 1] = model, weights
        return a

    assert cli.main(args("pipe", "lorweb.safetensors")) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["model"], run["weights"]) == (str((assets / "pipe").resolve()),
                                              str((assets / "lorweb.safetensors").resolve()))
    (out / "flip" / "000" / "b_prime.png").unlink()  # a killed run
    capsys.readouterr()
    assert cli.main(args(str(assets / "pipe"), str(assets / "lorweb.safetensors"))) == 0
    assert "1 generated, 3 already done" in capsys.readouterr().out
    other = tmp_path / "elsewhere"
    (other / "pipe").mkdir(parents=True)
    (other / "pipe" / "model_index.json").write_text((assets / "pipe" / "model_index.json").read_text())
    monkeypatch.chdir(other)
    (out / "flip" / "000" / "b_prime.png").unlink()
    assert cli.main(args("pipe", str(assets / "lorweb.safetensors"))) == 2
    assert "holds a run with other settings (model: " in capsys.readouterr().err
    assert not (out / "flip" / "000" / "b_prime.png").exists()
