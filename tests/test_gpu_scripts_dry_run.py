"""End-to-end dry runs of benchmarks/run_on_gpu.sh and benchmarks/run_full_on_gpu.sh on a CPU machine.

A GPU session is rare and short: a wrong path, a misnamed output file, a failing tar, an argument a benchmark's
argparse refuses or a step limit past the budget there costs scarce device minutes. Here both scripts run for real
(bash, timeout, tar, mktemp, ...) with a fake ``PYTHON`` that answers the GPU probes as a GPU machine would, logs
every call, and writes the files each benchmark would write at the paths its arguments name. Afterwards every logged
call is checked against the real argparse parser of the script it names (and pip's own parser for the installs), and
OUTDIR, steps.txt and the archives are checked against the README. CPU only, no network, a few seconds per run.
"""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from unittest import mock

import pytest

from lorweb_fast.testing import load_module_from_file

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
README = REPO / "README.md"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the GPU scripts need bash and coreutils timeout")

# The fake interpreter: answers `-c`/stdin probes with a fake torch (CUDA visible, sm_90), logs its argv and the
# environment the scripts are meant to pass on, does nothing for pip, prints a pytest summary, and writes what each
# benchmark writes (same names, same rules as the real scripts; the test checks the names against the real parsers).
FAKE_PY = r'''
import json, os, sys, time, types
from pathlib import Path

ENV_KEYS = ("LORWEB_COMMIT", "PYTHONPATH", "PYTHONUNBUFFERED", "TORCH_CUDA_ARCH_LIST",
            "LORWEB_FAST_FORCE_CUDA_BUILD", "MAX_JOBS")
argv = sys.argv[1:]
code = sys.stdin.read() if argv[:1] == ["-"] else argv[1] if argv[:1] == ["-c"] and len(argv) > 1 else None
entry = {"argv": argv, "cwd": os.getcwd(), "t": time.time(), "env": {k: os.environ.get(k) for k in ENV_KEYS},
         "stdin": code if argv[:1] == ["-"] else None, "written": []}


def log():
    with open(os.environ["FAKE_PY_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def opt(name):
    if name not in argv or argv.index(name) + 1 >= len(argv):
        log()
        sys.exit(f"fake python: {name} missing in {argv}")
    return argv[argv.index(name) + 1]


def write(path, text):
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    entry["written"].append(str(p))


def commit():  # as benchmarks/bench_mixed_lora.py git_commit() with LORWEB_COMMIT set
    c = os.environ.get("LORWEB_COMMIT")
    return c[:12] + " (LORWEB_COMMIT)" if c else "unknown"


def fake_modules():
    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                                  total_memory=140 * 2**30)
    torch = types.ModuleType("torch")
    torch.__version__ = "2.11.0+cu130"
    torch.cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                       get_device_capability=lambda device=None: (9, 0),
                                       get_device_properties=lambda device=None: props,
                                       get_device_name=lambda device=None: props.name)
    torch.version = types.SimpleNamespace(cuda="13.0")
    torch.backends = types.SimpleNamespace(cudnn=types.SimpleNamespace(version=lambda: 91002))
    triton = types.ModuleType("triton")
    triton.__version__ = "3.6.0"
    lf = types.ModuleType("lorweb_fast")  # the real package folder, so find_spec('lorweb_fast.aot') is truthful
    lf.__path__ = [str(Path(os.environ["FAKE_REPO"]) / "lorweb_fast")]
    lf.backend_status = lambda: {"torch": "available", "triton": "available", "cuda": "available"}
    mods = {"torch": torch, "triton": triton, "lorweb_fast": lf}
    for name in os.environ.get("FAKE_PLUGINS", "").split():
        mods[name] = types.ModuleType(name)
    return mods


if code is not None:
    log()
    for name in ("xdist", "pytest_timeout"):  # as on the lent H200 when FAKE_PLUGINS names them, else absent
        sys.modules[name] = None
    sys.modules.update(fake_modules())
    exec(compile(code, "<fake python -c>", "exec"), {"__name__": "__main__"})
    sys.exit(0)

mod = argv[1] if argv[:1] == ["-m"] and len(argv) > 1 else None
script = Path(argv[0]).name if argv and argv[0].endswith(".py") else None
if mod == "pip":
    pass
elif mod == "pytest":
    until = float(os.environ.get("FAKE_PYTEST_UNTIL", "0"))  # lets the budget run use up time in a known step
    while time.time() < until:
        time.sleep(0.05)
    print("........................................................................ [100%]")
    print("412 passed, 31 skipped in 98.76s (0:01:38)")
elif mod == "lorweb_fast.aot":
    out = Path(opt("--out"))
    write(out / "report.json", json.dumps({"arch": int(opt("--arch")), "triton": "3.6.0", "kernels": []}))
    write(out / "shrink-0.ptx", "// fake ptx\n")
elif script == "kernel_resources.py":
    write(opt("--out"), json.dumps({"device": "NVIDIA H200", "triton_kernels": [], "cuda_extension_kernels": []}))
elif script in ("bench_mixed_lora.py", "bench_flux_block.py"):
    d, stem = Path(opt("--out-dir")), opt("--tag")
    write(d / f"{stem}.json", json.dumps({"commit": commit(), "complete": True, "results": []}) + "\n")
    write(d / f"{stem}.md", f"# {stem}\n\ncommit {commit()}\n")
    if "--no-profile" not in argv:  # --profile defaults to on with a GPU
        write(d / f"{stem}_profile.txt", "kernel table\n")
    if script == "bench_mixed_lora.py":
        write(d / f"{stem}.png", "png\n")
elif script == "host_overhead.py":
    out = Path(opt("--out"))
    write(out.with_suffix(".json"), json.dumps({"commit": commit()}) + "\n")
    write(out.with_suffix(".md"), "host overhead\n")
    if "--profile" in argv:
        write(str(out) + "_profile.txt", "cProfile\n")
elif script == "tune_kernels.py":
    out = Path(opt("--out"))
    write(out, json.dumps({"entries": []}) + "\n")
    write(out.with_name(out.stem + "_summary.json"), json.dumps({"roles": []}) + "\n")
else:
    log()
    sys.exit(f"fake python: unhandled invocation {argv}")
log()
print(f"fake python {script or mod}: wrote {len(entry['written'])} files")
'''

