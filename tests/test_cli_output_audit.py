"""What a Unix user expects of ``lorweb-fast`` (and of ``python -m lorweb_fast.info`` / ``python -m lorweb_fast.aot``)
beyond its own errors: output piped into a reader that has gone (``lorweb-fast data check DIR | head -1``) or into a
full disk ends quietly or with one line (no traceback, no "Exception ignored ... BrokenPipeError" at interpreter
exit), results on stdout and progress bars on stderr, no ANSI escapes when nothing asked for colour, ``--help`` of
every subcommand on stdout with status 0 and without the heavy optional packages, usage errors as one line with
status 2, a real Ctrl-C (SIGINT) as one line with status 130, and ``--version``.

The closed-pipe and full-disk tests pinned defects found by this audit, now fixed (``cli.run_writing_stdout``); the
others pin behaviour that no other test checks. Subprocesses run ``python -m lorweb_fast ...`` without
``PYTHONUNBUFFERED`` (as a user's shell does) unless a test says otherwise; each takes a few seconds (torch's
import). A reader that has gone is modelled exactly: the child's stdout is a pipe whose read end is already closed,
so its first write fails with EPIPE (what ``| head -1`` does once head has exited).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorweb_fast import cli

TIMEOUT = 120
#: statuses common CLIs end with when their reader has gone: 1, 128 + SIGPIPE as a shell shows it, or killed by
#: SIGPIPE (a handler put back to SIG_DFL) as subprocess reports it
BROKEN_PIPE_STATUSES = (1, 128 + signal.SIGPIPE, -signal.SIGPIPE)
SUBCOMMANDS = (["infer"], ["train"], ["data"], ["data", "check"], ["data", "prepare"], ["demo"], ["eval"],
               ["eval", "generate"], ["eval", "score"])


def _env(**extra) -> dict:
    """The environment of a user's shell: buffered stdout, no colour requests, offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONUNBUFFERED", "NO_COLOR", "FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore::DeprecationWarning")
    env.update(extra)
    return env


def _run_into(stdout, args, cwd, **env) -> subprocess.CompletedProcess:
    """``python args`` with ``stdout`` as its stdout (a file descriptor or a file), stderr captured."""
    return subprocess.run([sys.executable, *args], stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=TIMEOUT, cwd=cwd, env=_env(**env))


def _run_into_closed_pipe(args, cwd, **env) -> subprocess.CompletedProcess:
    """``python args | <a reader that has already exited>``."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return _run_into(write_end, args, cwd, **env)
    finally:
        os.close(write_end)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A valid four-sample training folder (the demo's synthetic analogies): ``data check`` reads it in a second."""
    from lorweb_fast import demo

    root = tmp_path_factory.mktemp("cli_output_audit") / "data"
    demo.make_synthetic_analogies(root, 4, seed=0)
    return root


# ------------------------------------------------------------------------------------------- a reader that has gone
@pytest.mark.parametrize("argv", [
    pytest.param(["-m", "lorweb_fast", "--help"], id="lorweb-fast --help"),
    pytest.param(["-m", "lorweb_fast", "train", "--help"], id="lorweb-fast train --help"),
    pytest.param(["-m", "lorweb_fast.aot", "--help"], id="python -m lorweb_fast.aot --help"),
])
def test_help_into_a_closed_pipe_is_quiet(tmp_path, argv):
    """``lorweb-fast --help | head -1``: nothing on stderr (no "Exception ignored ... BrokenPipeError" from the
    interpreter's final flush of stdout), and status 0 (argparse's) or one a broken pipe gives, never Python's 120
    for a failed final flush. ``train --help`` (longer than the pipe buffer: argparse's own write fails, and argparse
    ignores it) is quiet today."""
    proc = _run_into_closed_pipe(argv, tmp_path)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode in (0, *BROKEN_PIPE_STATUSES), proc.returncode


@pytest.mark.parametrize("unbuffered", [
    pytest.param(False, id="buffered"),
    pytest.param(True, id="PYTHONUNBUFFERED=1"),
])
def test_data_check_report_into_a_closed_pipe_is_quiet(tmp_path, data_dir, unbuffered):
    """``lorweb-fast data check DIR | head -1``: the report's reader has gone, which is no error of the user's data
    nor of a file: stderr stays empty (no "error: [Errno 32] Broken pipe", no traceback, no "Exception ignored")
    and the status is 1 or SIGPIPE's, as ``yes | head -1`` / GNU tools end. With ``PYTHONUNBUFFERED=1`` (containers,
    CI) the first ``print`` fails inside the command; buffered, the interpreter's final flush does."""
    env = {"PYTHONUNBUFFERED": "1"} if unbuffered else {}
    proc = _run_into_closed_pipe(["-m", "lorweb_fast", "data", "check", str(data_dir), "--quiet"], tmp_path, **env)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode in BROKEN_PIPE_STATUSES, proc.returncode


