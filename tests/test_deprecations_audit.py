"""Deprecations audit: lorweb_fast's own code must not use an API that a dependency has deprecated.

What is audited. The code of lorweb_fast itself (``lorweb_fast/``, ``kernels/`` as ``lorweb_fast.kernels``,
``benchmarks/``, ``setup.py``), never the tests nor third-party code, through representative entry points on tiny
local models (nothing downloads): the layer forward / backward on the torch backend (also under CPU autocast), the
model API on a tiny FLUX transformer (inject, set_query, forward, merged, strength, save, load, plot, remove), the
tiny LoRWeBKontext pipeline (generation unmerged and merged; fuse / unfuse / set_adapters / save / unload / load
of its diffusers-style LoRA API), ``lorweb-fast infer`` end to end (from_pretrained,
the CLIP encoder, output and plot files), one training step with a checkpoint and a resume, ``data check`` and
``data prepare``, the evaluation metrics (CLIP Dir., LPIPS) and the Gemma3 judge on tiny images, the benchmark on
CPU, the ``--help`` of every command, the import of every module (in a fresh interpreter), and the build of
``setup.py`` (``build_py``, in a fresh interpreter on a copy of the sources).

How. ``audit()`` records, while its block runs, every DeprecationWarning, PendingDeprecationWarning and
FutureWarning, every other warning whose text says "deprecated" (torchvision's and setuptools' deprecations are
UserWarning / SetuptoolsDeprecationWarning), and every WARNING record of the diffusers, transformers, accelerate and
huggingface_hub loggers that says "deprecated" / "will be removed in", each with the Python stack at the moment it is
raised (``warnings.warn`` / ``warn_explicit`` wrapped, so warnings that a filter ignores are still seen, and
``warnings._showwarnmsg`` wrapped, for the ones raised from C: torch's and numpy's). Filters are "always" inside the
block, and an "ignore" filter set inside it (lorweb_fast silences some third-party warnings) does not hide the
deprecation categories; transformers' ``warning_once`` cache is cleared on entry so a message logged by an earlier
test is logged again. A record counts against lorweb_fast when a frame of its own files is on the stack (the
innermost such frame is reported), unless it is one of ``UNAVOIDABLE`` (raised inside a dependency that lorweb_fast
calls through a current, non-deprecated API; the reason is given for each), or one of the ``KNOWN`` findings, which
each have their own ``xfail(strict=True)`` test, so that the other entry points still catch a new deprecation. A
record without a lorweb_fast frame is a third-party-internal one: not a failure. ``test_the_recorder_*`` show the
recorder can fail: a deprecated call (``torch.cuda.amp.autocast``, diffusers' ``deprecate``, a transformers log
line, a warning raised from C, also inside an ``ignore`` filter) under a lorweb_fast frame is caught,
and the same calls without one are not.

Findings (lorweb_fast at fault at 8640bfb; both were strict xfails here and are fixed in 18b6a9a, so their tests now
pin the fix; a future finding gets ``xfail(strict=True)`` on its own test and a ``KNOWN`` entry until it is fixed):

1. ``setup.py`` / pyproject ``[tool.setuptools.package-data]``: setuptools' SetuptoolsDeprecationWarning "Package
   'lorweb_fast.kernels.configs' is absent from the `packages` configuration" (``build_py``: the data folder
   kernels/configs is importable as a namespace package; "Package would be ignored" once setuptools stops installing
   it as data; no date set). Replacement: list it, ``PACKAGES += ["lorweb_fast.kernels.configs"]``,
   ``PACKAGE_DIR["lorweb_fast.kernels.configs"] = "kernels/configs"`` and package-data
   ``"lorweb_fast.kernels.configs" = ["*.json"]`` (setuptools >= 69, the declared build requirement, supports it).
   Pinned by ``test_setup_py_build``.
2. ``lorweb_fast/validation.py`` ``image_suffixes`` (used by ``infer --out``): Pillow's DeprecationWarning "IM image
   format is deprecated and will be removed in Pillow 15 (2028-10-15)" (deprecated in Pillow 13.0), raised by probing
   every registered writer and silenced by the library's own ``simplefilter("ignore")``. Replacement: probe a fixed
   set of common output formats (``validation.IMAGE_WRITE_FORMATS``); probing IM and dropping it afterwards would
   still call the deprecated writer. Pinned by ``test_output_suffixes_offer_no_deprecated_format``.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.find_spec("lorweb_fast")  # not imported here: the subprocess import test reuses this file
PACKAGE = Path(next(iter(_SPEC.submodule_search_locations))).resolve()
#: lorweb_fast's own files: the package (kernels/ installed as lorweb_fast/kernels), the source kernels/ and
#: benchmarks/ folders, setup.py; the tests are not
OWN_ROOTS = tuple(f"{p}{os.sep}" for p in {PACKAGE, REPO / "kernels", REPO / "benchmarks"})
OWN_FILES = (str(REPO / "setup.py"),)
CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
DEPRECATED_TEXT = re.compile(r"\bdeprecat", re.I)  # another category's warning that is a deprecation
LOGGED_DEPRECATION = re.compile(r"\bdeprecat|\bwill be removed in\b", re.I)
LOGGERS = ("diffusers", "transformers", "accelerate", "huggingface_hub")
_HERE = str(Path(__file__).resolve())


@dataclasses.dataclass(frozen=True)
class Unavoidable:
    """A deprecation raised inside a dependency that lorweb_fast reaches through a current API only."""
    message: str  # regular expression, searched in the text
    origin: str  # regular expression, searched in the path of the innermost frame that raised it
    reason: str


#: third-party-internal deprecations with a lorweb_fast frame on their stack (see the report for the others)
UNAVOIDABLE = (
    Unavoidable(r"The parameter 'pretrained' is deprecated|Arguments other than a weight enum", r"torchvision",
                "lpips 0.1.4 (its latest release) builds its backbone with torchvision's pretrained=; lorweb_fast "
                "calls lpips.LPIPS(net=, pretrained=True, pnet_rand=True, verbose=False), lpips' current API "
                "(evaluation/metrics.py LPIPSDistance)"),
)


@dataclasses.dataclass(frozen=True)
class Known:
    """A finding of this audit (lorweb_fast at fault today), pinned by its own xfail(strict=True) test."""
    message: str
    caller: str  # the lorweb_fast file of the innermost own frame, relative to the repository


#: (empty: both findings of this audit are fixed; see the module docstring)
KNOWN: tuple = ()


class DeprecationAuditError(AssertionError):
    """lorweb_fast used an API that a dependency has deprecated."""


@dataclasses.dataclass(frozen=True)
class Deprecation:
    kind: str  # "warning" or "log:<logger name>"
    category: str
    message: str
    origin: str  # path:line that raised it
    caller: Optional[str]  # the innermost lorweb_fast frame, "path:line (function)", or None
    caller_path: Optional[str] = None  # that frame's file, relative to the repository (or the package's parent)

    def line(self) -> str:
        return f"{self.category}: {self.message[:300]!r} raised at {self.origin}, from {self.caller}"


def _own(path: str) -> bool:
    return path.startswith(OWN_ROOTS) or path in OWN_FILES


def _relative(path: str) -> str:
    for base in (REPO, PACKAGE.parent):
        with contextlib.suppress(ValueError):
            return Path(path).relative_to(base).as_posix()
    return path


class DeprecationRecorder:
    """See the module docstring. Use through ``audit()``."""

    def __init__(self, known=KNOWN):
        self.known = known
        self.events: list[Deprecation] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    # ------------------------------------------------------------------------------------------- recording
    def _record(self, kind: str, category: str, message, stack) -> None:
        frames = [f for f in stack if f.filename != _HERE and not f.filename.endswith(f"{os.sep}warnings.py")]
        own = [f for f in frames if _own(os.path.abspath(f.filename))]
        origin = frames[-1] if frames else None
        caller = own[-1] if own else None
        event = Deprecation(kind, category, str(message), f"{origin.filename}:{origin.lineno}" if origin else "?",
                            f"{_relative(caller.filename)}:{caller.lineno} ({caller.name})" if caller else None,
                            _relative(os.path.abspath(caller.filename)) if caller else None)
        with self._lock:
            if event not in self.events:
                self.events.append(event)

    @staticmethod
    def _relevant(category, message) -> bool:
        try:
            if issubclass(category, CATEGORIES):
                return True
            from_lorweb = category.__module__.startswith("lorweb_fast")  # its own warnings are not deprecations
            return not from_lorweb and bool(DEPRECATED_TEXT.search(str(message)))
        except TypeError:
            return False

    def __enter__(self):
        self._saved = {name: getattr(warnings, name) for name in ("warn", "warn_explicit", "_showwarnmsg",
                                                                  "simplefilter", "filterwarnings")}
        real = dict(self._saved)
        recorder = self

        def warn(message, category=None, stacklevel=1, source=None, **kwargs):
            cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
            if recorder._relevant(cat, message):
                recorder._record("warning", cat.__name__, message, traceback.extract_stack())
            recorder._local.inside = True
            try:
                return real["warn"](message, category, stacklevel + 1, source, **kwargs)
            finally:
                recorder._local.inside = False

        def warn_explicit(message, category, filename, lineno, *args, **kwargs):
            cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
            if recorder._relevant(cat, message):
                recorder._record("warning", cat.__name__, message, traceback.extract_stack())
            recorder._local.inside = True
            try:
                return real["warn_explicit"](message, category, filename, lineno, *args, **kwargs)
            finally:
                recorder._local.inside = False

        def showwarnmsg(msg):  # warnings raised from C (PyErr_WarnEx: torch, numpy) reach Python only here
            if not getattr(recorder._local, "inside", False) and recorder._relevant(msg.category, msg.message):
                recorder._record("warning", msg.category.__name__, msg.message, traceback.extract_stack())
            return real["_showwarnmsg"](msg)

        def keep_visible():
            for cat in CATEGORIES:
                real["simplefilter"]("always", cat)

        def simplefilter(action, category=Warning, lineno=0, append=False):
            real["simplefilter"](action, category, lineno, append)
            if action == "ignore":
                keep_visible()

        def filterwarnings(action, message="", category=Warning, module="", lineno=0, append=False):
            real["filterwarnings"](action, message, category, module, lineno, append)
            if action == "ignore":
                keep_visible()

        self._catch = warnings.catch_warnings(record=True)
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.warn, warnings.warn_explicit, warnings._showwarnmsg = warn, warn_explicit, showwarnmsg
        warnings.simplefilter, warnings.filterwarnings = simplefilter, filterwarnings

        class Handler(logging.Handler):
            def emit(self, record):
                text = record.getMessage()
                if record.levelno >= logging.WARNING and LOGGED_DEPRECATION.search(text):
                    recorder._record(f"log:{record.name}", record.levelname, text, traceback.extract_stack())

        self._handler = Handler(logging.WARNING)
        self._levels = {}
        for name in LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            if logger.getEffectiveLevel() > logging.WARNING:
                logger.setLevel(logging.WARNING)
            logger.addHandler(self._handler)
        once = getattr(logging.Logger, "warning_once", None)  # transformers' / diffusers' lru_cache'd helper
        if hasattr(once, "cache_clear"):
            once.cache_clear()
        return self

    def __exit__(self, *exc):
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            logger.setLevel(self._levels[name])
        for name, value in self._saved.items():
            setattr(warnings, name, value)
        self._catch.__exit__(*exc)
        return False

    # -------------------------------------------------------------------------------------------- verdicts
    @staticmethod
    def unavoidable(event: Deprecation) -> Optional[Unavoidable]:
        return next((u for u in UNAVOIDABLE if re.search(u.message, event.message)
                     and re.search(u.origin, event.origin)), None)

    def is_known(self, event: Deprecation) -> bool:
        return any(re.search(k.message, event.message) and event.caller_path == k.caller for k in self.known)

    def ours(self) -> list[Deprecation]:
        """The deprecations lorweb_fast is at fault for (a frame of its own on the stack, not unavoidable, not
        an already known finding)."""
        return [e for e in self.events if e.caller is not None and not self.unavoidable(e) and not self.is_known(e)]

    def third_party(self) -> list[Deprecation]:
        return [e for e in self.events if e.caller is None or self.unavoidable(e)]

    def check(self) -> None:
        ours = self.ours()
        if ours:
            raise DeprecationAuditError("lorweb_fast uses deprecated APIs:\n" + "\n".join(e.line() for e in ours))


@contextlib.contextmanager
def audit(known=KNOWN):
    """Record deprecations while the block runs; DeprecationAuditError after it if lorweb_fast is at fault."""
    with DeprecationRecorder(known) as recorder:
        yield recorder
    recorder.check()


# ------------------------------------------------------------------------------------------- the recorder itself
def _under_a_lorweb_fast_frame(action):
    """Run ``action`` from a lorweb_fast frame: ``model.finished_through_interrupt(work)`` calls ``work()``."""
    from lorweb_fast.model import finished_through_interrupt

    assert finished_through_interrupt(action) is None


def _amp_autocast():
    with torch.cuda.amp.autocast(enabled=False):  # FutureWarning since torch 2.4
        pass


def _diffusers_deprecate():
    from diffusers.utils import deprecate

    deprecate("audit_probe", "1.0.0", "the audit's probe")


def _transformers_logged_deprecation():
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.audit_probe").warning("`audit_probe` is deprecated and will be removed")


def _from_c():
    import _warnings  # the C implementation, as torch's and numpy's C code raise warnings (PyErr_WarnEx)

    _warnings.warn("the audit's probe is deprecated (raised from C)", DeprecationWarning)


def _inside_an_ignore_block():
    with warnings.catch_warnings():  # as lorweb_fast silences some third-party warnings (LPIPS' construction)
        warnings.simplefilter("ignore")
        _from_c()


PROBES = {"torch_cuda_amp_autocast": _amp_autocast, "diffusers_deprecate": _diffusers_deprecate,
          "transformers_log_line": _transformers_logged_deprecation, "raised_from_c": _from_c,
          "from_c_under_an_ignore_filter": _inside_an_ignore_block,
          "deprecation_warning": lambda: warnings.warn("audit probe is deprecated", DeprecationWarning)}


@pytest.mark.parametrize("probe", list(PROBES))
def test_the_recorder_catches_a_deprecated_call_under_a_lorweb_fast_frame(probe):
    with pytest.raises(DeprecationAuditError, match="lorweb_fast uses deprecated APIs") as err:
        with audit():
            _under_a_lorweb_fast_frame(PROBES[probe])
    assert "lorweb_fast/model.py" in str(err.value), str(err.value)  # the innermost lorweb_fast frame is named


@pytest.mark.parametrize("probe", list(PROBES))
def test_the_recorder_leaves_third_party_only_deprecations_alone(probe):
    with audit() as recorder:
        PROBES[probe]()
    assert recorder.events and all(e.caller is None for e in recorder.events)  # seen, and not lorweb_fast's


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(root, recorder): build_tiny_lorweb_assets (pipe/, clip/, lorweb.safetensors) and 2 synthetic analogies in
    data/, built by lorweb_fast's demo code under the recorder (checked by test_tiny_demo_assets_build)."""
    from lorweb_fast import demo
    from lorweb_fast.testing import build_tiny_lorweb_assets

    root = tmp_path_factory.mktemp("assets")
    with DeprecationRecorder() as recorder:
        build_tiny_lorweb_assets(root)
        demo.make_synthetic_analogies(root / "data", 2)
    return root, recorder


