"""Audit of the public API documentation against the code: the docstrings' (and README's) shapes, dtypes, defaults,
return values and exception types.

Documented claims that no other test file checks; the tests whose docstrings say "found by the documentation
audit" pinned a mismatch that has been fixed. CPU only, no Triton interpreter: the fused ops are checked through
their fake (shape-propagation) kernels.
"""

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import ops, reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _flat(text: str) -> str:
    return " ".join((text or "").split())


# ------------------------------------------------------------------------------------------- exported names' docs
def _is_data(obj) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or callable(obj))


def test_every_exported_callable_and_class_has_a_docstring_of_its_own():
    """``help(lf.<name>)`` shows the object's own documentation, not one inherited from a base class or type."""
    missing = []
    for name in lf.__all__:
        obj = getattr(lf, name)
        if _is_data(obj):
            continue
        own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if not (own or "").strip():
            missing.append(name)
    assert not missing, f"exported without a docstring of their own: {missing}"


def _constant_documented(module, name: str) -> bool:
    """A ``#:`` comment (Sphinx's attribute doc) directly above ``name = ...`` in ``module``'s source."""
    lines = inspect.getsource(module).splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{name}\s*(:[^=]*)?=", line):
            return i > 0 and lines[i - 1].lstrip().startswith("#:")
    return False


def test_exported_constants_are_documented():
    undocumented = [name for name in lf.__all__ if _is_data(getattr(lf, name))
                    and not _constant_documented(ops, name) and name not in (lf.__doc__ or "")]
    assert not undocumented, f"exported constants without documentation: {undocumented}"


def test_the_package_docstring_names_every_exported_name():
    doc = lf.__doc__ or ""
    absent = [name for name in lf.__all__ if not re.search(rf"\b{re.escape(name)}\b", doc)]
    assert not absent, f"exported but not in lorweb_fast's docstring: {absent}"


def test_exceptions_named_in_public_docstrings_are_exported():
    from lorweb_fast import official_config

    named = [n for n in lf.__all__ if "LoRWeBConfigError" in (inspect.getdoc(getattr(lf, n)) or "")]
    assert named  # what this test is about: public docstrings name it
    assert "LoRWeBConfigError" in lf.__all__
    assert getattr(lf, "LoRWeBConfigError", None) is official_config.LoRWeBConfigError


# ----------------------------------------------------------------------------------------- the fused op contract
def _top_level_list(text: str, start: int) -> tuple[list, int]:
    """The comma-separated items of the parenthesised list opening at ``text[start - 1]``, and the index after it."""
    depth, items, current = 0, [], ""
    for i in range(start, len(text)):
        ch = text[i]
        if ch == ")" and depth == 0:
            return items + [current.strip()], i + 1
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    raise AssertionError(f"unbalanced parentheses in {text[start:start + 80]!r}")


def _contract(kind: str) -> tuple[list, int]:
    """([(name, optional, default)], number of outputs) of ``fwd(...) -> (...)`` / ``bwd(...)`` in ops' docstring."""
    text = _flat(ops.__doc__)
    args, end = _top_level_list(text, text.index(f"{kind}(") + len(kind) + 1)
    arrow = re.compile(r"\s*->\s*\(").match(text, end)
    assert arrow, f"no '-> (...)' after {kind}(...) in lorweb_fast.ops' docstring"
    outputs, _ = _top_level_list(text, arrow.end())
    parsed = []
    for arg in args:
        name = re.match(r"\w+", arg).group(0)
        default = arg.split("=", 1)[1] if "=" in arg else None
        parsed.append((name, arg.split("=")[0].rstrip().endswith("?"), default))
    return parsed, len(outputs)


def _schema_args(op) -> tuple[list, int]:
    schema = op.default._schema
    args = [(a.name, str(a.type).startswith("Optional"), None if a.default_value is None else str(a.default_value))
            for a in schema.arguments]
    return args, len(schema.returns)


