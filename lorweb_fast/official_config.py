"""The official LoRWeB configuration: query modes, ``config.yaml`` read/write and checkpoint discovery.

The official code (NVlabs/LoRWeB, built on ai-toolkit) keeps the adapter's configuration in the training run's
``config.yaml`` (``config.process[0].network``), which its ``inference.py`` requires next to the weights. This module
maps those fields onto lorweb_fast's names, merges them with an explicit argument and our safetensors metadata, and
writes a ``config.yaml`` that the official ``inference.py`` reads unchanged.

Field mapping (official -> lorweb_fast)::

    network.linear                         rank
    network.linear_alpha                   (ignored, as the official code does: scale 1, see read_config_yaml)
    network_kwargs.loras_num               num_loras
    network_kwargs.lora_keys_dim           key_dim
    network_kwargs.lora_heads              heads
    network_kwargs.lora_softmax            activation (true: "softmax", false: "tanh")
    network_kwargs.mixing_coeffs_type      reduce ("mean" | "sum")
    network_kwargs.query_mode              query_mode
    network_kwargs.pooling_type            pooling_type ("avg" | "max")
    network_kwargs.query_projection_type   query_projection_type ("linear" | "none")
    network_kwargs.external_query_model    encoder
"""

from __future__ import annotations

import json
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from ._files import atomic_write, loads_json
from .validation import warn

#: Every official query mode (extensions_built_in/flux_kontext.py ``get_external_query``).
QUERY_MODES = ("cat-aa'b", "aa'bb'", "caa'bb'", "caa'b", "caa'", "ca'-ca", "ca'-ca+cb", "paa'b", "paa'b3",
               "cat-paa'b", "cat-paa'b3")
#: Modes made of CLIP patch tokens (pooled with ``pooling_type``; "3": hidden states -16, -8, -1).
PATCH_QUERY_MODES = ("paa'b", "paa'b3", "cat-paa'b", "cat-paa'b3")
POOLING_TYPES = ("avg", "max")
QUERY_PROJECTION_TYPES = ("linear", "none")
#: "grid": the official query, computed from crops of the control grid; "images": a, a', b encoded from the
#: original files (lorweb_fast's first behaviour, not official).
QUERY_SOURCES = ("grid", "images")
#: The dtype names every option that takes one uses (--dtype, --save-dtype, --encoder-dtype, ...).
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SAVE_DTYPES = DTYPE_NAMES
#: Analogy encoders the official inference.py can load by name.
OFFICIAL_ENCODERS = ("openai/clip-vit-large-patch14", "google/siglip2-base-patch16-224")
#: The encoder family of each official encoder id (inference.py ``main`` picks the model class by this id). The
#: SigLIP2 FixRes checkpoints (google/siglip2-base-patch16-224 included) are stored in the SigLIP (v1) format, so
#: SigLIP and SigLIP2 are one family here: what a mismatch check can tell apart is CLIP from SigLIP.
OFFICIAL_ENCODER_FAMILIES = {"openai/clip-vit-large-patch14": "clip", "google/siglip2-base-patch16-224": "siglip"}

#: The released model's settings (LoRWeB_default_PROMPTS.yaml + the README's run.py command line).
OFFICIAL_DEFAULTS = {"num_loras": 32, "rank": 4, "lora_alpha": 4.0, "key_dim": 128, "heads": 1,
                     "activation": "softmax", "reduce": "mean", "query_mode": "cat-aa'b", "pooling_type": "avg",
                     "query_projection_type": "linear", "encoder": "openai/clip-vit-large-patch14"}
SETTINGS = tuple(OFFICIAL_DEFAULTS)
CONFIG_NAME = "config.yaml"
#: ai-toolkit's software record in the safetensors metadata (toolkit/metadata.py ``software_meta``).
AITK_SOFTWARE = {"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.3.4"}


class LoRWeBConfigError(ValueError):
    """A config.yaml is unreadable or incomplete, or the configuration sources disagree."""