@pytest.fixture
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# ------------------------------------------------------------------------------------------------ entry points
def test_tiny_demo_assets_build(assets):
    assets[1].check()


def test_layer_forward_backward_on_the_torch_backend():
    import lorweb_fast as lf
    from lorweb_fast.testing import small_lorweb_sequential

    with audit():
        model = small_lorweb_sequential().train()
        lf.set_backend(model, "torch")
        lf.set_query(model, torch.randn(2, 6))
        x = torch.randn(2, 5, 8, requires_grad=True)
        model(x).square().sum().backward()
        lf.set_query(model, torch.randn(2, 6))  # the coefficients' graph went with that backward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 8))
        layer = next(iter(lf.lorweb_layers(model).values()))
        coeffs = lf.get_coefficients(model)
        lf.lorweb_linear(torch.randn(2, 3, 8), layer.base_layer.weight, layer.base_layer.bias, layer.lora_A,
                         layer.lora_B, next(iter(coeffs.values())), 0.5, backend="torch")
    assert x.grad is not None


def test_flux_transformer_inject_query_merge_save_load(tmp_path):
    import lorweb_fast as lf
    from diffusers import FluxTransformer2DModel
    from lorweb_fast.testing import tiny_flux_config, tiny_flux_inputs

    cfg = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12)
    with audit():
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**tiny_flux_config()).eval()
        lf.inject_lorweb(model, cfg)
        lf.set_backend(model, "torch")
        lf.set_query(model, torch.randn(2, 12))
        with torch.no_grad():
            model(**tiny_flux_inputs(2)).sample
            lf.set_query(model, torch.randn(1, 12))
            lf.set_lorweb_scale(model, 0.5)
            for strategy in ("full", "jit"):
                with lf.merged(model, strategy):
                    model(**tiny_flux_inputs(1)).sample
        lf.plot_coefficients(model, tmp_path / "coefficients.png")
        lf.save_lorweb_weights(model, tmp_path / "w.safetensors")
        other = FluxTransformer2DModel(**tiny_flux_config()).eval()
        lf.inject_lorweb(other, cfg)
        lf.load_lorweb_weights(other, tmp_path / "w.safetensors")
        lf.clear_query(model)
        lf.remove_lorweb(model)