def _registered_ops():
    found = []
    if hasattr(torch.ops.lorweb_fast, "triton_fwd"):
        found += [("fwd", torch.ops.lorweb_fast.triton_fwd), ("bwd", torch.ops.lorweb_fast.triton_bwd)]
    if ops._CUDA_EXT is not None:
        found += [("fwd", torch.ops.lorweb_fast_cuda.fwd), ("bwd", torch.ops.lorweb_fast_cuda.bwd)]
    return found


def test_the_op_contract_in_the_ops_docstring_matches_the_registered_schemas():
    """Argument names, order, optionality (``?``), defaults and output count of ``fwd`` / ``bwd`` as the module
    docstring of lorweb_fast.ops writes them are those of every registered fused op."""
    registered = _registered_ops()
    if not registered:
        pytest.skip("neither the Triton kernels nor the CUDA extension are importable here")
    for kind, op in registered:
        assert _schema_args(op) == _contract(kind), op


def _fake_inputs(dtype, M=8, k=16, out=12, n=3, r=2, batch=2):
    x = torch.randn(M, k, dtype=dtype)
    return dict(x=x, weight=torch.randn(out, k, dtype=dtype), lora_a=torch.randn(n, k, r, dtype=dtype),
                lora_b=torch.randn(n, r, out, dtype=dtype), coeffs=torch.rand(batch, n), dy=torch.randn(M, out,
                                                                                                      dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows_per_sample", [4, 1])  # 3-D rows (fused route), 2-D inputs (cuBLAS route)
def test_triton_op_fake_kernels_give_the_documented_shapes_and_dtypes(dtype, rows_per_sample):
    """ops' contract through the Triton ops' shape propagation (CPU fake tensors, no GPU or interpreter): y (M, out),
    u and z (M, R) in x's dtype except Triton's u for fp16 (fp32, on every route); dx (M, in), d_lora_a
    (N, in, r), d_lora_b (N, r, out), d_coeffs (B, N) fp32, and an empty (0,) tensor for what is not needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not hasattr(torch.ops.lorweb_fast, "triton_fwd"):
        pytest.skip("the Triton kernels are not importable here")
    M = 2 * rows_per_sample
    with FakeTensorMode():
        p = _fake_inputs(dtype, M=M)
        x, w, a, b, c = p["x"], p["weight"], p["lora_a"], p["lora_b"], p["coeffs"]
        y, u, z = torch.ops.lorweb_fast.triton_fwd(x, w, None, None, a, b, c, 1.0, rows_per_sample)
        fp32_u = dtype == torch.float16  # the cuBLAS route (2-D inputs) too: its unscaled u may pass 65504
        assert [(tuple(t.shape), t.dtype) for t in (y, u, z)] == [
            ((M, 12), dtype), ((M, 6), torch.float32 if fp32_u else dtype), ((M, 6), dtype)]
        for need_dx, need_dbasis in ((True, True), (False, True), (True, False)):
            grads = torch.ops.lorweb_fast.triton_bwd(p["dy"], x, w, a, b, c, u, z, 1.0, rows_per_sample, need_dx,
                                                     need_dbasis)
            want = [((M, 16) if need_dx else (0,), dtype), ((3, 16, 2) if need_dbasis else (0,), dtype),
                    ((3, 2, 12) if need_dbasis else (0,), dtype), ((2, 3), torch.float32)]
            assert [(tuple(g.shape), g.dtype) for g in grads] == want


# ----------------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("bias_shape", [(1,), (2, 1, 6), (3, 6)])
def test_reference_lorweb_linear_refuses_a_bias_that_is_not_out_features(bias_shape):
    x, w = torch.randn(2, 3, 8), torch.randn(6, 8)
    a, b, c = torch.randn(4, 8, 2), torch.randn(4, 2, 6), torch.rand(2, 4)
    bias = torch.randn(bias_shape)
    with pytest.raises(ValueError):
        ops.lorweb_linear(x, w, bias, a, b, c, 1.0)  # the fast path refuses it
    with pytest.raises(ValueError):
        reference.lorweb_linear(x, w, bias, a, b, c, 1.0)


# ---------------------------------------------------------------------------------------------------- model level
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.b(self.a(x))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Block()])

    def forward(self, x):
        return self.transformer_blocks[0](x)


_SMALL = dict(num_loras=2, rank=2, key_dim=4, query_dim=4)


def test_lorweb_state_dict_holds_the_layers_own_tensors_under_the_official_keys():
    """Documented: official keys ``transformer.<module>.<param>`` with lora_A (N, in, r), lora_B (N, r, out),
    lora_keys (N, key_dim), att_lora_to_q.weight (key_dim, query_dim), in the layers' dtype; not sharded: returned as
    they are (detached, not copied)."""
    model = _Toy().to(torch.bfloat16)
    lf.inject_lorweb(model, lf.LoRWeBConfig(**_SMALL))
    state = lf.lorweb_state_dict(model)
    want = {}
    for name, (k, o) in (("transformer_blocks.0.a", (8, 8)), ("transformer_blocks.0.b", (8, 6))):
        want.update({f"transformer.{name}.lora_A": (2, k, 2), f"transformer.{name}.lora_B": (2, 2, o),
                     f"transformer.{name}.lora_keys": (2, 4), f"transformer.{name}.att_lora_to_q.weight": (4, 4)})
    assert {key: tuple(t.shape) for key, t in state.items()} == want
    layers = lf.lorweb_layers(model)
    for key, t in state.items():
        module, suffix = re.match(r"transformer\.(transformer_blocks\.0\.[ab])\.(.+)", key).groups()
        param = layers[module].lorweb_tensors()[suffix]
        assert t.dtype == torch.bfloat16 and not t.requires_grad and param.requires_grad
        assert t.data_ptr() == param.data_ptr()  # not copied


def test_merged_weight_for_shapes_dtype_and_device_as_documented():
    """(N,) -> (out, in); (B, N) -> (B, out, in), one per sample; coefficients of any floating dtype; the result in
    W's dtype on W's device; rows equal to the one-analogy weight."""
    layer = lf.LoRWeBLinear(nn.Linear(8, 6).to(torch.bfloat16), **_SMALL)
    nn.init.normal_(layer.lora_B)
    coeffs = torch.rand(3, 2, dtype=torch.float64)
    one = layer.merged_weight_for(coeffs[1])
    many = layer.merged_weight_for(coeffs)
    assert (tuple(one.shape), one.dtype, one.device) == ((6, 8), torch.bfloat16, layer.base_layer.weight.device)
    assert (tuple(many.shape), many.dtype) == ((3, 6, 8), torch.bfloat16)
    assert torch.equal(many[1], one)
    with pytest.raises(ValueError):
        layer.merged_weight_for(torch.rand(3))  # documented: (N,) or (B, N)


def _official_checkpoint_with_linear_alpha(tmp_path, linear_alpha: int) -> Path:
    """A checkpoint in the official layout (no lorweb_fast metadata) beside an official config.yaml with rank 2
    and ``linear_alpha``."""
    from safetensors.torch import save_file

    model = _Toy()
    lf.inject_lorweb(model, lf.LoRWeBConfig(**_SMALL))
    ours = tmp_path / "ours" / "w.safetensors"
    lf.save_lorweb_weights(model, ours, config={})
    text = (ours.parent / "config.yaml").read_text()
    assert "linear_alpha: 2" in text
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "config.yaml").write_text(text.replace("linear_alpha: 2", f"linear_alpha: {linear_alpha}"))
    save_file({k: v.contiguous() for k, v in lf.lorweb_state_dict(model).items()}, folder / "lorweb.safetensors")
    return folder / "lorweb.safetensors"


def test_load_lorweb_weights_does_not_apply_config_yaml_linear_alpha_as_documented(tmp_path):
    """Found by the documentation audit: the docstring listed config.yaml among lora_alpha's sources, but an
    official-format file beside a config.yaml with ``linear: 2, linear_alpha: 8`` loads with scale 1 (the official
    FLUX network applies no alpha), with a warning naming linear_alpha. The docstring now says so; this checks the
    behaviour it documents."""
    text = _flat(lf.load_lorweb_weights.__doc__)
    assert "``linear_alpha`` is not applied" in text
    path = _official_checkpoint_with_linear_alpha(tmp_path, linear_alpha=8)
    model = _Toy()
    with pytest.warns(lf.LoRWeBWarning, match="linear_alpha"):
        lf.load_lorweb_weights(model, path)
    assert {layer.scale for layer in lf.lorweb_layers(model).values()} == {1.0}


# ------------------------------------------------------------------------------------------------ README snippets
class _TinyFlux(nn.Module):
    """Stand-in for FluxTransformer2DModel: linear layers under transformer_blocks / single_transformer_blocks."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.to_q, block.attn.to_out = nn.Linear(16, 16), nn.ModuleList([nn.Linear(16, 16)])
        single = nn.Module()
        single.proj_out = nn.Linear(16, 16)
        self.transformer_blocks = nn.ModuleList([block])
        self.single_transformer_blocks = nn.ModuleList([single])
        self.x_embedder = nn.Linear(16, 16)  # not targeted

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()


def _readme_api_block() -> str:
    match = re.search(r"## API\n\n```python\n(.*?)```", README, re.S)
    assert match, "README.md has no ```python block right after '## API'"
    return match.group(1)


def test_the_readme_api_block_runs_as_written(tmp_path, monkeypatch):
    """The README's API block, executed as written with tiny stand-ins for its free names (x, weight, ..., query) and
    for FluxTransformer2DModel.from_pretrained (nothing downloads); the AnalogyEncoder lines at its end need a hub
    model and are left out (tests/test_readme.py binds their signatures)."""
    block = _readme_api_block()
    flux_at = block.index("# A whole FLUX.1-Kontext transformer")
    encoder_at = block.index("from lorweb_fast import flux")
    import_line = "from diffusers import FluxTransformer2DModel\n"
    assert import_line in block[flux_at:encoder_at]
    source = block[:encoder_at].replace(import_line, "")
    torch.manual_seed(0)
    batch, seq, out, n, r = 2, 3, 16, 32, 4
    ns = {"x": torch.randn(batch, seq, 3072), "weight": torch.randn(out, 3072), "bias": torch.randn(out),
          "lora_a": torch.randn(n, 3072, r) * 0.01, "lora_b": torch.randn(n, r, out), "coeffs": torch.rand(batch, n),
          "base_out": torch.randn(batch, seq, out), "query": torch.randn(batch, 2304),
          "to_q_weight": torch.randn(128, 2304) * 0.01, "keys": torch.randn(n, 128),
          "FluxTransformer2DModel": _TinyFlux, "model_dir": str(tmp_path / "unused"), "fresh_transformer": _TinyFlux()}
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "README.md (API block)", "exec"), ns)
    assert tuple(ns["y"].shape) == (batch, seq, out) and tuple(ns["d"].shape) == (batch, seq, out)
    assert tuple(ns["c"].shape) == (batch, n) and ns["c"].dtype == torch.float32  # "# (B, N)"
    assert tuple(ns["out"].shape) == (batch, seq, 3072)
    assert set(lf.backend_status()) == set(lf.BACKENDS)  # '{"torch": ..., "triton": ..., "cuda": ...}'
    assert ns["names"] == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                           "single_transformer_blocks.0.proj_out"]
    assert not ns["transformer"].x_embedder.weight.requires_grad  # "every other parameter stops requiring grad"
    coeffs = lf.get_coefficients(ns["transformer"])
    assert {k: tuple(v.shape) for k, v in coeffs.items()} == {name: (1, n) for name in ns["names"]}
    assert sorted(lf.lorweb_layers(ns["fresh_transformer"])) == sorted(ns["names"])
    assert (tmp_path / "lorweb.safetensors").is_file() and (tmp_path / "coefficients.png").is_file()
