"""align.model.flash: attn_implementation="align_fa4". Off its GPUs it is transformers' SDPA function; the wiring of
the custom ops (layouts, fake versions, autograd, one graph under torch.compile) is checked on CPU with a plain-torch
stand-in for the kernels; the FlashAttention-4 kernels themselves only on a Hopper/Blackwell GPU with flash-attn-4."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_model import V, ids, tiny

from align.convert import to_llama
from align.model import DecoderForCausalLM, flash
from align.models import load


def pair(dtype=torch.float32) -> tuple[DecoderForCausalLM, DecoderForCausalLM]:
    """An SDPA model and an align_fa4 one with the same weights, in train mode."""
    torch.manual_seed(0)
    sdpa = DecoderForCausalLM(tiny()).to(dtype).train()
    fa4 = DecoderForCausalLM(tiny()).to(dtype).train()
    fa4.load_state_dict(sdpa.state_dict())
    fa4.set_attn_implementation(flash.NAME)
    return sdpa, fa4


def assert_same_gradients(sdpa, fa4) -> None:
    """Every parameter's gradient points the same way in both models (bf16 kernels: cosine, not equality)."""
    for (name, pa), pb in zip(sdpa.named_parameters(), fa4.parameters()):
        cos = F.cosine_similarity(pa.grad.float().flatten(), pb.grad.float().flatten(), dim=0)
        assert cos > 0.99, (name, cos)


def test_off_its_gpus_it_is_sdpa():
    sdpa, fa4 = pair()
    x = ids()
    a, b = sdpa(input_ids=x, labels=x), fa4(input_ids=x, labels=x)
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding: a mask, which the kernels do not take
    torch.testing.assert_close(fa4.eval()(x, attention_mask=mask).logits, sdpa.eval()(x, attention_mask=mask).logits,
                               atol=0, rtol=0)
    hf = to_llama(sdpa).eval()  # any model of the registry takes it
    ref = hf(x).logits
    hf.set_attn_implementation(flash.NAME)
    torch.testing.assert_close(hf(x).logits, ref, atol=0, rtol=0)


def _scores(q, k, scale):
    """(B, T, heads, hs) q, k -> the causal scaled scores (B, nh, T, T) in fp32, keys repeated for GQA."""
    T, rep = q.shape[1], q.shape[2] // k.shape[2]
    s = q.transpose(1, 2).float() @ k.transpose(1, 2).float().repeat_interleave(rep, 1).transpose(-1, -2) * scale
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))


def reference_fwd(q, k, v, scale):
    """The kernels' contract in plain torch: (B, T, heads, hs) in, out and the fp32 log-sum-exp (B, nh, T)."""
    s = _scores(q, k, scale)
    vh = v.transpose(1, 2).float().repeat_interleave(q.shape[2] // k.shape[2], 1)
    return (s.softmax(-1) @ vh).to(q.dtype).transpose(1, 2).contiguous(), s.logsumexp(-1)


def reference_bwd(q, k, v, out, dout, lse, scale):
    """Attention's backward by hand (an op's implementation runs below autograd): dV = P'dO, dS = P (dP - rowsum(dO O)),
    dQ = dS K, dK = dS'Q; the repeated keys' gradients summed back per key-value head."""
    nkv, rep = k.shape[2], q.shape[2] // k.shape[2]
    p = (_scores(q, k, scale) - lse[..., None]).exp()  # (B, nh, T, T)
    qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))
    dp = doh @ vh.repeat_interleave(rep, 1).transpose(-1, -2)
    ds = p * (dp - (doh * oh).sum(-1, keepdim=True)) * scale
    fold = lambda g, like: g.unflatten(1, (nkv, rep)).sum(2).transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    dq = (ds @ kh.repeat_interleave(rep, 1)).transpose(1, 2).to(q.dtype).contiguous()
    return dq, fold(ds.transpose(-1, -2) @ qh, k), fold(p.transpose(-1, -2) @ doh, v)


@pytest.fixture
def stand_in(monkeypatch):
    """The kernels "apply" on CPU and run reference_fwd/bwd; returns the list of calls."""
    calls = []
    monkeypatch.setattr(flash, "_device_ok", lambda q: True)
    monkeypatch.setattr(flash, "MIN_TOKENS", 0)  # tiny inputs: the host-bound guard would send them to SDPA
    monkeypatch.setattr(flash, "_kernel_fwd", lambda *a: (calls.append("fwd"), reference_fwd(*a))[1])
    monkeypatch.setattr(flash, "_kernel_bwd", lambda *a: (calls.append("bwd"), reference_bwd(*a))[1])
    return calls