NVIDIA_SMI = """#!/bin/sh
echo "nvidia-smi $*" >> "$FAKE_TOOL_LOG"
echo "name, driver_version, clocks.current.sm [MHz], clocks.max.sm [MHz], clocks.current.memory [MHz], \
power.limit [W], temperature.gpu"
echo "NVIDIA H200, 580.65.06, 345 MHz, 1980 MHz, 3201 MHz, 700.00 W, 31"
"""

# logs each step's limit and the wall time it was started at, then runs the real timeout
TIMEOUT = """#!/bin/bash
printf '%s\\t%s\\t%s\\t%s\\n' "$(date +%s.%N)" "$1" "$2" "${*:3}" >> "$FAKE_TIMEOUT_LOG"
exec {real} "$@"
"""

# fails (exit 2, as GNU tar on a write error) when asked to write the archive named by FAKE_TAR_FAIL; else the real tar
TAR = """#!/bin/bash
for a in "$@"; do
  if [ -n "${{FAKE_TAR_FAIL:-}}" ] && [ "$(basename -- "$a")" = "$FAKE_TAR_FAIL" ]; then
    printf 'partial' > "$a"  # what a full disk leaves: the start of the archive
    echo "tar: $a: Cannot write: No space left on device" >&2; exit 2
  fi
done
exec {real} "$@"
"""

# a bare interpreter or pip on PATH must not be what the scripts call (they use "$PY")
FORBIDDEN = """#!/bin/sh
echo "$0 $*" >> "$FAKE_TOOL_LOG"
echo "called $0 directly instead of \\$PYTHON" >&2
exit 97
"""


def readme_files_of_run_on_gpu() -> list:
    text = README.read_text()
    m = re.search(r"OUTDIR gets at most 8 files:(.*?)`run_full_on_gpu\.sh`", text, re.S)
    assert m, "README no longer says which 8 files run_on_gpu.sh leaves"
    return re.findall(r"`([^`]+)`", m.group(1))


def header_files_of(script: str) -> list:
    """The output files a script's header comment names (run_full_on_gpu.sh: 'OUTDIR receives: a, b, ...')."""
    text = (BENCH_DIR / script).read_text()
    m = re.search(r"^# OUTDIR receives: (.*?)\.$", text, re.M)
    assert m, f"{script} no longer lists its output files"
    return [f.strip() for f in m.group(1).split(",")]


