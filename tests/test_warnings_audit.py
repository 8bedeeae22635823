"""Warnings audit: every warning lorweb_fast can give, seen by a demanding diffusers / peft user.

Method. Every ``warn(`` / ``warnings.warn`` / ``logger.warning`` / ``logging`` / stderr write of ``lorweb_fast/`` was
listed (all warnings go through ``validation.warn``, which walks the stack past the frames of lorweb_fast, torch,
diffusers, transformers, accelerate, peft and contextlib and calls ``warnings.warn(message, LoRWeBWarning,
stacklevel=<that depth>)``; the trainer also logs through ``logging.getLogger("lorweb_fast.training")``). Each one
(but FSDP's, which needs a process group) was triggered on tiny local models and data (nothing downloads) and checked
for: 1. attribution (``w.filename`` / ``w.lineno`` are this file's calling line, also through diffusers' pipeline,
torch's module call, accelerate and the trainer); 2. category (``LoRWeBWarning``, a UserWarning, everywhere); 3.
repetition (5 forwards, 5 pipeline calls of 3 steps, 6 training steps, 5 judge answers: counted); 4. ``-W error``
safety (the warning raised as an error before the model, the analogy or any file changes); 5. text (names the
problem, the value found and the way out; one message per cause and call); 6. hygiene (no warning and no change
of warning filters or logging config at import, after ``lorweb-fast data check`` in-process and after ``train()``).
Good behaviour is pinned. The eight defects found (verdict "fixed" below: two unsafe under ``-W error``, a
warning given as a log record, a filter that swallowed every category, a cause said twice or once per image, three
texts without the way out) were fixed in the same session; their tests pin the fixed behaviour.

=== ===================================== ============================================ ==== === ======== ====== ========
#   warning (start of text)               where (file:function)                        attr cat repeats  -W err verdict
=== ===================================== ============================================ ==== === ======== ====== ========
1   set_query in eval mode + autograd     model.py:set_query                           ok   LW  per call safe   ok
2   checkpoint adapts k of the n layers   model.py:load_lorweb_weights                 ok   LW  per load safe   ok
3   forward with autograd in merged()     layer.py:LoRWeBLinear._warn_no_gradient_...  ok   LW  /block   safe   ok
4   <file> has more than 8 bits           flux.py:_warn_high_bit_depth (load_image)    ok   LW  per call n/a    ok
4b  'a_prime' has more than 8 bits        flux.py:load_image (a PIL input)             ok   LW  per call n/a    fixed
5   b images: different aspect ratios     validation.py:warn_aspect_ratios             ok   LW  per call safe   ok
6   a[0] is WxH (aspect ratio r:1)        validation.py:warn_aspect_ratios             ok   LW  per call safe   ok
7   control grids of different sizes      validation.py:warn_grid_sizes                ok   LW  per call safe   ok
8   not drawing loss.png                  validation.py:plotting_available             ok   LW  once/run n/a    ok
9   network.linear_alpha=.. not read      official_config.py:read_config_yaml          ok   LW  per load safe   ok
10  lora_alpha=.. != rank=..              official_config.py:official_config           ok   LW  per save safe   fixed
11  skipped the unreadable checkpoint     official_config.py:find_checkpoint           ok   LW  per load safe   ok
12  cannot resume from step-N             training.py:find_resumable_checkpoint        ok   LW  per ckpt safe   ok
13  FSDP: n layers not in a block         training.py:_warn_if_layers_unwrapped        --   LW  once/run --     untested
14  loss.jsonl: n incomplete line(s)      training.py:_loss_rows (train resume)        ok   LW  once/run safe   fixed
15  batch_size .. larger than n samples   training.py:_train                           ok   LW  once/run safe   ok
16  resuming a run of n processes         training.py:_train                           ok   LW  once/run safe   fixed
17  step n: the training loss is NaN      training.py:_train (logger.warning)          --   log per NaN  --     note
18  10 training-folder warnings           data.py:AnalogyFolder.__init__, skip_samples ok   LW  per scan n/a    ok
19  5 Relation252K warnings               data.py:relation252k_pairs, _prepare_locked  ok   LW  per run  safe   ok
19b the same causes, 'data prepare'       data.py:run_data (stdout only now)           --   --  once     --     fixed
20  (every category swallowed)            data.py:check_folder (LoRWeBWarning only)    --   --  --       --     fixed
21  file system .. does not support flock _files.py:FolderLock.acquire                 ok   LW  once     safe   ok
22  k a' images have fewer than .. photos evaluation/evalsets.py:read_lorweb_evalset   ok   LW  once     n/a    fixed
23  runs folders hold other triplets      evaluation/score.py:_coverage                ok   LW  /scoring n/a    ok
24  judge's answer .. max_new_tokens=     evaluation/judge.py:Gemma3Judge.__call__     ok   LW  first    n/a    fixed
25  a warning shown by a command          cli.py:one_line_warnings (infer)             ok   LW  once     n/a    ok
=== ===================================== ============================================ ==== === ======== ====== ========

LW = ``lorweb_fast.LoRWeBWarning``; "per call" warnings have a constant text for a persisting cause, so Python's
default filter shows them once; none fires per denoising step, per forward, per training step or per batch. Import
and the in-process CLI leave warning filters and logging untouched.
"""

