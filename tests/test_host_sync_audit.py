"""Host synchronisation and op-count audit of the hot paths, on CPU.

On a GPU every ``.item()``, ``bool(t)`` / ``if t:``, ``float(t)``, ``t.tolist()``, ``torch.equal``, ``nonzero()`` /
masked indexing (data-dependent shapes) and every blocking host->device copy (``cpu_tensor.to("cuda")`` without
``non_blocking=True``: a ``cudaStreamSynchronize`` after the copy) makes the host wait until the GPU has finished
everything queued so far: the pipeline drains and the GPU idles while the host queues the next kernels. The number
of ops dispatched is a proxy for the eager launch count (host overhead per step).

Method. ``Audit`` enters a ``TorchDispatchMode`` (every aten op that reaches a kernel, backward included) and a
``TorchFunctionMode`` (Python-level tensor methods, which see what dispatches no aten op on CPU) around one call, and
counts: ``ops`` (aten ops), ``kernels`` (aten ops that are not views or reshapes: the launches), ``syncs`` (the aten
ops that read device memory on the host: ``_local_scalar_dense``, behind ``item()`` / ``bool()`` / ``float()``,
``nonzero``, ``equal``, ``masked_select``, ``unique``..., and ``tolist`` / ``numpy``, which on CPU dispatch nothing
but on CUDA copy to the host), ``host_reads`` (``tolist`` / ``numpy`` at ``HOST_ONLY_SITES``, of tensors that live on
the host on any machine), ``blocking_to`` (``Tensor.to`` naming a device without ``non_blocking=True``: a blocking
copy on CUDA when the source is on the host) and ``cross_device`` (``_to_copy`` to another device). Each event is
attributed, from the Python stack, to the innermost frame outside torch (``owner``) and the innermost ``lorweb_fast``
frame (``site``), as ``file.py:function`` (no line numbers: the audit must survive edits). Models:
``testing.tiny_pair_model`` (two LoRWeB layers 6->5->4, N=3, r=2), a tiny ``FluxTransformer2DModel`` from
``testing.tiny_flux_config`` (1 double + 1 single block, 20 adapted linears, N=3, r=2, key_dim 8), the tiny
FLUX.1-Kontext pipeline of ``testing.tiny_lorweb_kontext_pipeline`` and the trainer on
``testing.tiny_training_assets``. The stock transformer / pipeline (no LoRWeB) is the baseline; a step of the pipeline
is measured between two ``callback_on_step_end`` calls, a training step between two ``step_callback`` calls (step 2 of
3: no checkpoint, no new epoch). Measured on this machine (CPU, torch 2.14.1, diffusers 0.42.1); on CPU the torch
backend runs (``backend=None`` resolves to it), so the fused backends' host code was read, not run (no syncs found in
``kernels/mixed_lora.py`` or ``csrc``).

| operation | syncs: stock / LoRWeB | aten ops (kernels): stock / LoRWeB | verdict |
|---|---|---|---|
| ``LoRWeBLinear`` forward, x (2, 7, 6), torch and default backend | - / 0 | 4 (1) / 22 (8) | ok |
| same, x (2, 6) | - / 0 | 2 (1) / 22 (8) | ok |
| 2 layers ``set_query`` (autograd) + fwd + bwd, training | - / 0 | - / 35 + 44 + 95 | ok |
| ``set_query``, ``check_finite=True``, one configuration group | - / 1 | - / 46 (22) | documented |
| ``set_query``, ``check_finite=False`` | - / 0 | - / 34 (10) | ok |
| ``set_query(per_forward=True)``, checked / unchecked | - / 1 / 0 | - / 8 / 1 | documented |
| per-forward layer forward (coefficients computed inside) | - / 0 | - / 50 (13) | ok (documented cost) |
| FLUX forward, B=1 (20 adapted layers) | 0 / 0 | 376 (203) / 742 (343) | ok: +7 kernels/layer |
| FLUX forward, B=2 different analogies | 0 / 0 | 378 (205) / 744 (345) | ok |
| FLUX forward+backward, training | 0 / 0 | - | ok |
| ``merged("full")`` FLUX forward | 0 / 0 | 376 (203) / 376 (203) | ok: the stock step |
| ``merged("jit")`` FLUX forward, B=1 | 0 / 0 | 376 (203) / 856 (363) | ok: +8 kernels/layer |
| ``merged("jit")`` FLUX forward, B=2 | 0 / **20** (1 per layer); fixed: 0 | 378 / 1010 | fixed (F1) |
| enter + exit a "full" / "offload" merge, B=2 same rows | - / **40** (2/layer); fixed: 1 | - / 660, 780 | fixed (F2) |
| ``check_fused_query`` (each call of a fused pipeline) | - / **20** (1 per layer); fixed: 1 | - / 762 | fixed (F3) |
| pipeline call, B=1 (encoder, ``set_query``, 2 steps, decode) | 1 / 2 (+ ``set_query``) | 1160 / 2140 | documented |
| denoising step, merge none / auto (full) / jit, B=1 | 0 / 0, 0, 0 | 385 (208) / 751 (348), 385, 865 | ok |
| pipeline denoising step, jit, 2 analogies | 0 / **20**; fixed: 0 | 385 / 1013 | fixed (F1) |
| training step: syncs in lorweb_fast lines | - / 3 | - / 3540 (1590) | F4: kept (see below) |
| training step: blocking host->device copies, ``flow_matching_loss`` | - / **3**; fixed: 0 | - | fixed (F5) |
| coefficients on another device than x (offload) | - / **a copy per layer, forward**; fixed: once | - | fixed (F6) |
| torch-backend layer forward at scale 1: ``mul`` kernels | - / **2**; fixed: 1 | - | fixed (F7) |

The LoRWeB forward adds no synchronisation anywhere in inference (unmerged, merged, B=1 or different analogies on the
unmerged path); ``set_query`` syncs exactly as documented (one per configuration group with ``check_finite``, none
without); a merged "full" step costs exactly the stock step's ops. Findings (the numbers above are from before the
fixes of the same session; the tests below pin the fixed behaviour; F4 is kept by decision):

* F1 ``layer.py:LoRWeBLinear.jit_merged_forward`` called ``one_analogy(coeffs)`` (``bool((c == c[:1]).all())``) for B
  > 1 in every layer's every forward: one sync per layer per denoising step (494 per step in FLUX.1). Fixed:
  ``LoRWeBLinear.holds_one_analogy`` decides it once per coefficient tensor (remembered with the tensor and its
  version), ``set_query`` decides it for every layer inside its finiteness check's one synchronisation.
* F2 ``flux.py:_mergeable_layers`` and ``flux.py:merged_weight`` both called ``one_analogy`` per layer: 2 L syncs on
  entering a "full" / "offload" merge with B > 1 identical rows. Fixed: ``layer.decide_one_analogy`` decides the
  undecided layers in one read per device on entry, then the remembered answer.
* F3 ``lora_api.py:check_fused_query`` read ``bool((error <= tol).all())`` per layer: L syncs per pipeline call on a
  fused model. Fixed: the per-layer flags are stacked and read once per device.
* F4 training: three syncs per step in lorweb_fast code: the loss read (``training._train``, which the official
  trainer also does: ``torch.isnan(loss)`` before backward), the gradient-norm read (``_check_gradients``, documented:
  a non-finite norm stops before the optimizer step) and ``set_query``'s finiteness check (``flow_matching_loss``
  calls it with ``check_finite=True``). The last one is kept by decision: it names a non-finite query (a broken
  encoder input) before the forward, where without it the step would end in a NaN loss whose message points at the
  learning rate (and, under ``--nan-loss skip``, in silently skipped steps); one synchronisation in a FLUX step of
  about a second. Pinned as it is by the test below.
* F5 ``training.py:flow_matching_loss`` drew the noise, timesteps and loss weights on the CPU (seeded generator) and
  copied them with blocking ``.to(device)`` (torch's ``memcpy_and_sync``: a ``cudaStreamSynchronize`` after the copy):
  three stream synchronisations per step. Fixed: ``non_blocking=True`` (a pageable source is staged before the call
  returns: the same values). The other blocking ``.to(device)`` of a step move the data (pixels, encoder inputs), as
  any trainer must, or are no-ops.
* F6 ``layer.py:LoRWeBLinear.forward`` (and ``_forward_fp32``) moved coefficients living on another device than x at
  every forward of every layer and kept none: under ``enable_model_cpu_offload`` or group offloading, run unmerged, a
  blocking host->device copy per layer per denoising step. Fixed: ``LoRWeBLinear._coefficients_on`` moves the
  coefficients set by ``set_query`` once (kept until they change; without autograd history, not while compiling) and
  copies CPU->CUDA with ``non_blocking=True``. Tested with the meta device standing in for the GPU.
* F7 ``ops.py:column_scaling`` multiplied the coefficients by ``scale`` even at 1.0 (the official lora_alpha = r): one
  elementwise kernel of 8 per torch-backend layer call. Fixed: skipped at 1.0.

Not findings: host-only reads (``drop.tolist()`` of the CPU caption-dropout mask in ``flow_matching_loss``, the
CPU ``randperm`` of ``StepBatchSampler``, diffusers' ``image_processor.preprocess`` on CPU pixels); diffusers' own
syncs (the stock baseline); the documented ``set_query`` check once per generation.

Bounds below are derived from the documented computation, not copied from the table: the torch backend's forward
(README "Backends") is 7 kernels per layer (pack A_cat, coefficients times scale, repeated r times, x.A_cat, the
column scaling, .B_cat, the add to the base output) with at most 2 reshapes around each; a merged "full" step is the
base step. Runtime: about 10 s on 2 idle cores (35 s on busy ones).
"""