def make_fakes(tmp_path: Path, *, plugins: str = "xdist pytest_timeout", pytest_until: float = 0.0,
               tar_fail: str = "") -> dict:
    """The fake interpreter and tools in tmp_path; the environment to run a script with. ``plugins``: the pytest
    plugins the machine has; ``pytest_until``: the fake test step returns only at this
    wall-clock time (to spend a known part of a small budget); ``tar_fail``: an archive name tar fails to write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "fakepy.py").write_text(FAKE_PY)
    py = bin_dir / "fake-python"
    py.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S '{tmp_path / 'fakepy.py'}' \"$@\"\n")
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "timeout").write_text(TIMEOUT.replace("{real}", shutil.which("timeout")))
    (bin_dir / "tar").write_text(TAR.replace("{{", "{").replace("}}", "}").replace("{real}", shutil.which("tar")))
    for name in ("python", "python3", "pip", "pip3"):
        (bin_dir / name).write_text(FORBIDDEN)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp),
            "LANG": "C.UTF-8", "PYTHON": str(py), "LORWEB_COMMIT": COMMIT, "FAKE_REPO": str(REPO),
            "FAKE_PY_LOG": str(tmp_path / "python.log"), "FAKE_TOOL_LOG": str(tmp_path / "tools.log"),
            "FAKE_TIMEOUT_LOG": str(tmp_path / "timeout.log"), "FAKE_PLUGINS": plugins,
            "FAKE_PYTEST_UNTIL": str(pytest_until), "FAKE_TAR_FAIL": tar_fail}


def run_script(script: str, tmp_path: Path, *args, **fakes):
    """Run ``script`` from the repository root with the fakes; ``pytest_until`` is in seconds from its start."""
    if "pytest_until" in fakes:
        fakes["pytest_until"] += time.time()
    env = make_fakes(tmp_path, **fakes)
    out = tmp_path / "OUT"
    # the repository as the scripts see it, without the wheels a developer may have collected in this checkout
    # (shared/wheels, .whl: git-ignored, found by default), so that "no --wheels" means no carried wheels
    view = tmp_path / "repo"
    view.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("shared", ".whl"):
            (view / entry.name).symlink_to(entry)
    env["FAKE_REPO"] = str(view)
    t0 = time.time()
    res = subprocess.run(["bash", f"benchmarks/{script}", str(out), *args], cwd=view, env=env,
                         capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in (tmp_path / "python.log").read_text().splitlines()]
    for call in calls:  # the view is the repository root (check_calls)
        call["cwd"] = str(REPO) if Path(call["cwd"]) == view else call["cwd"]
    limits = []
    if (tmp_path / "timeout.log").exists():
        for line in (tmp_path / "timeout.log").read_text().splitlines():
            when, kill_after, limit, cmd = line.split("\t")
            assert kill_after == "--kill-after=5", line
            limits.append((float(when) - t0, int(limit), cmd))
    tools = (tmp_path / "tools.log").read_text() if (tmp_path / "tools.log").exists() else ""
    assert "directly instead of $PYTHON" not in res.stderr + res.stdout, res.stderr  # see FORBIDDEN
    assert not re.search(r"^\S*/(python3?|pip3?) ", tools, re.M), tools
    return res, out, calls, limits, tools


def steps_of(out: Path) -> list:
    return [line.split(": ")[0] for line in (out / "steps.txt").read_text().splitlines()]


# ------------------------------------------------------------------------------------- the real parsers
class _Parsed(Exception):
    def __init__(self, ns):
        super().__init__("parsed")
        self.ns = ns


@functools.lru_cache(maxsize=None)
def _module(name: str):
    if name.startswith("lorweb_fast"):
        return importlib.import_module(name)
    return load_module_from_file(BENCH_DIR / f"{name}.py", f"dry_run_{name}")


def real_parse(name: str, args: list) -> argparse.Namespace:
    """The namespace the real script's own parser makes of ``args`` (built inside its ``main``: parse_args is
    stopped right after parsing, before anything runs); a refused argument fails the test."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop), contextlib.redirect_stderr(err):
        try:
            _module(name).main(list(args))
        except _Parsed as parsed:
            return parsed.ns
        except SystemExit as exc:
            pytest.fail(f"{name} refuses {args} (exit {exc.code}): {err.getvalue()}")
    pytest.fail(f"{name}.main({args}) never parsed its arguments")


