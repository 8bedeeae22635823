"""Guards from a mutation audit of ``lorweb_fast.evaluation``: each test here failed on a hand-made mutant of the
evaluation code that the other tests/test_eval_*.py let pass, and passes on the original.

What they pin: which image files the CLIP / LPIPS cache entries depend on (a changed a, a' or b, another encoder or
other LPIPS weights is recomputed), the 2AFC bookkeeping (missing / extra baseline triplets are listed as failures, the
B'1/B'2 orders are balanced over the judged items and depend on the seed, the baseline and a per-item draw), the
aggregation (failed judgements are not counted as losses or in ``n``, per-baseline failure counts, NaN dropped), the
summary table's columns and the Fig. 5 Pareto front, the judge's parsing edges (1 and 10 are valid scores, the last
answer wins) and its cache key (the prompt, the baseline), the evaluation-set readers (Relation252k's b is the left
half of another pair, b is never a, the 0.15 aspect tolerance, the closest photos complete b, triplets sorted by id),
``eval generate`` (one generator per (triplet, seed), a, a', b passed and saved in order, the step / guidance settings
passed and checked on resume, b' written last) and the CLI defaults that pick the protocol.

Nothing is downloaded: CLIP and LPIPS are replaced by small recording stand-ins where only the bookkeeping is tested.
"""

import json
import random
import re
import warnings
import zlib

import pytest
from PIL import Image

from lorweb_fast.evaluation import evalsets as E
from lorweb_fast.evaluation import generate as G
from lorweb_fast.evaluation import judge as J
from lorweb_fast.evaluation import report as R
from lorweb_fast.evaluation import score as S
from lorweb_fast.evaluation import tiny


# ------------------------------------------------------------------------------------------------------ helpers
def solid_runs(root, items, *, shade=0):
    """``root/<task>/<id>/{a,a_prime,b,b_prime}.png``, every image a solid colour, distinct per key and stem and the
    same for a key in every folder (a baseline holds the same analogies); ``shade`` tints b' only (the method's own
    output); returns read_runs."""
    for key in items:
        d = root / key
        d.mkdir(parents=True, exist_ok=True)
        k = zlib.crc32(key.encode())
        for j, stem in enumerate(("a", "a_prime", "b", "b_prime")):
            Image.new("RGB", (16, 12), (k % 251, 50 * j, shade if stem == "b_prime" else (k >> 8) % 251)).save(
                d / f"{stem}.png")
    return E.read_runs(root)


class FakeClip:
    """Stands in for ClipDirectional: records the quads it is asked about."""

    def __init__(self, name="clip-A"):
        self.name, self.asked = name, 0
        self.cache_id = f"clip:{name}"

    def __call__(self, quads):
        self.asked += len(quads)
        return [0.25] * len(quads)


class FakeLpips:
    """Stands in for LPIPSDistance: records the pairs it is asked about."""

    def __init__(self, weights="w1.pth"):
        self.net, self.weights, self.asked = "alex", weights, 0
        self.cache_id = f"lpips:alex:{weights}"

    def __call__(self, b, b_prime):
        self.asked += 1
        return 0.5


FixedJudge = tiny.FixedJudge  # score 7/8, pairwise B'1; records the questions


def rewrite(path, colour):
    """Replace an image file with another one (another content, size and modification time)."""
    Image.new("RGB", (20, 14), colour).save(path)


def row(task, i, *, first=True, won=True, clip=None, lpips=None, acc=None, cons=None, base="base"):
    order = ["run", "against"] if first else ["against", "run"]
    entry = {"order": order, "better": None if won is None else (1 if first == won else 2), "won": won}
    return {"id": f"{task}/{i}", "task": task, "clip_dir": clip, "lpips": lpips, "vlm_accuracy": acc,
            "vlm_consistency": cons, "pairwise": {base: entry}}


# ------------------------------------------------------------------------------------- score: metric caches
@pytest.mark.parametrize("stem", ["a", "a_prime", "b", "b_prime"])
def test_clip_cache_entry_depends_on_all_four_images(tmp_path, stem):
    """clip_dir = cos(e(a') - e(a), e(b') - e(b)) depends on all four images (paper 4.2): replacing any one of
    them recomputes that item's value, and only that one."""
    items = solid_runs(tmp_path / "runs", ["t/0", "t/1"])
    clip = FakeClip()
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=clip, progress=False)
    assert clip.asked == 2
    rewrite(getattr(items[0], stem), (1, 2, 3))
    clip = FakeClip()
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=clip, progress=False)
    assert clip.asked == 1


def test_clip_batches_cover_every_item(tmp_path):
    """CLIP Dir. is computed for every triplet whatever the batch size (5 items in batches of 2), each batch at most
    batch_size quads."""
    items = solid_runs(tmp_path / "runs", [f"t/{i}" for i in range(5)])
    sizes = []

    class Batches(FakeClip):
        def __call__(self, quads):
            sizes.append(len(quads))
            return super().__call__(quads)

    res = S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=Batches(), batch_size=2,
                      progress=False)
    assert [r["clip_dir"] for r in res["per_triplet"]] == [0.25] * 5
    assert sizes == [2, 2, 1]


@pytest.mark.parametrize("stem", ["b", "b_prime"])
def test_lpips_cache_entry_depends_on_b_and_b_prime(tmp_path, stem):
    """LPIPS(b, b') (paper 4.2): a replaced b or b' is measured again."""
    items = solid_runs(tmp_path / "runs", ["t/0"])
    S.score_run("ours", items, tmp_path / "rep", metrics=["lpips"], lpips=FakeLpips(), progress=False)
    rewrite(getattr(items[0], stem), (1, 2, 3))
    lp = FakeLpips()
    S.score_run("ours", items, tmp_path / "rep", metrics=["lpips"], lpips=lp, progress=False)
    assert lp.asked == 1


def test_metric_cache_is_keyed_on_the_encoder_and_the_lpips_weights(tmp_path):
    """Another CLIP encoder or other LPIPS backbone weights in the same report folder are computed again, not
    served from the values of the earlier settings; the same settings are served from the cache."""
    items = solid_runs(tmp_path / "runs", ["t/0", "t/1"])
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir", "lpips"], clip=FakeClip("clip-A"),
                lpips=FakeLpips("w1.pth"), progress=False)
    same_clip, same_lp = FakeClip("clip-A"), FakeLpips("w1.pth")
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir", "lpips"], clip=same_clip, lpips=same_lp,
                progress=False)
    assert (same_clip.asked, same_lp.asked) == (0, 0)
    other_clip, other_lp = FakeClip("clip-B"), FakeLpips("w2.pth")
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir", "lpips"], clip=other_clip, lpips=other_lp,
                progress=False)
    assert (other_clip.asked, other_lp.asked) == (2, 2)