def test_tiny_pipeline_generation_and_lora_api(tmp_path):
    from lorweb_fast.testing import generate_random_analogy, random_analogy, tiny_lorweb_kontext_pipeline

    with audit():
        lp = tiny_lorweb_kontext_pipeline(tmp_path)
        generate_random_analogy(lp, 0)
        generate_random_analogy(lp, 1, merge="full")
        lp.set_analogy(*random_analogy(2))
        lp.fuse_lora()
        generate_random_analogy(lp, 2, steps=1)
        lp.unfuse_lora()
        lp.set_adapters(None, 0.5)
        lp.save_lora_weights(tmp_path / "lora")
        lp.unload_lora_weights()
        lp.load_lora_weights(tmp_path / "lora")


def test_cli_infer_end_to_end(assets, tmp_path, quiet):
    from lorweb_fast import cli, demo
    from lorweb_fast.testing import random_analogy

    root = assets[0]
    for name, im in zip(("a", "a_prime", "b"), random_analogy(0)):
        im.save(tmp_path / f"{name}.png")
    argv = ["infer", "--a", str(tmp_path / "a.png"), "--a-prime", str(tmp_path / "a_prime.png"),
            "--b", str(tmp_path / "b.png"), "--prompt", "mirror it", "--weights", str(root / "lorweb.safetensors"),
            "--model", str(root / "pipe"), "--out", str(tmp_path / "b_prime.png"), "--steps", "1", "--dtype", "fp32",
            "--resolution", "native", "--long-edge", "64", "--coefficients-plot", str(tmp_path / "c.png"),
            "--pipe-arg", f"max_sequence_length={demo.DEMO_MAX_SEQUENCE_LENGTH}", "--quiet"]
    with audit():
        rc = cli.main(argv)
    assert rc == 0 and (tmp_path / "b_prime.png").is_file()


