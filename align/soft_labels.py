"""Training on soft labels: the annotator-aware export of ``align.store`` (``aggregate: reliability``,
``soft``) gives each pair ``p_chosen`` = P(chosen beats rejected) and a ``weight``. The reward model
(``SoftLabelRewardTrainer``) and DPO (``SoftLabelDPOTrainer``) fit the soft Bradley-Terry loss to them.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer, RewardTrainer

from align.preferences import SOFT_COLUMNS


class _SoftColumns:
    """Keeps ``p_chosen``/``weight`` through the trainer's column pruning and puts them in the batch as (B,)
    float tensors, next to what the trainer's own collator makes of the rest."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.data_collator

        def collate(examples: list[dict]) -> dict:
            out = base([{k: v for k, v in e.items() if k not in SOFT_COLUMNS} for e in examples])
            for k in SOFT_COLUMNS:
                if k in examples[0]:
                    out[k] = torch.tensor([e[k] for e in examples], dtype=torch.float)
            return out
        self.data_collator = collate

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *SOFT_COLUMNS]))


class SoftLabelRewardTrainer(_SoftColumns, RewardTrainer):
    """``RewardTrainer`` whose loss, when the batch has ``p_chosen`` (and ``weight``), is the Bradley-Terry
    log-loss against the soft label, d = r(chosen) − r(rejected):
        loss = Σ w · [−p·logσ(d) − (1−p)·logσ(−d)] / Σ w      (w = 1 without ``weight``)
    With p = 1 and w = 1 it is TRL's loss. Batches without ``p_chosen`` use TRL's loss unchanged."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p, w = inputs.pop("p_chosen", None), inputs.pop("weight", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if p is not None:
            r_c, r_r = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)  # (B,), (B,)
            d = r_c - r_r
            per_pair = -(p * torch.nn.functional.logsigmoid(d) + (1 - p) * torch.nn.functional.logsigmoid(-d))
            w = torch.ones_like(per_pair) if w is None else w
            loss = (w * per_pair).sum() / w.sum().clamp_min(1e-8)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((r_c + r_r) ** 2)
        return (loss, outputs) if return_outputs else loss


# Losses the soft DPO path knows: the Bradley-Terry term and the SFT term that can be mixed with it (RPO).
SOFT_DPO_LOSS_TYPES = ("sigmoid", "sft")


class SoftLabelDPOTrainer(_SoftColumns, DPOTrainer):
    """``DPOTrainer`` whose sigmoid loss, when the batch has ``p_chosen`` (and ``weight``), is the soft
    Bradley-Terry loss on the implicit reward margin x = β·(log-ratio chosen − log-ratio rejected):
        loss = Σ w · [−p·logσ(x) − (1−p)·logσ(−x)] / Σ w      (w = 1 without ``weight``)
    i.e. conservative DPO with a per-pair label smoothing ε = 1 − p. An ``sft`` term in ``loss_type`` is TRL's,
    added with its ``loss_weights``. Batches without ``p_chosen`` use TRL's loss unchanged.

    How: TRL computes the loss in one long method, so the soft path runs it with the sigmoid term taken out
    (it still does the forwards, the SFT term and the metrics), reads the policy's per-token log-probs off
    that forward with a hook, takes the reference's from ``compute_ref_log_probs`` (handed to TRL as if
    precomputed, so the reference runs once) and adds the soft term."""

    def check_soft(self) -> None:
        """``ValueError`` for settings the soft path does not implement (named, with the values)."""
        bad = [t for t in self.loss_types if t not in SOFT_DPO_LOSS_TYPES]
        if bad:
            raise ValueError(f"soft labels (p_chosen) with loss_type {bad}: only {list(SOFT_DPO_LOSS_TYPES)} take "
                             "them; drop p_chosen/weight from the data or use loss_type: sigmoid")
        if "sigmoid" not in self.loss_types:
            raise ValueError(f"soft labels (p_chosen) need loss_type sigmoid, got {self.loss_types}")
        for name, value, plain in (("f_divergence_type", self.f_divergence_type, "reverse_kl"),
                                   ("ld_alpha", self.ld_alpha, None), ("use_weighting", self.use_weighting, False)):
            if value != plain:
                raise ValueError(f"soft labels (p_chosen) with {name}={value!r}: only {name}={plain!r} is implemented")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p, w = inputs.pop("p_chosen", None), inputs.pop("weight", None)
        if p is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.check_soft()
        if "ref_chosen_logps" not in inputs:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.compute_ref_log_probs(ref_model, inputs)
        i = self.loss_types.index("sigmoid")
        sigmoid_weight = self.loss_weights[i]
        saved = self.loss_types, self.loss_weights, self.precompute_ref_logps
        captured = []
        hook = model.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            self.loss_types = saved[0][:i] + saved[0][i + 1:]
            self.loss_weights = saved[1][:i] + saved[1][i + 1:]
            self.precompute_ref_logps = True  # take the reference log-probs from inputs
            res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.loss_types, self.loss_weights, self.precompute_ref_logps = saved
            hook.remove()
        loss, outputs = res if return_outputs else (res, None)
        # The policy's summed completion log-probs, as TRL takes them (log_probs are 0 off the completion).
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen_logps, rejected_logps = captured[0].log_probs[:, -seq_len:].sum(dim=1).chunk(2)  # (B,), (B,)
        x = self.beta * ((chosen_logps - inputs["ref_chosen_logps"]) - (rejected_logps - inputs["ref_rejected_logps"]))
        p = p.to(x.device)
        w = torch.ones_like(p) if w is None else w.to(x.device)
        F = torch.nn.functional
        per_pair = -(p * F.logsigmoid(x) + (1 - p) * F.logsigmoid(-x))
        loss = loss + sigmoid_weight * (w * per_pair).sum() / w.sum().clamp_min(1e-8)
        return (loss, outputs) if return_outputs else loss