def test_a_local_clip_folder_rewritten_at_the_same_path_is_measured_again(tmp_path):
    """The metric cache's key for a local CLIP folder holds its files' signature, not only its path: other weights
    saved into the same folder are measured again (the cache served the old encoder's values); the same folder
    unchanged is served from the cache."""
    from lorweb_fast import demo
    from lorweb_fast.evaluation.metrics import ClipDirectional

    items = solid_runs(tmp_path / "runs", ["t/0", "t/1"])
    folder = demo.build_tiny_clip(tmp_path / "clip", seed=0)

    def scores():
        res = S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=ClipDirectional(folder),
                          progress=False)
        return [r["clip_dir"] for r in res["per_triplet"]]

    first = scores()
    fresh = [r["clip_dir"] for r in S.score_run("x", items, tmp_path / "other", metrics=["clip_dir"],
                                                   clip=ClipDirectional(folder), progress=False)["per_triplet"]]
    assert scores() == first == fresh
    demo.build_tiny_clip(folder, seed=1)  # other weights, same path
    again = scores()
    want = [r["clip_dir"] for r in S.score_run("y", items, tmp_path / "new", metrics=["clip_dir"],
                                                  clip=ClipDirectional(folder), progress=False)["per_triplet"]]
    assert again == want and again != first


# ------------------------------------------------------------------------------------------- score: 2AFC
def test_baseline_missing_and_extra_triplets_are_listed_as_failures(tmp_path):
    """A triplet the baseline lacks gets no 2AFC answer and a failure naming it; baseline triplets without a match in
    the run are reported too (failures are listed, never dropped)."""
    items = solid_runs(tmp_path / "ours", ["t/0", "t/1", "t/2"])
    base = solid_runs(tmp_path / "base", ["t/0", "t/1", "u/9"], shade=200)
    res = S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=FixedJudge(),
                      baselines={"base": base}, progress=False)
    rows = {r["id"]: r for r in res["per_triplet"]}
    assert rows["t/2"]["pairwise"]["base"] == {"order": None, "better": None, "won": None}
    pair_fails = [f for f in res["failures"] if f["kind"] == "pairwise"]
    assert len(pair_fails) == 2 and all(f["against"] == "base" for f in pair_fails)
    missing = [f for f in pair_fails if f["id"] == "t/2"]
    assert len(missing) == 1 and "missing in the baseline" in missing[0]["error"]
    extra = [f for f in pair_fails if f["id"] is None]
    assert len(extra) == 1 and "u/9" in extra[0]["error"]


def test_unparseable_pairwise_answer_is_a_failure_not_a_result(tmp_path):
    """A 2AFC answer without a valid "better" is listed as a failure with its raw text; the item keeps its order but
    has no winner."""
    class Garbled(FixedJudge):
        def __call__(self, request):
            return "I prefer neither." if request.kind == "pairwise" else super().__call__(request)

    items = solid_runs(tmp_path / "ours", ["t/0", "t/1"])
    base = solid_runs(tmp_path / "base", ["t/0", "t/1"], shade=200)
    res = S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=Garbled(), baselines={"base": base},
                      progress=False)
    for r in res["per_triplet"]:
        entry = r["pairwise"]["base"]
        assert entry["better"] is None and entry["won"] is None and entry["order"] is not None
    fails = [f for f in res["failures"] if f["kind"] == "pairwise"]
    assert sorted(f["id"] for f in fails) == ["t/0", "t/1"]
    assert all(f["response"] == "I prefer neither." for f in fails)


def test_pairwise_orders_are_balanced_over_the_judged_items_only(tmp_path):
    """A task of 3 whose baseline lacks one triplet has 2 judged items: one is shown as B'1 and one as B'2 (so the
    task's order-balanced rate exists), for every seed."""
    items = solid_runs(tmp_path / "ours", ["t/0", "t/1", "t/2"])
    base = solid_runs(tmp_path / "base", ["t/0", "t/2"], shade=200)
    for seed in range(12):
        res = S.score_run("ours", items, tmp_path / f"rep{seed}", metrics=["vlm"], judge=FixedJudge(),
                          baselines={"base": base}, pairwise_seed=seed, progress=False)
        firsts = [r["pairwise"]["base"]["order"][0] for r in res["per_triplet"] if r["id"] != "t/1"]
        assert sorted(firsts) == ["against", "run"], seed


def test_pairwise_seed_reaches_the_orders(tmp_path):
    """``score(pairwise_seed=...)`` is the seed the B'1/B'2 orders are drawn with (and recorded): some seed gives
    other orders than seed 0."""
    keys = [f"t/{i}" for i in range(6)]
    solid_runs(tmp_path / "ours", keys)
    solid_runs(tmp_path / "base", keys, shade=200)

    def orders(seed):
        m = S.score({"ours": tmp_path / "ours"}, tmp_path / f"rep{seed}", metrics=["vlm"], judge=FixedJudge(),
                    against={"base": tmp_path / "base"}, pairwise_seed=seed, progress=False)
        assert m["settings"]["pairwise_seed"] == seed
        return [r["pairwise"]["base"]["order"] for r in m["per_triplet"]]

    first = orders(0)
    assert any(orders(seed) != first for seed in (1, 2, 3))


def test_pairwise_orders_are_drawn_per_item_and_per_baseline():
    """The items of a task are put in a random order drawn per item (not alternated by id), and each baseline gets
    its own draw: across seeds a task of 4 has other pairs shown first than the two alternating patterns, and two
    baselines do not share one order."""
    from lorweb_fast.evaluation.evalsets import RunItem

    items = [RunItem("t", str(i), *["x.png"] * 4) for i in range(4)]
    firsts = set()
    for seed in range(30):
        orders = S.pairwise_orders(seed, "ours", "base", items)
        firsts.add(frozenset(k for k, o in orders.items() if o[0] == "run"))
    assert firsts - {frozenset({"t/0", "t/2"}), frozenset({"t/1", "t/3"})}
    many = [RunItem(f"t{t}", str(i), *["x.png"] * 4) for t in range(10) for i in range(4)]
    assert S.pairwise_orders(0, "ours", "lora", many) != S.pairwise_orders(0, "ours", "vc", many)


# ----------------------------------------------------------------------------------------- report: aggregation
def test_failed_judgements_are_neither_losses_nor_counted():
    """Failures are excluded from the means (report docstring): a pairwise answer that failed (won None) does not
    lower the win rate, and ``n`` counts the judged items only."""
    rows = [row("a", 0, first=True, won=True), row("a", 1, first=False, won=True), row("a", 2, won=None)]
    p = R.aggregate(rows, [], ["base"])
    task = p["per_task"]["a"]["pairwise"]["base"]
    assert task["win_rate"] == 1.0 and task["n"] == 2
    assert p["overall"]["pairwise"]["base"]["win_rate"] == 1.0 and p["overall"]["pairwise"]["base"]["n"] == 2