def test_training_step_checkpoint_and_resume(assets, tmp_path):
    from lorweb_fast import training
    from lorweb_fast.testing import tiny_train_config

    cfg = tiny_train_config(assets[0], tmp_path / "run", steps=1, checkpoint_every=1)
    with audit():
        training.train(cfg)
        result = training.train(dataclasses.replace(cfg, steps=2, resume=True))
    assert result["step"] == 2


def test_data_check_and_prepare(assets, tmp_path, quiet):
    from lorweb_fast import cli
    from lorweb_fast.testing import relation252k_folder

    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12), (16, 12)], "cat-b": [(16, 12), (16, 12)]}, seed=1)
    with audit():
        assert cli.main(["data", "check", str(assets[0] / "data"), "--quiet", "--long-edge", "64"]) == 0
        assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "prepared"), "--quiet"]) == 0


def test_evaluation_metrics_and_judge(assets, tmp_path, monkeypatch):
    import random

    from lorweb_fast.evaluation import judge as J
    from lorweb_fast.evaluation import metrics as M
    from lorweb_fast.evaluation import tiny

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    rng = random.Random(0)
    a, a2, b, b2 = (tiny.random_picture(rng, (40, 32)) for _ in range(4))
    gemma = tiny.build_tiny_gemma3(tmp_path / "gemma3")  # (transformers' code, outside the audit)
    with audit():
        M.ClipDirectional(assets[0] / "clip")([(a, a2, b, b2)])
        tiny.save_random_lpips_backbone(tmp_path / "torch_home")
        M.LPIPSDistance("alex")(b, b2)
        judge = J.Gemma3Judge(gemma, device="cpu", dtype=torch.float32, max_new_tokens=2)
        judge(J.JudgeRequest("ours", "t/0", "score", J.SCORE_PROMPT, images=lambda: [a, a2, b, b2]))


