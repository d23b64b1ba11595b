"""softmax_gpu.integrations.transformers against the real transformers package.

Every model is a tiny random fp32 config (vocabulary 96, one layer) on the CPU,
with the kernels in Triton's interpreter. The reference is the same model
instance unpatched (transformers' own ForCausalLMLoss on its logits), run
before apply() and again after revert().
"""

from __future__ import annotations

import copy
import functools
import textwrap
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from softmax_gpu.integrations import transformers as st  # noqa: E402

V, B, T = 96, 2, 8
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    # tied embeddings (Gemma's default) and the final logit softcap
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 8, "final_logit_softcapping": 5.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 8, "final_logit_softcapping": 4.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1,
                                               "bos_token_id": 1}),
}
LOSS_TOL = dict(rtol=2e-5, atol=2e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)


def tiny(arch="llama", cls=None, seed=0, **over):
    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **over})
    torch.manual_seed(seed)
    model = (cls or getattr(transformers, model_name))(cfg)
    with torch.no_grad():  # small init makes every logit nearly equal: spread them
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model.train()


def batch(seed=1, t=T):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100            # a prompt
    labels[1, -2:] = -100           # padding
    return ids, labels


def run(model, **kw):
    """(output, {name: grad}) of one forward (+ backward when there is a loss)."""
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    grads = {}
    if out.loss is not None and out.loss.requires_grad:
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(a, b):
    (oa, ga), (ob, gb) = a, b
    assert oa.loss.dtype == torch.float32 and ob.loss.dtype == torch.float32
    torch.testing.assert_close(oa.loss, ob.loss, **LOSS_TOL)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **GRAD_TOL, msg=name)


def train_cases(ids, labels):
    """The mean, and (in one forward) num_items_in_batch with pre-shifted
    labels, as sequence parallelism passes them: `labels` must then be unused."""
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].clone()
    shift[1, 0] = -100
    n = (shift != -100).sum() + 3  # as Trainer counts, over several micro-batches
    return {
        "mean": dict(input_ids=ids, labels=labels),
        "num_items_shift": dict(input_ids=ids, labels=torch.full_like(labels, 7),
                                shift_labels=shift, num_items_in_batch=n),
    }


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture(arch):
    model = tiny(arch)
    ids, labels = batch()
    cases = train_cases(ids, labels)
    ref = {k: run(model, **kw) for k, kw in cases.items()}
    model.eval()  # eval mode with grad mode on: loss and gradients too
    ref_eval = {k: run(model, **kw) for k, kw in cases.items()}
    ref_nolabels = run(model, input_ids=ids)
    model.train()
    if arch.startswith("gemma"):
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied

    for fused in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a known architecture: no fallback warning
            st.apply(model, fused_linear=fused)
        assert st.applied(model) == {"fused_linear": fused, "reason": None}
        for name, kw in cases.items():
            got = run(model, **kw)
            assert_same(got, ref[name])
            assert (got[0].logits is None) == fused, name
        # torch.no_grad in train mode: the unpatched logits, bit for bit
        with torch.no_grad():
            out = model(**cases["mean"])
        assert torch.equal(out.logits, ref_eval["mean"][0].logits)
        torch.testing.assert_close(out.loss, ref_eval["mean"][0].loss, **LOSS_TOL)
        out = model(input_ids=ids)  # no labels, training mode
        assert out.loss is None and torch.equal(out.logits, ref_nolabels[0].logits)
    # eval mode (the same path whatever fused_linear says): logits bit for bit,
    # loss and gradients as transformers'
    model.eval()
    for name, kw in cases.items():
        got = run(model, **kw)
        assert torch.equal(got[0].logits, ref_eval[name][0].logits), name
        assert_same(got, ref_eval[name])
    model.train()

    st.revert(model)
    assert st.applied(model) is None
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__
    again = run(model, **cases["mean"])
    assert torch.equal(again[0].loss, ref["mean"][0].loss)