def test_pairwise_failures_are_counted_per_baseline():
    rows = [{**row("a", 0), "pairwise": {"x": row("a", 0)["pairwise"]["base"], "y": row("a", 0)["pairwise"]["base"]}}]
    failures = [{"id": "a/1", "task": "a", "kind": "pairwise", "against": "x", "error": "e", "response": None},
                {"id": "a/2", "task": "a", "kind": "pairwise", "against": "x", "error": "e", "response": None},
                {"id": "a/3", "task": "a", "kind": "score", "error": "e", "response": None}]
    o = R.aggregate(rows, failures, ["x", "y"])["overall"]
    assert o["pairwise"]["x"]["failures"] == 2 and o["pairwise"]["y"]["failures"] == 0
    assert o["failures"] == 3


def test_nan_values_are_left_out_of_the_means():
    rows = [row("a", 0, clip=0.2), row("a", 1, clip=float("nan")), row("b", 0, clip=0.6)]
    rep = R.aggregate(rows, [])
    assert rep["per_task"]["a"]["clip_dir"] == pytest.approx(0.2)
    assert rep["overall"]["clip_dir"] == pytest.approx(0.4)


def test_summary_table_columns_follow_the_paper():
    """Tab. 1 of the paper: Pres. (VLM) (consistency), Acc. (VLM) (accuracy), LPIPS, CLIP Dir., then the pairwise
    VLM win rate in percent: the order-balanced one (as B'1: 1/1, as B'2: 1/3 -> 66.7; the plain rate would be 50.0)."""
    rows = [row("t", 0, first=True, won=True, clip=0.2, lpips=0.3, acc=6, cons=8),
            row("t", 1, first=False, won=True, clip=0.2, lpips=0.3, acc=6, cons=8),
            row("t", 2, first=False, won=False, clip=0.2, lpips=0.3, acc=6, cons=8),
            row("t", 3, first=False, won=False, clip=0.2, lpips=0.3, acc=6, cons=8)]
    report = {"ours": R.aggregate(rows, [], ["base"])}
    md = R.summary_markdown(report, {"against": {"base": "/x"}})
    assert "| ours | 8.00 | 6.00 | 0.30 | 0.20 | 66.7 |" in md


