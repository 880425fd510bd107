"""IB_MBM: the student-queried cross-attention over teacher features, its variational
information bottleneck, and the synergy head (METHOD.md, "Modules" 2-4).

The student's pooled feature is the single query token; each teacher's pooled feature,
mapped to width D by its own adapter plus a learned per-teacher embedding, is a key/value
token. The fused token passes a Gaussian bottleneck (mu, logvar); the synergy head turns a
sample of it into logits. Imports only torch and asib.recipe/errors (never asib.engine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asib.errors import ModelError
from asib.recipe import DistillSpec, IBMBMSpec, spec_from


class IBOutput(NamedTuple):
    """What IB_MBM returns: the latent used downstream, its Gaussian, and the attention."""

    z: Tensor  # (B, D): a sample in training with the IB on, else mu
    mu: Tensor  # (B, D)
    logvar: Tensor  # (B, D), clamped to [-c, c]
    attn: Tensor  # (B, K): attention of the student query over the teachers, head-averaged


class TeacherAdapter(nn.Module):
    """Maps one teacher's pooled feature (width d_k) to a token of width D."""

    def __init__(self, d_k: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_k, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class IBMBM(nn.Module):
    """Cross-attention of the student query over K teacher tokens, then a Gaussian bottleneck.

    ``self.ib`` is a plain attribute the engine may switch: with it off (or in eval mode)
    ``z = mu``; with it on and in training ``z = mu + exp(logvar / 2) * eps``.
    """

    def __init__(
        self, query_dim: int, teacher_dims: Sequence[int], spec: IBMBMSpec | dict[str, Any], ib: bool = True
    ) -> None:
        super().__init__()
        spec = spec_from(IBMBMSpec, spec)
        if len(teacher_dims) < 1:
            raise ModelError("IB_MBM needs at least one teacher feature width")
        dim = spec.dim
        self.dim = dim
        self.query_dim = int(query_dim)
        self.teacher_dims = [int(d) for d in teacher_dims]
        self.logvar_clamp = float(spec.logvar_clamp)
        self.ib = bool(ib)
        self.adapters = nn.ModuleList(TeacherAdapter(d, dim) for d in self.teacher_dims)
        self.teacher_embed = nn.Parameter(torch.zeros(len(self.teacher_dims), dim))
        nn.init.normal_(self.teacher_embed, std=0.02)
        self.q_proj = nn.Linear(self.query_dim, dim)
        self.q_norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, spec.heads, dropout=spec.dropout, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)
        self.mu_proj = nn.Linear(dim, dim)
        self.logvar_proj = nn.Linear(dim, dim)

    @property
    def num_teachers(self) -> int:
        return len(self.adapters)

    def _param_dtype(self) -> torch.dtype:
        return self.q_proj.weight.dtype

    def encode_query(self, h_s: Tensor) -> Tensor:
        """q = LN(W_q h_s), as one token: (B, 1, D)."""
        return self.q_norm(self.q_proj(h_s.to(self._param_dtype()))).unsqueeze(1)

    def encode_tokens(self, teacher_feats: Sequence[Tensor]) -> Tensor:
        """v_k = A_k(h_k) + e_k, stacked: (B, K, D)."""
        if len(teacher_feats) != self.num_teachers:
            raise ValueError(
                f"IB_MBM was built for {self.num_teachers} teachers, got {len(teacher_feats)} features"
            )
        dtype = self._param_dtype()
        tokens = [adapter(h.to(dtype)) for adapter, h in zip(self.adapters, teacher_feats, strict=True)]
        return torch.stack(tokens, dim=1) + self.teacher_embed.to(tokens[0].dtype)

    def forward(self, h_s: Tensor, teacher_feats: Sequence[Tensor]) -> IBOutput:
        """Fuse the teachers' features as seen by the student's query; sample the bottleneck."""
        q = self.encode_query(h_s)
        v = self.encode_tokens(teacher_feats)
        # Attention weights come back averaged over heads; with attention dropout in
        # training they are the post-dropout weights (rows sum to 1 in expectation).
        fused, weights = self.mha(q, v, v, need_weights=True, average_attn_weights=True)
        u = self.out_norm(q + fused).squeeze(1)
        mu = self.mu_proj(u)
        logvar = self.logvar_proj(u).clamp(-self.logvar_clamp, self.logvar_clamp)
        if self.training and self.ib:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        else:
            z = mu
        return IBOutput(z=z, mu=mu, logvar=logvar, attn=weights.squeeze(1))