import contextlib
import errno
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import cli, data, demo, lora_api, training, validation
from lorweb_fast._files import FolderLock
from lorweb_fast.evaluation import evalsets, tiny
from lorweb_fast.evaluation import score as S
from lorweb_fast.evaluation.judge import Gemma3Judge, JudgeRequest
from lorweb_fast.flux import LoRWeBKontextPipeline, load_image
from lorweb_fast.testing import (assert_same_model_state, build_tiny_lorweb_assets, file_tree, lorweb_model_state,
                                 pair_config, pair_query, relation252k_folder, tiny_flux_config, tiny_pair_model,
                                 tiny_train_config, tiny_training_assets)

MSL = demo.DEMO_MAX_SEQUENCE_LENGTH


# ------------------------------------------------------------------------------------------------------- helpers
def caught(fn, action="always"):
    """(fn(), the warnings it gave) under ``action``."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter(action)
        result = fn()
    return result, list(seen)


def ours(seen, fragment=""):
    return [w for w in seen if issubclass(w.category, lf.LoRWeBWarning) and fragment in str(w.message)]


def where(seen):
    return [(w.category, Path(w.filename).name, w.lineno, str(w.message)[:90]) for w in seen]


def assert_at(fn, seen, fragment, count=1):
    """Exactly ``count`` LoRWeB warnings containing ``fragment``; every LoRWeB warning is a LoRWeBWarning at the line
    of ``fn`` (a one-line lambda of this file)."""
    line = fn.__code__.co_firstlineno
    assert len(ours(seen, fragment)) == count, where(seen)
    assert [(w.category, w.filename, w.lineno) for w in ours(seen)] == [(lf.LoRWeBWarning, __file__, line)] * len(
        ours(seen)), where(seen)


class _Stop(Exception):
    """Raised by ``first_warning``'s display hook: stops the call at its first warning, as ``-W error`` would."""


def first_warning(fn):
    """The first warning ``fn`` gives (None when none), the call stopped right there; for long calls (training) whose
    warning comes early."""
    got = []

    def show(message, category, filename, lineno, file=None, line=None):
        got.append(warnings.WarningMessage(message, category, filename, lineno))
        raise _Stop

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            fn()
        except _Stop:
            pass
    return got[0] if got else None


def raises_as_error(fn):
    """Whether ``fn`` raised a LoRWeBWarning under ``simplefilter("error")``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            fn()
        except lf.LoRWeBWarning:
            return True
    return False


def global_state() -> dict:
    """What a library must not change: warning filters and display, the logging config of the root logger and of
    lorweb_fast's loggers, diffusers' / transformers' verbosity and progress bars."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    loggers = {name: logging.getLogger(name) for name in ("", "lorweb_fast", "lorweb_fast.training")}
    return {"filters": list(warnings.filters), "showwarning": warnings.showwarning,
            "formatwarning": warnings.formatwarning,
            "loggers": {n: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for n, lg in loggers.items()},
            "diffusers": (dlog.get_verbosity(), dlog.is_progress_bar_enabled()),
            "transformers": (tlog.get_verbosity(), tlog.is_progress_bar_enabled())}


def tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**tiny_flux_config()).eval()