def _captured_plot(monkeypatch, tmp_path, overall):
    from matplotlib.axes import Axes

    calls = {}
    real_plot, real_scatter = Axes.plot, Axes.scatter

    def plot(self, *args, **kwargs):
        if kwargs.get("label") == "Pareto front":
            calls["front"] = set(zip(args[0], args[1]))
        return real_plot(self, *args, **kwargs)

    def scatter(self, xs, ys, *args, **kwargs):
        calls["points"] = list(zip(xs, ys))
        return real_scatter(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(Axes, "scatter", scatter)
    report = {name: {"overall": o} for name, o in overall.items()}
    assert R.plot_preservation_vs_accuracy(report, tmp_path / "fig.png") is not None
    return calls


def test_fig5_pareto_front_with_vlm_scores(monkeypatch, tmp_path):
    """Fig. 5 of the paper: Preservation (VLM) on x, Edit Accuracy (VLM) on y, both maximised. C (7, 5) is dominated
    by B (8, 6)."""
    none = {"lpips": None, "clip_dir": None}
    calls = _captured_plot(monkeypatch, tmp_path, {
        "A": {"vlm_consistency": 9.0, "vlm_accuracy": 4.0, **none},
        "B": {"vlm_consistency": 8.0, "vlm_accuracy": 6.0, **none},
        "C": {"vlm_consistency": 7.0, "vlm_accuracy": 5.0, **none}})
    assert calls["points"] == [(9.0, 4.0), (8.0, 6.0), (7.0, 5.0)]
    assert calls["front"] == {(9.0, 4.0), (8.0, 6.0)}


def test_fig5_pareto_front_without_vlm_scores_minimises_lpips(monkeypatch, tmp_path):
    """Without VLM scores LPIPS (lower = better preservation) and CLIP Dir. (higher = better) stand in: A (0.2, 0.1)
    and B (0.4, 0.3) are on the front, C (0.5, 0.2) is dominated by B."""
    vlm = {"vlm_consistency": None, "vlm_accuracy": None}
    calls = _captured_plot(monkeypatch, tmp_path, {"A": {"lpips": 0.2, "clip_dir": 0.1, **vlm},
                                                   "B": {"lpips": 0.4, "clip_dir": 0.3, **vlm},
                                                   "C": {"lpips": 0.5, "clip_dir": 0.2, **vlm}})
    assert calls["front"] == {(0.2, 0.1), (0.4, 0.3)}


# ----------------------------------------------------------------------------------------------------- judge
@pytest.mark.parametrize("text, expected", [
    ('{"metrics":{"accuracy":1,"consistency":10},"explanation":"e"}', {"accuracy": 1, "consistency": 10}),
    ('{"metrics":{"accuracy":10,"consistency":1},"explanation":"e"}', {"accuracy": 10, "consistency": 1}),
])
def test_score_range_includes_both_ends(text, expected):
    """The paper's prompt asks for "1-10 integers only" (A.3): 1 and 10 are valid answers."""
    parsed = J.parse_score(text)
    assert parsed.ok and parsed.value == expected


def test_the_last_answer_wins():
    """A judge that first quotes the scheme or an example and then answers: its last JSON object is the answer; in the
    key-value fallback (no JSON decodes) the last written values are read."""
    score = J.parse_score('Format: {"metrics":{"accuracy":2,"consistency":3}}. Answer: '
                          '{"metrics":{"accuracy":9,"consistency":8},"explanation":"e"}')
    assert score.value == {"accuracy": 9, "consistency": 8}
    better = J.parse_pairwise('Format: {"better":1}. Answer: {"better":2,"explanation":"e"}')
    assert better.value == 2
    kv = J.parse_score('"accuracy": 2, "consistency": 3 ... final: {"accuracy": 9, "consistency": 8,}')
    assert kv.ok and kv.via == "key-value" and kv.value == {"accuracy": 9, "consistency": 8}
    kv = J.parse_pairwise('"better": 1 ... final: {"better": 2, "explanation": "x",,}')
    assert kv.ok and kv.via == "key-value" and kv.value == 2


def test_judge_cache_is_keyed_on_the_prompt_and_the_baseline(tmp_path):
    """A cached answer is reused only for the same prompt text and the same baseline: another prompt (e.g. an edited
    one) or the same item and order against another baseline is asked again."""
    cache = J.JudgeCache(tmp_path / "judge")
    judge = FixedJudge()

    def req(prompt=J.PAIRWISE_PROMPT, against="x"):
        return J.JudgeRequest("ours", "t/0", "pairwise", prompt, against=against, order=["run", "against"])

    J.ask(judge, cache, req())
    J.ask(judge, cache, req())
    assert len(judge.asked) == 1
    J.ask(judge, cache, req(against="y"))
    assert judge.asked[-1] == ("pairwise", "t/0", "y") and len(judge.asked) == 2
    J.ask(judge, cache, req())
    J.ask(judge, cache, req(against="y"))
    assert len(judge.asked) == 2  # each baseline's answer kept apart
    J.ask(judge, cache, req(prompt=J.PAIRWISE_PROMPT + " Be strict."))
    assert len(judge.asked) == 3


def test_judge_cache_keeps_names_that_share_a_file_apart(tmp_path):
    """Baseline, run or item names that differ only in characters a file name cannot hold ("lora v1" and "lora_v1")
    map to one cache file: the answer cached for one is not served for the other, which is asked."""
    cache = J.JudgeCache(tmp_path / "judge")
    judge = FixedJudge()

    def req(against="lora v1", run="ours", item="t/0"):
        return J.JudgeRequest(run, item, "pairwise", J.PAIRWISE_PROMPT, against=against, order=["run", "against"])

    assert cache.path(req()) == cache.path(req(against="lora_v1"))
    J.ask(judge, cache, req())
    J.ask(judge, cache, req(against="lora_v1"))
    assert judge.asked == [("pairwise", "t/0", "lora v1"), ("pairwise", "t/0", "lora_v1")]
    J.ask(judge, cache, req(against="lora_v1"))  # now cached under that name
    assert len(judge.asked) == 2
    J.ask(judge, cache, req(against="lora_v1", run="our s"))
    J.ask(judge, cache, req(against="lora_v1", run="our_s"))
    assert len(judge.asked) == 4


def test_gemma3_answer_is_the_greedy_continuation_only(tmp_path, monkeypatch):
    """The Gemma-3 judge decodes greedily (paper A.3: one deterministic answer per question) and returns only the
    generated tokens, not the prompt it was given (the model's generate is replaced by one appending a known answer)."""
    import torch

    judge = J.Gemma3Judge(tiny.build_tiny_gemma3(tmp_path / "gemma3"), device="cpu", max_new_tokens=4,
                          dtype=torch.float32)
    answer = judge.processor.tokenizer('{"better":2}', add_special_tokens=False, return_tensors="pt")["input_ids"]
    seen = {}

    def fake_generate(**inputs):
        seen.update(inputs)
        return torch.cat([inputs["input_ids"], answer], dim=1)

    monkeypatch.setattr(judge.model, "generate", fake_generate)
    out = judge(J.JudgeRequest("ours", "t/0", "pairwise", J.PAIRWISE_PROMPT,
                               images=lambda: [Image.new("RGB", (24, 24), (40 * i, 0, 0)) for i in range(5)]))
    assert out == '{"better":2}'
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 4


# ------------------------------------------------------------------------------------------------- evalsets
def make_relation(root, labels_order=(0, 1, 2, 3)):
    """Relation252k's layout, one task; image i's left half is colour (i, 0, 0), its right half (i, 255, 0)."""
    g = root / "t" / "Group1"
    g.mkdir(parents=True)
    for i in labels_order:
        pair = Image.new("RGB", (16, 8), (i, 0, 0))
        pair.paste(Image.new("RGB", (8, 8), (i, 255, 0)), (8, 0))
        pair.save(g / f"{i}.png")
    (g / "labels.json").write_text(json.dumps([{"img_name": f"{i}.png", "edit_instruction": f"e{i}"}
                                               for i in labels_order]))
    return root


def test_relation252k_b_is_the_left_half_of_another_pair(tmp_path):
    """b is an original (the left half of another pair of the same task), never a itself."""
    root = make_relation(tmp_path / "rel")
    for seed in range(6):
        for t in E.read_evalset(root, seed=seed):
            a_index, b_index = int(t.a.path.stem), int(t.b.path.stem)
            assert b_index != a_index
            assert t.b.load().getpixel((0, 0)) == (b_index, 0, 0)
            assert t.b.load().size == (8, 8)


def test_relation252k_b_is_drawn_per_item(tmp_path):
    """Each pair (a, a') draws its own b: in a task of 6 pairs, some seed gives 3 or more different b images (one draw
    shared by the task would give at most 2)."""
    root = make_relation(tmp_path / "rel", labels_order=range(6))
    assert max(len({t.b.path for t in E.read_evalset(root, seed=seed)}) for seed in range(5)) >= 3


def test_triplets_are_sorted_by_task_and_id(tmp_path):
    """Every reader returns the triplets sorted by (task, id), whatever the order of labels.json."""
    ids = [t.id for t in E.read_evalset(make_relation(tmp_path / "rel", labels_order=(3, 0, 2, 1)))]
    assert ids == sorted(ids) and len(ids) == 4


def make_released(root, sizes, a_size=(60, 40), n_a_prime=2):
    """``tiny.make_released_evalset`` (two a' images unless told otherwise)."""
    return tiny.make_released_evalset(root, sizes, a_size=a_size, n_a_prime=n_a_prime)


def test_released_set_b_within_the_papers_aspect_tolerance(tmp_path):
    """Appendix A.2: b's aspect ratio is within 0.15 of a's (1.5 here); b is never a itself. Candidates at 1.25 and
    1.75 (0.25 away) are never drawn while enough close ones exist."""
    assert E.ASPECT_TOLERANCE == 0.15
    close = {"c1": (90, 60), "c2": (70, 50), "c3": (62, 40)}   # 1.5, 1.4, 1.55
    root = make_released(tmp_path / "set", {**close, "far1": (50, 40), "far2": (70, 40)})  # 1.25, 1.75
    for seed in range(8):
        for t in E.read_evalset(root, seed=seed):
            assert t.b.path.stem in close, (seed, t.b.path.stem)


def test_released_set_exactly_enough_close_photos(tmp_path):
    """Exactly b_per_pair = 2 photos within the tolerance: both are used, with no warning and no outside-tolerance
    flag."""
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50), "far": (30, 40)}, n_a_prime=1)
    picked, flagged = tiny.b_picks_without_warnings(root)
    assert picked == ["c1", "c2"]
    assert not flagged


def test_resume_checks_b_picks_per_pair_not_the_whole_listing(tmp_path):
    """eval generate's run.json records each (a, a') pair's b picks: an a' added to the released set (a new pair)
    changes no recorded pick and resumes (recorded: the union); a photo added to original/ that changes an existing
    pair's picks is refused naming the task."""
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50), "far": (30, 40)}, n_a_prime=1)
    first = G.b_choices_by_task(root, E.read_evalset(root))
    base = {"resolution": "official", "merge": "none"}
    G.check_run_settings(tmp_path, {**base, "b_choices": first})
    prompt = root / "decoded_random_inference_set/db_not_in_trainset/animals/Add_a_hat"
    tiny.random_picture(random.Random(7), (30, 20)).save(prompt / "dog_1.png")
    grown = G.b_choices_by_task(root, E.read_evalset(root))
    settings = {**base, "b_choices": grown}
    G.check_run_settings(tmp_path, settings)  # a new pair: accepted
    [task] = first
    assert set(first[task]) < set(settings["b_choices"][task])
    orig = root / "original/unsplash_animals"
    for k in range(3, 12):  # close photos added until the pick of dog_0 changes (sample of 2 from more)
        tiny.random_picture(random.Random(k), (90, 61)).save(orig / f"c{k}.jpg")
        now = G.b_choices_by_task(root, E.read_evalset(root))
        if any(now[task][pair] != picks for pair, picks in first[task].items()):
            break
    else:
        raise AssertionError("no pick changed")
    with pytest.raises(G.EvalInputError, match=rf"b choices differ .* in 1 task\(s\) \({re.escape(task)}\)"):
        G.check_run_settings(tmp_path, {**base, "b_choices": now}, write=False)