def test_benchmark_on_cpu(tmp_path, quiet):
    from lorweb_fast.testing import load_module_from_file

    bench = load_module_from_file(REPO / "benchmarks" / "bench_mixed_lora.py", "bench_mixed_lora_audit")
    with audit():
        bench.main(["--device", "cpu", "--m", "34", "--shapes", "40x24", "--num-loras", "3", "--rank", "4",
                    "--no-rank-sweep", "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path), "--tag", "audit",
                    "--profile"])


@pytest.mark.parametrize("argv", [[], ["infer"], ["train"], ["data"], ["data", "check"], ["data", "prepare"],
                                  ["demo"], ["eval"], ["eval", "generate"], ["eval", "score"]],
                         ids=lambda argv: " ".join(argv) or "lorweb-fast")
def test_cli_help(argv, capsys):
    from lorweb_fast import cli

    with audit():
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: lorweb-fast")


#: run by test_importing_every_module in a fresh interpreter: the dependencies first (their own import is not
#: lorweb_fast's doing), then every module of lorweb_fast and every benchmark script under the recorder
_IMPORT_EVERYTHING = r"""
import importlib, importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("deprecations_audit", sys.argv[1])
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)
for name in ("torch", "numpy", "PIL.Image", "diffusers", "transformers", "accelerate", "huggingface_hub",
             "safetensors.torch", "matplotlib", "yaml", "tqdm"):
    importlib.import_module(name)
package = audit.PACKAGE
names = ["lorweb_fast"] + sorted(
    "lorweb_fast." + ".".join(p.relative_to(package).with_suffix("").parts)
    for p in package.rglob("*.py") if p.name != "__init__.py" and p.stem != "__main__"
    and not p.relative_to(package).parts[0].startswith("_C")) + ["lorweb_fast.evaluation", "lorweb_fast.kernels",
                                                                 "lorweb_fast.kernels.mixed_lora"]
with audit.DeprecationRecorder() as recorder:
    for name in dict.fromkeys(names):
        importlib.import_module(name)
    for path in sorted((audit.REPO / "benchmarks").glob("*.py")):
        if not path.name.startswith("test_"):
            s = importlib.util.spec_from_file_location("bench_" + path.stem, path)
            s.loader.exec_module(importlib.util.module_from_spec(s))
print("AUDIT " + json.dumps({"ours": [e.line() for e in recorder.ours()],
                             "third_party": [e.line() for e in recorder.third_party()]}))
"""


