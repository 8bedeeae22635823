"""The VLM judge of the paper (section 4.2, appendix A.3): prompts, backends, parsing and the answer cache.

Two experiments, each with the paper's prompt sent verbatim after the images:

- ``score``: images A, A', B, B' (in that order) and ``SCORE_PROMPT``; the answer's JSON
  ``{"metrics": {"accuracy": <1-10>, "consistency": <1-10>}, ...}`` gives Edit Accuracy (VLM) and Preservation (VLM).
- ``pairwise`` (2AFC): images A, A', B, B'1, B'2 and ``PAIRWISE_PROMPT``; the JSON ``{"better": <1 or 2>, ...}``.

Backends: ``Gemma3Judge`` (transformers ``Gemma3ForConditionalGeneration`` + ``AutoProcessor`` chat template, greedy
decoding) and ``ReplayJudge`` (saved answers: a JSONL of ``{"id": "<task>/<id>", "kind": "score"|"pairwise",
"response": "<raw text>"}``, optionally with ``"run"`` and ``"against"`` to tell runs folders apart; used by the tests
and to re-score saved answers). ``JudgeCache`` stores every raw answer per item and prompt.

Parsing is robust to JSON in code fences, JSON after prose and integers written as strings; when no JSON object can be
decoded (e.g. an unescaped quote inside "explanation"), the numbers are read from their ``"key": value`` pairs. A
value outside its range or an answer without one is a failure: the caller lists it, never drops it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .._files import loads_json
from .evalsets import EvalInputError, read_text
from ..validation import warn

#: The paper's prompts (appendix A.3), verbatim: the 1-10 accuracy / consistency score (images A, A', B, B').
SCORE_PROMPT = (
    'You are given 4 images: A (original image), A’ (edited version of A), B (another original image), and B’ (an '
    'output of an editing method). A, A’ and B are reference images that are given to some editing method in order to '
    'generate B’. The method tries to infer the transformation that A underwent to produce A’, and then tries (maybe '
    'unsuccessfully) to apply the exact same transformation to B - in order to generate B’. Your task is to evaluate '
    'the resulting B’: Was the same transformation applied well?\n'
    'Specifically, assess B’ under two metrics, editing accuracy, and consistency with the original image B, 1-10 '
    'integers only:\n'
    '1) editing accuracy: Evaluate how closely B’ applies the transformation seen from A to A’. Are there missing '
    'elements, are there redundant elements? Quantify the precision of the editing.\n'
    '2) consistency: Asses how well the edited image B’ maintains the context of the original image B. Does it '
    'preserve the identity, objects, and layout in B that did not require a change, based on the infered '
    'transformation from A to A’?\n'
    'Consider in your evaluations other visual factors such as the localization of the edits, existence of redundant '
    'elements, style/strength/magnitude/colors of changes.\n'
    'First, describe in detail what the transformation from A to A’. Then describe what elements of it are present or '
    'missing in B’, detailing precisely what’s wrong regarding each metric.\n'
    'Then, return a strict JSON with this scheme:\n'
    '{"metrics":{"accuracy":<1-10>,"consistency":<1-10>},\n'
    '"explanation":"the reasoning you described above"}.'
)

#: The paper's 2AFC prompt (images A, A', B, B'1, B'2).
PAIRWISE_PROMPT = (
    'You are given 5 images: A (original image), A’ (edited version of A), B (another original image), and 2 B’ images '
    '(outputs of 2 editing methods). A, A’ and B are reference images that are given to some editing method in order '
    'to generate B’. The methods try to infer the transformation that A underwent to produce A’, and then tries (maybe '
    'unsuccessfully) to apply the exact same transformation to B - in order to generate B’.\n'
    'Your task is to evaluate the resulting B’s: In which of the two methods was the same transformation applied '
    'well?\n'
    'Specifically, assess B’ under two metrics, editing accuracy, and consistency with the original image B, 1-10 '
    'integers only:\n'
    '1) editing accuracy: Evaluate how closely B’ applies the transformation seen from A to A’. Are there missing '
    'elements, are there redundant elements? Quantify the precision of the editing.\n'
    '2) consistency: Asses how well the edited image B’ maintains the context of the original image B. Does it '
    'preserve the identity, objects, and layout in B that did not require a change, based on the inferred '
    'transformation from A to A’?\n'
    'Consider in your evaluations other visual factors such as the localization of the edits, existence of redundant '
    'elements, style/strength/magnitude/colors of changes.\n'
    'First, describe in detail what the transformation from A to A’. Then describe what elements of it are present or '
    'missing in B’1 and B’2, detailing precisely what’s wrong regarding each metric.\n'
    'Then, return a strict JSON with this scheme: {"better":<1 or 2>,"explanation":"the reasoning you described above"}'
)

JUDGE_KINDS = ("score", "pairwise")
SCORE_RANGE = (1, 10)


def prompt_hash(prompt: str) -> str:
    """The first 16 hex digits of the prompt's SHA-256 (the answer cache's key for the prompt)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- parsing
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def _json_objects(text: str) -> list:
    """Every top-level JSON object decodable from ``text``: inside code fences first, then anywhere (after prose)."""
    decoder = json.JSONDecoder()
    found = []
    for chunk in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        i = chunk.find("{")
        while i != -1:
            try:
                obj, end = decoder.raw_decode(chunk, i)
            except json.JSONDecodeError:
                i = chunk.find("{", i + 1)
                continue
            if isinstance(obj, dict):
                found.append(obj)
            i = chunk.find("{", end)
    return found