import copy
import os
import sys
import sysconfig
import types
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lorweb_fast as lf
from lorweb_fast import flux, lora_api, training
from lorweb_fast.testing import (pair_config, pair_query, random_analogy, tiny_flux_config, tiny_flux_inputs,
                                 tiny_lorweb_kontext_pipeline, tiny_pair_model, tiny_train_config, tiny_training_assets)

diffusers = pytest.importorskip("diffusers")

#: aten ops that read device memory on the host (a device -> host synchronisation on CUDA)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique",
                      "_unique2", "unique_dim", "unique_consecutive"})
#: Python-level reads that dispatch no aten op on CPU tensors (a copy to the host and a sync on CUDA)
HOST_READS = frozenset({"tolist", "numpy"})
#: lorweb_fast sites whose HOST_READS read tensors that are on the host on any machine: flow_matching_loss's
#: caption-dropout mask, drawn by the seeded CPU generator
HOST_ONLY_SITES = frozenset({"training.py:flow_matching_loss"})
#: metadata-only ops (no kernel launch) besides views
RESHAPES = frozenset({"_unsafe_view", "_reshape_alias", "lift_fresh"})
#: documented torch-backend forward of one layer (README "Backends"): pack A_cat, coefficients times lora_alpha / r,
#: repeated r times (the column scaling), x.A_cat, u times the scaling, z.B_cat, the add to the base output
TORCH_BACKEND_KERNELS = 7
#: at most two reshapes / views around each of them (a 3-D matmul flattens its input and restores its output)
TORCH_BACKEND_OPS = 3 * TORCH_BACKEND_KERNELS
#: ``merged(strategy="jit")``, per layer and forward (``LoRWeBLinear.merged_weight_for`` in one block of rows, as every
#: tiny layer is far below MERGE_BLOCK_BYTES): the column scaling (2), pack A_cat (1), scale it (1), the merged weight
#: (1), the block: W in fp32 (1), plus B_cat^T . (s A_cat)^T (1), written into the result (1); F.linear replaces the
#: base layer's GEMM
JIT_KERNELS = 5 + 3
FLUX_QUERY_DIM = 12

