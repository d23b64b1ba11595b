"""Hugging Face transformers: the causal-LM loss on softmax_gpu's kernels.

Install with ``pip install softmax-gpu[transformers]``.

- :func:`causal_lm_loss` has the contract of transformers'
  ``ForCausalLMLoss`` (shift, ``num_items_in_batch``, ``shift_labels``,
  ``ignore_index``, an fp32 loss) without its fp32 copy of the logits.
- :func:`apply` patches ONE loaded ``*ForCausalLM`` instance (PEFT-wrapped or
  not); :func:`revert` undoes it. No class, nothing in ``torch.nn.functional``
  and no module-level state is touched: everything lives on the instance
  (a patched model deep-copies and pickles, e.g. ``torch.save``, patched).

How :func:`apply` hooks in, and what it relies on in transformers:

1. The loss hook. The model's forward calls ``self.loss_function(logits,
   labels, vocab_size, **kwargs)`` whenever ``labels`` is given; transformers
   lets an instance override that property (``model.loss_function = f``
   stores ``model._loss_function``). The hook is :func:`causal_lm_loss`.
   :func:`apply` refuses to replace anything but transformers'
   ``ForCausalLMLoss`` itself, and only while that function's parameters are
   exactly the ones implemented here: a transformers release that adds a
   loss parameter makes :func:`apply` raise instead of silently ignoring it.
2. The fused path (``fused_linear=True``; training forwards with labels,
   i.e. ``model.training`` and grad mode on). The model's own forward still
   runs, so every argument it has (``logits_to_keep``, caches, attention
   kwargs, ...) keeps its meaning. For the duration of that call only,
   ``self.lm_head`` records its input (the final hidden states, already
   sliced by ``logits_to_keep``) and returns a tiny CPU "probe" tensor in
   place of the logits (``lm_head.forward`` holds a stand-in from
   :func:`apply` to :func:`revert` that is the Linear's own forward outside
   such a call); the loss hook then checks that the probe arrives
   transformed exactly as expected (unchanged, or Gemma's
   ``final_logit_softcapping``: any other logit transform a new release adds
   is detected and raises) and computes the loss with the fused linear
   cross-entropy from the hidden states and ``lm_head``'s weight (tied
   embeddings included: it is the same parameter). ``output.logits`` is None.
   ``num_items_in_batch`` is the fused loss's divisor, so the gradients
   written in the forward are final and the backward scales nothing. A hook
   around ``lm_head``'s call (its own forward, pre-forward or backward hooks,
   or a global module hook: DeepSpeed ZeRO-3, profilers) would see the
   stand-in, so such a forward computes the logits instead (a warning says
   so). Under ``torch.compile(fullgraph=True)`` the check of the probe is a
   tensor assertion in the graph.
3. Checks. At :func:`apply` time the forward's source must call
   ``self.lm_head(...)`` once, then ``self.loss_function(...)``, and take
   ``labels``, ``logits_to_keep`` and ``**kwargs``; otherwise the fused path
   is not used (warning) and, without a ``self.loss_function`` call at all,
   :func:`apply` raises. At run time every forward with labels must have
   called the hook (and, fused, ``lm_head`` exactly once): otherwise a
   RuntimeError, never a silently unpatched loss.

Evaluation forwards (``model.eval()`` or ``torch.no_grad()``) and forwards
without labels run the unpatched forward: same logits, bit for bit; their
loss (when labels are given) comes from :func:`causal_lm_loss`.

Token accuracy (as TRL's SFT trainer requests it): pass
``return_token_accuracy=True`` to the forward and the output gains
``output.token_accuracy``, a 0-d fp32 tensor: the fraction of kept tokens
(target != ignore_index) whose argmax is the target (0 when none is kept).
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import textwrap
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import softmax_gpu

__all__ = ["causal_lm_loss", "apply", "revert", "applied", "FUSED_MODEL_TYPES"]

# config.model_type of the architectures whose forward is tested with the fused
# path (tests/test_integrations_transformers.py). Others get the loss hook only.
FUSED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"})

# The parameters of transformers' ForCausalLMLoss that causal_lm_loss implements.
_LOSS_PARAMS = ("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index",
                "shift_labels")

_STATE = "_softmax_gpu_patch"
_CALL_ATTR = "_softmax_gpu_fused_call"  # on lm_head: the _FusedCall in flight, or None
_REPLICATE = "_replicate_for_data_parallel"  # nn.DataParallel's per-module copy (see _Replicate)

# What the lm_head returns during a fused forward: exactly representable in
# bf16/fp16, spread over the range a softcap bends (0 and +-small stay put).
_PROBE = (-3.0, -0.5, 0.0, 0.75, 2.0, 40.0)


_linear_cross_entropy = softmax_gpu.linear_cross_entropy


# --- the loss ------------------------------------------------------------------


def _shifted_targets(labels: Tensor, shift_labels: Tensor | None, ignore_index: int) -> Tensor:
    """The flat next-token targets: ``shift_labels`` as given, else ``labels``
    shifted left by one with ``ignore_index`` appended (transformers' rule)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _reduction_and_divisor(num_items_in_batch, device: torch.device):
    """(reduction, divisor) for the kernels: ("mean", None) without
    ``num_items_in_batch``; else ("sum", it) stated as the kernel's divisor
    (a device tensor moved to ``device``, a CPU tensor read on the host: no
    sync), so that the gradient written in the forward already includes it
    and the backward (grad_output 1) rescales nothing. A zero number: ("sum",
    None), the caller divides after (the sum over none / 0, as torch)."""
    if num_items_in_batch is None:
        return "mean", None
    divisor = num_items_in_batch
    if torch.is_tensor(divisor):
        if divisor.device.type != "cpu":
            divisor = divisor.to(device)
    elif not divisor:
        divisor = None
    return "sum", divisor


def _divided(loss: Tensor, divisor, num_items_in_batch) -> Tensor:
    """The loss the kernels returned (a sum, or a mean without
    ``num_items_in_batch``), divided by ``num_items_in_batch`` when it was not
    stated to them as the divisor. Its shape is that of transformers' division
    ``loss / num_items_in_batch``: (1,) for a count of shape (1,), as
    ``Trainer`` makes it for several GPUs."""
    if num_items_in_batch is None:
        return loss
    if divisor is None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim():
        return loss.reshape(num_items_in_batch.shape)
    return loss


def _token_accuracy(predicted: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Fraction (0-d fp32) of kept targets equal to ``predicted``; 0 when none is kept."""
    kept = target != ignore_index
    hits = (predicted == target) & kept
    return hits.sum().to(torch.float32) / kept.sum().clamp_min(1).to(torch.float32)


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                   num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: Tensor | None = None, **kwargs) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on softmax_gpu's fused cross-entropy.

    Args:
        logits: [..., T, vocab_size] (any float dtype; bf16 stays bf16: no
            fp32 copy is made, the arithmetic is fp32 inside the kernel).
            fp16 (``Trainer(fp16=True)``: autocast and a GradScaler): the
            gradient is formed at backward, after the loss scale, as
            transformers' fp32 gradient rounded to fp16.
        labels: [..., T] integer token ids; position t is the target of
            position t - 1 (the shift), ``ignore_index`` is skipped. Unused
            when ``shift_labels`` is given.
        vocab_size: the classes per position (``logits.reshape(-1, vocab_size)``).
        num_items_in_batch: when given (a tensor, on any device, or an int),
            the loss is the sum over kept tokens divided by it (gradient
            accumulation over several micro-batches), stated to the kernel as
            its divisor: the gradient it writes in the forward already
            includes it, so the backward (grad_output 1) does nothing; no
            host sync. Else the mean over kept tokens (NaN when none is kept,
            as torch).
        ignore_index: the target value that is skipped.
        shift_labels: [..., T] targets already aligned with the logits (e.g.
            sequence/context parallelism): used as given, no shift.
        **kwargs: accepted and ignored, as transformers does.

    Returns:
        A 0-d fp32 loss, differentiable with respect to ``logits``.
    """
    target = _shifted_targets(labels, shift_labels, ignore_index).to(logits.device)
    reduction, divisor = _reduction_and_divisor(num_items_in_batch, logits.device)
    loss = softmax_gpu.cross_entropy(logits.reshape(-1, vocab_size), target,
                                     ignore_index=ignore_index, reduction=reduction,
                                     loss_dtype=torch.float32, divisor=divisor)
    return _divided(loss, divisor, num_items_in_batch)


# --- apply / revert ----------------------------------------------------------------


class _Patch:
    """What :func:`apply` changed on one model, and the state of the call in flight.

    Reached only through the model (``model._softmax_gpu_patch``), so a
    ``copy.deepcopy`` of a patched model is patched on its own copy, and it
    holds nothing bound to the model, so a patched model pickles
    (``torch.save``) and loads patched."""

    active = True  # False: reverted under a wrapper that still calls the patched forward

    def __init__(self, saved_forward, saved_loss, fused: bool, reason, labels_pos):
        self.saved_forward = saved_forward  # model.__dict__["forward"] before apply, or None
        self.saved_loss = saved_loss        # model.__dict__["_loss_function"] before, or None
        self.fused = fused
        self.reason = reason                # why the fused path is off, or None
        self.labels_pos = labels_pos        # position of `labels` in the forward's args
        self.hook_calls = 0
        self.warned = False


def _original_forward(model):
    """The forward that ran before :func:`apply` (bound to ``model``), also
    once reverted. Bound with ``functools.partial``, which torch.compile
    traces under every torch we support (``function.__get__`` is a graph
    break under torch 2.11)."""
    state = model.__dict__.get(_STATE)
    saved = state.saved_forward if state is not None else None
    return saved if saved is not None else functools.partial(type(model).forward, model)


class _Forward:
    """What ``model.forward`` holds while patched: a picklable callable that
    runs :func:`_forward` on ``model``, with the signature of the forward it
    replaced (generate() and Trainer inspect it). Like a bound method it has
    ``__self__`` and ``__func__`` (wrappers such as accelerate's autocast
    rebind ``__func__``)."""

    __name__ = "forward"

    def __init__(self, model):
        self.__self__ = model
        self.__doc__ = getattr(type(model).forward, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return _forward(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(_original_forward(self.__self__))

    @property
    def __func__(self):
        fn = types.FunctionType(_forward.__code__, _forward.__globals__, "forward")
        sig = self.__signature__
        fn.__signature__ = sig.replace(parameters=[
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *sig.parameters.values()])
        fn.__doc__ = self.__doc__
        return fn


class _FusedCall:
    """One fused training forward: lm_head's input, and the loss computed from it."""

    def __init__(self, model, lm_head: nn.Linear, want_accuracy: bool):
        self.model = model
        self.lm_head = lm_head
        self.want_accuracy = want_accuracy
        self.hidden = None
        self.head_calls = 0
        self.probe = None
        self.logits = None      # the object the forward passed to the loss as `logits`
        self.accuracy = None

    def head(self, hidden, *args, **kwargs):
        """Stands in for ``lm_head.forward``: keeps the hidden states, returns the probe."""
        self.head_calls += 1
        if self.head_calls > 1 or args or kwargs or not torch.is_tensor(hidden) or \
                hidden.shape[-1] != self.lm_head.in_features:
            raise RuntimeError(
                f"softmax_gpu.integrations.transformers: {type(self.model).__name__}.forward "
                "called lm_head differently from what the fused path expects (once, on the "
                "final hidden states); use apply(model, fused_linear=False)")
        self.hidden = hidden
        self.probe = torch.tensor(_PROBE, dtype=hidden.dtype).reshape(1, 1, -1)
        return self.probe

    def loss(self, logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels):
        name = type(self.model).__name__
        if self.hidden is None:
            raise RuntimeError(f"softmax_gpu.integrations.transformers: {name}.forward computed "
                               "its loss without calling lm_head first")
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        _check_probe(logits, self.probe, cap, name)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if vocab_size != weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size} but lm_head has {weight.shape[0]} outputs")
        self.logits = logits
        h = self.hidden.reshape(-1, self.hidden.shape[-1])
        target = _shifted_targets(labels, shift_labels, ignore_index).to(h.device)
        if h.shape[0] != target.numel():
            raise ValueError(
                f"{name}: {h.shape[0]} positions have logits (after logits_to_keep) but the "
                f"labels give {target.numel()} targets (after the shift)")
        reduction, divisor = _reduction_and_divisor(num_items_in_batch, h.device)
        out = _linear_cross_entropy(
            h, weight, target, linear_bias=bias, ignore_index=ignore_index,
            reduction=reduction, softcap=cap, loss_dtype=torch.float32, divisor=divisor,
            **({"return_token_accuracy": True} if self.want_accuracy else {}))
        if self.want_accuracy:
            out, self.accuracy = out
        return _divided(out, divisor, num_items_in_batch)


class _HeadForward:
    """What ``lm_head.forward`` holds while the model is patched with the
    fused path: during a fused training forward (the head's
    ``_CALL_ATTR`` holds it) the stand-in that keeps the hidden states
    (:meth:`_FusedCall.head`), else the Linear's own forward. Set by
    :func:`apply` (again by an eager fused call when lm_head was replaced
    since) and left in place until :func:`revert`: torch.compile under torch
    2.11 neither traces removing it nor sees one set inside the compiled
    call. It refers to its head only, so a head pickled or copied on its own
    (PEFT's ``modules_to_save``) carries nothing of the model."""

    __name__ = "forward"

    def __init__(self, head: nn.Linear):
        self.head = head

    def __call__(self, *args, **kwargs):
        call = getattr(self.head, _CALL_ATTR)
        if call is not None:
            return call.head(*args, **kwargs)
        return type(self.head).forward(self.head, *args, **kwargs)


def _stand_in(head: nn.Module) -> None:
    """Put :class:`_HeadForward` on ``head``, with no fused call in flight."""
    head.forward = _HeadForward(head)
    setattr(head, _CALL_ATTR, None)
    head.__dict__[_REPLICATE] = _Replicate(head)


class _Replicate:
    """``_replicate_for_data_parallel`` of a patched model and of its head.

    ``nn.DataParallel`` copies every module per GPU with it (a shallow copy
    of the module's ``__dict__``), which would leave each replica's
    ``forward``, its loss hook and its head's stand-in bound to the original
    module (its weights, on the first GPU). This runs torch's copy, then
    binds what the patch put in the copy's ``__dict__`` to the copy: its own
    forward, loss hook and patch state (replicas run in parallel threads),
    and its head's own stand-in."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self):
        original = self.module
        replica = type(original)._replicate_for_data_parallel(original)
        d = replica.__dict__
        d.pop(_REPLICATE, None)  # a replica is not replicated again
        forward = d.get("forward")
        if isinstance(forward, _Forward) and forward.__self__ is original:
            d["forward"] = _Forward(replica)
        elif isinstance(forward, types.MethodType) and forward.__self__ is original:
            # the patched forward as a bound method (accelerate's unwrap_model
            # leaves it so), or a wrapper around it (accelerate's autocast)
            d["forward"] = types.MethodType(forward.__func__, replica)
        elif isinstance(forward, _HeadForward) and forward.head is original:
            d["forward"] = _HeadForward(replica)
            d[_CALL_ATTR] = None
        loss = d.get("_loss_function")
        if isinstance(loss, functools.partial) and loss.func is _loss_hook:
            d["_loss_function"] = functools.partial(_loss_hook, replica)
        if _STATE in d:
            d[_STATE] = copy.copy(d[_STATE])
        return replica


def _has_stand_in(head: nn.Module) -> bool:
    """``head.forward`` is its own :class:`_HeadForward` (not a copy's)."""
    forward = head.forward
    return isinstance(forward, _HeadForward) and forward.head is head


def _check_probe(logits, probe: Tensor, cap, name: str) -> None:
    """Raise unless ``logits`` is ``probe`` passed through exactly the logit
    transform the fused loss applies itself (none, or the softcap). On the
    CPU: no device sync."""
    expected = probe if cap is None else torch.tanh(probe / cap) * cap
    msg = (f"softmax_gpu.integrations.transformers: {name}.forward transforms the logits "
           "between lm_head and the loss in a way the fused path does not reproduce "
           f"(expected {'no transform' if cap is None else f'softcap {cap}'}); this "
           "transformers version is not supported by the fused path: use "
           "apply(model, fused_linear=False)")
    if not (torch.is_tensor(logits) and logits.device.type == "cpu" and
            logits.shape == probe.shape):
        raise RuntimeError(msg)
    tol = 2e-2 if probe.element_size() < 4 else 1e-5
    close = torch.isclose(logits.float(), expected.float(), rtol=tol, atol=tol).all()
    if torch.compiler.is_compiling():
        # no data-dependent branch in a traced graph: the check runs with it
        torch._assert_async(close, msg)
    elif not close:
        raise RuntimeError(msg)


def _forward(self, *args, **kwargs):
    """The patched forward of the model ``self`` (see :class:`_Forward`)."""
    state: _Patch = self.__dict__.get(_STATE)
    if state is None or not state.active:  # reverted under a wrapper that still calls this
        return _original_forward(self)(*args, **kwargs)
    want_accuracy = bool(kwargs.pop("return_token_accuracy", False))
    if "labels" in kwargs:
        labels = kwargs["labels"]
    else:
        labels = args[state.labels_pos] if len(args) > state.labels_pos else None
    fused = state.fused and labels is not None and self.training and torch.is_grad_enabled()
    head = getattr(self, "lm_head", None)
    if fused:
        reason = _fused_blocker(head)
        if reason is None and not _has_stand_in(head):  # lm_head replaced since apply()
            if torch.compiler.is_compiling():
                # a stand-in set inside the compiled call is not seen (torch 2.11):
                # this call computes the logits; an eager one puts it in place
                fused = False
            else:
                _stand_in(head)
        if reason is not None:
            fused = False
            if not state.warned:
                state.warned = True
                warnings.warn(f"softmax_gpu: fused linear cross-entropy skipped: {reason}; "
                              "the loss hook is used (logits are computed)", stacklevel=2)
    state.hook_calls = 0
    if not fused:
        out = _original_forward(self)(*args, **kwargs)
        _check_hook_ran(self, state, labels)
        if want_accuracy:
            _attach(out, _accuracy_from_logits(out, labels, kwargs))
        return out
    call = _FusedCall(self, head, want_accuracy)
    setattr(head, _CALL_ATTR, call)
    try:
        out = _original_forward(self)(*args, **kwargs)
    finally:
        setattr(head, _CALL_ATTR, None)
    _check_hook_ran(self, state, labels)
    if call.logits is None:
        raise RuntimeError(f"softmax_gpu.integrations.transformers: {type(self).__name__}.forward "
                           "did not pass lm_head's output to its loss")
    out = _without(out, call.logits)
    if want_accuracy:
        _attach(out, call.accuracy)
    return out


def _loss_hook(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
               shift_labels=None, **kwargs):
    """The model's ``loss_function`` while patched (a ``functools.partial`` on the model)."""
    state: _Patch = self.__dict__[_STATE]
    state.hook_calls += 1
    call = getattr(getattr(self, "lm_head", None), _CALL_ATTR, None)  # a fused forward's
    if call is not None:
        return call.loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                         shift_labels)
    return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                          shift_labels, **kwargs)


def _check_hook_ran(model, state: _Patch, labels) -> None:
    if labels is not None and state.hook_calls != 1:
        raise RuntimeError(
            f"softmax_gpu.integrations.transformers: {type(model).__name__}.forward called "
            f"self.loss_function {state.hook_calls} times for one forward with labels (expected "
            "once): the patch does not apply to this transformers version; revert(model)")


def _without(out, logits):
    """The forward's output without the probe logits (``logits`` field None)."""
    if isinstance(out, tuple):  # return_dict=False: to_tuple() dropped the None fields
        return tuple(v for v in out if v is not logits)
    return type(out)(**{k: v for k, v in out.items() if v is not logits})


def _attach(out, accuracy) -> None:
    if isinstance(out, tuple):
        raise ValueError("return_token_accuracy=True needs a dict output (return_dict=True)")
    out.token_accuracy = accuracy


def _accuracy_from_logits(out, labels, kwargs):
    if labels is None or isinstance(out, tuple):
        return None
    ignore_index = kwargs.get("ignore_index", -100)
    with torch.no_grad():
        logits = out.logits
        target = _shifted_targets(labels, kwargs.get("shift_labels"), ignore_index)
        predicted = logits.reshape(-1, logits.shape[-1]).argmax(-1)
        return _token_accuracy(predicted, target.to(predicted.device), ignore_index)


def _fused_blocker(head) -> str | None:
    """Why the fused path cannot use ``head`` as the output projection now, or None."""
    if head is None:
        return "the model has no lm_head attribute"
    if type(head) is not nn.Linear:
        return (f"lm_head is a {type(head).__module__}.{type(head).__name__}, not a plain "
                "torch.nn.Linear (a PEFT/LoRA adapter, a quantised or wrapped layer)")
    if ("forward" in head.__dict__ and not isinstance(head.forward, _HeadForward)) or \
            hasattr(head, "_hf_hook"):
        return "lm_head's forward is hooked (accelerate offloading or another patch)"
    hooks = _module_hooks(head)
    if hooks:
        return (f"lm_head has {hooks} (they would see a stand-in for the logits; "
                "e.g. DeepSpeed ZeRO-3 parameter gathering)")
    try:
        from torch.distributed.fsdp import FSDPModule
        if isinstance(head, FSDPModule):
            return "lm_head is its own FSDP unit"
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    if type(head.weight) is not nn.Parameter and type(head.weight) is not Tensor:
        return f"lm_head.weight is a {type(head.weight).__name__}"
    return None


def _module_hooks(head) -> str | None:
    """Which forward or backward hooks run around ``head``'s call: its own and
    the global ones (``torch.nn.modules.module.register_module_*_hook``), or
    None."""
    from torch.nn.modules import module as M

    kinds = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
             "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}
    found = [label for n, label in kinds.items() if getattr(head, n, None)]
    found += ["global " + label for n, label in kinds.items() if getattr(M, "_global" + n, None)]
    return ", ".join(found) or None


def _forward_structure(model) -> tuple[str | None, str | None]:
    """(fatal, reason): ``fatal`` when the forward never calls
    ``self.loss_function`` (no hook can apply), ``reason`` when the fused
    path's assumptions about the forward do not hold. Read from the class's
    forward source."""
    fn = inspect.unwrap(type(model).forward)
    params = inspect.signature(fn).parameters
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError) as exc:
        return None, f"the source of {type(model).__name__}.forward is not readable ({exc})"
    calls: dict[str, list[int]] = {"lm_head": [], "loss_function": []}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "self" and \
                node.func.attr in calls:
            calls[node.func.attr].append(node.lineno)
    name = type(model).__name__
    if len(calls["loss_function"]) != 1:
        return (f"{name}.forward calls self.loss_function {len(calls['loss_function'])} times "
                "(expected once): no loss hook can apply to it"), None
    if "labels" not in params or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return f"{name}.forward does not take labels and **kwargs", None
    if len(calls["lm_head"]) != 1:
        return None, f"{name}.forward calls self.lm_head {len(calls['lm_head'])} times"
    if calls["lm_head"][0] > calls["loss_function"][0]:
        return None, f"{name}.forward computes the loss before calling self.lm_head"
    if "logits_to_keep" not in params:
        return None, f"{name}.forward has no logits_to_keep argument"
    return None, None


def _causal_lm(model):
    """The transformers ``PreTrainedModel`` inside ``model``: itself, or inside
    a PEFT wrapper, ``torch.compile``'s module, ``nn.DataParallel`` or
    ``DistributedDataParallel`` (any nesting of them)."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ImportError("softmax_gpu.integrations.transformers needs transformers: "
                          "pip install softmax-gpu[transformers]") from exc
    for _ in range(8):  # wrappers around wrappers, never a cycle
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's: the patch is seen (a recompile)
        else:
            break
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, transformers.PreTrainedModel):
        raise TypeError(f"apply() needs a loaded transformers model (or one inside a PEFT "
                        f"model, torch.compile, DataParallel or DDP), got {type(model).__name__}")
    return inner


def _loss_contract(model) -> None:
    """Raise unless the model's loss is transformers' ForCausalLMLoss with the
    parameters that causal_lm_loss implements."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    current = model.loss_function
    if current is not ForCausalLMLoss:
        raise ValueError(
            f"{type(model).__name__}.loss_function is {getattr(current, '__name__', current)!r}, "
            "not transformers' ForCausalLMLoss: apply() only replaces the causal-LM loss")
    params = inspect.signature(ForCausalLMLoss).parameters
    named = tuple(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD)
    if named != _LOSS_PARAMS or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise RuntimeError(
            f"transformers' ForCausalLMLoss takes {list(params)}; softmax_gpu implements "
            f"{list(_LOSS_PARAMS) + ['**kwargs']}: this transformers version is not supported")


def apply(model, *, fused_linear: bool = True):
    """Run the causal-LM loss of one loaded model on softmax_gpu's kernels.

    Args:
        model: a loaded transformers ``*ForCausalLM`` instance, or one inside
            a PEFT model, ``torch.compile``'s module, ``nn.DataParallel`` or
            ``DistributedDataParallel`` (the inner model is patched).
        fused_linear: training forwards with labels compute the loss with the
            fused linear cross-entropy from the final hidden states and
            ``lm_head``'s weight; their ``output.logits`` is None. Used only
            for the architectures in :data:`FUSED_MODEL_TYPES` whose forward
            passes the structure checks and whose ``lm_head`` is a plain
            ``nn.Linear`` (not a LoRA-adapted, quantised or hooked layer);
            otherwise a warning says why and only the loss hook is installed.

    Returns:
        ``model`` itself. Applying again replaces the previous patch.

    Raises:
        TypeError: ``model`` is not a transformers model.
        ValueError: the model's loss is not transformers' ``ForCausalLMLoss``.
        RuntimeError: the installed transformers' ``ForCausalLMLoss`` or the
            model's forward is not the structure this patch relies on.
    """
    lm = _causal_lm(model)
    if _STATE in lm.__dict__:
        revert(model)
    # reverted while a wrapper set after apply() (accelerate's autocast) still
    # calls the patched forward: the wrapper stays, the patch is switched on
    wrapped = lm.__dict__.get(_STATE)
    if wrapped is not None and _wrappers_around_patch(lm) is None:
        del lm.__dict__[_STATE]  # the wrapper is gone too: patch afresh
        wrapped = None
    _loss_contract(lm)
    fatal, reason = _forward_structure(lm)
    if fatal is not None:
        raise RuntimeError(f"softmax_gpu.integrations.transformers.apply: {fatal}")
    model_type = getattr(lm.config, "model_type", None)
    if reason is None and model_type not in FUSED_MODEL_TYPES:
        reason = f"architecture {model_type!r} is not one the fused path is tested on"
    head = getattr(lm, "lm_head", None)
    if reason is None:
        reason = _fused_blocker(head)
    if reason is None and head is not lm.get_output_embeddings():
        reason = "lm_head is not the model's output embeddings"
    if reason is None and head.out_features != lm.config.vocab_size:
        reason = f"lm_head has {head.out_features} outputs, vocab_size is {lm.config.vocab_size}"
    fused = bool(fused_linear) and reason is None
    if fused_linear and reason is not None:
        warnings.warn(f"softmax_gpu: {type(lm).__name__} gets the loss-level hook only (the "
                      f"logits are computed), not the fused linear cross-entropy: {reason}",
                      stacklevel=2)
    sig = inspect.signature(lm.forward)
    names = [n for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    labels_pos = names.index("labels") if "labels" in names else len(names)
    saved = wrapped.saved_forward if wrapped is not None else lm.__dict__.get("forward")
    state = _Patch(saved, lm.__dict__.get("_loss_function"), fused, reason, labels_pos)
    lm.__dict__[_STATE] = state
    lm.loss_function = functools.partial(_loss_hook, lm)
    if wrapped is None:
        lm.forward = _Forward(lm)
    lm.__dict__[_REPLICATE] = _Replicate(lm)
    if fused:
        _stand_in(head)
    return model


def revert(model):
    """Undo :func:`apply` on ``model`` (a no-op when it is not patched).

    When ``model.forward`` was wrapped after :func:`apply` by a wrapper that
    still calls the patched forward (accelerate's autocast wrapper, which
    ``Trainer(bf16=True)`` or ``fp16=True`` sets), the wrapper stays: the
    patched forward then passes every call to the forward that ran before
    :func:`apply`, and the loss is the model's own again.

    Raises RuntimeError when ``model.forward`` was replaced after
    :func:`apply` by something that no longer calls it (reverting would drop
    that): undo that first."""
    lm = _causal_lm(model)
    state = lm.__dict__.get(_STATE)
    if state is None or not state.active:
        return model
    depth = _wrappers_around_patch(lm)
    if depth is None:
        raise RuntimeError("model.forward was replaced after softmax_gpu's apply(); undo that "
                           "first, then revert(model)")
    ours = depth == 0  # else a wrapper that calls the patch stays
    if ours:
        del lm.__dict__["forward"]
        if state.saved_forward is not None:
            lm.__dict__["forward"] = state.saved_forward
    for m in lm.modules():  # lm_head, and a head since wrapped (a LoRA base_layer)
        if isinstance(m.__dict__.get("forward"), _HeadForward):
            del m.__dict__["forward"]
            m.__dict__.pop(_CALL_ATTR, None)
            m.__dict__.pop(_REPLICATE, None)
    del lm.__dict__["_loss_function"]
    if state.saved_loss is not None:
        lm.__dict__["_loss_function"] = state.saved_loss
    lm.__dict__.pop(_REPLICATE, None)
    if ours:
        del lm.__dict__[_STATE]
    else:  # kept for the wrapper's calls: the forward before apply()
        state.active = False
    return model


def _wrappers_around_patch(lm) -> int | None:
    """How many wrappers (``functools.wraps``' ``__wrapped__`` chain, bound
    or not) stand between ``lm.forward`` and the patched forward of ``lm``:
    0 when it is the patch itself (its :class:`_Forward`, or that bound as a
    method, as accelerate's ``unwrap_model`` leaves it); None when it does
    not call the patch."""
    fn = lm.__dict__.get("forward")
    if isinstance(fn, _Forward):
        return 0 if fn.__self__ is lm else None
    if getattr(fn, "__self__", lm) is not lm:
        return None
    fn = getattr(fn, "__func__", fn)
    for depth in range(32):  # a chain of wrappers, never a cycle
        if fn is None:
            return None
        if isinstance(fn, _Forward):
            return depth if fn.__self__ is lm else None
        if getattr(fn, "__code__", None) is _forward.__code__:
            return depth
        fn = getattr(fn, "__wrapped__", None)
    return None


def applied(model) -> dict | None:
    """None if ``model`` is not patched, else ``{"fused_linear": bool, "reason":
    str | None}`` (``reason``: why the fused path is off, when it is)."""
    state = _causal_lm(model).__dict__.get(_STATE)
    if state is None or not state.active:
        return None
    return {"fused_linear": state.fused, "reason": state.reason}
