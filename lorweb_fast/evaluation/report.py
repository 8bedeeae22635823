"""Aggregation as the paper (per task first, then over tasks), ``metrics.json``, ``summary.md`` and the plots.

``metrics.json`` (for the first runs folder, the method under test):

- ``per_triplet``: ``[{id, task, clip_dir, lpips, vlm_accuracy, vlm_consistency[, pairwise]}]`` (None where a metric
  was not computed or failed; ``pairwise``: {baseline: {order, better, won}});
- ``per_task``: ``{task: {clip_dir, lpips, vlm_accuracy, vlm_consistency, n, pairwise: {baseline: {win_rate,
  win_rate_as_b1, win_rate_as_b2, order_balanced_win_rate, n}}}}``: the task's win rate over its items, over the
  items where this method's b' was shown first (B'1) / second (B'2), and the mean of those two (None unless the task
  has items in both positions);
- ``overall``: the means over tasks of the per-task means, ``tasks``, ``triplets``, ``failures`` (and by kind),
  ``truncated_answers`` (judge answers cut at the judge's token limit, whether or not they parsed), and per baseline
  the pairwise win rates: ``win_rate``, ``win_rate_as_b1``, ``win_rate_as_b2`` (each the mean over the tasks that have
  it) and ``order_balanced_win_rate``, the number to report: the mean over tasks of the per-task order-balanced rates,
  over the ``balanced_tasks`` tasks with items in both positions (a task seen in one position only cannot cancel the
  judge's position bias and is left out of it), ``n`` (judged items) and ``failures`` (pairwise ones);
- ``failures``: ``[{id, task, kind, error, response[, against][, truncated]}]`` (unparseable or out-of-range judge
  answers, ``truncated`` when the answer was cut at the judge's token limit; missing baseline items), excluded from
  the means and counted in ``overall["failures"]``;
- ``method``: the first runs folder's name; ``methods``: {name: the same four keys} for every runs folder scored in
  the call; ``settings`` (runs, against, metrics, encoder, lpips, judge, pairwise_seed[, coverage]).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from .. import _locks
from .._files import save_figure_atomically
from .._locks import holding

SCALAR_METRICS = ("clip_dir", "lpips", "vlm_accuracy", "vlm_consistency")


def _mean(values) -> Optional[float]:
    """The mean of the values that are not None or NaN; None when there is none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def aggregate(per_triplet: Sequence[dict], failures: Sequence[dict], baselines: Sequence[str] = (),
              answers: Sequence[dict] = ()) -> dict:
    """per_task / overall / failures from per-triplet rows (see the module docstring); ``answers``: the judge's
    answer records (``judge.ask``), of which those marked ``truncated`` are counted.

    The order-balanced win rate is balanced within each task: (rate as B'1 + rate as B'2) / 2 per task, then the mean
    over the tasks that have items in both positions. A position bias that shifts every answer of a task by the same
    amount (possibly a different amount in each task) cancels exactly from each task's balanced rate; the mean of the
    over-task means of the two positions would not cancel it, since those are means over different sets of tasks."""
    tasks: dict = {}
    for row in per_triplet:
        tasks.setdefault(row["task"], []).append(row)
    per_task = {}
    for task, rows in sorted(tasks.items()):
        entry = {m: _mean(r[m] for r in rows) for m in SCALAR_METRICS}
        entry["n"] = len(rows)
        if baselines:
            entry["pairwise"] = {}
            for base in baselines:
                won = [r.get("pairwise", {}).get(base, {}) for r in rows]
                b1 = _mean(float(w["won"]) for w in won if w.get("won") is not None and w["order"][0] == "run")
                b2 = _mean(float(w["won"]) for w in won if w.get("won") is not None and w["order"][0] == "against")
                entry["pairwise"][base] = {
                    "win_rate": _mean(float(w["won"]) for w in won if w.get("won") is not None),
                    "win_rate_as_b1": b1, "win_rate_as_b2": b2,
                    "order_balanced_win_rate": (b1 + b2) / 2 if b1 is not None and b2 is not None else None,
                    "n": sum(w.get("won") is not None for w in won)}
        per_task[task] = entry
    overall = {m: _mean(t[m] for t in per_task.values()) for m in SCALAR_METRICS}
    overall.update(tasks=len(per_task), triplets=len(per_triplet), failures=len(failures),
                   failures_by_kind={k: sum(f["kind"] == k for f in failures)
                                     for k in sorted({f["kind"] for f in failures})},
                   truncated_answers=sum(bool(a.get("truncated")) for a in answers))
    if baselines:
        overall["pairwise"] = {}
        for base in baselines:
            stats = [t["pairwise"][base] for t in per_task.values()]
            balanced = [s["order_balanced_win_rate"] for s in stats if s["order_balanced_win_rate"] is not None]
            overall["pairwise"][base] = {
                "win_rate": _mean(s["win_rate"] for s in stats),
                "win_rate_as_b1": _mean(s["win_rate_as_b1"] for s in stats),
                "win_rate_as_b2": _mean(s["win_rate_as_b2"] for s in stats),
                "order_balanced_win_rate": _mean(balanced), "balanced_tasks": len(balanced),
                "n": sum(s["n"] for s in stats),
                "failures": sum(f["kind"] == "pairwise" and f.get("against") == base for f in failures)}
    return {"per_triplet": list(per_triplet), "per_task": per_task, "overall": overall, "failures": list(failures)}


