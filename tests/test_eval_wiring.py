"""How the evaluation protocol is wired (from a mutation audit of lorweb_fast/evaluation/: each test failed a
hand-made change of generate.py, evalsets.py, judge.py, score.py, report.py, metrics.py or cli.py that the rest of the
suite let pass, and passes on the original): the defaults of ``generate()`` (official inference.py: seed 50), the
saved inputs' cap, the settings ``eval generate`` records, checks before any model loads and passes to the pipeline
loader, the resume bookkeeping (b choices of earlier calls, evalset.json), and the scoring details that decide the
published numbers. The comment above each test names the mutant it kills.

References: the paper (/work/shared/paper/lorweb-paper.txt, section 4.2 and appendix A.2/A.3) and the official
inference.py of NVlabs/LoRWeB (``--seed`` 50, ``--guidance_scale`` 2.5, ``torch.Generator(args.device)``).
Nothing is downloaded: the pipeline, CLIP, LPIPS and the judge are small stand-ins built here.
"""

import json
import random

import pytest
import torch
from PIL import Image

from lorweb_fast import cli
from lorweb_fast.evaluation import evalsets as E
from lorweb_fast.evaluation import generate as G
from lorweb_fast.evaluation import tiny


# ------------------------------------------------------------------------------------------------------ helpers
class EchoPipe:
    """Stands in for LoRWeBKontextPipeline: records the generators' seeds and the settings of every call; returns a
    b' of b's size whose red channel is the generator's seed."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, a_prime, b, prompt, *, generator=None, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"seeds": seeds, **kwargs})
        return [Image.new("RGB", im.size, (s % 256, 0, 0)) for im, s in zip(b, seeds)]


def solid_evalset(root, n=2, size=(16, 16), task="t"):
    """Folder layout: item i has a = (i, 1, 0), a' = (i, 2, 0), b = (i, 3, 0), all of ``size``."""
    for i in range(n):
        d = root / task / f"{i:03d}"
        d.mkdir(parents=True)
        for j, stem in enumerate(("a", "a_prime", "b"), 1):
            Image.new("RGB", size, (i, j, 0)).save(d / f"{stem}.png")
        (d / "prompt.txt").write_text("p\n")
    return root


def make_released(root, sizes, a_size=(60, 40), n_a_prime=1):
    """``tiny.make_released_evalset`` (one a' image unless told otherwise)."""
    return tiny.make_released_evalset(root, sizes, a_size=a_size, n_a_prime=n_a_prime)


@pytest.fixture()
def fake_loader(tmp_path, monkeypatch):
    """``LoRWeBKontextPipeline.from_pretrained`` replaced by a recorder returning an EchoPipe (no model loads); a
    checkpoint file to pass as --weights; the current directory is ``tmp_path``, holding a marker-only model folder
    ``m`` (--model is checked before anything loads); HF_HUB_OFFLINE unset. Returns (loads, pipe, weights): loads
    lists the loader's kwargs."""
    from safetensors.torch import save_file

    from lorweb_fast.flux import LoRWeBKontextPipeline

    loads, pipe = [], EchoPipe()

    def from_pretrained(*args, **kwargs):
        loads.append(kwargs)
        return pipe

    monkeypatch.setattr(LoRWeBKontextPipeline, "from_pretrained", staticmethod(from_pretrained))
    # the checkpoint names no encoder: the default Hub CLIP, checked against the cache only when offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    weights = tmp_path / "lorweb.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    return loads, pipe, weights


def gen(evalset, weights, out, *extra):
    return cli.main(["eval", "generate", "--evalset", str(evalset), "--weights", str(weights), "--model", "m",
                     "--out", str(out), "--device", "cpu", "--quiet", *map(str, extra)])


# ------------------------------------------------------------------------------------- generate(): defaults
# G01: generate(seeds=(50,)) -> (42,)
def test_generate_without_seeds_seeds_every_analogy_with_50(tmp_path):
    """Official inference.py ``--seed`` default 50: ``generate()`` called without seeds seeds each analogy's
    generator with 50, and the folders carry no ``_seed`` suffix (one seed)."""
    pipe = EchoPipe()
    G.generate(pipe, E.read_evalset(solid_evalset(tmp_path / "ev", n=3)), tmp_path / "runs", batch_size=2,
               progress=False)
    assert [s for c in pipe.calls for s in c["seeds"]] == [50, 50, 50]
    assert sorted(p.name for p in (tmp_path / "runs" / "t").iterdir()) == ["000", "001", "002"]
    assert Image.open(tmp_path / "runs/t/000/b_prime.png").getpixel((0, 0)) == (50, 0, 0)


