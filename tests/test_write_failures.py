"""Write-failure audit: a full disk (ENOSPC), a read-only folder (EACCES / EROFS) and an I/O error (EIO) injected
at every place lorweb_fast writes files.

Checked for each writer: (1) the error the user sees names the file or folder and the cause, on one line without a
traceback on the command line; (2) nothing half-written stays under a final name (a complete file or the previous
version) and no temporary file is left; (3) training stops at a complete checkpoint and ``--resume`` continues from
it bit for bit; (4) a failed save leaves the model / pipeline in memory unchanged.

Failures are injected by monkeypatching the low-level writers (``torch.save``, ``safetensors.torch.save_file``,
``shutil.copyfile``, ``os.replace``, ``append_text``, ``Image.save``, ``Figure.savefig``, ``Path.write_bytes`` /
``write_text``), which raise ``OSError(code, strerror)`` on the k-th call whose path matches, optionally after
writing a few bytes (a half-written file), as a real full disk does. The tests may run as root, where a chmod'ed
folder stays writable, so no test relies on file modes; one test makes the kernel itself refuse writes (a child
process's file-size limit). What the audit found is fixed: the command line's one-line error for any OSError
(with the step and the checkpoint to resume from for ``train``), ``data prepare`` stopping when ``--out`` cannot be
written, the files named in the errors of torch.save / safetensors, no temporaries left by training's top-level
copies, the demo's and the report's files written atomically (metrics.json and summary.md together).
"""

import contextlib
import errno
import io
import json
import os
import pathlib
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import _files, cli, demo, training
from lorweb_fast.testing import (file_tree, one_intra_op_thread, relation252k_folder, tiny_lorweb_linear_model,
                                 tiny_training_assets)

pytest.importorskip("diffusers")

#: the injected causes: a full disk, a read-only folder (both kinds), an I/O error
CODES = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EIO)
CODE_IDS = [errno.errorcode[c] for c in CODES]


def io_error(code: int) -> OSError:
    """The OSError a failing write raises (``write(2)`` errors carry no file name)."""
    return OSError(code, os.strerror(code))


def inject(mp, owner, name: str, code: int = errno.ENOSPC, *, nth: int = 1, match: str = "", partial: bytes = b"",
           target: int = -1, mode: str = "wb") -> list:
    """Make ``owner.name`` raise ``io_error(code)`` on its ``nth`` call whose path arguments contain ``match``; with
    ``partial``, those bytes are first written (``mode``: "wb", or "ab" for an append) to the path argument
    ``target`` (a half-written file). Returns the list of the failing calls' paths (to assert the fault fired)."""
    original = getattr(owner, name)
    seen, fired, lock = [0], [], threading.Lock()

    def wrapper(*args, **kwargs):
        paths = [os.fspath(a) if isinstance(a, (str, os.PathLike)) else a.name for a in args
                 if isinstance(a, (str, os.PathLike)) or isinstance(getattr(a, "name", None), str)]  # open files too
        if any(match in p for p in paths):
            with lock:  # data prepare writes on several threads
                seen[0] += 1
                fail = seen[0] == nth
            if fail:
                fired.append(paths)
                if partial:
                    with open(paths[target], mode) as f:
                        f.write(partial)
                raise io_error(code)
        return original(*args, **kwargs)

    mp.setattr(owner, name, wrapper)
    return fired


def run_cli(argv: list) -> tuple:
    """(exit status, stderr) of ``lorweb-fast <argv>`` run in-process; an exception that escapes ``cli.main`` (which
    a user sees as a traceback) is returned in place of the status."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
        except Exception as exc:  # noqa: BLE001 - what escapes is the finding
            rc = exc
    return rc, err.getvalue()


def assert_one_line_error(rc, err: str, code: int, *names: str) -> str:
    """A failed command: a non-zero exit status, no traceback, and one error line naming the cause and one of
    ``names`` (the file or its folder). Returns the line."""
    assert isinstance(rc, int) and not isinstance(rc, bool), f"an exception escaped the CLI: {rc!r}"
    assert rc != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1, err
    assert os.strerror(code) in errors[0], errors[0]
    assert any(str(n) in errors[0] for n in names), (errors[0], names)
    return errors[0]


def temporaries(root) -> list:
    """Temporary files and folders the writers use (``.<name>.<random>.tmp``, ``.lorweb-*.safetensors.tmp``,
    ``.*.kept``, ``.tmp-step-*``, the top-level copies' ``.<name>.tmp``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(".*")
                  if p.name.endswith((".tmp", ".kept")) or p.name.startswith(".tmp-step-"))