_TORCH = os.path.dirname(torch.__file__) + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_PKG = os.path.dirname(lf.__file__) + os.sep


def _skipped(filename: str) -> bool:
    """torch's own files, the standard library's (not the packages installed under it) and this file."""
    return (filename.startswith(_TORCH) or filename == __file__
            or (filename.startswith(_STDLIB) and "-packages" + os.sep not in filename))


def _site():
    """(owner, site): ``file.py:function`` of the innermost frame outside torch, the stdlib and this file, and of the
    innermost lorweb_fast frame (None when none is on the stack)."""
    frame, owner, site = sys._getframe(2), None, None
    while frame is not None and site is None:
        name = frame.f_code.co_filename
        where = f"{os.path.basename(name)}:{frame.f_code.co_name}"
        if owner is None and not _skipped(name):
            owner = where
        if name.startswith(_PKG):
            site = where
        frame = frame.f_back
    return owner, site


class Audit:
    """Counts of one block (see the module docstring); ``snapshot()`` and ``between`` slice it."""

    def __init__(self):
        self.ops = self.kernels = 0
        self.names = Counter()
        self.syncs, self.host_reads, self.blocking_to, self.cross_device = [], [], [], []
        audit = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func._schema.name.split("::")[-1]
                audit.ops += 1
                audit.names[name] += 1
                if not (func.is_view or name in RESHAPES):
                    audit.kernels += 1
                if name in SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                        and func._overloadname in ("Tensor", "self_Tensor")):
                    audit.syncs.append(_site())
                target = kwargs.get("device")
                if name == "_to_copy" and target is not None and torch.device(target) != args[0].device:
                    audit.cross_device.append(_site())
                return func(*args, **kwargs)

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in HOST_READS:
                    where = _site()
                    (audit.host_reads if where[1] in HOST_ONLY_SITES else audit.syncs).append(where)
                elif name == "to" and not kwargs.get("non_blocking", False) and _names_device(args, kwargs):
                    audit.blocking_to.append(_site())
                return func(*args, **kwargs)

        self._modes = (Function(), Dispatch())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def snapshot(self):
        return types.SimpleNamespace(ops=self.ops, kernels=self.kernels, names=Counter(self.names),
                                     **{k: list(getattr(self, k)) for k in ("syncs", "host_reads", "blocking_to",
                                                                             "cross_device")})


