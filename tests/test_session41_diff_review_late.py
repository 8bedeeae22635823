"""Review of the session's late commits (2825593..HEAD: 2c6f8ac, e8e998b, e2d8544, 43305e7).

Each test without "PIN" in its docstring FAILS on the code as reviewed and states the behaviour it expects; report:
/tmp/rev/diff_late.md. CPU only; the pipeline loader is replaced by a recorder (nothing is downloaded or generated).
"""

import json

import pytest
import torch
from PIL import Image

from lorweb_fast import demo, flux
from lorweb_fast.evaluation import tiny
from lorweb_fast.testing import build_tiny_lorweb_assets, run_cli_in_process

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_lorweb_assets(tmp_path_factory.mktemp("diff_late"))


class EchoPipe:
    """Stands in for a loaded LoRWeBKontextPipeline: returns b-sized b' images."""

    def __init__(self):
        self.pipe = type("Stock", (), {"_execution_device": torch.device("cpu")})()

    def __call__(self, a, a_prime, b, prompt, **kwargs):
        return [Image.new("RGB", im.size, (7, 7, 7)) for im in b]


@pytest.fixture
def loader(monkeypatch):
    loads = []

    def from_pretrained(*args, **kwargs):
        loads.append((args, kwargs))
        return EchoPipe()

    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return loads


def generate_argv(assets, evalset, out, *extra):
    return ["eval", "generate", "--evalset", str(evalset), "--weights", str(assets / "lorweb.safetensors"),
            "--model", str(assets / "pipe"), "--out", str(out), "--steps", "2", "--dtype", "fp32", "--device", "cpu",
            "--resolution", "native", "--pipe-arg", f"max_sequence_length={demo.DEMO_MAX_SEQUENCE_LENGTH}", "--quiet",
            *map(str, extra)]


@pytest.mark.parametrize("layout, key, old_value, flag", [("folder", "pair_seed", 7, "--pair-seed"),
                                                         ("folder", "b_per_pair", 3, "--b-per-pair"),
                                                         ("relation252k", "b_per_pair", 3, "--b-per-pair")])
def test_a_run_started_with_an_unused_b_choice_option_can_still_be_resumed(assets, tmp_path, loader, capsys, layout,
                                                                          key, old_value, flag):
    """evaluation/generate.py ``run_generate`` / ``check_run_settings`` (43305e7). Before 43305e7, ``--pair-seed`` and
    ``--b-per-pair`` were accepted with every layout (ignored where every b is fixed) and run.json recorded their
    values verbatim (``"pair_seed": args.pair_seed``), e.g. ``pair_seed: 7`` for a folder-layout run started with
    ``--pair-seed 7``. 43305e7 refuses the flag where it picks nothing and records the default (0 / 2) instead, and
    RESUME_KEYS still compares the two. Such a killed run can then be resumed by no command: without the flag,
    "holds a run with other settings (pair_seed: 7 -> 0)"; with it, "--pair-seed applies where b images are drawn
    at random". Expected (README "Runs folders": a killed run resumes where it stopped): where the option picks
    nothing, its recorded value does not block the resume (not compared, or the flag repeating the recorded value
    accepted)."""
    if layout == "folder":
        evalset = tiny.make_folder_evalset(tmp_path / "evalset", tasks=("flip",), per_task=2)
    else:
        evalset = tiny.make_relation252k(tmp_path / "evalset", tasks=("1-A",))
    out = tmp_path / "runs"
    rc, stdout, err = run_cli_in_process(capsys, generate_argv(assets, evalset, out))
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    run[key] = old_value  # what the code before 43305e7 recorded for a run started with `flag old_value`
    (out / "run.json").write_text(json.dumps(run, indent=2))
    finished = sorted(out.glob("*/*/b_prime.png"))
    finished[0].unlink()  # a killed run

    rc_plain, _, err_plain = run_cli_in_process(capsys, generate_argv(assets, evalset, out))
    rc_flag, _, err_flag = (rc_plain, "", "") if rc_plain == 0 else \
        run_cli_in_process(capsys, generate_argv(assets, evalset, out, flag, old_value))
    assert 0 in (rc_plain, rc_flag), (f"no command resumes the run: without {flag}: {err_plain.strip()!r}; with "
                                      f"{flag} {old_value}: {err_flag.strip()!r}")
    assert finished[0].is_file()


def test_a_default_rule_reachable_only_above_MAX_FUSED_R_is_refused_for_the_right_reason():
    """kernels/mixed_lora.py:validate_table (e8e998b) now refuses a default rule whose R range starts above
    MAX_FUSED_R ("R above MAX_FUSED_R never reaches a table (the cuBLAS route)"), but its message is the shadowing
    one with the rule's own max_R: for a bf16 max_R = 512 rule after the 256 one it reads "earlier rules already
    cover its dtypes ['bfloat16', 'float16'] up to R = 512", which is false (they cover up to 256; R in (256, 512]
    takes the cuBLAS route). Expected: the message says why the rule is dead (names MAX_FUSED_R / 256 or the cuBLAS
    route) instead of claiming coverage up to 512."""
    import copy

    pytest.importorskip("triton")
    from lorweb_fast.kernels import mixed_lora as K

    table = copy.deepcopy(json.loads(K.config_path("sm90").read_text()))
    rule = copy.deepcopy(next(r for r in table["defaults"] if "bfloat16" in r["dtypes"]
                              and r["max_R"] == K.MAX_FUSED_R))
    rule["max_R"] = 2 * K.MAX_FUSED_R
    table["defaults"].append(rule)
    with pytest.raises(K.ConfigError) as info:
        K.validate_table(table, "dead_rule.json")
    message = str(info.value)
    assert f"up to R = {2 * K.MAX_FUSED_R}" not in message and (
        "MAX_FUSED_R" in message or "cuBLAS" in message or f"R = {K.MAX_FUSED_R}" in message), message


def test_b_per_pair_refusal_with_relation252k_does_not_claim_every_b_is_fixed(assets, tmp_path, loader, capsys):
    """evaluation/generate.py ``run_generate`` (43305e7): ``--b-per-pair`` with Relation252k is refused (right: its
    reader draws one b per pair), but the message ends "the relation252k layout fixes every b", which is false --
    Relation252k draws each b at random (``--pair-seed`` applies there, as the same message's first half says).
    Expected: the refusal names what is true (Relation252k draws one b per (a, a'); --b-per-pair is the released
    set's), not that the layout fixes every b."""
    evalset = tiny.make_relation252k(tmp_path / "evalset", tasks=("1-A",))
    rc, _, err = run_cli_in_process(capsys, generate_argv(assets, evalset, tmp_path / "runs", "--b-per-pair", "3"))
    assert rc == 2 and "--b-per-pair" in err and loader == []
    assert "relation252k layout fixes every b" not in err, err.strip()
