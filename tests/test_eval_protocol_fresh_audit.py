"""Fresh audit of the evaluation protocol (lorweb_fast/evaluation/) against the paper (section 4.2, appendix A.2/A.3),
the README's "Evaluation" section and the project's own bad-input rules. Each test states the expected behaviour and
FAILS on the code as audited; none is a pin of current behaviour.

Nothing is downloaded: CLIP-like encoders, LPIPS weights and the judge are tiny local stand-ins.
"""

import json

import pytest
import torch

from lorweb_fast import cli
from lorweb_fast.evaluation import evalsets as E
from lorweb_fast.evaluation import judge as J
from lorweb_fast.evaluation import metrics as M
from lorweb_fast.evaluation import tiny


# ------------------------------------------------------------------------------------------------------ helpers
def _processor(directory):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _clip_text_model(directory):
    """A tiny CLIP *text* model (as a FLUX pipeline's text_encoder/ folder), with an image processor beside it."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=100, max_position_embeddings=16,
                                               projection_dim=8)).save_pretrained(directory)
    return _processor(directory)


def _clip_vision_without_projection(directory):
    """A tiny ``CLIPVisionModel`` checkpoint: the vision tower without ``visual_projection``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(directory)
    return _processor(directory)


def _siglip_vision(directory):
    """A tiny SigLIP vision tower (the paper's alternative analogy encoder family)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(directory)
    return _processor(directory)


# ------------------------------------------------------------------------------ 1. clip_dir with a wrong encoder
@pytest.mark.parametrize("build", [_clip_text_model, _clip_vision_without_projection],
                         ids=["clip-text-model", "clip-vision-without-projection"])
def test_clip_dir_refuses_an_encoder_whose_vision_weights_are_missing(tmp_path, build):
    """metrics.py ClipDirectional.__init__: ``clip_dir`` is cos(e(a') - e(a), e(b') - e(b)) with e the image_embeds
    of a CLIP vision model with its projection (README "Metrics"; the official query's encoder,
    inference.py ``CLIPVisionModelWithProjection.from_pretrained``). A checkpoint that lacks those weights (a CLIP
    text model, e.g. a FLUX pipeline's text_encoder/; a CLIPVisionModel without ``visual_projection``) is loaded by
    transformers with the missing weights randomly initialised: ``eval score`` then exits 0 with a CLIP Dir. column
    computed by a random network. Expected: EvalInputError naming the encoder (README: "an encoder ... that cannot
    load ... ends with a one-line error"), as ``flux.AnalogyEncoder`` refuses a text model."""
    folder = build(tmp_path / "enc")
    with pytest.raises(E.EvalInputError, match="enc"):
        M.ClipDirectional(folder)


def test_clip_dir_encoder_of_another_architecture_is_an_eval_input_error(tmp_path):
    """metrics.py ClipDirectional.__init__ catches (OSError, ValueError, KeyError, TypeError) only: a SigLIP
    checkpoint given as ``eval score --encoder`` (the paper's other encoder family) fails inside transformers with a
    RuntimeError (mismatched position embeddings), i.e. a traceback and exit 1 instead of the documented one-line
    error and exit 2. Expected: EvalInputError naming the encoder (flux.AnalogyEncoder catches RuntimeError too)."""
    folder = _siglip_vision(tmp_path / "siglip")
    with pytest.raises(E.EvalInputError, match="siglip"):
        M.ClipDirectional(folder)


# -------------------------------------------------------------- 2. eval score: unreadable image found too late
def test_eval_score_refuses_an_unreadable_runs_image_before_loading_the_judge(tmp_path, monkeypatch, capsys):
    """cli.py run_score / score.py score: README "Evaluation": bad input, among it "an input image whose header does
    not read (e.g. a Git LFS pointer)", ends with a one-line error and exit status 2 "(all before any model loads or
    file is written)"; ``eval generate`` decodes its inputs up front (generate._check_inputs_decode). ``eval score``
    only checks that the runs folder's files exist (evalsets.read_runs): a b_prime.png that is a Git LFS pointer is
    found after the judge (a 27B Gemma-3 in the paper's setup) and the LPIPS network have loaded and after cache files
    were written. Expected: exit 2 naming the file, the judge never built, nothing written under --out."""
    pytest.importorskip("lpips")
    tiny.save_random_lpips_backbone(tmp_path / "th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    ev = tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2, size=(32, 32))
    runs = tiny.make_runs_folder(tmp_path / "ours", ev)
    bad = runs / "flip" / "001" / "b_prime.png"
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    replay = tmp_path / "answers.jsonl"
    replay.write_text("".join(json.dumps({"id": f"flip/{i:03d}", "kind": "score",
                                          "response": '{"metrics":{"accuracy":5,"consistency":6}}'}) + "\n"
                              for i in range(2)))
    built = []
    real = J.make_judge
    monkeypatch.setattr(J, "make_judge", lambda *a, **k: built.append(a) or real(*a, **k))
    out = tmp_path / "report"
    rc = cli.main(["eval", "score", "--runs", str(runs), "--metrics", "lpips,vlm", "--judge", f"replay:{replay}",
                   "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err
    assert built == [], "the judge was built before the unreadable image was found"
    assert not out.exists(), f"files were written before the error: {sorted(p.name for p in out.rglob('*'))}"


# ------------------------------------------------------------------- 3. malformed --pairs and replay records
def _released(tmp_path):
    return tiny.make_released_evalset(tmp_path / "set", {"cat": (60, 40), "owl": (61, 40)})


PAIR_BASE = "decoded_random_inference_set/db_not_in_trainset/animals/Add_a_hat"


@pytest.mark.parametrize("row", [{"a_prime": 5, "b": "original/unsplash_animals/cat.jpg"},
                                 {"a_prime": f"{PAIR_BASE}/dog_0.png", "b": None},
                                 {"a_prime": f"{PAIR_BASE}/dog_0.png", "b": ["original/unsplash_animals/cat.jpg"]}],
                         ids=["int-a_prime", "null-b", "list-b"])
def test_pairs_file_entries_that_are_not_paths_are_refused_by_name(tmp_path, row):
    """evalsets.py _read_pairs_file: an entry's "a_prime" / "b" go straight into ``Path(...)``: a number, null or a
    list raises a bare TypeError (a traceback from ``eval generate --pairs``). README: bad input, "a ... pairs ...
    file", ends with a one-line error naming the problem (labels.json of Relation252k checks its field types the
    same way: "entry i needs 'img_name' and 'edit_instruction' strings"). Expected: EvalInputError naming the file
    and the entry."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(row) + "\n")
    with pytest.raises(E.EvalInputError, match="entry 0"):
        E.read_evalset(_released(tmp_path), pairs_file=pairs)


def test_pairs_file_b_that_is_a_itself_is_refused(tmp_path):
    """evalsets.py read_lorweb_evalset with a pairs file: an entry whose b is the a photo of that a' (a
    self-analogy: b' = a' solves it) is accepted. The paper (section 4, appendix A.2) picks b among *other* photos
    of the category, the random picks exclude a (``stem != a-stem``), and the Relation252k reader refuses a
    self-analogy by name (README: "never a self-analogy b = a"). Expected: EvalInputError naming the entry's a'."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in (
        {"a_prime": f"{PAIR_BASE}/dog_0.png", "b": "original/unsplash_animals/dog.jpg"},
        {"a_prime": f"{PAIR_BASE}/dog_1.png", "b": "original/unsplash_animals/cat.jpg"})))
    with pytest.raises(E.EvalInputError, match="dog_0"):
        E.read_evalset(_released(tmp_path), pairs_file=pairs)


@pytest.mark.parametrize("extra", [{"run": ["ours"]}, {"against": {"name": "lora"}}], ids=["list-run", "dict-against"])
def test_replay_records_with_a_run_or_against_that_is_not_a_name_are_refused_by_line(tmp_path, extra):
    """judge.py ReplayJudge.__init__ validates "id", "kind", "response", "order" and "truncated" of every record
    but not "run" / "against": a list or object there becomes part of a dict key and raises a bare TypeError
    (unhashable type), a traceback from ``eval score --judge replay:FILE``. README: a replay file's bad record "is
    refused naming its line". Expected: EvalInputError naming the file and line 1."""
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"id": "t/0", "kind": "score", "response": "{}", **extra}) + "\n")
    with pytest.raises(E.EvalInputError, match=r"answers\.jsonl:1"):
        J.ReplayJudge(path)