_PIP_PARSE = """
import json, sys
try:
    from pip._internal.commands import create_command
except ImportError:
    sys.exit(3)
opts, rest = create_command("install").parse_args(json.loads(sys.argv[1]))
print(json.dumps([vars(opts), rest], default=str))
"""


def real_pip_parse(args: list):
    """pip's own option parser for `pip install ...`: (options namespace, positional rest), or None when this
    interpreter has no pip. Parsed in a child interpreter: even looking pip up here (find_spec) switches
    setuptools' distutils shim off for the rest of the test process, and torch.compile's C++ builds in later tests
    then fail."""
    assert args[:1] == ["install"], args
    res = subprocess.run([sys.executable, "-c", _PIP_PARSE, json.dumps(list(args[1:]))], capture_output=True,
                         text=True)
    if res.returncode == 3:
        return None
    if res.returncode != 0:
        pytest.fail(f"pip refuses install {args[1:]} (exit {res.returncode}): {res.stderr}")
    opts, rest = json.loads(res.stdout)
    return argparse.Namespace(**opts), rest


def expected_written(name: str, ns) -> set:
    """The files the real script writes for ``ns`` (the fake must have written exactly these)."""
    if name == "lorweb_fast.aot":
        return {str(Path(ns.out) / "report.json"), str(Path(ns.out) / "shrink-0.ptx")}
    if name == "kernel_resources":
        return {str(ns.out)}
    if name in ("bench_mixed_lora", "bench_flux_block"):
        d = Path(ns.out_dir)
        files = {d / f"{ns.tag}.json", d / f"{ns.tag}.md"}
        if ns.profile is not False:
            files.add(d / f"{ns.tag}_profile.txt")
        if name == "bench_mixed_lora":
            files.add(d / f"{ns.tag}.png")
        return {str(f) for f in files}
    if name == "host_overhead":
        out = Path(ns.out)
        return {str(out.with_suffix(".json")), str(out.with_suffix(".md"))} | (
            {str(out) + "_profile.txt"} if ns.profile else set())
    if name == "tune_kernels":
        out = Path(ns.out)
        return {str(out), str(_module("tune_kernels").summary_path(out, True))}
    raise AssertionError(name)


def check_calls(calls: list) -> dict:
    """Every logged interpreter call: its file or module exists in the checkout, and its arguments pass the real
    parser; the files the fake wrote are those the real script names. Returns {name: [(call, namespace)]}."""
    parsed = {}
    for call in calls:
        argv, cwd = call["argv"], Path(call["cwd"])
        assert cwd == REPO, f"run from {cwd}, not the repository root: {argv}"
        if argv[0] in ("-c", "-"):
            continue
        if argv[:2] == ["-m", "pip"]:
            name, ns = "pip", real_pip_parse(argv[2:])
        elif argv[:2] == ["-m", "pytest"]:
            name, ns = "pytest", None
            assert argv[argv.index("-m", 2) + 1] == "gpu" and (cwd / argv[-1]).is_dir(), argv
        elif argv[0] == "-m":
            name = argv[1]
            assert importlib.util.find_spec(name) is not None, f"no module {name}"
            ns = real_parse(name, argv[2:])
        else:
            script = cwd / argv[0]
            assert script.is_file() and script.parent == BENCH_DIR, f"no script {script}"
            name = script.stem
            ns = real_parse(name, argv[1:])
        if ns is not None and name != "pip":
            assert set(call["written"]) == expected_written(name, ns), (name, call["written"])
        parsed.setdefault(name, []).append((call, ns))
    return parsed


def tar_names(path: Path) -> set:
    with tarfile.open(path) as tar:
        return {n for n in (m.name.removeprefix("./") for m in tar.getmembers() if m.isfile())}


def check_limits(limits: list, budget: int):
    """No step may run past the overall budget (its start plus its limit plus --kill-after's 5 s)."""
    assert limits
    for started, limit, cmd in limits:
        assert limit >= 5 and started + limit + 5 <= budget + 1, (started, limit, cmd, budget)