def test_logits_to_keep_num_items_and_tuple_output():
    model = tiny("llama")
    ids, labels = batch()
    k = 5
    idx = torch.tensor([0, 2, 3, 7])
    n = (labels[:, 1:] != -100).sum()
    cases = [
        dict(input_ids=ids, labels=labels[:, -k:], logits_to_keep=k),
        dict(input_ids=ids, labels=labels[:, idx], logits_to_keep=idx),
        dict(input_ids=ids, labels=labels, num_items_in_batch=int(n) + 2),  # an int
        dict(input_ids=ids, labels=labels, num_items_in_batch=n),           # alone
    ]
    refs = [run(model, **kw) for kw in cases]
    st.apply(model)
    for kw, ref in zip(cases, refs):
        assert_same(run(model, **kw), ref)
    # return_dict=False: the tuple holds no logits
    out = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    assert all(o is None or o.dim() == 0 or o.shape[-1] != V for o in out[1:] if torch.is_tensor(o))
    # mismatched labels are an error, as without the patch
    with pytest.raises(ValueError, match="positions have logits"):
        model(input_ids=ids, labels=labels, logits_to_keep=k)


def test_fused_path_states_num_items_as_the_divisor(monkeypatch):
    """num_items_in_batch reaches the fused loss as its divisor (the gradient
    written in the forward includes it: no rescaling pass over dX and dW in
    the backward); a zero number is divided after, as transformers does."""
    model = tiny("llama")
    ids, labels = batch()
    n = (labels[:, 1:] != -100).sum() + 3
    cases = {"tensor": n, "int": int(n), "zero": 0, "shape (1,)": n.reshape(1)}
    refs = {k: run(model, input_ids=ids, labels=labels, num_items_in_batch=v)
            for k, v in cases.items()}
    seen = []
    lce = st._linear_cross_entropy
    monkeypatch.setattr(st, "_linear_cross_entropy",
                        lambda *a, **kw: seen.append(kw) or lce(*a, **kw))
    st.apply(model)
    for k, v in cases.items():
        seen.clear()
        out, grads = run(model, input_ids=ids, labels=labels, num_items_in_batch=v)
        assert len(seen) == 1 and seen[0]["reduction"] == "sum", k
        if k == "zero":
            assert seen[0]["divisor"] is None and out.loss.isinf() and refs[k][0].loss.isinf()
            continue
        assert seen[0]["divisor"] is v or seen[0]["divisor"] == v, k
        assert_same((out, grads), refs[k])


def test_patched_model_pickles():
    """torch.save / pickle of a patched model: it loads patched, with the same
    results, and reverts."""
    import io
    import pickle

    model = tiny("llama")
    cases = train_cases(*batch())
    refs = {k: run(model, **kw) for k, kw in cases.items()}
    st.apply(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    again = pickle.loads(pickle.dumps(model))
    for m in (loaded, again):
        assert st.applied(m) == {"fused_linear": True, "reason": None}
        for k, kw in cases.items():
            got = run(m, **kw)
            assert got[0].logits is None, k
            assert_same(got, refs[k])
    st.revert(loaded)
    assert st.applied(loaded) is None and "forward" not in loaded.__dict__
    assert run(loaded, **cases["mean"])[0].logits is not None


def test_compile_fullgraph_fused_path():
    """torch.compile(fullgraph=True) of a patched model: the fused path traces
    in one graph, and the check of the logit transform still raises."""
    model = tiny("llama")
    kw = train_cases(*batch())["num_items_shift"]
    ref = run(model, **kw)
    st.apply(model)
    compiled = torch.compile(model, fullgraph=True)
    model.zero_grad(set_to_none=True)
    out = compiled(**kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert out.logits is None
    assert_same((out, grads), ref)
    # lm_head's stand-in stays (torch.compile traces setting it, not removing
    # it) until revert; between fused calls it is the Linear's own forward
    x = torch.randn(3, model.lm_head.in_features)
    assert torch.equal(model.lm_head(x), F.linear(x, model.lm_head.weight, model.lm_head.bias))
    st.revert(model)
    assert "forward" not in model.lm_head.__dict__

    changed = tiny("llama", cls=_subclass("""
        logits = self.lm_head(hidden_states[:, -logits_to_keep:])
        logits = logits * 0.5
    """))
    st.apply(changed)
    with pytest.raises(RuntimeError, match="transforms the logits"):
        torch.compile(changed, fullgraph=True)(**kw)


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "global_forward", "backward"])
def test_hooked_lm_head_falls_back(hook):
    """A hook around lm_head's call (its own, or a global module hook, as
    DeepSpeed ZeRO-3 and profilers install) would see the fused path's stand-in
    for the logits: the forward computes the logits instead, with a warning,
    and the fused path comes back when the hook is removed."""
    from torch.nn.modules import module as M

    model = tiny("llama")
    kw = train_cases(*batch())["mean"]
    ref = run(model, **kw)
    st.apply(model)
    seen = []
    head = model.lm_head
    handle = {
        "forward": lambda: head.register_forward_hook(lambda m, i, o: seen.append(o.shape)),
        "forward_pre": lambda: head.register_forward_pre_hook(
            lambda m, i: seen.append(i[0].shape)),
        "global_forward": lambda: M.register_module_forward_hook(
            lambda m, i, o: seen.append(o.shape) if m is head else None),
        "backward": lambda: head.register_full_backward_hook(
            lambda m, gi, go: seen.append(go[0].shape)),
    }[hook]()
    try:
        with pytest.warns(UserWarning, match="hooks"):
            got = run(model, **kw)
    finally:
        handle.remove()
    assert got[0].logits is not None and seen
    assert seen[0][-1] in (V, model.config.hidden_size)  # the real logits / hidden states
    assert_same(got, ref)
    got = run(model, **kw)
    assert got[0].logits is None
    assert_same(got, ref)