def flux_inputs(seed: int = 1) -> dict:
    """One call's inputs of the tiny FluxTransformer2DModel (8 latent channels, text dims 24 / 20), batch 1."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 4, 24, generator=g),
                pooled_projections=torch.randn(1, 20, generator=g), timestep=torch.full((1,), 0.5),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), guidance=torch.full((1,), 2.5),
                return_dict=False)


def partial_official_file(path):
    """An official-format file (no lorweb.layers) for the tiny FLUX transformer without one default target."""
    from safetensors.torch import save_file

    t = tiny_flux()
    lf.inject_lorweb(t, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6))
    save_file({k: v.contiguous() for k, v in lf.lorweb_state_dict(t).items()
               if ".single_transformer_blocks.0.proj_out." not in k}, str(path))
    return path


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lorweb_assets(tmp_path_factory):
    """build_tiny_lorweb_assets: pipe/, clip/, lorweb.safetensors."""
    return build_tiny_lorweb_assets(tmp_path_factory.mktemp("warn_assets"))


@pytest.fixture(scope="module")
def pipe(lorweb_assets):
    p = LoRWeBKontextPipeline.from_pretrained(lorweb_assets / "pipe", lorweb_assets / "lorweb.safetensors",
                                              encoder=lorweb_assets / "clip", resolution="native", long_edge=64,
                                              device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("warn_train") / "assets", 3)


@pytest.fixture(scope="module")
def trained(train_assets, tmp_path_factory):
    """A finished 2-step run (checkpoints at steps 1 and 2) trained with warnings as errors (a clean run gives none),
    plus the global state before and after ``train()``."""
    out = tmp_path_factory.mktemp("warn_run") / "run"
    before = global_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.train(tiny_train_config(train_assets, out, steps=2, checkpoint_every=1))
    return out, before, global_state()


def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


def tree(out):
    return [entry for entry in file_tree(out) if not entry[0].endswith(".lock")]


def synthetic_folder(root, samples=2):
    return demo.make_synthetic_analogies(root, samples)


# ============================================================================================== 6. library hygiene
IMPORT_SCRIPT = r"""
import importlib, logging, pkgutil, warnings
import torch, diffusers, transformers, accelerate, safetensors, PIL.Image  # their own filters first
before = list(warnings.filters)
root = logging.getLogger()
root_before = (root.level, list(root.handlers))
import lorweb_fast
names = [m.name for m in pkgutil.walk_packages(lorweb_fast.__path__, "lorweb_fast.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
assert warnings.filters == before, [f for f in warnings.filters if f not in before]
assert (root.level, list(root.handlers)) == root_before, (root.level, root.handlers)
for name in ("lorweb_fast", "lorweb_fast.training", "lorweb_fast.lora_api"):
    lg = logging.getLogger(name)
    assert (lg.level, lg.handlers, lg.propagate, lg.disabled) == (0, [], True, False), name
print(len(names))
"""


def test_importing_every_submodule_warns_nothing_and_configures_nothing():
    """``python -W error``: importing lorweb_fast and each of its submodules raises no warning, adds no warning filter,
    touches no root-logger handler or level, and configures none of its own loggers (no basicConfig)."""
    proc = subprocess.run([sys.executable, "-W", "error", "-c", IMPORT_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) >= 25


def test_an_in_process_command_gives_back_filters_display_and_logging(tmp_path):
    """``cli.main(["data", "check", ...])`` in-process (a warning-laden folder): warning filters, showwarning,
    formatwarning, the root and lorweb_fast loggers and diffusers' / transformers' verbosity and bars are as before."""
    root = synthetic_folder(tmp_path / "d", 3)
    (root / "captions" / "0001.txt").unlink()
    before = global_state()
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["data", "check", str(root), "--quiet"]) == 0
    assert "samples without a caption" in out.getvalue()
    assert global_state() == before


def test_train_gives_back_filters_display_and_logging_and_a_clean_run_warns_nothing(trained):
    """The fixture's run trained under ``simplefilter("error")`` (no warning of ours or of torch / diffusers /
    accelerate on a clean run) and left the global warning and logging state as it found it."""
    out, before, after = trained
    assert (out / "lorweb.safetensors").is_file()
    assert after == before


def test_the_clean_api_path_warns_nothing_even_as_errors(tmp_path):
    """inject, set_query under no_grad, forward, merged() without autograd, save and load: no warning at all (none of
    ours, no deprecation of torch / diffusers / safetensors triggered by the package) under ``-W error``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = tiny_flux()
        lf.inject_lorweb(t, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6))
        with torch.no_grad():
            lf.set_query(t, pair_query(1))
            m = tiny_pair_model()
            lf.set_query(m, pair_query(1))
            m(torch.randn(1, 3, 6))
            with lf.merged(m):
                m(torch.randn(1, 3, 6))
        lf.save_lorweb_weights(t, tmp_path / "w.safetensors", config={})
        lf.load_lorweb_weights(tiny_flux(), tmp_path / "w.safetensors")


def test_the_clean_pipeline_path_warns_nothing_even_as_errors(pipe):
    """A pipeline call (3 denoising steps) raises no warning at all under ``-W error``: no diffusers / transformers
    deprecation triggered by lorweb_fast, none of ours."""
    a = Image.new("RGB", (32, 32), (200, 30, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(a, a.transpose(Image.FLIP_LEFT_RIGHT), a, "x", num_inference_steps=3, max_sequence_length=MSL)


def test_check_folder_lets_other_libraries_warnings_through(tmp_path, monkeypatch):
    """The scan of ``data check`` silences lorweb_fast's own warnings (it lists their causes in the report); it must
    not silence PIL's decompression-bomb warning (an image above ``Image.MAX_IMAGE_PIXELS``), which the report does
    not list and training then gives: ``AnalogyFolder`` shows it (positive control), ``check_folder`` must too."""
    root = synthetic_folder(tmp_path / "d")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the 64 x 64 images: a warning (an error only above 6000)
    _, seen = caught(lambda: data.AnalogyFolder(root))
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in seen), where(seen)
    report, seen = caught(lambda: data.check_folder(root, progress=False))
    assert report["samples"] == 2
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in seen), where(seen)


# ================================================================================== 1./2. attribution and category
def _link(root):
    (root.parent / "elsewhere").mkdir()
    shutil.copy(root / "target" / "0000.png", root.parent / "elsewhere" / "x.png")
    os.symlink(root.parent / "elsewhere", root / "target" / "linked")


def _copy_as_jpeg(src, dst):
    with Image.open(src) as im:
        im.convert("RGB").save(dst, quality=95)


def _sixteen_bit(root):
    with Image.open(root / "target" / "0001.png") as im:
        size = im.size
    Image.new("I;16", size, 40000).save(root / "target" / "0001.png")


def _shared_control(root):
    (root / "target" / "sub").mkdir()
    shutil.copy(root / "target" / "0001.png", root / "target" / "sub" / "0001.png")


