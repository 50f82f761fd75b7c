"""Reward functions shared by GRPO (``align.grpo``) and PPO (``align.ppo``).

Every reward is a TRL-style callable ``f(prompts, completions, completion_ids=None, **columns) -> list[float]``
whose ``__name__`` is the name it is logged under (TRL logs ``rewards/<name>/mean``). Extra dataset columns
(``task``, ``answer`` for the built-in world) arrive as keyword lists, one value per completion.

Built-in names (``reward_funcs: [correct, polite, rm]`` in a config, weights in ``reward_weights``):

- ``correct``: 1 if the world's checker finds the right answer in the reply (any style), else 0;
- ``answer``:  1 if the reply's final answer (``world.final_answer``: the last number, letter or list in free
  text) is right, else 0: ``correct`` for real models that answer in their own words;
- ``polite``:  1 if the reply is in the preferred helpful style ("The answer is ..."), else 0;
- ``world``:   the world's own scalar, 1 preferred / 0.5 correct in another style / 0;
- ``format``:  1 if the reply is well formed, right or wrong: one of the world's reply templates around an
  answer of the world's shape (a number, a letter, or a list of them), else 0;
- ``length``:  0 within ``length_target`` tokens, then -1 per extra ``length_target`` tokens (a length penalty);
- ``rm``:      the reward model of the RM stage (``align.score.RewardScorer`` on ``reward_model_path``); a list
  of dirs is an ensemble, rewarding its mean minus ``rm_uncertainty_penalty`` x its std (``RewardEnsemble``);
- ``package.module:function``: any importable callable with the signature above.

Every function is wrapped by :func:`checked`: a reward that raises, returns the wrong number of values or a
non-finite value stops training with a :class:`RewardError` naming the reward and the sample.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from align.data import world

RewardFunc = Callable[..., list[float]]
RULE_REWARDS = ("correct", "answer", "polite", "world", "format", "length")
BUILTIN_REWARDS = (*RULE_REWARDS, "rm")
MAKE_REWARD_MODEL = "python -m align.reward configs/reward.yaml"


class RewardError(ValueError):
    """A reward function that failed or returned an unusable value; the message names reward and sample."""


# ----------------------------------------------------------------------------------------------- text helpers


def text_of(x: Any) -> str:
    """The text of a prompt or completion: a string, or the last message of a message list."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return str(x.get("content", ""))
    if isinstance(x, (list, tuple)) and x:
        return text_of(x[-1])
    return ""


def _short(x: Any, n: int = 80) -> str:
    s = text_of(x)
    return repr(s if len(s) <= n else s[: n - 3] + "...")


def _example(i: int, columns: dict[str, Any], name: str) -> world.Example:
    missing = [k for k in ("task", "answer") if k not in columns or columns[k] is None]
    if missing:
        raise RewardError(
            f"reward '{name}' needs the dataset columns 'task' and 'answer' (missing {missing}); "
            f"the built-in world provides them (dataset_name: world)"
        )
    task, answer = columns["task"][i], columns["answer"][i]
    if task not in world.TASKS:
        raise RewardError(f"reward '{name}': sample {i} has unknown task {task!r}; known: {list(world.TASKS)}")
    return world.Example(id=str(i), task=task, prompt="", answer=str(answer), split="train")


# ----------------------------------------------------------------------------------------------- rule rewards


