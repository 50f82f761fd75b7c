"""Scoring responses with a reward model: filtering, best-of-n reranking, and the reward of PPO/GRPO.

    from align.score import RewardScorer
    rm = RewardScorer("runs/quickstart/reward/final")          # CPU or GPU (default: cuda if available)
    rm.score(["What is 3 + 4?"], ["The answer is 7."])       # -> [1.93]
    rm.rank("What is 3 + 4?", ["7", "The answer is 7.", "Ugh, 7."])   # -> [(text, reward), ...] best first
    rm(prompts, completions)                                  # a TRL reward function (GRPO's reward_funcs)
    ens = RewardEnsemble([dir_a, dir_b, dir_c])               # several RMs: mean reward, ens.score_std -> spread

    python -m align.score --model DIR --input in.jsonl --output out.jsonl   # adds "reward" to each record
    python -m align.score --model A B C --input in.jsonl    # an ensemble: "reward" (the mean) and "reward_std"
    python -m align.score rank --model DIR --input f.jsonl [--output out.jsonl]   # best-of-n

A reward model (``python -m align.reward``: one output, a ``score`` head) reads each (prompt, response) as in
training, ``prompt messages + [assistant response]`` through the chat template (no generation prompt); the reward
is the head's output at the last non-pad token. Batches are sorted by length and right-padded, as TRL's collator
does; a sequence past ``max_length`` keeps its last tokens (where the reward is read), counted in ``.truncated``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align.config import parse_verb, run_command
from align.data.prompts import Messages, as_messages
from align.models import NotARewardModel, load_reward_model

logger = logging.getLogger("align.score")


# ------------------------------------------------------------------------------------------ encoding
def conversation(prompt: str | Messages, response: str | Messages) -> Messages:
    """prompt (text or messages) + the response (text = one assistant message, or messages)."""
    return as_messages(prompt) + as_messages(response, "assistant")


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, response: str | Messages) -> list[int]:
    """Token ids exactly as TRL's RewardTrainer makes them for a conversational pair."""
    out = tokenizer.apply_chat_template(conversation(prompt, response), tokenize=True, return_dict=True)
    return list(out["input_ids"])