def between(earlier, later):
    """The counts from snapshot ``earlier`` to snapshot ``later``."""
    return types.SimpleNamespace(ops=later.ops - earlier.ops, kernels=later.kernels - earlier.kernels,
                                 names=later.names - earlier.names,
                                 **{k: getattr(later, k)[len(getattr(earlier, k)):] for k in
                                    ("syncs", "host_reads", "blocking_to", "cross_device")})


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (positionally or by keyword)."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda")):
            return True
    return False


def audited(fn):
    with Audit() as audit:
        fn()
    return audit


def sites(events) -> Counter:
    """Events by their innermost lorweb_fast frame."""
    return Counter(site for _, site in events)


def owners(events) -> Counter:
    """Events by the innermost frame outside torch (the line that asked)."""
    return Counter(owner for owner, _ in events)


def lorweb_owned(events) -> Counter:
    """Events asked for by lorweb_fast's own lines (not inside diffusers, accelerate or the optimizer)."""
    return Counter(owner for owner, site in events if owner is not None and owner == site)


# ------------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("shape", [(2, 7, 6), (2, 6)], ids=["3d", "2d"])
def test_layer_forward_no_sync_and_the_documented_ops(backend, shape):
    model = tiny_pair_model()
    lf.set_backend(model, backend)
    x = torch.randn(*shape)
    with torch.no_grad():
        lf.set_query(model, pair_query(2))
        layer = model[0]
        layer(x)  # warm-up: lazy imports and caches are not counted
        base = audited(lambda: layer.base_layer(x))
        got = audited(lambda: layer(x))
    assert got.syncs == [] and got.host_reads == [] and got.blocking_to == []
    assert got.kernels - base.kernels <= TORCH_BACKEND_KERNELS, got.names
    assert got.ops - base.ops <= TORCH_BACKEND_OPS, got.names


def test_layer_forward_backward_in_training_no_sync():
    """Training: set_query with autograd, then forward and backward of both layers: no read of any value, and a
    backward of at most two kernels per kernel of the graph (one gradient per differentiable input: matmul, mul and
    add have two) plus one accumulation per LoRWeB parameter (the warm-up left gradients)."""
    model = tiny_pair_model().train()
    x = torch.randn(2, 7, 6)
    lf.set_query(model, pair_query(2), check_finite=False)
    model(x).sum().backward()
    with Audit() as audit:
        lf.set_query(model, pair_query(2, seed=1), check_finite=False)
        y = model(x).sum()
        graph = audit.snapshot()
        y.backward()
    backward = between(graph, audit.snapshot())
    assert audit.syncs == [] and audit.host_reads == []
    leaves = [p for layer in lf.lorweb_layers(model).values() for p in layer.lorweb_tensors().values()]
    assert all(p.grad is not None for p in leaves)
    assert backward.kernels <= 2 * graph.kernels + len(leaves), backward.names


def test_per_forward_layer_forward_no_sync():
    model = tiny_pair_model()
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        lf.set_query(model, pair_query(2), per_forward=True, check_finite=False)
        model(x)
        got = audited(lambda: model(x))
    assert got.syncs == [] and got.host_reads == []