def test_token_accuracy():
    model = tiny("qwen2")
    ids, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    labels[:, 2::2] = logits.argmax(-1)[:, 1:-1:2]  # some targets are the model's argmax
    target = F.pad(labels, (0, 1), value=-100)[:, 1:]
    kept = target != -100
    expected = ((logits.argmax(-1) == target) & kept).sum() / kept.sum()
    assert 0.3 < expected < 1
    st.apply(model)
    out = model(input_ids=ids, labels=labels, return_token_accuracy=True)
    assert out.logits is None
    torch.testing.assert_close(out.token_accuracy, expected.float())
    model.eval()
    out = model(input_ids=ids, labels=labels, return_token_accuracy=True)
    torch.testing.assert_close(out.token_accuracy, expected.float())
    model.train()
    assert not hasattr(model(input_ids=ids, labels=labels), "token_accuracy")


def test_peft_lora():
    peft = pytest.importorskip("peft")
    # LoRA on the attention: the fused path; every trainable (LoRA) gradient matches
    base = tiny("llama")
    ids, labels = batch()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    ref = run(lora, input_ids=ids, labels=labels)
    assert st.apply(lora) is lora
    assert st.applied(lora)["fused_linear"]
    got = run(lora, input_ids=ids, labels=labels)
    assert got[0].logits is None
    assert_same(got, ref)
    st.revert(lora)

    # LoRA on lm_head: never silently ignored; the loss hook with a warning
    base = tiny("llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    ref = run(lora, input_ids=ids, labels=labels)
    with pytest.warns(UserWarning, match="loss-level hook only.*not a plain torch.nn.Linear"):
        st.apply(lora)
    assert st.applied(lora)["fused_linear"] is False
    got = run(lora, input_ids=ids, labels=labels)
    assert got[0].logits is not None
    assert_same(got, ref)
    assert any("lm_head.lora" in n for n in got[1])


def test_unknown_architecture_gets_the_loss_hook():
    cfg = transformers.OlmoConfig(**COMMON)
    torch.manual_seed(0)
    model = transformers.OlmoForCausalLM(cfg).train()
    ids, labels = batch()
    ref = run(model, input_ids=ids, labels=labels)
    with pytest.warns(UserWarning, match="loss-level hook only.*'olmo' is not one the fused"):
        st.apply(model)
    got = run(model, input_ids=ids, labels=labels)
    assert got[0].logits is not None
    assert_same(got, ref)


def _uneven_batches() -> list[dict]:
    """Eight sequences whose kept tokens differ (so num_items_in_batch matters)."""
    g = torch.Generator().manual_seed(3)
    data = []
    for i in range(8):
        ids = torch.randint(0, V, (T,), generator=g)
        labels = ids.clone()
        labels[: (i * 3) % 7] = -100
        data.append({"input_ids": ids, "labels": labels,
                     "attention_mask": torch.ones(T, dtype=torch.long)})
    return data


def _trainer_run(out_dir, patch, *, fp16: bool = False):
    """Two steps of a real Trainer (gradient_accumulation_steps=2) on the tiny
    Llama, ``patch(model)`` applied first unless None: (logged losses, final
    parameters as fp32 on the CPU). ``fp16``: Trainer(fp16=True) on CUDA, the
    head scaled down so that 2^16-scaled gradients stay finite."""
    model = tiny("llama", seed=5)
    if fp16:
        with torch.no_grad():
            model.lm_head.weight.mul_(0.05)
    if patch is not None:
        patch(model)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=5e-2, logging_steps=1,
        report_to=[], save_strategy="no", seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant",
        optim="adamw_torch", **(dict(fp16=True) if fp16 else dict(use_cpu=True)))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_uneven_batches())
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the loss
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().float().cpu() for n, p in model.named_parameters()}


