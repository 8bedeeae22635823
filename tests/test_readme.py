"""README.md against the code it documents: the commands, flags, paths and Python calls it shows must exist.

- every ``lorweb-fast <sub-command> ... --flag`` in a code block or an inline code span names a sub-command that
  exists and only flags of that sub-command (``lorweb-fast`` with no sub-command and no flag is the program named
  in prose);
- every other ``--flag`` is one of the command's, one that this repository's scripts define (benchmarks/,
  ``python -m lorweb_fast.*``), or one of another tool that the README quotes (listed below with where it is from);
- every repository path it names exists (globs and ``{a,b}`` lists expanded);
- every call in its Python blocks to ``lf.*``, ``flux.*``, a name imported from lorweb_fast, or a method of an object
  built by one of those binds to the callable's signature (no unknown keyword, not too many positional arguments),
  and keywords that land in a ``**kwargs`` are ones that the callable passes on or accepts;
- every dotted API name in the prose's code spans that starts at this package, the pipeline (``pipe.x``) or a
  diffusers transformer method exists, and a call written with arguments binds (this package's callables).
"""

import argparse
import ast
import glob
import inspect
import re
from pathlib import Path

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Flags of other programs that the README quotes: pip and pytest (install and test commands), accelerate launch
# (multi-GPU training), and the official NVlabs/LoRWeB command lines it compares with (ai-toolkit's run.py options
# as the official README.md writes them, inference.py's -m/--max_size).
OTHER_TOOLS_FLAGS = {
    "--no-build-isolation", "--no-deps", "--no-index",  # pip
    "--benchmark-only", "--benchmark-save", "--benchmark-compare",  # pytest-benchmark
    "--multi_gpu", "--num_processes", "--mixed_precision", "--use_fsdp", "--fsdp_version",
    "--fsdp_auto_wrap_policy",  # accelerate launch
    "--nproc-per-node",  # torchrun
    "--linear", "--linear_alpha", "--loras_num", "--lora_softmax", "--query_mode",  # official README.md
    "--max_size", "--config_file",  # official inference.py
}
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def subcommand_options() -> dict:
    """{("train",): {"--data", ...}, ("data", "check"): {...}, ...}: each (nested) sub-command's option strings."""
    found = {}

    def walk(parser, path):
        options = {o for a in parser._actions for o in a.option_strings}
        found[path] = options
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + (name,))

    walk(cli.build_parser(), ())
    return found


def code_texts() -> list:
    """The README's code: each logical line of its fenced blocks (``\\`` continuations joined) and each inline
    `code span`, with the line number where it starts."""
    texts = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(README.splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not pending:
                start = number
            pending += line.rstrip("\\") + " "
            if not line.endswith("\\"):
                texts.append((start, pending))
                pending = ""
        else:
            texts += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return texts


def lorweb_fast_commands() -> list:
    """(line, sub-command words, the flags after them) for each ``lorweb-fast ...`` command in the README's code."""
    commands = []
    for number, text in code_texts():
        for match in re.finditer(r"lorweb-fast\)?\"?((?:\s+[a-z]+)*)(.*?)(?=lorweb-fast|$)", text):
            words = tuple(match.group(1).split())
            commands.append((number, words, FLAG.findall(match.group(2))))
    return commands


def test_the_readme_shows_lorweb_fast_commands():
    """The parser below finds what it is meant to check (so the other tests cannot pass on an empty list)."""
    subs = {words[:1] for _, words, _ in lorweb_fast_commands()}
    assert {("infer",), ("train",), ("data",), ("eval",), ("demo",)} <= subs


def test_every_lorweb_fast_command_uses_its_own_flags():
    options = subcommand_options()
    wrong = []
    for number, words, flags in lorweb_fast_commands():
        path = ()
        for word in words:  # the longest prefix of words that is a sub-command path
            if path + (word,) not in options:
                break
            path += (word,)
        if not path:
            if flags:
                wrong.append(f"README.md:{number}: no sub-command {words[:1]} before {', '.join(flags)}")
            continue  # the program named in prose ("the lorweb-fast command")
        unknown = [f for f in flags if f not in options[path]]
        if unknown:
            wrong.append(f"README.md:{number}: lorweb-fast {' '.join(path)} has no {', '.join(unknown)}")
    assert not wrong, "\n".join(wrong)


def repository_flags() -> set:
    """Every ``--flag`` string written in the command's and the scripts' sources."""
    flags = set()
    for pattern in ("lorweb_fast/**/*.py", "benchmarks/*.py", "benchmarks/*.sh"):
        for path in glob.glob(str(ROOT / pattern), recursive=True):
            source = Path(path).read_text()
            flags |= set(re.findall(r"[\"'\s](--[a-z][a-z0-9_-]*)", source))
            flags |= {"--no-" + f[2:] for f in re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9_-]*)\"[^)]*"
                                                          r"BooleanOptionalAction", source)}
    return flags


