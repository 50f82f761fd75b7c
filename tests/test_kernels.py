"""align.model.kernels: the opt-in Liger fast path (use_liger_kernel). Off CUDA the flag is inert; the wiring of
the fast path (fused q/k/v and gate/up matmuls, fused loss without logits) is checked on CPU with plain-torch
stand-ins for the kernels; the kernels themselves only on a GPU with liger-kernel installed."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from test_model import ids, tiny

import align  # noqa: F401  (registers the Auto classes)
from align.model import DecoderConfig, DecoderForCausalLM, kernels
from align.model.rope import apply_rotary_pos_emb


def pair(**overrides) -> tuple[DecoderForCausalLM, DecoderForCausalLM]:
    """The default model and a use_liger_kernel one with the same weights, in train mode."""
    torch.manual_seed(0)
    plain = DecoderForCausalLM(tiny(**overrides))
    fused = DecoderForCausalLM(tiny(**overrides, use_liger_kernel=True))
    fused.load_state_dict(plain.state_dict())
    return plain.train(), fused.train()


def test_flag_is_inert_off_cuda():
    plain, fused = pair()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = ids()
    a, b = plain(input_ids=x, labels=x), fused(input_ids=x, labels=x)
    assert b.logits is not None  # no fused loss on CPU: the logits are made as usual
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=0, rtol=0)
    torch.testing.assert_close(fused.eval()(x).logits, plain.eval()(x).logits, atol=0, rtol=0)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enabled()'s device test without a GPU."""

    is_cuda = property(lambda self: True)


def test_the_fast_path_steps_aside_under_compile(monkeypatch):
    # on a GPU with Liger installed, but inside a torch.compile graph: the plain ops, with no graph break (a break in
    # the test itself would run it eagerly, where it says "not compiling", and put Liger's kernels into the graph)
    import torch._dynamo as dynamo

    monkeypatch.setattr(kernels, "available", lambda: True)
    x = torch.ones(2).as_subclass(_OnCuda)
    f = lambda x: x + 1 if kernels.enabled(True, x) else x - 1  # noqa: E731
    assert f(x).tolist() == [2.0, 2.0]
    out = dynamo.explain(f)(x)
    assert out.graph_break_count == 0
    assert torch.compile(f, backend="eager")(x).tolist() == [0.0, 0.0]
    g = lambda x: x + 1 if kernels.loss_enabled(True, x) else x - 1  # noqa: E731  (the loss is an op: it stays)
    assert dynamo.explain(g)(x).graph_break_count == 0
    assert torch.compile(g, backend="eager")(x).tolist() == [2.0, 2.0]


def test_config_round_trips_the_flag(tmp_path):
    assert DecoderConfig().use_liger_kernel is False
    tiny(use_liger_kernel=True).save_pretrained(tmp_path)
    assert DecoderConfig.from_pretrained(tmp_path).use_liger_kernel is True


def reference_loss(hidden, weight, labels, num_items_in_batch=None, ignore_index=-100):
    logits, target = F.linear(hidden[:, :-1], weight).float(), labels[:, 1:]
    out = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=ignore_index, reduction="sum")
    return out / (num_items_in_batch if num_items_in_batch is not None else (target != ignore_index).sum())


@pytest.fixture
def reference_kernels(monkeypatch):
    """The fast path on CPU, Liger's kernels swapped for plain torch."""
    monkeypatch.setattr(kernels, "enabled", lambda flag, x: flag)
    monkeypatch.setattr(kernels, "loss_enabled", lambda flag, x: flag)
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps: w * (x.float() * torch.rsqrt(
        x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype))
    monkeypatch.setattr(kernels, "rope", apply_rotary_pos_emb)
    monkeypatch.setattr(kernels, "causal_lm_loss", reference_loss)