class SynergyHead(nn.Module):
    """G: the fused latent (width D) to class logits; LayerNorm, GELU, Dropout, Linear.

    ``residual``: G's output is a correction added to ``base`` (the teacher average's logits,
    given at each call) and its last layer starts at zero, so the synergy starts as the teacher
    average and the A-step learns what to change. ``base`` has one row per image; for a latent
    of ``S * B`` rows (S noise samples of B images, sample-major) it is tiled S times.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, num_classes)
        )
        if residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: Tensor, base: Tensor | None = None) -> Tensor:
        out = self.net(z)
        if not self.residual:
            if base is not None:
                raise ValueError("this synergy head is not residual: it takes no base logits")
            return out
        if base is None:
            raise ValueError("a residual synergy head needs the teacher average's logits (base)")
        rows = z.shape[0] // max(base.shape[0], 1)
        if base.shape[0] == 0 or rows * base.shape[0] != z.shape[0] or base.shape[1:] != out.shape[1:]:
            raise ValueError(f"base logits {tuple(base.shape)} do not fit a latent of {z.shape[0]} rows "
                             f"and {out.shape[-1]} classes")
        return out + (base if rows == 1 else base.repeat(rows, 1))


def build_ib_mbm_from_teachers(
    teachers: Sequence[nn.Module], student: nn.Module, spec: DistillSpec | dict[str, Any]
) -> tuple[IBMBM, SynergyHead]:
    """Build IB_MBM and the synergy head with widths read from the models themselves.

    Teachers and student expose ``feature_dim`` and ``num_classes``; the query width is the
    student's feature width, so it is never typed by hand.
    """
    spec = spec_from(DistillSpec, spec)
    if len(teachers) < 2:
        raise ModelError(
            f"ASIB fuses K >= 2 teachers; got {len(teachers)}",
            hint="add a teacher to the recipe, or use method: kd for a single teacher",
        )
    num_classes = int(student.num_classes)
    classes = [int(t.num_classes) for t in teachers]
    if any(c != num_classes for c in classes):
        raise ModelError(f"class counts differ: student has {num_classes}, teachers have {classes}")
    ib_mbm = IBMBM(
        query_dim=int(student.feature_dim),
        teacher_dims=[int(t.feature_dim) for t in teachers],
        spec=spec.ib_mbm,
        ib=spec.ib,
    )
    head = SynergyHead(spec.ib_mbm.dim, num_classes, spec.ib_mbm.head_dropout, residual=spec.synergy_residual)
    return ib_mbm, head


@torch.no_grad()
def synergy_target(
    ib_mbm: IBMBM,
    head: nn.Module,
    out: IBOutput,
    tau: float | Tensor,
    samples: int,
    ib: bool | None = None,
    mode: Literal["noise_avg", "mu"] = "noise_avg",
    standardize: Callable[[Tensor], Tensor] | None = None,
    base: Tensor | None = None,
) -> Tensor:
    """The B-step target q (B, C), in fp32: the bottleneck's predictive distribution.

    ``noise_avg`` with the IB on: q_i = (1/S) sum_k softmax(G(mu_i + sigma_i eps_k) / tau),
    all S*B rows in one head call. With the IB off, or ``mode="mu"``: softmax(G(mu) / tau).
    ``ib`` defaults to ``ib_mbm.ib``. Run with the head in eval mode. ``standardize``, when
    given, maps G's logits before the division by tau: ASIB passes
    ``asib.methods.losses.standardize_logits`` with ``distill.logit_standardization`` on (taken
    as an argument because models sit below methods in the layout). ``base``: the teacher
    average's logits a residual head adds its output to (``SynergyHead``).
    """
    if mode not in ("noise_avg", "mu"):
        raise ValueError(f"synergy target mode must be 'noise_avg' or 'mu', got {mode!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    use_ib = ib_mbm.ib if ib is None else ib
    mu, logvar = out.mu, out.logvar

    def as_softmax_input(logits: Tensor) -> Tensor:
        return logits.float() if standardize is None else standardize(logits).float()

    def g(latent: Tensor) -> Tensor:
        return head(latent) if base is None else head(latent, base)

    if not use_ib or mode == "mu":
        return F.softmax(as_softmax_input(g(mu)) / tau, dim=-1)
    num = int(samples)
    eps = torch.randn((num, *mu.shape), device=mu.device, dtype=mu.dtype)
    z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * eps  # (S, B, D)
    logits = as_softmax_input(g(z.reshape(num * mu.shape[0], -1))).reshape(num, mu.shape[0], -1)
    return F.softmax(logits / tau, dim=-1).mean(dim=0)
