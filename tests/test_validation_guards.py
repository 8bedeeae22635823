"""Guards for ``lorweb_fast/validation.py`` found by a mutation audit: each test here failed on a hand-made mutant of
the argument checks that the other tests let pass, and passes on the original.

What they pin: the boundaries of the number checks (closed ends included, a one-element tensor read as its number, the
value returned as a float, choices refused), the path checks (a folder that is readable but not writable, an existing
output folder that is not writable, an input that is a folder or unreadable, upper-case extensions), the device check
(a CUDA index past the visible devices, a device type this machine lacks), the pipeline arguments' ranges,
TrainConfig's betas, seed range and caption dropout at most 1, and the options of ``infer`` (--seed up to 2**64 - 1,
--config .yml, --pipe-arg sigmas, --config beside a --weights folder, a refused call leaving ``args`` as it was),
``demo`` (--learning-rate > 0, --seed) and ``data check`` / ``data prepare``, each a one-line exit 2 before anything
loads.
"""

import argparse
import math
import os

import numpy as np
import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import cli, flux, official_config as oc, validation as V
from lorweb_fast.testing import cli_usage_error, infer_input_files, tiny_lorweb_pair
from lorweb_fast.training import TrainConfig
from lorweb_fast.validation import UsageError


# --------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value,lo,hi,lo_open,hi_open", [
    (1.0, 0.0, 1.0, False, False), (0.0, 0.0, 1.0, False, True), (1e4, 0.0, 1e4, False, False),
    (0.5, 0.0, 1.0, True, True), (-1.0, None, -1.0, False, False)])
def test_check_real_accepts_its_closed_ends_and_returns_a_float(value, lo, hi, lo_open, hi_open):
    """A closed end is part of the range ([0, 1] takes 1.0; guidance_scale takes 1e4); the result is a float."""
    got = V.check_real("x", value, lo, hi, lo_open=lo_open, hi_open=hi_open)
    assert got == value and type(got) is float


@pytest.mark.parametrize("value,want", [(3, 3.0), (np.float32(0.5), 0.5), (torch.tensor(0.25), 0.25),
                                        (torch.tensor([2]), 2.0), (torch.tensor(1.5, dtype=torch.float64), 1.5)])
def test_check_real_takes_python_numpy_and_one_element_tensor_numbers(value, want):
    """An int, a numpy scalar and a one-element tensor (e.g. a learning rate or scale computed with torch) are
    numbers, returned as Python floats."""
    got = V.check_real("scale", value, lo=0.0)
    assert got == want and type(got) is float


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor(1 + 0j), torch.ones(2)])
def test_check_real_refuses_bool_complex_and_multi_element_tensors(value):
    with pytest.raises(TypeError, match="scale must be a real number"):
        V.check_real("scale", value)


@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400], ids=["1e400", "-1e400"])
def test_ints_beyond_the_float_range_are_not_finite_reals(value):
    """An int too large for a float is refused as not finite (ValueError naming the argument), not with Python's
    OverflowError: by check_real (LoRWeBLinear's lora_alpha, the ops' scale) and by set_lorweb_scale."""
    with pytest.raises(ValueError, match=r"^scale must be finite, got -?inf$"):
        V.check_real("scale", value)
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        lf.LoRWeBLinear(torch.nn.Linear(4, 3), num_loras=2, rank=1, key_dim=2, query_dim=3, lora_alpha=value)
    model = lf.testing.tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3,
                                                        target_modules=r"\d"))
    with pytest.raises(ValueError, match="scale must be a finite real number"):
        lf.set_lorweb_scale(model, value)
    assert lf.get_lorweb_scale(model) == 1.0


def test_check_choice_refuses_a_value_outside_the_choices():
    """The error names the argument and the choices (LoRWeBConfig.activation / reduce rely on it)."""
    assert V.check_choice("activation", "tanh", ("softmax", "tanh")) == "tanh"
    with pytest.raises(ValueError, match=r"^activation must be one of \('softmax', 'tanh'\), got 'relu'$"):
        V.check_choice("activation", "relu", ("softmax", "tanh"))
    with pytest.raises(ValueError, match="LoRWeBConfig.activation must be one of"):
        lf.LoRWeBConfig(activation="relu").validate()