def test_resume_of_a_run_recorded_before_sigmas_set_the_step_count(tmp_path):
    """A run.json written before --pipe-arg sigmas set the step count recorded the --steps default (28) while one
    step per sigma ran: it resumes with the count that ran (it was refused as "steps: 28 -> 3")."""
    old = {"steps": 28, "pipe_kwargs": {"sigmas": [1.0, 0.5, 0.2]}, "resolution": "official", "merge": "none"}
    (tmp_path / "run.json").write_text(json.dumps(old))
    G.check_run_settings(tmp_path, {**old, "steps": 3}, write=False)
    with pytest.raises(G.EvalInputError, match="steps: 3 -> 28"):
        G.check_run_settings(tmp_path, old, write=False)


def test_released_set_b_choices_are_drawn_per_a_prime(tmp_path):
    """Each (a, a') pair draws its own two b (paper A.2): across seeds, the two a' of one a do not always get the same
    pair of b."""
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50), "c3": (62, 40), "c4": (80, 52)})
    differ = False
    for seed in range(10):
        bs = {}
        for t in E.read_evalset(root, seed=seed):
            bs.setdefault(t.a_prime.path.stem, set()).add(t.b.path.stem)
        assert len(bs) == 2 and all(len(v) == 2 for v in bs.values())
        differ |= bs["dog_0"] != bs["dog_1"]
    assert differ


def test_released_set_closest_photos_complete_b(tmp_path):
    """With fewer close photos than b_per_pair, the closest others complete the b images (1.25 is closer to a's 1.5
    than 0.75), recorded as outside the tolerance."""
    root = make_released(tmp_path / "set", {"close": (90, 60), "near": (50, 40), "far": (30, 40)}, n_a_prime=1)
    with pytest.warns(UserWarning, match="aspect ratio within"):
        triplets = E.read_evalset(root)
    assert sorted(t.b.path.stem for t in triplets) == ["close", "near"]
    assert all(t.extra.get("b_aspect_outside_tolerance") for t in triplets)


# ------------------------------------------------------------------------------------------------- generate
class EchoPipe:
    """Stands in for LoRWeBKontextPipeline: records the a, a', b it gets (their top-left pixels), the seeds of the
    generators and the settings; returns a b' whose red channel is the generator's seed."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, a_prime, b, prompt, *, generator=None, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"inputs": [(x.getpixel((0, 0)), y.getpixel((0, 0)), z.getpixel((0, 0)))
                                      for x, y, z in zip(a, a_prime, b)], "seeds": seeds, **kwargs})
        return [Image.new("RGB", im.size, (s % 256, 0, 0)) for im, s in zip(b, seeds)]


def solid_evalset(root, n=3):
    """Folder layout: item i has a = (i, 1, 0), a' = (i, 2, 0), b = (i, 3, 0)."""
    for i in range(n):
        d = root / "t" / f"{i:03d}"
        d.mkdir(parents=True)
        for j, stem in enumerate(("a", "a_prime", "b"), 1):
            Image.new("RGB", (16, 16), (i, j, 0)).save(d / f"{stem}.png")
        (d / "prompt.txt").write_text("p\n")
    return root


def test_generate_passes_and_saves_a_a_prime_b_in_order(tmp_path):
    """The pipeline gets (a, a', b) of each triplet in that order, and the runs folder saves each under its own name."""
    pipe = EchoPipe()
    G.generate(pipe, E.read_evalset(solid_evalset(tmp_path / "ev")), tmp_path / "runs", batch_size=2, progress=False)
    got = sorted(x for c in pipe.calls for x in c["inputs"])
    assert got == [((i, 1, 0), (i, 2, 0), (i, 3, 0)) for i in range(3)]
    for i in range(3):
        d = tmp_path / "runs" / "t" / f"{i:03d}"
        for j, stem in enumerate(("a", "a_prime", "b"), 1):
            assert Image.open(d / f"{stem}.png").convert("RGB").getpixel((0, 0)) == (i, j, 0)


def test_generate_seeds_each_triplet_with_its_own_seed(tmp_path):
    """One generator per analogy seeded with its job's seed: with seeds (3, 5), every <id>_seed<s>/b_prime.png comes
    from a generator seeded with s, also when both seeds of a triplet share a batch; the step count and guidance
    scale given are the ones the pipeline gets."""
    pipe = EchoPipe()
    G.generate(pipe, E.read_evalset(solid_evalset(tmp_path / "ev")), tmp_path / "runs", seeds=(3, 5), batch_size=4,
               num_inference_steps=7, guidance_scale=3.25, progress=False)
    for i in range(3):
        for s in (3, 5):
            b_prime = Image.open(tmp_path / "runs" / "t" / f"{i:03d}_seed{s}" / "b_prime.png").convert("RGB")
            assert b_prime.getpixel((0, 0)) == (s, 0, 0)
    assert {(c["num_inference_steps"], c["guidance_scale"]) for c in pipe.calls} == {(7, 3.25)}


def test_batches_never_mix_sizes_with_odd_counts(tmp_path):
    """A batch only holds analogies of one (a size, b size) (the pipeline gives a batch one grid size): 3 triplets of
    one size and 3 of another with batch size 2 give batches of 2, 1, 2, 1, never a mixed one."""
    root = solid_evalset(tmp_path / "ev", n=3)
    for i in range(3):
        d = root / "u" / f"{i:03d}"
        d.mkdir(parents=True)
        for stem in ("a", "a_prime", "b"):
            Image.new("RGB", (24, 16), (i, 9, 9)).save(d / f"{stem}.png")
        (d / "prompt.txt").write_text("q\n")
    sizes = []

    class SizePipe(EchoPipe):
        def __call__(self, a, a_prime, b, prompt, **kwargs):
            sizes.append({(x.size, z.size) for x, z in zip(a, b)})
            return super().__call__(a, a_prime, b, prompt, **kwargs)

    G.generate(SizePipe(), E.read_evalset(root), tmp_path / "runs", batch_size=2, progress=False)
    assert all(len(s) == 1 for s in sizes) and len(sizes) == 4


