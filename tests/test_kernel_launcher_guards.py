"""Host-side logic of the Triton launchers (kernels/mixed_lora.py) that runs without launching a kernel: table
validation and lookup, route choice, TMA predicates, chunking, packing, argument checks, and the grids, roles and
arguments the launchers pass to ``_launch`` (recorded on meta tensors). The cuBLAS route and the composed route's
torch half run on CPU against the float64 reference."""

import copy
import json
import re
import types

import pytest
import torch

pytest.importorskip("triton")

from lorweb_fast import reference  # noqa: E402
from lorweb_fast.kernels import mixed_lora as K  # noqa: E402
from lorweb_fast.testing import assert_within_bound, random_problem  # noqa: E402

META = dict(device="meta", dtype=torch.float32)
SHRINK = dict(block_m=16, block_k=16, split_k=1, tma=0, num_warps=4, num_stages=2)
EXPAND = dict(block_m=16, block_n=16, block_k=16, group_m=8, tma=0, num_warps=4, num_stages=2)
GRAD = dict(block_m=16, block_n=16, split_m=2, num_warps=4, num_stages=2)


def _good_table():
    return copy.deepcopy(json.loads(K.config_path("default").read_text()))


def _entry(table, **keys):
    """An exact entry built from the table's first default rule."""
    rule = {k: copy.deepcopy(v) for k, v in table["defaults"][0].items() if k not in ("dtypes", "max_R")}
    return {**rule, **keys}


def _record(monkeypatch):
    """Replace ``_launch`` by a recorder of (kernel name, grid, args, kwargs)."""
    launched = []

    def launch(kernel, grid, *args, **kwargs):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        launched.append(types.SimpleNamespace(name=name, grid=grid, args=args, kw=kwargs))

    monkeypatch.setattr(K, "_launch", launch)
    return launched


# ------------------------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("kernel, cfg, message", [
    ("shrnk", dict(SHRINK), "unknown kernel 'shrnk'"),
    ("shrink", [16, 16], "must be an object, got list"),
    ("shrink", {**SHRINK, "block_n": 16}, "unknown keys ['block_n']"),
    ("shrink", {**SHRINK, "tma": True}, "tma must be 0 or 1, got True"),
    ("shrink", {**SHRINK, "tma": 2}, "tma must be 0 or 1, got 2"),
    ("shrink", {**SHRINK, "block_m": 8}, "block sizes must be >= 16"),
    ("shrink", {**SHRINK, "block_k": 8}, "block sizes must be >= 16"),
    ("expand", {**EXPAND, "block_n": 8}, "block sizes must be >= 16"),
    ("shrink", {**SHRINK, "split_k": True}, "split_k must be a positive integer, got True"),
    ("shrink", {**SHRINK, "num_stages": 0}, "num_stages must be a positive integer, got 0"),
    ("shrink", {**SHRINK, "split_k": 2.0}, "split_k must be a positive integer, got 2.0"),
    ("shrink", {**SHRINK, "num_warps": 0}, "num_warps must be a positive integer, got 0"),
    ("shrink", {**SHRINK, "num_warps": True}, "num_warps must be a positive integer, got True"),
    ("shrink", {**SHRINK, "num_warps": 3}, "num_warps must be a power of two, got 3"),
])
def test_kernel_config_rejections(kernel, cfg, message):
    """Each rule of validate_kernel_config: known kernel, an object, exactly the role's keys, tma a 0/1 int (not a
    bool), blocks >= 16, counts positive ints (bools refused), num_warps a positive power of two."""
    with pytest.raises(K.ConfigError, match=re.escape(message)):
        K.validate_kernel_config(kernel, cfg, "cfg")