# --------------------------------------------------------------------------------------------------- writing
def _fmt(v, digits=2, pct=False) -> str:
    if v is None:
        return "N/A"
    return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"


def _cell(name) -> str:
    """A name (a runs folder's, a baseline's) as the text of one Markdown table cell: ``|`` escaped as ``\\|`` (it
    would end the cell) and line breaks as spaces (they would end the row)."""
    return " ".join(str(name).replace("|", "\\|").splitlines())


def summary_markdown(report: dict, settings: dict) -> str:
    """``summary.md``'s text: the paper's table (Pres. (VLM), Acc. (VLM), LPIPS, CLIP Dir., order-balanced pairwise
    win rates (%) per baseline) for every method of ``report`` ({name: ``aggregate``}), counts, notes, settings.
    Names in table cells are escaped (``_cell``)."""
    baselines = list(settings.get("against") or {})
    head = ["Model", "Pres. (VLM)", "Acc. (VLM)", "LPIPS", "CLIP Dir."]
    head += [f"Pairwise VLM (%) vs {_cell(b)}" for b in baselines]
    lines = ["# Evaluation summary", "",
             "Means per task, then over tasks (the paper's protocol). Pres. (VLM) = consistency, Acc. (VLM) = "
             "editing accuracy (1-10, Gemma-3 judge); LPIPS between b and b' (lower = better preservation); CLIP "
             "directional similarity. Pairwise: order-balanced 2AFC win rate of the row's b' against each baseline.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in report.items():
        o = rep["overall"]
        cells = [_cell(name), _fmt(o["vlm_consistency"]), _fmt(o["vlm_accuracy"]), _fmt(o["lpips"]),
                 _fmt(o["clip_dir"])]
        cells += [_fmt(o.get("pairwise", {}).get(b, {}).get("order_balanced_win_rate"), pct=True) for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Model | tasks | triplets | failures |", "|---|---|---|---|"]
    for name, rep in report.items():
        o = rep["overall"]
        by_kind = ", ".join(f"{k}: {v}" for k, v in o["failures_by_kind"].items())
        count = f"{o['failures']}" + (f" ({by_kind})" if by_kind else "")
        lines.append(f"| {_cell(name)} | {o['tasks']} | {o['triplets']} | {count} |")
    coverage = settings.get("coverage")
    if coverage:
        from .score import coverage_text

        lines += ["", f"The runs folders hold different triplets ({coverage_text(coverage)}): each row's means are "
                      "over its own triplets, so the rows compare different analogies."]
    cut = {name: rep["overall"].get("truncated_answers", 0) for name, rep in report.items()}
    if any(cut.values()):
        lines += ["", "Judge answers cut at the judge's token limit (usually without a score, so listed as failures; "
                      "raise --judge-max-new-tokens and rerun): "
                  + ", ".join(f"{name}: {n}" for name, n in cut.items() if n) + "."]
    if baselines:
        lines += ["", "Pairwise details (win rate over tasks; when this method's b' was shown as B'1 / as B'2; "
                      "balanced = per task the mean of the two, then the mean over the tasks with items in both "
                      "positions, counted in 'balanced tasks'):", "",
                  "| Model | Baseline | win rate | as B'1 | as B'2 | balanced | balanced tasks | n | failures |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, rep in report.items():
            for b in baselines:
                p = rep["overall"]["pairwise"][b]
                rates = " | ".join(_fmt(p[k], pct=True) for k in ("win_rate", "win_rate_as_b1", "win_rate_as_b2",
                                                                   "order_balanced_win_rate"))
                lines.append(f"| {_cell(name)} | {_cell(b)} | {rates} | {p['balanced_tasks']} | {p['n']} | "
                             f"{p['failures']} |")
    lines += ["", f"Settings: `{json.dumps(settings)}`", ""]
    return "\n".join(lines)


def _plain(name) -> str:
    """A name (a runs folder's, a baseline's) as matplotlib text drawn literally: ``$`` escaped, else a pair of them
    is parsed as mathtext (a syntax error in most names: the plot, and ``eval score``, fail)."""
    return str(name).replace("$", r"\$")


def _legend_label(name) -> str:
    """``_plain(name)`` as a legend entry: matplotlib leaves out of the legend every label that starts with "_" (a
    runs folder named "_ablation"), so such a label gets a leading space."""
    label = _plain(name)
    return " " + label if label.startswith("_") else label


def pareto_front(points: Sequence[tuple]) -> list:
    """Indices of the points (x, y) not dominated when both coordinates are to be maximised, sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


@holding(_locks.DRAWING)
def plot_preservation_vs_accuracy(report: dict, path: Path) -> Optional[Path]:
    """The paper's Fig. 5: one point per method, Pres. (VLM) vs Acc. (VLM), with the Pareto front. Without VLM scores,
    LPIPS (axis reversed: lower = better preservation) vs CLIP Dir. stand in. Returns ``path`` (written atomically),
    None when neither pair of means exists for every method."""
    names = list(report)
    vlm = all(report[n]["overall"]["vlm_consistency"] is not None and report[n]["overall"]["vlm_accuracy"] is not None
              for n in names)
    if vlm:
        xs = [report[n]["overall"]["vlm_consistency"] for n in names]
        ys = [report[n]["overall"]["vlm_accuracy"] for n in names]
        xlabel, ylabel, flip = "Preservation (VLM)", "Edit Accuracy (VLM)", 1
    elif all(report[n]["overall"]["lpips"] is not None and report[n]["overall"]["clip_dir"] is not None for n in names):
        xs = [report[n]["overall"]["lpips"] for n in names]
        ys = [report[n]["overall"]["clip_dir"] for n in names]
        xlabel, ylabel, flip = "LPIPS(b, b') (lower = better preservation)", "CLIP Dir.", -1
    else:
        return None
    from matplotlib.figure import Figure  # not pyplot: no global figure registry, the caller's backend untouched

    front = pareto_front([(flip * x, y) for x, y in zip(xs, ys)])
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.scatter(xs, ys, s=40, zorder=3)
    for x, y, n in zip(xs, ys, names):
        ax.annotate(_plain(n), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front", zorder=2)
    if flip < 0:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Preservation vs. edit accuracy")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure_atomically(fig, path, dpi=130)


@holding(_locks.DRAWING)
def plot_win_rates(report: dict, baselines: Sequence[str], path: Path) -> Optional[Path]:
    """The paper's Fig. 6: order-balanced pairwise win rates (%) per baseline, one bar group per method (N/A, a
    zero bar, where a rate is None). Returns ``path``; None without baselines."""
    if not baselines:
        return None
    from matplotlib.figure import Figure  # not pyplot: no global figure registry, the caller's backend untouched
    import numpy as np

    names = list(report)
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(5, 1.5 * len(baselines) + 2), 4))
    ax = fig.subplots()
    x = np.arange(len(baselines))
    for i, n in enumerate(names):
        rates = [report[n]["overall"]["pairwise"][b]["order_balanced_win_rate"] for b in baselines]
        vals = [100 * r if r is not None else 0.0 for r in rates]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=_legend_label(n))
        for bar, r in zip(bars, rates):
            ax.annotate("N/A" if r is None else f"{100 * r:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(50, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels([f"vs {_plain(b)}" for b in baselines])
    ax.set_ylim(0, 100)
    ax.set_ylabel("Pairwise VLM win rate (%)")
    ax.set_title("2AFC win rates (order balanced)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomically(fig, path, dpi=130)


def _replace_together(out: Path, texts: dict, done: set, clear: Sequence[str] = ()) -> None:
    """Write every ``{name: text}`` to a temporary in ``out`` (an OSError names its file), synced, then remove the
    files named in ``clear`` and rename the temporaries onto their names, adding each name to ``done`` once renamed:
    a failed write replaces none of them, and a process killed between the renames leaves files of this call and
    none of ``clear`` (the earlier scoring's), never a mix."""
    from .._files import naming_the_file, sync_file, temporary_file, temporary_prefix, unlink_file_or_link

    temps = []
    try:
        for name, text in texts.items():
            tmp = Path(temporary_file(out, temporary_prefix(out / name)))
            temps.append((tmp, out / name))
            with naming_the_file(out / name):
                tmp.write_bytes(text.encode("utf-8", "backslashreplace"))  # a name that is not UTF-8, escaped
                sync_file(tmp)
        for name in clear:
            unlink_file_or_link(out / name)
        for tmp, final in temps:
            os.replace(tmp, final)
            done.add(final.name)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


#: The files ``write_report`` writes (or removes) in a report folder.
REPORT_FILES = ("metrics.json", "summary.md", "judge_answers.jsonl", "preservation_vs_accuracy.png", "win_rates.png")


def write_report(out: Path, report: dict, results: dict, settings: dict, *, plots: bool = True) -> dict:
    """metrics.json, summary.md, judge_answers.jsonl (unless it is the file this scoring replays) and the plots in
    ``out`` (``plots=False``: none, as without matplotlib), each written atomically; a report file this call does
    not write is removed. metrics.json and summary.md are both written to temporaries before either replaces its
    file (a full disk while writing them leaves the earlier scoring's pair), and a later write that fails removes
    the earlier scoring's files this call had not replaced yet; the earlier scoring's files are removed just before
    the pair is renamed in, so a process killed from there on leaves part of this scoring's files: a report folder
    never mixes two scorings. ``report``: {name: ``aggregate``}, ``results``: {name: ``score_run``}. Returns
    metrics.json's content."""
    from .generate import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(report))
    metrics = {**report[first], "method": first, "methods": report, "settings": settings}
    answers_file = out / "judge_answers.jsonl"
    judge = str(settings.get("judge") or "")
    replay = re.fullmatch(r"replay:(.*)@[0-9a-f]{16}", judge)  # ReplayJudge.name: the file and its content hash
    # the answers file this scoring replays is left as it is (its answers are where they came from; rewriting it
    # with this scoring's subset would lose the others)
    replayed = replay is not None and Path(replay.group(1)).resolve() == answers_file.resolve()
    done = {answers_file.name} if replayed else set()  # written, or removed, by this call
    try:
        # the earlier scoring's files go just before the pair is renamed in: a kill from there on leaves some of
        # this scoring's files and none of the earlier one's
        _replace_together(out, {"metrics.json": json.dumps(metrics, indent=1),
                                "summary.md": summary_markdown(report, settings)}, done,
                          clear=[name for name in REPORT_FILES if name not in done])
        # "truncated" only where the answer was cut, so a replay of this file counts the same cut answers
        answers = [json.dumps({"id": a["id"], "kind": a["kind"], "run": a["run"], "against": a["against"],
                               "order": a["order"], "judge": a["judge"], "response": a["response"],
                               **({"truncated": True} if a.get("truncated") else {})})
                   for res in results.values() for a in res["answers"] if a["response"] is not None]
        if answers and not replayed:
            atomic_write_text(answers_file, "\n".join(answers) + "\n")
        elif not replayed:  # nothing this scoring asked: no answers of an earlier one stay
            answers_file.unlink(missing_ok=True)
        done.add(answers_file.name)
        if not plots or plot_preservation_vs_accuracy(report, out / "preservation_vs_accuracy.png") is None:
            (out / "preservation_vs_accuracy.png").unlink(missing_ok=True)
        done.add("preservation_vs_accuracy.png")
        if not plots or plot_win_rates(report, list(settings.get("against") or {}), out / "win_rates.png") is None:
            (out / "win_rates.png").unlink(missing_ok=True)
    except BaseException:  # once this scoring's metrics.json is in, the earlier scoring's other files go
        if "metrics.json" in done:
            for name in REPORT_FILES:
                if name not in done:
                    (out / name).unlink(missing_ok=True)
        raise
    return metrics