def test_fast_path_wiring(reference_kernels):
    """Fused q/k/v and gate/up matmuls and the logit-free loss: same loss and gradients as the plain model."""
    plain, fused = pair()
    x = ids()
    labels = x.clone()
    labels[:, :3] = -100
    a, b = plain(input_ids=x, labels=labels), fused(input_ids=x, labels=labels)
    assert b.logits is None  # the fused loss makes no logits
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fused(input_ids=x, labels=labels, num_items_in_batch=n).loss, a.loss)
    torch.testing.assert_close(fused.eval()(x).logits, plain.eval()(x).logits)  # no labels: logits as usual


def reference_ce_grad_(logits, labels, loss, ignore_index):
    """Liger's cross-entropy kernel's contract in plain torch (kernels.cross_entropy_grad_)."""
    x, keep = logits.float(), labels != ignore_index
    t = labels.clamp(min=0)
    loss.copy_((x.logsumexp(-1) - x.gather(1, t[:, None])[:, 0]) * keep)
    g = x.softmax(-1)
    g[torch.arange(len(t)), t] -= 1
    logits.copy_(g * keep[:, None])


@pytest.fixture
def small_chunks(monkeypatch):
    """The chunked loss on CPU: the kernel swapped for plain torch, 3 rows of 11 logits a chunk."""
    monkeypatch.setattr(kernels, "cross_entropy_grad_", reference_ce_grad_)
    monkeypatch.setattr(kernels, "CHUNK", 3 * 11)


@pytest.mark.parametrize("num_items", [None, 13])
def test_chunked_loss_matches_the_logits_loss(small_chunks, num_items):
    # several chunks, the last one short; ignored labels; an upstream gradient that is not 1 (a scaled loss)
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 2] = labels[1, 4] = -100
    ref = reference_loss(h, w, labels, num_items)
    (3 * ref).backward()
    ref_grads = h.grad, w.grad
    h.grad = w.grad = None
    out = kernels.causal_lm_loss(h, w, labels, num_items)
    (3 * out).backward()
    torch.testing.assert_close(out, ref.float())
    torch.testing.assert_close(h.grad, ref_grads[0])
    torch.testing.assert_close(w.grad, ref_grads[1])


def test_chunked_loss_compiles_as_one_op(small_chunks):
    # under torch.compile the loss is one custom op in one graph, with its gradients through AOTAutograd
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    h = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3] = -100
    assert dynamo.explain(kernels.causal_lm_loss)(h, w, labels).graph_break_count == 0
    ref = reference_loss(h, w, labels)
    ref_grads = torch.autograd.grad(2 * ref, (h, w))
    out = torch.compile(kernels.causal_lm_loss, backend="aot_eager", fullgraph=True)(h, w, labels)
    torch.testing.assert_close(out, ref.float())
    for g, r in zip(torch.autograd.grad(2 * out, (h, w)), ref_grads):
        torch.testing.assert_close(g, r)
    with torch.no_grad():  # no gradients asked for: none made, the same loss
        torch.testing.assert_close(kernels.causal_lm_loss(h, w, labels), out.detach())


def test_compiled_model_keeps_the_fused_loss(small_chunks, monkeypatch):
    # the decoder compiled in one graph: its layers plain, its loss the fused op, the plain model's loss and gradients
    monkeypatch.setattr(kernels, "loss_enabled", lambda flag, x: flag)
    plain, fused = pair()
    x = ids()
    a = plain(input_ids=x, labels=x)
    b = torch.compile(fused, backend="aot_eager", fullgraph=True)(input_ids=x, labels=x)
    assert b.logits is None
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_chunked_loss_runs_under_a_trainers_autocast(small_chunks):
    # mixed precision: fp32 weights and hidden states, matmuls in bf16 under autocast (a Trainer's --bf16)
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_loss(h, w, labels)
        out = kernels.causal_lm_loss(h, w, labels)
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref.float(), rtol=2e-2, atol=0)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0, atol=3e-2 * r.abs().max().item())