def same_parameters(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ shared assets
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """torch on one intra-op thread: the tiny models run faster without thread spinning on a shared CPU."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny pipeline, CLIP and 4-sample data folder; ``straight``: an uninterrupted 3-step CLI training run (a
    checkpoint every step) that the resumed runs must match bit for bit."""
    root = tiny_training_assets(tmp_path_factory.mktemp("wf"), 4)
    rc, err = run_cli(train_argv(root, root / "straight"))
    assert rc == 0, err
    return root


def train_argv(assets, out, *extra) -> list:
    """``lorweb-fast train`` on the tiny assets: 3 steps of batch 2 in fp32, a checkpoint every step."""
    return ["train", "--data", str(assets / "data"), "--out", str(out), "--model", str(assets / "pipe"),
            "--encoder", str(assets / "clip"), "--steps", "3", "--batch-size", "2", "--mixed-precision", "no",
            "--long-edge", "64", "--resize", "long-edge", "--max-sequence-length", str(demo.DEMO_MAX_SEQUENCE_LENGTH),
            "--num-loras", "4", "--rank", "2", "--key-dim", "8", "--checkpoint-every", "1", "--num-workers", "0",
            "--no-progress", "--save-dtype", "fp32", "--learning-rate", "1e-2", "--optimizer", "adamw", *extra]


# ------------------------------------------------------------------------------------- save_lorweb_weights
def _saved_folder(tmp_path):
    """A folder holding an earlier save (weights, config.yaml, README.md) and the model (changed since)."""
    model = tiny_lorweb_linear_model()
    folder = tmp_path / "ckpt"
    lf.save_lorweb_weights(model, folder / "lorweb.safetensors", config={}, extra_files={"README.md": "old\n"})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    return model, folder


SAVE_FAULTS = {  # (owner, name, match, nth, partial): each place save_lorweb_weights writes or renames
    "config-temp": ("lorweb_fast.model", "write_temporary_text", "", 1, b""),
    "card-temp": ("lorweb_fast.model", "write_temporary_text", "", 2, b""),
    "weights": ("safetensors.torch", "save_file", ".safetensors.tmp", 1, b"\x10\x00"),
    "rename-config": ("os", "replace", "config.yaml", 1, b""),
    "rename-card": ("os", "replace", "README.md", 1, b""),
    "rename-weights": ("os", "replace", "lorweb.safetensors", 1, b""),
}


def _owner(name: str):
    import importlib

    return importlib.import_module(name)


@pytest.mark.parametrize("code", CODES, ids=CODE_IDS)
@pytest.mark.parametrize("where", list(SAVE_FAULTS))
def test_failed_save_lorweb_weights_keeps_files_and_model(tmp_path, monkeypatch, where, code):
    """A save that fails at any write or rename (config.yaml, model card, weights; their renames) raises the
    OSError with its errno, leaves the folder byte-identical (files renamed before are put back), removes every
    temporary and ``.kept`` copy, and leaves the model's parameters unchanged."""
    model, folder = _saved_folder(tmp_path)
    before, params = file_tree(folder), {k: v.clone() for k, v in model.state_dict().items()}
    owner, name, match, nth, partial = SAVE_FAULTS[where]
    fired = inject(monkeypatch, _owner(owner), name, code, nth=nth, match=match, partial=partial)
    with pytest.raises(OSError) as info:
        lf.save_lorweb_weights(model, folder / "lorweb.safetensors", config={}, extra_files={"README.md": "new\n"})
    assert fired and info.value.errno == code
    monkeypatch.undo()
    assert file_tree(folder) == before and temporaries(folder) == []
    assert same_parameters(model.state_dict(), params)
    assert lf.load_lorweb_weights(tiny_lorweb_linear_model(), folder / "lorweb.safetensors") is not None


def test_failed_save_into_a_new_folder_removes_the_folders_it_made(tmp_path, monkeypatch):
    """A save into a folder that does not exist yet and fails at the weights leaves no folder behind."""
    model = tiny_lorweb_linear_model()
    inject(monkeypatch, _owner("safetensors.torch"), "save_file", errno.ENOSPC, partial=b"x")
    with pytest.raises(OSError):
        lf.save_lorweb_weights(model, tmp_path / "a" / "b" / "lorweb.safetensors", config={})
    assert list(tmp_path.iterdir()) == []


def test_failed_atomic_write_into_a_new_folder_removes_the_folders_it_made(tmp_path):
    """Every atomic writer (images, logs, configs, plots) into a folder that does not exist yet: a write that fails
    leaves no folder behind (only those it made: an existing parent, and one another writer filled meanwhile,
    stay)."""
    from lorweb_fast import _files

    def failing(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _files.atomic_write(tmp_path / "a" / "b" / "out.png", failing)
    assert list(tmp_path.iterdir()) == []

    def filled_meanwhile(tmp):
        (tmp_path / "a" / "other.txt").write_text("another writer's file")
        failing(tmp)

    with pytest.raises(OSError):
        _files.atomic_write(tmp_path / "a" / "b" / "out.png", filled_meanwhile)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/other.txt"]
    _files.atomic_write(tmp_path / "a" / "b" / "out.png", lambda tmp: Path(tmp).write_bytes(b"ok"))
    assert (tmp_path / "a" / "b" / "out.png").read_bytes() == b"ok"


def test_failed_save_names_the_file(tmp_path, monkeypatch):
    """The error of a save that fails for a full disk names the file being saved."""
    model = tiny_lorweb_linear_model()
    inject(monkeypatch, _owner("safetensors.torch"), "save_file", errno.ENOSPC)
    path = tmp_path / "out" / "lorweb.safetensors"
    with pytest.raises(OSError) as info:
        lf.save_lorweb_weights(model, path)
    assert str(path) in str(info.value) and os.strerror(errno.ENOSPC) in str(info.value)


def test_failed_pipeline_save_lora_weights_keeps_folder_and_pipeline(assets, tmp_path, monkeypatch):
    """``pipe.save_lora_weights`` failing at the weights (full disk) keeps the folder's earlier save byte for byte,
    and the pipeline's transformer (parameters, strength) is unchanged."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    pipe = LoRWeBKontextPipeline.from_pretrained(str(assets / "pipe"), str(assets / "straight"),
                                                 encoder=str(assets / "clip"), resolution="native", long_edge=64)
    folder = tmp_path / "saved"
    pipe.save_lora_weights(folder)
    before = file_tree(folder)
    scale = lf.get_lorweb_scale(pipe.transformer)
    with torch.no_grad():
        next(p for n, p in pipe.transformer.named_parameters() if "lora_B" in n).add_(1.0)
    params = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    fired = inject(monkeypatch, _owner("safetensors.torch"), "save_file", errno.ENOSPC, partial=b"\x00")
    with pytest.raises(OSError):
        pipe.save_lora_weights(folder)
    assert fired
    assert file_tree(folder) == before and temporaries(folder) == []
    assert same_parameters(pipe.transformer.state_dict(), params)
    assert lf.get_lorweb_scale(pipe.transformer) == scale


# -------------------------------------------------------------------------------------------------- training
#: where a checkpoint (at step 2 of 3) fails: (owner, name, match, nth, partial, newest complete checkpoint after)
TRAIN_FAULTS = {
    "trainer_state": ("torch", "save", "step-00000002", 1, b"PK\x03", 1),
    "weights": ("safetensors.torch", "save_file", "tmp-step-00000002", 1, b"\x10", 1),
    "config.yaml": ("lorweb_fast.official_config", "atomic_write", "tmp-step-00000002", 1, b"", 1),
    "folder-rename": ("os", "replace", "checkpoints/step-00000002", 1, b"", 1),
    "top-weights-copy": ("shutil", "copyfile", "step-00000002/lorweb.safetensors", 1, b"\x10\x00", 2),
    "top-config-copy": ("shutil", "copyfile", "step-00000002/config.yaml", 1, b"job: ex", 2),
    "loss.jsonl": ("lorweb_fast.training", "append_text", "loss.jsonl", 2, b'{"step": 2, "lo', 1),  # appended
    "loss.png": ("matplotlib.figure.Figure", "savefig", "loss.png", 2, b"\x89PNG", 2),
}


def _fault_owner(path: str):
    if path == "matplotlib.figure.Figure":
        from matplotlib.figure import Figure

        return Figure
    return _owner(path)


@pytest.fixture(scope="module")
def failed_run(request, assets, tmp_path_factory):
    """The CLI training run of ``assets`` with ``request.param``'s fault (``TRAIN_FAULTS``) at step 2: (name, out,
    exit status or escaped exception, stderr, calls that failed)."""
    name = request.param
    owner, attr, match, nth, partial, _ = TRAIN_FAULTS[name]
    out = tmp_path_factory.mktemp(f"failed-{name}") / "run"
    with pytest.MonkeyPatch.context() as mp:
        if attr == "atomic_write":  # the temporary is the path handed to the write callback
            fired = _inject_atomic_write(mp, _fault_owner(owner), match)
        else:
            append = attr == "append_text"  # (path, text): half a line appended to the log
            fired = inject(mp, _fault_owner(owner), attr, errno.ENOSPC, nth=nth, match=match, partial=partial,
                           target=0 if append else -1, mode="ab" if append else "wb")
        rc, err = run_cli(train_argv(assets, out))
    return name, out, rc, err, fired


def _inject_atomic_write(mp, module, match: str) -> list:
    """``module.atomic_write`` whose write callback fails half-way (ENOSPC) for a path containing ``match``."""
    original, fired = module.atomic_write, []

    def wrapper(path, write, **kw):
        if match in os.fspath(path):
            def failing(tmp):
                Path(tmp).write_bytes(b"config: {pro")
                fired.append(os.fspath(path))
                raise io_error(errno.ENOSPC)
            return original(path, failing, **kw)
        return original(path, write, **kw)

    mp.setattr(module, "atomic_write", wrapper)
    return fired


@pytest.mark.parametrize("failed_run", list(TRAIN_FAULTS), indirect=True)
def test_failed_checkpoint_leaves_only_complete_checkpoints(failed_run, assets):
    """The run stops at the fault; ``checkpoints/`` holds only complete checkpoints (weights, config.yaml, trainer
    state that load), the newest being the expected one, and every top-level file is a complete version (the
    top-level weights equal a checkpoint's, loss.png decodes, loss.jsonl's complete lines are steps 1, 2, ...)."""
    name, out, rc, err, fired = failed_run
    assert fired, f"the fault did not fire: {err}"
    assert rc != 0
    newest = TRAIN_FAULTS[name][-1]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == [f"step-{s:08d}" for s in range(1, newest + 1)]
    for ckpt in ckpts:
        folder = out / "checkpoints" / ckpt
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "lorweb.safetensors", "trainer_state.pt"]
        torch.load(folder / "trainer_state.pt", weights_only=True)
        lf.load_lorweb_weights(tiny_model_like(assets), folder / "lorweb.safetensors")
    assert training.latest_checkpoint(out).name == ckpts[-1]
    top = (out / "lorweb.safetensors").read_bytes()
    assert any(top == (out / "checkpoints" / c / "lorweb.safetensors").read_bytes() for c in ckpts)
    assert any((out / "config.yaml").read_bytes() == (out / "checkpoints" / c / "config.yaml").read_bytes()
               for c in ckpts)
    Image.open(out / "loss.png").load()


@pytest.mark.parametrize("failed_run", list(TRAIN_FAULTS), indirect=True)
def test_failed_checkpoint_leaves_no_temporary(failed_run):
    """No temporary file or folder stays in --out after a failed checkpoint (the ``.tmp-step-*`` folder, the
    weights' and config.yaml's temporaries, the top-level copies' ``.<name>.tmp``, the plot's temporary)."""
    _, out, _, _, fired = failed_run
    assert fired
    assert temporaries(out) == []


@pytest.mark.parametrize("failed_run", list(TRAIN_FAULTS), indirect=True)
def test_failed_checkpoint_cli_error_names_step_and_newest_checkpoint(failed_run):
    """``lorweb-fast train`` stopped by a full disk: one line (no traceback) naming the cause, the step and the
    newest complete checkpoint to resume from."""
    name, out, rc, err, _ = failed_run
    newest = f"step-{TRAIN_FAULTS[name][-1]:08d}"
    line = assert_one_line_error(rc, err, errno.ENOSPC, out)
    assert newest in line and "--resume" in line and ("step 2" in line or "step-00000002" in line), line


@pytest.mark.filterwarnings("ignore:.*incomplete line")
@pytest.mark.parametrize("failed_run", list(TRAIN_FAULTS), indirect=True)
def test_resume_after_failed_write_matches_the_uninterrupted_run(failed_run, assets, tmp_path):
    """``--resume`` (in a copy of the failed run's folder: the run folder may move) continues from the newest
    complete checkpoint and ends with the uninterrupted run's weights and loss log, bit for bit."""
    name, out, _, _, _ = failed_run
    moved = tmp_path / "run"
    shutil.copytree(out, moved, symlinks=True)
    rc, err = run_cli(train_argv(assets, moved, "--resume"))
    assert rc == 0, err
    straight = assets / "straight"
    from safetensors.torch import load_file

    assert same_parameters(load_file(moved / "lorweb.safetensors"), load_file(straight / "lorweb.safetensors"))
    rows = [json.loads(line) for line in (moved / "loss.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) for line in (straight / "loss.jsonl").read_text().splitlines()]
    assert temporaries(moved) == []


def tiny_model_like(assets):
    """A fresh tiny transformer (the checkpoints' loader target)."""
    from lorweb_fast.flux import load_kontext_pipeline

    cache = tiny_model_like.__dict__.setdefault("cache", {})
    if "t" not in cache:
        cache["t"] = load_kontext_pipeline(str(assets / "pipe")).transformer
    return cache["t"]


def test_failed_train_config_json_write_changes_nothing(assets, tmp_path, monkeypatch):
    """A read-only file system while ``train`` writes train_config.json at the start (before any step): the OSError
    with its errno, no temporary, no checkpoint."""
    cfg = training_cfg(assets, tmp_path / "run")
    fired = inject(monkeypatch, pathlib.Path, "write_text", errno.EROFS, match="train_config.json",
                   partial=b"{\"da", target=0)
    with pytest.raises(OSError) as info:
        training.train(cfg)
    assert fired and info.value.errno == errno.EROFS
    assert temporaries(tmp_path / "run") == [] and not (tmp_path / "run" / "checkpoints").exists()


def training_cfg(assets, out, **over):
    """The ``train_argv`` run as a TrainConfig."""
    from lorweb_fast.testing import tiny_train_config

    return tiny_train_config(assets, out, steps=3, checkpoint_every=1, optimizer="adamw", **over)


# ------------------------------------------------------------------------------------------------ infer --out
class FakePipe:
    """Stands in for LoRWeBKontextPipeline in ``infer`` / ``eval generate`` / ``demo``: returns b (copies)."""

    def __init__(self):
        self.pipe = type("StockPipe", (), {"_execution_device": torch.device("cpu")})()
        self.transformer = None

    def __call__(self, a, a_prime, b, prompt, **kwargs):
        if isinstance(b, list):
            return [im.copy() for im in b]
        return [Image.new("RGB", (32, 32), (9, 99, 199))]


@pytest.fixture()
def infer_setup(assets, tmp_path, monkeypatch):
    """Input images, an earlier ``--out`` file, and the pipeline loader replaced by ``FakePipe``."""
    from lorweb_fast.flux import LoRWeBKontextPipeline

    for i, name in enumerate(("a", "a_prime", "b")):
        Image.new("RGB", (32, 32), (60 * i, 80, 120)).save(tmp_path / f"{name}.png")
    out = tmp_path / "result" / "b_prime.png"
    out.parent.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *a, **k: FakePipe()))
    argv = ["infer", "--a", str(tmp_path / "a.png"), "--a-prime", str(tmp_path / "a_prime.png"),
            "--b", str(tmp_path / "b.png"), "--prompt", "p",
            "--weights", str(assets / "straight" / "lorweb.safetensors"),
            "--model", str(assets / "pipe"), "--encoder", str(assets / "clip"), "--out", str(out), "--steps", "1",
            "--resolution", "native", "--long-edge", "64", "--device", "cpu", "--quiet"]
    return argv, out


def test_infer_positive_control_writes_out(infer_setup):
    """Without a fault the (faked) ``infer`` writes ``--out`` and exits 0: the tests below reach the write."""
    argv, out = infer_setup
    rc, err = run_cli(argv)
    assert rc == 0, err
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize("code", CODES, ids=CODE_IDS)
def test_infer_failed_out_write_keeps_the_earlier_file(infer_setup, monkeypatch, code):
    """``infer --out`` failing half-way through the image write keeps the earlier ``--out`` file byte for byte and
    leaves no temporary."""
    argv, out = infer_setup
    before = out.read_bytes()
    fired = inject(monkeypatch, Image.Image, "save", code, match="b_prime.png", partial=b"\x89PNG")
    run_cli(argv)
    assert fired
    assert out.read_bytes() == before and temporaries(out.parent) == []


@pytest.mark.parametrize("code", CODES, ids=CODE_IDS)
def test_infer_failed_out_write_is_a_one_line_error(infer_setup, monkeypatch, code):
    """``infer`` whose ``--out`` cannot be written: one error line naming the file and the cause, no traceback."""
    argv, out = infer_setup
    inject(monkeypatch, Image.Image, "save", code, match="b_prime.png", partial=b"\x89PNG")
    rc, err = run_cli(argv)
    assert_one_line_error(rc, err, code, out)


# ---------------------------------------------------------------------------------------------- data prepare
@pytest.fixture()
def relation(tmp_path):
    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12), (16, 12), (20, 10)], "cat-c": [(12, 12)] * 2},
                        seed=1)
    return tmp_path / "rel"