# G05: generate(input_long_edge=1024) -> 512
def test_generate_caps_the_saved_inputs_at_1024_by_default(tmp_path):
    """``generate()`` keeps the a, a', b copies it saves at a long edge of at most 1024 by default (as the CLI's
    --input-long-edge): a 1200 x 600 input is saved as 1024 x 512, b' (the output) is never resized."""
    ev = solid_evalset(tmp_path / "ev", n=1, size=(1200, 600))
    G.generate(EchoPipe(), E.read_evalset(ev), tmp_path / "runs", progress=False)
    for stem in ("a", "a_prime", "b"):
        assert Image.open(tmp_path / "runs/t/000" / f"{stem}.png").size == (1024, 512)
    assert Image.open(tmp_path / "runs/t/000/b_prime.png").size == (1200, 600)


# G07: capped(): `not long_edge` -> `long_edge is None` (0 made a scale of 0: 1 x 1 copies)
def test_input_long_edge_0_keeps_the_inputs_as_they_are(tmp_path):
    """``input_long_edge`` 0 (``--input-long-edge 0``: keep) saves the inputs at their own size."""
    ev = solid_evalset(tmp_path / "ev", n=1, size=(40, 24))
    G.generate(EchoPipe(), E.read_evalset(ev), tmp_path / "runs", input_long_edge=0, progress=False)
    for stem in ("a", "a_prime", "b"):
        assert Image.open(tmp_path / "runs/t/000" / f"{stem}.png").size == (40, 24)
    img = Image.new("RGB", (40, 24))
    assert G.capped(img, 0).size == G.capped(img, None).size == (40, 24)


# ------------------------------------------------------------------------------------ generate(): resume records
# G17: check_run_settings stops recording the union of the b choices (settings["b_choices"] = merged dropped)
def test_run_json_keeps_the_b_choices_of_tasks_an_earlier_call_covered(tmp_path):
    """A resume restricted by --tasks records its tasks' b picks beside the earlier ones (the union), so a later
    resume of an earlier task whose picks changed is still refused."""
    base = {"resolution": "official", "merge": "none"}
    G.check_run_settings(tmp_path, {**base, "b_choices": {"A": {"p1": "aaaa"}}})
    G.check_run_settings(tmp_path, {**base, "b_choices": {"B": {"p2": "bbbb"}}})  # --tasks B
    assert json.loads((tmp_path / "run.json").read_text())["b_choices"] == {"A": {"p1": "aaaa"}, "B": {"p2": "bbbb"}}
    with pytest.raises(G.EvalInputError, match=r"b choices differ .* \(A\)"):
        G.check_run_settings(tmp_path, {**base, "b_choices": {"A": {"p1": "cccc"}}}, write=False)


# G26: _record_triplets writes the records unsorted
def test_evalset_json_stays_sorted_by_id_after_a_restricted_resume(tmp_path):
    """evalset.json lists the triplet records sorted by id, also when a later call adds an earlier task's."""
    ev = solid_evalset(tmp_path / "ev", n=1, task="b_task")
    solid_evalset(tmp_path / "ev", n=1, task="a_task")
    triplets = E.read_evalset(ev)
    G.generate(EchoPipe(), [t for t in triplets if t.task == "b_task"], tmp_path / "runs", progress=False)
    G.generate(EchoPipe(), [t for t in triplets if t.task == "a_task"], tmp_path / "runs", progress=False)
    ids = [r["id"] for r in json.loads((tmp_path / "runs" / "evalset.json").read_text())]
    assert ids == ["a_task/000", "b_task/000"]


# G28: b_choices_by_task signs the b of a pair in the order given (sorted dropped)
def test_b_choices_signature_does_not_depend_on_the_triplet_order(tmp_path):
    """A pair's b choices are signed as a set: the same triplets in another order give the same signatures."""
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50), "c3": (62, 40)}, n_a_prime=2)
    triplets = E.read_evalset(root)
    assert G.b_choices_by_task(root, triplets) == G.b_choices_by_task(root, list(reversed(triplets)))


# ---------------------------------------------------------------------------------------- eval generate (CLI)
# G30: run_generate signs the b choices of the triplets after --max-per-task instead of the picks
def test_resume_with_a_larger_max_per_task_is_accepted(fake_loader, tmp_path, capsys):
    """--max-per-task only restricts a run to a subset of the same triplets (generate.py docstring): a run with
    --max-per-task 1 of the released layout (2 b per a') resumes with --max-per-task 2 and adds the second b."""
    loads, pipe, weights = fake_loader
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50), "c3": (62, 40)})
    assert gen(root, weights, tmp_path / "runs", "--max-per-task", 1) == 0
    assert "1 generated, 0 already done" in capsys.readouterr().out
    assert gen(root, weights, tmp_path / "runs", "--max-per-task", 2) == 0
    assert "1 generated, 1 already done" in capsys.readouterr().out


