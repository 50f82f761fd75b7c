"""Running the training commands under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3, FSDP2).

There is no distribution code of our own: transformers' ``Trainer`` (and TRL's trainers on it) take the
engine from the environment that ``accelerate launch --config_file configs/accelerate/X.yaml`` sets up.
What a command has to get right is small, and lives here:

- ``save_final``: write ``final/`` as an ordinary HF model dir whatever the engine. Under ZeRO-3 and
  FSDP the weights are sharded across processes, so ``model.save_pretrained`` on one rank writes
  nothing useful; ``Trainer.save_model`` gathers them (ZeRO-3: ``stage3_gather_16bit_weights_on_model_save``,
  FSDP: ``fsdp_state_dict_type: FULL_STATE_DICT``) and writes on the main process. A LoRA adapter is
  saved the same way, then merged on the main process into a freshly loaded base model (``merge_and_unload``
  on sharded parameters is not possible). Every process must call it (the gathers are collective).
- ``zero3_init_disabled``: load a whole model on one process (evaluation after training) while
  ZeRO-3 is on; otherwise ``from_pretrained`` partitions it with ``deepspeed.zero.Init``, a collective.
- ``gathered_params``: use a model loaded under ZeRO-3 before the trainer wraps it (an evaluation of the
  start policy); every process must enter it.
- ``is_main_process`` / ``wait_for_everyone``: write files and run evaluations on rank 0 only;
  ``leave_process_group`` (at exit): every rank leaves its process group cleanly.

See docs/distributed.md.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger("align.distributed")


def is_main_process() -> bool:
    """Rank 0 (of all machines); True without a launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@atexit.register
def leave_process_group() -> None:
    """Destroy a gloo default process group as the process exits, while the interpreter is whole: left to
    interpreter teardown, gloo's worker threads can abort the process ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#179291), failing a run that finished. Not NCCL's: a rank that exits on an
    error would wait in its abort for ranks still inside a collective."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """``from_pretrained`` inside loads a whole, ordinary model even while ZeRO-3 is on (one process may
    load it alone, e.g. the main process reloading ``final/`` for its evaluation)."""
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def gathered_params(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Full parameters of a model partitioned by ``deepspeed.zero.Init`` (ZeRO-3) for the duration of
    the block, read-only; a no-op for any other model. Collective: every process must enter it."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield model


def _peft_model(model: torch.nn.Module):
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return None
    return model if isinstance(model, PeftModel) else None


def save_final(
    trainer: Any,
    tokenizer: Any,
    final_dir: str | os.PathLike,
    *,
    adapter_dir: str | os.PathLike | None = None,
    merge: bool = True,
    **load_kwargs: Any,
) -> Path:
    """Save the trained model to ``final_dir`` as an ordinary HF dir (+ tokenizer), consolidated from
    ZeRO-3 / FSDP shards. Call it on every process; only the main process writes.

    ``final_dir`` loads in plain transformers without align (``align.convert.make_portable``): align's
    decoder becomes a Llama dir where it is Llama-equivalent, else it gets ``auto_map`` and its modeling
    code beside the weights; any other model (a Llama, a Qwen2, ...) is saved as itself.

    With a LoRA model the adapter goes to ``adapter_dir`` (default ``final_dir/../adapter``); with
    ``merge`` the main process loads the base model the adapter names (``base_model_name_or_path`` in
    adapter_config.json; a reward adapter's head config in ``load_kwargs``), merges and writes ``final_dir``
    (``align.models.merge_adapter``); without ``merge``, ``final_dir`` gets a copy of the adapter dir.
    """
    final_dir = Path(final_dir)
    # a trainer whose model is its policy plus a critic (align's PPO) saves, and names, the policy alone
    saved = getattr(trainer, "policy", None)
    peft_model = _peft_model(saved if saved is not None else trainer.accelerator.unwrap_model(trainer.model))
    if peft_model is None:
        trainer.save_model(str(final_dir))  # collective gather under ZeRO-3 / FSDP; rank 0 writes
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(final_dir))
            from align.convert import make_portable

            with zero3_init_disabled():  # it reloads final/ on this process alone
                make_portable(final_dir)
        trainer.accelerator.wait_for_everyone()
        return final_dir

    adapter_dir = Path(adapter_dir) if adapter_dir is not None else final_dir.parent / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter weights only (modules_to_save included)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        if merge:
            from align.models import merge_adapter

            merge_adapter(adapter_dir, final_dir, tokenizer, **load_kwargs)
            from align.convert import make_portable

            with zero3_init_disabled():
                make_portable(final_dir)
        elif Path(final_dir).resolve() != adapter_dir.resolve():
            import shutil

            shutil.copytree(adapter_dir, final_dir, dirs_exist_ok=True)
    trainer.accelerator.wait_for_everyone()
    return final_dir