def _decodes(path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def test_data_prepare_failed_analogy_leaves_no_partial_files(relation, tmp_path, monkeypatch):
    """A full disk half-way through one analogy's target image: none of that analogy's files stay, no temporary is
    left, the other analogies are complete, and a later run (disk freed) writes the missing one."""
    out = tmp_path / "prepared"
    fired = inject(monkeypatch, Image.Image, "save", errno.ENOSPC, match="/target/.", partial=b"\xff\xd8\xff")
    rc, err = run_cli(["data", "prepare", str(relation), str(out), "--quiet"])
    monkeypatch.undo()
    assert fired
    assert temporaries(out) == []
    failed_id = Path(fired[0][0]).name[1:-len(".tmp")].rsplit(".", 2)[0]  # .<id>.jpg.<random>.tmp
    assert not any(p.name.startswith(failed_id + ".") for p in out.rglob("*"))
    for jpg in out.rglob("*.jpg"):
        assert _decodes(jpg), jpg
    rc, err = run_cli(["data", "prepare", str(relation), str(out), "--quiet"])
    assert rc == 0, err
    assert (out / "target" / f"{failed_id}.jpg").is_file() and (out / "control" / f"{failed_id}.jpg").is_file()


@pytest.mark.parametrize("code", (errno.ENOSPC, errno.EROFS), ids=["ENOSPC", "EROFS"])
def test_data_prepare_write_failure_is_a_one_line_error(relation, tmp_path, monkeypatch, code):
    """``data prepare`` whose output cannot be written (full disk, read-only): a non-zero exit and one error line
    naming the file or folder and the cause, no traceback."""
    out = tmp_path / "prepared"
    inject(monkeypatch, Image.Image, "save", code, match="prepared", partial=b"\xff\xd8")
    rc, err = run_cli(["data", "prepare", str(relation), str(out), "--quiet"])
    assert_one_line_error(rc, err, code, out)


def test_data_prepare_failed_metadata_keeps_the_earlier_file(relation, tmp_path, monkeypatch):
    """A full disk while ``analogy_metadata.json`` is rewritten keeps the earlier (complete) file and no
    temporary."""
    out = tmp_path / "prepared"
    assert run_cli(["data", "prepare", str(relation), str(out), "--quiet"])[0] == 0
    before = (out / "analogy_metadata.json").read_bytes()
    fired = inject(monkeypatch, pathlib.Path, "write_text", errno.ENOSPC, match="analogy_metadata.json",
                   partial=b"[{", target=0)
    run_cli(["data", "prepare", str(relation), str(out), "--quiet"])
    assert fired
    assert (out / "analogy_metadata.json").read_bytes() == before and temporaries(out) == []


def test_data_prepare_failed_metadata_is_a_one_line_error(relation, tmp_path, monkeypatch):
    """``data prepare`` failing to write ``analogy_metadata.json``: one error line naming it and the cause."""
    out = tmp_path / "prepared"
    inject(monkeypatch, pathlib.Path, "write_text", errno.EIO, match="analogy_metadata.json", target=0)
    rc, err = run_cli(["data", "prepare", str(relation), str(out), "--quiet"])
    assert_one_line_error(rc, err, errno.EIO, out / "analogy_metadata.json", out)


# ------------------------------------------------------------------------------------------- data check --dump
def test_data_check_dump_failure_leaves_only_complete_files(assets, tmp_path, monkeypatch):
    """``data check --dump`` failing half-way through the second grid image: every file under the dump folder is
    complete (PNGs decode), no temporary stays."""
    dump = tmp_path / "dump"
    fired = inject(monkeypatch, Image.Image, "save", errno.ENOSPC, nth=2, match="dump", partial=b"\x89PNG")
    run_cli(["data", "check", str(assets / "data"), "--dump", str(dump), "--quiet"])
    assert fired
    assert temporaries(dump) == []
    for png in dump.glob("*.png"):
        Image.open(png).load()


@pytest.mark.parametrize("code", CODES, ids=CODE_IDS)
def test_data_check_dump_failure_is_a_one_line_error(assets, tmp_path, monkeypatch, code):
    """``data check --dump`` that cannot write its grids: one error line naming the dump folder and the cause."""
    dump = tmp_path / "dump"
    inject(monkeypatch, Image.Image, "save", code, match="dump")
    rc, err = run_cli(["data", "check", str(assets / "data"), "--dump", str(dump), "--quiet"])
    assert_one_line_error(rc, err, code, dump)


# --------------------------------------------------------------------------------------------- eval generate
@pytest.fixture()
def generate_setup(assets, tmp_path, monkeypatch):
    """A 2-triplet evaluation set and ``eval generate`` argv with the pipeline replaced by ``FakePipe``."""
    from lorweb_fast.evaluation import tiny
    from lorweb_fast.flux import LoRWeBKontextPipeline

    evalset = tiny.make_folder_evalset(tmp_path / "evalset", tasks=("flip",), per_task=2, size=(32, 32))
    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *a, **k: FakePipe()))
    out = tmp_path / "runs"
    argv = ["eval", "generate", "--evalset", str(evalset), "--weights", str(assets / "straight"),
            "--model", str(assets / "pipe"), "--encoder", str(assets / "clip"), "--out", str(out), "--steps", "1",
            "--dtype", "fp32", "--device", "cpu", "--resolution", "native", "--long-edge", "64", "--batch-size", "1",
            "--quiet"]
    return argv, out