# G31: run.json / the loader get encoder_dtype "fp32" instead of --dtype for --encoder-dtype auto
# G36: --long-edge is not passed to the pipeline loader
def test_eval_generate_passes_the_dtypes_and_the_resolution_caps_to_the_loader(fake_loader, tmp_path):
    """--encoder-dtype auto is --dtype (official inference.py runs the encoder in the pipeline's dtype), recorded so
    and given to the loader; --resolution native --long-edge N and --resolution official --max-size N reach it."""
    loads, pipe, weights = fake_loader
    ev = solid_evalset(tmp_path / "ev", n=1)
    assert gen(ev, weights, tmp_path / "r1", "--resolution", "native", "--long-edge", 96) == 0
    assert loads[-1]["dtype"] == torch.bfloat16 and loads[-1]["encoder_dtype"] == torch.bfloat16
    assert loads[-1]["resolution"] == "native" and loads[-1]["long_edge"] == 96
    run = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert (run["dtype"], run["encoder_dtype"], run["long_edge"]) == ("bf16", "bf16", 96)
    assert gen(ev, weights, tmp_path / "r2", "--max-size", 512, "--dtype", "fp16") == 0
    assert loads[-1]["resolution"] == "official" and loads[-1]["max_size"] == 512
    assert loads[-1]["encoder_dtype"] == torch.float16
    assert gen(ev, weights, tmp_path / "r3", "--dtype", "fp16", "--encoder-dtype", "fp32") == 0
    assert loads[-1]["encoder_dtype"] == torch.float32
    assert json.loads((tmp_path / "r3" / "run.json").read_text())["encoder_dtype"] == "fp32"


# G32: run.json records generator_device "cpu" whatever the device
def test_eval_generate_records_the_generators_device(fake_loader, tmp_path, monkeypatch):
    """The generators are made on --device (a CUDA generator draws other noise than a CPU one from the same seed):
    run.json records that device type, so a resume on the CPU of a GPU run is refused. (No GPU is needed: the device
    check and torch.Generator are replaced by stand-ins.)"""
    from lorweb_fast import validation
    from lorweb_fast.testing import device_recording_generator

    loads, pipe, weights = fake_loader
    made = []
    monkeypatch.setattr(validation, "check_device", lambda name, device: torch.device(device))
    monkeypatch.setattr(torch, "Generator", device_recording_generator(made))
    ev = solid_evalset(tmp_path / "ev", n=1)
    assert cli.main(["eval", "generate", "--evalset", str(ev), "--weights", str(weights), "--model", "m",
                     "--out", str(tmp_path / "runs"), "--device", "cuda", "--quiet"]) == 0
    assert made == [torch.device("cuda")]
    assert json.loads((tmp_path / "runs" / "run.json").read_text())["generator_device"] == "cuda"


# G33: run.json records pairs_sha256 None whatever the --pairs file
def test_resume_after_the_pairs_file_changed_is_refused(fake_loader, tmp_path, capsys):
    """--pairs fixes the b choices of the released layout; its SHA-256 is recorded and a resume with another
    content is refused (it would add the new b beside the old ones)."""
    loads, pipe, weights = fake_loader
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50)})
    a_prime = "decoded_random_inference_set/db_not_in_trainset/animals/Add_a_hat/dog_0.png"
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"a_prime": a_prime, "b": "original/unsplash_animals/c1.jpg"}]))
    assert gen(root, weights, tmp_path / "runs", "--pairs", pairs) == 0
    assert json.loads((tmp_path / "runs" / "run.json").read_text())["pairs_sha256"] == G.file_sha256(pairs)
    pairs.write_text(json.dumps([{"a_prime": a_prime, "b": "original/unsplash_animals/c2.jpg"}]))
    capsys.readouterr()
    assert gen(root, weights, tmp_path / "runs", "--pairs", pairs) == 2
    assert "pairs_sha256: " in capsys.readouterr().err


# G35: the settings check before the models load is dropped (checked only after loading)
def test_a_resume_with_other_settings_is_refused_before_the_models_load(fake_loader, tmp_path, capsys):
    """A resume with other settings is refused before the pipeline loads (minutes for FLUX.1-Kontext)."""
    loads, pipe, weights = fake_loader
    ev = solid_evalset(tmp_path / "ev", n=1)
    assert gen(ev, weights, tmp_path / "runs") == 0
    assert len(loads) == 1
    assert gen(ev, weights, tmp_path / "runs", "--guidance-scale", 3.0) == 2
    assert "guidance_scale: 2.5 -> 3.0" in capsys.readouterr().err
    assert len(loads) == 1