def test_fast_path_leaves_peft_wrapped_projections_unfused(reference_kernels):
    from peft import LoraConfig, get_peft_model

    plain, fused = pair()
    x = ids()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    a = get_peft_model(plain, lora).eval()
    torch.manual_seed(1)
    b = get_peft_model(fused, lora).eval()
    torch.testing.assert_close(b(input_ids=x).logits, a(input_ids=x).logits)  # adapters applied on the fast path


def liger_gpu() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def gpu_pair(dtype: torch.dtype = torch.bfloat16) -> tuple[DecoderForCausalLM, DecoderForCausalLM]:
    """pair() at a shape for the GPU's kernels, on CUDA in dtype."""
    cfg = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    plain = DecoderForCausalLM(DecoderConfig(**cfg)).to("cuda", dtype).train()
    fused = DecoderForCausalLM(DecoderConfig(**cfg, use_liger_kernel=True)).to("cuda", dtype).train()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.skipif(not liger_gpu(), reason="needs CUDA and liger-kernel")
def test_liger_kernels_match_plain_model_on_gpu():
    plain, fused = gpu_pair()
    x = torch.randint(3, 512, (2, 128), device="cuda")
    a, b = plain(input_ids=x, labels=x), fused(input_ids=x, labels=x)
    assert b.logits is None
    torch.testing.assert_close(b.loss.float(), a.loss.float(), rtol=2e-2, atol=0)
    a.loss.backward()
    b.loss.backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight"):
        ga, gb = plain.get_parameter(name).grad.float(), fused.get_parameter(name).grad.float()
        assert F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99, name
    with torch.no_grad():
        la, lb = plain.eval()(x).logits.float(), fused.eval()(x).logits.float()
    assert (lb - la).abs().max() <= 5e-2 * la.abs().max()

    # a trainer's mixed precision: fp32 weights, bf16 matmuls under autocast
    plain32, fused32 = gpu_pair(torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = plain32(input_ids=x, labels=x), fused32(input_ids=x, labels=x)
    torch.testing.assert_close(b.loss.float(), a.loss.float(), rtol=2e-2, atol=0)
    b.loss.backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in fused32.parameters())

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    peft_model = get_peft_model(copy.deepcopy(fused).train(), lora)
    out = peft_model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.skipif(not liger_gpu(), reason="needs CUDA and liger-kernel")
def test_compiled_fast_path_keeps_the_fused_loss_on_gpu():
    # under torch.compile the layers are Inductor's and the loss is the fused op: no logits, the plain model's loss
    plain, fused = gpu_pair()
    x = torch.randint(3, 512, (2, 128), device="cuda")
    a, b = plain(input_ids=x, labels=x), torch.compile(fused, fullgraph=True)(input_ids=x, labels=x)
    assert b.logits is None
    torch.testing.assert_close(b.loss.float(), a.loss.float(), rtol=2e-2, atol=0)
    a.loss.backward()
    b.loss.backward()
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        ga, gb = plain.get_parameter(name).grad.float(), fused.get_parameter(name).grad.float()
        assert F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99, name


def test_use_liger_kernel_switches_a_loaded_decoder():
    """align.sft/pretrain's --use_liger_kernel: a decoder loaded without the flag gets it on every module that reads
    it (norms, MLPs, attention through the config) and off again; another architecture is left to transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.model.modeling import RMSNorm
    from align.model.moe import SwiGLU
    from align.models import use_liger_kernel

    model = DecoderForCausalLM(DecoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    switched = [m for m in model.modules() if isinstance(m, (RMSNorm, SwiGLU))]
    assert len(switched) == 2 * 2 + 1 + 2  # two norms a layer, the final norm, one MLP a layer
    use_liger_kernel(model, True)
    assert model.config.use_liger_kernel and all(m.liger for m in switched)
    use_liger_kernel(model, False)
    assert not model.config.use_liger_kernel and not any(m.liger for m in switched)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))
    use_liger_kernel(llama, True)
    assert not getattr(llama.config, "use_liger_kernel", False)