def test_every_flag_the_readme_names_exists():
    known = repository_flags() | OTHER_TOOLS_FLAGS | set().union(*subcommand_options().values())
    unknown = sorted(set(FLAG.findall(README)) - known)
    assert not unknown, f"README.md names flags that nothing defines: {unknown}"


def expand(path: str) -> list:
    """``tests/test_{a,b}.py`` -> both names; ``<cc>`` -> ``*``."""
    brace = re.search(r"\{([^}]*)\}", path)
    if brace:
        return [p for choice in brace.group(1).split(",")
                for p in expand(path[:brace.start()] + choice + path[brace.end():])]
    return [re.sub(r"<[^>]*>", "*", path)]


def test_every_repository_path_the_readme_names_exists():
    """Each path, and each name of a ``{a,b}`` list, exists; a glob matches at least one file."""
    named = set(re.findall(r"(?<![\w/.-])((?:lorweb_fast|benchmarks|tests|kernels|csrc|\.ci)/[\w./{},*<>-]*[\w}*])",
                           README))
    assert len(named) > 20
    missing = sorted(p for name in named for p in expand(name) if not glob.glob(str(ROOT / p)))
    assert not missing, f"README.md names paths that do not exist: {missing}"


def python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def _callable_of(node, scope: dict, types: dict):
    """The object a call's ``func`` node names (``lf.x``, ``flux.x``, an imported name, ``var.method`` for a var
    built from one of those, ``var(...)`` for such a var), with whether an instance is bound; None when unknown."""
    if isinstance(node, ast.Name):
        if node.id in scope:
            return scope[node.id], False
        if node.id in types:  # calling an instance: a module's forward, else __call__
            cls = types[node.id]
            return (cls.forward if issubclass(cls, torch.nn.Module) else cls.__call__), True
        return None
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = node.value.id
        if owner in scope:
            return getattr(scope[owner], node.attr), False
        if owner in types:
            cls = types[owner]
            static = inspect.getattr_static(cls, node.attr)
            return getattr(cls, node.attr), not isinstance(static, (classmethod, staticmethod))
    return None


def signature_errors(block: str) -> tuple:
    """(the calls in the Python ``block`` that do not bind to what they call, how many calls the block has)."""
    tree = ast.parse(block)
    scope = {"lf": lf}
    types = {}
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorweb_fast"):
            module = __import__(node.module, fromlist=["_"])
            for alias in node.names:
                scope[alias.asname or alias.name] = getattr(module, alias.name)
    for statement in tree.body:  # in order, so that `var = Class(...)` types later `var.method(...)` calls
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                calls.append(node)
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call):
            found = _callable_of(statement.value.func, scope, types)
            target = statement.targets[0]
            if found is not None and isinstance(target, ast.Name):
                fn = found[0]
                cls = fn if inspect.isclass(fn) else getattr(fn, "__self__", None)
                if inspect.isclass(cls):
                    types[target.id] = cls
    errors = []
    for call in calls:
        found = _callable_of(call.func, scope, types)
        if found is None:
            continue
        fn, bound = found
        assert fn is not None and (callable(fn) or inspect.isclass(fn)), ast.unparse(call.func)
        module = inspect.getmodule(fn)
        if module is None or not module.__name__.startswith("lorweb_fast"):
            continue  # torch's and diffusers' own signatures are theirs to document
        signature = inspect.signature(fn)
        positional = [None] * (len(call.args) + bound)
        keywords = {k.arg: None for k in call.keywords if k.arg is not None}
        try:
            bound_args = signature.bind(*positional, **keywords)
        except TypeError as exc:
            errors.append(f"{ast.unparse(call)[:120]}: {exc}")
            continue
        extra = {name: literal_or_one(call, name) for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD
                 for name in bound_args.arguments.get(p.name, {})}
        if extra:
            error = keyword_options_error(fn, extra)
            if error:
                errors.append(f"{ast.unparse(call)[:120]}: {error}")
    return errors, len(calls)