def test_torch_backend_forward_at_scale_one_has_one_elementwise_product():
    """At scale 1 and strength 1 the documented forward has one elementwise product: u times the column scaling."""
    model = tiny_pair_model()
    lf.set_backend(model, "torch")
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        lf.set_query(model, pair_query(2))
        assert model[0].scale == 1.0
        model[0](x)
        got = audited(lambda: model[0](x))
    assert got.names["mul"] == 1, got.names


# -------------------------------------------------------------------------------------------------- set_query
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_set_query_checks_with_one_sync_per_configuration_group(grad):
    """README: the finiteness check is one device synchronisation per configuration group."""
    model = tiny_pair_model().train(grad)  # autograd: training (no eval-mode warning)
    with torch.set_grad_enabled(grad):
        lf.set_query(model, pair_query(2))
        one_group = audited(lambda: lf.set_query(model, pair_query(2, seed=1)))
        model[1].double()  # the second layer now forms a configuration group of its own (float64)
        two_groups = audited(lambda: lf.set_query(model, pair_query(2, seed=2)))
    assert sites(one_group.syncs) == {"model.py:set_query": 1}
    assert sites(two_groups.syncs) == {"model.py:set_query": 2}


@pytest.mark.parametrize("per_forward", [False, True])
def test_set_query_without_check_finite_does_not_sync(per_forward):
    model = tiny_pair_model()
    with torch.no_grad():
        lf.set_query(model, pair_query(2))
        checked = audited(lambda: lf.set_query(model, pair_query(2, seed=1), per_forward=per_forward))
        unchecked = audited(lambda: lf.set_query(model, pair_query(2, seed=2), per_forward=per_forward,
                                                 check_finite=False))
    assert len(checked.syncs) == 1  # the documented check (the query once, per_forward)
    assert unchecked.syncs == [] and unchecked.host_reads == []


# ------------------------------------------------------------------------------------------------ FLUX model
flux_inputs = tiny_flux_inputs  # (batch, seed) -> one forward's random inputs


@pytest.fixture(scope="module")
def flux_pair():
    """(stock tiny FLUX transformer, a copy with LoRWeB injected and a non-zero basis), eval mode."""
    torch.manual_seed(0)
    stock = diffusers.FluxTransformer2DModel(**tiny_flux_config()).eval()
    model = copy.deepcopy(stock)
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=FLUX_QUERY_DIM))
    with torch.no_grad():
        for layer in lf.lorweb_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    return stock, model


def flux_query(batch, identical=False, seed=0):
    q = torch.randn(1 if identical else batch, FLUX_QUERY_DIM, generator=torch.Generator().manual_seed(seed))
    return q.expand(batch, -1).contiguous()


def forward_counts(model, inputs):
    with torch.no_grad():
        model(**inputs)
        return audited(lambda: model(**inputs))


@pytest.mark.parametrize("batch", [1, 2])
def test_flux_forward_adds_no_sync_and_bounded_ops(flux_pair, batch):
    """One denoising step's transformer forward: no sync beyond the stock transformer's, and at most the documented
    torch-backend computation per adapted layer."""
    stock, model = flux_pair
    inputs = flux_inputs(batch)
    with torch.no_grad():
        lf.set_query(model, flux_query(batch))
    base, got = forward_counts(stock, inputs), forward_counts(model, inputs)
    layers = len(lf.lorweb_layers(model))
    assert len(got.syncs) == len(base.syncs) and len(got.host_reads) == len(base.host_reads)
    assert owners(got.blocking_to) == owners(base.blocking_to)
    assert got.kernels <= base.kernels + TORCH_BACKEND_KERNELS * layers
    assert got.ops <= base.ops + TORCH_BACKEND_OPS * layers


def test_flux_training_forward_backward_adds_no_sync(flux_pair):
    stock, model = flux_pair
    inputs = flux_inputs(2)
    grad_inputs = {k: v.clone().requires_grad_(k == "hidden_states") for k, v in inputs.items()}
    base = audited(lambda: stock(**grad_inputs).sample.sum().backward())  # the whole stock graph, differentiated
    stock.zero_grad(set_to_none=True)
    model.train()
    try:
        lf.set_query(model, flux_query(2), check_finite=False)
        got = audited(lambda: model(**inputs).sample.sum().backward())
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        lf.clear_query(model)
    assert len(got.syncs) == len(base.syncs) and len(got.host_reads) == len(base.host_reads)