def _assert_same_training(run, ref):
    """Two (losses, parameters) of _trainer_run agree."""
    (losses, params), (ref_losses, ref_params) = run, ref
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5,
                               atol=1e-6)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-4, atol=1e-5,
                                   msg=name)


def test_trainer_gradient_accumulation(tmp_path):
    """A real Trainer, gradient_accumulation_steps=2, uneven kept tokens per
    micro-batch (so num_items_in_batch matters): the same logged losses and
    final parameters with and without apply()."""
    pytest.importorskip("accelerate")
    ref = _trainer_run(tmp_path / "plain", None)
    _assert_same_training(_trainer_run(tmp_path / "patched", st.apply), ref)
    init = dict(tiny("llama", seed=5).named_parameters())
    assert all(not torch.equal(ref[1][n], init[n]) for n in ("lm_head.weight",
                                                             "model.norm.weight"))


def test_revert_and_apply_under_accelerates_autocast_wrapper():
    """Trainer(bf16=True) / fp16=True wrap model.forward after apply() (accelerate's
    autocast, around the patched forward): revert() then leaves the wrapper in
    place and the model computes its own logits and loss; apply() again switches
    the fused path back on under the same wrapper."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    model, ref = tiny("llama"), tiny("llama")
    ids, labels = batch()
    st.apply(model)
    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer's, earlier
    try:
        acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        model, ref = acc.prepare_model(model), acc.prepare_model(ref)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    wrapper = model.__dict__["forward"]
    assert not isinstance(wrapper, st._Forward)  # accelerate's, around ours
    want = ref(input_ids=ids, labels=labels)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused path ran under the wrapper
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-2, atol=2e-2)  # bf16 logits

    st.revert(model)
    assert st.applied(model) is None and model.__dict__["forward"] is wrapper
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)
    st.revert(model)  # a no-op

    st.apply(model)
    assert st.applied(model) == {"fused_linear": True, "reason": None}
    assert model.__dict__["forward"] is wrapper
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    st.revert(model)
    model.__dict__["forward"] = functools.partial(type(model).forward, model)  # no longer ours
    st.apply(model, fused_linear=False)  # a fresh patch around that forward
    assert st.applied(model) == {"fused_linear": False, "reason": None}
    assert isinstance(model.__dict__["forward"], st._Forward)
    plain = type(ref).forward(ref, input_ids=ids, labels=labels)  # fp32, no autocast
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, plain.logits)
    torch.testing.assert_close(out.loss, plain.loss)


def _replicate_on_cpu(net, scale: float):
    """torch.nn.parallel.replicate's module copy (``_replicate_for_data_parallel``
    per module, children and parameters wired as it wires them), with each
    broadcast parameter replaced by a differentiable copy times ``scale``
    (replicate needs CUDA devices)."""
    modules = list(net.modules())
    copies = {m: m._replicate_for_data_parallel() for m in modules}
    params = {p: p * scale for p in net.parameters()}
    for m in modules:
        replica = copies[m]
        for key, child in m._modules.items():
            replica._modules[key] = None if child is None else copies[child]
        for key, p in m._parameters.items():
            setattr(replica, key, None if p is None else params[p])
    return copies[net]


@pytest.mark.parametrize("fused,bound", [(True, False), (False, False), (True, True)])
def test_data_parallel_replicas_run_on_their_own_weights(fused, bound):
    """nn.DataParallel (Trainer's with several GPUs and no launcher) copies
    the patched model per GPU: each replica computes with its own (broadcast)
    weights, its own head and its own patch state, and the gradients reach the
    original parameters as through torch's forward. ``bound``: the patched
    forward as a bound method (what accelerate's unwrap_model leaves)."""
    ids, labels = batch()
    ref, model = tiny("llama"), tiny("llama")
    st.apply(model, fused_linear=fused)
    if bound:
        model.forward = types.MethodType(model.forward.__func__, model)
    got_rep, want_rep = _replicate_on_cpu(model, 2.0), _replicate_on_cpu(ref, 2.0)
    assert got_rep.lm_head is not model.lm_head
    got = got_rep(input_ids=ids, labels=labels)
    want = type(ref).forward(want_rep, input_ids=ids, labels=labels)
    assert (got.logits is None) == fused
    torch.testing.assert_close(got.loss, want.loss)
    got.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert st.applied(model)["fused_linear"] == fused and model.lm_head.weight.grad is not None
    out = model(input_ids=ids, labels=labels)  # the original still runs on its own weights
    torch.testing.assert_close(out.loss, type(ref).forward(ref, input_ids=ids,
                                                          labels=labels).loss)
    st.revert(model)
    assert not any(k.startswith("_replicate") for m in model.modules() for k in m.__dict__)


def test_apply_through_compile_and_data_parallel_wrappers():
    """apply(), applied() and revert() reach the model inside torch.compile's
    module and nn.DataParallel (on a CPU it calls its module directly),
    nested either way; the compiled call then takes the fused path."""
    ids, labels = batch()
    want = tiny("llama")(input_ids=ids, labels=labels).loss
    model = tiny("llama")
    for wrapped in (torch.nn.DataParallel(model),
                    torch.nn.DataParallel(torch.compile(model, backend="aot_eager"))):
        assert st.apply(wrapped) is wrapped
        assert st.applied(model) == st.applied(wrapped) == {"fused_linear": True, "reason": None}
        out = wrapped(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want)
        st.revert(wrapped)
        assert st.applied(model) is None
        assert wrapped(input_ids=ids, labels=labels).logits is not None


# --- a transformers release that changes the forward -----------------------------


# transformers' own end of a causal-LM forward; `{condition}` adds to its if.
HF_TAIL = """
loss = None
if labels is not None{condition}:
    loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
return CausalLMOutputWithPast(loss=loss, logits=logits)
"""


def _subclass(head: str, tail: str | None = None, condition: str = ""):
    """A LlamaForCausalLM subclass whose forward runs the decoder, then
    ``head`` (which sets ``logits``), then ``tail`` (default: HF_TAIL); its
    source is readable by inspect, as transformers' own."""
    forward_body = textwrap.dedent(head) + (
        HF_TAIL.format(condition=condition) if tail is None else textwrap.dedent(tail))
    import importlib.util
    import sys
    import tempfile

    src = textwrap.dedent("""
        import torch
        from transformers import LlamaForCausalLM
        from transformers.modeling_outputs import CausalLMOutputWithPast

        class Changed(LlamaForCausalLM):
            skip_loss = False

            def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
                hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        """) + textwrap.indent(forward_body, " " * 8)
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(src)
    path.close()
    spec = importlib.util.spec_from_file_location(f"changed_{abs(hash(src))}", path.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.Changed


def test_forward_with_an_unknown_logit_transform_raises():
    cls = _subclass("""
        logits = self.lm_head(hidden_states[:, -logits_to_keep:])
        logits = logits * 0.5
    """)
    model = tiny("llama", cls=cls)
    ids, labels = batch()
    ref = run(model, input_ids=ids, labels=labels)
    st.apply(model)
    with pytest.raises(RuntimeError, match="transforms the logits"):
        model(input_ids=ids, labels=labels)
    st.apply(model, fused_linear=False)  # the loss hook still gives the right loss
    assert_same(run(model, input_ids=ids, labels=labels), ref)


def test_forward_without_loss_function_refuses():
    cls = _subclass("logits = self.lm_head(hidden_states)", tail="""
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)
    """)
    with pytest.raises(RuntimeError, match="calls self.loss_function 0 times"):
        st.apply(tiny("llama", cls=cls))


def test_forward_with_another_structure_falls_back():
    cls = _subclass("""
        logits = self.lm_head(hidden_states)
        extra = self.lm_head(hidden_states[:, :1])
    """)
    model = tiny("llama", cls=cls)
    ids, labels = batch()
    ref = run(model, input_ids=ids, labels=labels)
    with pytest.warns(UserWarning, match="calls self.lm_head 2 times"):
        st.apply(model)
    assert st.applied(model) == {"fused_linear": False,
                                 "reason": "Changed.forward calls self.lm_head 2 times"}
    assert_same(run(model, input_ids=ids, labels=labels), ref)


def test_forward_that_stops_calling_the_loss_raises_at_run_time():
    cls = _subclass("logits = self.lm_head(hidden_states)", condition=" and not self.skip_loss")
    model = tiny("llama", cls=cls)
    ids, labels = batch()
    for fused in (True, False):
        st.apply(model, fused_linear=fused)
        model.skip_loss = True
        with pytest.raises(RuntimeError, match="self.loss_function 0 times"):
            model(input_ids=ids, labels=labels)
        model.skip_loss = False
        model(input_ids=ids, labels=labels)


def test_loss_contract_checks(monkeypatch):
    from transformers.loss import loss_utils

    model = tiny("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(ValueError, match="not transformers' ForCausalLMLoss"):
        st.apply(model)
    del model.__dict__["_loss_function"]

    # a release whose ForCausalLMLoss grows a parameter we would silently ignore
    def ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                        shift_labels=None, label_smoothing=0.0, **kwargs):
        raise AssertionError

    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", ForCausalLMLoss)
    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", ForCausalLMLoss)
    with pytest.raises(RuntimeError, match="label_smoothing.*not supported"):
        st.apply(model)
    assert st.applied(model) is None


def test_instance_only_and_deepcopy():
    from transformers.loss import loss_utils

    a, b = tiny("llama"), tiny("llama")
    before = (transformers.LlamaForCausalLM.__dict__["forward"], torch.nn.functional.cross_entropy,
              loss_utils.ForCausalLMLoss, dict(loss_utils.LOSS_MAPPING), torch.nn.Linear.forward)
    st.apply(a)
    run(a, **train_cases(*batch())["mean"])
    after = (transformers.LlamaForCausalLM.__dict__["forward"], torch.nn.functional.cross_entropy,
             loss_utils.ForCausalLMLoss, dict(loss_utils.LOSS_MAPPING), torch.nn.Linear.forward)
    assert all(x is y or x == y for x, y in zip(before, after))  # nothing global changed
    assert st.applied(b) is None and "forward" not in b.__dict__
    import inspect
    assert "logits_to_keep" in inspect.signature(a.forward).parameters  # generate() sees it
    c = copy.deepcopy(a)
    assert st.applied(c) == st.applied(a)
    with torch.no_grad():
        c.lm_head.weight.mul_(2)
    ids, labels = batch()
    la, lc = a(input_ids=ids, labels=labels).loss, c(input_ids=ids, labels=labels).loss
    assert not torch.allclose(la, lc)  # the copy runs on its own weights
    # between fused calls lm_head is its own Linear (each copy's on its own weight)
    x = torch.randn(2, a.lm_head.in_features)
    for m in (a, c):
        assert torch.equal(m.lm_head(x), F.linear(x, m.lm_head.weight, m.lm_head.bias))
    st.revert(a)
    assert a.lm_head.forward.__func__ is torch.nn.Linear.forward  # restored by revert


# --- causal_lm_loss against ForCausalLMLoss ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_contract(dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    _, labels = batch()
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].clone()
    shift[0, -1] = 5
    n = torch.tensor(11)
    cases = [dict(), dict(num_items_in_batch=n), dict(num_items_in_batch=11),
             dict(num_items_in_batch=n.reshape(1)),  # Trainer's shape for several GPUs
             dict(shift_labels=shift), dict(ignore_index=3), dict(unknown_kwarg=1.0)]
    for kw in cases:
        lab = labels.masked_fill(labels == -100, 3) if "ignore_index" in kw else labels
        x = logits.clone().requires_grad_(True)
        r = logits.clone().requires_grad_(True)
        loss = st.causal_lm_loss(x, lab, V, **kw)
        ref = ForCausalLMLoss(r, lab, V, **kw)
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(loss, ref, **tol)
        loss.backward()
        ref.backward()
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.float(), r.grad.float(), **tol)
    # every token ignored: NaN, as transformers (the mean of nothing)
    none = torch.full_like(labels, -100)
    assert st.causal_lm_loss(logits, none, V).isnan() and ForCausalLMLoss(logits, none, V).isnan()


def test_causal_lm_loss_makes_no_fp32_copy_of_the_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    logits = torch.randn(B, T, V, dtype=torch.bfloat16)
    _, labels = batch()
    big = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if torch.is_tensor(o) and o.dtype == torch.float32 and o.numel() >= logits.numel():
                    big.append(func)
            return out

    with Record():
        from transformers.loss.loss_utils import ForCausalLMLoss
        ForCausalLMLoss(logits, labels, V)
    assert big, "the probe sees transformers' fp32 copy"
    big.clear()
    with Record():
        st.causal_lm_loss(logits, labels, V)
    assert not big, big


# --- fp16 mixed precision: autocast and a GradScaler -------------------------------


def _fp16_amp_steps(model, device, steps=3, init_scale=2.0 ** 10):
    """Train ``model`` a few steps as ``Trainer(fp16=True)`` does: the forward
    under fp16 autocast, the loss scaled by a GradScaler (a GradScaler's
    2^10) at backward, SGD. Returns (losses, parameters, final scale, the
    fp16 gradients that reached the logits)."""
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=5e-2)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    losses, logit_grads = [], []
    for step in range(steps):
        ids, labels = batch(seed=10 + step)
        with torch.autocast(device, dtype=torch.float16):
            out = model(input_ids=ids.to(device), labels=labels.to(device))
        if out.logits is not None:
            out.logits.register_hook(lambda g: logit_grads.append(g.detach().clone()))
        losses.append(out.loss.detach().float().cpu())
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    params = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    return torch.stack(losses), params, scaler.get_scale(), logit_grads


