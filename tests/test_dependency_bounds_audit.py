"""Declared dependency lower bounds: pyproject.toml's ``>=`` bounds against the lowest versions found to work.

What was audited, and how: every dependency with a lower bound in pyproject.toml (``[project] dependencies`` and the
``quanto`` / ``test`` extras) was installed at its declared lower bound, then raised one release at a time, in fresh
virtual environments (CPU, 2 cores, Python 3.11.7 and 3.10.13; torch 2.8.0 with its Triton 3.4.0, torch 2.9.1 and
torch 2.14.1 with Triton 3.8.0), until the whole CPU test suite passed (``pytest tests benchmarks``: the CUDA
extension not built, so its tests aside) and ``python -m lorweb_fast.aot`` compiled. ``FLOORS`` holds, per
dependency, that lowest version and what fails below it (the missing class, argument or function, and where
lorweb_fast or its tests meet it). "Lowest working" means: the CPU suite passes with it and the other floors; some
floors are set by a test of a documented property rather than by an import error (each entry says which).

The checks:
- fast: every audited dependency is declared, with a lower bound at least its floor in ``FLOORS`` (a bound below
  the floor fails, naming the root cause), every declared lower bound is audited (a new bound needs an entry here),
  and ``requires-python`` is not below the oldest Python the suite was run with;
- slow: pip resolves the declared lower bounds together (``pip install --dry-run`` with each bound pinned ``==``, in
  this environment: torch and triton are taken as installed, not downloaded, and the torch / triton requirements of
  everything resolved must admit their declared lower bounds); skipped when pip reaches no package index, or when the
  index it reaches lacks a pinned version;
- slow: a smoke run at the declared lower bounds: a throw-away virtual environment layered over this one (torch,
  triton, lorweb_fast, ... from here, through a ``.pth`` file; nothing is installed into this environment, checked)
  gets every other bounded dependency pinned to its declared lower bound, then runs ``lorweb-fast demo`` (tiny
  FLUX.1-Kontext pipeline and CLIP, a short training run with the default 8-bit AdamW, save, load, one generation)
  and the tests in ``FLOOR_TESTS``, the ones that failed below the floors. About 3-4 minutes on 2 cores, most of it
  ``FLOOR_TESTS``; skipped without a package index.

``LORWEB_FAST_AUDIT_PYPROJECT=path`` audits another pyproject.toml (e.g. a copy with a lowered bound, to see these
tests fail).
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = Path(os.environ.get("LORWEB_FAST_AUDIT_PYPROJECT") or REPO / "pyproject.toml")

#: the oldest Python the suite was run with (3.10.13: the floors below pass there too; 3.9 was not tried)
PYTHON_FLOOR = "3.10"

#: dependency -> (the lowest version found to work, why the versions below it do not)
FLOORS = {
    # torch 2.8.0 (+ Triton 3.4.0) runs the library and the CPU suite, except one test: its gloo
    # reduce_scatter_tensor(op=AVG) returns the SUM (2 ranks: 3.0 instead of 1.5), so FSDP2 on a CPU gloo group
    # (tests/accelerate_train_worker.py "fsdp2-cpu") steps with world-size-times gradients and
    # test_training.py::test_fsdp2_matches_ddp_resumes_and_writes_portable_checkpoints differs from DDP after one
    # step; fixed in torch 2.9 (2.9.1 checked). accelerate enables FSDP only on accelerators (NCCL, not affected),
    # so keeping 2.8 would need that test skipped below 2.9.
    "torch": ("2.9", "torch 2.8's gloo reduce_scatter_tensor(op=AVG) sums: the FSDP2-on-CPU test trains with "
                     "2x gradients (test_training.py::test_fsdp2_matches_ddp_resumes_and_writes_portable_checkpoints)"),
    # Host-side TMA descriptors (kernels/mixed_lora.py, sm_90 tables) need 3.4; torch 2.8 pins triton 3.4.0, torch
    # 2.9 triton 3.5.x. The CPU interpreter needs 3.7 (ops.MIN_INTERPRETER_TRITON: older ones are refused by name and
    # the interpreter tests skip), so with torch < 2.12 the interpreter suite does not run at all.
    "triton": ("3.4", "host-side TMA descriptors (triton.tools.tensor_descriptor) used by kernels/mixed_lora.py"),
    # 0.32-0.34: no FluxKontextPipeline (demo.py:56, flux.py:871, training.py:920; first in 0.35.0);
    # 0.35.0-0.35.1 import FLAX_WEIGHTS_NAME from transformers.utils, gone in transformers 5 (pipeline_flux_kontext);
    # 0.35.2: library and Kontext work, but no ContextParallelConfig / ModelMixin.enable_parallelism (0.36: README's
    # context parallelism, parallel.py, tests/context_parallel_worker.py, test_readme's API-name check);
    # 0.36-0.39: no diffusers.models._modeling_parallel.TensorParallelConfig, which test_parallel.py and
    # test_parallel_demo_guards.py import for the tensor-parallel refusal (parallel.py tolerates its absence).
    "diffusers": ("0.40.0", "TensorParallelConfig (0.40), enable_parallelism / ContextParallelConfig (0.36), "
                            "FluxKontextPipeline working with transformers 5 (0.35.2)"),
    # 5.0.0: CLIPVisionTransformer(..., output_hidden_states=True).hidden_states is None, so every patch query mode
    # (flux.py:733 AnalogyEncoder.patch_tokens; the official "paa'b" modes) raises TypeError; fixed in 5.2.0.
    # 5.0.0: no transformers.initialization.no_tie_weights (test_concurrency.py monkeypatches it; 5.1.0).
    # 5.2.0-5.9.0: with the repository root on sys.path (python started in a clone) the top-level kernels/ folder
    # is found as the PyPI package 'kernels' with version 'N/A', and is_kernels_available() raises InvalidVersion
    # (test_packaging.py::test_repo_root_imports_diffusers_flux_and_transformers); fixed in 5.10.1 (5.10.0 was
    # never released).
    "transformers": ("5.10.1", "hidden_states None from the CLIP vision tower below 5.2 (flux.py:733); "
                               "is_kernels_available() raises for the repo's kernels/ folder below 5.10.1"),
    # < 1.6: FullyShardedDataParallelPlugin has no fsdp_version, so no FSDP2 (training.py:958 refuses FSDP1);
    # 1.6-1.7: fsdp2_prepare_model ignores TRANSFORMER_BASED_WRAP (the plugin's policy is a functools.partial, not
    # recognised), the blocks are not wrapped and the trainer warns "not inside a wrapped transformer block"
    # (training.py:1011; test_training.py::test_fsdp2_matches_ddp_resumes_and_writes_portable_checkpoints).
    # DDP and single-process training work from 1.0.0.
    "accelerate": ("1.8.0", "FSDP2 (fsdp_version) from 1.6, its transformer-block auto-wrap from 1.8"),
    # 0.45.0: imports triton.ops (gone since Triton 3.2), so importing bitsandbytes (and diffusers' quantizers)
    # fails with any torch >= 2.8; 0.45.1-0.49.2: no CPU kernels for the 8-bit optimizers
    # (NameError str2optimizer32bit / "All input tensors need to be on the same GPU"), so the default
    # --optimizer adamw8bit (training.py:1142 _make_optimizer), the demo and the CPU training tests fail; the CPU
    # optimizer_update_8bit_blockwise kernel is first registered in 0.50.0. (GPU-only use may work from 0.45.1:
    # not tested, no GPU.)
    "bitsandbytes": ("0.50.0", "AdamW8bit (the trainer's default optimizer) steps on CPU only from 0.50.0; "
                               "0.45.0 imports triton.ops"),
    # transformers 5.x itself requires >= 0.4.3 (0.4.0-0.4.2 do not resolve with it);
    # < 0.6.1: an I/O error reads "IoError(Os { code: 27, ... })", not "(os error 27)", so _files.py:60
    # _errno_behind finds no errno and a full disk / EFBIG while saving escapes as SafetensorError instead of an
    # OSError naming the file (model.py:765; test_write_failures.py::test_real_os_write_failures_...);
    # < 0.8.0: save_file builds the whole file in memory: every save needs one more copy of the checkpoint
    # (test_memory_audit.py save / checkpoint-write bounds, eight tests; the README's memory table is measured
    # with 0.8.0).
    "safetensors": ("0.8.0", "saves need an extra in-memory copy below 0.8 (memory audit); SafetensorError "
                             "instead of OSError on a full disk below 0.6.1; transformers 5 needs >= 0.4.3"),
    # 0.1.4 is the newest release: nothing to lower.
    "lpips": ("0.1.4", "the newest release (the evaluation's LPIPS metric)"),
    # 6.0 has no wheels for Python >= 3.12 and its sdist no longer builds ("AttributeError: cython_sources" with
    # Cython 3), so `pip install pyyaml==6.0` fails on 3.12 / 3.13 (6.0.1 has 3.12 wheels and an sdist that builds on
    # 3.13; 6.0.2 has 3.13 wheels). 6.0 works on 3.10 / 3.11.
    "pyyaml": ("6.0.1", "pyyaml 6.0 does not install on Python 3.12+ (no wheel, sdist fails with Cython 3)"),
    # diffusers >= 0.35 refuses to import with peft < 0.17 installed (ImportError "peft>=0.17.0 is required",
    # diffusers/utils/constants.py dep_version_check); peft 0.17.x imports transformers.HybridCache, gone in
    # transformers 5 (diffusers.loaders.peft fails to import).
    "peft": ("0.18.0", "diffusers >= 0.35 needs peft >= 0.17; peft 0.17 imports HybridCache (gone in transformers 5)"),
    # 0.2.7 is the newest release: nothing to lower.
    "optimum-quanto": ("0.2.7", "the newest release (--quantize-base qfloat8)"),
    # 0.10.0 (diffusers' GGUF quantizer's own floor) to 0.17.0 import sentencepiece, which they do not declare:
    # `import gguf` fails without it (every GGUF test of test_quantization_backends_audit.py skips or errors).
    "gguf": ("0.17.1", "gguf < 0.17.1 imports sentencepiece without declaring it (the GGUF audit tests)"),
}

#: declared lower bounds deliberately not audited
NOT_AUDITED = {
    "pytest": "the test runner (test extra), not used by the package",
}

#: the tests that failed below the floors, rerun at the declared lower bounds by the smoke test (the slow FSDP2 test
#: is the accelerate floor's only test; torch's one needs another torch and is not rerun)
FLOOR_TESTS = [
    "tests/test_flux_wiring.py",  # diffusers: FluxKontextPipeline with transformers 5
    "tests/test_warnings_audit.py",  # diffusers 0.40-0.41: a load with torch_dtype= warns (we pass dtype=)
    "tests/test_quantization_backends_audit.py",  # gguf: sentencepiece imported below 0.17.1
    "tests/test_official_query.py::test_patch_modes_pool_max",  # transformers: CLIP hidden_states
    "tests/test_concurrency.py::test_clip_loads_from_two_threads_leave_transformers_weight_tying_on",  # transformers
    "tests/test_packaging.py::test_repo_root_imports_diffusers_flux_and_transformers",  # transformers: kernels probe
    "tests/test_parallel_demo_guards.py",  # diffusers: TensorParallelConfig, ContextParallelConfig
    "tests/test_readme.py::test_every_api_name_in_the_prose_exists",  # diffusers: enable_parallelism
    "tests/test_write_failures.py::test_real_os_write_failures_are_oserrors_naming_the_file",  # safetensors
    "tests/test_memory_audit.py::test_save_in_the_layers_dtype_copies_nothing",  # safetensors: no extra copy
    "tests/test_training.py::test_quantized_base_trains_through_the_delta_only_path",  # bitsandbytes on CPU
    "tests/test_training.py::test_qfloat8_base_trains_through_the_delta_only_path",  # optimum-quanto
    "tests/test_training.py::test_fsdp2_matches_ddp_resumes_and_writes_portable_checkpoints",  # accelerate FSDP2
]

#: installed as they are here, not at their lower bounds, by the smoke test: torch and triton (gigabytes; their
#: floors were checked by hand) and the test runner
SMOKE_FROM_HERE = {"torch", "triton", "pytest", "pytest-benchmark"}

PIP_OPTIONS = ["--disable-pip-version-check", "--timeout", "30", "--retries", "1"]


def _load_toml(text: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            from pip._vendor import tomli as tomllib  # pip vendors it on Python 3.10
    return tomllib.loads(text)


def _project() -> dict:
    return _load_toml(PYPROJECT.read_text())["project"]


def _requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for every dependency and every extra's dependency."""
    project = _project()
    found = [("dependencies", Requirement(text)) for text in project.get("dependencies", [])]
    for extra, texts in project.get("optional-dependencies", {}).items():
        found += [(f"optional-dependencies.{extra}", Requirement(text)) for text in texts]
    return found


