"""Fresh audit of the evaluation REPORT stage (evaluation/report.py and how score.py / cli.py feed it).

Each test states the expected behaviour and FAILS on the code as audited:

- score.py score / report.py plot_preservation_vs_accuracy, plot_win_rates: a scoring that draws no plot (a single
  metric, clip_dir or lpips, no judge) passes ``plots=True`` without asking whether matplotlib imports, and both
  plot functions import matplotlib before finding they have nothing to draw: without matplotlib such a scoring ends
  with "this command needs matplotlib" and exit status 2 after it has written its report (README "Missing or broken
  packages": without matplotlib ``eval score`` skips its plots with a warning).
- report.py write_report / _replace_together: metrics.json is encoded as strict UTF-8; a task folder whose name is
  not UTF-8 (held by Python as surrogate escapes) makes the report unwritable only after every metric ran, with an
  error naming neither the file nor the folder.
- score.py score / score_run: a runs folder given in ``--runs`` and also as an ``--against`` baseline (the README's
  way to place the baselines in Fig. 5) is judged against itself, and the self-comparison is reported as a win rate.
"""

import json
import os
import shutil
import sys

import pytest

from lorweb_fast.testing import run_cli_in_process

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny evaluation set (one task, two triplets), two runs folders made from it and a tiny CLIP."""
    from lorweb_fast import demo
    from lorweb_fast.evaluation import tiny

    root = tmp_path_factory.mktemp("report_audit")
    evalset = tiny.make_folder_evalset(root / "evalset", tasks=("flip",), per_task=2, size=(32, 32))
    tiny.make_runs_folder(root / "ours", evalset, seed=1)
    tiny.make_runs_folder(root / "lora", evalset, seed=2)
    demo.build_tiny_clip(root / "clip")
    return root


def _block_matplotlib(monkeypatch):
    for key in [k for k in list(sys.modules) if k == "matplotlib" or k.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, key, None)


def test_a_scoring_that_draws_no_plot_does_not_need_matplotlib(assets, tmp_path, monkeypatch, capsys):
    """score.py score (``plots = ... else True``) and report.py plot_preservation_vs_accuracy / plot_win_rates
    (``from matplotlib.figure import Figure`` before the "nothing to draw" returns): README "What we check",
    missing packages: "Without matplotlib, ... ``eval score`` [skips] its plots, with a warning at the start".
    ``--metrics clip_dir`` draws no plot at all, yet without matplotlib it ended (after writing metrics.json and
    summary.md) with "lorweb-fast eval score: error: this command needs matplotlib ..." and exit status 2.
    Expected: status 0 and the report written (fix: ``plots = plotting_available(...) if ... else False``, or return
    None before importing matplotlib)."""
    _block_matplotlib(monkeypatch)
    out = tmp_path / "report"
    rc, _, err = run_cli_in_process(capsys, ["eval", "score", "--runs", assets / "ours", "--out", out,
                                             "--encoder", assets / "clip", "--metrics", "clip_dir",
                                             "--device", "cpu", "--quiet"])
    assert rc == 0, err
    assert (out / "metrics.json").is_file() and (out / "summary.md").is_file()
    assert not (out / "preservation_vs_accuracy.png").exists() and not (out / "win_rates.png").exists()


def test_a_task_folder_name_that_is_not_utf8_does_not_lose_the_report(assets, tmp_path, capsys):
    """report.py write_report / _replace_together (``json.dumps(metrics, ensure_ascii=False)`` then
    ``text.encode()``): a task folder named with a byte that is not UTF-8 (``caf\\xe9``, Latin-1) is read by
    read_runs as ``'caf\\udce9'`` and scored; the report then fails with "lorweb-fast eval score: error: 'utf-8'
    codec can't encode character '\\udce9' in position 37: surrogates not allowed" (exit 2, no metrics.json), after
    every metric (a judge: hours) has run, naming neither the file nor the folder.
    Expected: either the report is written (the name escaped, e.g. ``ensure_ascii=True`` or
    ``errors="surrogateescape"``/``"backslashreplace"``) and exit 0, or the folder is refused by name before any
    metric runs (no ``cache/``)."""
    runs = tmp_path / "runs"
    shutil.copytree(assets / "ours", runs)
    try:
        os.rename(runs / "flip", os.fsdecode(os.fsencode(str(runs)) + b"/caf\xe9"))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses a file name that is not UTF-8")
    out = tmp_path / "report"
    rc, _, err = run_cli_in_process(capsys, ["eval", "score", "--runs", f"ours={runs}", "--out", out,
                                             "--encoder", assets / "clip", "--metrics", "clip_dir",
                                             "--device", "cpu", "--quiet"])
    if rc == 0:
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8", errors="surrogateescape"))
        assert len(metrics["per_task"]) == 1 and next(iter(metrics["per_task"])).startswith("caf")
        assert (out / "summary.md").is_file()
    else:
        assert rc == 2 and "caf" in err and "surrogates not allowed" not in err, err
        assert not (out / "cache").exists(), "refused only after the metrics ran"


def test_a_runs_folder_that_is_also_the_baseline_is_not_judged_against_itself(assets, tmp_path, capsys):
    """score.py score / score_run: README "Report": Fig. 5 "also places the baselines: give them in ``--runs`` as
    well, under other names than in ``--against``". Doing so (``--runs ours=OURS lora2=LORA --against lora=LORA``)
    makes the judge compare LORA's b' with LORA's own b' (identical images) for every triplet, and summary.md /
    metrics.json report that self-comparison as "lora2 vs lora: 50.0" (with a judge preferring B'1: as B'1 100.0,
    as B'2 0.0), a number the paper's table shows as N/A for its baselines (Tab. S2). Expected: the pair of a
    runs folder with itself (same resolved folders) is not asked of the judge and its win rate is None (N/A)."""
    ids = sorted(f"flip/{d.name}" for d in (assets / "ours" / "flip").iterdir())
    recs = [{"id": i, "kind": "score", "response": '{"accuracy": 7, "consistency": 8}'} for i in ids]
    recs += [{"id": i, "kind": "pairwise", "response": '{"better": 1}'} for i in ids]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "report"
    rc, _, err = run_cli_in_process(capsys, ["eval", "score", "--runs", f"ours={assets / 'ours'}",
                                             f"lora2={assets / 'lora'}", "--against", f"lora={assets / 'lora'}",
                                             "--judge", f"replay:{replay}", "--metrics", "vlm", "--out", out,
                                             "--device", "cpu", "--quiet"])
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["methods"]["ours"]["overall"]["pairwise"]["lora"]["order_balanced_win_rate"] == 0.5  # control
    self_rate = metrics["methods"]["lora2"]["overall"].get("pairwise", {}).get("lora", {})
    assert self_rate.get("order_balanced_win_rate") is None, self_rate
    answers = [json.loads(line) for line in (out / "judge_answers.jsonl").read_text().splitlines()]
    asked = [(a["run"], a["against"]) for a in answers if a["kind"] == "pairwise"]
    assert ("lora2", "lora") not in asked, asked