# G40: "encoder_dtype" dropped from RESUME_KEYS
@pytest.mark.parametrize("key, value", [("encoder_dtype", "fp32"), ("dtype", "fp32"), ("model", "other/model"),
                                        ("encoder", "other/clip"), ("pipe_kwargs", {"max_sequence_length": 64}),
                                        ("weights_sha256", "cd" * 32)])
def test_resume_refuses_other_models_dtypes_or_pipeline_arguments(tmp_path, key, value):
    """b' made with another encoder dtype, pipeline dtype, model, encoder, pipeline arguments or checkpoint content
    would be mixed with the recorded ones in one runs folder: refused, naming the setting."""
    settings = {"weights": "w", "weights_sha256": "ab" * 32, "model": "black-forest-labs/x", "encoder": None,
                "dtype": "bf16", "encoder_dtype": "bf16", "pipe_kwargs": {}, "resolution": "official",
                "merge": "none"}
    G.check_run_settings(tmp_path, settings)
    G.check_run_settings(tmp_path, settings, write=False)
    with pytest.raises(G.EvalInputError, match=f"{key}: "):
        G.check_run_settings(tmp_path, {**settings, key: value}, write=False)


# G41: _weights_identity cuts at the first "snapshots" folder of the path instead of huggingface_hub's (the last)
def test_hub_weights_identity_inside_a_folder_named_snapshots(tmp_path):
    """A Hugging Face cache kept under a folder that is itself named "snapshots": the identity is still
    ``<repo>@<commit>/<path in the repo>`` (huggingface_hub's ``snapshots/<commit>/`` is the last one)."""
    file = tmp_path / "snapshots" / "hf" / "models--o--w" / "snapshots" / "abc123" / "w.safetensors"
    assert G._weights_identity("o/w", file) == "o/w@abc123/w.safetensors"


# ------------------------------------------------------------------------------------------------- score: 2AFC
def solid_runs(root, items, *, shade=0, b_colour=None):
    """``root/<task>/<id>/{a,a_prime,b,b_prime}.png``, solid colours distinct per item and stem, the same a, a', b in
    every folder unless ``b_colour`` (this folder's b); ``shade`` tints b' only; returns read_runs."""
    for n, key in enumerate(items):
        d = root / key
        d.mkdir(parents=True, exist_ok=True)
        for j, stem in enumerate(("a", "a_prime", "b", "b_prime")):
            colour = (10 + 20 * n, 50 * j, shade if stem == "b_prime" else 90)
            if stem == "b" and b_colour is not None:
                colour = b_colour
            Image.new("RGB", (16, 12), colour).save(d / f"{stem}.png")
    return E.read_runs(root)


FixedJudge = tiny.FixedJudge  # score 7/8, pairwise B'1; records the questions


# S07: DIFFERENT_PICTURE 0.1 -> 0.5
def test_a_baseline_b_of_another_grey_level_is_another_picture(tmp_path):
    """A baseline whose b is another picture (a mean 32x32-thumbnail difference of 0.24: grey 100 against 160) holds
    another analogy under that id: a failure, not judged."""
    from lorweb_fast.evaluation import score as S

    items = solid_runs(tmp_path / "ours", ["t/0"], b_colour=(100, 100, 100))
    base = solid_runs(tmp_path / "base", ["t/0"], shade=200, b_colour=(160, 160, 160))
    judge = FixedJudge()
    res = S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=judge, baselines={"base": base},
                      progress=False)
    assert [f["id"] for f in res["failures"] if f["kind"] == "pairwise"] == ["t/0"]
    assert not [q for q in judge.asked if q[0] == "pairwise"]


# S10: the B'1/B'2 orders are drawn over the items the baseline holds, mismatched ones included
def test_pairwise_orders_are_balanced_over_the_judged_items_when_a_baseline_item_is_another_analogy(tmp_path):
    """A task of 3 whose baseline holds another analogy under t/1 (not judged): the 2 judged items are shown one as
    B'1 and one as B'2 for every seed, so the task's order-balanced rate exists."""
    from lorweb_fast.evaluation import score as S

    items = solid_runs(tmp_path / "ours", ["t/0", "t/1", "t/2"])
    base = solid_runs(tmp_path / "base", ["t/0", "t/1", "t/2"], shade=200)
    Image.new("RGB", (16, 12), (255, 255, 255)).save(tmp_path / "base" / "t" / "1" / "a.png")
    base = E.read_runs(tmp_path / "base")
    for seed in range(12):
        res = S.score_run("ours", items, tmp_path / f"rep{seed}", metrics=["vlm"], judge=FixedJudge(),
                          baselines={"base": base}, pairwise_seed=seed, progress=False)
        rows = {r["id"]: r["pairwise"]["base"] for r in res["per_triplet"]}
        assert rows["t/1"]["order"] is None
        assert sorted(rows[k]["order"][0] for k in ("t/0", "t/2")) == ["against", "run"], seed