def test_kernel_config_accepts_the_smallest_tiles_and_returns_a_copy():
    """16 is the smallest block (the tensor-core dot minimum) and 1 a valid count; the result is a copy."""
    cfg = {**SHRINK, "num_warps": 1, "num_stages": 1}
    out = K.validate_kernel_config("shrink", cfg, "cfg")
    assert out == cfg and out is not cfg
    assert K.validate_kernel_config("grad_basis", dict(GRAD), "g") == GRAD


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t["defaults"].__setitem__(0, ["route"]), "defaults[0] must be an object, got list"),
    (lambda t: t["defaults"][0].update(route="cublas"), "route must be 'fused' or 'composed', got 'cublas'"),
    (lambda t: t["defaults"][0].update(dtypes=[]), "dtype(s) must be among"),
    (lambda t: t["defaults"][0].update(dtypes=("float32",)), "dtype(s) must be among"),
    (lambda t: t["defaults"][0].update(dtypes="float32"), "dtype(s) must be among"),
    (lambda t: t["defaults"][0].update(max_R=0), "max_R must be a positive integer, got 0"),
    (lambda t: t["entries"].append(_entry(t, **{"in": 8, "out": 8, "R": 0, "dtype": "float32"})),
     "entries[0].R must be a positive integer, got 0"),
    (lambda t: t["entries"].append(_entry(t, **{"in": 8, "out": 8, "R": 8, "dtype": "float64"})),
     "dtype(s) must be among"),
    (lambda t: t["entries"].append(_entry(t, **{"in": 8, "out": True, "R": 8, "dtype": "float32"})),
     "entries[0].out must be a positive integer"),
    (lambda t: t.__setitem__("tuned", "no"), "'tuned' must be true or false"),
    (lambda t: t.pop("family"), "missing top-level key 'family'"),
    (lambda t: t.pop("note"), "missing top-level key 'note'"),
    (lambda t: t.__setitem__("defaults", []), "'defaults' must be a non-empty list of rules"),
    (lambda t: t.__setitem__("entries", {}), "'entries' must be a list"),
    (lambda t: [t["defaults"].remove(r) for r in list(t["defaults"]) if r["dtypes"] == ["float32"]
                and r["max_R"] > 128], "no default rule covers dtype float32 up to R = 256"),
    (lambda t: t["defaults"].append(dict(t["defaults"][0])), "defaults[4] is never used: earlier rules already cover"),
    (lambda t: t["entries"].extend([_entry(t, **{"in": 8, "out": 8, "R": 8, "dtype": "float32"})] * 2),
     "entries[1] repeats the key (in, out, R, dtype) = (8, 8, 8, 'float32') of entries[0]"),
    (lambda t: t["entries"].append(_entry(t, **{"in": 8, "out": 8, "R": 260, "dtype": "float32"})),
     "entries[0] has R = 260 > MAX_FUSED_R = 256"),
])
def test_table_rejections(corrupt, message):
    """Each rule of _validate_rule / validate_table refuses its own corruption with its own message."""
    table = _good_table()
    corrupt(table)
    with pytest.raises(K.ConfigError, match=re.escape(message)):
        K.validate_table(table, "t.json")


def test_table_validation_accepts_edge_values_and_rejects_non_objects():
    """max_R exactly MAX_FUSED_R covers the dtype; a non-object table is refused by name; the backward-roles hint
    appears only when those roles are what is missing."""
    table = _good_table()
    assert max(r["max_R"] for r in table["defaults"]) == K.MAX_FUSED_R
    assert K.validate_table(table, "t.json")["defaults"][0]["route"] == "fused"
    with pytest.raises(K.ConfigError, match="the table must be a JSON object, got list"):
        K.validate_table([], "t.json")
    del table["defaults"][0]["grad_basis"]
    with pytest.raises(K.ConfigError, match=r"missing keys \['grad_basis'\], unknown keys \[\]$"):
        K.validate_table(table, "t.json")


# ------------------------------------------------------------------------------------------- lookup and routes
def _lookup_table():
    table = _good_table()
    table["entries"] = [
        _entry(table, **{"in": 64, "out": 48, "R": 8, "dtype": "bfloat16", "route": "composed"}),
        _entry(table, **{"in": 64, "out": 32, "R": 8, "dtype": "bfloat16", "route": "fused"}),
    ]
    table["entries"][1]["shrink"]["block_m"] = 16
    return K.validate_table(table, "lookup.json")


def test_exact_entries_match_on_all_four_keys():
    """An entry applies only on (in, out, R, dtype) all equal; anything else falls to the defaults."""
    table = _lookup_table()
    assert K.lookup_in(table, 64, 48, 8, torch.bfloat16)["route"] == "composed"
    assert K.lookup_in(table, 64, 32, 8, torch.bfloat16)["shrink"]["block_m"] == 16
    default = table["defaults"][0]
    for key in [(64, 48, 8, torch.float16), (64, 48, 16, torch.bfloat16), (64, 40, 8, torch.bfloat16),
                (48, 64, 8, torch.bfloat16)]:
        assert K.lookup_in(table, *key) is default, key


def test_defaults_are_first_match_by_dtype_and_max_R():
    """The first default whose dtypes hold the dtype and whose max_R >= R (inclusive) applies; none: ConfigError."""
    table = K.load_table("default")
    d = table["defaults"]
    assert [(r["dtypes"], r["max_R"]) for r in d] == [(["bfloat16", "float16"], 128), (["bfloat16", "float16"], 256),
                                                      (["float32"], 128), (["float32"], 256)]
    assert K.lookup(64, 64, 128, torch.bfloat16) is d[0]
    assert K.lookup(64, 64, 129, torch.float16) is d[1]
    assert K.lookup(64, 64, 256, torch.bfloat16) is d[1]
    assert K.lookup(64, 64, 1, torch.float32) is d[2]
    assert K.lookup(64, 64, 129, torch.float32) is d[3]
    with pytest.raises(K.ConfigError, match="kernel table 'default' has no rule for dtype bfloat16, R = 257"):
        K.lookup(64, 64, 257, torch.bfloat16)
    with pytest.raises(K.ConfigError, match="kernel table 'given' has no rule"):
        K.lookup_in(table, 64, 64, 257, torch.float32)