DATA_CASES = {  # id: (change to a 2-sample synthetic folder, AnalogyFolder kwargs, fragment of the warning)
    "symlinked folder": (_link, {}, "symlinked folders under"),
    "unread .bmp": (lambda r: Image.new("RGB", (8, 8)).save(r / "target" / "x.bmp"), {}, "1 image files under"),
    "several controls": (lambda r: _copy_as_jpeg(r / "control" / "0000.png", r / "control" / "0000.jpg"), {},
                         "several control images share a target's name (1 names)"),
    "shared target name": (lambda r: _copy_as_jpeg(r / "target" / "0000.png", r / "target" / "0000.jpg"), {},
                           "several target images share a name (1 names)"),
    "shared control": (_shared_control, {}, "share a file name and so one control image"),
    "skipped sample": (lambda r: (r / "target" / "0001.png").write_bytes(b"not a png"), {"skip_bad": True},
                       "skipping training sample 0001"),
    "BOM caption": (lambda r: (r / "captions" / "0000.txt").write_text("\ufeffflip it", encoding="utf-8"), {},
                    "1 caption files begin with a UTF-8 byte-order mark"),
    "missing caption": (lambda r: (r / "captions" / "0001.txt").unlink(), {}, "1 training samples have no caption"),
    "control without target": (lambda r: shutil.copy(r / "control" / "0000.png", r / "control" / "0099.png"), {},
                               "1 control images have no target image"),
    "16-bit image": (_sixteen_bit, {}, "mode I;16"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_folder_warnings_point_at_the_caller_once_per_scan(case, tmp_path):
    """Each training-folder warning: a LoRWeBWarning at the line that builds the AnalogyFolder, naming the count or the
    file; reading every sample afterwards (what each training step does) gives no further warning."""
    change, kwargs, fragment = DATA_CASES[case]
    root = synthetic_folder(tmp_path / "d")
    change(root)
    call = (lambda: data.AnalogyFolder(root, **kwargs))
    dataset, seen = caught(call)
    assert_at(call, seen, fragment)
    _, seen = caught(lambda: [dataset[i] for i in range(len(dataset))] * 3)
    assert ours(seen) == []


def _relation(root, spec=None, **kw):
    relation252k_folder(root, spec or {"cat-a": [(16, 12), (16, 12)]}, seed=1, **kw)
    return root


RELATION_CASES = {  # id: (folder setup(tmp) -> (src, out), prepare kwargs, fragment)
    "unknown category": (lambda t: (_relation(t / "rel"), t / "o"), {"filter_categories": ["cat-a", "nope"]},
                         "has no category nope (category filter)"),
    "labels entry without image": (lambda t: (_relation(t / "rel", skipped_entries=True), t / "o"), {},
                                   "skipped 1 Relation252K labels entries whose image file is missing"),
    "undecodable image": (lambda t: (_relation(t / "rel", {"cat-a": [(16, 12)] * 3}), t / "o"), {"bad": True},
                          "skipped 1 Relation252K images that cannot be decoded"),
    "small category": (lambda t: (_relation(t / "rel", {"cat-a": [(16, 12)] * 2, "cat-b": [(16, 12)]}), t / "o"),
                       {}, "1 categories have fewer than 2 usable pairs"),
    "unreadable metadata": (lambda t: (_relation(t / "rel"), t / "o"), {"metadata": True}, "cannot read the existing"),
}


@pytest.mark.parametrize("case", list(RELATION_CASES))
def test_relation252k_warnings_point_at_the_caller(case, tmp_path):
    """``data.prepare_relation252k``'s warnings: LoRWeBWarnings at the calling line, each naming its count, file or
    category."""
    setup, kwargs, fragment = RELATION_CASES[case]
    src, out = setup(tmp_path)
    kwargs = dict(kwargs)
    if kwargs.pop("bad", False):
        (src / "cat-a" / "Group1" / "img2.png").write_bytes(b"not a png")
    if kwargs.pop("metadata", False):
        out.mkdir()
        (out / "analogy_metadata.json").write_text("{not json")
    call = (lambda: data.prepare_relation252k(src, out, min_pairs_per_category=2, progress=False, **kwargs))
    _, seen = caught(call)
    assert_at(call, seen, fragment)


def test_model_layer_and_checkpoint_warnings_point_at_the_caller(tmp_path):
    """set_query in eval mode with autograd (model.py), a forward with autograd inside merged() (layer.py, reached
    through torch's Module.__call__ and contextlib), an official file adapting fewer layers (model.py), a config.yaml
    linear_alpha that is not read and a saved lora_alpha != rank (official_config.py), an unreadable checkpoint
    skipped in a folder (official_config.py through lora_api.load_lora_weights): each a LoRWeBWarning at this file's
    calling line, naming the value found."""
    m = tiny_pair_model()
    call = (lambda: lf.set_query(m, pair_query(2)))
    assert_at(call, caught(call)[1], "set_query on a model in eval mode with autograd enabled")
    m.train()
    with torch.no_grad():
        lf.set_query(m, pair_query(1))

    def forward_merged():
        with lf.merged(m):
            m(torch.randn(1, 3, 6))
    _, seen = caught(forward_merged)
    assert [(w.filename, w.lineno) for w in ours(seen)] == [(__file__, forward_merged.__code__.co_firstlineno + 2)]
    assert "forward with autograd inside merged()" in str(seen[0].message)
    flux = tiny_flux()  # the same through diffusers' FluxTransformer2DModel.forward and its blocks
    lf.inject_lorweb(flux, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6))
    with torch.no_grad():
        lf.set_query(flux, pair_query(1))

    def flux_merged():
        with lf.merged(flux):
            flux(**flux_inputs())
    _, seen = caught(flux_merged)
    assert [(w.filename, w.lineno) for w in ours(seen)] == [(__file__, flux_merged.__code__.co_firstlineno + 2)]
    call = (lambda: lf.load_lorweb_weights(tiny_flux(), partial_official_file(tmp_path / "p.safetensors")))
    assert_at(call, caught(call)[1], "adapts 19 of the 20 linear layers")
    lf.save_lorweb_weights(tiny_pair_model(), tmp_path / "c" / "w.safetensors", config={})
    yaml = tmp_path / "c" / "config.yaml"
    yaml.write_text(yaml.read_text().replace("linear_alpha: 2", "linear_alpha: 8"))
    call = (lambda: lf.load_lorweb_weights(tiny_pair_model(seed=1), tmp_path / "c" / "w.safetensors", yaml))
    assert_at(call, caught(call)[1], "network.linear_alpha=8 is not read")
    m4 = tiny_pair_model(config=pair_config(lora_alpha=4))
    call = (lambda: lf.save_lorweb_weights(m4, tmp_path / "d" / "w.safetensors", config={}))
    assert_at(call, caught(call)[1], "lora_alpha=4.0 != rank=2")
    folder = tmp_path / "f"
    folder.mkdir()
    lf.save_lorweb_weights(tiny_pair_model(), folder / "lorweb_000000010.safetensors")
    (folder / "lorweb.safetensors").write_bytes(b"truncated")
    call = (lambda: lora_api.load_lora_weights(tiny_pair_model(seed=2), folder))
    assert_at(call, caught(call)[1], "skipped the unreadable checkpoint file(s) lorweb.safetensors")


def test_image_plot_lock_and_evaluation_warnings_point_at_the_caller(tmp_path, monkeypatch):
    """flux.load_image of a 16-bit file, validation.plotting_available without matplotlib, a FolderLock on a file
    system without flock (_files.py), evalsets' b picks outside the aspect tolerance, score's runs folders of different
    triplets and the judge's cut answer (evaluation/): LoRWeBWarnings at the calling line."""
    Image.new("I;16", (32, 32), 30000).save(tmp_path / "deep.png")
    call = (lambda: load_image(tmp_path / "deep.png"))
    assert_at(call, caught(call)[1], "deep.png has more than 8 bits per channel (mode I;16)")
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib.figure", None)
        call = (lambda: validation.plotting_available("loss.png"))
        assert_at(call, caught(call)[1], "not drawing loss.png")
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    with monkeypatch.context() as mp:
        mp.setattr(fcntl, "flock", no_flock)
        lock = FolderLock(tmp_path / "locked", ".lock", "training run")
        call = (lambda: lock.acquire())
        assert_at(call, caught(call)[1], "does not support flock (No locks available)")
        lock.release()
    root = tiny.make_released_evalset(tmp_path / "set", {"close": (90, 60), "near": (50, 40)}, n_a_prime=1)
    call = (lambda: evalsets.read_evalset(root))
    assert_at(call, caught(call)[1], "1 a' image has fewer than 2 photos of their category with an aspect ratio "
                                     "within 0.15 of a's (e.g. ")
    solid_runs(tmp_path / "ours", ["t/0", "t/1"])
    solid_runs(tmp_path / "ckpt", ["t/0"])
    runs = {"ours": tmp_path / "ours", "ckpt": tmp_path / "ckpt"}
    call = (lambda: S.score(runs, tmp_path / "rep", metrics=["vlm"], judge=tiny.FixedJudge(), progress=False))
    assert_at(call, caught(call)[1], "hold different triplets (ours: 2, ckpt: 1; shared: 1)")
    judge = cutting_judge()
    call = (lambda: [judge(JudgeRequest("ours", f"t/{i}", "score", "rate it")) for i in range(5)])
    assert_at(call, caught(call)[1], "stopped at max_new_tokens=3")  # once for 5 cut answers
    assert judge.truncated == [f"t/{i}" for i in range(5)]


def solid_runs(root, keys):
    """``root/<task>/<id>/{a,a_prime,b,b_prime}.png``, solid colours per key (as test_eval_guards)."""
    for key in keys:
        d = root / key
        d.mkdir(parents=True, exist_ok=True)
        k = zlib.crc32(key.encode())
        for j, stem in enumerate(("a", "a_prime", "b", "b_prime")):
            Image.new("RGB", (16, 12), (k % 251, 50 * j, (k >> 8) % 251)).save(d / f"{stem}.png")


def cutting_judge():
    """A Gemma3Judge whose model answers every question with 3 tokens and no end of turn (cut at max_new_tokens=3);
    no model is loaded."""
    class Processor:
        def apply_chat_template(self, *args, **kwargs):
            return {"input_ids": torch.ones(1, 4, dtype=torch.long)}

        def decode(self, ids, skip_special_tokens=True):
            return "cut"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = type("GenerationConfig", (), {"eos_token_id": 1})()

        def generate(self, input_ids, max_new_tokens, **kwargs):
            return torch.cat([input_ids, torch.full((1, max_new_tokens), 7)], dim=1)

    judge = Gemma3Judge.__new__(Gemma3Judge)
    judge.processor, judge.model, judge.max_new_tokens, judge.truncated = Processor(), Model(), 3, []
    judge.last_truncated = False
    return judge


def test_pipeline_warnings_point_at_the_callers_line_through_diffusers(pipe, tmp_path):
    """The pipeline's warnings (raised inside ``LoRWeBKontextPipeline.__call__``, its serialising decorator and
    torch.no_grad): at the line of the ``pipe(...)`` call, naming the ratios, the image and its size."""
    a = Image.new("RGB", (32, 32), (200, 30, 30))
    wide, tall, long = (Image.new("RGB", s, (9, 90, 9)) for s in ((64, 32), (32, 64), (200, 32)))
    call = (lambda: pipe([a, a], [a, a], [wide, tall], "x", num_inference_steps=1, max_sequence_length=MSL))
    assert_at(call, caught(call)[1], "different aspect ratios (2.00, 0.50)")
    call = (lambda: pipe(long, a, a, "x", num_inference_steps=1, max_sequence_length=MSL))
    assert_at(call, caught(call)[1], "a[0] is 200x32 (aspect ratio 6.2:1)")
    big, small = Image.new("RGB", (40, 40), (1, 2, 3)), Image.new("RGB", (16, 16), (3, 2, 1))
    call = (lambda: pipe([a, a], [a, a], [big, small], "x", num_inference_steps=1, max_sequence_length=MSL))
    assert_at(call, caught(call)[1], "control grids of different sizes in calls of their own (64x64, 32x32)")
    Image.new("I;16", (32, 32), 30000).save(tmp_path / "deep.png")
    call = (lambda: pipe(tmp_path / "deep.png", a, a, "x", num_inference_steps=1, max_sequence_length=MSL))
    assert_at(call, caught(call)[1], "deep.png has more than 8 bits per channel")


def test_categories_and_filters_work_as_documented(tmp_path):
    """Every warning is a LoRWeBWarning (a UserWarning); a caller-module filter (``-W error::UserWarning:<module>``)
    catches it, a ``module="lorweb_fast"`` filter does not (README), a category filter silences it."""
    assert issubclass(lf.LoRWeBWarning, UserWarning) and lf.LoRWeBWarning is validation.LoRWeBWarning
    m = tiny_pair_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", category=UserWarning, module=re.escape(__name__))
        with pytest.raises(lf.LoRWeBWarning):
            lf.set_query(m, pair_query(1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("error", module="lorweb_fast")
        lf.set_query(m, pair_query(1))
        warnings.filterwarnings("ignore", category=lf.LoRWeBWarning)
        lf.set_query(m, pair_query(1))
    assert len(ours(seen)) == 1


# ==================================================================================================== 3. repetition
@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_merged_autograd_warning_once_per_block_not_per_forward(strategy):
    """5 forwards with autograd inside one merged() block warn once (every strategy); 5 blocks warn 5 times with one
    constant text, which Python's default filter shows once."""
    m = tiny_pair_model().train()
    with torch.no_grad():
        lf.set_query(m, pair_query(1))
    x = torch.randn(1, 3, 6)

    def block():
        with lf.merged(m, strategy=strategy):
            for _ in range(5):
                m(x)
    assert len(ours(caught(block)[1])) == 1
    assert len(ours(caught(lambda: [block() for _ in range(5)])[1])) == 5
    assert len(ours(caught(lambda: [block() for _ in range(5)], "default")[1])) == 1


def test_a_persisting_pipeline_cause_warns_per_call_not_per_denoising_step(pipe, tmp_path):
    """A 16-bit input in 5 calls of 3 denoising steps: 5 warnings under "always" (one per call, not 15), 1 under the
    default filter (constant text)."""
    Image.new("I;16", (32, 32), 30000).save(tmp_path / "deep.png")
    a = Image.new("RGB", (32, 32), (200, 30, 30))

    def calls():
        for _ in range(5):
            pipe(tmp_path / "deep.png", a, a, "x", num_inference_steps=3, max_sequence_length=MSL)
    assert len(ours(caught(calls)[1])) == 5
    assert len(ours(caught(calls, "default")[1])) == 1


def test_set_query_eval_warning_has_a_constant_text():
    """The eval-mode set_query warning fires per call (its cause is per call) with one constant text: the default
    filter shows it once over 5 calls."""
    m = tiny_pair_model()
    assert len(ours(caught(lambda: [lf.set_query(m, pair_query(2, seed=i)) for i in range(5)])[1])) == 5
    assert len(ours(caught(lambda: [lf.set_query(m, pair_query(2, seed=i)) for i in range(5)], "default")[1])) == 1


def test_training_warns_once_per_run_not_per_step(train_assets, tmp_path):
    """A 6-step run (2 checkpoints) whose causes persist at every step (batch_size 4 > 3 samples, a sample without
    caption): each warned exactly once, at the line calling train(); the global warning / logging state is kept."""
    shutil.copytree(train_assets / "data", tmp_path / "data")
    (tmp_path / "data" / "captions" / "0001.txt").unlink()
    cfg = tiny_train_config(train_assets, tmp_path / "run", data=str(tmp_path / "data"), steps=6, checkpoint_every=3,
                            batch_size=4, batching="bucket")
    before = global_state()
    call = (lambda: training.train(cfg))
    result, seen = caught(call)
    assert result["step"] == 6
    assert_at(call, seen, "batch_size (--batch-size) 4 is larger than the 3 training samples")
    assert_at(call, seen, "1 training samples have no caption")
    assert len(ours(seen)) == 2, where(seen)
    assert global_state() == before


def test_evalset_aspect_shortfall_is_one_warning_per_cause(tmp_path):
    """Five a' images of one a in a category with one photo near a's aspect ratio: one cause, one warning."""
    root = tiny.make_released_evalset(tmp_path / "set", {"close": (90, 60), "near": (50, 40)}, n_a_prime=5)
    _, seen = caught(lambda: evalsets.read_evalset(root))
    assert len(ours(seen, "5 a' images have fewer than 2 photos of their category with an aspect ratio")) == 1, \
        where(seen)


# ===================================================================================================== 4. -W error
def test_warnings_raised_as_errors_change_nothing_in_the_model_and_files(tmp_path):
    """Under ``simplefilter("error")``: set_query in eval mode keeps the previous coefficients; a partial official
    file, a config.yaml linear_alpha and a folder with an unreadable final file leave the model as it was; a save
    with lora_alpha != rank writes no folder; a merged() forward with autograd restores the weights."""
    m = tiny_pair_model()
    with torch.no_grad():
        lf.set_query(m, pair_query(2, seed=5))
    state = lorweb_model_state(m)
    assert raises_as_error(lambda: lf.set_query(m, pair_query(2)))
    assert_same_model_state(lorweb_model_state(m), state)
    fresh = tiny_flux()
    state = lorweb_model_state(fresh)
    assert raises_as_error(lambda: lf.load_lorweb_weights(fresh, partial_official_file(tmp_path / "p.safetensors")))
    assert_same_model_state(lorweb_model_state(fresh), state) and lf.lorweb_layers(fresh) == {}
    lf.save_lorweb_weights(tiny_pair_model(), tmp_path / "c" / "w.safetensors", config={})
    yaml = tmp_path / "c" / "config.yaml"
    yaml.write_text(yaml.read_text().replace("linear_alpha: 2", "linear_alpha: 8"))
    other = tiny_pair_model(seed=1)
    state = lorweb_model_state(other)
    assert raises_as_error(lambda: lf.load_lorweb_weights(other, tmp_path / "c" / "w.safetensors", yaml))
    assert_same_model_state(lorweb_model_state(other), state)
    folder = tmp_path / "f"
    folder.mkdir()
    lf.save_lorweb_weights(tiny_pair_model(seed=3), folder / "lorweb_000000010.safetensors")
    (folder / "lorweb.safetensors").write_bytes(b"truncated")
    assert raises_as_error(lambda: lora_api.load_lora_weights(other, folder))
    assert_same_model_state(lorweb_model_state(other), state)
    m4 = tiny_pair_model(config=pair_config(lora_alpha=4))
    assert raises_as_error(lambda: lora_api.save_pretrained(m4, tmp_path / "save"))
    assert not (tmp_path / "save").exists()
    m.train()
    with torch.no_grad():
        lf.set_query(m, pair_query(1))
    state = lorweb_model_state(m)

    def forward_merged():
        with lf.merged(m):
            m(torch.randn(1, 3, 6))
    assert raises_as_error(forward_merged)
    assert_same_model_state(lorweb_model_state(m), state)


def test_pipeline_warning_raised_as_error_keeps_the_analogy(pipe):
    """A batch of b images of different aspect ratios under ``-W error``: raised before the analogy is set."""
    a = Image.new("RGB", (32, 32), (200, 30, 30))
    pipe(a, a, a, "x", num_inference_steps=1, max_sequence_length=MSL)
    state = lorweb_model_state(pipe.transformer)
    wide, tall = Image.new("RGB", (64, 32)), Image.new("RGB", (32, 64))
    assert raises_as_error(lambda: pipe([a, a], [a, a], [wide, tall], "x", num_inference_steps=1,
                                        max_sequence_length=MSL))
    assert_same_model_state(lorweb_model_state(pipe.transformer), state)


def test_data_and_lock_warnings_raised_as_errors_leave_no_files(tmp_path, monkeypatch):
    """``data prepare`` with a category short of pairs and a FolderLock on a file system without flock, under
    ``-W error``: raised before any output folder or file exists."""
    src = _relation(tmp_path / "rel", {"cat-a": [(16, 12)] * 2, "cat-b": [(16, 12)]})
    assert raises_as_error(lambda: data.prepare_relation252k(src, tmp_path / "o" / "p", min_pairs_per_category=2,
                                                             progress=False))
    assert not (tmp_path / "o").exists()
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert raises_as_error(lambda: FolderLock(tmp_path / "l" / "m", ".lock", "training run").acquire())
    assert not (tmp_path / "l").exists()


def test_training_start_warning_raised_as_error_creates_nothing(train_assets, tmp_path):
    """batch_size above the number of samples: the warning points at the train() call and, raised as an error, comes
    before the run folder (or its lock) exists."""
    cfg = tiny_train_config(train_assets, tmp_path / "run", steps=1, batch_size=4, batching="bucket")
    call = (lambda: training.train(cfg))
    w = first_warning(call)
    assert (w.category, w.filename, w.lineno) == (lf.LoRWeBWarning, __file__, call.__code__.co_firstlineno)
    assert "larger than the 3 training samples" in str(w.message)
    assert not (tmp_path / "run").exists()


def test_resume_fallback_warning_points_at_the_caller_and_as_error_changes_nothing(trained, train_assets, tmp_path):
    """The newest checkpoint's trainer state corrupt: ``find_resumable_checkpoint`` warns at the caller's line, names
    the file and falls back; a resume under ``-W error`` stops there with the run folder as it was."""
    out = run_copy(trained, tmp_path)
    (out / "checkpoints" / "step-00000002" / "trainer_state.pt").write_bytes(b"garbage")
    call = (lambda: training.find_resumable_checkpoint(out))
    (ckpt, _), seen = caught(call)
    assert ckpt.name == "step-00000001"
    assert_at(call, seen, "cannot resume from step-00000002")
    before = tree(out)
    cfg = tiny_train_config(train_assets, out, steps=3, checkpoint_every=1, resume=True)
    assert raises_as_error(lambda: training.train(cfg))
    assert tree(out) == before


def test_torn_log_warning_points_at_the_train_call(trained, train_assets, tmp_path):
    """A torn last line of loss.jsonl: the resume's warning is at the train() call and counts the line."""
    out = run_copy(trained, tmp_path)
    with open(out / "loss.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    cfg = tiny_train_config(train_assets, out, steps=3, checkpoint_every=1, resume=True)
    call = (lambda: training.train(cfg))
    w = first_warning(call)
    assert (w.category, w.filename, w.lineno) == (lf.LoRWeBWarning, __file__, call.__code__.co_firstlineno)
    assert "1 incomplete line(s) left out" in str(w.message)


def test_torn_log_warning_raised_as_error_leaves_the_run_folder_as_it_was(trained, train_assets, tmp_path):
    """README: "a refused call changes nothing (... no file written or deleted)"."""
    out = run_copy(trained, tmp_path)
    with open(out / "loss.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    before = tree(out)
    cfg = tiny_train_config(train_assets, out, steps=3, checkpoint_every=1, resume=True)
    assert raises_as_error(lambda: training.train(cfg))
    after = tree(out)
    assert after == before, [a[0] for a, b in zip(before, after) if a != b]


# ================================================================================================== 2. category
def test_a_resume_with_another_process_count_is_a_lorweb_warning(trained, train_assets, tmp_path):
    """A checkpoint of a 2-process run resumed by one process: the global batch size halves; a LoRWeBWarning naming
    both counts, as every other user-actionable condition of the trainer."""
    out = run_copy(trained, tmp_path)
    state_path = out / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["num_processes"] = 2
    torch.save(state, state_path)
    cfg = tiny_train_config(train_assets, out, steps=3, checkpoint_every=1, resume=True)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lorweb_fast.training").addHandler(handler)
    try:
        result, seen = caught(lambda: training.train(cfg))
    finally:
        logging.getLogger("lorweb_fast.training").removeHandler(handler)
    assert result["step"] == 3
    assert not any("2 processes with 1" in r.getMessage() for r in records)  # not also a log record
    assert len(ours(seen, "resuming a run of 2 processes with 1")) == 1, where(seen)


# ======================================================================================================= 5. text
def test_a_16_bit_pil_input_is_named_by_its_role(pipe):
    a = Image.new("RGB", (32, 32), (200, 30, 30))
    deep = Image.new("I;16", (32, 32), 30000)
    _, seen = caught(lambda: pipe(a, deep, a, "x", num_inference_steps=1, max_sequence_length=MSL))
    (w,) = ours(seen, "more than 8 bits")
    assert "a_prime" in str(w.message), str(w.message)


def test_the_lora_alpha_warning_says_what_to_do(tmp_path):
    m4 = tiny_pair_model(config=pair_config(lora_alpha=4))
    _, seen = caught(lambda: lf.save_lorweb_weights(m4, tmp_path / "w.safetensors", config={}))
    (w,) = ours(seen, "lora_alpha")
    assert "lora_alpha=None" in str(w.message) or "lora_alpha=2" in str(w.message), str(w.message)


def test_the_cut_answer_warning_names_the_api_argument():
    judge = cutting_judge()
    _, seen = caught(lambda: judge(JudgeRequest("ours", "t/0", "score", "rate it")))
    (w,) = ours(seen, "stopped at max_new_tokens=3")
    assert str(w.message).count("max_new_tokens") >= 2, str(w.message)  # the value found and the knob


def test_the_cli_shows_one_warning_per_cause(lorweb_assets, tmp_path):
    """``lorweb-fast infer`` with a 16-bit --a: checked up front and then generated, one warning (not one per read),
    at the command's call (in-process: this line), naming the file."""
    Image.new("I;16", (32, 32), 30000).save(tmp_path / "a16.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "b.png")
    argv = ["infer", "--a", str(tmp_path / "a16.png"), "--a-prime", str(tmp_path / "b.png"), "--b",
            str(tmp_path / "b.png"), "--prompt", "x", "--weights", str(lorweb_assets / "lorweb.safetensors"),
            "--model", str(lorweb_assets / "pipe"), "--encoder", str(lorweb_assets / "clip"), "--steps", "1",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "o.png"), "--resolution", "native",
            "--long-edge", "64", "--pipe-arg", f"max_sequence_length={MSL}"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        call = (lambda: cli.main(argv))
        rc, seen = caught(call)
    assert rc == 0, err.getvalue()
    assert_at(call, seen, "a16.png has more than 8 bits per channel")
    assert len(ours(seen)) == 1


def test_data_prepare_says_each_cause_once(tmp_path):
    src = _relation(tmp_path / "rel", {"cat-a": [(16, 12)] * 2, "cat-b": [(16, 12)]})
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        rc, seen = caught(lambda: cli.main(["data", "prepare", str(src), str(tmp_path / "o"), "--quiet",
                                            "--min-pairs-per-category", "2"]))
    assert rc == 0
    said = len(ours(seen, "fewer than 2 usable pairs")) + out.getvalue().count("fewer than 2 usable pairs")
    assert said == 1, (where(seen), out.getvalue())