def _as_int(value, lo: int, hi: int, name: str):
    """(int, None) for an integer in [lo, hi] (int, integral float or a string of one); (None, error) otherwise."""
    if isinstance(value, bool):
        return None, f"{name} is a boolean ({value!r})"
    if isinstance(value, str):
        s = value.strip()
        if not re.fullmatch(r"[+-]?\d+(\.0*)?", s):
            return None, f"{name} is not an integer ({value!r})"
        value = float(s)
    if isinstance(value, float):
        if not value.is_integer():
            return None, f"{name} is not an integer ({value!r})"
        value = int(value)
    if not isinstance(value, int):
        return None, f"{name} is not an integer ({value!r})"
    if not lo <= value <= hi:
        return None, f"{name} = {value} is outside {lo}-{hi}"
    return value, None


def _key_values(text: str, key: str) -> list:
    """Values written as ``"key": value`` (quoted or not) anywhere in ``text``."""
    return re.findall(rf'"{key}"\s*:\s*"?\s*([+-]?\d+(?:\.\d+)?)\s*"?', text)


@dataclass
class Parsed:
    """A parsed judge answer: ``value`` (dict of scores, or 1/2) or ``error``."""

    value: object = None
    error: Optional[str] = None
    via: str = "json"

    @property
    def ok(self) -> bool:
        """True when the answer parsed (no ``error``)."""
        return self.error is None


def parse_score(text: Optional[str]) -> Parsed:
    """``{"accuracy": int, "consistency": int}`` from a score answer (both 1-10): the last JSON object holding both
    (under "metrics" or at its top level), else the last ``"key": value`` pairs (``via="key-value"``)."""
    if not text or not text.strip():
        return Parsed(error="empty answer")
    lo, hi = SCORE_RANGE
    for obj in reversed(_json_objects(text)):
        metrics = obj.get("metrics", obj)
        if isinstance(metrics, dict) and {"accuracy", "consistency"} <= set(metrics):
            values, errors = {}, []
            for key in ("accuracy", "consistency"):
                v, err = _as_int(metrics[key], lo, hi, key)
                values[key] = v
                if err:
                    errors.append(err)
            return Parsed(values) if not errors else Parsed(error="; ".join(errors))
    acc, cons = _key_values(text, "accuracy"), _key_values(text, "consistency")
    if acc and cons:  # the JSON itself did not decode: read the last written values
        values, errors = {}, []
        for key, found in (("accuracy", acc), ("consistency", cons)):
            v, err = _as_int(found[-1], lo, hi, key)
            values[key] = v
            if err:
                errors.append(err)
        return Parsed(values, via="key-value") if not errors else Parsed(error="; ".join(errors), via="key-value")
    return Parsed(error="no JSON with metrics.accuracy and metrics.consistency in the answer")


def parse_pairwise(text: Optional[str]) -> Parsed:
    """1 or 2 (which of B'1, B'2 is better) from a pairwise answer: the last JSON object with "better", else the
    last ``"better": value`` pair (``via="key-value"``)."""
    if not text or not text.strip():
        return Parsed(error="empty answer")
    for obj in reversed(_json_objects(text)):
        if "better" in obj:
            v, err = _as_int(obj["better"], 1, 2, "better")
            return Parsed(v) if err is None else Parsed(error=err)
    found = _key_values(text, "better")
    if found:
        v, err = _as_int(found[-1], 1, 2, "better")
        return Parsed(v, via="key-value") if err is None else Parsed(error=err, via="key-value")
    return Parsed(error='no JSON with "better" in the answer')


PARSERS: dict = {"score": parse_score, "pairwise": parse_pairwise}