def _assert_same_fp16_training(got, ref, init):
    losses, params, scale, grads = got
    ref_losses, ref_params, ref_scale, ref_grads = ref
    assert scale == ref_scale  # the same steps were taken (none skipped for an inf)
    torch.testing.assert_close(losses, ref_losses, **LOSS_TOL)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-4, atol=1e-5,
                                   msg=name)
    assert any(not torch.equal(ref_params[n], init[n]) for n in ref_params)  # it trained
    # the logits' fp16 gradient (the loss scale applied): transformers' fp32
    # gradient rounded to fp16 (within one ulp), not one element lost
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype == torch.float16
        lost = int(((g == 0) & (r != 0)).sum())
        assert lost == 0, f"{lost} of {int((r != 0).sum())} logit gradients lost"
        ulp = 2.0 ** (torch.frexp(r.double().abs().clamp_min(2.0 ** -24))[1] - 11)
        assert bool(((g.double() - r.double()).abs() <= ulp.clamp_min(2.0 ** -24)).all())


def test_fp16_autocast_with_grad_scaler():
    """fp16 mixed precision by hand on the CPU, a tiny Llama for three steps
    (fp16 autocast, GradScaler at 2^10, SGD), the loss hook against stock
    transformers: the same losses, scales and parameters, and the logits'
    gradients transformers' within one fp16 ulp with none lost (a gradient
    stored in fp16 before the loss scale lost a third of them)."""
    init = {n: p.detach().clone() for n, p in tiny("llama", seed=5).named_parameters()}
    ref = _fp16_amp_steps(tiny("llama", seed=5), "cpu")
    model = st.apply(tiny("llama", seed=5), fused_linear=False)
    _assert_same_fp16_training(_fp16_amp_steps(model, "cpu"), ref, init)