# ----------------------------------------------------------------------------------------------------- paths
def _deny(monkeypatch, path, mode):
    """os.access answers False for ``path`` when asked for ``mode`` (root bypasses permissions)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(path) and m & mode else real(p, m))


def test_a_readable_but_not_writable_folder_is_refused(tmp_path, monkeypatch):
    """The nearest existing folder must be writable, not merely readable."""
    _deny(monkeypatch, tmp_path, os.W_OK)
    with pytest.raises(UsageError, match=f"--out {tmp_path / 'b.png'}: folder {tmp_path} is not writable"):
        V.check_output_file("--out", tmp_path / "b.png", {".png"})
    with pytest.raises(UsageError, match="is not writable"):
        V.check_output_dir("--out", tmp_path / "run")


@pytest.mark.parametrize("argv", [["demo", "--out", "{locked}"], ["data", "check", "{data}", "--dump", "{locked}"]])
def test_an_existing_output_folder_that_is_not_writable_is_one_line(tmp_path, monkeypatch, capsys, argv):
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "data").mkdir()
    _deny(monkeypatch, locked, os.W_OK)
    argv = [a.format(locked=locked, data=tmp_path / "data") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{locked} is not writable" in err
    assert list(locked.iterdir()) == []


def test_an_input_file_that_is_a_folder_or_unreadable(tmp_path, monkeypatch):
    """A folder is named as one (not "not a regular file"); an unreadable file is refused."""
    (tmp_path / "c.yaml").mkdir()
    with pytest.raises(UsageError, match=r"--config .*c.yaml is a folder; give a file"):
        V.check_input_file("--config", tmp_path / "c.yaml", {".yaml"})
    (tmp_path / "d.yaml").write_text("x: 1")
    _deny(monkeypatch, tmp_path / "d.yaml", os.R_OK)
    with pytest.raises(UsageError, match=r"--config .*d.yaml is not readable"):
        V.check_input_file("--config", tmp_path / "d.yaml", {".yaml"})


def test_upper_case_extensions_are_accepted(tmp_path):
    """PIL and the checkpoint readers go by the lower-cased extension: B.PNG and W.SAFETENSORS are fine."""
    assert V.check_output_file("--out", tmp_path / "B.PNG", V.image_suffixes()) == tmp_path / "B.PNG"
    (tmp_path / "W.SAFETENSORS").write_bytes(b"x")
    assert V.check_input_file("--weights", tmp_path / "W.SAFETENSORS", {".safetensors"}) == tmp_path / "W.SAFETENSORS"


# ---------------------------------------------------------------------------------------------------- device
def test_a_cuda_index_past_the_visible_devices_is_refused(monkeypatch):
    """With one visible GPU, cuda:0 is fine and cuda:1 is refused up front."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert V.check_device("--device", "cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="--device cuda:1: only 1 CUDA devices are visible"):
        V.check_device("--device", "cuda:1")


def test_a_device_type_this_machine_lacks_is_refused():
    if torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(UsageError, match="--device xpu: no xpu device on this machine"):
        V.check_device("--device", "xpu")


# -------------------------------------------------------------------------------------------------- pipeline
def _call(self, image=None, prompt=None, num_images_per_prompt=1, max_sequence_length=512, true_cfg_scale=1.0):
    """A stand-in for FluxKontextPipeline.__call__'s signature."""


@pytest.mark.parametrize("kwargs,fragment", [({"num_images_per_prompt": 0}, "num_images_per_prompt must be"),
                                             ({"max_sequence_length": 513}, "max_sequence_length must be"),
                                             ({"true_cfg_scale": -0.5}, "true_cfg_scale must be")])
def test_pipeline_argument_ranges(kwargs, fragment):
    """num_images_per_prompt >= 1, max_sequence_length <= 512 (T5's), true_cfg_scale >= 0; the ends are fine."""
    with pytest.raises(ValueError, match=fragment):
        V.check_pipe_kwargs(kwargs, _call)
    assert V.check_pipe_kwargs({"num_images_per_prompt": 1, "max_sequence_length": 512, "true_cfg_scale": 0.0},
                               _call)


