"""Training commands under ``accelerate launch``: the configs in configs/accelerate/ parse into the engines
they name (DeepSpeed ZeRO-2/3, FSDP2), and a 2-process gloo DDP run of SFT and of DPO gives the losses of a
1-process run with the same global batch (CPU).

Why the losses match: accelerate shards the *global* batch sampler, so with 2 processes x batch 2 step k
sees the same 4 examples as 1 process x batch 4 (same seed, seedable sampler); SFT's loss is a token mean
and the Trainer all-reduces the token count (``average_tokens_across_devices``); DPO's (sigmoid) is a pair mean
over equal per-process batches. Dropout is off (LoRA dropout 0), so the gradients agree up to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACC = ROOT / "configs" / "accelerate"
STEPS = 4
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "ACCELERATE_USE_CPU": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(ROOT),
}


# ----------------------------------------------------------------------------------------------- assets


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """The project tokenizer on a small world corpus + a tiny DecoderForCausalLM, saved as an HF dir."""
    from align.model import DecoderConfig, DecoderForCausalLM
    from align.tokenizer import TokenizerArguments, train_tokenizer

    root = tmp_path_factory.mktemp("dist_assets")
    torch.set_num_threads(1)
    tok = train_tokenizer(TokenizerArguments(corpus="world", vocab_size=400, max_documents=1000,
                                             output_dir=str(root / "tok")))
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm = root / "lm"
    DecoderForCausalLM(cfg).save_pretrained(str(lm))
    tok.save_pretrained(str(lm))
    return lm


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Small JSONL files from the built-in world (the whole world takes seconds to tokenize per process)."""
    from align.data.world import World

    root = tmp_path_factory.mktemp("dist_data")
    world = World(seed=0)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in world.sft_conversations()[:48]))
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                             for p in world.preference_pairs()[:48]))
    return {"sft": sft, "dpo": prefs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(module: str, argv: list[str], processes: int, timeout: int = 240, config: str | None = None,
         env: dict | None = None) -> None:
    """``python -m module`` (1 process) or ``accelerate launch --config_file config`` (N processes, ddp_cpu.yaml by
    default; with a config, 1 process is launched too); a ``module`` ending in .py is a script."""
    target = [module] if module.endswith(".py") else ["-m", module]
    if processes == 1 and config is None:
        cmd = [sys.executable, *target, *argv]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ACC / (config or "ddp_cpu.yaml")), "--num_processes", str(processes),
               "--main_process_port", str(_free_port()), *target, *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-6000:]}"


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


COMMON = ["--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", "1000", "--learning_rate", "1e-2",
          "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--seed", "0", "--use_cpu", "true",
          "--activation_checkpointing", "false", "--dataloader_pin_memory", "false", "--report_to", "none",
          "--eval_num_prompts", "0"]


def _compare(one: Path, two: Path) -> None:
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == STEPS, (a, b)
    print(f"{one.parent.name}: 1 process {a}\n{' ' * len(one.parent.name)}  2 processes {b}")
    assert b == pytest.approx(a, rel=2e-3, abs=2e-4), (a, b)
    assert a[0] != pytest.approx(a[-1], rel=1e-3), "training did not move: the comparison proves nothing"
    sa = json.loads((one / "summary.json").read_text())
    sb = json.loads((two / "summary.json").read_text())
    assert sb["train_loss"] == pytest.approx(sa["train_loss"], rel=2e-3)


# ------------------------------------------------------------------------------------------- the runs