def test_b_prime_is_written_last(tmp_path, monkeypatch):
    """A run killed while writing a triplet's files leaves no b_prime.png (the finished marker): a rerun generates it
    again instead of skipping a triplet with missing files."""
    real = G.atomic_write_text

    def fail_on_prompt(path, text):
        if path.name == "prompt.txt":
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(G, "atomic_write_text", fail_on_prompt)
    with pytest.raises(KeyboardInterrupt):
        G.generate(EchoPipe(), E.read_evalset(solid_evalset(tmp_path / "ev", n=1)), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs/t/000/b_prime.png").exists()


@pytest.mark.parametrize("key, value", [("seeds", [7]), ("steps", 10), ("guidance_scale", 3.5)])
def test_resume_refuses_other_generation_settings(tmp_path, key, value):
    """run.json records the seeds, step count and guidance scale: a resume with others would mix two settings."""
    settings = {"weights": "w", "seeds": [50], "steps": 28, "guidance_scale": 2.5, "resolution": "native",
                "merge": "none"}
    G.check_run_settings(tmp_path, settings)
    with pytest.raises(G.EvalInputError, match=f"{key}: "):
        G.check_run_settings(tmp_path, {**settings, key: value}, write=False)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_defaults_of_the_protocol():
    """Defaults that pick the protocol: generation seed 50 (the official inference.py), 2 b per (a, a') (paper A.2),
    CLIP ViT-L/14 for CLIP Dir., LPIPS with AlexNet (lpips v0.1's default)."""
    from lorweb_fast import cli

    parser = cli.build_parser()
    g = parser.parse_args(["eval", "generate", "--evalset", "e", "--weights", "w", "--out", "o"])
    assert g.seeds == [50] and g.b_per_pair is None  # not given: 2 where the layout draws b (run.json records 2)
    s = parser.parse_args(["eval", "score", "--runs", "r", "--out", "o"])
    assert s.encoder == "openai/clip-vit-large-patch14" and s.lpips_net == "alex"
    assert s.pairwise_seed == 0 and s.judge == "none" and s.metrics is None


def test_cli_score_passes_the_pairwise_seed_and_refuses_name_clashes(tmp_path, capsys):
    """``--pairwise-seed`` reaches the scoring (recorded in metrics.json); one name in both --runs and --against is
    refused (their judge answers would share a cache folder)."""
    from lorweb_fast import cli

    keys = ["t/0", "t/1"]
    solid_runs(tmp_path / "ours", keys)
    solid_runs(tmp_path / "base", keys, shade=200)
    replay = tmp_path / "replay.jsonl"
    answers = (("score", '{"metrics":{"accuracy":5,"consistency":5}}'), ("pairwise", '{"better":1}'))
    replay.write_text("\n".join(json.dumps({"id": k, "kind": kind, "response": resp})
                                for k in keys for kind, resp in answers))
    common = ["eval", "score", "--metrics", "vlm", "--judge", f"replay:{replay}", "--device", "cpu", "--quiet"]
    assert cli.main([*common, "--runs", f"ours={tmp_path / 'ours'}", "--against", f"base={tmp_path / 'base'}",
                     "--pairwise-seed", "5", "--out", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["settings"]["pairwise_seed"] == 5
    capsys.readouterr()
    assert cli.main([*common, "--runs", f"x={tmp_path / 'ours'}", "--against", f"x={tmp_path / 'base'}",
                     "--out", str(tmp_path / "clash")]) == 2
    assert "both in --runs and --against" in capsys.readouterr().err
    assert not (tmp_path / "clash").exists()



# ------------------------------------------------------------------ score: baselines and runs of other analogies
@pytest.mark.parametrize("change", ["b", "a_prime", "prompt"])
def test_a_baseline_holding_another_analogy_under_an_id_is_a_failure_not_judged(tmp_path, change):
    """The 2AFC pairs baseline items by ``<task>/<id>``: a baseline whose b (or a', or prompt) under an id is another
    one than this run's would have its b' judged against this run's analogy. That item is a pairwise failure naming
    the difference, the judge is not asked about it, and the other items are judged as before."""
    items = solid_runs(tmp_path / "ours", ["t/0", "t/1", "t/2"])
    solid_runs(tmp_path / "base", ["t/0", "t/1", "t/2"], shade=200)
    if change == "prompt":
        (tmp_path / "ours" / "t" / "1" / "prompt.txt").write_text("make it blue")
        (tmp_path / "base" / "t" / "1" / "prompt.txt").write_text("make it red")
    else:
        rewrite(tmp_path / "base" / "t" / "1" / f"{change}.png", (255, 255, 255))
    items = E.read_runs(tmp_path / "ours")
    judge = FixedJudge()
    res = S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=judge,
                      baselines={"base": E.read_runs(tmp_path / "base")}, progress=False)
    fails = [f for f in res["failures"] if f["kind"] == "pairwise"]
    assert [f["id"] for f in fails] == ["t/1"]
    want = "prompt for t/1 is 'make it red', this run's 'make it blue'" if change == "prompt" else \
        f"the baseline's {change} for t/1"
    assert want in fails[0]["error"] and "another analogy under this id" in fails[0]["error"]
    assert sorted(i for kind, i, _ in judge.asked if kind == "pairwise") == ["t/0", "t/2"]
    rows = {r["id"]: r for r in res["per_triplet"]}
    assert rows["t/1"]["pairwise"]["base"] == {"order": None, "better": None, "won": None}
    assert rows["t/0"]["pairwise"]["base"]["won"] is not None


def test_a_baseline_saving_the_same_inputs_at_another_size_or_as_jpeg_matches(tmp_path):
    """The same a, a', b pictures stored at another size and as JPEG (another tool's copies of the inputs) are the
    same analogy: judged, no failure; a baseline without prompt.txt is not compared by prompt."""
    import numpy as np

    rng = np.random.default_rng(0)
    for root in ("ours", "base"):
        d = tmp_path / root / "t" / "0"
        d.mkdir(parents=True)
    for stem in ("a", "a_prime", "b"):
        smooth = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(tmp_path / "ours" / "t" / "0" / f"{stem}.png")
        Image.fromarray(smooth).resize((40, 40), Image.BICUBIC).save(tmp_path / "base" / "t" / "0" / f"{stem}.jpg",
                                                                     quality=80)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ours" / "t" / "0" / "b_prime.png")
    Image.new("RGB", (40, 40), (200, 2, 3)).save(tmp_path / "base" / "t" / "0" / "b_prime.png")
    (tmp_path / "ours" / "t" / "0" / "prompt.txt").write_text("swap")
    judge = FixedJudge()
    res = S.score_run("ours", E.read_runs(tmp_path / "ours"), tmp_path / "rep", metrics=["vlm"], judge=judge,
                      baselines={"base": E.read_runs(tmp_path / "base")}, progress=False)
    assert res["failures"] == [] and ("pairwise", "t/0", "base") in judge.asked


def test_runs_folders_of_different_triplets_are_warned_about_and_reported(tmp_path):
    """Several --runs folders are compared side by side: when they hold different triplets, a warning says so, and
    metrics.json (settings.coverage) and summary.md give each one's count and the shared count; the same triplets
    give neither."""
    solid_runs(tmp_path / "ours", ["t/0", "t/1", "u/0"])
    solid_runs(tmp_path / "ckpt", ["t/0"])
    runs = {"ours": tmp_path / "ours", "ckpt": tmp_path / "ckpt"}
    with pytest.warns(UserWarning, match=r"different triplets \(ours: 3, ckpt: 1; shared: 1\)"):
        m = S.score(runs, tmp_path / "rep", metrics=["vlm"], judge=FixedJudge(), progress=False)
    assert m["settings"]["coverage"] == {"triplets": {"ours": 3, "ckpt": 1}, "shared": 1}
    assert "hold different triplets (ours: 3, ckpt: 1; shared: 1)" in (tmp_path / "rep" / "summary.md").read_text()
    solid_runs(tmp_path / "shared", ["t/0", "t/1"])  # a folder named like the shared count keeps its own count
    with pytest.warns(UserWarning, match=r"\(shared: 2, ckpt: 1; shared: 1\)"):
        m = S.score({"shared": tmp_path / "shared", "ckpt": tmp_path / "ckpt"}, tmp_path / "rep3", metrics=["vlm"],
                    judge=FixedJudge(), progress=False)
    assert m["settings"]["coverage"] == {"triplets": {"shared": 2, "ckpt": 1}, "shared": 1}
    solid_runs(tmp_path / "same", ["t/0", "t/1", "u/0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = S.score({"ours": tmp_path / "ours", "same": tmp_path / "same"}, tmp_path / "rep2", metrics=["vlm"],
                    judge=FixedJudge(), progress=False)
    assert "coverage" not in m["settings"]
    assert "different triplets" not in (tmp_path / "rep2" / "summary.md").read_text()


def _score_replay(tmp_path, keys, runs_names=("ours",)):
    replay = tmp_path / "replay.jsonl"
    answers = (("score", '{"metrics":{"accuracy":5,"consistency":5}}'), ("pairwise", '{"better":1}'))
    replay.write_text("\n".join(json.dumps({"id": k, "kind": kind, "response": resp})
                                for k in keys for kind, resp in answers))
    return ["eval", "score", "--metrics", "vlm", "--judge", f"replay:{replay}", "--device", "cpu", "--quiet"]


def test_cli_score_repeated_runs_and_against_add_up_and_the_failure_count_covers_every_folder(tmp_path, capsys):
    """``--runs A --runs B`` scores both (the second one replaced the first), as does ``--against`` repeated; the
    closing line counts the failures of every runs folder (it counted the first one's only)."""
    from lorweb_fast import cli

    keys = ["t/0", "t/1"]
    for name in ("ours", "ckpt", "base1", "base2"):
        solid_runs(tmp_path / name, keys, shade=200 if name.startswith("base") else 0)
    solid_runs(tmp_path / "broken", ["t/0", "t/1", "t/2"])  # t/2 has no replay answer: its question is a failure
    common = _score_replay(tmp_path, keys)
    argv = [*common, "--runs", f"ours={tmp_path / 'ours'}", "--runs", f"ckpt={tmp_path / 'ckpt'}",
            "--against", f"base1={tmp_path / 'base1'}", "--against", f"base2={tmp_path / 'base2'}",
            "--out", str(tmp_path / "rep")]
    assert cli.main(argv) == 0
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert list(m["methods"]) == ["ours", "ckpt"] and list(m["settings"]["against"]) == ["base1", "base2"]
    capsys.readouterr()
    with pytest.warns(UserWarning, match="different triplets"):
        assert cli.main([*common, "--runs", f"ours={tmp_path / 'ours'}", f"broken={tmp_path / 'broken'}",
                         "--out", str(tmp_path / "rep2")]) == 0
    m = json.loads((tmp_path / "rep2" / "metrics.json").read_text())
    per_folder = [rep["overall"]["failures"] for rep in m["methods"].values()]
    assert per_folder[0] == 0 and per_folder[1] > 0
    assert f"({sum(per_folder)} failures)" in capsys.readouterr().out


def test_cli_score_pools_runs_folders_given_one_name(tmp_path, capsys):
    """The paper pools the custom set with Relation252k's unseen tasks ("we first aggregate per task, then over all
    tasks"); ``eval generate`` writes one runs folder per evaluation set, so ``--runs ours=A --runs ours=B`` pools A
    and B into one method: the same report as one folder holding both sets' tasks. Two folders named only after
    their last component, a folder given twice and a triplet in two pooled folders are refused up front."""
    from lorweb_fast import cli

    custom, relation = ["sketch/0", "sketch/1", "night/0"], ["rel/0", "rel/1"]
    solid_runs(tmp_path / "custom" / "runs", custom)
    solid_runs(tmp_path / "relation" / "runs", relation)
    solid_runs(tmp_path / "both", custom + relation)
    accuracy = {"sketch/0": 2, "sketch/1": 4, "night/0": 9, "rel/0": 1, "rel/1": 5}  # task means 3, 9, 3
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(json.dumps({"id": k, "kind": "score", "response": json.dumps(
        {"metrics": {"accuracy": a, "consistency": 10 - a}})}) for k, a in accuracy.items()))
    common = ["eval", "score", "--metrics", "vlm", "--judge", f"replay:{replay}", "--device", "cpu", "--quiet"]
    pooled = [f"ours={tmp_path / 'custom' / 'runs'}", f"ours={tmp_path / 'relation' / 'runs'}"]
    assert cli.main([*common, "--runs", *pooled, "--out", str(tmp_path / "pooled")]) == 0
    assert cli.main([*common, "--runs", f"ours={tmp_path / 'both'}", "--out", str(tmp_path / "one")]) == 0
    got, want = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("pooled", "one"))
    assert list(got["methods"]) == ["ours"]
    assert got["overall"]["vlm_accuracy"] == pytest.approx(5.0)  # over the three tasks, not the five triplets
    assert got["overall"] == want["overall"] and got["per_task"] == want["per_task"]
    assert got["settings"]["runs"] == {"ours": [str(tmp_path / "custom" / "runs"), str(tmp_path / "relation" / "runs")]}
    capsys.readouterr()
    refusals = {
        "several runs folders are named 'runs': use NAME=PATH": [str(tmp_path / "custom" / "runs"),
                                                                  str(tmp_path / "relation" / "runs")],
        "is given twice": [f"ours={tmp_path / 'both'}", f"ours={tmp_path / 'both'}"],
        "triplet night/0 is in both": [f"ours={tmp_path / 'both'}", f"ours={tmp_path / 'custom' / 'runs'}"],
    }
    for fragment, runs in refusals.items():
        assert cli.main([*common, "--runs", *runs, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err, err
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("device,fragment", [("banana", "--device 'banana' is not a device"),
                                             ("meta", "--device meta: the meta device holds no data")])
def test_cli_score_refuses_a_bad_device_in_one_line(tmp_path, capsys, device, fragment):
    """eval score --device is checked as eval generate's: one line, exit 2, before any model loads or file is
    written (it was a RuntimeError traceback)."""
    from lorweb_fast import cli

    solid_runs(tmp_path / "ours", ["t/0"])
    argv = ["eval", "score", "--runs", str(tmp_path / "ours"), "--metrics", "lpips", "--device", device, "--out",
            str(tmp_path / "rep")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("line,fragment", [
    ('{"id": "t/0", "kind": "score", "response": {"accuracy": 5}}', ":1: response must be a string"),
    ('{"id": "t/0", "kind": "pairwise", "response": 1}', ":1: response must be a string"),
    ('{"id": 0, "kind": "score", "response": "x"}', ":1: id must be a string"),
])
def test_replay_records_of_the_wrong_type_are_refused_naming_the_line(tmp_path, line, fragment):
    """A replay record whose response is not text (it crashed in the parser with an AttributeError, after caching
    the record as an answer) or whose id is not a string: EvalInputError naming the file and line."""
    path = tmp_path / "replay.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(E.EvalInputError, match=re.escape(str(path) + fragment)):
        J.ReplayJudge(path)


def test_a_replay_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "replay.jsonl"
    path.write_bytes(b'{"id": "t/0", "kind": "score", "response": "\xff"}\n')
    with pytest.raises(E.EvalInputError, match=f"replay file {re.escape(str(path))} is not valid UTF-8"):
        J.ReplayJudge(path)


def test_a_cached_answer_that_is_not_text_is_asked_again(tmp_path):
    """A cache record whose response is not a string (written by an older version from a bad replay record) is
    not an answer: the judge is asked again."""
    items = solid_runs(tmp_path / "ours", ["t/0"])
    judge = FixedJudge()
    S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=judge, progress=False)
    cached = next((tmp_path / "rep" / "judge").rglob("*.json"))
    rec = json.loads(cached.read_text())
    rec["response"] = {"accuracy": 7}
    cached.write_text(json.dumps(rec))
    res = S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=judge, progress=False)
    assert len(judge.asked) == 2 and res["failures"] == []


# ------------------------------------------------------------------------------------ paths and names (audit)
def _generate_argv(root, *extra):
    """``eval generate`` over a one-triplet folder evaluation set with marker-only model/ and clip/ folders
    (``infer_input_files``) and a checkpoint recording ``root/clip`` as its encoder."""
    import lorweb_fast as lf
    from lorweb_fast.testing import infer_input_files, tiny_lorweb_linear_model

    infer_input_files(root)
    lf.save_lorweb_weights(tiny_lorweb_linear_model(), root / "w.safetensors", metadata={"encoder": str(root / "clip")})
    ev = tiny.make_folder_evalset(root / "ev", tasks=("flip",), per_task=1)
    return ["eval", "generate", "--evalset", str(ev), "--weights", str(root / "w.safetensors"), "--model",
            str(root / "model"), "--out", str(root / "runs"), "--device", "cpu", "--quiet", *map(str, extra)]


@pytest.mark.parametrize("case", ["--encoder", "the checkpoint's encoder", "~ not expanded"])
def test_eval_generate_checks_the_encoder_as_infer_before_loading(tmp_path, monkeypatch, capsys, case):
    """``eval generate`` refuses a missing --encoder, a missing encoder named in the checkpoint (without --encoder)
    and a quoted ``~/...`` --model (``~`` is not expanded: the loader would get it as typed) in one line naming it,
    before any model loads or anything is written."""
    import lorweb_fast as lf
    from lorweb_fast import cli
    from lorweb_fast.flux import LoRWeBKontextPipeline
    from lorweb_fast.testing import tiny_lorweb_linear_model

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(no_load))
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = _generate_argv(tmp_path)
    missing = str(tmp_path / "no clip")
    if case == "--encoder":
        argv += ["--encoder", missing]
        fragment = f"--encoder {missing} does not exist on this machine"
    elif case == "the checkpoint's encoder":
        lf.save_lorweb_weights(tiny_lorweb_linear_model(), tmp_path / "w.safetensors", metadata={"encoder": missing})
        fragment = (f"the analogy encoder {missing!r} named in the checkpoint's config/metadata: {missing} does not "
                    "exist")
    else:
        argv[argv.index("--model") + 1] = "~/model"  # $HOME/model exists
        fragment = "--model ~/model does not exist on this machine (a quoted ~ is not expanded"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_names_holding_bars_and_dollars_stay_in_their_cells_and_are_drawn_as_text(tmp_path):
    """Runs folder and baseline names holding ``|`` and ``$`` (mathtext delimiters): every row of summary.md's tables
    has its header's cells, the name in one of them, and both plots are drawn."""
    pytest.importorskip("matplotlib")
    base = "b|$5_vs_$10"
    rows = [{"id": "t/0", "task": "t", "clip_dir": 0.5, "lpips": 0.1, "vlm_accuracy": 7.0, "vlm_consistency": 8.0,
             "pairwise": {base: {"order": ["run", "against"], "won": True}}}]
    report = {name: R.aggregate(rows, [], baselines=[base]) for name in ("cost_$5_vs_$10", "v1|v2")}
    text = R.summary_markdown(report, {"against": {base: ["x"]}})

    def cells(line):
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = cells(line)
        elif not line.startswith("|---"):
            assert len(cells(line)) == len(header) and cells(line)[0] in report, line
    assert f"Pairwise VLM (%) vs {base}" in [c.strip().replace("\\|", "|") for c in re.split(
        r"(?<!\\)\|", next(line for line in text.splitlines() if line.startswith("| Model | Pres.")))]
    assert R.plot_preservation_vs_accuracy(report, tmp_path / "p.png").is_file()
    assert R.plot_win_rates(report, [base], tmp_path / "w.png").is_file()


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_eval_score_refuses_a_bad_batch_size_before_the_judge_loads(tmp_path, monkeypatch, capsys, bad):
    """``eval score --batch-size 0 --judge gemma3:...``: the bad batch size is refused (exit 2, naming
    --batch-size) before the judge is made, which loads the 27B Gemma-3 model."""
    from lorweb_fast import cli

    def judge_loaded(*args, **kwargs):
        raise AssertionError("the judge was made before the batch size was checked")

    monkeypatch.setattr(J, "make_judge", judge_loaded)
    runs = tiny.make_runs_folder(tmp_path / "runs", tiny.make_folder_evalset(tmp_path / "ev", per_task=1))
    code = cli.main(["eval", "score", "--runs", str(runs), "--out", str(tmp_path / "report"), "--metrics", "vlm",
                     "--judge", f"gemma3:{tmp_path / 'gemma'}", "--batch-size", bad, "--device", "cpu", "--quiet"])
    assert code == 2
    assert "--batch-size" in capsys.readouterr().err
