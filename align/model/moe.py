"""Mixture-of-experts feed-forward: noisy top-k routing over SwiGLU experts with capacity and a balance loss.

- Noisy top-k gating (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538): Gaussian noise of std
  `router_noise` is added to the router logits in training only; each token goes to its k most probable
  experts, mixed with the softmax probabilities renormalised over those k (Mixtral).
- Expert capacity (GShard https://arxiv.org/abs/2006.16668, Switch https://arxiv.org/abs/2101.03961):
  an expert takes at most ceil(capacity_factor * tokens * k / num_experts) token assignments per batch.
  First choices are served before second choices, earlier tokens before later ones; assignments over
  capacity are dropped -- the token gets nothing from that expert and passes through the residual.
- Stochastic second expert (GShard, Algorithm 1; `second_expert_policy="random"`, top-2, training only): the
  second choice serves a token only with probability min(1, 2 * g2 / (g1 + g2)), so a token that clearly
  prefers its first expert spends no capacity on its second; a skipped second adds nothing (no renormalisation).
- Load-balancing loss (Switch, eq. 4): num_experts * sum_i f_i * P_i, where f_i is the fraction of
  assignments routed to expert i and P_i the mean router probability of expert i. It is 1.0 when
  routing is perfectly balanced (f_i = P_i = 1/E) and grows as routing collapses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) -- LLaMA's MLP (https://arxiv.org/abs/2002.05202)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, liger: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.down_proj.scaled_init = True  # residual projection: init std / sqrt(2 * n_layer)
        self.liger = liger  # config.use_liger_kernel: fused kernels on CUDA (align/model/kernels.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training on the fast path: one matmul for gate and up (PEFT-wrapped ones stay apart; see Attention)
        liger = kernels.enabled(self.liger, x)
        if self.training and liger and kernels.plain_linear(self.gate_proj, self.up_proj):
            gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        # silu * up stays two torch ops: Liger's fused SwiGLU saved GPU time but cost more host time, and measured
        # slower in the eager (host-bound) step (docs/benchmarks.md)
        return self.down_proj(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """Replaces the MLP of a decoder layer: (B, T, C) -> (B, T, C), plus aux loss and drop count."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.expert_capacity_factor  # training
        self.eval_capacity_factor = config.eval_capacity_factor  # eval / generation
        self.router_noise = config.router_noise
        self.second_expert_policy = getattr(config, "second_expert_policy", "all")
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size, config.mlp_bias) for _ in range(config.num_experts)
        )
        # last forward's statistics, detached, for logging (see align.model.moe_stats)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_dropped_tokens: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C); token_mask (B, T) bool, False for padding (not routed, not in the loss).

        Returns (output (B, T, C), aux_loss (), dropped ()) -- dropped counts token->expert assignments
        that overflowed an expert's capacity.
        """
        B, T, C = x.shape
        E, k = self.num_experts, self.top_k
        x_flat = x.reshape(-1, C)  # (N, C), N = B*T
        N = x_flat.shape[0]

        logits = self.router(x_flat)  # (N, E)
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise  # noisy top-k gating
        probs = logits.float().softmax(dim=-1)  # (N, E), fp32 for the loss
        topk_probs, topk_idx = probs.topk(k, dim=-1)  # (N, k)
        weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True)  # (N, k) renormalised over the k

        valid = torch.ones(N, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.reshape(-1)
        n_valid = valid.sum()  # () routed tokens (tensor: no host sync)
        assign = F.one_hot(topk_idx, E) * valid[:, None, None]  # (N, k, E) 0/1
        routed = assign  # the balance loss sees the router's choices, before GShard's skip and capacity
        if self.training and self.second_expert_policy == "random":
            # GShard: dispatch the 2nd choice with probability 2 * g2 (g renormalised over the two; certain at g2 = 1/2)
            keep2 = torch.rand_like(weights[:, 1]) < 2 * weights[:, 1]  # (N,)
            assign = torch.cat([assign[:, :1], assign[:, 1:] * keep2[:, None, None]], dim=1)

        # Capacity: position of each assignment in its expert's queue, choice-rank major (all 1st choices
        # first), token order within a rank.
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor is not None:
            capacity = torch.ceil(capacity_factor * n_valid * k / E)  # ()
            queue = assign.transpose(0, 1).reshape(k * N, E)  # (k*N, E)
            position = (queue.cumsum(dim=0) - 1).reshape(k, N, E).transpose(0, 1)  # (N, k, E)
            kept = assign * (position < capacity)  # (N, k, E)
        else:
            kept = assign
        dropped = assign.sum() - kept.sum()  # () int

        # Switch load-balancing loss over the routed (non-pad) tokens, before capacity dropping.
        denom = n_valid.clamp(min=1).float()
        f = routed.sum(dim=(0, 1)).float() / (denom * k)  # (E,) fraction of assignments per expert
        P = (probs * valid[:, None]).sum(dim=0) / denom  # (E,) mean router probability per expert
        aux_loss = E * (f * P).sum()

        # Combine: gate (N, E) = weight of expert e for token n (0 if not routed or dropped).
        gate = (kept * weights[..., None]).sum(dim=1)  # (N, E)
        out = torch.zeros_like(x_flat)
        for e, expert in enumerate(self.experts):  # loop over experts, tokens vectorised
            idx = torch.nonzero(kept[:, :, e].any(dim=1)).squeeze(1)  # (n_e,) tokens served by e
            if idx.numel() == 0:
                continue
            y = expert(x_flat.index_select(0, idx))  # (n_e, C)
            out.index_add_(0, idx, y * gate.index_select(0, idx)[:, e, None].to(y.dtype))

        self.last_aux_loss, self.last_dropped_tokens = aux_loss.detach(), dropped.detach()
        return out.view(B, T, C), aux_loss, dropped
