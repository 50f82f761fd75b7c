"""Training a reward model on soft labels: the annotator-aware export of ``align.store`` (``aggregate:
reliability``, ``soft``) gives each pair ``p_chosen`` = P(chosen beats rejected) and a ``weight``.
"""

from __future__ import annotations

import torch
from trl import RewardTrainer

SOFT_COLUMNS = ("p_chosen", "weight")


class SoftLabelRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose loss, when the batch has ``p_chosen`` (and ``weight``), is the Bradley-Terry
    log-loss against the soft label, d = r(chosen) − r(rejected):
        loss = Σ w · [−p·logσ(d) − (1−p)·logσ(−d)] / Σ w      (w = 1 without ``weight``)
    With p = 1 and w = 1 it is TRL's loss. Batches without ``p_chosen`` use TRL's loss unchanged."""

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