# S15: the score question's cache key holds b' only (a, a', b dropped from files_sig)
@pytest.mark.parametrize("stem", ["a", "a_prime", "b"])
def test_a_replaced_input_is_judged_again(tmp_path, stem):
    """The score question shows A, A', B and B' (paper A.3): a replaced a, a' or b is asked again, not answered from
    the cache of the old picture."""
    from lorweb_fast.evaluation import score as S

    items = solid_runs(tmp_path / "ours", ["t/0", "t/1"])
    S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=FixedJudge(), progress=False)
    Image.new("RGB", (20, 14), (1, 2, 3)).save(getattr(items[0], stem))
    judge = FixedJudge()
    S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=judge, progress=False)
    assert judge.asked == [("score", "t/0", None)]


# S16: the 2AFC question's cache key holds this run's b' only (the baseline's b' dropped from files_sig)
def test_a_replaced_baseline_b_prime_is_judged_again(tmp_path):
    """The 2AFC shows both b' (paper A.3): a baseline b' regenerated since the last scoring is asked about again."""
    from lorweb_fast.evaluation import score as S

    items = solid_runs(tmp_path / "ours", ["t/0", "t/1"])
    base = solid_runs(tmp_path / "base", ["t/0", "t/1"], shade=200)
    S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=FixedJudge(), baselines={"base": base},
                progress=False)
    Image.new("RGB", (20, 14), (1, 2, 3)).save(base[1].b_prime)
    judge = FixedJudge()
    S.score_run("ours", items, tmp_path / "rep", metrics=["vlm"], judge=judge, baselines={"base": base},
                progress=False)
    assert judge.asked == [("pairwise", "t/1", "base")]


class FakeClip:
    """Stands in for ClipDirectional: counts the quads it is asked about."""

    name, cache_id = "clip-A", "clip:clip-A"

    def __init__(self):
        self.asked = 0

    def __call__(self, quads):
        self.asked += len(quads)
        return [0.25] * len(quads)


class FakeLpips:
    """Stands in for LPIPSDistance: records the sizes of the (first, second) images it gets."""

    net, weights, cache_id = "alex", "w.pth", "lpips:alex:w.pth"

    def __init__(self):
        self.sizes = []

    def __call__(self, b, b_prime):
        self.sizes.append((b.size, b_prime.size))
        return 0.5


# S20: MetricCache keeps the first record of an item instead of the latest (a recomputed value never served)
def test_a_recomputed_metric_is_served_from_the_cache_afterwards(tmp_path):
    """After a b' changed and its CLIP Dir. was recomputed, the next scoring serves the new value from the cache
    (the cache file's latest record of the item wins over the stale one)."""
    from lorweb_fast.evaluation import score as S

    items = solid_runs(tmp_path / "ours", ["t/0", "t/1"])
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=FakeClip(), progress=False)
    Image.new("RGB", (20, 14), (1, 2, 3)).save(items[0].b_prime)
    clip = FakeClip()
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=clip, progress=False)
    assert clip.asked == 1
    clip = FakeClip()
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=clip, progress=False)
    assert clip.asked == 0


# S14: score_run gives LPIPS (b', b) instead of (b, b')
def test_lpips_is_asked_about_b_then_b_prime(tmp_path):
    """LPIPS(b, b') (paper 4.2): LPIPSDistance gets b first and b' second (it resizes its first image to the
    second's size: b to b''s, never the output), here b 16 x 12 and b' 20 x 14."""
    from lorweb_fast.evaluation import score as S

    items = solid_runs(tmp_path / "ours", ["t/0"])
    Image.new("RGB", (20, 14), (1, 2, 3)).save(items[0].b_prime)
    lp = FakeLpips()
    S.score_run("ours", items, tmp_path / "rep", metrics=["lpips"], lpips=lp, progress=False)
    assert lp.sizes == [((16, 12), (20, 14))]