# --------------------------------------------------------------------------------------------------- backends
@dataclass
class JudgeRequest:
    """One question to the judge: ``images`` (a callable returning the PIL images, in prompt order), the prompt and
    who it is about: ``run`` (runs folder name), ``id`` ("<task>/<id>"), ``kind`` ("score" | "pairwise"), for a
    pairwise question ``against`` (the baseline's name) and ``order`` (["run", "against"] when this run's b' is B'1,
    else ["against", "run"])."""

    run: str
    id: str
    kind: str
    prompt: str
    images: Callable[[], list] = field(repr=False, default=list)  # loaded lazily (cached answers skip it)
    against: Optional[str] = None
    order: Optional[list] = None
    files_sig: Optional[str] = None  # evalsets.file_signature of the image files: a replaced image is asked again


class Gemma3Judge:
    """Gemma-3 through transformers: ``Gemma3ForConditionalGeneration`` + ``AutoProcessor`` (its chat template),
    the images then the prompt in one user turn, greedy decoding of up to ``max_new_tokens`` tokens.

    ``name`` (``gemma3:<model> max_new_tokens=<n> dtype=<dtype>``) holds the generation settings: the answer cache
    matches on it, so a rerun with another token limit or dtype asks again instead of reusing (e.g. truncated)
    answers. An answer cut at ``max_new_tokens`` (no end of turn) is recorded in ``truncated`` (request ids; ``score``
    starts it afresh for each scoring) and the first one warns, naming the limit: such an answer usually lacks its
    score and is listed as a failure.
    ``last_truncated`` says whether the latest answer was cut (``ask`` stores it in the answer's record, and the
    report counts such answers)."""

    def __init__(self, model: Union[str, Path], *, device=None, dtype: torch.dtype = torch.bfloat16,
                 max_new_tokens: int = 1024):
        from transformers import AutoProcessor, Gemma3ForConditionalGeneration

        check_max_new_tokens(max_new_tokens)  # before the model loads
        self.name = f"gemma3:{model} max_new_tokens={max_new_tokens} dtype={str(dtype).removeprefix('torch.')}"
        from .metrics import weights_signature

        #: the answer cache's key: a local folder replaced at the same path (or a relative path typed elsewhere)
        #: is another judge, asked again, as the CLIP and LPIPS caches key their weights
        self.cache_id = self.name + (f"@{weights_signature(model)}" if Path(model).is_dir() else "")
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = Gemma3ForConditionalGeneration.from_pretrained(model, dtype=dtype).eval()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvalInputError(f"cannot load the Gemma-3 judge {str(model)!r}: {exc}") from exc
        if device is not None:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens
        self.truncated: list = []
        self.last_truncated = False

    def messages(self, images: Sequence, prompt: str) -> list:
        """The chat: one user turn holding the images, then the prompt."""
        return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                             {"type": "text", "text": prompt}]}]

    @torch.no_grad()
    def __call__(self, request: JudgeRequest) -> str:
        """The decoded answer (special tokens dropped) to ``request``; sets ``last_truncated``."""
        inputs = self.processor.apply_chat_template(self.messages(request.images(), request.prompt),
                                                    add_generation_prompt=True, tokenize=True, return_dict=True,
                                                    return_tensors="pt")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer = out[0, inputs["input_ids"].shape[1]:]
        self.last_truncated = self._was_cut(answer)
        if self.last_truncated:
            if not self.truncated:
                warn(f"the judge's answer to {request.id} ({request.kind}) stopped at max_new_tokens="
                     f"{self.max_new_tokens} before its end; a cut answer usually has no score and is listed "
                     "as a failure: raise max_new_tokens (--judge-max-new-tokens); later cut answers are not "
                     "warned about (see the judge's .truncated)")
            self.truncated.append(request.id)
        return self.processor.decode(answer, skip_special_tokens=True)

    def _was_cut(self, answer: torch.Tensor) -> bool:
        """``answer`` (new token ids) filled the token limit without ending on an end-of-turn token."""
        if answer.numel() < self.max_new_tokens:
            return False
        eos = self.model.generation_config.eos_token_id
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        return int(answer[-1]) not in eos