# ------------------------------------------------------------------------------------- the tests
def test_run_on_gpu_dry_run(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "diffusers-0.36.0-py3-none-any.whl").write_bytes(b"fake wheel")
    res, out, calls, limits, tools = run_script("run_on_gpu.sh", tmp_path, "--wheels", str(wheels))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log

    # OUTDIR: exactly the 8 files of the README (which the script's header lists too)
    documented = readme_files_of_run_on_gpu()
    assert sorted(documented) == sorted(["run.log", "steps.txt", "pytest_gpu.txt", "resources.json", "aot.tar.gz",
                                         "bench_target.md", "bench_target.tar.gz", "tune.tar.gz"])
    header = (BENCH_DIR / "run_on_gpu.sh").read_text()
    assert all(f in header for f in documented)
    assert sorted(p.name for p in out.iterdir()) == sorted(documented)
    assert all(p.is_file() for p in out.iterdir())

    # every step ran, with exit status 0
    lines = (out / "steps.txt").read_text().splitlines()
    assert all(re.search(r": rc=0 in \d+s \(limit \d+s\)$", line) for line in lines), lines
    names = steps_of(out)
    assert [re.sub(r" .*", "", n) for n in names] == ["install", "install", "pytest", "AOT", "loaded-kernel",
                                                      "target", "host", "tuning"], names
    assert names[3] == "AOT report (sm_90)" and names[2] == "pytest -m gpu --maxfail 25 -n 4 --timeout 150"
    check_limits(limits, 530)
    assert len(limits) == len(lines)

    # the log: device, versions, the nvidia-smi query, the steps and the file count
    run_log = (out / "run.log").read_text()
    assert "nvidia-smi --query-gpu=" in tools and "NVIDIA H200, 580.65.06" in run_log
    assert "GPU NVIDIA H200  sm_90  132 SMs" in run_log and "torch 2.11.0+cu130  CUDA 13.0" in run_log
    assert "triton 3.6.0" in run_log and "backend cuda: available" in run_log
    assert f"8 files in {out} (limit 8)" in run_log and "some steps failed" not in run_log
    assert "412 passed" in (out / "pytest_gpu.txt").read_text() and "412 passed" in run_log

    # every interpreter call: a real file or module, arguments the real parser accepts, outputs where it says
    parsed = check_calls(calls)
    assert sorted(parsed) == sorted(["pip", "pytest", "lorweb_fast.aot", "kernel_resources", "bench_mixed_lora",
                                     "host_overhead", "tune_kernels"])
    (wheel_call, wheel_opts), (pkg_call, pkg_opts) = parsed["pip"]
    if wheel_opts is not None:
        opts, rest = wheel_opts
        assert opts.target_dir and opts.no_index and opts.ignore_dependencies
        assert rest == [str(wheels / "diffusers-0.36.0-py3-none-any.whl")]
        opts, rest = pkg_opts
        assert opts.editables == ["."] and opts.no_index and opts.ignore_dependencies and not opts.build_isolation
        assert rest == []
    assert pkg_call["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0" and pkg_call["env"]["LORWEB_FAST_FORCE_CUDA_BUILD"] == "1"
    site = str(tmp_path / "tmp" / "lorweb_fast_site")  # the carried wheels' folder is on PYTHONPATH
    for name in ("pytest", "lorweb_fast.aot", "kernel_resources", "bench_mixed_lora", "host_overhead",
                 "tune_kernels"):
        for call, _ in parsed[name]:
            assert call["env"]["PYTHONPATH"].split(":")[0] == site, (name, call["env"])
            assert call["env"]["PYTHONUNBUFFERED"] == "1"
            assert call["env"]["LORWEB_COMMIT"] == COMMIT, name  # the records name the sending checkout

    (_, aot), = parsed["lorweb_fast.aot"]
    assert aot.arch == 90
    (_, bench), = parsed["bench_mixed_lora"]
    configs = _module("bench_mixed_lora").build_configs(bench, on_gpu=True)
    assert [(c["M"], c["in_features"], c["out_features"], c["N"] * c["r"]) for c in configs] == [(8192, 3072, 3072,
                                                                                                 128)]
    assert bench.tag == "bench_target" and bench.profile is True and bench.dtype == "bf16"
    (_, tune), = parsed["tune_kernels"]
    assert tune.kernels == ["shrink_dy", "expand_dx"] and Path(tune.out).name == "sm90.json"
    assert 20 <= tune.budget_s <= 120
    (_, host), = parsed["host_overhead"]
    assert host.profile

    # the archives hold what the steps produced
    assert tar_names(out / "aot.tar.gz") == {"aot/report.json", "aot/shrink-0.ptx"}
    assert tar_names(out / "bench_target.tar.gz") == {
        "bench_target.json", "bench_target.md", "bench_target_profile.txt", "bench_target.png",
        "host_overhead.json", "host_overhead.md", "host_overhead_profile.txt"}
    with tarfile.open(out / "bench_target.tar.gz") as tar:
        record = json.load(tar.extractfile("./bench_target.json"))
        assert tar.extractfile("./bench_target.md").read() == (out / "bench_target.md").read_bytes()
    assert record["commit"] == COMMIT[:12] + " (LORWEB_COMMIT)"
    assert tar_names(out / "tune.tar.gz") == {"tune/sm90.json", "tune/sm90_summary.json"}
    json.loads((out / "resources.json").read_text())
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []  # the work folder is removed


def test_run_on_gpu_dry_run_small_budget(tmp_path):
    """A budget spent in the test step: every later step is recorded as skipped, nothing runs past the budget, and
    the script still ends cleanly with the log, steps.txt and what the steps that ran wrote (exit 1: not all ran)."""
    # the test step returns 12 s after the start, leaving 12 s: under the 10 s reserve plus the 5 s minimum of a
    # step, so every later step is skipped; the steps before it may take up to 7 s (a loaded machine) and the test
    # step still gets its 5 s minimum
    budget = 24
    res, out, calls, limits, _ = run_script("run_on_gpu.sh", tmp_path, "--budget-s", str(budget), plugins="",
                                            pytest_until=12)
    log = res.stdout + res.stderr
    assert res.returncode == 1, log
    assert sorted(p.name for p in out.iterdir()) == ["pytest_gpu.txt", "run.log", "steps.txt"]
    lines = (out / "steps.txt").read_text().splitlines()
    assert [line.split(": ", 1)[1].split(" in ")[0] for line in lines] == ["rc=0", "rc=0"] + ["skipped (budget)"] * 5
    assert steps_of(out)[1] == "pytest -m gpu --maxfail 25"  # no xdist, no pytest-timeout: neither flag
    assert steps_of(out)[-1] == "tuning sweep, backward roles"  # recorded, not only said in the log
    run_log = (out / "run.log").read_text()
    assert "tuning sweep, backward roles: skipped (budget: only" in run_log
    assert "some steps failed, timed out or were skipped" in run_log
    check_limits(limits, budget)
    parsed = check_calls(calls)
    assert sorted(parsed) == ["pip", "pytest"]  # no carried wheels: the package install only
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []


def test_run_full_on_gpu_dry_run(tmp_path):
    res, out, calls, limits, tools = run_script("run_full_on_gpu.sh", tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    documented = header_files_of("run_full_on_gpu.sh")
    assert sorted(documented) == sorted(["run.log", "steps.txt", "bench_full.md", "bench_full.tar.gz",
                                         "flux_block.md", "flux_block.tar.gz"])
    assert sorted(p.name for p in out.iterdir()) == sorted(documented)
    lines = (out / "steps.txt").read_text().splitlines()
    assert all(re.search(r": rc=0 in \d+s \(limit \d+s\)$", line) for line in lines), lines
    assert [re.sub(r" \(.*", "", n) for n in steps_of(out)] == [
        "install lorweb_fast", "FLUX block benchmark", "layer benchmark, full grid"]
    check_limits(limits, 570)
    assert "nvidia-smi --query-gpu=" in tools

    parsed = check_calls(calls)
    assert sorted(parsed) == ["bench_flux_block", "bench_mixed_lora", "pip"]
    (block_call, block), = parsed["bench_flux_block"]
    (grid_call, grid), = parsed["bench_mixed_lora"]
    for call in (block_call, grid_call):
        assert call["env"]["LORWEB_COMMIT"] == COMMIT
    assert block.tag == "flux_block" and grid.tag == "bench_full"
    assert grid.full_grid and grid.compiled_rows == "target" and grid.profile is True
    configs = _module("bench_mixed_lora").build_configs(grid, on_gpu=True)
    assert (configs[0]["M"], configs[0]["in_features"], configs[0]["out_features"]) == (8192, 3072, 3072)
    # each benchmark stops adding rows (and writes its record) well before its step's timeout
    (_, block_limit, _), (_, grid_limit, _) = [lim for lim in limits if "benchmarks/" in lim[2]]
    assert 0 < block.total_budget_s <= block_limit - 30 and 0 < grid.total_budget_s <= grid_limit - 30

    assert tar_names(out / "flux_block.tar.gz") == {"flux_block.json", "flux_block.md", "flux_block_profile.txt"}
    assert tar_names(out / "bench_full.tar.gz") == {"bench_full.json", "bench_full.md", "bench_full_profile.txt",
                                                    "bench_full.png"}
    with tarfile.open(out / "flux_block.tar.gz") as tar:
        assert json.load(tar.extractfile("./flux_block.json"))["commit"].startswith(COMMIT[:12])
        assert tar.extractfile("./flux_block.md").read() == (out / "flux_block.md").read_bytes()
    run_log = (out / "run.log").read_text()
    assert f"6 files in {out}" in run_log
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []


def test_run_on_gpu_records_a_failed_archive(tmp_path):
    """tar failing to write an archive (a full disk) is not silent: the run ends with status 1, steps.txt names the
    archive and its exit status, the truncated archive tar left is removed, and every other file is still there."""
    res, out, calls, _, _ = run_script("run_on_gpu.sh", tmp_path, tar_fail="bench_target.tar.gz")
    log = res.stdout + res.stderr
    assert res.returncode == 1, log
    lines = (out / "steps.txt").read_text().splitlines()
    assert "save bench_target.tar.gz: FAILED rc=2" in lines
    assert all(": rc=0 " in line for line in lines if not line.startswith("save ")), lines
    assert {p.name for p in out.iterdir()} == {"run.log", "steps.txt", "pytest_gpu.txt", "resources.json",
                                               "aot.tar.gz", "bench_target.md", "tune.tar.gz"}
    run_log = (out / "run.log").read_text()
    assert "saving bench_target.tar.gz FAILED (exit 2)" in run_log and "some steps failed" in run_log
    check_calls(calls)


def test_run_full_on_gpu_small_budget_passes_no_negative_budgets(tmp_path):
    """With about a minute left, each benchmark's step still runs and gets --total-budget-s 0 (its first row runs and
    its record is written), never a negative budget, which the benchmarks' parsers refuse."""
    budget = 60
    res, out, calls, limits, _ = run_script("run_full_on_gpu.sh", tmp_path, "--budget-s", str(budget))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    parsed = check_calls(calls)  # the real parsers accept every call
    (_, block), = parsed["bench_flux_block"]
    (_, grid), = parsed["bench_mixed_lora"]
    assert block.total_budget_s == 0 and grid.total_budget_s == 0
    check_limits(limits, budget)
    assert {"flux_block.md", "flux_block.tar.gz", "bench_full.md", "bench_full.tar.gz"} <= {p.name for p in
                                                                                              out.iterdir()}


def test_run_on_gpu_refuses_two_versions_of_a_carried_wheel(tmp_path):
    """Two versions of one package among the carried wheels made the one pip call refuse the whole install
    (ResolutionImpossible: no diffusers there, the block benchmark failing): the script names the package in
    steps.txt and the log, installs none of them (the run ends with status 1), and runs the other steps; the log
    names the commit."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("diffusers-0.36.0-py3-none-any.whl", "diffusers-0.42.1-py3-none-any.whl",
                 "optimum_quanto-0.2.7-py3-none-any.whl"):
        (wheels / name).write_bytes(b"fake wheel")
    res, out, calls, _, _ = run_script("run_on_gpu.sh", tmp_path, "--wheels", str(wheels))
    log = res.stdout + res.stderr
    assert res.returncode == 1, log
    lines = (out / "steps.txt").read_text().splitlines()
    assert f"install carried wheels from {wheels}: skipped (several versions of: diffusers )" in lines
    assert not any("--target" in c["argv"] for c in calls if c["argv"][:3] == ["-m", "pip", "install"])
    assert "target benchmark (bf16, M=8192, 3072->3072)" in steps_of(out)  # the other steps ran
    assert f"commit: {COMMIT}" in (out / "run.log").read_text()