def test_choose_route_boundaries_and_family(monkeypatch):
    """cuBLAS for rows_per_sample == 1, R > MAX_FUSED_R (256 itself is fused) and non-power-of-two ranks; otherwise
    the route of the named family's table."""
    assert K.choose_route(64, 64, 16, torch.float32, 1) == "cublas"
    assert K.choose_route(64, 64, 16, torch.float32, 2) == "fused"
    assert K.choose_route(64, 64, K.MAX_FUSED_R, torch.float32, 2, rank=4) == "fused"
    assert K.choose_route(64, 64, K.MAX_FUSED_R + 4, torch.float32, 2, rank=4) == "cublas"
    assert K.choose_route(64, 64, 12, torch.float32, 2, rank=3) == "cublas"
    assert K.choose_route(64, 64, 12, torch.float32, 2, rank=1) == "fused"
    composed = _good_table()
    for rule in composed["defaults"]:
        rule["route"] = "composed"
    tables = {"default": K.load_table("default"), "comp": K.validate_table(composed, "comp.json")}
    monkeypatch.setattr(K, "load_table", lambda family: tables[family])
    assert K.choose_route(64, 64, 16, torch.float32, 2, family="comp") == "composed"
    assert K.choose_route(64, 64, 16, torch.float32, 2) == "fused"


def test_kernel_config_is_keyed_by_in_then_out(monkeypatch):
    """kernel_config looks the rule up under (in, out) in that order; an empty override returns the table's dict."""
    table = _lookup_table()
    monkeypatch.setattr(K, "load_table", lambda family: table)
    assert K.kernel_config("shrink", 64, 32, 8, torch.bfloat16, "x")["block_m"] == 16
    assert K.kernel_config("shrink", 32, 64, 8, torch.bfloat16, "x")["block_m"] == table["defaults"][0]["shrink"][
        "block_m"]
    assert K.kernel_config("shrink", 64, 32, 8, torch.bfloat16, "x", {}) is table["entries"][1]["shrink"]
    assert K.kernel_config("shrink", 64, 32, 8, torch.bfloat16, "x", {"split_k": 4})["split_k"] == 4
    with pytest.raises(K.ConfigError, match=re.escape("shrink config.block_k must be a power of two, got 48")):
        K.kernel_config("shrink", 64, 32, 8, torch.bfloat16, "x", {"block_k": 48})


