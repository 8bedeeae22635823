"""Review audit of ``lorweb_fast.evaluation`` against the paper's protocol (section 4.2, appendix A.3): one test per
confirmed defect, each failing on the code it was written against."""

import shutil

import pytest
from PIL import Image

from lorweb_fast.evaluation import judge as J
from lorweb_fast.evaluation import tiny

pytest.importorskip("transformers")


@pytest.mark.filterwarnings("ignore")  # the random model's answers are cut at the token limit
def test_a_gemma3_judge_replaced_at_the_same_path_is_asked_again(tmp_path):
    """Appendix A.3 reports Preservation / Edit Accuracy (VLM) and the pairwise win rates of *one* judge (Gemma-3).
    The answer cache (``REPORT/judge/``) is keyed on ``Gemma3Judge.name``, which holds only the model string as typed
    (``gemma3:<path> max_new_tokens=N dtype=D``). Now: when the local model folder is replaced at the same path (or a
    relative ``gemma3:judge`` names another folder in another directory), a rerun serves the old model's answers for
    every cached item and asks the new model only about new or changed items, so one report mixes two judges. The
    CLIP and LPIPS caches key a local folder / weights file on its files' signature for exactly this case, and the
    README promises the judge is asked again "when its model ... changed". Should: a judge whose local model files
    changed misses the cache and is asked again."""
    model = tmp_path / "judge"
    tiny.build_tiny_gemma3(model, seed=0)
    cache = J.JudgeCache(tmp_path / "cache")
    req = J.JudgeRequest("ours", "t/0", "score", J.SCORE_PROMPT, files_sig="same-images",
                         images=lambda: [Image.new("RGB", (24, 24), (50 * i, 0, 0)) for i in range(4)])
    first = J.make_judge(f"gemma3:{model}", device="cpu", max_new_tokens=2)
    J.ask(first, cache, req)

    shutil.rmtree(model)
    tiny.build_tiny_gemma3(model, seed=1)  # another model at the same path
    second = J.make_judge(f"gemma3:{model}", device="cpu", max_new_tokens=2)
    calls = []
    generate = second.model.generate
    second.model.generate = lambda **inputs: calls.append(1) or generate(**inputs)
    fresh = second(req)
    calls.clear()
    rec = J.ask(second, cache, req)
    assert calls == [1], "the replaced judge was not asked: the old model's cached answer was reused"
    assert rec["response"] == fresh