def test_the_ops_match_sdpa_and_keep_one_graph(stand_in):
    import torch._dynamo as dynamo

    q = torch.randn(2, 8, 4, 8, dtype=torch.bfloat16)
    k, v = torch.randn(2, 8, 2, 8, dtype=torch.bfloat16), torch.randn(2, 8, 2, 8, dtype=torch.bfloat16)
    torch.library.opcheck(flash.flash_attn_fwd, (q, k, v, 8**-0.5))  # fake shapes, autograd registration

    sdpa, fa4 = pair(torch.bfloat16)
    x = ids(T=16)
    loss = lambda m: m(input_ids=x, labels=x).loss  # noqa: E731
    assert dynamo.explain(loss)(fa4).graph_break_count == 0  # transformers' flash_attention_4 breaks at every layer
    stand_in.clear()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    a, b = loss(sdpa), compiled(fa4)
    a.backward()
    b.backward()
    assert stand_in == ["fwd", "fwd", "bwd", "bwd"]  # both layers, forward and backward, through the kernels
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0)
    assert_same_gradients(sdpa, fa4)


def test_eager_calls_skip_the_custom_op(stand_in, monkeypatch):
    # eagerly the kernels run through an autograd.Function: the op's dispatch costs more host time than they do
    def op(*a):
        raise AssertionError("eager call went through the custom op")

    monkeypatch.setattr(flash, "flash_attn_fwd", op)
    monkeypatch.setattr(flash, "flash_attn_bwd", op)
    sdpa, fa4 = pair(torch.bfloat16)
    x = ids(T=16)
    a, b = sdpa(input_ids=x, labels=x).loss, fa4(input_ids=x, labels=x).loss
    a.backward()
    b.backward()
    assert stand_in == ["fwd", "fwd", "bwd", "bwd"]
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0)
    assert_same_gradients(sdpa, fa4)


def test_what_the_kernels_do_not_take_goes_to_sdpa(stand_in, monkeypatch):
    sdpa, fa4 = pair(torch.bfloat16)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    fa4(input_ids=x, attention_mask=mask, labels=x)  # padding
    fa4.float()(input_ids=x, labels=x)  # fp32
    monkeypatch.setattr(flash, "MIN_TOKENS", x.numel() + 1)
    fa4.bfloat16()(input_ids=x, labels=x)  # too few tokens: host-bound, SDPA is faster
    assert stand_in == []
    monkeypatch.setattr(flash, "MIN_TOKENS", x.numel())
    fa4.bfloat16().eval()(input_ids=x, labels=x)
    assert stand_in == ["fwd", "fwd"]


def test_load_takes_attn_implementation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    DecoderForCausalLM(tiny()).save_pretrained(tmp_path / "m")
    assert load(tmp_path / "m", attn_implementation="eager").config._attn_implementation == "eager"
    monkeypatch.setattr(flash, "DEFAULT", None)  # as where flash-attn-4 is not installed
    assert load(tmp_path / "m").config._attn_implementation == "sdpa"
    monkeypatch.setattr(flash, "DEFAULT", flash.NAME)  # as where it is
    model = load(tmp_path / "m")
    assert model.config._attn_implementation == flash.NAME
    model.save_pretrained(tmp_path / "again")  # the choice is not saved: the dir loads where align is not
    assert flash.NAME not in json.dumps(json.loads((tmp_path / "again" / "config.json").read_text()))


def _fa4_gpu() -> bool:
    return flash.INSTALLED and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.skipif(not _fa4_gpu(), reason="needs flash-attn-4 and a Hopper or Blackwell GPU")
def test_kernels_match_sdpa_on_the_gpu(monkeypatch):
    monkeypatch.setattr(flash, "MIN_TOKENS", 0)
    cfg = dict(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    torch.manual_seed(0)
    sdpa = DecoderForCausalLM(tiny(**cfg)).to("cuda", torch.bfloat16).train()
    fa4 = DecoderForCausalLM(tiny(**cfg)).to("cuda", torch.bfloat16).train()
    fa4.load_state_dict(sdpa.state_dict())
    fa4.set_attn_implementation(flash.NAME)
    x = torch.randint(3, V, (4, 64), device="cuda")
    a = sdpa(input_ids=x, labels=x)
    a.loss.backward()
    for run in (fa4, torch.compile(fa4)):  # eager (the autograd.Function), then the custom op in one graph
        fa4.zero_grad()
        b = run(input_ids=x, labels=x)
        b.loss.backward()
        torch.testing.assert_close(b.logits.float(), a.logits.float(), rtol=0, atol=0.05 * a.logits.abs().max().item())
        assert_same_gradients(sdpa, fa4)


def test_commands_pass_attn_implementation(tokenizer_dir, tiny_lm_dir):
    # TRL's --attn_implementation reaches the model a command trains, built fresh or loaded
    from transformers import AutoTokenizer
    from trl import ModelConfig

    from align.pretrain import PretrainArguments, build_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = PretrainArguments(model_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4))
    assert build_model(args, ModelConfig(attn_implementation="eager"), tok).config._attn_implementation == "eager"
    loaded = build_model(args, ModelConfig(model_name_or_path=tiny_lm_dir, attn_implementation="eager"), tok)
    assert loaded.config._attn_implementation == "eager"
