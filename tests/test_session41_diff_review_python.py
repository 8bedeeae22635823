"""Review of the session's Python diff (6c7680f..HEAD: evaluation/score.py, report.py, judge.py, _files.py, model.py,
official_config.py, layer.py, parallel.py, training.py, cli.py, validation.py).

Each test FAILS on the reviewed code and states the behaviour it expects; CPU only, tiny models, nothing downloaded.

- score.py ``_draw``: the 2AFC order seeds hash the task name with a strict ``.encode()``, so the ASCII-escaped JSON
  fix (README: "task folder names that are not UTF-8 are written too") still dies with "surrogates not allowed"
  in any scoring with ``--against``, after every VLM score was asked.
- report.py ``_replace_together``: summary.md is encoded strictly, so a runs folder whose name is not UTF-8 (its
  default method name) loses the report after every metric ran (the same fix, incomplete).
- flux.py ``_mergeable_layers``: ``merged()`` / ``fuse_lora`` / ``merge="full"`` meet a tensor-parallel sharded base
  as "no plain tensor weight (quantized layers run unmerged); run it unmerged", though unmerged is refused too;
  the commit says merges refuse a sharded base by name (only ``LoRWeBLinear.merged_weight_for`` does).
- cli.py ``_train_config``: ``accelerate launch --mixed_precision fp8`` is told "pass --mixed-precision fp8", a value
  the flag refuses.
- validation.py ``check_train_args``: ``--out`` inside ``DATA/target`` is refused by the CLI only; ``train(cfg)``
  with the same ``out`` loads the models and trains into the data.
- official_config.py ``read_config_yaml`` (pre-existing, beside the new size checks): a ``network_kwargs`` that is
  not a mapping escapes as AttributeError instead of LoRWeBConfigError.
"""

import json
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast.testing import one_process_gloo_group, run_cli_in_process


def _non_utf8(folder, name: bytes) -> str:
    """``folder/<name>`` as Python holds a name that is not UTF-8 (surrogate escapes)."""
    return os.fsdecode(os.fsencode(str(folder)) + b"/" + name)


def _rename_or_skip(src, dst) -> None:
    try:
        os.rename(src, dst)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses a file name that is not UTF-8")


@pytest.fixture(scope="module")
def eval_assets(tmp_path_factory):
    """One task, two triplets; runs folders ``ours`` and ``lora`` made from it; a tiny CLIP."""
    pytest.importorskip("transformers")
    from lorweb_fast import demo
    from lorweb_fast.evaluation import tiny

    root = tmp_path_factory.mktemp("diff_review_eval")
    evalset = tiny.make_folder_evalset(root / "evalset", tasks=("flip",), per_task=2, size=(32, 32))
    tiny.make_runs_folder(root / "ours", evalset, seed=1)
    tiny.make_runs_folder(root / "lora", evalset, seed=2)
    demo.build_tiny_clip(root / "clip")
    return root


