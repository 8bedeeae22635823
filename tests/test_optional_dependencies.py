"""A missing or broken optional dependency: a clear one-line error naming the package (and how to install it) before
any work, and everything that does not need the package still working; no silent fallback, no traceback.

Simulated in this process with ``monkeypatch.setitem(sys.modules, name, None)`` (``import name`` raises ImportError;
already imported submodules blocked too), and where the package is looked at when a module is first imported
(diffusers / transformers read ``find_spec`` at import, ``lorweb_fast.ops`` imports the kernels and ``lorweb_fast._C``
at import) in a fresh ``python -c`` subprocess: "missing" = ``sys.modules[name] = None`` (``find_spec`` says absent),
"broken" = a ``sys.meta_path`` finder whose loader raises ImportError (installed, but its import fails, as a
bitsandbytes built for another CUDA). The tiny models of ``lorweb_fast.testing`` / ``lorweb_fast.demo`` and the
evaluation's tiny runs folders drive the real entry points (``cli.main``, ``LoRWeBLinear``, ``train``, ``score``).

Right already (passing tests): ``import lorweb_fast``, every ``--help`` and plain inference (the pipeline API) with
peft, optimum-quanto, matplotlib, lpips, bitsandbytes, torchvision, triton and ``lorweb_fast._C`` all missing, and
(``lorweb-fast infer``) with triton, ``_C``, matplotlib, lpips and optimum-quanto broken; ``backend="triton"`` /
``"cuda"`` named explicitly raise BackendUnavailableError naming the import problem while ``backend=None`` runs the
torch backend; the pipeline's LoRA API (load / fuse / set_adapters / disable) works without peft; ``eval score``
without lpips is one line naming it (exit 2, nothing written); training with ``--optimizer adamw`` works without
bitsandbytes.

Fixed (each was a finding of the audit that wrote this file; the tests below held them as strict xfails):
- cli.py ``main`` caught no ImportError: ``train --quantize-base qfloat8`` without optimum-quanto and ``infer
  --coefficients-plot`` without matplotlib ended in tracebacks (now one line, exit 2: ``_import_error_line``).
- training.py: the default ``--optimizer adamw8bit`` imported bitsandbytes only after the models loaded and after
  ``--overwrite`` deleted the old run (now ``_check_optimizer_package`` before either, naming ``--optimizer adamw``).
- training.py / evaluation/report.py: without matplotlib a run died at its first checkpoint and ``eval score`` after
  every metric (now loss.png / the report's plots are skipped with a warning given at the start).
- evaluation/metrics.py ``LPIPSDistance`` dropped the cause of an ImportError inside ``import lpips`` (torchvision
  missing), and evaluation/cli.py loaded a judge before finding lpips missing (now ``check_lpips`` first).
- flux.py: without peft, ``joint_attention_kwargs={"scale": s}`` (applied by LoRWeB) made diffusers warn that it is
  ineffective (the scale is no longer passed on then).
- a broken bitsandbytes broke diffusers' FluxKontextPipeline import: a RuntimeError traceback
  (``validation.diffusers_classes``: one line).
- info.py and ops.py called a broken triton "not installed" and a ``lorweb_fast._C`` that fails to load "not
  built"; a missing triton named no way to get it; ``python -m lorweb_fast.aot`` without triton was a traceback.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorweb_fast import cli, demo
from lorweb_fast.testing import build_tiny_lorweb_assets, infer_input_files, random_analogy, tiny_training_assets

pytest.importorskip("diffusers")

#: every optional package (and the CUDA extension), all missing at once
ALL_OPTIONAL = ["peft", "optimum", "optimum.quanto", "matplotlib", "lpips", "bitsandbytes", "torchvision", "triton",
                "lorweb_fast._C"]

#: prepended to a subprocess's code: argv[1] = JSON list of missing modules, argv[2] = JSON list of broken ones
BLOCKER = '''
import importlib.abc, importlib.machinery, json, sys
_missing, _broken = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for _name in _missing:
    sys.modules[_name] = None
class _BrokenLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError(f"simulated broken install of {module.__name__}")
class _BlockBroken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, _BrokenLoader()) if name in _broken else None
sys.meta_path.insert(0, _BlockBroken())
sys.argv = sys.argv[:1] + sys.argv[3:]
'''


def run_blocked(code: str, *args, missing=(), broken=(), cwd=None, env=None):
    """``python -c BLOCKER + code`` with ``missing`` / ``broken`` modules; returns the CompletedProcess."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", BLOCKER + code, json.dumps(list(missing)), json.dumps(list(broken)),
                           *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def result_of(proc) -> dict:
    """The JSON a subprocess printed after "RESULT:" (asserting it got there)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert lines, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT:"):])


def import_kontext_pipeline() -> None:
    """diffusers' FluxKontextPipeline imported now: diffusers imports bitsandbytes with it when it found bitsandbytes
    installed at its own import (a bitsandbytes blocked afterwards is the broken case, tested in a subprocess)."""
    import diffusers

    assert diffusers.FluxKontextPipeline is not None  # the lazy import, done now


def block(monkeypatch, *names):
    """``import <name>`` (and of its already imported submodules) raises ImportError until the test ends."""
    for name in names:
        for key in [k for k in list(sys.modules) if k == name or k.startswith(name + ".")] + [name]:
            monkeypatch.setitem(sys.modules, key, None)


def run_main(argv, capsys):
    """(exit status, stderr) of ``lorweb-fast <argv>`` in this process; an exception escaping ``main`` (a traceback
    on the command line) gives the status "raised <type>: <message>"."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:  # what the command line would show as a traceback
        rc = f"raised {type(exc).__name__}: {exc}"
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err: str, *words: str) -> str:
    """A command-line error: status 1 or 2, one ``lorweb-fast ...: error:`` line on stderr naming every word (case
    insensitive), no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("lorweb-fast ") and ": error: " in line]
    assert rc in (1, 2), f"status {rc!r}; stderr: {err[-2000:]}"
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def train_argv(assets: Path, out: Path, *extra) -> list:
    """``lorweb-fast train`` on ``tiny_training_assets`` (2 steps, a checkpoint every step, fp32, CPU)."""
    return ["train", "--data", assets / "data", "--out", out, "--model", assets / "pipe", "--encoder",
            assets / "clip", "--steps", "2", "--batch-size", "2", "--mixed-precision", "no", "--long-edge", "64",
            "--resize", "long-edge", "--num-loras", "4", "--rank", "2", "--key-dim", "8", "--num-workers", "0",
            "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH), "--checkpoint-every", "1", "--quiet",
            *extra]


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("optdeps_train"), 4)


@pytest.fixture(scope="module")
def infer_assets(tmp_path_factory):
    """``build_tiny_lorweb_assets`` (pipe/, clip/, lorweb.safetensors) plus a.png, a_prime.png, b.png."""
    root = build_tiny_lorweb_assets(tmp_path_factory.mktemp("optdeps_infer"))
    for name, image in zip(("a", "a_prime", "b"), random_analogy(0)):
        image.save(root / f"{name}.png")
    return root


def infer_argv(root: Path, out: Path, *extra) -> list:
    return ["infer", "--a", root / "a.png", "--a-prime", root / "a_prime.png", "--b", root / "b.png", "--prompt",
            "mirror it", "--weights", root / "lorweb.safetensors", "--model", root / "pipe", "--encoder",
            root / "clip", "--out", out, "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--resolution",
            "native", "--long-edge", "64", "--quiet", *extra]


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    """A tiny runs folder (``evaluation.tiny``) to score."""
    from lorweb_fast.evaluation import tiny

    root = tmp_path_factory.mktemp("optdeps_eval")
    evalset = tiny.make_folder_evalset(root / "evalset", tasks=("flip",), per_task=2, size=(32, 32))
    tiny.make_runs_folder(root / "ours", evalset, seed=1)
    demo.build_tiny_clip(root / "clip")
    tiny.save_random_lpips_backbone(root / "torch_home")
    return root


# ------------------------------------------------------------------------------ everything missing: what still works
#: in a subprocess with every optional package missing (or broken): import, --help, the backends, and plain inference:
#: argv[3] "cli" runs ``lorweb-fast infer``; "api" runs ``LoRWeBKontextPipeline`` (with and without a per-call scale,
#: recording diffusers' log lines about it) and its LoRA API
EVERYTHING_CODE = '''
import contextlib, io, json, logging, sys
import numpy as np
import torch
import lorweb_fast as lf
from lorweb_fast import cli, info
root = sys.argv[1]
res = {"help": {}, "backend_errors": {}}
for argv in (["--help"], ["infer", "--help"], ["train", "--help"], ["demo", "--help"], ["data", "check", "--help"],
             ["eval", "score", "--help"], ["eval", "generate", "--help"]):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(argv)
    except SystemExit as exc:
        res["help"][" ".join(argv)] = exc.code
res["status"] = lf.backend_status()
res["info_triton"] = info.collect()["triton"]
for backend in ("triton", "cuda", None):
    layer = lf.LoRWeBLinear(torch.nn.Linear(4, 3), num_loras=2, rank=1, key_dim=2, query_dim=3, backend=backend)
    layer.set_coefficients(torch.rand(2, 2))
    try:
        layer(torch.randn(2, 5, 4))
        res["backend_errors"][str(backend)] = None
    except Exception as exc:
        res["backend_errors"][str(backend)] = [type(exc).__name__, str(exc)]
if sys.argv[3] == "cli":
    res["infer_rc"] = cli.main([
        "infer", "--a", f"{root}/a.png", "--a-prime", f"{root}/a_prime.png", "--b", f"{root}/b.png", "--prompt",
        "mirror it", "--weights", f"{root}/lorweb.safetensors", "--model", f"{root}/pipe", "--encoder",
        f"{root}/clip", "--out", sys.argv[2], "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--resolution",
        "native", "--long-edge", "64", "--quiet"])
if sys.argv[3] == "api":
    from PIL import Image
    from lorweb_fast.flux import LoRWeBKontextPipeline
    records = []
    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(_Keep())
    pipe = LoRWeBKontextPipeline.from_pretrained(f"{root}/pipe", f"{root}/lorweb.safetensors",
                                                 encoder=f"{root}/clip", resolution="native", long_edge=64,
                                                 dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.open(f"{root}/{n}.png") for n in ("a", "a_prime", "b")]
    def run(**kw):
        out = pipe(*images, "mirror it", num_inference_steps=1, max_sequence_length=16,
                   generator=torch.Generator().manual_seed(0), merge="none", **kw)
        return np.asarray(out[0], dtype=np.int16)
    full, half = run(), run(joint_attention_kwargs={"scale": 0.5})
    res["api_image"] = list(full.shape)
    res["scale_changes_output"] = bool(np.abs(full - half).max() > 0)
    res["scale_warnings"] = [m for m in records if "scale" in m]
    pipe.set_analogy(*images)
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.set_adapters("lorweb", 0.7)
    pipe.disable_lora()
    pipe.enable_lora()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(f"{root}/lorweb.safetensors")
    res["lora_api"] = "ok"
print("RESULT:" + json.dumps(res))
'''


@pytest.fixture(scope="module")
def everything_missing(infer_assets, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("optdeps_missing")
    proc = run_blocked(EVERYTHING_CODE, infer_assets, cwd / "b_prime.png", "api", missing=ALL_OPTIONAL, cwd=cwd)
    return result_of(proc), cwd


@pytest.fixture(scope="module")
def everything_broken(infer_assets, tmp_path_factory):
    """triton, lorweb_fast._C, matplotlib, lpips and optimum-quanto installed but failing to import (bitsandbytes,
    peft and torchvision broken break diffusers / transformers themselves: see the findings)."""
    cwd = tmp_path_factory.mktemp("optdeps_broken")
    proc = run_blocked(EVERYTHING_CODE, infer_assets, cwd / "b_prime.png", "cli",
                       broken=["triton", "lorweb_fast._C", "matplotlib", "lpips", "optimum.quanto"], cwd=cwd)
    return result_of(proc), cwd


@pytest.fixture(params=["everything_missing", "everything_broken"])
def scenario(request):
    """(the subprocess's results, its folder, the scenario's name) of both scenarios."""
    return (*request.getfixturevalue(request.param), request.param)


def test_import_help_and_plain_inference_need_no_optional_package(scenario):
    """``import lorweb_fast``, every ``--help`` (exit 0) and plain inference work with every optional package
    missing (the pipeline API) / broken (``lorweb-fast infer``: exit 0, b' written)."""
    res, cwd, name = scenario
    assert res["help"] and set(res["help"].values()) == {0}, res["help"]
    if name == "everything_broken":
        assert res["infer_rc"] == 0 and (cwd / "b_prime.png").stat().st_size > 0
    else:
        assert res["api_image"][-1] == 3


def test_named_backends_refuse_and_the_default_runs_torch(scenario):
    """``backend="triton"`` / ``"cuda"`` named explicitly: BackendUnavailableError whose text names what failed to
    import (triton, lorweb_fast._C) and backend_status says the same; ``backend=None`` runs (torch backend)."""
    res, _, _ = scenario
    errors = res["backend_errors"]
    assert errors["None"] is None
    assert errors["triton"][0] == "BackendUnavailableError" and "triton" in errors["triton"][1].lower()
    assert errors["cuda"][0] == "BackendUnavailableError" and "lorweb_fast._C" in errors["cuda"][1]
    assert res["status"]["triton"].startswith("unavailable: the Triton kernels cannot be imported")
    assert res["status"]["cuda"].startswith("unavailable:") and "lorweb_fast._C" in res["status"]["cuda"]
    assert res["status"]["torch"].startswith("available")


def test_lora_api_and_per_call_scale_work_without_peft(everything_missing):
    """The pipeline's diffusers-style LoRA API is lorweb_fast's own: it works without peft, and a per-call
    ``joint_attention_kwargs={"scale": 0.5}`` changes the output (LoRWeB applies it)."""
    res, _ = everything_missing
    assert res["lora_api"] == "ok"
    assert res["scale_changes_output"] is True


def test_no_misleading_scale_warning_without_peft(everything_missing):
    res, _ = everything_missing
    assert res["scale_warnings"] == []


def test_missing_triton_says_how_to_get_it(everything_missing):
    res, _ = everything_missing
    message = res["backend_errors"]["triton"][1]
    assert "pip install" in message or "backend='torch'" in message


def test_info_tells_a_broken_triton_from_a_missing_one(everything_broken, everything_missing):
    assert everything_missing[0]["info_triton"] == "not installed"
    assert everything_broken[0]["info_triton"] != "not installed"
    assert "simulated broken install" in everything_broken[0]["info_triton"]


def test_a_cuda_extension_that_fails_to_load_is_not_called_unbuilt(everything_broken):
    message = everything_broken[0]["status"]["cuda"]
    assert "simulated broken install" in message and "not built" not in message


# ------------------------------------------------------------------------------------- broken bitsandbytes (diffusers)
BROKEN_BNB_INFER = '''
import sys
from lorweb_fast import cli
sys.exit(cli.main(sys.argv[1:]))
'''


def test_infer_with_a_broken_bitsandbytes_is_one_line(infer_assets, tmp_path):
    proc = run_blocked(BROKEN_BNB_INFER, *infer_argv(infer_assets, tmp_path / "b_prime.png"), broken=["bitsandbytes"],
                       cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "bitsandbytes")
    assert not (tmp_path / "b_prime.png").exists()


# --------------------------------------------------------------------------------------------------- training
def test_cli_train_qfloat8_without_quanto_is_one_line(train_assets, tmp_path, monkeypatch, capsys):
    block(monkeypatch, "optimum.quanto")
    rc, err = run_main(train_argv(train_assets, tmp_path / "run", "--quantize-base", "qfloat8"), capsys)
    assert_one_line_error(rc, err, "optimum-quanto", "pip install")
    assert not (tmp_path / "run").exists()


def test_train_api_qfloat8_without_quanto_names_it_before_loading(train_assets, tmp_path, monkeypatch):
    """The API: ImportError naming optimum-quanto and its pip extra, nothing written."""
    from lorweb_fast import training
    from lorweb_fast.testing import tiny_train_config

    block(monkeypatch, "optimum.quanto")
    monkeypatch.setattr(training, "load_training_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ImportError, match=r"optimum-quanto.*pip install"):
        training.train(tiny_train_config(train_assets, tmp_path / "run", quantize_base="qfloat8"))
    assert not (tmp_path / "run").exists()


def test_training_with_adamw_needs_no_bitsandbytes(train_assets, tmp_path, monkeypatch, capsys):
    """``--optimizer adamw`` does not touch bitsandbytes: training works with it unimportable."""
    import_kontext_pipeline()
    block(monkeypatch, "bitsandbytes")
    rc, err = run_main(train_argv(train_assets, tmp_path / "run", "--optimizer", "adamw", "--steps", "1"), capsys)
    assert rc == 0, err
    assert (tmp_path / "run" / "lorweb.safetensors").is_file()


def test_adamw8bit_without_bitsandbytes_is_refused_up_front(train_assets, tmp_path, monkeypatch, capsys):
    from lorweb_fast import training

    import_kontext_pipeline()
    block(monkeypatch, "bitsandbytes")
    monkeypatch.setattr(training, "load_training_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    rc, err = run_main(train_argv(train_assets, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, "bitsandbytes", "--optimizer adamw")
    assert not (tmp_path / "run").exists()


def test_overwrite_keeps_the_old_run_when_bitsandbytes_is_missing(train_assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.01}\n')
    (out / "lorweb.safetensors").write_bytes(b"old weights")
    import_kontext_pipeline()
    block(monkeypatch, "bitsandbytes")
    rc, err = run_main(train_argv(train_assets, out, "--overwrite"), capsys)
    assert rc != 0 and "bitsandbytes" in f"{rc} {err}", (rc, err)
    assert (out / "lorweb.safetensors").read_bytes() == b"old weights"
    assert (out / "loss.jsonl").is_file()


def test_training_without_matplotlib_fails_first_or_skips_the_plot(train_assets, tmp_path, monkeypatch, capsys):
    block(monkeypatch, "matplotlib")
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, err = run_main(train_argv(train_assets, out, "--optimizer", "adamw"), capsys)
    if rc == 0:  # fixed by skipping loss.png with a warning naming matplotlib
        assert (out / "lorweb.safetensors").is_file() and not (out / "loss.png").exists()
        assert any("matplotlib" in str(w.message) for w in caught) or "matplotlib" in err
    else:  # fixed by refusing before training
        assert_one_line_error(rc, err, "matplotlib", "pip install")
        assert not (out / "checkpoints").exists()


# -------------------------------------------------------------------------------------------------- inference plots
def test_infer_coefficients_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    root = infer_input_files(tmp_path)
    block(monkeypatch, "matplotlib")
    rc, err = run_main(["infer", "--a", root / "a.png", "--a-prime", root / "a_prime.png", "--b", root / "b.png",
                        "--prompt", "p", "--weights", root / "w.safetensors", "--model", root / "model", "--encoder",
                        root / "clip", "--out", tmp_path / "out.png", "--coefficients-plot", tmp_path / "c.png"],
                       capsys)
    assert_one_line_error(rc, err, "matplotlib")


def test_plot_coefficients_without_matplotlib_raises_importerror_naming_it(tmp_path, monkeypatch):
    """The API: ImportError naming matplotlib, no file written."""
    import lorweb_fast as lf

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3, target_modules=r"\d"))
    lf.set_query(model, torch.randn(1, 3))
    block(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match="matplotlib"):
        lf.plot_coefficients(model, tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ evaluation
def score_argv(root: Path, out: Path, *extra) -> list:
    return ["eval", "score", "--runs", root / "ours", "--out", out, "--encoder", root / "clip", "--device", "cpu",
            "--quiet", *extra]


@pytest.fixture
def torch_home(eval_runs, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(eval_runs / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


def test_eval_score_without_lpips_is_one_line(eval_runs, torch_home, tmp_path, monkeypatch, capsys):
    """The lpips package missing: one line naming it and its pip command, exit 2, no report folder."""
    block(monkeypatch, "lpips")
    rc, err = run_main(score_argv(eval_runs, tmp_path / "report"), capsys)
    assert rc == 2
    assert_one_line_error(rc, err, "lpips", "pip install lpips")
    assert not (tmp_path / "report").exists()
    rc, err = run_main(score_argv(eval_runs, tmp_path / "report", "--metrics", "clip_dir"), capsys)
    assert rc == 0, err  # a scoring without LPIPS does not need it


def test_eval_score_names_torchvision_when_it_is_what_is_missing(eval_runs, torch_home, tmp_path, monkeypatch,
                                                                capsys):
    for key in [k for k in list(sys.modules) if k == "lpips" or k.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, key)  # imported afresh, as in a new process
    block(monkeypatch, "torchvision")
    rc, err = run_main(score_argv(eval_runs, tmp_path / "report", "--metrics", "lpips"), capsys)
    assert_one_line_error(rc, err, "torchvision")


def test_eval_score_finds_lpips_missing_before_loading_the_judge(eval_runs, torch_home, tmp_path, monkeypatch,
                                                                 capsys):
    from lorweb_fast.evaluation import judge

    loaded = []

    class FakeGemma3Judge:
        def __init__(self, model, **kwargs):
            loaded.append(model)
            self.name = f"gemma3:{model}"

    monkeypatch.setattr(judge, "Gemma3Judge", FakeGemma3Judge)
    block(monkeypatch, "lpips")
    rc, err = run_main(score_argv(eval_runs, tmp_path / "report", "--judge", "gemma3:some/model"), capsys)
    assert_one_line_error(rc, err, "lpips")
    assert loaded == []


def test_eval_score_without_matplotlib_fails_first_or_skips_the_plots(eval_runs, torch_home, tmp_path, monkeypatch,
                                                                       capsys):
    block(monkeypatch, "matplotlib")
    out = tmp_path / "report"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, err = run_main(score_argv(eval_runs, out), capsys)
    if rc == 0:  # fixed by skipping the plots with a warning naming matplotlib
        assert (out / "metrics.json").is_file()
        assert any("matplotlib" in str(w.message) for w in caught) or "matplotlib" in err
    else:  # fixed by refusing before scoring
        assert_one_line_error(rc, err, "matplotlib")
        assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------------------ aot
def test_aot_without_triton_is_one_line(tmp_path, monkeypatch, capsys):
    from lorweb_fast import aot

    block(monkeypatch, "triton")
    try:
        rc = aot.main(["--arch", "90", "--out", str(tmp_path / "aot"), "--quiet"])
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:
        rc = f"raised {type(exc).__name__}: {exc}"
    err = capsys.readouterr().err
    assert rc in (1, 2) and "triton" in err and "Traceback" not in err, (rc, err)
    assert not (tmp_path / "aot").exists()


@pytest.mark.parametrize("code,one_line", [
    ("import lorweb_fast_not_installed_pkg", True),  # a package that is not installed: one line, pip command
    ("from torch.nn import NoSuchLayer", False),  # a name an installed package lacks: a bug or a version mismatch
    ("import diffusers.no_such_module", False),  # a module an installed package lacks
    ("import lorweb_fast.no_such_module", False)])  # our own
def test_cli_gives_one_line_only_for_packages_that_are_not_installed(monkeypatch, capsys, tmp_path, code, one_line):
    """cli.main turns an ImportError into one line (exit 2) only when it is a MissingDependencyError or names a
    package that is not installed; any other ImportError keeps its traceback (it is raised), instead of a line that
    would advise reinstalling an installed package."""
    def command(args):
        exec(code, {})

    monkeypatch.setattr(cli, "run_demo", command)
    if one_line:
        rc, err = run_main(["demo", "--out", tmp_path / "demo"], capsys)
        assert_one_line_error(rc, err, "lorweb_fast_not_installed_pkg", "pip install")
    else:
        with pytest.raises(ImportError):
            cli.main(["demo", "--out", str(tmp_path / "demo")])
