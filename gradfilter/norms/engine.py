"""Per-example gradient norms of a causal LM in one forward and one backward.

For a batch of B examples, ``L_i`` is the cross-entropy of example i over its
supervised tokens (labels != -100, with the causal shift Hugging Face causal
LMs use: logits at position t predict the label at t + 1), averaged over those
tokens (``reduction="mean"``) or summed (``"sum"``).  We return, for every i,
``||d L_i / d theta||_2`` over all trainable parameters theta.

How: one forward records, for each layer that owns a trainable parameter, its
input; one backward of ``sum_i L_i`` (examples do not interact, so the output
gradient of row i is the gradient of ``L_i``) delivers the layer's output
gradient to a tensor hook.  From these two the layer rules (:mod:`.layers`)
give row factors and :mod:`.reference` reduces them to per-example squared
norms by the direct or the Gram route.  The backward is taken with respect to a
private zero-dimensional "anchor" that every recorded layer input is tied to,
so autograd computes activation gradients only: no parameter's ``.grad`` is
touched and no weight gradient is formed.

Parameters without a rule (or shared with a layer without one) take the exact
generic fallback: after the backward, the owning module is re-run example by
example and ``torch.autograd.grad`` of its output against the recorded output
gradient gives that example's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradfilter.norms import ops
from gradfilter.norms.layers import RULE_PARAMS, Factor, rule_for
from gradfilter.norms.layout import RowLayout

_CONTAINERS = (nn.ParameterDict, nn.ParameterList, nn.ModuleDict, nn.ModuleList)


class _InputTap(torch.autograd.Function):
    """Identity on a layer input that ties it to the anchor (grad 0 to the anchor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.anchor_dtype = anchor.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.new_zeros((), dtype=ctx.anchor_dtype)


class _OutputTap(torch.autograd.Function):
    """Copy of a layer output tied to the anchor, for layers with no float input."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.anchor_dtype = anchor.dtype
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.new_zeros((), dtype=ctx.anchor_dtype)


@dataclass
class _ParamState:
    """What one trainable parameter collects during the pass."""

    name: str
    param: nn.Parameter
    factored: bool
    expected: int = 0  # layer calls still to deliver a factor (factored params)
    factors: list[Factor] = field(default_factory=list)
    sq_norms: torch.Tensor | None = None  # [B], once reduced
    grads: torch.Tensor | None = None  # [B, *shape], fallback params only


@dataclass
class _Job:
    """A module whose calls are recorded, and what its recorded calls feed."""

    module: nn.Module
    name: str
    rule: Any  # a layer rule, or None
    ruled: dict[str, _ParamState] = field(default_factory=dict)  # local name -> state
    fallback: list[_ParamState] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)


@dataclass
class _Call:
    job: _Job
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor | None]


class _Pass:
    """One evaluation: plan, hooks, backward and reduction.  Holds all state, so
    nothing is ever stored on the model's modules or parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params: list[_ParamState] = []
        self.jobs: list[_Job] = []
        self.recording = False
        self.anchor: torch.Tensor | None = None
        self.layout: RowLayout | None = None  # [B, T] rows that carry gradient, on the host
        self.reduction = "mean"
        self._plan()

    # -- planning -------------------------------------------------------------

    def _plan(self) -> None:
        parent: dict[int, nn.Module] = {}
        names: dict[int, str] = {}
        for mname, module in self.model.named_modules():
            names[id(module)] = mname
            for child in module.children():
                parent.setdefault(id(child), module)

        state_of: dict[int, _ParamState] = {}
        for pname, p in self.model.named_parameters():
            if p.requires_grad:
                state_of[id(p)] = _ParamState(pname, p, factored=True)
        if not state_of:
            raise ValueError(
                "model has no trainable parameter (none has requires_grad=True); "
                "wrap it with peft or unfreeze the parameters to score"
            )
        self.params = list(state_of.values())

        # owners[id(param)] = [(module, local name or None)]; a parameter held by a
        # container (ParameterDict, ...) belongs to the nearest real module above.
        owners: dict[int, list[tuple[nn.Module, str | None]]] = {k: [] for k in state_of}
        for module in self.model.modules():
            for local, p in module._parameters.items():
                if p is None or id(p) not in state_of:
                    continue
                owner, key = module, local
                while isinstance(owner, _CONTAINERS) and id(owner) in parent:
                    owner, key = parent[id(owner)], None
                owners[id(p)].append((owner, key))

        for pid, owned in owners.items():
            state = state_of[pid]
            state.factored = all(key in RULE_PARAMS and rule_for(m) is not None for m, key in owned)

        jobs: dict[int, _Job] = {}
        for pid, owned in owners.items():
            state = state_of[pid]
            for module, key in owned:
                job = jobs.get(id(module))
                if job is None:
                    job = _Job(module, names.get(id(module), "?"), rule_for(module))
                    jobs[id(module)] = job
                if state.factored:
                    job.ruled[key] = state
                elif state not in job.fallback:
                    job.fallback.append(state)
        self.jobs = list(jobs.values())

    # -- hooks ----------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.recording:
            return None
        args = list(args)
        for i, a in enumerate(args):
            if _is_float(a):
                args[i] = _InputTap.apply(a, self.anchor)
                return tuple(args), kwargs
        for k, a in kwargs.items():
            if _is_float(a):
                kwargs = dict(kwargs)
                kwargs[k] = _InputTap.apply(a, self.anchor)
                return tuple(args), kwargs
        return None

    def _make_post_hook(self, job: _Job):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if not self.recording:
                return None
            input_tapped = any(_is_float(a) for a in args) or any(
                _is_float(a) for a in kwargs.values()
            )
            outs = [output] if torch.is_tensor(output) else output
            if not isinstance(outs, (list, tuple)):
                raise TypeError(
                    f"layer {job.name!r} ({type(module).__name__}) returns "
                    f"{type(output).__name__}; per-example norms need tensor outputs"
                )
            if not input_tapped:
                outs = [_OutputTap.apply(o, self.anchor) if _is_float(o) else o for o in outs]
                output = outs[0] if torch.is_tensor(output) else type(output)(outs)
            call = _Call(
                job,
                tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()},
                [o for o in outs if torch.is_tensor(o)],
                [],
            )
            call.grads = [None] * len(call.outputs)
            job.calls.append(call)
            for j, o in enumerate(call.outputs):
                if o.requires_grad:
                    o.register_hook(self._make_grad_hook(call, j))
            if not job.fallback:
                # A hook fires without the tensor being held: an output that the
                # model does not keep (a LoRA delta, added and gone) is freed now,
                # not at its backward.
                call.outputs = []
            return None if input_tapped else output

        return hook

    def _make_grad_hook(self, call: _Call, j: int):
        def hook(grad: torch.Tensor) -> None:
            if call.job.fallback:
                call.grads[j] = grad  # kept for the per-example re-run after the backward
            if call.job.ruled and j == 0:
                self._take_factors(call, grad)

        return hook

    # -- reduction --------------------------------------------------------------

    def _take_factors(self, call: _Call, grad: torch.Tensor) -> None:
        job = call.job
        x = call.args[0] if call.args else next(iter(call.kwargs.values()))
        bsz, seq = self.layout.batch, self.layout.seq
        if tuple(x.shape[:2]) != (bsz, seq) or tuple(grad.shape[:2]) != (bsz, seq):
            raise ValueError(
                f"layer {job.name!r} sees input {tuple(x.shape)} and output gradient "
                f"{tuple(grad.shape)}; expected [batch={bsz}, tokens={seq}, ...] to "
                "attribute its rows to examples"
            )
        factors = job.rule(job.module, x, grad)
        for key, state in job.ruled.items():
            if key in factors:
                state.factors.append(factors[key])
            state.expected -= 1
            if state.expected == 0:
                self._reduce(state)
        if not job.fallback:
            call.args, call.kwargs, call.outputs = (), {}, []

    def _reduce(self, state: _ParamState) -> None:
        if not state.factors:
            state.sq_norms = torch.zeros(
                self.layout.batch, dtype=torch.float32, device=state.param.device
            )
            return
        state.sq_norms = ops.factor_sq_norms(state.factors, self.layout).to(torch.float32)
        state.factors = []

    def _run_fallbacks(self) -> None:
        """Exact per-example gradients for parameters without a fast route."""
        bsz = self.layout.batch
        for job in self.jobs:
            if not job.fallback:
                continue
            params = [s.param for s in job.fallback]
            for s in job.fallback:
                if s.grads is None:
                    s.grads = torch.zeros(
                        (bsz, *s.param.shape), dtype=s.param.dtype, device=s.param.device
                    )
            for call in job.calls:
                if all(g is None for g in call.grads):
                    continue
                for i in range(bsz):
                    args = tuple(_row(a, i, bsz) for a in call.args)
                    kwargs = {k: _row(v, i, bsz) for k, v in call.kwargs.items()}
                    with torch.enable_grad():
                        out = job.module(*args, **kwargs)
                    outs = [out] if torch.is_tensor(out) else [o for o in out if torch.is_tensor(o)]
                    pairs = [
                        (o, g[i : i + 1])
                        for o, g in zip(outs, call.grads, strict=False)
                        if g is not None and o.requires_grad
                    ]
                    if not pairs:
                        continue
                    grads = torch.autograd.grad(
                        [o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True
                    )
                    for s, g in zip(job.fallback, grads, strict=False):
                        if g is not None:
                            s.grads[i] += g
            job.calls = []
        for s in self.params:
            if not s.factored:
                g = s.grads.reshape(bsz, -1)
                # Square-sum in float64 when the gradients are float64, else in float32.
                acc = torch.float64 if g.dtype == torch.float64 else torch.float32
                s.sq_norms = g.to(acc).square().sum(-1).to(torch.float32)
                s.grads = None

    # -- the pass ---------------------------------------------------------------

    def _mark_rows(self, labels: torch.Tensor, attention_mask: torch.Tensor) -> _Supervision:
        """Read the batch's shape on the host, once, before the forward: set
        :attr:`layout` (the rows that carry gradient) and return what the loss
        needs.  ``labels`` and ``attention_mask`` are host tensors."""
        bsz, seq = labels.shape
        supervised = labels[:, 1:] != -100  # [B, T-1]: position t predicts labels[t+1]
        counts = supervised.sum(-1)
        positions = torch.arange(seq)
        last = (
            torch.where(supervised, positions[:-1].expand(bsz, -1), -1).amax(-1)
            if seq > 1
            else torch.full((bsz,), -1)
        )
        # Rows after an example's last supervised position, and padding, get no gradient.
        self.layout = RowLayout.from_mask(
            attention_mask.bool() & (positions.unsqueeze(0) <= last.unsqueeze(1))
        )
        example, pos = supervised.nonzero(as_tuple=True)
        return _Supervision(
            counts=counts,
            picked=example * seq + pos,
            example=example,
            padded_inside=_padded_inside(attention_mask),
        )

    def _attach(self, handles: list[Any]) -> None:
        """Register the input and output hooks of every job, appending their handles."""
        for job in self.jobs:
            handles.append(job.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            handles.append(
                job.module.register_forward_hook(self._make_post_hook(job), with_kwargs=True)
            )

    def _forward_backward(
        self, inputs: dict, shape: tuple[int, int], labels: torch.Tensor, sup: _Supervision
    ) -> None:
        """The recorded forward and the backward of ``sum_i L_i`` (the hooks reduce);
        ``shape`` is ``(batch, tokens)`` of the input ids."""
        bsz, seq = shape
        # A model that takes its loss from its last hidden states (the LM head in
        # chunks, without the [tokens, vocab] logits; LoRAEnsemble) says so.
        hidden_loss = getattr(self.model, "summed_example_losses", None)
        if not getattr(self.model, "has_hidden_state_loss", False):
            hidden_loss = None
        self.recording = True
        with torch.enable_grad():
            if hidden_loss is not None:
                output = self.model(**inputs, hidden_states_only=True)
                self.recording = False
                hidden = output.last_hidden_state
                counts = sup.on(hidden.device).counts
                loss = hidden_loss(hidden, labels, counts, self.reduction)
            else:
                output = self.model(**inputs)
                self.recording = False
                logits = _logits_of(output)
                if logits.shape[:2] != (bsz, seq):
                    raise ValueError(
                        f"model returned logits of shape {tuple(logits.shape)}, expected "
                        f"[{bsz}, {seq}, vocab]"
                    )
                loss = _summed_example_losses(logits, labels, sup.on(logits.device), self.reduction)
            for job in self.jobs:
                for state in job.ruled.values():
                    state.expected += len(job.calls)
            if loss.requires_grad:
                torch.autograd.grad(loss, self.anchor, allow_unused=True)

    def _release(self, handles: list[Any]) -> None:
        """Remove the hooks and drop every tensor the pass holds."""
        self.recording = False
        for h in handles:
            h.remove()
        # The calls sit in reference cycles with the autograd graph (through the
        # tensor hooks): drop their tensors now rather than at the next GC.
        for job in self.jobs:
            for call in job.calls:
                call.args, call.kwargs, call.outputs, call.grads = (), {}, [], []
            job.calls = []
        for st in self.params:
            st.factors, st.grads = [], None
        self.anchor = None

    def run(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        reduction: str,
        model_kwargs: dict | None = None,
        host: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The pass.  ``host``: ``(labels, attention_mask)`` on any device (the
        caller's copies; default the ones given).  The batch's shape is read from
        them here, once, before the forward: the norm reductions in the backward
        then never wait for the device."""
        labels_h, mask_h = (labels, attention_mask) if host is None else host
        both = torch.stack([labels_h, mask_h.to(labels_h.dtype)]).cpu()
        sup = self._mark_rows(both[0], both[1])
        self.layout.prepare(input_ids.device)
        self.reduction = reduction
        pdtype = next(iter(self.params)).param.dtype
        self.anchor = torch.zeros(
            (),
            dtype=pdtype if pdtype.is_floating_point else torch.float32,
            device=input_ids.device,
            requires_grad=True,
        )
        handles: list[Any] = []
        try:
            self._attach(handles)
            inputs = _model_inputs(input_ids, attention_mask, model_kwargs, sup.padded_inside)
            self._forward_backward(inputs, tuple(input_ids.shape), labels, sup)
            for s in self.params:
                if s.factored and s.sq_norms is None:
                    self._reduce(s)
            self._run_fallbacks()
            # One copy to the host for all parameters.
            sq = torch.stack([s.sq_norms.to(input_ids.device) for s in self.params]).cpu()
        finally:
            self._release(handles)
        sq = sq.masked_fill((sup.counts == 0).unsqueeze(0), float("nan"))
        return {s.name: row for s, row in zip(self.params, sq, strict=True)}


@dataclass
class _Supervision:
    """What the loss needs about the supervised positions, read on the host.

    counts ``[B]``: supervised tokens per example; picked: flat indices into
    ``[B * T]`` of the positions whose next label counts (their label is at
    ``picked + 1``); example: the example of each picked position;
    padded_inside: whether any row has padding before a real token (then
    position ids are passed).
    """

    counts: torch.Tensor
    picked: torch.Tensor
    example: torch.Tensor
    padded_inside: bool

    def on(self, device: torch.device) -> _Supervision:
        """The index tensors on ``device`` (one copy each, without waiting)."""
        if device.type == "cpu":
            return self
        host = (self.counts, self.picked, self.example)
        if device.type == "cuda":
            host = tuple(t.pin_memory() for t in host)
        counts, picked, example = (t.to(device, non_blocking=True) for t in host)
        return _Supervision(counts, picked, example, self.padded_inside)


def _padded_inside(attention_mask: torch.Tensor) -> bool:
    """Whether a row of the host mask has padding on the left or inside."""
    if attention_mask.shape[1] < 2:
        return False
    rises = (attention_mask[:, 1:] > attention_mask[:, :-1]).any()
    falls = (attention_mask[:, :-1] > attention_mask[:, 1:]).any()
    return bool(rises or falls)


def _model_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    model_kwargs: dict | None,
    padded_inside: bool,
) -> dict[str, Any]:
    """Keyword arguments of the model call; position ids when any row is padded
    before a real token (``padded_inside``, decided on the host)."""
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "use_cache": False,
        **(model_kwargs or {}),
    }
    if padded_inside:
        # Positions must count real tokens only, as when the example is alone.
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return inputs


def _is_float(a: Any) -> bool:
    return torch.is_tensor(a) and a.is_floating_point()


def _row(a: Any, i: int, bsz: int) -> Any:
    if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == bsz:
        return a[i : i + 1]
    return a


def _logits_of(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None or not torch.is_tensor(logits) or logits.dim() != 3:
        raise ValueError(
            f"model output ({type(output).__name__}) has no [batch, tokens, vocab] `logits`; "
            "per-example LM losses need a causal LM head (e.g. AutoModelForCausalLM)"
        )
    return logits


def _summed_example_losses(
    logits: torch.Tensor, labels: torch.Tensor, sup: _Supervision, reduction: str
) -> torch.Tensor:
    """``sum_i L_i`` with the causal shift; examples without tokens weigh 0.  The
    supervised positions come from ``sup`` (indices built on the host), so
    nothing here waits for the device."""
    if sup.picked.numel() == 0:
        return logits.sum() * 0.0
    picked = logits.reshape(-1, logits.shape[-1]).index_select(0, sup.picked)
    if picked.dtype in (torch.float16, torch.bfloat16):
        picked = picked.float()
    targets = labels.reshape(-1).index_select(0, sup.picked + 1)
    ce = torch.nn.functional.cross_entropy(picked, targets, reduction="none")
    if reduction == "mean":
        weight = 1.0 / sup.counts.clamp(min=1).to(ce.dtype)
        ce = ce * weight.index_select(0, sup.example)
    return ce.sum()