def test_info_into_a_closed_pipe_is_quiet(tmp_path):
    """``python -m lorweb_fast.info | head -1`` (the README's first diagnostic): no traceback, nothing on stderr,
    status 1 or SIGPIPE's."""
    proc = _run_into_closed_pipe(["-m", "lorweb_fast.info"], tmp_path)
    assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr
    assert proc.returncode in BROKEN_PIPE_STATUSES, proc.returncode


# ------------------------------------------------------------------------------------------------- a full disk
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv,name", [
    pytest.param(["-m", "lorweb_fast", "data", "check", "{data}", "--quiet"], "lorweb-fast"),
    pytest.param(["-m", "lorweb_fast.info"], "python -m lorweb_fast.info"),
], ids=["data check", "info"])
def test_stdout_on_a_full_disk_is_a_one_line_error(tmp_path, data_dir, argv, name):
    """``lorweb-fast data check DIR > /dev/full`` (stdout redirected to a full disk): the results were lost, so the
    status is non-zero and stderr says so on one line naming the cause (``... No space left on device``), as
    the command's other errors read, without a traceback or the interpreter's "Exception ignored"."""
    argv = [a.format(data=data_dir) for a in argv]
    with open("/dev/full", "w") as full:
        proc = _run_into(full, argv, tmp_path)
    assert proc.returncode not in (0, 120), (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(name), proc.stderr
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------- streams, colour, TTYs
def test_results_on_stdout_progress_on_stderr_and_no_escapes_when_piped(tmp_path, data_dir):
    """``lorweb-fast data check DIR`` with both streams piped (not terminals), TERM naming a colour terminal: stdout
    holds the report only (its first line "4 samples ...", no carriage returns, no progress bar), the progress bar
    goes to stderr, and neither stream carries an ANSI escape (nothing asked for colour; tqdm's carriage returns on
    a piped stderr are tqdm's choice and accepted)."""
    proc = subprocess.run([sys.executable, "-m", "lorweb_fast", "data", "check", str(data_dir)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
                          env=_env(TERM="xterm-256color"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("4 samples (0 skipped); layouts: grid 4\n"), proc.stdout
    assert "problems: 0\n" in proc.stdout
    assert "\r" not in proc.stdout and "decoding images" not in proc.stdout, proc.stdout
    assert "decoding images" in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_no_colour_on_a_terminal_with_no_color_and_term_dumb(tmp_path, data_dir):
    """On a real terminal (a pseudo-terminal) with ``NO_COLOR=1`` and ``TERM=dumb``: ``--help``, a usage error and
    ``data check``'s report and progress bar carry no ANSI escape (https://no-color.org; tqdm's carriage returns on
    a terminal are fine)."""
    import pty

    code = ("import sys\nfrom lorweb_fast import cli\n"
            "for argv in (['--help'], ['data', 'check', sys.argv[1], '--bogus'], ['data', 'check', sys.argv[1]]):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, str(data_dir)], stdin=subprocess.DEVNULL,
                                stdout=terminal, stderr=terminal, cwd=tmp_path,
                                env=_env(NO_COLOR="1", TERM="dumb"))
        os.close(terminal)
        terminal = None
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "usage: lorweb-fast" in text and "4 samples" in text and "unrecognized arguments: --bogus" in text, text
    assert "\x1b" not in text, repr(text)


# -------------------------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_help_of_every_subcommand_is_on_stdout_with_status_0(command, capsys):
    """``lorweb-fast <command> --help``: the usage of that very command on stdout, nothing on stderr, status 0
    (``lorweb-fast data check --help | less`` pages it; ``2>/dev/null`` hides nothing of it)."""
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    out, err = capsys.readouterr()
    assert info.value.code == 0 and err == ""
    assert out.startswith(f"usage: lorweb-fast {' '.join(command)} "), out[:200]
    assert "\x1b" not in out


HELP_MODULES_CODE = """
import contextlib, io, json, sys
from lorweb_fast import aot, cli
codes = []
for argv in json.loads(sys.argv[1]):
    main = aot.main if argv == ["aot"] else cli.main
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(([] if argv == ["aot"] else argv) + ["--help"])
        except SystemExit as exc:
            codes.append(exc.code)
heavy = ("diffusers", "transformers", "matplotlib", "lpips", "peft", "optimum", "bitsandbytes", "torchvision",
         "accelerate", "huggingface_hub")
print(json.dumps({"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_help_loads_no_heavy_optional_package(tmp_path):
    """Every ``--help`` (each subcommand's, and ``python -m lorweb_fast.aot --help``) answers with status 0 without
    importing diffusers, transformers, huggingface_hub, accelerate or any optional package (matplotlib, lpips, peft,
    optimum-quanto, bitsandbytes, torchvision), even though they are installed: help stays quick and works where
    one of them is broken. (``test_optional_dependencies`` checks help with them blocked, not that help leaves the
    installed ones alone.) In a fresh interpreter: the test session has imported them already."""
    import json

    commands = [list(c) for c in ([], *SUBCOMMANDS)] + [["aot"]]
    proc = subprocess.run([sys.executable, "-c", HELP_MODULES_CODE, json.dumps(commands)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["codes"] == [0] * len(commands)
    assert result["loaded"] == [], result["loaded"]


# -------------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv,prog,says", [
    (["infer", "--a", "a"], "lorweb-fast infer", "the following arguments are required"),
    (["train", "--data", "d", "--out", "o", "--steps", "many"], "lorweb-fast train", "invalid int value: 'many'"),
    (["data"], "lorweb-fast data", "the following arguments are required"),
    (["data", "check", "d", "--layout", "sideways"], "lorweb-fast data check", "invalid choice: 'sideways'"),
    (["data", "prepare", "src"], "lorweb-fast data prepare", "the following arguments are required: out"),
    (["demo", "--out", "o", "--bogus"], "lorweb-fast", "unrecognized arguments: --bogus"),
    (["eval", "generate", "--evalset", "e"], "lorweb-fast eval generate", "the following arguments are required"),
    (["eval", "score", "--runs", "r", "--out", "o", "--metrics", "fid"], "lorweb-fast eval score",
     "metrics must be a comma-separated subset"),
], ids=["infer", "train", "data", "data check", "data prepare", "demo", "eval generate", "eval score"])
def test_usage_errors_of_every_subcommand_are_one_line_and_status_2(argv, prog, says, capsys):
    """A command line argparse refuses, in every subcommand: status 2, one stderr line ``<prog>: error: ...`` naming
    the problem (not argparse's usage block, not a traceback), nothing on stdout."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and says in err, err


def test_version_option_prints_the_version(capsys):
    """``lorweb-fast --version``: the package version on stdout and status 0, as most command-line tools answer
    (bug reports ask for it; ``python -m lorweb_fast.info`` is a longer answer to another question)."""
    import lorweb_fast

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    out, err = capsys.readouterr()
    assert info.value.code in (0, None) and err == ""
    assert lorweb_fast.__version__ in out


# ----------------------------------------------------------------------------------------------------- Ctrl-C
BLOCKED_CODE = """
import sys, time
from lorweb_fast import {module}
from lorweb_fast import {where}
def blocked(*args, **kwargs):
    sys.stderr.write("ready\\n")
    sys.stderr.flush()
    time.sleep(60)
{where}.{name} = blocked
{extra}
sys.exit({module}.main(sys.argv[1:]))
"""


def _interrupted(tmp_path, code, argv) -> subprocess.CompletedProcess:
    """Run ``python -c code argv``, wait until it writes "ready" to stderr, send it SIGINT (Ctrl-C)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    try:
        ready = proc.stderr.readline()
        assert ready == "ready\n", ready + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_real_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path, data_dir):
    """A real SIGINT (not a KeyboardInterrupt raised by a stand-in, as the in-process tests do) while ``data check``
    works: status 130, ``lorweb-fast data check: interrupted`` alone on stderr, nothing on stdout. The folder
    check is replaced by a stand-in that waits, so the signal lands inside the command."""
    code = BLOCKED_CODE.format(module="cli", where="data", name="check_folder", extra="")
    proc = _interrupted(tmp_path, code, ["data", "check", str(data_dir), "--quiet"])
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "lorweb-fast data check: interrupted\n" and proc.stdout == ""


def test_ctrl_c_in_aot_is_one_line(tmp_path):
    """``python -m lorweb_fast.aot`` runs for minutes; Ctrl-C ends it as ``lorweb-fast`` commands end: one line on
    stderr, no traceback, status 130 (or killed by SIGINT after that line). ``build_report`` is replaced by a
    stand-in that waits, and triton's presence check by a no-op, so no compiler runs."""
    code = BLOCKED_CODE.format(module="aot", where="aot", name="build_report",
                               extra="from lorweb_fast import validation\nvalidation.require = lambda *a, **k: None")
    proc = _interrupted(tmp_path, code, ["--arch", "90", "--out", str(tmp_path / "aot"), "--quiet"])
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.returncode in (130, -signal.SIGINT), proc.returncode