# ----------------------------------------------------------------------------------------------------- medium
def test_pairwise_2afc_scores_a_task_folder_name_that_is_not_utf8(eval_assets, tmp_path, capsys):
    """score.py ``_draw`` (``f"{seed}:{run}:{against}:{what}".encode()``, called by ``pairwise_orders`` with
    ``f"task:{task}"`` and the item keys). README "Report": "metrics.json, judge_answers.jsonl and the judge/ records
    are ASCII-escaped JSON ..., so task folder names that are not UTF-8 are written too" (commit 3f85255). That
    holds without baselines, but any scoring with ``--against`` ends with "lorweb-fast eval score: error: 'utf-8'
    codec can't encode character '\\udce9' in position 20: surrogates not allowed" (exit 2), after the VLM score of
    every item was asked (a Gemma judge: hours), naming neither the task nor the folder. Expected: the report is
    written (e.g. ``.encode("utf-8", "surrogateescape")`` in ``_draw``, which keeps every UTF-8 name's orders), or
    the folder is refused by name before any judge question."""
    task = os.fsdecode(b"caf\xe9")
    for name in ("ours", "lora"):
        shutil.copytree(eval_assets / name, tmp_path / name)
        _rename_or_skip(tmp_path / name / "flip", _non_utf8(tmp_path / name, b"caf\xe9"))
    ids = sorted(f"{task}/{d.name}" for d in (tmp_path / "ours" / task).iterdir())
    recs = [{"id": i, "kind": "score", "response": '{"accuracy": 7, "consistency": 8}'} for i in ids]
    recs += [{"id": i, "kind": "pairwise", "response": '{"better": 1}'} for i in ids]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(r) + "\n" for r in recs))  # ASCII-escaped, as the report writes it
    out = tmp_path / "report"
    rc, _, err = run_cli_in_process(capsys, ["eval", "score", "--runs", f"ours={tmp_path / 'ours'}",
                                             "--against", f"lora={tmp_path / 'lora'}", "--judge", f"replay:{replay}",
                                             "--metrics", "vlm", "--out", out, "--device", "cpu", "--quiet"])
    if rc == 0:
        metrics = json.loads((out / "metrics.json").read_text(encoding="ascii"))
        assert metrics["methods"]["ours"]["overall"]["pairwise"]["lora"]["n"] == 2
    else:
        assert "surrogates not allowed" not in err and "caf" in err, err
        assert not (out / "judge").exists(), "refused only after the judge was asked"


def test_summary_md_is_written_for_a_runs_folder_name_that_is_not_utf8(eval_assets, tmp_path, capsys):
    """report.py ``write_report`` / ``_replace_together`` (``tmp.write_bytes(text.encode())`` for summary.md). The
    ASCII-escaped JSON fix covered metrics.json, but summary.md holds the method names in its tables, and a method
    named after its runs folder (``--runs PATH``: cli ``_named_path`` takes the folder's name) that is not UTF-8
    makes the report unwritable after every metric ran: "lorweb-fast eval score: error: 'utf-8' codec can't encode
    character '\\udce9' in position 404: surrogates not allowed" (exit 2, no metrics.json, a cache/ left).
    Expected: the report is written (the name escaped, e.g. ``errors="backslashreplace"`` for the Markdown), or the
    name is refused up front (before ``cache/`` is written)."""
    runs = _non_utf8(tmp_path, b"caf\xe9")
    try:
        shutil.copytree(eval_assets / "ours", runs)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses a file name that is not UTF-8")
    out = tmp_path / "report"
    rc, _, err = run_cli_in_process(capsys, ["eval", "score", "--runs", runs, "--out", out, "--encoder",
                                             eval_assets / "clip", "--metrics", "clip_dir", "--device", "cpu",
                                             "--quiet"])
    if rc == 0:
        assert (out / "metrics.json").is_file() and (out / "summary.md").is_file()
    else:
        assert "surrogates not allowed" not in err, err
        assert not (out / "cache").exists(), "refused only after the metrics ran"