def literal_or_one(call: ast.Call, name: str):
    """The value the README passes for keyword ``name`` when it is a literal, else 1 (a value every numeric range
    check of the options accepts)."""
    value = next(k.value for k in call.keywords if k.arg == name)
    try:
        return ast.literal_eval(value)
    except ValueError:
        return 1


def keyword_options_error(fn, options: dict):
    """Why the ``**kwargs`` ``options`` are not accepted by ``fn``, or None: each lorweb_fast callable that the
    README calls with extra keywords says here where they go."""
    from diffusers import FluxKontextPipeline

    from lorweb_fast import flux
    from lorweb_fast.validation import check_pipe_kwargs

    if fn == flux.LoRWeBKontextPipeline.from_pretrained:
        unknown = sorted(set(options) - set(flux.FROM_PRETRAINED_OPTIONS))
        return f"unknown options {unknown}" if unknown else None
    if fn == flux.LoRWeBKontextPipeline.__call__:  # the rest goes to FluxKontextPipeline.__call__
        try:
            check_pipe_kwargs(options, FluxKontextPipeline.__call__)
        except (TypeError, ValueError) as exc:
            return str(exc)
        return None
    return f"{fn.__qualname__} takes **kwargs: say in keyword_options_error where they go"


@pytest.mark.parametrize("index", range(2))
def test_python_block_calls_match_the_signatures(index):
    blocks = python_blocks()
    assert len(blocks) == 2, "the README's Python blocks changed: update the parametrization"
    errors, checked = signature_errors(blocks[index])
    assert checked >= 3
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------------------------------- API names in the prose
def inline_spans(text: str = README) -> list:
    """(line, text) of each inline `code span` outside the fenced blocks."""
    spans, in_block = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
        elif not in_block:
            spans += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return spans


DOTTED = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?")
FILE_NAME = re.compile(r".*\.(py|pyi|json|jsonl|md|png|txt|yaml|safetensors|sh|pt|gz|log|so|whl|toml|cu|cpp|h)")
#: module names that the prose also uses as variables (`model.requires_grad_(True)`: a torch model)
VARIABLE_NAMES = {"model"}


def lorweb_fast_names() -> dict:
    """{name: object} for the roots a prose name can start from: ``lf`` / ``lorweb_fast``, each module of the
    package (``flux``, ``official_config``, ...) and each class defined in it (``LoRWeBLinear``, ``TrainConfig``)."""
    import importlib
    import pkgutil

    roots = {"lf": lf, "lorweb_fast": lf}
    for info in pkgutil.walk_packages(lf.__path__, "lorweb_fast."):
        if info.name.split(".")[-1].startswith("_") or info.name.split(".")[-1] in VARIABLE_NAMES:
            continue
        module = importlib.import_module(info.name)
        roots.setdefault(info.name.split(".")[-1], module)
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__.startswith("lorweb_fast"):
                roots.setdefault(value.__name__, value)
    return roots


def _instance_attributes(cls) -> set:
    """The ``self.x`` names that ``cls.__init__`` assigns."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(cls.__init__)))
    return {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            for t in (target.elts if isinstance(target, ast.Tuple) else [target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def _resolve(parts: list, roots: dict):
    """The object ``a.b.c`` names from ``roots`` (importing submodules on the way), or raise AttributeError."""
    import importlib

    obj = roots[parts[0]]
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not inspect.ismodule(obj):
                raise
            name = f"{obj.__name__}.{part}"
            if name == "lorweb_fast._C":  # the optional extension: built where a CUDA toolkit is (setup.py)
                assert "lorweb_fast._C" in (ROOT / "setup.py").read_text()
                return None
            obj = importlib.import_module(name)
    return obj


def _pipeline_attribute_exists(attr: str) -> bool:
    """``pipe.attr`` for a LoRWeBKontextPipeline: its own (class or ``__init__``) attribute, or one of the wrapped
    FluxKontextPipeline that the wrapper hands on (a class attribute or a component named in its ``__init__``)."""
    from diffusers import FluxKontextPipeline

    from lorweb_fast.flux import LoRWeBKontextPipeline

    if hasattr(LoRWeBKontextPipeline, attr) or attr in _instance_attributes(LoRWeBKontextPipeline):
        return True
    handed_on = "__getattr__" in vars(LoRWeBKontextPipeline)
    return handed_on and (hasattr(FluxKontextPipeline, attr)
                          or attr in inspect.signature(FluxKontextPipeline.__init__).parameters)


def _prose_call_error(fn, call_text: str, bound: bool):
    """Why ``name(args)`` as the prose writes it does not bind to lorweb_fast's ``fn``, or None (``name()`` names the
    callable, ``...`` stands for any arguments; other callables' signatures are not checked)."""
    module = inspect.getmodule(fn)
    if module is None or not module.__name__.startswith("lorweb_fast") or call_text == "()" \
            or "..." in call_text.replace("=...", ""):
        return None
    # a signature written with a bare ``*`` (keyword-only parameters after it) is read as the call it allows
    call = ast.parse("f" + re.sub(r"([(,]\s*)\*\s*,\s*", r"\1", call_text), mode="eval").body
    positional = [None] * (len(call.args) + bound)
    keywords = {k.arg: None for k in call.keywords if k.arg is not None}
    try:
        inspect.signature(fn).bind(*positional, **keywords)
    except TypeError as exc:
        return str(exc)
    return None