@pytest.mark.parametrize("options,fragment", [({"num_inference_steps": V.MAX_STEPS + 1}, "num_inference_steps"),
                                              ({"output_type": "latent"}, "output_type must be 'pil' or 'np'"),
                                              ({"merge": "half"}, "merge must be 'auto', 'none'"),
                                              ({"seed": -1}, r"seed must be an integer in \[0, 18446744073709551615\]"),
                                              ({"seed": V.MAX_SEED + 1}, "seed must be an integer in"),
                                              ({"seed": "50"}, "seed must be an integer .*got str '50'"),
                                              ({"seed": 50.0}, "seed must be an integer .*got float"),
                                              ({"progress": "yes"}, "progress must be True, False or None")])
def test_generation_options_ranges(options, fragment):
    """Refused before anything runs: more steps than MAX_STEPS, an output type or merge strategy that does not
    exist, a seed that is no integer in [0, MAX_SEED] (as --seed), a progress that is no bool; the ends of the
    ranges are fine."""
    base = dict(num_inference_steps=V.MAX_STEPS, guidance_scale=V.MAX_GUIDANCE_SCALE, long_edge=V.MIN_LONG_EDGE,
                merge="auto", output_type="np", seed=V.MAX_SEED, progress=None)
    V.check_generation_options(**base)
    V.check_generation_options(**{**base, "seed": 0, "progress": False})
    with pytest.raises((ValueError, TypeError), match=fragment):
        V.check_generation_options(**{**base, **options})


# -------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("field,value,exc,fragment", [("betas", (0.9,), ValueError, "betas must be two numbers"),
                                                      ("betas", (0.9, 0.99, 0.5), ValueError, "betas must be two"),
                                                      ("seed", 2 ** 63, ValueError, "seed must be an integer in"),
                                                      ("max_sequence_length", 513, ValueError,
                                                       "max_sequence_length must be an integer in \\[1, 512\\]"),
                                                      ("data", "", TypeError, "data must be a non-empty string")])
def test_train_config_ranges(field, value, exc, fragment):
    """Two betas, a seed a torch generator takes, T5's 512 tokens at most, a non-empty data folder."""
    with pytest.raises(exc, match=fragment):
        TrainConfig(**{"data": "d", "out": "o", field: value}).validate()


@pytest.mark.parametrize("field,value", [("seed", 2 ** 63 - 1), ("max_sequence_length", 512), ("keep_checkpoints", 0),
                                         ("num_workers", 0), ("caption_dropout", 1.0)])
def test_train_config_accepts_the_range_ends(field, value):
    """The ends are valid: keep_checkpoints 0 keeps every checkpoint (rotate_checkpoints), 0 workers loads in the
    main process, caption dropout 1 drops every caption."""
    TrainConfig(**{"data": "d", "out": "o", field: value}).validate()


def test_train_ranges_keep_caption_dropout_a_probability():
    """check_train_config's range table (the only check of this field, so TrainConfig.validate says the same): a
    caption dropout above 1 or below 0 is refused with the range as documented, 1 itself (every caption dropped) is
    fine."""
    V.check_train_config(TrainConfig(data="d", out="o", caption_dropout=1.0))
    for bad in (1.5, -0.5):
        for check in (V.check_train_config, TrainConfig.validate):
            with pytest.raises(ValueError, match=rf"^caption_dropout must be in \[0, 1\], got {bad}$"):
                check(TrainConfig(data="d", out="o", caption_dropout=bad))