# -------------------------------------------------------------------------------------------------------- low
@pytest.fixture
def gloo():
    """A one-process gloo group (a 1-rank device mesh on CPU), torn down after the test."""
    with one_process_gloo_group() as dist:
        yield dist


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_merging_a_tensor_parallel_sharded_base_names_tensor_parallelism(gloo, strategy):
    """flux.py ``merged`` -> ``_mergeable_layers`` -> ``_unmergeable_base`` (``has_plain_weight`` is False for a
    DTensor weight). Commit 1002992 "fp32 adapter path and merges refuse a sharded base by name" added
    ``refuse_sharded_weight`` to ``LoRWeBLinear.merged_weight_for`` only; ``merged()`` (so ``fuse_lora`` and the
    pipeline's ``merge="full"``, the CLI default) checks first and raises "TypeError: cannot merge into 0: its base
    layer Linear (weight DTensor) has no plain tensor weight (quantized layers run unmerged); run it unmerged
    (merge='none')": it calls the sharded weight quantized and advises the unmerged path, which refuses it too.
    Expected: the same refusal as the unmerged forward and ``merged_weight_for``, naming tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lorweb_fast import flux

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=5, target_modules=["0"]))
    layer = lf.lorweb_layers(model)["0"]
    layer.set_coefficients(torch.rand(1, 2))
    layer.base_layer.weight = nn.Parameter(distribute_tensor(layer.base_layer.weight.detach(), mesh, [Shard(0)]))
    with pytest.raises(NotImplementedError, match="tensor-parallel"):  # control: the layer API names it
        layer.merged_weight_for(torch.rand(2))
    with pytest.raises(Exception, match="tensor.parallel") as info:
        with flux.merged(model, strategy):
            pass
    assert "quantized" not in str(info.value), info.value


def test_launcher_fp8_precision_warning_does_not_advise_a_refused_flag(tmp_path, monkeypatch):
    """cli.py ``_train_config``: without --mixed-precision, a launcher precision other than bf16 is warned as
    "... pass --mixed-precision {launcher} to train in it". ``accelerate launch --mixed_precision fp8`` sets
    ACCELERATE_MIXED_PRECISION=fp8, and the advice "pass --mixed-precision fp8" is refused by argparse ("invalid
    choice: 'fp8' (choose from no, bf16, fp16)"). Expected: the warning advises only values the flag takes (for
    fp8: say it is not supported and name the choices)."""
    from lorweb_fast import cli
    from lorweb_fast.training import MIXED_PRECISIONS

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "data").mkdir()
    args = cli.build_parser().parse_args(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = cli._train_config(args)
    assert cfg.mixed_precision == "bf16"
    text = " ".join(str(w.message) for w in caught)
    assert "fp8" in text, "control: the launcher's fp8 is named"
    with pytest.raises(SystemExit):  # control: the advised value is refused
        cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--mixed-precision", "fp8"])
    assert "fp8" not in MIXED_PRECISIONS
    assert "--mixed-precision fp8" not in text, text


def test_train_api_refuses_an_out_inside_the_data_target_folder(tmp_path, monkeypatch):
    """validation.py ``check_train_args`` (commit 9907b67): "An ``--out`` inside the data's target/, control/ or
    captions/ is refused (its loss.png and checkpoints would be read back as samples)". The check sits in the CLI's
    path checks only; ``lorweb_fast.training.train(cfg)`` (the documented Python API, same TrainConfig) with
    ``out=DATA/target/run`` goes on to load the models and train into the data, and its next ``--resume`` reads its
    own loss.png as a sample. Expected: ``train`` refuses it (a ValueError naming target/) before any model loads,
    as the CLI does."""
    from lorweb_fast import training
    from lorweb_fast.testing import tiny_train_config, tiny_training_assets

    pytest.importorskip("transformers")
    assets = tiny_training_assets(tmp_path / "assets", 4)

    class PipelineLoaded(Exception):
        pass

    def load(*args, **kwargs):
        raise PipelineLoaded

    monkeypatch.setattr(training, "load_training_pipeline", load)
    cfg = tiny_train_config(assets, assets / "data" / "target" / "run", steps=1)
    with pytest.raises(ValueError, match="target"):
        training.train(cfg)


def test_config_yaml_network_kwargs_that_is_not_a_mapping_is_a_config_error(tmp_path):
    """official_config.py ``read_config_yaml`` (pre-existing; the new size checks read ``kwargs.get`` first, outside
    any ``try``): its docstring says "a file without that structure ... raise[s] LoRWeBConfigError naming the file".
    ``network_kwargs: [1, 2]`` raises ``AttributeError: 'list' object has no attribute 'get'`` instead (the loaders
    and the CLI's checkpoint checks catch LoRWeBConfigError, not AttributeError). Expected: LoRWeBConfigError naming
    the file."""
    from lorweb_fast.official_config import LoRWeBConfigError, read_config_yaml

    path = tmp_path / "config.yaml"
    path.write_text("config:\n  process:\n    - network:\n        linear: 4\n        network_kwargs: [1, 2]\n")
    with pytest.raises(LoRWeBConfigError, match="config.yaml"):
        read_config_yaml(path)
