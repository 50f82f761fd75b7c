"""align.generate's command: replies for a prompts file, ready for best-of-n with align.score rank."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

from align import generate as G
from align import score
from align.models import load, load_tokenizer


def test_generate_then_rank_best_of_n(tiny_lm_dir, tiny_rm_dir, tmp_path, capsys):
    prompts = ["What is 3 + 4?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    inp, cands, best = tmp_path / "p.jsonl", tmp_path / "c.jsonl", tmp_path / "b.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    G.main(["--model", tiny_lm_dir, "--input", str(inp), "--output", str(cands), "--num_return_sequences", "3",
            "--do_sample", "--max_new_tokens", "6", "--seed", "1", "--device", "cpu"])
    rows = [json.loads(line) for line in cands.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(len(r["responses"]) == 3 for r in rows)
    model, tok = load(tiny_lm_dir, device="cpu"), load_tokenizer(tiny_lm_dir)
    same = G.generate(model, tok, prompts, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=1)
    assert [r["responses"] for r in rows] == same  # the library's replies, seeded alike

    # best-of-n on what it wrote: every response ranked by the reward model, best first
    score.main(["rank", "--model", tiny_rm_dir, "--input", str(cands), "--output", str(best), "--device", "cpu"])
    ranked = [json.loads(line) for line in best.read_text().splitlines()]
    for r, c in zip(ranked, rows):
        assert sorted(x["response"] for x in r["responses"]) == sorted(c["responses"])
        assert r["best"] == r["responses"][0]["response"]

    G.main(["--model", tiny_lm_dir, "--prompt", "What is 3 + 4?", "--max_new_tokens", "6", "--device", "cpu"])
    greedy = G.generate(model, tok, ["What is 3 + 4?"], max_new_tokens=6)[0][0]
    assert capsys.readouterr().out.rstrip("\n").endswith(greedy)


def test_generate_bad_input_names_the_line(tiny_lm_dir, tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"title": "no prompt"}) + "\n")
    assert G.main(["--model", tiny_lm_dir, "--input", str(inp), "--device", "cpu"]) == 2
    assert f"{inp}:2: no prompt field (expected one of prompt, messages" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # several greedy replies would be one reply n times
        G.main(["--model", tiny_lm_dir, "--prompt", "hi", "--num_return_sequences", "2"])


# ------------------------------------------------------------------ fast path (static cache + CUDA graph)
def _left_padded(vocab: int, pad: int, device="cpu"):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate((0, 3, 7, 1)):  # rows of different lengths, left-padded
        mask[row, :n_pad] = 0
    return ids.masked_fill(mask == 0, pad).to(device), mask.to(device)


def _fast_vs_hf(model, device="cpu", cuda_graph=None):
    from align.fastgen import fast_generate

    ids, mask = _left_padded(model.config.vocab_size, 0, device)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, max_new_tokens=20, min_new_tokens=20, **kw)[:, ids.shape[1]:]
    got = fast_generate(model, ids, mask, max_new_tokens=20, cuda_graph=cuda_graph)
    assert torch.equal(got, ref), (got, ref)
    # stop ids: rows end at their first stop token and pad after it, as HF generate does
    stop = [int(ref[0, 4]), int(ref[2, 9])]
    ref = model.generate(ids, max_new_tokens=20, eos_token_id=stop, **kw)[:, ids.shape[1]:]
    got = fast_generate(model, ids, mask, max_new_tokens=20, eos_token_id=stop, sync_every=3, cuda_graph=cuda_graph)
    assert torch.equal(got[:, : ref.shape[1]], ref) and (got[:, ref.shape[1]:] == 0).all()
    first = int(torch.isin(got[0], torch.tensor(stop, device=got.device)).nonzero()[0])  # row 0 stops by step 4
    assert first <= 4 and (got[0, first + 1 :] == 0).all()
    # no row padded: the prefill takes the model's own causal mask (the flash kernel on a GPU), not the 4D one
    ids, mask = ids[:, -4:], mask[:, -4:]
    ref = model.generate(ids, max_new_tokens=20, min_new_tokens=20, **{**kw, "attention_mask": mask})[:, ids.shape[1]:]
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=20, cuda_graph=cuda_graph), ref)


@pytest.mark.parametrize("name", ["tiny_lm_dir", "tiny_llama_dir"])
def test_fast_generate_greedy_equals_hf_generate(name, request):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(name)).eval()
    _fast_vs_hf(model)


def _with_lora(model):
    """``model`` with LoRA injected in place (random B, so the adapters change the tokens), as a trainer's
    ``peft_config`` leaves the model inside its PeftModel; returns (inner model, PeftModel)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    return peft_model.get_base_model(), peft_model


