"""No host synchronisation in the norm backward.

On a GPU, a read of device data on the host (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``, ``nonzero`` or a boolean-mask index, whose output
size depends on the data) stalls the launch queue until the device has caught
up.  The batch's shape is read once per batch, before the forward
(:class:`gradfilter.norms.layout.RowLayout`); the layers' reductions in the
backward must only enqueue work.

On the CPU there is no device to wait for, so the test records the operations
that would be syncs on a GPU: every ``aten._local_scalar_dense`` (``item``,
``bool``, ``int``), every data-dependent-size op (``nonzero``, boolean-mask
``index``, ``masked_select``, ``unique``) seen by a dispatch mode, and every
``.tolist()``, ``.cpu()``, ``.numpy()`` or ``.to("cpu")`` call, during the
backward only, and attributes each to the nearest calling frame outside torch.
Calls from gradfilter's own code (``gradfilter/``, ``kernels/``) must be zero;
the Triton interpreter's own host work (it runs kernels with numpy) is not a
GPU sync and is not counted.  With CUDA, ``torch.cuda.set_sync_debug_mode``
checks the same on the device.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradfilter import LoRAEnsemble, per_example_grad_norms
from gradfilter.io.models import tiny_gpt2, tiny_llama

aten = torch.ops.aten
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = (os.path.join(_REPO, "gradfilter") + os.sep, os.path.join(_REPO, "kernels") + os.sep)
_TORCH = os.path.dirname(torch.__file__) + os.sep
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}


def _caller() -> str:
    """``file:line`` of the nearest frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH) and name != __file__:
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class SyncRecorder(TorchDispatchMode):
    """Records every would-be host sync with its caller; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def record(self, what: str) -> None:
        self.events.append((what, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.record("scalar read (item / bool / int)")
        elif func in _DATA_DEPENDENT:
            self.record(str(func))
        elif func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.record("boolean-mask index")
        return func(*args, **kwargs)

    def ours(self) -> list[tuple[str, str]]:
        return [(w, c) for w, c in self.events if c.startswith(_OURS)]


@contextlib.contextmanager
def recording(monkeypatch, recorder: SyncRecorder):
    """Patch the host reads that dispatch does not see, and enter the mode."""
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _original=original, _name=name, **kwargs):
            recorder.record(f".{_name}()")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            recorder.record(".to('cpu')")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    try:
        with recorder:
            yield recorder
    finally:
        monkeypatch.undo()


def count_backward_syncs(monkeypatch, run) -> SyncRecorder:
    """Run ``run()`` with every backward (``torch.autograd.grad`` and
    ``Tensor.backward``) recorded."""
    recorder = SyncRecorder()
    grad, backward = torch.autograd.grad, torch.Tensor.backward

    def recorded_grad(*args, **kwargs):
        with recording(pytest.MonkeyPatch(), recorder):
            return grad(*args, **kwargs)

    def recorded_backward(self, *args, **kwargs):
        with recording(pytest.MonkeyPatch(), recorder):
            return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recorded_grad)
    monkeypatch.setattr(torch.Tensor, "backward", recorded_backward)
    run()
    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    return recorder


def _peft_model(kind: str, device: str = "cpu"):
    from peft import LoraConfig, get_peft_model

    base = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "o_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def _batch(device: str = "cpu", holes: bool = False):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    if holes:
        mask[3, 5] = 0  # a hole: rows that are not one run
    labels = torch.where(mask.bool(), ids, -100)
    labels[0, :4] = -100  # a prompt
    return ids.to(device), labels.to(device), mask.to(device)


def _backends() -> list[str]:
    out = ["reference", "triton"]
    try:
        from gradfilter.norms import _ext

        if _ext.cpp_available():
            out.append("cpp")
    except Exception:  # noqa: BLE001 - the extension is optional
        pass
    return out


@pytest.fixture
def interpreter(monkeypatch):
    """The Triton kernels in the interpreter (CPU lane), as tests/conftest.py sets up."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the kernels are compiled for CUDA here; the CUDA test below covers them")
    from gradfilter.kernels import lora_norms as K

    if not K.interpreted():
        pytest.skip("the kernels were not loaded for the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("holes", [False, True], ids=["runs", "holes"])
def test_engine_backward_reads_nothing_on_the_host(monkeypatch, request, backend, kind, holes):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    monkeypatch.setenv("GRADFILTER_BACKEND", backend)
    torch.manual_seed(0)
    model = _peft_model(kind)
    ids, labels, mask = _batch(holes=holes)
    out = {}
    rec = count_backward_syncs(
        monkeypatch, lambda: out.setdefault("n", per_example_grad_norms(model, ids, labels, mask))
    )
    assert rec.ours() == [], rec.ours()
    # The same norms as the reference backend, so the test measured a real pass.
    monkeypatch.setenv("GRADFILTER_BACKEND", "reference")
    want = per_example_grad_norms(model, ids, labels, mask)
    assert torch.allclose(out["n"], want, rtol=1e-4, equal_nan=True)


def test_recorder_sees_the_syncs_it_must_catch(monkeypatch):
    """The recorder is not blind: each kind of host read made from gradfilter's
    code during a backward is recorded (here through a layer rule)."""
    from gradfilter.norms import ops

    real = ops.factor_sq_norms

    def leaky(factors, rows, *args, **kwargs):
        f = factors[0]
        bool(f.left.abs().sum() > 0)  # scalar read
        f.left[f.left > 0]  # boolean-mask index
        f.left.reshape(-1)[:3].tolist()  # host copy
        return real(factors, rows, *args, **kwargs)

    monkeypatch.setattr(ops, "factor_sq_norms", leaky)
    model = _peft_model("llama")
    ids, labels, mask = _batch()
    rec = count_backward_syncs(
        monkeypatch, lambda: per_example_grad_norms(model, ids, labels, mask)
    )
    kinds = {w for w, _ in rec.ours()}
    assert {"scalar read (item / bool / int)", "boolean-mask index", ".tolist()"} <= kinds


@pytest.mark.parametrize("backend", _backends())
def test_train_step_backward_reads_nothing_on_the_host(monkeypatch, request, backend):
    """``train_step(record_norms=True)``: the fused norms in the stacked layers'
    backward read nothing on the host either."""
    if backend == "triton":
        request.getfixturevalue("interpreter")
    torch.manual_seed(0)
    ens = LoRAEnsemble(tiny_llama(vocab_size=96), members=2, r=4, alpha=8, dropout=0.0, seed=1)
    ids, labels, mask = _batch()
    batches = [(ids[:3], labels[:3], mask[:3])] * 2
    monkeypatch.setenv("GRADFILTER_BACKEND", backend)
    rec = count_backward_syncs(
        monkeypatch, lambda: ens.train_step(batches, ens.make_optimizer(), record_norms=True)
    )
    assert rec.ours() == [], rec.ours()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_no_sync_in_the_backward_on_cuda(monkeypatch, kind):
    """On CUDA, through the compiled Triton kernels: the backward runs with
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on any sync."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GRADFILTER_BACKEND", "triton")
    torch.manual_seed(0)
    model = _peft_model(kind, "cuda")
    ids, labels, mask = _batch()  # on the host, as a data loader yields them
    grad = torch.autograd.grad

    def strict_grad(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return grad(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(torch.autograd, "grad", strict_grad)
    got = per_example_grad_norms(model, ids, labels, mask)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setenv("GRADFILTER_BACKEND", "reference")
    want = per_example_grad_norms(model, ids, labels, mask)
    assert torch.allclose(got, want, rtol=1e-4)


#: Where a training step reads its batch on the host, by design: the step's own
#: bookkeeping (training.py) and the row layouts built from the host mask (layout.py).
_HOST_SIDE = {"training.py", "layout.py"}


@pytest.mark.parametrize("record", [False, True], ids=["train", "train+norms"])
def test_train_step_forward_loss_and_backward_read_nothing_on_the_host(monkeypatch, record):
    """The whole step (forward, chunked loss, backward, optimizer): every host read
    from gradfilter's code is made in the step's bookkeeping on the batch as it came
    from the host (supervised positions, token counts, row layouts) or hands back
    the results; none in the model's forward, the loss or the layers' backward,
    whether the step runs in one chunk or in one chunk per row."""
    ids, labels, mask = _batch()
    batches = [(ids[:3], labels[:3], mask[:3])] * 2
    outs = []
    for max_tokens in (None, 2 * 12):  # one chunk; one row of each member per chunk
        torch.manual_seed(0)
        ens = LoRAEnsemble(tiny_llama(vocab_size=96), members=2, r=4, alpha=8, dropout=0.0, seed=1)
        opt = ens.make_optimizer()
        rec = SyncRecorder()
        with recording(pytest.MonkeyPatch(), rec):
            outs.append(ens.train_step(batches, opt, max_tokens=max_tokens, record_norms=record))
        files = {c.rsplit(":", 1)[0].rsplit("/", 1)[-1] for _, c in rec.ours()}
        assert files <= _HOST_SIDE, rec.ours()
    first, second = (o if record else (o,) for o in outs)
    for a, b in zip(first, second, strict=True):  # chunking only reorders float sums
        assert torch.allclose(a, b, rtol=1e-5, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("max_tokens", [None, 24])
def test_train_step_syncs_on_cuda_do_not_grow_with_chunks(max_tokens):
    """On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` names every sync of a whole
    training step with norms: gradfilter's own are only the copies of its results
    to the host, the same number in one chunk as in three (syncs inside
    transformers' own forward are not counted)."""
    import warnings

    ids, labels, mask = _batch()  # on the host, as a data loader yields them
    batches = [(ids[:3], labels[:3], mask[:3])] * 2
    torch.manual_seed(0)
    ens = LoRAEnsemble(tiny_llama(vocab_size=96), members=2, r=4, alpha=8, dropout=0.0, seed=1)
    ens = ens.to("cuda")
    opt = ens.make_optimizer()
    ens.train_step(batches, opt, max_tokens=max_tokens, record_norms=True)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ens.train_step(batches, opt, max_tokens=max_tokens, record_norms=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    ours = [w for w in syncs if f"{os.sep}gradfilter{os.sep}" in w.filename]
    # total, the norms and their A and B parts: one copy each, however many chunks
    assert len(ours) <= 4, [f"{w.filename}:{w.lineno}" for w in ours]