@pytest.mark.parametrize("strategy", ["full", "jit"])
def test_merged_one_analogy_step(flux_pair, strategy):
    """README: with merged(strategy="full") a denoising step costs what the base model costs; with "jit" it adds no
    synchronisation and at most JIT_KERNELS launches per layer."""
    stock, model = flux_pair
    inputs = flux_inputs(1)
    with torch.no_grad():
        lf.set_query(model, flux_query(1))
    with lf.merged(model, strategy):
        got = forward_counts(model, inputs)
    base = forward_counts(stock, inputs)
    if strategy == "full":
        assert (got.ops, got.kernels, len(got.syncs)) == (base.ops, base.kernels, len(base.syncs))
    else:
        assert len(got.syncs) == len(base.syncs)
        assert got.kernels <= base.kernels + JIT_KERNELS * len(lf.lorweb_layers(model)), got.names - base.names


@pytest.mark.parametrize("identical", [False, True], ids=["different", "identical"])
def test_merged_jit_batch_step_adds_no_sync(flux_pair, identical):
    stock, model = flux_pair
    inputs = flux_inputs(2)
    with torch.no_grad():
        lf.set_query(model, flux_query(2, identical))
    with lf.merged(model, "jit"):
        got = forward_counts(model, inputs)
    assert len(got.syncs) == len(forward_counts(stock, inputs).syncs), sites(got.syncs)


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_entering_a_merge_of_identical_rows_syncs_at_most_once(flux_pair, strategy):
    _, model = flux_pair
    with torch.no_grad():
        lf.set_query(model, flux_query(2, identical=True), check_finite=False)

    def enter_and_exit():
        with lf.merged(model, strategy):
            pass

    got = audited(enter_and_exit)
    assert len(got.syncs) <= 1, sites(got.syncs)


def test_checking_the_query_of_a_fused_model_syncs_once(flux_pair):
    _, model = flux_pair
    query = flux_query(1)
    with torch.no_grad():
        lf.set_query(model, query)
    lora_api.fuse_lora(model, "full")
    try:
        with torch.no_grad():
            got = audited(lambda: lora_api.check_fused_query(model, query))
    finally:
        lora_api.unfuse_lora(model)
    assert len(got.syncs) <= 1, sites(got.syncs)


def test_set_query_computes_each_group_at_once(flux_pair):
    """README: layers of one configuration are computed together: the GEMMs of set_query do not grow with the
    number of layers (20 FLUX layers, one group, against the 2-layer model)."""
    _, model = flux_pair
    pair = tiny_pair_model(config=pair_config(key_dim=8))
    gemms = ("mm", "bmm", "addmm", "baddbmm")
    with torch.no_grad():
        big = audited(lambda: lf.set_query(model, flux_query(2), check_finite=False))
        small = audited(lambda: lf.set_query(pair, pair_query(2), check_finite=False))
    assert sum(big.names[g] for g in gemms) == sum(small.names[g] for g in gemms) > 0


def test_coefficients_on_another_device_are_moved_once():
    """set_query on the CPU, the forward on another device (the meta device stands in for the GPU of model CPU
    offload): the copy of the (B, N) coefficients to x's device is made in the first forward only."""
    model = tiny_pair_model()
    with torch.no_grad():
        lf.set_query(model, pair_query(2))
        model.to("meta")
        x = torch.empty(2, 7, 6, device="meta")
        first = audited(lambda: model(x))
        second = audited(lambda: model(x))
    assert len(first.cross_device) == len(lf.lorweb_layers(model))  # the stand-in works: one copy per layer
    assert second.cross_device == [], sites(second.cross_device)