def check_max_new_tokens(max_new_tokens) -> None:
    """EvalInputError unless ``max_new_tokens`` is an integer >= 1 (not a bool)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EvalInputError(f"the judge's max_new_tokens (--judge-max-new-tokens) must be an integer >= 1, "
                             f"got {max_new_tokens!r}")


class ReplayJudge:
    """Answers read from a JSONL file of ``{"id", "kind", "response"}`` (+ optional ``"run"``, ``"against"``: a record
    without them answers for every runs folder / baseline; + optional ``"order"``, the B'1/B'2 order a pairwise answer
    was given for, as ``judge_answers.jsonl`` records it; + optional ``"truncated": true``, an answer cut at the
    judge's token limit, replayed as ``last_truncated``). A question without an answer raises ``KeyError``; a
    pairwise answer recorded for the other order raises ``EvalInputError`` (its "B'1" would mean the other image)."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if not path.is_file():
            raise EvalInputError(f"replay file not found: {path}")
        text = read_text(path, "replay file")
        # the file is the replay judge's "model": its content hash is in the name the answer cache compares, so a
        # rewritten file at the same path is asked again instead of its old answers being reused
        self.name = f"replay:{path}@{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        self.records: dict = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = loads_json(line)
            except json.JSONDecodeError as exc:
                raise EvalInputError(f"{path}:{n} is not JSON ({exc})") from exc
            if not isinstance(rec, dict) or not {"id", "kind", "response"} <= set(rec):
                raise EvalInputError(f"{path}:{n} needs 'id', 'kind' and 'response'")
            if rec["kind"] not in JUDGE_KINDS:
                raise EvalInputError(f"{path}:{n}: kind must be one of {JUDGE_KINDS}, got {rec['kind']!r}")
            if not isinstance(rec["response"], str):
                raise EvalInputError(f"{path}:{n}: response must be a string (the judge's answer text), got "
                                     f"{type(rec['response']).__name__} {rec['response']!r}"[:300])
            if not isinstance(rec["id"], str):
                raise EvalInputError(f"{path}:{n}: id must be a string such as \"<task>/<id>\", got {rec['id']!r}")
            order = rec.get("order")
            if order is not None and (not isinstance(order, list) or not all(isinstance(o, str) for o in order)
                                      or sorted(order) != ["against", "run"]):
                raise EvalInputError(f'{path}:{n}: order must be ["run", "against"] or ["against", "run"], got '
                                     f"{order!r}")
            truncated = rec.get("truncated", False)
            if not isinstance(truncated, bool):
                raise EvalInputError(f"{path}:{n}: truncated must be true or false, got {truncated!r}")
            for key_name in ("run", "against"):
                if rec.get(key_name) is not None and not isinstance(rec[key_name], str):
                    raise EvalInputError(f"{path}:{n}: {key_name} must be a run name (a string), got "
                                         f"{rec[key_name]!r}"[:300])
            key = (rec.get("run"), rec["id"], rec["kind"], rec.get("against"))
            self.records[key] = (rec["response"], order, truncated)
        self.path = path
        self.last_truncated = False

    def __call__(self, request: JudgeRequest) -> str:
        """The recorded answer: the record for this run before a run-less one, for this baseline before a
        baseline-less one; sets ``last_truncated``."""
        other_order = None
        for run in (request.run, None):  # the most specific record given for this order
            for against in ((request.against, None) if request.against is not None else (None,)):
                key = (run, request.id, request.kind, against)
                if key in self.records:
                    response, order, truncated = self.records[key]
                    if order is None or request.order is None or list(order) == list(request.order):
                        self.last_truncated = truncated
                        return response
                    other_order = order
        if other_order is not None:
            raise EvalInputError(
                f"{self.path}: the pairwise answer for {request.id} (run {request.run}, against {request.against}) "
                f"was given with B'1 = {other_order[0]}, but this scoring shows B'1 = {request.order[0]}: score with "
                "the --pairwise-seed, runs, baselines and items of the scoring that wrote it")
        raise KeyError(f"no replayed {request.kind} answer for {request.id}"
                       + (f" (run {request.run}, against {request.against})" if request.against else ""))


def make_judge(spec: str, *, device=None, dtype: torch.dtype = torch.bfloat16, max_new_tokens: int = 1024):
    """``none`` -> None, ``gemma3:ID_OR_DIR`` -> Gemma3Judge, ``replay:FILE`` -> ReplayJudge."""
    if spec in (None, "", "none"):
        return None
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise EvalInputError(f"--judge must be none, gemma3:ID_OR_DIR or replay:FILE, got {spec!r}")
    if kind == "gemma3":
        from ..validation import model_source_problem

        check_max_new_tokens(max_new_tokens)  # the options first, as Gemma3Judge checks them
        problem = model_source_problem(target, "config.json")  # a missing folder: said so, not a Hub-id error
        if problem is not None:
            raise EvalInputError(f"--judge gemma3:{target} {problem}")
        return Gemma3Judge(target, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    if kind == "replay":
        return ReplayJudge(target)
    raise EvalInputError(f"unknown judge backend {kind!r} in {spec!r}: use gemma3:ID_OR_DIR or replay:FILE")


# ------------------------------------------------------------------------------------------------------ cache
def _safe(name: str) -> str:
    """``name`` as a file-name part: characters other than letters, digits and ``._=+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


class JudgeCache:
    """Raw answers on disk, one JSON file per item and question: ``root/<run>/<kind>[__vs__<against>]/<task>/<id>.json``
    with the judge, the prompt's hash, the image files' signature and (pairwise) the image order; reused only when
    all of them match, and the item, run and baseline names too (names that differ only in characters the file name
    cannot hold share a file)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def path(self, request: JudgeRequest) -> Path:
        """The JSON file of ``request``'s answer (see the class docstring)."""
        kind = request.kind if request.against is None else f"{request.kind}__vs__{_safe(request.against)}"
        task, _, item = request.id.partition("/")
        return self.root / _safe(request.run) / kind / _safe(task) / f"{_safe(item)}.json"

    def get(self, request: JudgeRequest, judge_name: str, judge_id: Optional[str] = None) -> Optional[dict]:
        """The cached record (``_record``) of ``request`` from the judge named ``judge_name`` (and keyed
        ``judge_id``, the judge's ``cache_id``: its name and a local model folder's file signature; default the
        name); None when absent, unreadable or recorded for another judge, prompt, image files, order or name."""
        path = self.path(request)
        if not path.is_file():
            return None
        try:
            rec = loads_json(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn write from a killed run: ask again
        if not isinstance(rec, dict) or not isinstance(rec.get("response"), str):
            return None  # not an answer record (e.g. written by another version): ask again
        if rec.get("judge") != judge_name or rec.get("judge_id", rec.get("judge")) != (judge_id or judge_name) \
                or rec.get("prompt_sha256") != prompt_hash(request.prompt) \
                or rec.get("order") != request.order or rec.get("files_sig") != request.files_sig:
            return None
        if (rec.get("id"), rec.get("kind"), rec.get("run"), rec.get("against")) != \
                (request.id, request.kind, request.run, request.against):
            return None  # another name that _safe maps to the same file ("lora v1" and "lora_v1")
        return rec

    def put(self, request: JudgeRequest, judge_name: str, response: Optional[str], error: Optional[str], *,
            truncated: bool = False, judge_id: Optional[str] = None) -> dict:
        """Write the record (``_record``) of an answer atomically; returns it."""
        from .generate import atomic_write_text

        from .._files import remove_temporaries

        rec = _record(request, judge_name, response, error, truncated, judge_id)
        path = self.path(request)
        remove_temporaries(path.parent, [path.name])  # a killed scoring's, left while it wrote this answer
        atomic_write_text(path, json.dumps(rec, indent=1))
        return rec


def _record(request: JudgeRequest, judge_name: str, response: Optional[str], error: Optional[str],
            truncated: bool, judge_id: Optional[str] = None) -> dict:
    """An answer's record: the question, the judge's name and cache key (``judge_id``, default the name), the
    prompt's hash, the image files' signature, the answer or the backend's error, and whether the answer was cut at
    the judge's token limit."""
    return {"id": request.id, "kind": request.kind, "run": request.run, "against": request.against,
            "order": request.order, "judge": judge_name, "judge_id": judge_id or judge_name,
            "prompt_sha256": prompt_hash(request.prompt),
            "files_sig": request.files_sig, "response": response, "backend_error": error, "truncated": truncated}


def ask(judge, cache: Optional[JudgeCache], request: JudgeRequest) -> dict:
    """The cached record for ``request`` or a fresh answer (cached). A backend that cannot answer (a replay file
    without the item) gives a record with ``response`` None and ``backend_error``; it is not cached. ``truncated``:
    the judge's ``last_truncated`` after the call (False for judges without it, and in records cached before it)."""
    judge_id = getattr(judge, "cache_id", judge.name)
    if cache is not None:
        rec = cache.get(request, judge.name, judge_id)
        if rec is not None and rec.get("backend_error") is None:
            return rec
    try:
        response, error = judge(request), None
    except KeyError as exc:
        response, error = None, str(exc.args[0] if exc.args else exc)
    truncated = error is None and bool(getattr(judge, "last_truncated", False))
    if cache is not None and error is None:
        return cache.put(request, judge.name, response, None, truncated=truncated, judge_id=judge_id)
    return _record(request, judge.name, response, error, truncated, judge_id)