# ------------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images, marker-only model and encoder folders, a checkpoint (metadata: the encoder, query mode "cat-aa'b")
    and a run folder holding it with a config.yaml, plus another config.yaml saying "caa'b"."""
    root = infer_input_files(tmp_path_factory.mktemp("validation_guards"))
    m = tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    lf.save_lorweb_weights(m, root / "w.safetensors", metadata={"encoder": str(root / "clip")})
    settings = {"num_loras": 2, "rank": 1, "lora_alpha": 1, "key_dim": 4, "encoder": str(root / "clip")}
    (root / "run").mkdir()
    lf.save_lorweb_weights(m, root / "run" / "LoRWeB.safetensors", metadata={"encoder": str(root / "clip")})
    oc.write_config_yaml(root / "run" / "config.yaml", {**settings, "query_mode": "cat-aa'b"})
    (root / "other").mkdir()
    oc.write_config_yaml(root / "other" / "config.yml", {**settings, "query_mode": "caa'b"})
    return root


class ModelLoaded(Exception):
    pass


@pytest.fixture
def loads(monkeypatch):
    """The pipeline loader records (model, weights, kwargs) and stops the run."""
    calls = []

    def from_pretrained(cls, *args, **kwargs):
        calls.append((*args, kwargs))
        raise ModelLoaded

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", classmethod(from_pretrained))
    return calls


def infer_argv(root, tmp_path, *extra):
    return ["infer", "--a", str(root / "a.png"), "--a-prime", str(root / "a_prime.png"), "--b", str(root / "b.png"),
            "--prompt", "p", "--weights", str(root / "w.safetensors"), "--model", str(root / "model"),
            "--out", str(tmp_path / "out" / "b.png"), "--device", "cpu", *extra]


INFER_REFUSED = {
    "seed 2**64": (["--seed", str(2 ** 64)], "--seed must be an integer in [0, 18446744073709551615]"),
    "sigmas not a list": (["--pipe-arg", "sigmas=0.5"], "--pipe-arg sigmas must be a non-empty JSON list"),
    "sigmas empty": (["--pipe-arg", "sigmas=[]"], "--pipe-arg sigmas must be a non-empty JSON list"),
    "sigma above 1": (["--pipe-arg", "sigmas=[1.0, 1.5]"], "--pipe-arg sigmas[1] must be in [0.0, 1.0], got 1.5"),
    "true_cfg_scale negative": (["--pipe-arg", "true_cfg_scale=-1"], "--pipe-arg true_cfg_scale must be >= 0.0"),
    "config a folder": (["--config", "{root}/run"], "--config {root}/run is a folder; give a file"),
}


@pytest.mark.parametrize("case", sorted(INFER_REFUSED))
def test_infer_refuses_up_front(files, tmp_path, capsys, loads, case):
    extra, fragment = INFER_REFUSED[case]
    err = cli_usage_error(capsys, infer_argv(files, tmp_path, *[x.format(root=files) for x in extra]))
    assert fragment.format(root=files) in err
    assert loads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--seed", str(2 ** 64 - 1)], ["--pipe-arg", "sigmas=[1.0, 0.5, 0.0]"],
                                   ["--config", "{root}/other/config.yml", "--query-mode", "caa'b"],
                                   ["--out", "{tmp}/B.PNG"]])
def test_infer_accepts_the_range_ends(files, tmp_path, loads, extra):
    """Positive controls at the ends: the largest seed a torch generator takes, sigmas 1 and 0, a config.yml,
    an upper-case image extension."""
    with pytest.raises(ModelLoaded):
        cli.main(infer_argv(files, tmp_path, *[x.format(root=files, tmp=tmp_path) for x in extra]))
    assert len(loads) == 1


def test_an_explicit_config_wins_over_the_one_beside_a_weights_folder(files, tmp_path, loads):
    """--weights RUN_DIR --config OTHER: the run loads OTHER (its query mode "caa'b" is what the checks used)."""
    with pytest.raises(ModelLoaded):
        cli.main(infer_argv(files, tmp_path, "--weights", str(files / "run"), "--config",
                            str(files / "other" / "config.yml")))
    assert loads[0][1] == str(files / "run" / "LoRWeB.safetensors")
    assert loads[0][2]["config"] == str(files / "other" / "config.yml")


def _args(files, tmp_path, **over):
    return cli.build_parser().parse_args(infer_argv(files, tmp_path, *[x for k, v in over.items()
                                                                       for x in (k, str(v))]))


def test_a_refused_infer_check_leaves_args_as_they_were(files, tmp_path):
    """A --weights folder resolved to its checkpoint, then a later check fails: ``args`` keep the folder (the
    rewrite to the checked local files happens only once every check has passed, weight_name cleared)."""
    args = _args(files, tmp_path, **{"--weights": files / "run", "--config": files / "other" / "config.yml",
                                     "--query-source": "images"})
    args.pipe_kwargs = {}
    before = vars(args).copy()
    with pytest.raises(UsageError, match="--query-source images encodes a, a', b separately"):
        V.check_infer_args(args)
    assert vars(args) == before
    args = _args(files, tmp_path, **{"--weights": files / "run", "--weight-name": "LoRWeB.safetensors"})
    args.pipe_kwargs = {}
    V.check_infer_args(args)
    assert (args.weights, args.config, args.weight_name) == (str(files / "run" / "LoRWeB.safetensors"),
                                                             str(files / "run" / "config.yaml"), None)


@pytest.mark.parametrize("extra,fragment", [(["--learning-rate", "0"], "--learning-rate must be > 0"),
                                            (["--seed", str(2 ** 63)], "--seed must be an integer in [0,")])
def test_demo_refuses_up_front(tmp_path, capsys, extra, fragment):
    assert fragment in cli_usage_error(capsys, ["demo", "--out", str(tmp_path / "demo"), *extra])
    assert not (tmp_path / "demo").exists()


DATA_REFUSED = {
    "check long edge 16": (["check", "{data}", "--long-edge", "16"], "--long-edge must be an integer >= 32"),
    "check dump a file": (["check", "{data}", "--dump", "{file}"], "--dump {file} is a file; give a folder"),
    "prepare min pairs 1": (["prepare", "{data}", "{tmp}/o", "--min-pairs-per-category", "1"],
                            "--min-pairs-per-category must be an integer >= 2"),
    "prepare filter json missing": (["prepare", "{data}", "{tmp}/o", "--filter-json", "{tmp}/no.json"],
                                    "--filter-json {tmp}/no.json does not exist"),
    "prepare out a file": (["prepare", "{data}", "{file}"], "out {file} is a file; give a folder"),
}


@pytest.mark.parametrize("case", sorted(DATA_REFUSED))
def test_data_commands_refuse_up_front(tmp_path, capsys, monkeypatch, case):
    """Refused before any folder is read: the readers are replaced by ones that fail the test."""
    from lorweb_fast import data

    def reader(*args, **kwargs):
        raise AssertionError("a folder was read")

    monkeypatch.setattr(data, "check_folder", reader)
    monkeypatch.setattr(data, "prepare_relation252k", reader)
    (tmp_path / "data").mkdir()
    (tmp_path / "f").write_text("x")
    argv, fragment = DATA_REFUSED[case]
    fmt = dict(data=tmp_path / "data", file=tmp_path / "f", tmp=tmp_path)
    err = cli_usage_error(capsys, ["data", *[a.format(**fmt) for a in argv], "--quiet"])
    assert fragment.format(**fmt) in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [1, 3])
def test_data_check_takes_an_odd_divisibility_with_the_long_edge_rule(value):
    """--bucket-divisibility must be even (and >= 2) for --resize bucket only; the long-edge rule does not use it
    (any integer >= 1, as TrainConfig)."""
    args = argparse.Namespace(data_command="check", long_edge=64, bucket_divisibility=value, resize="long-edge",
                              dump=None)
    V.check_data_args(args)
    with pytest.raises(UsageError, match="--bucket-divisibility must be (even|an integer >= 2)"):
        V.check_data_args(argparse.Namespace(**{**vars(args), "resize": "bucket"}))


def test_hub_offline_spellings(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=true / yes are offline too (huggingface_hub's own spellings): an uncached hub id is refused."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    for value in ("1", "true", "YES"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(UsageError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
            V.check_model_source("--model", "someone/absent-model", "model_index.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert V.check_model_source("--model", "someone/absent-model", "model_index.json") == "someone/absent-model"


def test_warnings_point_at_the_callers_line_not_at_lorweb_fast():
    """A warning raised deep inside lorweb_fast (through torch's Module.__call__, contextlib's merged() and the
    model helpers) is attributed to the line of this file that made the call, so that Python's default filter and a
    user's ``filterwarnings`` by module see the user's code; a helper of a package outside the list is where the
    walk stops."""
    import warnings

    m = tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lf.set_query(m, torch.randn(1, 6, requires_grad=True))  # eval mode with autograd: warns
    assert [(w.filename, "carry autograd" in str(w.message)) for w in caught] == [(__file__, True)]

    for p in m.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        lf.set_query(m, torch.randn(1, 6))
    with lf.merged(m), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = __import__("inspect").currentframe().f_lineno + 1
        m(torch.randn(1, 6))  # a forward with autograd inside merged(): warns from LoRWeBLinear's forward
    assert [(w.filename, w.lineno) for w in caught if "get no gradient" in str(w.message)] == [(__file__, line)]

    user_module = {"__name__": "user_code", "V": V}
    exec(compile("def call():\n    V.warn('from user code')\n", "user_code.py", "exec"), user_module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        user_module["call"]()  # the walk stops at user_code's frame, before this file's
    assert [(w.filename, w.lineno) for w in caught] == [("user_code.py", 2)]


def test_warnings_are_lorweb_warnings_that_a_category_filter_silences():
    """Every lorweb_fast warning has the category ``lf.LoRWeBWarning``, a UserWarning (Python's default filter and
    ``pytest.warns(UserWarning)`` still see it): ``filterwarnings(category=lf.LoRWeBWarning)`` silences it, as a
    ``module="lorweb_fast"`` filter cannot (the warning is attributed to the caller's line)."""
    import warnings

    m = tiny_lorweb_pair(lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=6, target_modules=r"\d"))
    query = torch.randn(1, 6, requires_grad=True)  # eval mode with autograd: warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="lorweb_fast")
        lf.set_query(m, query)
    assert [w.category for w in caught] == [lf.LoRWeBWarning] and issubclass(lf.LoRWeBWarning, UserWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=lf.LoRWeBWarning)
        lf.set_query(m, query)
    assert caught == []
    assert lf.LoRWeBWarning is V.LoRWeBWarning and "LoRWeBWarning" in lf.__all__