def correct(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 if the reply holds the right answer (any style), else 0.0."""
    return [float(world.check(_example(i, columns, "correct"), text_of(c))["correct"])
            for i, c in enumerate(completions)]


def answer(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 if the reply's final answer, read out of free text, is right, else 0.0."""
    return [float(world.check(_example(i, columns, "answer"), text_of(c))["answer_correct"])
            for i, c in enumerate(completions)]


def polite(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 if the reply is in the preferred helpful style ("The answer is ..."), else 0.0."""
    return [float(world.parse_reply(text_of(c))[1] == world.PREFERRED_STYLE) for c in completions]


def world_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """The world's scalar: 1 correct and helpful, 0.5 correct in another style, 0 wrong."""
    return [world.reward(_example(i, columns, "world"), text_of(c)) for i, c in enumerate(completions)]


world_reward.__name__ = "world"

_ANSWER_SHAPE = re.compile(r"(\d+|[a-z])( (\d+|[a-z]))*")


def well_formed(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 if the reply is a world template around a number, a letter or a list of them, else 0.0."""
    out = []
    for c in completions:
        answer, _ = world.parse_reply(text_of(c))
        out.append(float(answer is not None and _ANSWER_SHAPE.fullmatch(world.normalize(answer)) is not None))
    return out


well_formed.__name__ = "format"


def make_length(target: int = 16) -> RewardFunc:
    """0 for replies of at most ``target`` tokens (completion_ids, else whitespace words),
    then -1 per ``target`` more."""

    def length(prompts, completions, completion_ids=None, **columns) -> list[float]:
        out = []
        for i, c in enumerate(completions):
            n = len(completion_ids[i]) if completion_ids is not None else len(text_of(c).split())
            out.append(-max(0, n - target) / target)
        return out

    return length


# ----------------------------------------------------------------------------------------------- reward model


def check_reward_model_dir(path: str | os.PathLike | None) -> Path:
    """The reward model dir, or a clear error saying which command makes it."""
    if not path:
        raise FileNotFoundError(
            f"reward 'rm' needs reward_model_path: a reward model dir made by `{MAKE_REWARD_MODEL}` "
            f"(its output_dir/final)"
        )
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").exists():
        what = "does not exist" if not p.exists() else "is not a model dir (no config.json)"
        raise FileNotFoundError(
            f"reward model '{p}' {what}; train one first with `{MAKE_REWARD_MODEL}` "
            f"(it writes <output_dir>/final) and pass --reward_model_path <that dir>"
        )
    return p


def reward_model_dirs(paths: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """One reward model dir, or an ensemble's (a list of dirs), each checked."""
    many = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    return [check_reward_model_dir(p) for p in many or [None]]


def make_rm(reward_model_path: str | os.PathLike | Sequence[str | os.PathLike], device: Any = None,
            uncertainty_penalty: float = 0.0) -> RewardFunc:
    """The RM stage's reward model as a reward: ``RewardScorer(path).score(prompts, reply texts)``. A list of
    dirs is an ensemble (``align.score.RewardEnsemble``): its mean, minus ``uncertainty_penalty`` x its std."""
    from align.score import RewardEnsemble

    scorer = RewardEnsemble(reward_model_dirs(reward_model_path), device=device)  # one dir: a one-member ensemble

    def rm(prompts, completions, completion_ids=None, **columns) -> list[float]:
        # prompts as given (a string or the conversation so far), replies as text: scored as in RM training
        mean, std = scorer.score_std(list(prompts), [text_of(c) for c in completions])
        return [m - uncertainty_penalty * s for m, s in zip(mean, std)]

    return rm


# ----------------------------------------------------------------------------------------------- checking + building


def checked(fn: RewardFunc, name: str | None = None) -> RewardFunc:
    """``fn`` with its name kept (for TRL's ``rewards/<name>/mean``) and its failures made readable."""
    name = name or getattr(fn, "__name__", type(fn).__name__)

    @functools.wraps(fn)
    def wrapper(prompts, completions, completion_ids=None, **columns) -> list[float]:
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the reward's name
            raise RewardError(
                f"reward '{name}' raised {type(e).__name__}: {e} (batch of {len(completions)}; first sample: "
                f"prompt={_short(prompts[0]) if len(prompts) else None}, "
                f"completion={_short(completions[0]) if len(completions) else None})"
            ) from e
        values = list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
        for i, v in enumerate(values):
            try:
                ok = v is not None and math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RewardError(
                    f"reward '{name}' returned {v!r} for sample {i}: prompt={_short(prompts[i])}, "
                    f"completion={_short(completions[i])}"
                )
        return [float(v) for v in values]

    wrapper.__name__ = name
    return wrapper


def build_reward_funcs(
    names: Sequence[str | RewardFunc],
    reward_model_path: str | os.PathLike | None = None,
    *,
    length_target: int = 16,
    device: Any = None,
    rm_uncertainty_penalty: float = 0.0,
) -> list[RewardFunc]:
    """Reward callables for the names in a config (see module docstring), each wrapped by :func:`checked`."""
    if not names:
        raise ValueError(f"reward_funcs is empty; choose from {list(BUILTIN_REWARDS)} or package.module:function")
    rules = {"correct": correct, "answer": answer, "polite": polite, "world": world_reward, "format": well_formed}
    out = []
    for n in names:
        if callable(n):
            out.append(checked(n))
        elif n in rules:
            out.append(checked(rules[n], n))
        elif n == "length":
            out.append(checked(make_length(length_target), "length"))
        elif n == "rm":
            out.append(checked(make_rm(reward_model_path, device=device, uncertainty_penalty=rm_uncertainty_penalty),
                               "rm"))
        elif isinstance(n, str) and ":" in n:
            module, _, attr = n.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"reward_funcs: cannot import '{n}': {e}") from None
            out.append(checked(fn, attr))
        else:
            raise ValueError(
                f"reward_funcs: unknown reward {n!r}; choose from {list(BUILTIN_REWARDS)} or package.module:function"
            )
    return out


def validate_weights(names: Sequence[Any], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(
            f"reward_weights has {len(weights)} values for {len(names)} reward_funcs {list(names)}; "
            f"give one weight each"
        )
    return [float(w) for w in weights]


def score_all(
    funcs: Sequence[RewardFunc],
    weights: Sequence[float],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **columns: Any,
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total reward per completion and each reward's values by name (PPO's and eval's scorer)."""
    per: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for f, w in zip(funcs, weights, strict=True):
        vals = f(prompts=list(prompts), completions=list(completions), completion_ids=completion_ids, **columns)
        per[f.__name__] = vals
        total = [t + w * v for t, v in zip(total, vals)]
    return total, per


def eval_reward_funcs(names: Sequence[str], reward_model_path: str | list[str] | None,
                      length_target: int = 16) -> list[Any]:
    """The training rewards plus, when a reward model is given, 'rm' (the 'mean RM reward' of the evaluation; an
    ensemble's plain mean)."""
    names = list(names)
    if reward_model_path and "rm" not in names:
        names.append("rm")
    return build_reward_funcs(names, reward_model_path, length_target=length_target)
