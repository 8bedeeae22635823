"""``eval score`` end to end on CPU: tiny CLIP, random LPIPS backbone weights, the replay judge (and a tiny Gemma-3);
per-task then over-task aggregation, failures listed, order-balanced 2AFC, caching/resume, reports and plots."""

import json

import pytest
import torch

from lorweb_fast import cli, demo
from lorweb_fast.evaluation import score as S
from lorweb_fast.evaluation import tiny
from lorweb_fast.evaluation.report import aggregate, pareto_front

pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    demo.build_tiny_clip(root / "clip")
    tiny.save_random_lpips_backbone(root / "torch_home")
    ev = tiny.make_folder_evalset(root / "evalset", tasks=("flip", "swap"), per_task=3, size=(64, 48))
    tiny.make_runs_folder(root / "ours", ev, seed=1)
    tiny.make_runs_folder(root / "base", ev, seed=2)
    tiny.make_runs_folder(root / "ckpt2", ev, seed=3)
    return root


@pytest.fixture()
def torch_home(assets, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(assets / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


IDS = [f"{t}/{i:03d}" for t in ("flip", "swap") for i in range(3)]


def score_answer(acc, cons):
    answer = json.dumps({"metrics": {"accuracy": acc, "consistency": cons}, "explanation": "e"})
    return f"Transformation: mirror.\n```json\n{answer}\n```"


def write_replay(path, *, scores=None, better=None, missing=(), truncated=()):
    """scores: {id: raw answer}; better: {id: 1|2}; truncated: (id, kind) pairs marked as cut at the token limit."""
    rows = []
    for i, item in enumerate(IDS):
        if item in missing:
            continue
        rows.append({"id": item, "kind": "score", "response": (scores or {}).get(item, score_answer(5 + i % 3, 8))})
        rows.append({"id": item, "kind": "pairwise", "response": json.dumps({"better": (better or {}).get(item, 1),
                                                                             "explanation": "x"})})
        for row in rows[-2:]:
            if (item, row["kind"]) in truncated:
                row["truncated"] = True
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_cli(*argv):
    return cli.main(["eval", "score", *map(str, argv), "--device", "cpu", "--quiet"])


def test_aggregate_per_task_then_over_tasks():
    rows = [{"id": f"a/{i}", "task": "a", "clip_dir": v, "lpips": 0.1, "vlm_accuracy": v, "vlm_consistency": None}
            for i, v in enumerate((1.0, 2.0, 3.0))]
    rows.append({"id": "b/0", "task": "b", "clip_dir": 10.0, "lpips": 0.5, "vlm_accuracy": None,
                 "vlm_consistency": None})
    failures = [{"id": "b/0", "task": "b", "kind": "score", "error": "x", "response": "?"}]
    rep = aggregate(rows, failures)
    assert rep["per_task"]["a"]["clip_dir"] == pytest.approx(2.0)
    assert rep["overall"]["clip_dir"] == pytest.approx(6.0)  # (2 + 10) / 2, not the triplet mean 4
    assert rep["overall"]["lpips"] == pytest.approx(0.3)
    assert rep["overall"]["vlm_accuracy"] == pytest.approx(2.0)  # task b has no valid answer: left out, counted
    assert rep["overall"]["vlm_consistency"] is None
    assert rep["overall"]["failures"] == 1 and rep["overall"]["failures_by_kind"] == {"score": 1}
    assert rep["overall"]["tasks"] == 2 and rep["overall"]["triplets"] == 4


def test_aggregate_order_balanced_win_rate():
    def row(task, i, first, won):
        order = ["run", "against"] if first else ["against", "run"]
        return {"id": f"{task}/{i}", "task": task, "clip_dir": None, "lpips": None, "vlm_accuracy": None,
                "vlm_consistency": None, "pairwise": {"base": {"order": order, "better": 1, "won": won}}}

    # a judge that always answers 1: wins exactly when shown first
    rows = [row("a", 0, True, True), row("a", 1, False, False), row("a", 2, False, False),
            row("b", 0, True, True), row("b", 1, False, False)]
    p = aggregate(rows, [], ["base"])["overall"]["pairwise"]["base"]
    assert p["win_rate_as_b1"] == 1.0 and p["win_rate_as_b2"] == 0.0
    assert p["order_balanced_win_rate"] == 0.5  # the position bias cancels
    assert p["win_rate"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert p["n"] == 5 and p["balanced_tasks"] == 2


def test_order_balanced_win_rate_is_balanced_per_task():
    """A judge without any preference whose position bias differs between tasks (task a: always B'1, task b: always
    B'2, task c: always B'1): the balanced rate is exactly 1/2. Task c only had this method's b' shown first, so it
    cannot be balanced and is left out (counted in balanced_tasks); the over-task means of the two positions cover
    different tasks (as B'1: a, b, c; as B'2: a, b), and their mean would be (2/3 + 1/2) / 2."""
    def row(task, i, first, judge_says):
        order = ["run", "against"] if first else ["against", "run"]
        return {"id": f"{task}/{i}", "task": task, "clip_dir": None, "lpips": None, "vlm_accuracy": None,
                "vlm_consistency": None,
                "pairwise": {"base": {"order": order, "better": judge_says, "won": order[judge_says - 1] == "run"}}}

    rows = [row("a", 0, True, 1), row("a", 1, False, 1), row("b", 0, True, 2), row("b", 1, False, 2),
            row("c", 0, True, 1), row("c", 1, True, 1)]
    rep = aggregate(rows, [], ["base"])
    p = rep["overall"]["pairwise"]["base"]
    assert p["win_rate_as_b1"] == pytest.approx(2 / 3) and p["win_rate_as_b2"] == pytest.approx(1 / 2)
    assert p["order_balanced_win_rate"] == pytest.approx(0.5)
    assert p["balanced_tasks"] == 2 and p["n"] == 6
    tasks = rep["per_task"]
    assert tasks["a"]["pairwise"]["base"]["order_balanced_win_rate"] == 0.5
    assert tasks["c"]["pairwise"]["base"]["order_balanced_win_rate"] is None
    assert tasks["c"]["pairwise"]["base"]["win_rate"] == 1.0


def _items(sizes):
    from lorweb_fast.evaluation.evalsets import RunItem

    return [RunItem(f"t{t}", f"{i:03d}", *["x.png"] * 4) for t, n in enumerate(sizes) for i in range(n)]


def test_pairwise_orders_are_seeded_random_and_balanced_per_task():
    """Every task has floor(n/2) or ceil(n/2) items in each position (so every task with 2+ items has an
    order-balanced rate, whatever the run's name), the orders repeat for the same seed, names and items, and the
    seed (and the run's name) change which items are shown first; an odd item out goes to either position."""
    sizes = [1, 2, 3, 5, 6, 7, 2, 9, 1, 4] * 3
    items = _items(sizes)
    orders = S.pairwise_orders(0, "ours", "base", items)
    assert set(orders) == {it.key for it in items}
    assert orders == S.pairwise_orders(0, "ours", "base", list(reversed(items)))
    for t, n in enumerate(sizes):
        first = sum(orders[f"t{t}/{i:03d}"] == ["run", "against"] for i in range(n))
        assert first in (n // 2, (n + 1) // 2), (t, n, first)
    odd_first = [sum(orders[f"t{t}/{i:03d}"][0] == "run" for i in range(n)) for t, n in enumerate(sizes) if n % 2]
    assert len({f * 2 > n for f, n in zip(odd_first, [n for n in sizes if n % 2])}) == 2  # both ways
    for other in (S.pairwise_orders(1, "ours", "base", items), S.pairwise_orders(0, "lorweb", "base", items)):
        assert other != orders
        for t, n in enumerate(sizes):
            assert sum(other[f"t{t}/{i:03d}"][0] == "run" for i in range(n)) in (n // 2, (n + 1) // 2)
    for name in ("ours", "lorweb", "x"):  # the count of balanced tasks does not depend on the run's name
        rows = [{"id": k, "task": k.split("/")[0], "clip_dir": None, "lpips": None, "vlm_accuracy": None,
                 "vlm_consistency": None, "pairwise": {"base": {"order": o, "better": 1, "won": o[0] == "run"}}}
                for k, o in S.pairwise_orders(0, name, "base", items).items()]
        p = aggregate(rows, [], ["base"])["overall"]["pairwise"]["base"]
        assert p["balanced_tasks"] == sum(n >= 2 for n in sizes) and p["order_balanced_win_rate"] == 0.5


def test_pareto_front():
    pts = [(1, 5), (2, 4), (1.5, 3), (3, 1), (0.5, 5)]
    assert pareto_front(pts) == [0, 1, 3]


def test_score_end_to_end(assets, torch_home, tmp_path):
    replay = write_replay(tmp_path / "replay.jsonl", missing=("swap/002",), better={"flip/001": 2},
                          scores={"flip/000": "I think it is fine.", "flip/002": score_answer(11, 3)})
    out = tmp_path / "report"
    assert run_cli("--runs", assets / "ours", "--against", assets / "base", "--encoder", assets / "clip",
                   "--judge", f"replay:{replay}", "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"per_triplet", "per_task", "overall", "failures", "methods", "settings"}
    assert [r["id"] for r in m["per_triplet"]] == IDS
    for r in m["per_triplet"]:
        assert set(r) >= {"id", "task", "clip_dir", "lpips", "vlm_accuracy", "vlm_consistency"}
        assert -1 <= r["clip_dir"] <= 1 and r["lpips"] > 0
    by_id = {r["id"]: r for r in m["per_triplet"]}
    assert by_id["flip/001"]["vlm_accuracy"] == 6 and by_id["flip/001"]["vlm_consistency"] == 8
    for bad in ("flip/000", "flip/002", "swap/002"):
        assert by_id[bad]["vlm_accuracy"] is None
    fails = {(f["id"], f["kind"]): f for f in m["failures"]}
    assert fails[("flip/000", "score")]["response"] == "I think it is fine."
    assert "outside 1-10" in fails[("flip/002", "score")]["error"]
    assert "no replayed score answer" in fails[("swap/002", "score")]["error"]
    assert ("swap/002", "pairwise") in fails
    assert m["overall"]["failures"] == len(m["failures"]) == 4
    # per task, then over tasks
    flip = [by_id[f"flip/{i:03d}"]["clip_dir"] for i in range(3)]
    swap = [by_id[f"swap/{i:03d}"]["clip_dir"] for i in range(3)]
    assert m["per_task"]["flip"]["clip_dir"] == pytest.approx(sum(flip) / 3)
    assert m["overall"]["clip_dir"] == pytest.approx((sum(flip) / 3 + sum(swap) / 3) / 2)
    assert m["per_task"]["flip"]["vlm_accuracy"] == 6  # only flip/001 parsed
    # pairwise: the judge says "1" except for flip/001; won == (ours shown at the chosen position)
    from lorweb_fast.evaluation.evalsets import read_runs

    orders = S.pairwise_orders(0, "ours", "base", read_runs(assets / "ours"))
    for item in IDS[:-1]:
        pw = by_id[item]["pairwise"]["base"]
        assert pw["order"] == orders[item]
        assert pw["won"] == (pw["order"][pw["better"] - 1] == "run")
    assert m["settings"]["pairwise_seed"] == 0
    summary = (out / "summary.md").read_text()
    assert "| Model | Pres. (VLM) | Acc. (VLM) | LPIPS | CLIP Dir. | Pairwise VLM (%) vs base |" in summary
    assert "| ours | 2 | 6 | 4 (pairwise: 1, score: 3) |" in summary
    assert (out / "preservation_vs_accuracy.png").stat().st_size > 0 and (out / "win_rates.png").stat().st_size > 0
    # every raw answer is saved, in the replay format: re-scoring from it gives the same per-triplet results
    assert (out / "judge" / "ours" / "score" / "flip" / "000.json").is_file()
    out2 = tmp_path / "rescored"
    assert run_cli("--runs", assets / "ours", "--against", assets / "base", "--encoder", assets / "clip",
                   "--judge", f"replay:{out / 'judge_answers.jsonl'}", "--out", out2) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["per_triplet"] == m["per_triplet"]
    # answers given for the other B'1/B'2 order are refused, not read against the wrong image
    flipped = [json.loads(line) for line in (out / "judge_answers.jsonl").read_text().splitlines()]
    for rec in flipped:
        if rec["kind"] == "pairwise":
            rec["order"] = rec["order"][::-1]
    (tmp_path / "flipped.jsonl").write_text("\n".join(json.dumps(r) for r in flipped) + "\n")
    assert run_cli("--runs", assets / "ours", "--against", assets / "base", "--encoder", assets / "clip",
                   "--judge", f"replay:{tmp_path / 'flipped.jsonl'}", "--out", tmp_path / "flipped") == 2
    assert not (tmp_path / "flipped" / "metrics.json").exists()
    # replaying the report's own answers file into the same folder never deletes it, even when no answer matches
    saved = (out / "judge_answers.jsonl").read_text()
    assert run_cli("--runs", f"renamed={assets / 'ours'}", "--encoder", assets / "clip", "--metrics", "vlm",
                   "--judge", f"replay:{out / 'judge_answers.jsonl'}", "--out", out) == 0
    assert json.loads((out / "metrics.json").read_text())["overall"]["failures"] == len(IDS)
    assert (out / "judge_answers.jsonl").read_text() == saved
    # nor rewrites it with the subset a scoring uses (here the scores only: no baseline)
    assert run_cli("--runs", assets / "ours", "--encoder", assets / "clip", "--metrics", "vlm",
                   "--judge", f"replay:{out / 'judge_answers.jsonl'}", "--out", out) == 0
    assert json.loads((out / "metrics.json").read_text())["overall"]["vlm_accuracy"] is not None
    assert (out / "judge_answers.jsonl").read_text() == saved
    # a later scoring without a judge or baseline in the same folder leaves no stale answers or win-rate plot
    assert run_cli("--runs", assets / "ours", "--encoder", assets / "clip", "--out", out) == 0
    assert not (out / "judge_answers.jsonl").exists() and not (out / "win_rates.png").exists()
    assert (out / "preservation_vs_accuracy.png").is_file()


def test_score_counts_answers_cut_at_the_token_limit(assets, torch_home, tmp_path):
    """A judge answer cut at its token limit (the judge's ``last_truncated``; here replayed from a record's
    ``"truncated": true``) is flagged in its failure, counted in ``overall["truncated_answers"]`` whether or not it
    parsed, named in summary.md with the flag to raise, kept in judge_answers.jsonl (so replaying that file counts
    the same answers) and in the answer cache (so a resumed scoring does too); a report without cut answers has
    no such line, and a replay record whose ``truncated`` is not a boolean is refused by line."""
    replay = write_replay(tmp_path / "replay.jsonl", scores={"flip/000": "Transformation: mirror.\n```json\n{"},
                          truncated={("flip/000", "score"), ("flip/001", "pairwise")})
    out = tmp_path / "report"
    args = ("--runs", assets / "ours", "--against", assets / "base", "--encoder", assets / "clip",
            "--metrics", "vlm")
    assert run_cli(*args, "--judge", f"replay:{replay}", "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["overall"]["truncated_answers"] == 2
    assert [(f["id"], f["kind"], f["truncated"]) for f in m["failures"]] == [("flip/000", "score", True)]
    assert "raise --judge-max-new-tokens and rerun): ours: 2." in (out / "summary.md").read_text()
    cut = {(r["id"], r["kind"]) for r in map(json.loads, (out / "judge_answers.jsonl").read_text().splitlines())
           if r.get("truncated")}
    assert cut == {("flip/000", "score"), ("flip/001", "pairwise")}
    cached = json.loads((out / "judge" / "ours" / "score" / "flip" / "000.json").read_text())
    assert cached["truncated"] is True
    assert run_cli(*args, "--judge", f"replay:{replay}", "--out", out) == 0  # resumed from the answer cache
    assert json.loads((out / "metrics.json").read_text())["overall"]["truncated_answers"] == 2
    again = tmp_path / "again"
    assert run_cli(*args, "--judge", f"replay:{out / 'judge_answers.jsonl'}", "--out", again) == 0
    assert json.loads((again / "metrics.json").read_text())["overall"]["truncated_answers"] == 2
    clean = tmp_path / "clean"
    assert run_cli(*args, "--judge", f"replay:{write_replay(tmp_path / 'clean.jsonl')}", "--out", clean) == 0
    assert json.loads((clean / "metrics.json").read_text())["overall"]["truncated_answers"] == 0
    assert "token limit" not in (clean / "summary.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": IDS[0], "kind": "score", "response": "x", "truncated": "yes"}) + "\n")
    from lorweb_fast.evaluation import judge as J

    with pytest.raises(J.EvalInputError, match=r"bad\.jsonl:1: truncated must be true or false, got 'yes'"):
        J.ReplayJudge(bad)


def _coloured_runs(root, name, ids):
    """A runs folder whose every image is one solid colour standing for (folder, item, stem); returns
    {colour: label}. The a, a', b of one item differ between folders by 2/255 in one channel only (the same
    analogy to ``baseline_mismatch``, yet each file recognisable); the b' differ widely."""
    from PIL import Image

    labels = {}
    for k, item in enumerate(ids):
        d = root / name / item
        d.mkdir(parents=True, exist_ok=True)
        for j, stem in enumerate(("a", "a_prime", "b", "b_prime")):
            if stem == "b_prime":
                colour = (17 * k + 3, 40 * j + 5, 100 if name == "ours" else 200)
            else:
                colour = (17 * k + 3, 40 * j + 5, 100 if name == "ours" else 102)
            labels[colour] = f"{name}:{item}:{stem}"
            Image.new("RGB", (32, 24), colour).save(d / f"{stem}.png")
    return labels


def test_the_judge_sees_a_a_prime_b_b_prime_and_the_pairwise_b_primes_in_the_recorded_order(tmp_path):
    """The paper's protocol (A.3): the score question shows A, A', B, B' in that order; the 2AFC shows A, A', B and
    then the two B' as the recorded order says (B'1 first), and ``won`` is read through the same order. A judge that
    records the images it is given (each file one colour) and always answers "B'1 is better" checks both: a swapped
    stem list, or images shown in a fixed order while ``won`` follows the recorded one, fail here (the replay judge of
    the other tests never looks at the images)."""
    from lorweb_fast.evaluation.judge import JudgeRequest

    labels = {**_coloured_runs(tmp_path, "ours", IDS), **_coloured_runs(tmp_path, "base", IDS)}
    seen = []

    class Recorder:
        name = "recorder"

        def __call__(self, request: JudgeRequest) -> str:
            shown = [labels[img.convert("RGB").getpixel((0, 0))] for img in request.images()]
            seen.append((request.kind, request.id, request.order, shown))
            if request.kind == "score":
                return score_answer(7, 7)
            return json.dumps({"better": 1, "explanation": "the first"})

    m = S.score({"ours": tmp_path / "ours"}, tmp_path / "report", metrics=["vlm"], judge=Recorder(),
                against={"base": tmp_path / "base"}, progress=False)
    scores = [x for x in seen if x[0] == "score"]
    pairs = [x for x in seen if x[0] == "pairwise"]
    assert sorted(x[1] for x in scores) == sorted(IDS) and sorted(x[1] for x in pairs) == sorted(IDS)
    for _, item, _, shown in scores:
        assert shown == [f"ours:{item}:{s}" for s in ("a", "a_prime", "b", "b_prime")]
    rows = {r["id"]: r for r in m["per_triplet"]}
    firsts = set()
    for _, item, order, shown in pairs:
        assert shown[:3] == [f"ours:{item}:{s}" for s in ("a", "a_prime", "b")]
        names = {"run": "ours", "against": "base"}
        assert shown[3:] == [f"{names[o]}:{item}:b_prime" for o in order]
        entry = rows[item]["pairwise"]["base"]
        assert entry["order"] == order and entry["won"] == (order[0] == "run")
        firsts.add(order[0])
    assert firsts == {"run", "against"}  # both positions occur


def test_clip_direction_has_the_sign_of_the_analogy(assets, tmp_path):
    """b = a and b' = a' make the edit directions e(a') - e(a) and e(b') - e(b) equal: CLIP Dir. is +1 (a stem
    list with b and b' swapped gives -1)."""
    import shutil

    run = tmp_path / "runs"
    tiny.make_runs_folder(run, tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2, size=(64, 48)))
    for d in (run / "flip").iterdir():
        shutil.copyfile(d / "a.png", d / "b.png")
        shutil.copyfile(d / "a_prime.png", d / "b_prime.png")
    m = S.score({"ours": run}, tmp_path / "report", metrics=["clip_dir"], encoder=str(assets / "clip"),
                progress=False, device="cpu")
    assert [r["clip_dir"] for r in m["per_triplet"]] == [pytest.approx(1.0, abs=1e-5)] * 2


def test_score_batch_size_must_be_positive(assets, tmp_path):
    """A negative --batch-size silently skipped CLIP Dir. (an empty range), 0 failed with range()'s message."""
    from lorweb_fast.evaluation.evalsets import EvalInputError

    for bad in (0, -1, 1.5, True):
        with pytest.raises(EvalInputError, match=r"batch_size \(--batch-size\) must be an integer >= 1"):
            S.score({"ours": assets / "ours"}, tmp_path / "r", metrics=["clip_dir"], encoder=str(assets / "clip"),
                    batch_size=bad, progress=False)
    assert not (tmp_path / "r").exists()


def test_score_resumes_from_caches(assets, torch_home, tmp_path, monkeypatch):
    import shutil

    ours = shutil.copytree(assets / "ours", tmp_path / "ours")
    replay = write_replay(tmp_path / "replay.jsonl")
    out = tmp_path / "report"
    args = ("--runs", ours, "--against", assets / "base", "--encoder", assets / "clip",
            "--judge", f"replay:{replay}", "--out", out)
    assert run_cli(*args) == 0
    first = json.loads((out / "metrics.json").read_text())

    def boom(*a, **k):
        raise AssertionError("recomputed a cached metric")

    from lorweb_fast.evaluation import metrics as M

    with monkeypatch.context() as mp:
        mp.setattr(M.ClipDirectional, "__call__", boom)
        mp.setattr(M.LPIPSDistance, "__call__", boom)
        assert run_cli(*args) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["per_triplet"] == first["per_triplet"]  # cached answers per item and prompt
    # a rewritten replay file at the same path is the judge's new "model": asked again, not served from the cache
    write_replay(replay, better={i: 2 for i in IDS}, scores={i: score_answer(1, 1) for i in IDS})
    with monkeypatch.context() as mp:
        mp.setattr(M.ClipDirectional, "__call__", boom)
        mp.setattr(M.LPIPSDistance, "__call__", boom)
        assert run_cli(*args) == 0
    changed = json.loads((out / "metrics.json").read_text())
    assert all(r["vlm_accuracy"] == 1 for r in changed["per_triplet"])
    assert changed["per_triplet"] != first["per_triplet"]
    write_replay(replay)  # the first answers again
    assert run_cli(*args) == 0
    assert json.loads((out / "metrics.json").read_text())["per_triplet"] == first["per_triplet"]
    # a torn last cache line (killed run) is ignored; a changed b' is recomputed and judged again
    cache = out / "cache" / "ours" / "metrics.jsonl"
    cache.write_text(cache.read_text() + '{"id": "flip/0')
    shutil.copyfile(ours / "flip/000/b.png", ours / "flip/000/b_prime.png")
    from lorweb_fast.evaluation.judge import ReplayJudge

    asked = []
    real_call = ReplayJudge.__call__
    with monkeypatch.context() as mp:
        mp.setattr(ReplayJudge, "__call__", lambda self, request: (asked.append((request.id, request.kind)),
                                                                    real_call(self, request))[1])
        assert run_cli(*args) == 0
    third = {r["id"]: r for r in json.loads((out / "metrics.json").read_text())["per_triplet"]}
    assert third["flip/000"]["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert third["flip/000"]["clip_dir"] == 0.0
    assert sorted(asked) == [("flip/000", "pairwise"), ("flip/000", "score")]  # only about the new b'
    assert third["flip/001"] == {**first["per_triplet"][1]}


def test_several_runs_side_by_side(assets, torch_home, tmp_path):
    out = tmp_path / "report"
    assert run_cli("--runs", assets / "ours", f"second={assets / 'ckpt2'}", "--encoder", assets / "clip",
                   "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["methods"]) == {"ours", "second"} and m["method"] == "ours"
    assert m["overall"] == m["methods"]["ours"]["overall"]
    assert m["overall"]["vlm_accuracy"] is None  # no judge: no VLM metrics
    summary = (out / "summary.md").read_text()
    assert "| ours |" in summary and "| second |" in summary
    assert (out / "preservation_vs_accuracy.png").is_file()  # LPIPS vs CLIP Dir. without VLM scores
    assert not (out / "win_rates.png").exists()


def test_tiny_gemma3_judge_end_to_end(assets, torch_home, tmp_path):
    """A random Gemma-3 answers gibberish: every item is listed as a failure with its raw answer, none dropped."""
    gemma = tiny.build_tiny_gemma3(tmp_path / "gemma3")
    out = tmp_path / "report"
    assert run_cli("--runs", assets / "ours", "--encoder", assets / "clip", "--metrics", "vlm",
                   "--judge", f"gemma3:{gemma}", "--judge-max-new-tokens", "6", "--judge-dtype", "fp32",
                   "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    raws = {f["id"]: f["response"] for f in m["failures"] if f["kind"] == "score"}
    parsed = [r["id"] for r in m["per_triplet"] if r["vlm_accuracy"] is not None]
    assert sorted(list(raws) + parsed) == IDS
    for item, raw in raws.items():
        task, _, name = item.partition("/")
        cached = json.loads((out / "judge" / "ours" / "score" / task / f"{name}.json").read_text())
        assert cached["response"] == raw and cached["judge"] == f"gemma3:{gemma} max_new_tokens=6 dtype=float32"
        assert cached["truncated"] is next(f["truncated"] for f in m["failures"] if f["id"] == item)
    # the count is of the cached records' flags (the seeded random model cuts at least flip/000's answer)
    flags = [json.loads(p.read_text())["truncated"] for p in (out / "judge" / "ours" / "score").rglob("*.json")]
    assert len(flags) == len(IDS) and m["overall"]["truncated_answers"] == sum(flags) >= 1
    assert m["overall"]["clip_dir"] is None and m["overall"]["lpips"] is None


def test_named_runs_folders(tmp_path, monkeypatch):
    """--runs PATH or NAME=PATH; a path with "=" in a folder name stays one path."""
    from lorweb_fast.evaluation.cli import _named_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "N=32_r=4").mkdir()
    assert _named_path("runs/ours") == ("ours", "runs/ours", False)
    assert _named_path("second=runs/ckpt2") == ("second", "runs/ckpt2", True)
    assert _named_path("/data/lr=1e-3/runs") == ("runs", "/data/lr=1e-3/runs", False)  # a separator before the "="
    assert _named_path("N=32_r=4") == ("N=32_r=4", "N=32_r=4", False)  # an existing folder
    assert _named_path("ablation=N=32_r=4") == ("ablation", "N=32_r=4", True)


def test_cli_bad_input_exits_2(assets, torch_home, tmp_path, capsys):
    assert run_cli("--runs", tmp_path / "nope", "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorweb-fast eval score: error: runs folder not found") and "\n" not in err
    assert run_cli("--runs", assets / "ours", "--metrics", "vlm", "--out", tmp_path / "r") == 2
    assert "needs a judge" in capsys.readouterr().err
    assert run_cli("--runs", assets / "ours", "--against", assets / "base", "--metrics", "clip_dir",
                   "--encoder", assets / "clip", "--out", tmp_path / "r") == 2
    assert "--against" in capsys.readouterr().err
    assert run_cli("--runs", assets / "ours", "--encoder", tmp_path / "no-clip", "--out", tmp_path / "r") == 2
    assert "cannot load the CLIP encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli("--runs", assets / "ours", "--metrics", "fid", "--out", tmp_path / "r")
    assert exc.value.code == 2
    for judge in ("none", "replay:" + str(tmp_path / "answers.jsonl")):  # checked whatever the judge
        assert run_cli("--runs", assets / "ours", "--judge", judge, "--judge-max-new-tokens", "0",
                       "--out", tmp_path / "r") == 2
        assert "max_new_tokens (--judge-max-new-tokens) must be" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_lpips_weights_exits_2(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert run_cli("--runs", assets / "ours", "--metrics", "lpips", "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and str(tmp_path / "empty_home") in err and "--lpips-weights" in err
    weights = tiny.save_random_lpips_backbone(tmp_path / "elsewhere")
    assert run_cli("--runs", assets / "ours", "--metrics", "lpips", "--lpips-weights", weights,
                   "--out", tmp_path / "r") == 0


def test_cli_refuses_an_out_that_is_a_file(assets, torch_home, tmp_path, capsys):
    """--out naming a file: one line naming it (it was a NotADirectoryError traceback, after reading the runs)."""
    out = tmp_path / "report.md"
    out.write_text("mine")
    assert run_cli("--runs", assets / "ours", "--out", out, "--encoder", assets / "clip") == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {out} is a file; give a folder" in err and "\n" not in err and "Traceback" not in err
    assert out.read_text() == "mine"


def test_cli_refuses_a_report_inside_a_runs_folder(assets, torch_home, tmp_path, capsys):
    """--out inside a runs folder: the first scoring worked and wrote cache/ there, which the next scoring read as a
    task ("missing image .../cache/a.<png|...>"); refused before anything is written."""
    import shutil

    runs = tmp_path / "ours"
    shutil.copytree(assets / "ours", runs)
    for out, argv in ((runs / "report", ("--runs", runs)), (runs, ("--runs", runs)),
                      (runs / "r", ("--runs", assets / "ckpt2", "--against", runs, "--judge",
                                    "replay:" + str(write_replay(tmp_path / "a.jsonl"))))):
        assert run_cli(*argv, "--out", out, "--encoder", assets / "clip") == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {out.resolve()} is inside runs folder" in err and "\n" not in err
    assert sorted(p.name for p in runs.iterdir()) == ["flip", "swap"]
    with pytest.raises(S.EvalInputError, match="is inside runs folder 'ours'"):
        S.score({"ours": runs}, runs / "report", metrics=["lpips"])