# ------------------------------------------------------------------------------------------------ finiteness
FINITENESS_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
                     torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FINITENESS_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "inf_and_-inf", "none"])
def test_all_finite_finds_any_non_finite_value(dtype, bad):
    """``all_finite`` decides by the sum first: a NaN, an Inf, or an Inf and a -Inf whose sum is NaN are each found
    wherever they are (first, middle, last element of a non-contiguous view), and a finite tensor passes."""
    for where in (0, 500, 999):
        base = torch.randn(1000, 2, generator=torch.Generator().manual_seed(where))
        if bad != "none":
            base[where, 0] = float(bad.split("_and_")[0])
            if "_and_" in bad:
                base[(where + 7) % 1000, 0] = -math.inf
        t = base.to(dtype)[:, 0]  # a strided view
        # float8 e4m3fn has no Inf: torch's conversion saturates an Inf to +-448 (finite); a NaN stays NaN
        want = bad == "none" or (dtype == torch.float8_e4m3fn and bad != "nan")
        assert V.all_finite(t) is want, (where, t.float()[where])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_passes_finite_values_whose_sum_overflows(dtype):
    """Finite values whose sum overflows the dtype (the fast path's sum is Inf) are decided exactly: finite."""
    big = torch.finfo(dtype).max
    t = torch.full((64,), big, dtype=dtype)
    assert not torch.isfinite(t.sum())  # the fast path cannot decide here
    assert V.all_finite(t) is True
    t[3] = math.nan
    assert V.all_finite(t) is False


def test_all_finite_takes_empty_integer_and_autograd_tensors():
    assert V.all_finite(torch.empty(0, 3)) is True
    assert V.all_finite(torch.tensor([2 ** 62, 2 ** 62])) is True  # integers are finite (their sum wraps)
    p = torch.nn.Parameter(torch.tensor([1.0, math.inf]))
    assert V.all_finite(p) is False and p.grad is None
    with pytest.raises(ValueError, match="x holds 1 NaN or Inf values"):
        V.check_finite_tensor("x", p)