def _lower_bound(req: Requirement):
    """The highest lower bound the specifier sets (>=, >, ==, ~=, ===), or None."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=", "===")
              and "*" not in s.version]
    return max(bounds) if bounds else None


def _declared(name: str) -> list[tuple[str, Requirement]]:
    return [(where, req) for where, req in _requirements() if canonicalize_name(req.name) == canonicalize_name(name)]


def _applies_here(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(dict(default_environment(), extra=""))


# ------------------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("name", sorted(FLOORS))
def test_declared_lower_bound_is_not_below_the_lowest_working_version(name):
    floor, reason = FLOORS[name]
    declared = _declared(name)
    assert declared, f"{name} is no longer declared in {PYPROJECT}: update FLOORS in this file"
    for where, req in declared:
        bound = _lower_bound(req)
        assert bound is not None, f"{PYPROJECT.name} [{where}] '{req}' has no lower bound; the lowest version " \
                                  f"found to work is {floor}: {reason}"
        assert bound >= Version(floor), (
            f"{PYPROJECT.name} [{where}] declares '{req}', but {name} below {floor} does not work: {reason} "
            f"(raise the bound to >={floor})")


def test_every_declared_lower_bound_is_audited():
    unaudited = sorted({str(req) for _, req in _requirements() if _lower_bound(req) is not None
                        and canonicalize_name(req.name) not in {canonicalize_name(n) for n in [*FLOORS, *NOT_AUDITED]}})
    assert not unaudited, f"lower bounds with no entry in FLOORS (find the lowest working version): {unaudited}"


def test_requires_python_is_not_below_the_oldest_python_run():
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(_project()["requires-python"])
    lows = [Version(s.version) for s in spec if s.operator in (">=", ">", "~=", "==")]
    assert lows and max(lows) >= Version(PYTHON_FLOOR), (
        f"requires-python '{spec}' admits Pythons older than {PYTHON_FLOOR}, the oldest the suite was run with")


# ------------------------------------------------------------------------------------------------------- slow
def _pip(*args, python=None, timeout=900) -> subprocess.CompletedProcess:
    """``python -m pip`` of this environment (``--python`` another interpreter), output with pip's notices about
    ignored find-links locations dropped."""
    target = ["--python", str(python)] if python else []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    proc = subprocess.run([sys.executable, "-m", "pip", *target, *args, *PIP_OPTIONS], capture_output=True,
                          text=True, timeout=timeout, env=env)
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)
    return proc


def _need_an_index():
    probe = _pip("index", "versions", "pyyaml", timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"pip reaches no package index here: {probe.stderr.strip()[-300:]}")


def _skip_if_the_index_lacks_a_pin(proc: subprocess.CompletedProcess):
    """A pin that the reachable index does not list (an offline mirror) is no finding of this audit."""
    missing = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)==([^\s;]+)", proc.stderr)
    if missing:
        name, version = missing.groups()
        listed = _pip("index", "versions", name, timeout=300)
        if listed.returncode != 0 or version not in re.split(r"[\s,]+", listed.stdout):
            pytest.skip(f"the reachable package index has no {name}=={version}")


def _pins(skip=frozenset()) -> list[str]:
    """``name==lower bound`` (with its marker) for every declared requirement with a lower bound, ``name`` for the
    others; one entry per name (the highest bound); none for ``skip``."""
    pins = {}
    for _, req in _requirements():
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        bound = _lower_bound(req)
        old = pins.get(name)
        if old is None or (bound is not None and (old[0] is None or bound > old[0])):
            marker = f"; {req.marker}" if req.marker else ""
            pins[name] = (bound, f"{req.name}{'' if bound is None else f'=={bound}'}{marker}")
    return [text for _, text in pins.values()]


def _metadata_of_pins(report: Path, pins) -> list[tuple[str, str, list, object]]:
    """(name, version, requires_dist, requires_python) of every pinned package: from pip's report where pip would
    install it, from this environment where the pinned version is installed already."""
    found = {canonicalize_name(item["metadata"]["name"]): (item["metadata"]["name"], item["metadata"]["version"],
                                                           item["metadata"].get("requires_dist") or [],
                                                           item["metadata"].get("requires_python"))
             for item in json.loads(report.read_text())["install"]}
    for pin in pins:
        name = canonicalize_name(Requirement(pin).name)
        if name not in found:
            dist = importlib.metadata.distribution(name)
            found[name] = (name, dist.version, dist.requires or [], dist.metadata.get("Requires-Python"))
    return list(found.values())


@pytest.mark.slow
def test_the_declared_lower_bounds_resolve_together(tmp_path):
    """``pip install --dry-run`` of every declared lower bound pinned ``==`` (here: torch and triton as installed,
    so that no gigabyte wheel is fetched); then the torch / triton requirements of everything pip resolved must admit
    their declared lower bounds, and every pinned release must admit the oldest Python that requires-python admits.
    The bounds of the original pyproject (diffusers 0.32, transformers 5.0, safetensors 0.4) did not resolve:
    transformers 5.0 requires safetensors >= 0.4.3; a diffusers bound of 0.42 would need requires-python >= 3.11."""
    from packaging.specifiers import SpecifierSet

    _need_an_index()
    report = tmp_path / "report.json"
    pins = _pins(skip={"torch", "triton"})
    proc = _pip("install", "--dry-run", "--quiet", "--report", str(report), *pins)
    if proc.returncode != 0:
        _skip_if_the_index_lacks_a_pin(proc)
    assert proc.returncode == 0, f"the declared lower bounds do not install together:\n{pins}\n{proc.stderr[-4000:]}"
    floors_here = {name: _lower_bound(req) for name in ("torch", "triton") for _, req in _declared(name)
                   if _applies_here(req)}
    oldest_python = min(Version(s.version) for s in SpecifierSet(_project()["requires-python"])
                        if s.operator in (">=", ">", "~=", "=="))
    env = dict(default_environment(), extra="")
    conflicts = []
    bounded = {canonicalize_name(Requirement(pin).name) for pin in pins if _lower_bound(Requirement(pin))}
    for name, version, requires, requires_python in _metadata_of_pins(report, pins):
        if canonicalize_name(name) in bounded and requires_python and not SpecifierSet(requires_python).contains(
                oldest_python, prereleases=True):  # (an unbounded one resolves to an older release there)
            conflicts.append(f"{name} {version} requires Python '{requires_python}', requires-python admits "
                             f"{oldest_python}")
        for text in requires:
            req = Requirement(text)
            dep = canonicalize_name(req.name)
            if dep in floors_here and floors_here[dep] is not None and (req.marker is None or req.marker.evaluate(env)):
                if not req.specifier.contains(floors_here[dep], prereleases=True):
                    conflicts.append(f"{name} {version} requires '{req}', declared {dep} >={floors_here[dep]}")
    assert not conflicts, conflicts


def _layered_venv(root: Path) -> Path:
    """A virtual environment without pip whose ``.pth`` file puts this environment's site-packages after its own
    (their ``.pth`` files processed too: the editable lorweb_fast); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=300).stdout.strip()
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(own, "_lorweb_fast_audit_base.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in here))
    return python


def _installed_here(names) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


@pytest.mark.slow
def test_the_declared_lower_bounds_run_the_demo_and_the_floor_tests(tmp_path):
    """The declared lower bounds installed (a layer over this environment: see the module docstring), then
    ``lorweb-fast demo`` and ``FLOOR_TESTS`` run with them."""
    _need_an_index()
    python = _layered_venv(tmp_path / "venv")
    pins = _pins(skip=SMOKE_FROM_HERE)
    names = [canonicalize_name(Requirement(p).name) for p in pins]
    before = _installed_here(names)
    proc = _pip("install", "--quiet", *pins, python=python)
    if proc.returncode != 0:
        _skip_if_the_index_lacks_a_pin(proc)
    assert proc.returncode == 0, f"the declared lower bounds do not install over this environment:\n{proc.stderr}"
    assert _installed_here(names) == before, "pip changed this environment instead of the layer"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    seen = json.loads(subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True,
                                     env=env, timeout=300).stdout)
    for pin in pins:
        req = Requirement(pin)
        bound = _lower_bound(req)
        if bound is not None and _applies_here(req):
            assert Version(seen[canonicalize_name(req.name)]) == bound, (req.name, seen)

    demo = subprocess.run([str(python), "-m", "lorweb_fast", "demo", "--out", str(tmp_path / "demo"), "--steps", "2",
                           "--samples", "4", "--inference-steps", "2", "--quiet"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert demo.returncode == 0, f"lorweb-fast demo at the declared lower bounds {seen}:\n{demo.stderr[-4000:]}"
    for name in ("b_prime.png", "analogy.png", "loss.png", "summary.json"):
        assert (tmp_path / "demo" / name).is_file(), name

    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                            "-c", str(REPO / "pyproject.toml"), *[str(REPO / t) for t in FLOOR_TESTS]],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert tests.returncode == 0, f"FLOOR_TESTS at the declared lower bounds {seen}:\n{tests.stdout[-6000:]}"