@pytest.mark.slow
def test_sft_ddp_two_processes_matches_one(lm_dir, data_files, tmp_path):
    """1 process x batch 4 == 2 processes x batch 2 (gloo DDP through accelerate launch), step by step."""
    argv = [str(ROOT / "configs" / "sft.yaml"), "--model_name_or_path", str(lm_dir), "--max_length", "96",
            "--dataset_name", str(data_files["sft"])] + COMMON
    _run("align.sft", argv + ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"], 1)
    _run("align.sft", argv + ["--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"], 2)
    _compare(tmp_path / "one", tmp_path / "two")
    _assert_loadable(tmp_path / "two" / "final")


@pytest.mark.slow
def test_dpo_lora_ddp_two_processes_matches_one(lm_dir, data_files, tmp_path):
    """DPO with LoRA (reference = adapter disabled) under 2-process DDP: same losses; final/ is merged."""
    argv = [str(ROOT / "configs" / "dpo.yaml"), "--model_name_or_path", str(lm_dir),
            "--dataset_name", str(data_files["dpo"]), "--test_fraction", "0", "--use_peft", "true",
            "--lora_dropout", "0",
            "--lora_r", "4", "--max_length", "96", "--reward_model_path", "", "--win_rate_num_prompts", "0",
            # sigmoid alone: a mean over pairs, equal per process. (The `sft` term of configs/dpo.yaml's
            # [sigmoid, sft] is a token mean *per process* in TRL, so N x b differs slightly from 1 x N*b.)
            "--loss_type", "[sigmoid]", "--loss_weights", "[1.0]",
            "--precompute_ref_log_probs", "false"] + COMMON
    _run("align.dpo", argv + ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"], 1)
    _run("align.dpo", argv + ["--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"], 2)
    _compare(tmp_path / "one", tmp_path / "two")
    _assert_loadable(tmp_path / "two" / "final")


# ------------------------------------------------------------------------------------------------ PPO

# Every process of a PPO run: a PPOTrainer (full fine-tuning, so the reference is a frozen copy) trains a few
# iterations and writes its own weights, its log and its rollout figures. --fixed: replies are a function of the
# prompt (random tokens seeded by it, no EOS, so every reply has the same length) instead of samples, so that 1
# process x 2b and 2 processes x b see the same replies and must make the same update.
_PPO_SCRIPT = r"""
import json, sys, zlib
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
import align.model
from align.distributed import gathered_params
from align.models import load_tokenizer
from align.ppo_trainer import PPOConfig, PPOTrainer
from align.rl import prompt_dataset

lm, out, batch, steps, fixed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
torch.manual_seed(0)
tok = load_tokenizer(lm)
V = len(tok)

def low_half(prompts, completions, completion_ids=None, **kw):
    return [sum(t < V // 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]

class FixedReplies(PPOTrainer):
    def _sample(self, q, qm):
        rows = []
        for ids, m in zip(q, qm):
            g = torch.Generator().manual_seed(zlib.crc32(str(ids[m.bool()].tolist()).encode()))
            rows.append(torch.randint(5, V, (self.args.max_completion_length,), generator=g))
        return torch.stack(rows).to(q.device)

args = PPOConfig(**{**dict(output_dir=str(out), per_device_train_batch_size=batch, max_completion_length=6,
                            max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", num_ppo_epochs=2,
                            num_mini_batches=1, kl_coef=0.05, save_strategy="no", report_to="none", use_cpu=True,
                            seed=0, disable_tqdm=True, stop_token=None if fixed else "eos"), **extra})
trainer = (FixedReplies if fixed else PPOTrainer)(
    model=AutoModelForCausalLM.from_pretrained(lm), args=args, processing_class=tok, reward_funcs=[low_half],
    train_dataset=prompt_dataset("world", 32, 0))
def trainable():  # gathered from ZeRO-3 shards
    with gathered_params(trainer.model):
        return {k: v.detach().float().cpu().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

init = trainable()
trainer.train()
rank = args.process_index
state = trainable()
torch.save(state, out / f"rank{rank}.pt")
moved = max(float((state[k] - init[k]).abs().max()) for k in state)
(out / f"rank{rank}.json").write_text(json.dumps({"log": trainer.state.log_history, "moved": moved,
                                                   "world_size": args.world_size}))
"""


def _ppo_ranks(lm: Path, out: Path, processes: int, batch: int, fixed: bool, steps: int = 2, config: str | None = None,
               **extra) -> list[tuple[dict, dict]]:
    """Run _PPO_SCRIPT on ``processes`` processes: [(weights, {"log", "moved", "world_size"}) per rank]."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "ppo_ranks.py"
    script.write_text(_PPO_SCRIPT)
    _run(str(script), [str(lm), str(out), str(batch), str(steps), "1" if fixed else "0", json.dumps(extra)],
         processes, config=config, env=DS_ENV if config and config.startswith("zero") else None)
    return [(torch.load(out / f"rank{r}.pt"), json.loads((out / f"rank{r}.json").read_text()))
            for r in range(processes)]


def _finite_logs(info: dict, steps: int) -> list[dict]:
    rows = [r for r in info["log"] if "objective/scores" in r]
    assert len(rows) == steps, info["log"]
    for r in rows:
        for k in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg"):
            assert math.isfinite(r[k]), (k, r)
    return rows


@pytest.mark.slow
def test_ppo_ddp_ranks_end_with_identical_weights(lm_dir, tmp_path):
    """2-process DDP PPO with sampled replies: each process rolls out its own prompts, yet the gradients are
    all-reduced, so both end with the same weights; the logged figures are the same on both (means over ranks)."""
    (w0, i0), (w1, i1) = _ppo_ranks(lm_dir, tmp_path, 2, batch=4, fixed=False, adaptive_kl=True)
    assert i0["world_size"] == 2 and i0["moved"] > 1e-3, "training did not move the weights"
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    r0, r1 = ([{k: v for k, v in r.items() if not k.startswith("time/")} for r in _finite_logs(i, 2)]
              for i in (i0, i1))
    assert r0 == r1  # figures reduced over processes (and the adaptive KL coefficient with them)
    assert r0[-1]["episode"] == 2 * 2 * 4


@pytest.mark.slow
def test_ppo_ddp_two_processes_make_the_update_of_one(lm_dir, tmp_path):
    """The same replies (fixed by their prompts): 2 processes x 4 prompts make the update 1 process x 8 makes.
    Holds because each process takes its share of the global batch, the advantages are whitened with the global
    batch's mean and variance, and equal-length replies make the mean of the ranks' token means the global one."""
    (w_one, i_one), = _ppo_ranks(lm_dir, tmp_path / "one", 1, batch=8, fixed=True)
    (w_two, i_two), _ = _ppo_ranks(lm_dir, tmp_path / "two", 2, batch=4, fixed=True)
    assert i_one["moved"] > 1e-3, "training did not move the weights: the comparison proves nothing"
    print(f"weights moved up to {i_one['moved']:.3g}; 1 x 8 vs 2 x 4 differ by up to "
          f"{max(float((w_two[k] - w_one[k]).abs().max()) for k in w_one):.3g}")
    for k in w_one:
        torch.testing.assert_close(w_two[k], w_one[k], atol=2e-5, rtol=1e-4, msg=k)
    a, b = _finite_logs(i_one, 2), _finite_logs(i_two, 2)
    for k in ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
              "val/mean", "policy/approxkl_avg"):
        assert [r[k] for r in b] == pytest.approx([r[k] for r in a], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_ppo_command_ddp_lora_final_loads_and_resumes(lm_dir, tmp_path):
    """python -m align.ppo under 2-process DDP with LoRA: rank 0 alone writes metrics (one row per iteration),
    checkpoints and a merged final/; a re-run with more steps resumes; the evaluation runs on rank 0."""
    argv = [str(ROOT / "configs" / "ppo.yaml"), "--model_name_or_path", str(lm_dir), "--output_dir", str(tmp_path),
            "--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0", "--lora_target_modules", "[q_proj, v_proj]",
            "--per_device_train_batch_size", "4", "--num_mini_batches", "2", "--num_ppo_epochs", "1",
            "--max_completion_length", "6", "--num_prompts", "32", "--save_steps", "1", "--learning_rate", "1e-2",
            "--eval_num_prompts", "4", "--eval_kl_prompts", "2", "--eval_max_new_tokens", "6", "--eval_before",
            "false", "--use_cpu", "true", "--report_to", "none", "--seed", "0"]
    _run("align.ppo", [*argv, "--max_steps", "2"], 2)
    assert (tmp_path / "checkpoint-2" / "trainable.pt").exists()
    _run("align.ppo", [*argv, "--max_steps", "3"], 2)  # resumes from checkpoint-2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("objective/scores", "loss/policy_avg", "loss/value_avg")), r
    assert rows[-1]["episode"] == 3 * 2 * 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3
    assert "exact_match" in json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    _assert_loadable(tmp_path / "final")


# DeepSpeed on CPU: accelerate runs a DeepSpeed engine without a GPU only as one process (with two, each believes
# it is alone), so here ZeRO-2/3 run as one process. That checks the engine path of align.ppo: ZeRO-3 partitioned
# loading, the engine's accumulation, clipping and step, the reference as a DeepSpeed engine, generation with gathered
# weights, sharded checkpoints and resuming, final/ consolidated on rank 0. Communication between processes is DDP's
# test above. Without deepspeed installed these skip (pip install -e '.[deepspeed]').
DS_ENV = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="pip install -e '.[deepspeed]'")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_ppo_deepspeed_makes_the_plain_update(lm_dir, tmp_path, config):
    """The same replies, 2 micro-batches per optimizer step: the DeepSpeed engine's update equals the plain one."""
    (w_plain, i_plain), = _ppo_ranks(lm_dir, tmp_path / "plain", 1, batch=4, fixed=True, gradient_accumulation_steps=2)
    (w_ds, i_ds), = _ppo_ranks(lm_dir, tmp_path / config, 1, batch=4, fixed=True, config=f"{config}.yaml",
                               gradient_accumulation_steps=2, use_cpu=False)
    assert i_plain["moved"] > 1e-3, "training did not move the weights: the comparison proves nothing"
    assert w_ds.keys() == w_plain.keys()
    diff = max(float((w_ds[k] - w_plain[k]).abs().max()) for k in w_plain)
    print(f"{config} vs plain: weights differ by up to {diff:.3g}")
    for k in w_plain:
        torch.testing.assert_close(w_ds[k], w_plain[k], atol=2e-5, rtol=1e-4, msg=k)
    _finite_logs(i_ds, 2)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("config,lora", [("zero2", False), ("zero3", False), ("zero3", True)],
                         ids=["zero2", "zero3", "zero3-lora"])
def test_ppo_command_deepspeed_resumes_and_final_loads(lm_dir, tmp_path, config, lora):
    """python -m align.ppo under DeepSpeed: sampled replies (ZeRO-3: from gathered weights), the sharded checkpoint
    resumes, final/ is consolidated and loads, the evaluation (with its KL to the start model) runs."""
    peft = ["--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0", "--lora_target_modules", "[q_proj, v_proj]"]
    argv = [str(ROOT / "configs" / "ppo.yaml"), "--model_name_or_path", str(lm_dir), "--output_dir", str(tmp_path),
            *(peft if lora else []), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--num_mini_batches", "2", "--num_ppo_epochs", "1", "--max_completion_length", "6", "--num_prompts", "32",
            "--save_steps", "1", "--learning_rate", "1e-2", "--eval_num_prompts", "4", "--eval_kl_prompts", "2",
            "--eval_max_new_tokens", "6", "--use_cpu", "false", "--report_to", "none", "--seed", "0"]
    for steps in (2, 3):  # the second run resumes from checkpoint-2
        _run("align.ppo", [*argv, "--max_steps", str(steps)], 1, config=f"{config}.yaml", env=DS_ENV, timeout=400)
        assert list((tmp_path / f"checkpoint-{steps}").glob("global_step*"))  # the engine's own checkpoint
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss/policy_avg"]) and math.isfinite(r["objective/kl"]) for r in rows), rows
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert abs(ev["kl_to_reference"]) > 1e-6  # final/ is the trained policy, not the start (a 2-prompt estimate)
    _assert_loadable(tmp_path / "final")


def _assert_loadable(final: Path) -> None:
    """final/ is an ordinary HF dir: loads with AutoModelForCausalLM, no adapter files."""
    from transformers import AutoModelForCausalLM

    import align.model  # noqa: F401

    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert sum(p.numel() for p in model.parameters()) > 0


# ----------------------------------------------------------------------------------------- the configs


def _launch_env(config: Path) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file config`` hands to the processes (without starting them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "align.sft"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return defaults, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_every_config_loads_and_names_two_processes():
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.name for p in ACC.glob("*.yaml"))
    assert {"ddp.yaml", "ddp_cpu.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "fsdp.yaml"} <= set(names)
    for name in names:
        cfg = load_config_from_file(str(ACC / name))
        assert cfg.num_processes == 2, name
        raw = yaml.safe_load((ACC / name).read_text())
        ds_file = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            assert (ROOT / ds_file).exists(), f"{name}: {ds_file} (relative to the repo root) is missing"
            json.loads((ROOT / ds_file).read_text())


_PLUGIN_PROBE = r"""
import json, os, sys, tempfile
base = dict(os.environ)
out = {}
for name, env in json.loads(sys.argv[1]).items():
    os.environ.clear(); os.environ.update(base); os.environ.update(env)
    import transformers.integrations.deepspeed as hf_ds
    hf_ds.unset_hf_deepspeed_config()
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True)
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        out[name] = {"zero": args.deepspeed_plugin.deepspeed_config["zero_optimization"],
                     "zero3_enabled": hf_ds.is_deepspeed_zero3_enabled()}
    else:
        from accelerate.utils import FullyShardedDataParallelPlugin
        p = FullyShardedDataParallelPlugin()
        out[name] = dict(version=p.fsdp_version, state_dict_type=str(p.state_dict_type),
                         wrap=p.transformer_cls_names_to_wrap, policy=getattr(p.auto_wrap_policy, "__name__", None),
                         reshard=p.reshard_after_forward)
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def plugins() -> dict[str, dict]:
    """Each engine's plugin built from its launch environment, in a fresh process (as a launched rank
    builds it): {config name: what it holds}. One process for all configs (imports take seconds)."""
    names = ["fsdp"]
    try:
        import deepspeed  # noqa: F401

        names += ["zero2", "zero3", "zero3_offload"]
    except ImportError:
        pass
    envs = {n: _launch_env(ACC / f"{n}.yaml")[1] for n in names}
    p = subprocess.run([sys.executable, "-c", _PLUGIN_PROBE, json.dumps(envs)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE"):])


@pytest.mark.parametrize("name,stage,offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_deepspeed_configs_parse_into_the_zero_stage(plugins, name, stage, offload):
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    defaults, env = _launch_env(ACC / f"{name}.yaml")
    assert defaults.distributed_type.value == "DEEPSPEED" and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    got = plugins[name]
    assert got["zero"]["stage"] == stage
    assert got["zero3_enabled"] is (stage == 3)
    if stage == 3:  # final/ consolidated: Trainer.save_model gathers the 16-bit weights on rank 0
        assert got["zero"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in got["zero"] and "offload_param" in got["zero"]) is offload


def test_fsdp_config_parses_into_fsdp2_full_state_dict(plugins):
    from align.model.modeling import DecoderLayer

    defaults, env = _launch_env(ACC / "fsdp.yaml")
    assert defaults.distributed_type.value == "FSDP" and env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    got = plugins["fsdp"]
    assert got["version"] == 2 and got["reshard"] is True
    assert got["state_dict_type"].endswith("FULL_STATE_DICT")  # final/ consolidated on rank 0
    assert got["wrap"] == [DecoderLayer.__name__] and got["policy"] == "transformer_auto_wrap_policy"


# ------------------------------------------------------------------------------------ align.distributed


def test_save_final_writes_merged_standalone_lora_model(lm_dir, tmp_path):
    """save_final (the path commands take under ZeRO-3/FSDP): adapter/ via Trainer.save_model, then a merge
    into a freshly loaded base on the main process; final/ gives the trained model's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import align.model  # noqa: F401
    from align.distributed import save_final
    from align.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(lm_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(lm_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    ids = torch.randint(5, len(tok), (8, 16))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
                             use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    final = save_final(trainer, tok, tmp_path / "final")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (final / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids[:2]).logits
        got = reloaded(input_ids=ids[:2]).logits
        base = AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval()(input_ids=ids[:2]).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter was trained and merged