# ------------------------------------------------------------------------------------------------- small helpers
def test_cdiv_dot_mode_and_r_chunks(monkeypatch):
    """_cdiv is the ceiling; dot modes: fp32 IEEE (1), bf16 upcast (2) only under the interpreter, fp16 native (0);
    r_chunks: power-of-two chunks >= 16, no second chunk when R is a power of two."""
    assert [K._cdiv(a, 16) for a in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    monkeypatch.setattr(K, "interpreting", lambda: False)
    assert [K.dot_mode(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [1, 0, 0]
    monkeypatch.setattr(K, "interpreting", lambda: True)
    assert [K.dot_mode(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [1, 2, 0]
    chunks = {R: K.r_chunks(R) for R in (1, 8, 16, 17, 20, 32, 40, 56, 96, 112, 128, 130, 160, 200, 256)}
    # a remainder that is not a power of two (40 = 32 + 8, 130 = 128 + 2) is rounded up to one; one that rounds up
    # to the first chunk (17 = 16 + 1, 56 = 32 + 24, 112 = 64 + 48, 200 = 128 + 72) makes one chunk of twice its size
    # (two 128-wide chunks spilled registers)
    assert chunks == {1: (16, 0), 8: (16, 0), 16: (16, 0), 17: (32, 0), 20: (32, 0), 32: (32, 0), 40: (32, 16),
                      56: (64, 0), 96: (64, 32), 112: (128, 0), 128: (128, 0), 130: (128, 16), 160: (128, 32),
                      200: (256, 0), 256: (256, 0)}
    for bad in (0, -4):
        with pytest.raises(ValueError, match="R must be >= 1"):
            K.r_chunks(bad)


def test_tma_device(monkeypatch):
    """sm80 never, sm90 always; otherwise a CUDA tensor's capability (major >= 9) or, off-GPU, the interpreter."""
    cpu = torch.empty(1)
    monkeypatch.setattr(K, "interpreting", lambda: True)
    assert not K._tma_device(cpu, "sm80") and K._tma_device(cpu, "sm90") and K._tma_device(cpu, "default")
    monkeypatch.setattr(K, "interpreting", lambda: False)
    assert K._tma_device(cpu, "sm90") and not K._tma_device(cpu, "default")
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    for cap, want in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert K._tma_device(gpu, "default") is want, cap


def test_tma_aligned():
    """Positive shape, unit column stride, non-overlapping rows, 16-byte row stride and base offset."""
    assert K._tma_aligned(torch.empty(4, 16))  # row stride == row length
    assert K._tma_aligned(torch.empty(4, 32)[:, :16])  # padded rows
    assert not K._tma_aligned(torch.empty(0, 16)) and not K._tma_aligned(torch.empty(4, 16)[:, :0])
    assert not K._tma_aligned(torch.empty(16, 4).t()) and not K._tma_aligned(torch.empty(4, 32)[:, ::2])  # strided
    assert not K._tma_aligned(torch.empty(64).as_strided((4, 16), (8, 1)))  # overlapping rows, 32-byte stride
    assert not K._tma_aligned(torch.empty(4, 2))  # 8-byte rows
    assert not K._tma_aligned(torch.empty(4, 12, dtype=torch.bfloat16))  # 24-byte rows
    assert not K._tma_aligned(torch.empty(4 * 16 + 1, dtype=torch.bfloat16)[1:].view(4, 16))  # 2-byte offset
    assert K._tma_aligned(torch.empty(4 * 16 + 8, dtype=torch.bfloat16)[8:].view(4, 16))  # 16-byte offset


def test_tma_usable():
    """Both operands aligned and both chunk heights <= 256 (the TMA box limit)."""
    x, a = torch.empty(8, 64), torch.empty(256, 64)
    assert K.tma_usable(x, a, 256, 0, "sm90")
    assert not K.tma_usable(x, a, 16, 512, "sm90") and not K.tma_usable(x, a, 512, 0, "sm90")
    assert not K.tma_usable(x, torch.empty(16, 66)[:, :64][:, 1:], 16, 0, "sm90")
    assert not K.tma_usable(x, a.t().contiguous().t(), 16, 0, "sm90")
    assert not K.tma_usable(x, a, 16, 0, "sm80")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # traced (torch.compile): never TMA
        assert not K.tma_usable(mode.from_tensor(x), mode.from_tensor(a), 16, 0, "sm90")


# ------------------------------------------------------------------------------------------ checks and packing
def test_check_and_pack_basis():
    """_check refuses non-tensors, a wrong rank and unsupported dtypes; pack_basis lays out row n*r + j = LoRA n,
    slot j and checks lora_b's (N, r); unpack_basis_grads is its inverse."""
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        K._check([1.0], "x", 2)
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(3,\)"):
        K._check(torch.empty(3), "x", 2)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        K._check(torch.empty(3, 3, dtype=torch.float64), "x", 2)
    lora_a, lora_b = torch.randn(3, 5, 2), torch.randn(3, 2, 7)
    with pytest.raises(ValueError, match=r"lora_b must be \(N, r, out\) = \(3, 2, out\)"):
        K.pack_basis(lora_a, torch.randn(3, 4, 7))
    a_cat, b_cat = K.pack_basis(lora_a, lora_b)
    assert a_cat.shape == (6, 5) and b_cat.shape == (6, 7) and a_cat.is_contiguous() and b_cat.is_contiguous()
    for n in range(3):
        for j in range(2):
            assert torch.equal(a_cat[n * 2 + j], lora_a[n, :, j]) and torch.equal(b_cat[n * 2 + j], lora_b[n, j])
    d_a, d_b = K.unpack_basis_grads(a_cat, b_cat, 3)
    assert torch.equal(d_a, lora_a) and torch.equal(d_b, lora_b)


def test_scaling_maps_rows_to_samples_and_columns_to_loras():
    """_scaling[m, c] = scale * coeffs[m // rows_per_sample, c // rank]."""
    coeffs = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    s = K._scaling(coeffs, 2, 2, 0.5)
    want = torch.tensor([[0.5 * coeffs[m // 2, c // 2].item() for c in range(6)] for m in range(4)])
    assert s.dtype == torch.float32 and torch.equal(s, want)


# ------------------------------------------------------------------------------------------------ shrink checks
def _shrink_args(M=8, K_=32, R=8, B=2, rank=4):
    return torch.empty(M, K_, **META), torch.empty(R, K_, **META), torch.empty(B, R // rank, **META)


@pytest.mark.parametrize("change, error, message", [
    (dict(a_cat=torch.empty(8, 16, **META)), ValueError, "x has 32 columns but a_cat"),
    (dict(a_cat=torch.empty(8, 32, device="meta", dtype=torch.bfloat16)), TypeError, "a_cat has dtype"),
    (dict(coeffs=torch.empty(2, 2, device="meta", dtype=torch.float16)), TypeError, "coeffs must be (B, N) float32"),
    (dict(coeffs=torch.empty(4, **META)), TypeError, "coeffs must be (B, N) float32"),
    (dict(a_cat=torch.empty(10, 32, **META), coeffs=torch.empty(2, 2, **META)), ValueError, "R = 10 rows"),
    (dict(coeffs=torch.empty(2, 4, **META)), ValueError, "R = 8 rows, which is not N * rank = 4 * 4"),
    (dict(rank=0), ValueError, "which is not N * rank"),
    (dict(a_cat=torch.empty(6, 32, **META), coeffs=torch.empty(2, 2, **META), rank=3), ValueError,
     "power-of-two LoRA rank, got r = 3"),
    (dict(a_cat=torch.empty(260, 32, **META), coeffs=torch.empty(2, 65, **META)), ValueError, "R = 260 > 256"),
    (dict(rows_per_sample=3), ValueError, "x has 8 rows but coeffs (2, 2) x rows_per_sample 3 = 6"),
    (dict(rows_per_sample=5), ValueError, "x has 8 rows but coeffs (2, 2) x rows_per_sample 5 = 10"),
    (dict(u_in=torch.empty(8, 4, **META)), ValueError, "u_in must be (8, 8), got (8, 4)"),
])
def test_shrink_argument_checks(change, error, message, monkeypatch):
    """Each argument check of shrink raises its own error before anything is launched."""
    launched = _record(monkeypatch)
    x, a_cat, coeffs = _shrink_args()
    args = dict(x=x, a_cat=a_cat, coeffs=coeffs, scale=0.5, rows_per_sample=4, rank=4)
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        K.shrink(**args, config=SHRINK)
    assert not launched


def test_shrink_grid_dcoeffs_grouping_and_tma_choice(monkeypatch):
    """Grid (cdiv(M, block_m), split_k); dcoeffs partials per program of block_m rows (split-K: the finish kernel's
    SHRINK_FINISH_BLOCK_M) only when that divides rows_per_sample, else per row; a TMA-capable case takes the TMA
    kernel only when the tile dict's tma flag is set; coeffs reach the kernel dense."""
    launched = _record(monkeypatch)
    M, R = 96, 8
    x, a_cat = torch.empty(M, 64), torch.empty(R, 64)
    coeffs = torch.rand(2, 2).t().contiguous().t()  # (2, 2), column-major
    u = torch.empty(M, R)
    cfg = {**SHRINK, "block_m": 32, "block_k": 64}
    K.shrink(x, a_cat, coeffs, 0.5, 48, 4, config=cfg, family="sm90")
    (launch,) = launched
    assert launch.name == "_shrink_kernel" and launch.grid == (3, 1)
    assert launch.args[2].stride() == (2, 1) and torch.equal(launch.args[2], coeffs)
    launched.clear()
    _, _, dc = K.shrink(x, a_cat, coeffs, 0.5, 48, 4, u_in=u, config={**cfg, "block_m": 16}, family="sm90")
    assert dc.shape == (M // 16, 2) and launched[0].kw["DCOEFFS"] == K.DC_PER_BLOCK.value
    _, _, dc = K.shrink(x, a_cat, coeffs, 0.5, 48, 4, u_in=u, config=cfg, family="sm90")  # 32 does not divide 48
    assert dc.shape == (M, 2) and launched[1].kw["DCOEFFS"] == K.DC_PER_ROW.value
    launched.clear()
    coeffs3 = torch.rand(3, 2)
    _, _, dc = K.shrink(x, a_cat, coeffs3, 0.5, 32, 4, u_in=u, config={**cfg, "block_m": 16, "split_k": 2},
                        family="sm90")
    assert dc.shape == (M // K.SHRINK_FINISH_BLOCK_M, 2)
    assert [(l.name, l.grid) for l in launched] == [("_shrink_kernel", (6, 2)), ("_shrink_finish_kernel", (3,))]
    launched.clear()
    K.shrink(x, a_cat, coeffs, 0.5, 48, 4, config={**cfg, "tma": 1}, family="sm90")
    assert launched[0].name == "_shrink_tma_kernel"


# ------------------------------------------------------------------------------------------------ expand checks
@pytest.mark.parametrize("change, message", [
    (dict(b_cat=torch.empty(4, 24, **META)), "z has 8 columns but b_cat has 4 rows"),
    (dict(z=torch.empty(10, 260, **META), b_cat=torch.empty(260, 24, **META)), "R = 260 > 256"),
    (dict(weight=None), "x was given without weight"),
    (dict(weight=torch.empty(32, 24, **META)), "weight has shape (32, 24), expected (24, 32)"),
    (dict(weight_layout="in_out"), "weight has shape (24, 32), expected (32, 24)"),
    (dict(weight_layout="oi"), "weight_layout must be 'out_in' or 'in_out', got 'oi'"),
    (dict(x=torch.empty(11, 32, **META)), "x has 11 rows but z has 10"),
    (dict(out=torch.empty(24, 10, **META).t()), "out must be (10, 24) with unit column stride"),
    (dict(out=torch.empty(10, 25, **META)), "out must be (10, 24) with unit column stride"),
    (dict(base=torch.empty(10, 23, **META)), "base must be (10, 24), got (10, 23)"),
    (dict(bias=torch.empty(23, **META)), "bias must be (24,), got (23,)"),
    (dict(x=torch.empty(10, 2 ** 16, **META), weight=torch.empty(2 ** 15, 2 ** 16, **META),
          b_cat=torch.empty(8, 2 ** 15, **META)), "weight has 2147483648 >= 2**31 elements"),
])
def test_expand_argument_checks(change, message, monkeypatch):
    """Each argument check of expand (shapes, layout, out/base/bias, the 32-bit weight limit) raises before launch."""
    launched = _record(monkeypatch)
    args = dict(x=torch.empty(10, 32, **META), weight=torch.empty(24, 32, **META), z=torch.empty(10, 8, **META),
                b_cat=torch.empty(8, 24, **META))
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        K.expand(**args, config=EXPAND)
    assert not launched


def test_expand_grid_roles_and_tma_choice(monkeypatch):
    """Pointer grid cdiv(M, block_m) * cdiv(out, block_n); the delta-only expand is keyed (out, out); the TMA kernel
    needs the tma flag, blocks <= 256 and every operand (the weight too) aligned; its weight block is (block_k,
    block_n) for weight_layout='in_out' and (block_n, block_k) otherwise."""
    launched = _record(monkeypatch)
    x, w, z, b = torch.randn(40, 64), torch.randn(48, 64), torch.randn(40, 16), torch.randn(16, 48)
    K.expand(x, w, z, b, config={**EXPAND, "block_m": 32, "block_n": 16})
    assert launched[-1].name == "_expand_kernel" and launched[-1].grid == (2 * 3,)
    table = _good_table()
    table["entries"] = [_entry(table, **{"in": 48, "out": 48, "R": 16, "dtype": "float32"})]
    table["entries"][0]["expand"]["block_m"] = 256
    table = K.validate_table(table, "delta.json")
    monkeypatch.setattr(K, "load_table", lambda family: table)
    K.expand(None, None, z, b, family="delta")
    assert launched[-1].kw["BLOCK_M"] == 256
    tma = {**EXPAND, "tma": 1, "block_n": 256}
    K.expand(x, w, z, b, config=tma, family="sm90")
    assert launched[-1].name == "_expand_tma_kernel" and launched[-1].args[1].block_shape == [256, 16]
    K.expand(x, w.t().contiguous(), z, b, weight_layout="in_out", config=tma, family="sm90")
    assert launched[-1].name == "_expand_tma_kernel" and launched[-1].args[1].block_shape == [16, 256]
    K.expand(x, w, z, b, config={**tma, "tma": 0}, family="sm90")
    assert launched[-1].name == "_expand_kernel"
    K.expand(x, torch.randn(48, 66)[:, 1:65], z, b, config=tma, family="sm90")  # 4-byte weight offset
    assert launched[-1].name == "_expand_kernel"
    K.expand(x, w, z, b, config={**tma, "block_n": 512}, family="sm90")
    assert launched[-1].name == "_expand_kernel"


# -------------------------------------------------------------------------------------------- grad_basis checks
@pytest.mark.parametrize("change, message", [
    (dict(dz_scaled=torch.empty(12, 4, **META)), "must share M"),
    (dict(x=torch.empty(11, 32, **META)), "must share M"),
    (dict(dy=torch.empty(11, 24, **META)), "must share M"),
    (dict(rank=3), "R = 8 columns are not a whole number of rank-3 LoRAs"),
    (dict(rank=0), "R = 8 columns are not a whole number of rank-0 LoRAs"),
])
def test_grad_basis_argument_checks(change, message, monkeypatch):
    """grad_basis refuses a different M in any operand and an R that is not a multiple of the rank."""
    launched = _record(monkeypatch)
    args = dict(dz_scaled=torch.empty(12, 8, **META), x=torch.empty(12, 32, **META), z=torch.empty(12, 8, **META),
                dy=torch.empty(12, 24, **META), rank=4)
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        K.grad_basis(**args, config=GRAD)
    assert not launched


def test_grad_basis_partials_offset_limit(monkeypatch):
    """split_m * (in + out) * (R0 + R1) partials must stay below 2**31 (32-bit offsets): exactly 2**31 is refused,
    one slice less is accepted."""
    launched = _record(monkeypatch)
    half = 2 ** 22
    x, dy = torch.empty(4, half, **META), torch.empty(4, half, **META)
    z = torch.empty(4, 16, **META)
    with pytest.raises(ValueError, match="overflow 32-bit offsets"):
        K.grad_basis(z, x, z, dy, 4, config={**GRAD, "split_m": 16})
    assert not launched
    K.grad_basis(z, x, z, dy, 4, config={**GRAD, "split_m": 15})
    assert [l.name for l in launched] == ["_grad_basis_kernel", "_grad_basis_finish_kernel"]


def test_grad_basis_grid_and_finish_blocks(monkeypatch):
    """Grid (cdiv(in, block_n) + cdiv(out, block_n), split_m); each slice a whole number of block_m rows; the finish
    kernel's block is the largest power of two of rows with BLOCK_ROWS * (R0 + R1) <= FINISH_ELEMENTS; it is keyed
    by the layer's (in, out)."""
    launched = _record(monkeypatch)
    M, R, rank = 100, 96, 4
    x, dy, z = torch.empty(M, 40, **META), torch.empty(M, 40, **META), torch.empty(M, R, **META)
    d_a, d_b = K.grad_basis(z, x, z, dy, rank, config={**GRAD, "block_n": 32, "split_m": 3})
    assert d_a.shape == (24, 40, 4) and d_b.shape == (24, 4, 40)
    main, finish = launched
    assert main.grid == (2 + 2, 3) and main.args[8] == 48  # cdiv(cdiv(100, 3), 16) * 16
    assert finish.kw["BLOCK_ROWS"] == 64 and finish.grid == (K._cdiv(80, 64),)
    launched.clear()
    K.grad_basis(torch.empty(M, 16, **META), x, torch.empty(M, 16, **META), dy, 4, config=GRAD)
    assert launched[1].kw["BLOCK_ROWS"] == 512
    table = _good_table()
    layer = _entry(table, **{"in": 40, "out": 24, "R": 16, "dtype": "float32"})
    layer["grad_basis"]["block_m"] = 128
    table["entries"] = [layer, {**copy.deepcopy(layer), "in": 24, "out": 40}]
    table["entries"][1]["grad_basis"]["block_m"] = 256
    table = K.validate_table(table, "gb.json")
    monkeypatch.setattr(K, "load_table", lambda family: table)
    launched.clear()
    K.grad_basis(torch.empty(M, 16, **META), x, torch.empty(M, 16, **META), torch.empty(M, 24, **META), 4,
                 family="gb")
    assert launched[0].kw["BLOCK_M"] == 128


# ------------------------------------------------------------------------------- forward / backward on CPU
def _torch_shrink(x, a_cat, coeffs, scale, rows_per_sample, rank, *, write_unscaled=True, u_in=None, config=None,
                  out_features=None, family=None):
    """The shrink's contract in torch (per-row dcoeffs partials), standing in for the kernel on CPU."""
    acc = x.double() @ a_cat.double().t()
    s = coeffs.double().repeat_interleave(rank, 1).repeat_interleave(rows_per_sample, 0) * scale
    z = (acc * s).to(x.dtype)
    if u_in is not None:
        return None, z, ((u_in.double() * acc).view(x.shape[0], -1, rank).sum(2) * scale).float()
    return acc.to(x.dtype), z


def _reference(p, rows, with_weight=True, base=None, absolute=False):
    """y and the gradients of sum(y * dy) from the float64 reference. ``absolute``: the same sums of products over
    |inputs| (and |dy|), i.e. each result's sum of the absolute values of its terms, the scale of its rounding error
    (every result here is multilinear in the inputs)."""
    mag = torch.abs if absolute else (lambda t: t)
    B = p["coeffs"].shape[0]
    leaves = {k: mag(p[k].double()).requires_grad_(True) for k in ("x", "lora_a", "lora_b", "coeffs")}
    x3 = leaves["x"].view(B, rows, -1)
    delta = reference.mixed_lora_delta(x3, leaves["lora_a"], leaves["lora_b"], leaves["coeffs"], abs(p["scale"])
                                       if absolute else p["scale"])
    y = delta.reshape(B * rows, -1)
    if with_weight:
        y = y + leaves["x"] @ mag(p["weight"].double()).t() + mag(p["bias"].double())
    if base is not None:
        y = y + mag(base.double())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((y * mag(dy)).sum(), [leaves[k] for k in ("x", "lora_a", "lora_b", "coeffs")])
    return y.detach(), dy.float(), grads


def _close(got, want, want_abs, what, depth):
    """|got - want| <= tolerance(fp32, depth) * want_abs entry by entry (lorweb_fast.testing's dtype-derived bound;
    ``depth``: the longest sum behind an entry)."""
    assert_within_bound(what, got, want, want_abs, torch.float32, depth)


@pytest.mark.parametrize("route, rows, rank", [("cublas", 1, 4), ("cublas", 3, 3), ("composed", 3, 4)])
def test_cpu_routes_forward_and_backward_against_float64(route, rows, rank, monkeypatch):
    """The all-torch cuBLAS route (rows_per_sample == 1, odd rank) and the composed route's addmm half (with the
    shrink in torch) give y, dx, d_lora_a, d_lora_b and d_coeffs of the float64 reference, bias and base included."""
    if route == "composed":
        monkeypatch.setattr(K, "choose_route", lambda *a, **k: "composed")
        monkeypatch.setattr(K, "shrink", _torch_shrink)
    B = 2
    p = random_problem(B * rows, None, 20, 12, 3, rank, torch.float32, seed=7)
    p["coeffs"] = p["coeffs"][:B].contiguous()
    base = torch.randn(B * rows, 12)
    y_ref, dy, (dx_ref, da_ref, db_ref, dc_ref) = _reference(p, rows, base=base)
    y_abs, _, grads_abs = _reference(p, rows, base=base, absolute=True)
    depth = 2 * (20 + 12 + B * rows + 3 * rank)  # longer than any sum behind an entry (in, out, M, R)
    y, u, z = K.forward(p["x"], p["weight"], p["bias"], base, p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], rows,
                        family="default")
    _close(y, y_ref, y_abs, "y", depth)
    dx, da, db, dc = K.backward(dy, p["x"], p["weight"], p["lora_a"], p["lora_b"], p["coeffs"], u, z, p["scale"],
                                rows, family="default")
    for got, want, want_abs, name in zip((dx, da, db, dc), (dx_ref, da_ref, db_ref, dc_ref), grads_abs,
                                         ("dx", "d_lora_a", "d_lora_b", "d_coeffs")):
        _close(got, want, want_abs, name, depth)
    dx, da, db, _ = K.backward(dy, p["x"], None, p["lora_a"], p["lora_b"], p["coeffs"], u, z, p["scale"], rows,
                               need_dbasis=False, family="default")
    _, _, (dx_delta, _, _, _) = _reference(p, rows, with_weight=False)
    _, _, (dx_delta_abs, _, _, _) = _reference(p, rows, with_weight=False, absolute=True)
    _close(dx, dx_delta, dx_delta_abs, "dx without weight", depth)
    assert da.shape == db.shape == (0,)


def test_cublas_route_with_an_empty_batch():
    """B = 0: the backward's per-sample d_coeffs sum has no rows to divide by (shape (0, N))."""
    p = random_problem(2, None, 8, 6, 3, 2, torch.float32, seed=1)
    x = torch.empty(0, 8)
    coeffs = torch.empty(0, 3)
    y, u, z = K.forward(x, p["weight"], None, None, p["lora_a"], p["lora_b"], coeffs, 1.0, 1, family="default")
    assert y.shape == (0, 6)
    _, _, _, dc = K.backward(torch.empty(0, 6), x, p["weight"], p["lora_a"], p["lora_b"], coeffs, u, z, 1.0, 1,
                             family="default")
    assert dc.shape == (0, 3)


def test_fused_forward_and_backward_launches(monkeypatch):
    """The fused route: a weightless layer launches the delta-only expand (x is not passed), the backward skips K2
    without need_dx and K3 without need_dbasis (empty results)."""
    launched = _record(monkeypatch)
    M, rows = 32, 16
    x, dy = torch.empty(M, 64, **META), torch.empty(M, 48, **META)
    lora_a, lora_b = torch.empty(2, 64, 4, **META), torch.empty(2, 4, 48, **META)
    coeffs = torch.empty(2, 2, **META)
    y, u, z = K.forward(x, None, None, None, lora_a, lora_b, coeffs, 0.5, rows, family="default")
    assert y.shape == (M, 48) and [l.name for l in launched] == ["_shrink_kernel", "_expand_kernel"]
    assert launched[1].kw["HAS_X1"] is False
    launched.clear()
    dx, da, db, dc = K.backward(dy, x, None, lora_a, lora_b, coeffs, u, z, 0.5, rows, need_dx=False,
                                need_dbasis=False, family="default")
    assert [l.name for l in launched] == ["_shrink_kernel"] and dx.shape == da.shape == db.shape == (0,)
    assert dc.shape == (2, 2)
    launched.clear()
    dx, _, _, _ = K.backward(dy, x, torch.empty(48, 64, **META), lora_a, lora_b, coeffs, u, z, 0.5, rows,
                             need_dbasis=False, family="default")  # K2: dy (M, out) @ weight (out, in)
    assert dx.shape == (M, 64) and launched[1].kw["HAS_X1"] is True


def test_eager_launches_pin_fp_fusion_and_traced_ones_leave_it_to_the_compiler(monkeypatch):
    """An eager launch passes ``enable_fp_fusion=FP_FUSION`` (True: Triton 3.10 turns its default off), next to the
    caller's options; a launch traced by torch.compile goes through ``wrap_triton`` without it (torch takes no
    compile options there but num_warps / num_stages)."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("eager", grid, args, kwargs))

    def wrap(kernel):
        class Wrapped:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append(("traced", grid, args, kwargs))
        return Wrapped()

    x = torch.ones(2)
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "wrap_triton", wrap)
    monkeypatch.setattr(K, "traced", lambda *args: False)
    K._launch(Kernel(), (3,), x, 5, BLOCK=16, num_warps=4)
    monkeypatch.setattr(K, "traced", lambda *args: True)
    K._launch(Kernel(), (3,), x, 5, BLOCK=16, num_warps=4)
    assert K.FP_FUSION is True
    assert calls == [("eager", (3,), (x, 5), {"enable_fp_fusion": True, "BLOCK": 16, "num_warps": 4}),
                     ("traced", (3,), (x, 5), {"BLOCK": 16, "num_warps": 4})]