def test_importing_every_module():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING, __file__], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.rsplit("AUDIT ", 1)[1])
    if found["ours"]:
        raise DeprecationAuditError("lorweb_fast uses deprecated APIs at import:\n" + "\n".join(found["ours"]))


#: run by test_setup_py_build on a copy of the sources: every warning of setup.py's build_py (setuptools' own
#: SetuptoolsDeprecationWarning is neither a DeprecationWarning nor a FutureWarning), one JSON line each
_BUILD = r"""
import json, runpy, sys, warnings
def show(message, category, filename, lineno, file=None, line=None):
    kinds = [c.__name__ for c in category.__mro__]  # setuptools' are nested classes named _Warning
    print("WARNING " + json.dumps([kinds, str(message).strip().splitlines()[0], filename, lineno]), file=sys.stderr)
warnings.showwarning = show
warnings.simplefilter("always")
sys.argv = ["setup.py", "-q", "build_py", "--build-lib", sys.argv[1]]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_py_build(tmp_path):
    """setup.py's build_py (on a copy of the sources) raises no setuptools deprecation and installs the kernel
    tables."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "_cuda_build_info.py")
    for folder in ("lorweb_fast", "kernels", "csrc"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    env["LORWEB_FAST_SKIP_CUDA_BUILD"] = "1"
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / "build")], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "build" / "lorweb_fast" / "kernels" / "configs" / "default.json").is_file()
    found = [json.loads(line.split(" ", 1)[1]) for line in proc.stderr.splitlines() if line.startswith("WARNING ")]
    deprecations = [w for w in found if any("Deprecation" in k or k == "FutureWarning" for k in w[0])
                    or DEPRECATED_TEXT.search(w[1])]
    if deprecations:
        raise DeprecationAuditError("setup.py's build uses deprecated setuptools configuration:\n"
                                    + "\n".join(f"{'/'.join(c[:2])}: {m} ({f}:{n})" for c, m, f, n in deprecations))


def test_output_suffixes_offer_no_deprecated_format():
    """``infer --out``'s formats are probed without running a deprecated writer (Pillow 13 deprecated IM)."""
    from lorweb_fast import validation

    with audit(known=()):
        suffixes = validation.image_suffixes()
    assert {".png", ".jpg"} <= suffixes and ".im" not in suffixes