def test_fp16_autocast_with_grad_scaler_fused_linear():
    """The same loop through the fused linear cross-entropy (apply()'s
    default: no logits, so no logit gradients to compare): the same scales
    and losses, and parameters within 1e-3 of stock transformers' (the fused
    dX and dW are GEMMs over the same fp16 logits gradient, summed in
    another order: 3e-4 apart here; formed in fp16 before the loss scale, as
    the forward once did, 5e-3)."""
    _assert_fused_fp16_training("cpu")


def _assert_fused_fp16_training(device):
    init = {n: p.detach().clone() for n, p in tiny("llama", seed=5).named_parameters()}
    ref_losses, ref_params, ref_scale, _ = _fp16_amp_steps(tiny("llama", seed=5), device)
    model = st.apply(tiny("llama", seed=5))
    assert st.applied(model)["fused_linear"]
    losses, params, scale, grads = _fp16_amp_steps(model, device)
    assert scale == ref_scale and grads == []  # no step skipped; the fused path ran
    torch.testing.assert_close(losses, ref_losses, **LOSS_TOL)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-3, atol=1e-3,
                                   msg=name)
    assert any(not torch.equal(ref_params[n], init[n]) for n in ref_params)  # it trained


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_training_on_cuda(tmp_path):
    """The same on CUDA (the compiled kernels): the hand loop, unfused and
    fused, then a real Trainer(fp16=True) (autocast and its GradScaler) for
    two steps, with and without apply(): the same logged losses and final
    parameters."""
    init = {n: p.detach().clone() for n, p in tiny("llama", seed=5).named_parameters()}
    ref = _fp16_amp_steps(tiny("llama", seed=5), "cuda")
    model = st.apply(tiny("llama", seed=5), fused_linear=False)
    _assert_same_fp16_training(_fp16_amp_steps(model, "cuda"), ref, init)
    _assert_fused_fp16_training("cuda")

    pytest.importorskip("accelerate")
    ref = _trainer_run(tmp_path / "plain", None, fp16=True)
    _assert_same_training(
        _trainer_run(tmp_path / "patched", lambda m: st.apply(m, fused_linear=False), fp16=True),
        ref)