def test_eval_generate_failed_b_prime_is_redone_on_rerun(generate_setup, monkeypatch):
    """A full disk half-way through the first b' image: no b_prime.png (the finished marker) of that triplet, no
    temporary; the rerun generates exactly the missing triplets and every file is complete."""
    argv, out = generate_setup
    fired = inject(monkeypatch, Image.Image, "save", errno.ENOSPC, match="b_prime", partial=b"\x89PNG")
    run_cli(argv)
    assert fired
    assert temporaries(out) == [] and not list(out.rglob("b_prime.png"))
    monkeypatch.undo()
    from lorweb_fast.flux import LoRWeBKontextPipeline

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *a, **k: FakePipe()))
    rc, err = run_cli(argv)
    assert rc == 0, err
    assert len(list(out.rglob("b_prime.png"))) == 2
    for png in out.rglob("*.png"):
        Image.open(png).load()


@pytest.mark.parametrize("name", ["run.json", "evalset.json"])
def test_eval_generate_failed_record_keeps_the_earlier_file(generate_setup, monkeypatch, name):
    """A resumed ``eval generate`` whose run.json / evalset.json rewrite fails (EIO half-way) keeps the earlier
    complete file and leaves no temporary."""
    argv, out = generate_setup
    assert run_cli(argv)[0] == 0
    before = (out / name).read_bytes()
    fired = inject(monkeypatch, pathlib.Path, "write_bytes", errno.EIO, match=name, partial=b"{\"we", target=0)
    run_cli(argv)
    assert fired
    assert (out / name).read_bytes() == before and temporaries(out) == []