# ------------------------------------------------------------------------------------------------------ judge
# J07: parse_score reads the scores under "metrics" only (a top-level {"accuracy", "consistency"} falls through to
# the key-value reading of the whole text)
def test_a_top_level_score_object_is_read_as_json():
    """An answer whose JSON holds accuracy and consistency at the top level (without "metrics") is read from that
    object, not from "key": value pairs written later in prose."""
    from lorweb_fast.evaluation import judge as J

    parsed = J.parse_score('{"accuracy": 9, "consistency": 8}')
    assert parsed.ok and parsed.via == "json" and parsed.value == {"accuracy": 9, "consistency": 8}
    parsed = J.parse_score('{"accuracy": 9, "consistency": 8, "explanation": "e"}\nA worse edit had "accuracy": 2, '
                           '"consistency": 3.')
    assert parsed.value == {"accuracy": 9, "consistency": 8}


# J16: ask() marks a backend error as truncated when the judge's last answer was
def test_a_question_the_judge_cannot_answer_is_not_counted_as_truncated(tmp_path):
    """``truncated`` is about an answer cut at the token limit: a question without an answer (a backend error) is
    never counted as truncated, whatever the judge's previous answer was (the report counts truncated records)."""
    from lorweb_fast.evaluation import judge as J
    from lorweb_fast.evaluation.report import aggregate

    class Judge:
        name = "cut-then-missing"
        last_truncated = False

        def __call__(self, request):
            if request.id == "t/1":
                raise KeyError("no answer for t/1")
            self.last_truncated = True
            return '{"metrics": {"accuracy": 5'

    judge, cache = Judge(), J.JudgeCache(tmp_path / "judge")
    recs = [J.ask(judge, cache, J.JudgeRequest("ours", key, "score", J.SCORE_PROMPT)) for key in ("t/0", "t/1")]
    assert [r["truncated"] for r in recs] == [True, False]
    assert recs[1]["backend_error"] == "no answer for t/1"
    assert aggregate([], [], answers=recs)["overall"]["truncated_answers"] == 1


# ------------------------------------------------------------------------------------------------------ report
# R10: the Fig. 6 bars show the plain win rate instead of the order-balanced one
def test_fig6_bars_are_the_order_balanced_win_rates(monkeypatch, tmp_path):
    """Fig. 6 of the paper (Pairwise VLM): each bar is the method's order-balanced win rate in percent against that
    baseline (here 75 and 40; the plain win rates 50 and 10 would hide the judge's position bias)."""
    from matplotlib.axes import Axes

    from lorweb_fast.evaluation import report as R

    heights = []
    real_bar = Axes.bar

    def bar(self, x, height, *args, **kwargs):
        heights.append(list(height))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    pairwise = {"x": {"win_rate": 0.5, "order_balanced_win_rate": 0.75},
                "y": {"win_rate": 0.1, "order_balanced_win_rate": 0.4}}
    assert R.plot_win_rates({"ours": {"overall": {"pairwise": pairwise}}}, ["x", "y"], tmp_path / "w.png") is not None
    assert heights == [[pytest.approx(75.0), pytest.approx(40.0)]]


# ---------------------------------------------------------------------------------------------------- evalsets
# E02: the aspect tolerance test `<= ASPECT_TOLERANCE` -> `<`
def test_a_photo_exactly_at_the_aspect_tolerance_is_close(tmp_path):
    """Appendix A.2: b's aspect ratio within 0.15 of a's, the bound included: a at 20 x 80 (0.25) and photos at 0.1
    (exactly 0.15 away, also in floating point) are close photos: used without a warning or an outside-tolerance
    flag."""
    assert abs(10 / 100 - 20 / 80) == abs(8 / 80 - 20 / 80) == E.ASPECT_TOLERANCE
    root = make_released(tmp_path / "set", {"e1": (10, 100), "e2": (8, 80), "far": (40, 40)}, a_size=(20, 80))
    picked, flagged = tiny.b_picks_without_warnings(root)
    assert picked == ["e1", "e2"]
    assert not flagged