def prose_api_errors(readme: str = README) -> tuple:
    """(the dotted names in the prose that name nothing or are called with arguments their callable does not take,
    how many names were checked)."""
    from diffusers import FluxTransformer2DModel

    roots = lorweb_fast_names()
    errors, checked = [], 0
    for number, span in inline_spans(readme):
        for text in span.split(";"):
            match = DOTTED.fullmatch(text.strip())
            if match is None or FILE_NAME.fullmatch(match.group(1)):
                continue
            parts, call_text = match.group(1).split("."), match.group(2)
            bound = False
            try:
                if parts[0] in roots:
                    obj = _resolve(parts, roots)  # a class's method as written: unbound
                elif parts[0] == "pipe":
                    if not _pipeline_attribute_exists(parts[1]):
                        raise AttributeError(f"LoRWeBKontextPipeline has no {parts[1]!r}")
                    from lorweb_fast.flux import LoRWeBKontextPipeline

                    obj = getattr(LoRWeBKontextPipeline, parts[1], None) if len(parts) == 2 else None
                    bound = obj is not None and not isinstance(
                        inspect.getattr_static(LoRWeBKontextPipeline, parts[1]), (classmethod, staticmethod))
                elif parts[0] == "transformer" and call_text is not None:  # diffusers' model methods
                    obj = getattr(FluxTransformer2DModel, parts[1])
                else:
                    continue  # torch, config keys, the official code's names: not this package's to check
            except (AttributeError, KeyError, ImportError) as exc:
                errors.append(f"README.md:{number}: `{text.strip()}`: {exc}")
                continue
            checked += 1
            if call_text is not None and obj is not None and callable(obj):
                error = _prose_call_error(obj, call_text, bound)
                if error:
                    errors.append(f"README.md:{number}: `{text.strip()}`: {error}")
    return errors, checked


def test_every_api_name_in_the_prose_exists():
    """Each dotted name in an inline code span that starts at this package (``lf.x``, ``lorweb_fast.x.y``, a module
    such as ``flux.X``, a class such as ``LoRWeBLinear.forward``), at the pipeline (``pipe.x``: the wrapper's own or
    the wrapped FluxKontextPipeline's) or at a diffusers transformer method (``transformer.x(...)``) exists, and a
    call written with its arguments binds to the callable (this package's callables only)."""
    errors, checked = prose_api_errors()
    assert checked >= 30, checked
    assert not errors, "\n".join(errors)


def test_the_prose_check_finds_wrong_names():
    """The check above on made-up prose: every wrong name and call is reported, and names it does not own (torch,
    config keys, file names, a code block) are left alone."""
    made_up = ("`lf.no_such_thing`, `pipe.fuse_lora(bogus=1)`; `flux.LoRWeBKontextPipeline.from_pretrained(a)`\n"
               "`transformer.no_method()` `pipe.nothing` `LoRWeBLinear.frobnicate` `lorweb_fast.nomod.x`\n"
               "fine: `lf.merged()` `pipe.vae` `pipe.pipe` `TrainConfig.validate` `torch.nothing` `network.linear`\n"
               "`model.nothing` `flux.py` `lorweb_fast.evaluation.judge.ReplayJudge`\n```python\n`lf.nope`\n```\n")
    errors, checked = prose_api_errors(made_up)
    assert [e.split("`")[1] for e in errors] == [
        "lf.no_such_thing", "pipe.fuse_lora(bogus=1)", "flux.LoRWeBKontextPipeline.from_pretrained(a)",
        "transformer.no_method()", "pipe.nothing", "LoRWeBLinear.frobnicate", "lorweb_fast.nomod.x"]
    assert checked == 7  # the five fine names and the two that exist but are called wrongly