@pytest.mark.parametrize("name", ["tiny_lm_dir", "tiny_llama_dir"])
def test_fast_generate_drives_a_model_with_lora_inside(name, request):
    # LoRA GRPO/PPO: TRL wraps the policy in a PeftModel after align routed its generate; the rollout reaches the
    # model inside, whose Linear layers now carry adapters
    from transformers import AutoModelForCausalLM

    from align.fastgen import fast_generate, supports_fast_generate

    inner, peft_model = _with_lora(AutoModelForCausalLM.from_pretrained(request.getfixturevalue(name)).eval())
    assert supports_fast_generate(inner) and not supports_fast_generate(peft_model)
    _fast_vs_hf(inner)
    ids, mask = _left_padded(inner.config.vocab_size, 0, "cpu")
    with peft_model.disable_adapter():
        base = fast_generate(inner, ids, mask, max_new_tokens=12)
    assert not torch.equal(fast_generate(inner, ids, mask, max_new_tokens=12), base)  # the adapters take part


@pytest.mark.parametrize("name", ["tiny_lm_dir", "tiny_llama_dir"])
def test_routed_generate_folds_lora_into_a_shadow_that_follows_the_adapters(name, request):
    # LoRA GRPO/PPO rollouts: the routed generate decodes with the adapters folded into a shadow's weights (one
    # matmul a projection), refreshed at every call, and gives the greedy tokens of HF generate on the live adapters
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from align.fastgen import merged_lora, use_fast_generate

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(name)).eval()
    assert merged_lora(model) is None  # no adapters: nothing to fold
    assert use_fast_generate(model)
    inner, peft_model = _with_lora(model)
    original_forward = inner.forward  # patched as TRL's GRPO patches it: a closure over the model's bound forward
    inner.forward = types.MethodType(lambda self, *a, **kw: original_forward(*a, **kw), inner)
    lora_calls = []
    for m in inner.modules():
        if isinstance(m, LoraLinear):
            m.register_forward_hook(lambda *a: lora_calls.append(1))
    ids, mask = _left_padded(inner.config.vocab_size, 0, "cpu")
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    weights = {n: p.clone() for n, p in inner.named_parameters()}

    for _ in range(2):  # before and after a trainer step on the adapters
        with torch.no_grad():  # what HF generate does on the unmerged adapters, without the routing
            want = type(inner).generate(inner, ids, **kw)
        lora_calls.clear()
        assert torch.equal(peft_model.generate(input_ids=ids, **kw), want)
        assert not lora_calls  # the shadow decoded, not the unmerged adapters behind the patched forward
        shadow = inner.__dict__["_align_merged"]
        assert not any(isinstance(m, LoraLinear) for m in shadow.modules())
        assert shadow.get_input_embeddings().weight is inner.get_input_embeddings().weight  # shared, not copied
        for n, p in inner.named_parameters():  # the model's own weights untouched
            assert torch.equal(p, weights[n]), n
        with torch.no_grad():  # a trainer's step on the adapters
            for m in inner.modules():
                if isinstance(m, LoraLinear):
                    m.lora_B["default"].weight.add_(0.5 * torch.randn_like(m.lora_B["default"].weight))
        weights = {n: p.clone() for n, p in inner.named_parameters()}
    assert merged_lora(inner) is shadow  # built once, refreshed in place
    with peft_model.disable_adapter():  # adapters off: no folding, the base model decodes
        assert merged_lora(inner) is None


def test_routed_generate_runs_in_the_trainers_mixed_precision(tiny_lm_dir):
    # under LoRA the trainer's autocast wraps the PeftModel, not the model whose generate is routed: the rollouts
    # take the trainer's dtype themselves, and the shadow holds the merged weights in it
    from transformers import AutoModelForCausalLM

    from align.fastgen import use_fast_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    assert use_fast_generate(model, dtype=torch.bfloat16)
    inner, peft_model = _with_lora(model)
    seen = []
    ids, mask = _left_padded(inner.config.vocab_size, 0, "cpu")
    peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    shadow = inner.__dict__["_align_merged"]
    shadow.register_forward_pre_hook(lambda m, a: seen.append(torch.get_autocast_dtype("cpu")
                                                              if torch.is_autocast_enabled("cpu") else None))
    peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seen and set(seen) == {torch.bfloat16}
    q = shadow.model.layers[0].self_attn.q_proj
    lora_q = inner.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and inner.dtype == torch.float32
    with torch.no_grad():
        want = lora_q.get_base_layer().weight + lora_q.get_delta_weight("default")
    torch.testing.assert_close(q.weight.float(), want, atol=0, rtol=2**-8)  # bf16 rounding of W + scale B A