@pytest.mark.parametrize("name", ["b_prime", "run.json", "evalset.json"])
@pytest.mark.parametrize("code", (errno.ENOSPC, errno.EACCES), ids=["ENOSPC", "EACCES"])
def test_eval_generate_write_failure_is_a_one_line_error(generate_setup, monkeypatch, name, code):
    """``eval generate`` that cannot write: one error line naming the file or --out and the cause, no traceback."""
    argv, out = generate_setup
    if name == "b_prime":
        inject(monkeypatch, Image.Image, "save", code, match=name)
    else:
        inject(monkeypatch, pathlib.Path, "write_bytes", code, match=name, target=0)
    rc, err = run_cli(argv)
    assert_one_line_error(rc, err, code, out)


# ------------------------------------------------------------------------------------------------ eval score
@pytest.fixture()
def score_setup(assets, tmp_path):
    """Two runs folders of a 2-task evaluation set and the ``eval score`` argv (CLIP direction only)."""
    from lorweb_fast.evaluation import tiny

    ev = tiny.make_folder_evalset(tmp_path / "evalset", tasks=("flip", "swap"), per_task=2, size=(32, 32))
    tiny.make_runs_folder(tmp_path / "ours", ev, seed=1)
    tiny.make_runs_folder(tmp_path / "other", ev, seed=2)
    out = tmp_path / "report"

    def argv(runs="ours"):
        return ["eval", "score", "--runs", str(tmp_path / runs), "--encoder", str(assets / "clip"),
                "--metrics", "clip_dir", "--out", str(out), "--device", "cpu", "--quiet"]

    return argv, out