# E08: center_crop_to_aspect crops a too-wide image from the left edge; E25: a too-tall one from the top
def test_b_is_cropped_to_a_s_aspect_around_its_centre(tmp_path):
    """b is cropped to a's aspect ratio (appendix A.2) keeping its centre: a 30 x 10 picture of three 10 x 10 colour
    blocks cropped to 1:1 is its middle block; a 10 x 30 one (blocks stacked) likewise."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    wide, tall = Image.new("RGB", (30, 10)), Image.new("RGB", (10, 30))
    for k, colour in enumerate(colours):
        wide.paste(colour, (10 * k, 0, 10 * k + 10, 10))
        tall.paste(colour, (0, 10 * k, 10, 10 * k + 10))
    for name, img in (("wide", wide), ("tall", tall)):
        img.save(tmp_path / f"{name}.png")
        crop = E.ImageRef(tmp_path / f"{name}.png", aspect=1.0).load()
        assert crop.size == (10, 10) and [c for _, c in crop.getcolors()] == [colours[1]], name


# E15: file_signature leaves the file names out
def test_file_signature_tells_files_of_one_size_and_time_apart_by_name(tmp_path):
    """The cache keys' file signature holds the files' names, sizes and modification times: two files of one size
    and time, given in another order (an a and a' swapped), sign differently."""
    import os

    a, a_prime = tmp_path / "a.png", tmp_path / "a_prime.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(a)
    Image.new("RGB", (8, 8), (3, 2, 1)).save(a_prime)
    assert a.stat().st_size == a_prime.stat().st_size
    os.utime(a_prime, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert E.file_signature(a, a_prime) != E.file_signature(a_prime, a)


# ------------------------------------------------------------------------------------------------------- CLI
# C05: eval generate --resolution default "official" -> "native"
def test_cli_generation_and_scoring_defaults_are_the_official_ones():
    """eval generate without options runs the official inference.py settings: the official resolution (cells at
    a's size, ~1 MP), guidance 2.5, 28 steps (no --steps: the step count's default), the unmerged LoRWeB delta, bf16
    with the encoder in the pipeline's dtype, b picks of --pair-seed 0, 2 b per (a, a') and saved inputs capped at
    1024; eval score batches 8 triplets per CLIP call and lets a bf16 Gemma-3 judge answer in up to 1024 tokens."""
    parser = cli.build_parser()
    g = parser.parse_args(["eval", "generate", "--evalset", "e", "--weights", "w", "--out", "o"])
    assert (g.resolution, g.guidance_scale, g.steps, g.merge) == ("official", 2.5, None, "none")
    # --pair-seed / --b-per-pair not given: 0 and 2 where the layout draws b at random (resolved by run_generate)
    assert (g.dtype, g.encoder_dtype, g.pair_seed, g.b_per_pair, g.input_long_edge) == ("bf16", "auto", None, None,
                                                                                       1024)
    assert (g.batch_size, g.max_size, g.long_edge, g.seeds) == (4, None, None, [50])
    s = parser.parse_args(["eval", "score", "--runs", "r", "--out", "o"])
    assert (s.batch_size, s.judge_max_new_tokens, s.judge_dtype, s.lpips_net) == (8, 1024, "bf16", "alex")


# E14: file_signature leaves the modification time out
def test_a_b_prime_replaced_by_one_of_the_same_byte_size_is_measured_again(tmp_path):
    """A regenerated b' whose file has the same byte size (BMP files of one image size always do) is a new file to
    the metric cache (its modification time differs): CLIP Dir. is computed again, not served stale."""
    import os

    from lorweb_fast.evaluation import score as S

    d = tmp_path / "ours" / "t" / "0"
    d.mkdir(parents=True)
    for j, stem in enumerate(("a", "a_prime", "b", "b_prime")):
        Image.new("RGB", (8, 8), (40 * j, 0, 0)).save(d / f"{stem}.bmp")
    items = E.read_runs(tmp_path / "ours")
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=FakeClip(), progress=False)
    size, mtime = (d / "b_prime.bmp").stat().st_size, (d / "b_prime.bmp").stat().st_mtime_ns
    Image.new("RGB", (8, 8), (0, 0, 255)).save(d / "b_prime.bmp")
    os.utime(d / "b_prime.bmp", ns=(mtime + 10**9, mtime + 10**9))
    assert (d / "b_prime.bmp").stat().st_size == size
    clip = FakeClip()
    S.score_run("ours", items, tmp_path / "rep", metrics=["clip_dir"], clip=clip, progress=False)
    assert clip.asked == 1


# E18: the released set's task name drops the "<db>__" of a db folder other than db_not_in_trainset
def test_released_set_task_names_hold_the_db_folder(tmp_path):
    """Task = "<category>__<Prompt>" for db_not_in_trainset and "<category>__<db>__<Prompt>" for another db folder:
    one prompt under two db folders is two tasks, aggregated apart (paper: per task, then over tasks)."""
    root = make_released(tmp_path / "set", {"c1": (90, 60), "c2": (70, 50)})
    other = root / "decoded_random_inference_set/db_community_loras/animals/Add_a_hat"
    other.mkdir(parents=True)
    tiny.random_picture(random.Random(3), (30, 20)).save(other / "dog_0.png")
    tasks = sorted({t.task for t in E.read_evalset(root)})
    assert tasks == ["animals__Add_a_hat", "animals__db_community_loras__Add_a_hat"]


# E22: find_image tries the extensions in another order (IMAGE_EXTENSIONS reversed)
def test_a_png_is_read_before_other_extensions_of_one_stem(tmp_path):
    """A runs folder item holding b_prime.png (eval generate's output) and a b_prime.bmp / .jpg left by another tool:
    the .png is read (IMAGE_EXTENSIONS order: png, jpg, jpeg, webp, bmp)."""
    d = tmp_path / "runs" / "t" / "0"
    d.mkdir(parents=True)
    for stem in ("a", "a_prime", "b", "b_prime"):
        Image.new("RGB", (8, 8)).save(d / f"{stem}.png")
        Image.new("RGB", (8, 8)).save(d / f"{stem}.bmp")
        Image.new("RGB", (8, 8)).save(d / f"{stem}.jpg")
    [item] = E.read_runs(tmp_path / "runs")
    assert [p.name for p in (item.a, item.a_prime, item.b, item.b_prime)] == \
        ["a.png", "a_prime.png", "b.png", "b_prime.png"]



# E26: _seeded_rng reads the digest's first 8 bytes big-endian instead of little-endian (other picks for every seed)
def test_a_recorded_pair_seed_picks_the_same_b_as_before(tmp_path):
    """--pair-seed is recorded so that the b picks can be made again: a given seed must keep picking the same b in
    every version (a Relation252k task of 6 pairs, picks from SHA-256 of (seed, task, image); triplet ids are
    "<a>__<b>"). A change of these picks changes every published evaluation set made with that seed."""
    group = tmp_path / "rel" / "t" / "Group1"
    group.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (16, 8), (i, 0, 0)).save(group / f"{i}.png")
    (group / "labels.json").write_text(json.dumps([{"img_name": f"{i}.png", "edit_instruction": f"e{i}"}
                                                   for i in range(6)]))
    picks = {seed: [t.id for t in E.read_evalset(tmp_path / "rel", seed=seed)] for seed in (0, 1)}
    assert picks == {0: ["0__2", "1__4", "2__3", "3__0", "4__1", "5__0"],
                     1: ["0__2", "1__0", "2__3", "3__1", "4__5", "5__4"]}