@torch.inference_mode()
def score_ids(
    model: PreTrainedModel, ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 32
) -> list[float]:
    """Rewards of token-id sequences: sorted by length, right-padded per batch, the score head's output."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, : len(ids[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, r in zip(idx, logits[:, 0].float().cpu().tolist()):
            out[row] = r
    return out


# ------------------------------------------------------------------------------------------ scorer
class RewardScorer:
    """Batched reward-model scoring of (prompt, response) pairs; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        if model is None:
            if path is None:
                raise ValueError("RewardScorer needs a reward model dir (or model= and tokenizer=)")
            if device is None and torch.cuda.is_available():  # scoring is inference: on the GPU where there is one
                device = "cuda"
            model, tokenizer = load_reward_model(path, device=device, dtype=dtype)
        elif tokenizer is None:
            raise ValueError("RewardScorer(model=...) needs tokenizer= too")
        if getattr(model.config, "num_labels", 1) != 1:
            raise NotARewardModel(f"model has num_labels={model.config.num_labels}; a reward model has one output")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.pad_token_id = model.config.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer.pad_token_id
            model.config.pad_token_id = self.pad_token_id
        limits = [getattr(model.config, "max_position_embeddings", None), max_length]
        self.max_length = min(x for x in limits if x) if any(limits) else None
        self.truncated = 0  # sequences cut to their last max_length tokens so far
        self.__name__ = "reward_model"  # TRL logs reward functions by __name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str | Messages, response: str | Messages) -> list[int]:
        ids = encode(self.tokenizer, prompt, response)
        if self.max_length and len(ids) > self.max_length:
            self.truncated += 1
            logger.warning("a sequence of %d tokens is cut to its last %d (max_length)", len(ids), self.max_length)
            ids = ids[-self.max_length :]
        return ids

    def score(self, prompts: str | Messages | Sequence[str | Messages],
              responses: str | Sequence[str | Messages]) -> list[float]:
        """One reward per (prompt, response); a single prompt is broadcast over the responses."""
        if isinstance(responses, str):
            responses = [responses]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts] * len(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was_training = self.model.training
        self.model.eval()
        try:
            ids = [self.encode(p, r) for p, r in zip(prompts, responses)]
            return score_ids(self.model, ids, self.pad_token_id, self.batch_size)
        finally:
            self.model.train(was_training)

    def score_one(self, prompt: str | Messages, response: str | Messages) -> float:
        return self.score([prompt], [response])[0]

    def rank(self, prompt: str | Messages, responses: Sequence[str]) -> list[tuple[str, float]]:
        """(response, reward) pairs, best first (stable for equal rewards)."""
        rewards = self.score([prompt] * len(responses), list(responses))
        return sorted(zip(responses, rewards), key=lambda t: -t[1])

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """TRL reward-function signature (GRPO ``reward_funcs``): completions as text or message lists."""
        return self.score(list(prompts), list(completions))


class RewardEnsemble:
    """Several reward models side by side: the reward is their mean, their spread says how unsure they are.

    Members differ in seed (score head, LoRA init, data order) and, as the loop makes them, in a bootstrap
    resample of the labels (deep ensembles: Lakshminarayanan et al. 2017, https://arxiv.org/abs/1612.01474).
    RLHF uses the spread twice: the policy's reward becomes ``mean - penalty * std``, so it gains nothing where
    the members disagree, which is where one RM is most exploitable (uncertainty-weighted optimisation, Coste
    et al. 2023, https://arxiv.org/abs/2310.02743); and active learning asks annotators about the pairs the
    members disagree on (query by committee, Seung et al. 1992).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], **kwargs: Any):
        if not paths:
            raise ValueError("RewardEnsemble needs at least one reward model dir")
        self.members = [RewardScorer(str(p), **kwargs) for p in paths]
        self.__name__ = "reward_ensemble"

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def truncated(self) -> int:
        return max(m.truncated for m in self.members)

    @property
    def max_length(self) -> int | None:
        return self.members[0].max_length

    def score_members(self, prompts: Any, responses: Any) -> torch.Tensor:
        """(members, responses) rewards."""
        return torch.tensor([m.score(prompts, responses) for m in self.members], dtype=torch.float64)

    def score_std(self, prompts: Any, responses: Any) -> tuple[list[float], list[float]]:
        """The members' mean reward and their (population) standard deviation, per response."""
        s = self.score_members(prompts, responses)
        return s.mean(0).tolist(), s.std(0, correction=0).tolist()

    def score(self, prompts: Any, responses: Any) -> list[float]:
        return self.score_std(prompts, responses)[0]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return self.score(list(prompts), list(completions))


# ------------------------------------------------------------------------------------------ command
@dataclass(kw_only=True)
class _Scoring:
    model: list[str] = field(metadata={"help": "reward model dir (a reward run's final/); several: an ensemble, "
                                               "scored by its mean reward (and its std as reward_std)"})
    input: str | None = field(default=None, metadata={"help": "JSONL/JSON file: prompt + response|completion (or "
                                                              "messages); for rank: prompt + responses (a list)"})
    output: str | None = field(default=None, metadata={"help": "output JSONL (default: stdout)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per forward pass"})
    max_length: int | None = field(default=None, metadata={"help": "keep the last max_length tokens of a pair"})

    def __post_init__(self):
        self.model = [self.model] if isinstance(self.model, str) else self.model


@dataclass(kw_only=True)
class ScoreArgs(_Scoring):
    """score (prompt, response) pairs: adds "reward" (and "reward_std" for an ensemble)"""

    prompt: str | None = field(default=None, metadata={"help": "score one pair: the prompt text"})
    response: str | None = field(default=None, metadata={"help": "score one pair: the response text"})

    def __post_init__(self):
        super().__post_init__()
        if self.input is None and (self.prompt is None or self.response is None):
            raise ValueError("give --input FILE, or --prompt and --response")


@dataclass(kw_only=True)
class RankArgs(_Scoring):
    """best-of-n: sort each record's responses by reward, best first"""

    def __post_init__(self):
        super().__post_init__()
        if self.input is None:
            raise ValueError("rank needs --input FILE")


VERBS = {"score": ScoreArgs, "rank": RankArgs}


def main(argv: list[str] | None = None) -> Any:
    mode, a = run_command(parse_verb, VERBS, argv, prog="python -m align.score", about=__doc__.split("\n\n")[0],
                          default="score")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    try:
        kw = {"device": a.device, "batch_size": a.batch_size, "max_length": a.max_length}
        scorer = RewardEnsemble(a.model, **kw)  # one dir: a one-member ensemble
    except (NotARewardModel, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if mode == "score" and a.input is None:
        r = scorer.score([a.prompt], [a.response])[0]
        print(f"{r:.6f}")
        return r
    from align.data.formats import DataError, location, read_records, to_prompt_response, write_jsonl

    rows: list[dict] = []
    try:
        if mode == "score":
            recs = [(location(a.input, key), rec) for key, rec in read_records(a.input)]
            pairs = [to_prompt_response(rec, where) for where, rec in recs]
            prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
            rewards, stds = scorer.score_std(prompts, responses)
            rows = [{**rec, "reward": r, **({"reward_std": sd} if len(a.model) > 1 else {})}
                    for (_, rec), r, sd in zip(recs, rewards, stds)]
            n = len(rows)
        else:
            flat_p, flat_r, spans = [], [], []
            recs = [(location(a.input, key), rec) for key, rec in read_records(a.input)]
            for where, rec in recs:
                resps = rec.get("responses")
                if "prompt" not in rec or not isinstance(resps, list) or not resps:
                    raise DataError(f"{where}: rank needs 'prompt' and a non-empty 'responses' list; has {sorted(rec)}")
                for i, resp in enumerate(resps):
                    if not isinstance(resp, (str, list)):
                        raise DataError(f"{where}: field 'responses[{i}]': expected a string, got {resp!r:.80}")
                spans.append((len(flat_r), len(resps)))
                flat_p += [rec["prompt"]] * len(resps)
                flat_r += resps
            rewards = scorer.score(flat_p, flat_r)
            for (_, rec), (s, k) in zip(recs, spans):
                ranked = sorted(zip(rec["responses"], rewards[s : s + k]), key=lambda t: -t[1])
                out = {key: v for key, v in rec.items() if key != "responses"}
                out["responses"] = [{"response": t, "reward": r} for t, r in ranked]
                out["best"] = ranked[0][0]
                rows.append(out)
            n = len(flat_r)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(rows, a.output)
    dt = time.perf_counter() - t0
    logger.info("scored %d responses in %.2fs (%.1f/s) on %s%s", n, dt, n / max(dt, 1e-9), scorer.device,
                f"; {scorer.truncated} truncated to {scorer.max_length} tokens" if scorer.truncated else "")
    return rows


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