@pytest.mark.parametrize("name", ["metrics.json", "summary.md"])
def test_eval_score_failed_report_file_keeps_the_earlier_file(score_setup, monkeypatch, name):
    """A rescoring whose metrics.json / summary.md write fails half-way (full disk) keeps the earlier complete
    file and leaves no temporary."""
    argv, out = score_setup
    assert run_cli(argv())[0] == 0
    before = (out / name).read_bytes()
    fired = inject(monkeypatch, pathlib.Path, "write_bytes", errno.ENOSPC, match=name, partial=b"{\"per", target=0)
    run_cli(argv("other"))
    assert fired
    assert (out / name).read_bytes() == before and temporaries(out) == []


def test_eval_score_failed_summary_does_not_mix_two_scorings(score_setup, monkeypatch):
    """A rescoring (other runs folder) failing at summary.md leaves metrics.json and summary.md of one scoring."""
    argv, out = score_setup
    assert run_cli(argv())[0] == 0
    old_metrics = (out / "metrics.json").read_bytes()
    inject(monkeypatch, pathlib.Path, "write_bytes", errno.ENOSPC, match="summary.md", target=0)
    run_cli(argv("other"))
    assert (out / "metrics.json").read_bytes() == old_metrics


def test_eval_score_torn_cache_line_is_recomputed(score_setup, monkeypatch):
    """A full disk half-way through a metric-cache append (a torn last line) stops the scoring; a rerun ignores the
    torn line, recomputes, and writes a complete report."""
    from lorweb_fast.evaluation import score as S

    argv, out = score_setup
    fired = []

    def torn(path, text):  # the disk fills after part of the lines reached the file
        fired.append(path)
        _files.append_text(path, text[: len(text) // 2])
        raise io_error(errno.ENOSPC)

    monkeypatch.setattr(S, "append_text", torn)
    run_cli(argv())
    assert fired and not (out / "metrics.json").exists()
    monkeypatch.undo()
    rc, err = run_cli(argv())
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(r["clip_dir"] is not None for r in metrics["per_triplet"])
    assert temporaries(out) == []


@pytest.mark.parametrize("name", ["metrics.json", "summary.md", "metrics.jsonl"])
def test_eval_score_write_failure_is_a_one_line_error(score_setup, monkeypatch, name):
    """``eval score`` that cannot write a report file or cache: one error line naming it (or --out) and the cause."""
    from lorweb_fast.evaluation import score as S

    argv, out = score_setup
    if name == "metrics.jsonl":
        inject(monkeypatch, S, "append_text", errno.EROFS, match=name)
    else:
        inject(monkeypatch, pathlib.Path, "write_bytes", errno.EROFS, match=name, target=0)
    rc, err = run_cli(argv())
    assert_one_line_error(rc, err, errno.EROFS, out)


# ------------------------------------------------------------------------------------------------------ demo
@pytest.fixture()
def fake_demo(tmp_path, monkeypatch):
    """``lorweb-fast demo`` with its model building, data generation, training and pipeline replaced by stand-ins
    that write what the real ones leave (train/loss.png, train/loss.jsonl), so only the demo's own writes run."""
    from lorweb_fast import flux

    monkeypatch.setattr(demo, "build_tiny_kontext_pipeline", lambda *a, **k: None)
    monkeypatch.setattr(demo, "build_tiny_clip", lambda *a, **k: None)
    monkeypatch.setattr(demo, "make_synthetic_analogies", lambda *a, **k: None)

    def fake_train(cfg, **kwargs):
        run = Path(cfg.out)
        run.mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(run / "loss.png")
        (run / "loss.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
        return {"step": 2, "out": str(run)}

    def fake_plot(transformer, path):
        Image.new("RGB", (8, 8)).save(path)
        return Path(path)

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", staticmethod(lambda *a, **k: FakePipe()))
    monkeypatch.setattr(flux, "plot_coefficients", fake_plot)
    out = tmp_path / "demo"
    return ["demo", "--out", str(out), "--steps", "2", "--quiet"], out


def test_demo_positive_control(fake_demo):
    """The stubbed demo runs to the end (exit 0, summary.json and loss.png written): the faults below are reached."""
    argv, out = fake_demo
    rc, err = run_cli(argv)
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    Image.open(out / "loss.png").load()


def test_demo_failed_loss_plot_copy_leaves_no_half_written_file(fake_demo, monkeypatch):
    """A full disk while the demo copies loss.png: out/loss.png is complete or absent."""
    argv, out = fake_demo
    # the copy goes to a temporary beside loss.png (.loss.png.<random>.tmp), renamed once complete
    fired = inject(monkeypatch, shutil, "copyfile", errno.ENOSPC, match=".loss.png.", partial=b"\x89PNG")
    run_cli(argv)
    assert fired
    assert not (out / "loss.png").exists() or _decodes(out / "loss.png")


def test_demo_failed_summary_leaves_no_half_written_file(fake_demo, monkeypatch):
    """A full disk while the demo writes summary.json: the file is complete JSON or absent."""
    argv, out = fake_demo
    fired = inject(monkeypatch, pathlib.Path, "write_text", errno.ENOSPC, match="summary.json", partial=b"{\"st",
                   target=0)
    run_cli(argv)
    assert fired
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())


def test_demo_failed_image_write_leaves_only_complete_files(fake_demo, monkeypatch):
    """A full disk half-way through the demo's b' image: no b_prime.png under its final name, no temporary."""
    argv, out = fake_demo
    fired = inject(monkeypatch, Image.Image, "save", errno.ENOSPC, match="b_prime.png", partial=b"\x89PNG")
    run_cli(argv)
    assert fired
    assert not (out / "b_prime.png").exists() and temporaries(out) == []


@pytest.mark.parametrize("code", (errno.ENOSPC, errno.EIO), ids=["ENOSPC", "EIO"])
def test_demo_write_failure_is_a_one_line_error(fake_demo, monkeypatch, code):
    """``demo`` that cannot write its b' image: one error line naming the file or --out and the cause."""
    argv, out = fake_demo
    inject(monkeypatch, Image.Image, "save", code, match="b_prime.png")
    rc, err = run_cli(argv)
    assert_one_line_error(rc, err, code, out)


_REAL_LIMIT_CHILD = r'''
import errno, os, resource, signal, sys

import torch

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
import lorweb_fast as lf
from lorweb_fast import _files
from lorweb_fast.testing import tiny_lorweb_linear_model

out = sys.argv[1]
big = {"a": torch.randn(100_000)}
model = tiny_lorweb_linear_model(num_loras=512, rank=8)  # 64 KB of lora_A alone
for what, call, name in (
        ("torch_save", lambda: _files.torch_save(big, out + "/s.pt.tmp", out + "/s.pt"), out + "/s.pt"),
        ("save_lorweb_weights", lambda: lf.save_lorweb_weights(model, out + "/w.safetensors"),
         out + "/w.safetensors")):
    try:
        call()
    except OSError as exc:
        assert exc.errno == errno.EFBIG and exc.filename == name, (what, exc)
        print(what, "ok", exc)
    else:
        raise SystemExit(f"{what}: no error")
assert not os.path.exists(out + "/w.safetensors"), os.listdir(out)
'''


def test_real_os_write_failures_are_oserrors_naming_the_file(tmp_path):
    """Not a patched error: in a child process whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel
    refuse a write (EFBIG, as ENOSPC on a full disk), ``torch.save`` raises a RuntimeError ("unexpected pos") and
    safetensors a SafetensorError ("... (os error 27)"): ``_files.torch_save`` and ``save_lorweb_weights`` turn
    them into OSErrors naming the file being written (which the command line prints as one line), and the failed
    save leaves no file."""
    import subprocess
    import sys

    pytest.importorskip("resource")  # POSIX
    proc = subprocess.run([sys.executable, "-c", _REAL_LIMIT_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok ") == 2, proc.stdout


def test_naming_the_file_leaves_unrelated_errors_alone(tmp_path):
    """Found by the session review: ``naming_the_file`` followed any error's context, so a ValueError raised while
    the caller handled an unrelated OSError (or after ``raise ... from None``) became a fake OSError about the file.
    Only the serializers' own wrappers of an OSError are converted: torch.save's RuntimeError over its file object's
    OSError, safetensors' "(os error N)"."""
    path = tmp_path / "out.json"
    try:
        raise FileNotFoundError(errno.ENOENT, "missing", "elsewhere")
    except OSError:
        with pytest.raises(ValueError, match="not JSON compliant"), _files.naming_the_file(path):
            raise ValueError("Out of range float values are not JSON compliant")
    with pytest.raises(RuntimeError, match="mentions"), _files.naming_the_file(path):
        raise RuntimeError("a message that merely mentions (os error 28)")
    with pytest.raises(OSError) as caught, _files.naming_the_file(path):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)


def test_a_folder_that_refuses_new_files_is_named_not_a_random_temporary(tmp_path, monkeypatch):
    """Found by the session review: a read-only folder made the temporary's creation fail naming a random
    ``.<name>.<random>.tmp`` that never existed. ``atomic_write`` (and every writer built on ``temporary_file``)
    names the folder now."""
    real_open, tried = os.open, []

    def refuse(path, flags, *args, **kwargs):  # the folder refuses new files (tests run as root: chmod would not)
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            tried.append(str(path))
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError) as caught:
        _files.atomic_write(tmp_path / "summary.json", lambda tmp: tmp.write_text("{}"))
    assert tried and tried[0].endswith(".tmp") and tried[0] != str(tmp_path / "summary.json")  # its temporary's
    assert caught.value.filename == str(tmp_path) and os.path.basename(tried[0]) not in str(caught.value)


class _FailingReads:
    """A file object standing for a disk that fails: every read raises EIO (an OSError naming no file)."""

    def __init__(self, real):
        self.real = real

    def read(self, *args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_an_image_read_error_while_saving_names_the_image_read_not_the_file_written(tmp_path):
    """Noticed while reviewing ``naming_the_file``: Pillow decodes an image opened from a file only when its pixels
    are first needed, which for an image passed straight to ``_files.save_image_atomically`` is inside the save. A
    read error of the source (EIO, which names no file) was then re-raised naming the file being written, blaming
    the wrong disk. Now the image is decoded first: the error names the file read, and the output keeps what it
    held."""
    source, out = tmp_path / "a.png", tmp_path / "out" / "copy.png"
    Image.new("RGB", (9, 7), (200, 10, 30)).save(source)
    out.parent.mkdir()
    out.write_bytes(b"earlier")
    with Image.open(source) as image:
        image.fp = _FailingReads(image.fp)
        with pytest.raises(OSError) as caught:
            _files.save_image_atomically(image, out)
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == str(source), caught.value
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in out.parent.iterdir()) == ["copy.png"]