def check_query_settings(query_mode: str, pooling_type: str = "avg", query_projection_type: str = "linear") -> None:
    """Raise a ValueError naming the bad value when a query setting is not an official one."""
    for name, value, allowed in (("query_mode", query_mode, QUERY_MODES), ("pooling_type", pooling_type,
                                 POOLING_TYPES), ("query_projection_type", query_projection_type,
                                 QUERY_PROJECTION_TYPES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def encoder_family(name) -> Optional[str]:
    """"clip" or "siglip" (SigLIP and SigLIP2) for an analogy encoder named by an official id, a local folder with a
    config.json, or a hub id that names its family ("...clip...", "...siglip..."); None when it cannot be told
    without loading anything."""
    text = str(name)
    if text in OFFICIAL_ENCODER_FAMILIES:
        return OFFICIAL_ENCODER_FAMILIES[text]
    path = Path(text)
    if (path / "config.json").is_file():
        try:
            text = str(loads_json((path / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
        except (OSError, ValueError, AttributeError):
            return None
    elif path.exists():
        return None
    else:  # a hub id or a path not on this machine: its last part names the model ("owner/clip-vit-...")
        text = path.name
    low = text.lower()
    return next((family for family in ("siglip", "clip") if family in low), None)


def encoder_family_mismatch(recorded, kind: str) -> Optional[str]:
    """The family of the ``recorded`` encoder (a checkpoint's ``external_query_model``) when it is known and is not
    the family of an encoder of ``kind`` ("clip", "siglip2", "siglip"); else None."""
    family = encoder_family(recorded)
    return family if family is not None and family != ("siglip" if kind.startswith("siglip") else kind) else None


def recorded_encoder_mismatch(recorded: Mapping[str, Any], kind: str) -> Optional[str]:
    """``"the analogy encoder '<name>' (<family>, says <source>)"`` when a checkpoint's resolved settings
    (``resolve_settings``) name an encoder, not just the official default, of another family than an encoder of
    ``kind`` (``encoder_family_mismatch``); else None."""
    if recorded["sources"]["encoder"] == "official default":
        return None
    family = encoder_family_mismatch(recorded["encoder"], kind)
    if family is None:
        return None
    return f"the analogy encoder {recorded['encoder']!r} ({family}, says {recorded['sources']['encoder']})"


# ------------------------------------------------------------------------------------------------- reading
def _bool(value, where: str) -> bool:
    """A YAML boolean (or the string "true" in any case); LoRWeBConfigError naming ``where`` otherwise.

    A quoted "false" is refused: the official code tests these flags by truthiness (toolkit/models/AttLoRA.py,
    extensions_built_in/flux_kontext.py ``AttLoraLinearAdapter.forward``: ``if lora_softmax:``), so it reads any
    non-empty string as true, while whoever wrote "false" meant false; lorweb_fast does not guess between the two."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() == "true":
        return True
    if isinstance(value, str) and value.lower() == "false":
        raise LoRWeBConfigError(f"{where} is the quoted string {value!r}: the official code reads any non-empty "
                                "string as true, so this config means the opposite of what it says; write an "
                                "unquoted YAML boolean (true or false)")
    raise LoRWeBConfigError(f"{where} must be true or false, got {value!r}")


def read_config_yaml(path: Union[str, os.PathLike], *, recorded_scale: Optional[float] = None) -> dict:
    """The LoRWeB settings (lorweb_fast names, see the module docstring) of an official ``config.yaml``.

    Reads ``config.process[0].network`` as the official inference.py does; fields that are absent are left out.
    A missing file raises FileNotFoundError; invalid YAML, a file without that structure, a numeric field that is
    not a number, a ``lora_softmax`` that is not a boolean (``_bool``) or a value that is not an official one
    (``_validate``) raise LoRWeBConfigError naming the file; a ``pooling_type`` that the query mode does not use
    (not a patch mode) is left out whatever it says, as the official code ignores it.

    ``network.linear_alpha`` gives no ``lora_alpha``: the official FLUX network ignores it (toolkit/lora_special.py
    ``LoRASpecialNetwork.__init__`` sets ``peft_format`` for transformers and then alpha = rank; inference loads
    through ``get_peft_kwargs`` with no stored alpha, so lora_alpha = r), so the official mixture scale is 1 whatever
    the config says. A ``linear_alpha`` different from ``linear`` is reported with a warning; pass
    ``settings={"lora_alpha": ...}`` to ``load_lorweb_weights`` to apply another scale on purpose.
    ``recorded_scale``: the alpha / rank a lorweb_fast checkpoint's metadata records; a ``linear_alpha`` that agrees
    with it (the config.yaml written beside that checkpoint) is not warned about.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRWeB config not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # as write_config_yaml writes it
        network = doc["config"]["process"][0]["network"]
        kwargs = network.get("network_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"network_kwargs must be a mapping, got {type(kwargs).__name__}")
    except Exception as exc:  # yaml errors, missing keys, wrong types
        raise LoRWeBConfigError(f"{path} is not an official LoRWeB config.yaml (expected config.process[0].network"
                                f"; {type(exc).__name__}: {exc})") from exc
    out: dict[str, Any] = {}
    sizes = {("rank", "linear"): network.get("linear"),
             **{(ours, theirs): kwargs.get(theirs) for ours, theirs in (("num_loras", "loras_num"),
                                                                        ("key_dim", "lora_keys_dim"),
                                                                        ("heads", "lora_heads"))}}
    for (ours, theirs), value in sizes.items():  # before int(): 2.5 heads, true or "2" are not truncated into a size
        if value is not None and not _positive_integer(value):
            raise LoRWeBConfigError(f"{path}: {ours} must be a positive integer, got {value!r} (network "
                                    f"{theirs})")
    try:
        if network.get("linear") is not None:
            out["rank"] = int(network["linear"])
        alpha = network.get("linear_alpha")
        if alpha is not None and "rank" in out and float(alpha) != out["rank"] \
                and (recorded_scale is None or float(alpha) / out["rank"] != recorded_scale):
            warn(f"{path}: network.linear_alpha={alpha!r} is not read: the official LoRWeB network uses "
                 f"alpha = rank = {out['rank']} (scale 1) whatever linear_alpha says (peft format); "
                 "lorweb_fast takes the scale from settings={'lora_alpha': ...} or its own checkpoint "
                 "metadata, else 1")
        for ours, theirs in (("num_loras", "loras_num"), ("key_dim", "lora_keys_dim"), ("heads", "lora_heads")):
            if kwargs.get(theirs) is not None:
                out[ours] = int(kwargs[theirs])
    except (TypeError, ValueError) as exc:
        raise LoRWeBConfigError(f"{path}: a numeric network field is not a number ({exc})") from exc
    if kwargs.get("lora_softmax") is not None:
        out["activation"] = "softmax" if _bool(kwargs["lora_softmax"], f"{path}: lora_softmax") else "tanh"
    if kwargs.get("external_query") is not None and not _bool(kwargs["external_query"], f"{path}: external_query"):
        # extensions_built_in/flux_kontext.py AttLoraLinearAdapter: without an external query each layer pools its
        # own input tokens (query_dim = in_features); the official inference.py sets external_query = True
        raise LoRWeBConfigError(f"{path}: network_kwargs.external_query is false: its layers take their query from "
                                "their own hidden states (pooled input tokens), a variant of the official toolkit "
                                "that lorweb_fast does not implement (nor does the official inference.py, which "
                                "sets external_query = True); only external (CLIP / SigLIP2) analogy queries are "
                                "supported")
    for ours, theirs in (("reduce", "mixing_coeffs_type"), ("query_mode", "query_mode"),
                         ("pooling_type", "pooling_type"), ("query_projection_type", "query_projection_type"),
                         ("encoder", "external_query_model")):
        if kwargs.get(theirs) is not None:
            out[ours] = str(kwargs[theirs])
    if out.get("query_mode", OFFICIAL_DEFAULTS["query_mode"]) not in PATCH_QUERY_MODES \
            and out.get("pooling_type", POOLING_TYPES[0]) not in POOLING_TYPES:
        # unused: the official code never pools an external query (toolkit/models/AttLoRA.py sets query_pooling =
        # None with external_query) and run.py takes any string, so inference.py runs such a checkpoint
        del out["pooling_type"]
    _validate(out, str(path))
    return out


def settings_from_metadata(meta: Mapping[str, str]) -> dict:
    """The settings our safetensors metadata records (``lorweb.*`` keys and ``encoder``); absent keys are left out.
    The rank/alpha scale is not included: it is checked against the tensors by ``load_lorweb_weights``. An
    unreadable ``lorweb.heads`` or a value that is not an official one raises LoRWeBConfigError."""
    out: dict[str, Any] = {}
    for ours, key in (("activation", "lorweb.activation"), ("reduce", "lorweb.reduce"),
                      ("query_mode", "lorweb.query_mode"), ("pooling_type", "lorweb.pooling_type"),
                      ("query_projection_type", "lorweb.query_projection_type"), ("encoder", "encoder")):
        if key in meta:
            out[ours] = meta[key]
    if "lorweb.heads" in meta:
        try:
            out["heads"] = int(meta["lorweb.heads"])
        except ValueError as exc:
            raise LoRWeBConfigError(f"unreadable LoRWeB metadata lorweb.heads={meta['lorweb.heads']!r}") from exc
    _validate(out, "the checkpoint metadata")
    return out


def _validate(settings: Mapping[str, Any], where: str) -> None:
    """LoRWeBConfigError naming ``where`` for a key not in ``SETTINGS``, an activation / reduce / query setting that
    is not an official value, or a num_loras / rank / key_dim / heads that is not a positive integer."""
    from .reference import ACTIVATIONS, REDUCTIONS

    allowed = {"activation": ACTIVATIONS, "reduce": REDUCTIONS, "query_mode": QUERY_MODES,
               "pooling_type": POOLING_TYPES, "query_projection_type": QUERY_PROJECTION_TYPES}
    for key, value in settings.items():
        if key not in SETTINGS:
            raise LoRWeBConfigError(f"{where}: unknown LoRWeB setting {key!r}; known: {SETTINGS}")
        if key in allowed and value not in allowed[key]:
            raise LoRWeBConfigError(f"{where}: {key} must be one of {allowed[key]}, got {value!r}")
        if key in ("num_loras", "rank", "key_dim", "heads") and not _positive_integer(value):
            raise LoRWeBConfigError(f"{where}: {key} must be a positive integer, got {value!r}")


def _positive_integer(value) -> bool:
    """An int >= 1, or a float with such a value (YAML's ``4.0``); not a bool, a string, NaN or an infinity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return int(value) == value and value >= 1
    except (OverflowError, ValueError):  # inf, nan
        return False


def resolve_settings(explicit: Optional[Mapping[str, Any]] = None, yaml_settings: Optional[Mapping[str, Any]] = None,
                     metadata_settings: Optional[Mapping[str, Any]] = None, *, yaml_name: str = "config.yaml",
                     defaults: Mapping[str, Any] = OFFICIAL_DEFAULTS) -> dict:
    """Merge the configuration sources: explicit argument > config.yaml > safetensors metadata > official defaults.

    A setting given by two sources with different values is an error naming both sources and values (a source that
    does not give a setting never conflicts). ``None`` values in ``explicit`` count as not given. Returns every
    setting of ``SETTINGS`` plus ``"sources"``: {setting: where its value came from}.

    Two exceptions: ``pooling_type`` conflicts only in the patch modes (the only ones that pool; the official
    ``AttLoraLinearAdapter.forward`` never pools an external query); an explicit ``encoder`` overrides the others
    without conflict. It says where to load the
    analogy encoder from (e.g. a local copy of the hub id the checkpoint names); whether it fits is checked by the
    query dimension against the layers when the pipeline is built.
    """
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    _validate(explicit, "the explicit arguments")
    layers = [("argument", explicit), (yaml_name, dict(yaml_settings or {})),
              ("the checkpoint metadata", dict(metadata_settings or {}))]
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in SETTINGS:
        given = [(name, src[key]) for name, src in layers if key in src]
        if key == "encoder" and given and given[0][0] == "argument":
            given = given[:1]
        if key == "pooling_type" and out["query_mode"] not in PATCH_QUERY_MODES:
            given = given[:1]  # only the patch modes pool (here; the official code never does): no conflict
        for name, value in given[1:]:
            if not _same(value, given[0][1]):
                raise LoRWeBConfigError(f"conflicting {key}: {given[0][0]} says {given[0][1]!r} but {name} says "
                                        f"{value!r}")
        out[key], sources[key] = (given[0][1], given[0][0]) if given else (defaults[key], "official default")
    out["sources"] = sources
    return out


def _same(a, b) -> bool:
    """Equal values, numbers compared as floats (4 and 4.0 agree)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


# ------------------------------------------------------------------------------------------------- writing
#: The base model the official config names (``config.process[0].model.name_or_path``) unless told otherwise.
OFFICIAL_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"


def official_config(settings: Mapping[str, Any], *, name: str = "lorweb", extra: Optional[Mapping] = None,
                    model: Optional[str] = None) -> dict:
    """An official-style job config (the structure ai-toolkit dumps to ``config.yaml``) holding ``settings``.

    ``settings`` uses lorweb_fast names (see the module docstring); missing ones (None counts as missing) take the
    official defaults, except ``lora_alpha``, which defaults to the rank (the official alpha = rank; another value
    is written with a warning).
    ``model`` is the base FLUX.1-Kontext model the adapter was trained on (hub id or path; None: OFFICIAL_MODEL).
    ``extra`` entries are merged into ``config.process[0]`` (e.g. ``train``, ``save``, ``datasets``). Returns
    ``{"job": "extension", "config": {"name": name, "process": [{"type", "network", "model", **extra}]}, "meta"}``.
    """
    s = {**OFFICIAL_DEFAULTS, **{k: v for k, v in settings.items() if k in SETTINGS and v is not None}}
    if settings.get("lora_alpha") is None:
        s["lora_alpha"] = s["rank"]  # the official alpha = rank
    _validate(s, "the settings to write")
    if float(s["lora_alpha"]) != float(s["rank"]):
        warn(f"lora_alpha={s['lora_alpha']!r} != rank={s['rank']!r}: the official inference.py ignores "
             "network.linear_alpha and applies the mixture with scale 1 (alpha = rank), where lorweb_fast reads "
             f"scale {float(s['lora_alpha']) / float(s['rank']):g} from the checkpoint metadata; inject with "
             "LoRWeBConfig(lora_alpha=None) (= rank) for a checkpoint both run alike")
    network = {
        "type": "attlora",
        "linear": int(s["rank"]),
        "linear_alpha": float(s["lora_alpha"]) if float(s["lora_alpha"]) != int(s["lora_alpha"])
        else int(s["lora_alpha"]),
        "network_kwargs": {
            "loras_num": int(s["num_loras"]), "lora_keys_dim": int(s["key_dim"]), "lora_heads": int(s["heads"]),
            "lora_softmax": s["activation"] == "softmax", "mixing_coeffs_type": s["reduce"],
            "external_query": True, "pooling_type": s["pooling_type"],
            "query_projection_type": s["query_projection_type"], "query_mode": s["query_mode"],
            "external_query_model": str(s["encoder"]),
        },
    }
    process = {"type": "sd_trainer", "network": network,
               "model": {"name_or_path": str(model or OFFICIAL_MODEL), "arch": "flux_kontext"}}
    process.update(dict(extra or {}))
    return {"job": "extension", "config": {"name": name, "process": [process]},
            "meta": {"name": name, "version": "1.0", "software": "lorweb_fast"}}


def config_yaml_text(settings: Mapping[str, Any], *, name: str = "lorweb", extra: Optional[Mapping] = None,
                     model: Optional[str] = None) -> str:
    """The text of ``official_config(settings, ...)`` as config.yaml holds it."""
    import yaml

    return yaml.safe_dump(official_config(settings, name=name, extra=extra, model=model), sort_keys=False)


def write_config_yaml(path: Union[str, os.PathLike], settings: Mapping[str, Any], *, name: str = "lorweb",
                      extra: Optional[Mapping] = None, model: Optional[str] = None) -> Path:
    """Write ``official_config(settings, name=name, extra=extra, model=model)`` as YAML to ``path`` atomically
    (temporary file, then rename); returns ``path``."""
    path = Path(path)
    text = config_yaml_text(settings, name=name, extra=extra, model=model)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def aitk_metadata(name: str, step: Optional[int] = None, epoch: Optional[int] = None) -> dict[str, str]:
    """ai-toolkit's safetensors metadata keys (jobs/process/BaseSDTrainProcess.py ``save``,
    ``update_training_metadata``, ``get_training_info`` + toolkit/metadata.py ``get_meta_for_safetensors``): name,
    version, software, training_info (step, epoch), ss_output_name and ss_base_model_version, JSON-encoded where not
    strings. ss_base_model_version is "sd_1.5" as in the official files: ``update_training_metadata`` first sets
    ``get_base_model_version()`` ("flux.1_kontext"), then ``add_base_model_info_to_meta`` (no base model, not v2,
    not xl) overwrites it with its default."""
    meta = {"name": name, "version": "1.0", "software": json.dumps(AITK_SOFTWARE),
            "ss_output_name": name, "ss_base_model_version": "sd_1.5"}
    if step is not None:
        meta["training_info"] = json.dumps({"step": int(step)} if epoch is None
                                           else {"step": int(step), "epoch": int(epoch)})
    return meta


#: placeholders of the hashes ``aitk_model_hashes`` computes, of their lengths (written first, replaced in place)
AITK_HASH_PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


def aitk_model_hashes(path: Union[str, os.PathLike], metadata: dict) -> dict[str, str]:
    """The sd-webui-additional-networks hashes ai-toolkit adds to every network file it saves (toolkit/metadata.py
    ``add_model_hash_to_meta``, toolkit/train_tools.py ``addnet_hash_safetensors`` / ``addnet_hash_legacy``), of the
    tensors of the safetensors file ``path`` as ai-toolkit computes them: on the tensors serialized with only the
    ``ss_*`` entries of ``metadata``. ``sshs_model_hash`` is the SHA-256 of everything after that serialization's
    header: the data section, the same bytes in ``path`` whatever its metadata, read in chunks (no copy of the
    checkpoint in memory); ``sshs_legacy_hash`` the first 8 hex digits of the SHA-256 of its 64 KiB at offset 1 MiB
    (of fewer bytes, or none, in a smaller file), the header part rebuilt from ``path``'s own (safetensors' compact
    JSON, padded with spaces to 8 bytes; an ``ss_*`` entry moves the window)."""
    import hashlib
    import struct

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = {k: v for k, v in json.loads(f.read(length)).items() if k != "__metadata__"}
        ss_only = {"__metadata__": {k: str(v) for k, v in metadata.items() if k.startswith("ss_")}, **entries}
        header = json.dumps(ss_only, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        header += b" " * (-len(header) % 8)
        prefix = struct.pack("<Q", len(header)) + header  # where the data starts in ai-toolkit's serialization
        data = 8 + length  # ... and in path
        model_hash = hashlib.sha256()
        f.seek(data)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            model_hash.update(chunk)
        lo, hi = 0x100000, 0x110000
        window = prefix[lo:hi]
        if hi > len(prefix):
            f.seek(data + max(0, lo - len(prefix)))
            window += f.read(hi - max(lo, len(prefix)))
    return {"sshs_model_hash": model_hash.hexdigest(), "sshs_legacy_hash": hashlib.sha256(window).hexdigest()[:8]}


# ------------------------------------------------------------------------------------------ checkpoint discovery
# the official inference.py's step-file test (``re.search(r'_(000\d+)\.safetensors', ...)``): ai-toolkit's
# ``<name>_<step:09d>`` names, and any other suffix of three zeros and more digits
_STEP_FILE = re.compile(r"^(?P<name>.+)_(?P<step>000\d+)\.safetensors$")


def _complete(path: Path) -> bool:
    """True when the safetensors header is readable (a partly written file fails)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return path.stat().st_size > 8
    except Exception:
        return False


def checkpoint_candidates(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(final files, step files newest first) among ``names``, the paths of a folder's files relative to it
    (posix). ``find_checkpoint``'s rule on names alone: a final ``<name>.safetensors`` (no step suffix) is preferred
    over the step files ``<name>_000<digits>.safetensors`` (ai-toolkit's ``<name>_<step:09d>``) and lorweb_fast's
    ``checkpoints/step-XXXXXXXX/lorweb.safetensors``; hidden files and files in other subfolders are not candidates."""
    finals, stepped = [], []
    for name in names:
        parts = name.split("/")
        if len(parts) == 1 and name.endswith(".safetensors") and not name.startswith("."):
            match = _STEP_FILE.match(name)
            if match:
                stepped.append((int(match["step"]), name))
            else:
                finals.append(name)
        elif (len(parts) == 3 and parts[0] == "checkpoints" and re.fullmatch(r"step-\d+", parts[1])
              and parts[2] == "lorweb.safetensors"):
            stepped.append((int(parts[1].split("-")[1]), name))
    return sorted(finals), [name for _, name in sorted(stepped, key=lambda x: x[0], reverse=True)]


def _several_finals(root, finals) -> LoRWeBConfigError:
    """The error for a folder ``root`` holding several final checkpoints ``finals``."""
    return LoRWeBConfigError(f"{root} holds several final checkpoints ({', '.join(finals)}); pass the file to use")


def pick_checkpoint_name(names: Iterable[str], root: str) -> Optional[str]:
    """The file ``find_checkpoint`` would pick from a folder holding ``names`` (paths relative to it, all complete,
    e.g. a Hub repo's listing); None when none is a checkpoint. ``root`` names the folder in the error for two
    final files."""
    finals, stepped = checkpoint_candidates(names)
    if len(finals) > 1:
        raise _several_finals(root, finals)
    return (finals + stepped)[0] if finals or stepped else None


def find_checkpoint(directory: Union[str, os.PathLike]) -> tuple[Path, Optional[Path]]:
    """(weights, config.yaml or None) of the newest complete checkpoint in a folder.

    The rule the official inference.py's folder lookup means (``main``: its loop takes the first non-step file in
    listing order, and fails on an undefined ``output_path`` once it has seen a step file): a final
    ``<name>.safetensors`` (no step suffix) wins, else the highest step file ``<name>_000<digits>.safetensors``.
    Also understands lorweb_fast's run folders (``lorweb.safetensors`` and ``checkpoints/step-XXXXXXXX/``). Hidden
    and temporary files are skipped, and so are files whose header cannot be read, with a warning naming them. Two
    different final files are ambiguous (LoRWeBConfigError); a missing folder or one without a complete checkpoint
    raises FileNotFoundError. The config is the ``config.yaml`` beside the chosen weights, else the folder's.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {root}")
    names = [p.name for p in root.iterdir() if p.is_file()]
    names += [f"checkpoints/{d.name}/lorweb.safetensors" for d in (root / "checkpoints").glob("step-*")]
    finals, stepped = checkpoint_candidates(names)
    skipped = [name for name in finals if not _complete(root / name)]
    finals = [name for name in finals if name not in skipped]
    if len(finals) > 1:
        raise _several_finals(root, finals)
    chosen = root / finals[0] if finals else None
    for name in [] if finals else stepped:
        if not (root / name).is_file():
            continue
        if _complete(root / name):
            chosen = root / name
            break
        skipped.append(name)
    if chosen is None:
        raise FileNotFoundError(f"no complete LoRWeB checkpoint (*.safetensors) in {root}"
                                + (f" (unreadable: {', '.join(skipped)})" if skipped else ""))
    if skipped:  # never silently: the newest or final file is what the folder is expected to give
        warn(f"{root}: skipped the unreadable checkpoint file(s) {', '.join(skipped)} (truncated, or not "
             f"safetensors); using {chosen.relative_to(root).as_posix()}")
    return chosen, config_beside(chosen, root)


def config_beside(file: Path, root: Path) -> Optional[Path]:
    """The config.yaml that goes with checkpoint ``file`` picked from folder ``root``: beside the file, else in
    ``root`` (an official run folder keeps one config.yaml for all its step files); None when neither exists."""
    return next((c for c in (file.parent / CONFIG_NAME, root / CONFIG_NAME) if c.is_file()), None)