def test_compiled_step_runs_under_the_trainers_autocast(tiny_llama_dir):
    # a trainer's fp32 model under bf16 autocast: accelerate wraps model.forward in autocast, the compiled step
    # calls the class forward; without the same autocast it met a bf16 cache with fp32 queries and failed
    import types

    from transformers import AutoModelForCausalLM

    from align.fastgen import fast_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    ids, mask = _left_padded(model.config.vocab_size, 0, "cpu")
    eager = fast_generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=8, compile=True), eager)
    # the caller's own autocast (align.ppo generates under it) holds through every decode step
    model.forward = types.MethodType(type(model).forward, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=8), eager)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_compiled_decode_of_the_decoder_gives_the_eager_tokens(tiny_lm_dir, device):
    """align's decoder with compile=True (its RoPE angles one opaque op in the graph; on CUDA inside the captured
    graph too) greedy-decodes the tokens of the plain loop, in fp32."""
    from transformers import AutoModelForCausalLM

    from align.fastgen import fast_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).to(device).eval()
    ids, mask = _left_padded(model.config.vocab_size, 0, device)
    eager = fast_generate(model, ids, mask, max_new_tokens=12, cuda_graph=False)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=12, compile=True), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fast_generate_cuda_graph_equals_hf_generate(tiny_lm_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from align.fastgen import fast_generate

    for d in (tiny_lm_dir, tiny_llama_dir):
        model = AutoModelForCausalLM.from_pretrained(d).cuda().eval()  # fp32: no argmax flips from rounding
        _fast_vs_hf(model, "cuda", cuda_graph=True)
        _fast_vs_hf(_with_lora(copy.deepcopy(model))[0], "cuda", cuda_graph=True)
        # bf16: HF's kernels may round differently (another SDPA backend for its masks), so the replayed graph
        # is checked against the same loop run eagerly, which launches the very same kernels
        model = model.to(torch.bfloat16)
        ids, mask = _left_padded(model.config.vocab_size, 0, "cuda")
        graph = fast_generate(model, ids, mask, max_new_tokens=24, cuda_graph=True)
        assert torch.equal(graph, fast_generate(model, ids, mask, max_new_tokens=24, cuda_graph=False))


def test_fast_generate_sampling(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from align.fastgen import fast_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids, mask = _left_padded(model.config.vocab_size, 0)
    greedy = fast_generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_p=1e-6), greedy)
    runs = [fast_generate(model, ids, mask, max_new_tokens=8, do_sample=True, temperature=5.0,
                          generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], greedy)  # at temperature 5 over a 400-token vocabulary


def test_generate_fast_path_gives_the_plain_replies(tiny_lm_dir, tiny_llama_dir):
    from align.fastgen import supports_fast_generate
    from align.model import DecoderConfig, DecoderForCausalLM

    prompts = ["What is 3 + 4?", "Hi", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]]
    for d in (tiny_lm_dir, tiny_llama_dir):
        model, tok = load(d, device="cpu"), load_tokenizer(d)
        assert supports_fast_generate(model)
        plain = G.generate(model, tok, prompts, max_new_tokens=10, fast=False)
        assert G.generate(model, tok, prompts, max_new_tokens=10, fast=True) == plain
        assert G.generate(model, tok, prompts, max_new_tokens=10) == plain  # CPU default: HF generate
    moe = DecoderForCausalLM(DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_experts=2))
    assert not supports_fast_generate(moe)  # routing needs the 2D padding mask: HF generate
    dca = DecoderForCausalLM(DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, dca_chunk_size=4,
                                           dca_local_window=2))
    assert not supports_fast_generate(dca)  # chunk ids over the keys so far, not a static cache's slots
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1)
    assert supports_fast_generate(Qwen2ForCausalLM(Qwen2Config(**kw)))
    sliding = Qwen2Config(**kw, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert not supports_fast_generate(Qwen2ForCausalLM(sliding))  # sliding layers need their own mask


def test_preference_files_give_prompts(tmp_path):
    """RL and the loop read prompts from any preference file the store imports; a record with none is named."""
    from align.data.formats import DataError

    f = tmp_path / "pairs.jsonl"
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."}
    alpaca = {"instruction": "Add 2 and 3.", "input": "", "chosen": "5", "rejected": "6"}
    f.write_text(json.dumps(hh) + "\n" + json.dumps(alpaca) + "\n")
    rows = G.read_prompts(str(f))
    assert [p for _, p in rows] == [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "Add 2 and 3."}]]
    assert "chosen" not in rows[0][0] and rows[1][0]["instruction"] == "Add 2 and 3."
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no prompt field"):
        G.read_prompts(str(bad))