def test_a_second_generate_into_a_folder_in_use_is_refused_and_changes_nothing(fake_loader, tmp_path, capsys):
    """`eval generate` holds RUNS/.lorweb-generate.lock while it runs: a second one into the same --out (started
    twice), whose records the two would race on, is refused before any model loads, naming the process that holds
    it, and writes nothing; once the holder has ended, the run goes ahead and leaves no lock file behind."""
    from lorweb_fast.testing import file_tree, hold_folder_lock

    loads, _, weights = fake_loader
    ev = solid_evalset(tmp_path / "ev", n=1)
    out = tmp_path / "runs"
    assert gen(ev, weights, out) == 0
    assert not (out / G.GENERATE_LOCK_NAME).exists()
    before, loaded = file_tree(out), len(loads)
    holder = hold_folder_lock(out, G.GENERATE_LOCK_NAME, "eval generate run")
    try:
        capsys.readouterr()
        assert gen(ev, weights, out) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another eval generate run (process {holder.pid} on " in err, err
        assert len(loads) == loaded
        assert [(p, b) for p, b in file_tree(out) if p != G.GENERATE_LOCK_NAME] == before
    finally:
        holder.kill()
        holder.wait()
    assert gen(ev, weights, out) == 0 and len(loads) == loaded + 1
    assert not (out / G.GENERATE_LOCK_NAME).exists()


def test_win_rate_plot_legend_names_every_method_also_one_starting_with_an_underscore(tmp_path, monkeypatch):
    """matplotlib leaves labels starting with "_" out of a legend: a runs folder named "_ablation" had bars in the
    win-rate plot and no legend entry. Every method now has its entry, in order."""
    from matplotlib.axes import Axes

    from lorweb_fast.evaluation import report as R

    legends = []
    real_legend = Axes.legend

    def legend(self, *args, **kwargs):
        drawn = real_legend(self, *args, **kwargs)
        legends.append([t.get_text().strip() for t in drawn.get_texts()])
        return drawn

    monkeypatch.setattr(Axes, "legend", legend)
    pairwise = {"x": {"win_rate": 0.5, "order_balanced_win_rate": 0.75}}
    report = {name: {"overall": {"pairwise": pairwise}} for name in ("_ablation", "ours", "__v2")}
    assert R.plot_win_rates(report, ["x"], tmp_path / "w.png").is_file()
    assert legends == [["_ablation", "ours", "__v2"]]