# -------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipeline_steps(tmp_path_factory):
    """Per-step and per-call counts of the tiny Kontext pipeline with LoRWeB (merge none / auto / jit), then of the
    same pipeline with the stock layers put back (the baseline). Step 2 of 2 is measured."""
    pipe = tiny_lorweb_kontext_pipeline(tmp_path_factory.mktemp("pipe"))
    a, a_prime, b = random_analogy(0)
    width, height = pipe.control_grids([a], [a_prime], [b])[0].size

    def measure(call):
        """(counts of step 2, counts of the whole call)."""
        marks = []

        def on_step_end(_pipe, _i, _t, kwargs):
            marks.append(audit.snapshot())
            return kwargs

        with Audit() as audit:
            call(on_step_end)
        return between(*marks), audit

    out = {}
    for merge in ("none", "auto", "jit"):
        pipe(a, a_prime, b, "edit", merge=merge, num_inference_steps=1, output_type="np")  # warm-up
        out[merge] = measure(lambda cb, merge=merge: pipe(a, a_prime, b, "edit", merge=merge, num_inference_steps=2,
                                                          output_type="np", callback_on_step_end=cb))
    out["layers"] = len(lf.lorweb_layers(pipe.transformer))
    lf.remove_lorweb(pipe.transformer)
    grid = pipe.control_grids([a], [a_prime], [b])[0]

    def stock(cb=None, steps=2):
        return pipe.pipe(image=grid, prompt="edit", height=height, width=width, num_inference_steps=steps,
                         guidance_scale=2.5, generator=torch.Generator().manual_seed(50), output_type="np",
                         max_area=width * height, _auto_resize=False, callback_on_step_end=cb)

    stock(steps=1)
    out["stock"] = measure(stock)
    return out


@pytest.mark.parametrize("merge", ["none", "auto", "jit"])
def test_denoising_step_adds_no_sync_to_the_stock_step(pipeline_steps, merge):
    (step, _), (base, _) = pipeline_steps[merge], pipeline_steps["stock"]
    assert len(step.syncs) == len(base.syncs) and len(step.host_reads) == len(base.host_reads)
    layers = pipeline_steps["layers"]
    if merge == "auto":  # one analogy: "full" (free memory): the stock step exactly
        assert (step.ops, step.kernels) == (base.ops, base.kernels)
    elif merge == "none":
        assert step.kernels <= base.kernels + TORCH_BACKEND_KERNELS * layers
        assert step.ops <= base.ops + TORCH_BACKEND_OPS * layers
    else:
        assert step.kernels <= base.kernels + JIT_KERNELS * layers


def test_generation_syncs_once_beyond_stock(pipeline_steps):
    """A whole call: the stock pipeline's syncs plus the documented set_query check (once per generation)."""
    (_, call), (_, base) = pipeline_steps["none"], pipeline_steps["stock"]
    assert owners(call.syncs) - owners(base.syncs) == {"model.py:set_query": 1}, owners(call.syncs)
    assert not owners(base.syncs) - owners(call.syncs)


# ---------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def training_step(tmp_path_factory):
    """The counts of training step 2 of 3 (no checkpoint, same epoch) of the tiny trainer, fp32."""
    root = tmp_path_factory.mktemp("train")
    cfg = tiny_train_config(tiny_training_assets(root / "assets", 4), root / "run", steps=3, checkpoint_every=100)
    pipe, encoder = flux.load_kontext_pipeline(cfg.model), flux.AnalogyEncoder(cfg.encoder)
    marks = []
    with Audit() as audit:
        training.train(cfg, pipe=pipe, encoder=encoder, step_callback=lambda step, loss: marks.append(audit.snapshot()))
    return between(*marks[:2])


def test_training_step_syncs_are_the_loss_read_the_gradient_check_and_set_query(training_step):
    """Per step: the loss read (the official trainer's isnan check before backward), the documented gradient-norm
    check before the optimizer step, and set_query's finiteness check (F4); nothing else in lorweb_fast code."""
    assert lorweb_owned(training_step.syncs) <= Counter({"training.py:_train": 1, "training.py:_check_gradients": 1,
                                                         "model.py:set_query": 1})
    assert lorweb_owned(training_step.syncs)["training.py:_train"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: to other devices the copies block by "
                                                          "design (a non-blocking copy of a CPU temporary is unsafe "
                                                          "there), and on the CPU they are no copies")
def test_flow_matching_loss_makes_no_blocking_host_to_device_copy(training_step):
    """F5: on a CUDA device the noise, timesteps and loss weights drawn on the CPU are copied with non_blocking."""
    own = [owner for owner, site in training_step.blocking_to if owner == site == "training.py:flow_matching_loss"]
    assert own == []


def test_flow_matching_loss_copies_non_blocking_to_cuda_only(monkeypatch):
    """F5, the rule itself (this machine has no GPU): ``flow_matching_loss`` passes ``non_blocking=True`` exactly
    when the training device is CUDA (read from its source: the three copies share one flag)."""
    import inspect

    source = inspect.getsource(training.flow_matching_loss)
    assert 'non_blocking = device.type == "cuda"' in source
    assert source.count("non_blocking=non_blocking") == 3 and "non_blocking=True" not in source