def test_lm_head_replaced_after_apply():
    """A plain Linear put in as lm_head after apply() gets the fused path's
    stand-in on its first eager fused call (the same loss and gradients as
    transformers'); under torch.compile such a call computes the logits (a
    stand-in set inside the compiled call is not seen under torch 2.11),
    right all the same; a copy of a patched head carries its own stand-in;
    revert leaves lm_head plain."""
    model = tiny("llama")
    kw = train_cases(*batch())["mean"]
    ref = run(model, **kw)
    st.apply(model)

    def fresh():
        old = model.lm_head
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.load_state_dict(old.state_dict())
        return new

    model.lm_head = fresh()
    got = run(model, **kw)
    assert got[0].logits is None  # the fused path ran
    assert_same(got, ref)
    for head, fused in ((fresh(), False), (copy.deepcopy(model.lm_head), True)):
        model.lm_head = head
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        out = torch.compile(model, fullgraph=True)(**kw)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert (out.logits is None) == fused
        assert_same((out, grads), ref)
    st.revert(model)
    assert "forward" not in model.lm_head.__dict__


def test_lm_head_alone_carries_nothing_of_the_model():
    """lm_head pickled or deep-copied on its own (PEFT's modules_to_save)
    copies its stand-in and no part of the model or its patch state; revert
    leaves every module of the model plain."""
    import pickle

    model = tiny("llama")
    st.apply(model)
    head = model.lm_head
    size = len(pickle.dumps(torch.nn.Linear(head.in_features, head.out_features, bias=False)))
    assert len(pickle.dumps(head)) < size + 1000
    twin = copy.deepcopy(head)
    assert twin.forward.head is twin and not any(
        isinstance(v, st._Patch) for v in vars(twin).values())
    x = torch.randn(2, head.in_features)
    assert torch.equal(twin(x), F.linear(x, twin.weight))
    st.revert(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
