"""Evaluation figures: top-1, top-5, NLL, ECE and per-class accuracy of logits on a split."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from asib.data import Batch


@dataclass(frozen=True)
class EvalResult:
    """Figures of one model on one split; accuracies in percent."""

    top1: float
    top5: float
    nll: float
    ece: float
    n: int
    per_class: list[float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compute_accuracy(outputs: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent."""
    k = min(k, outputs.shape[1])
    hit = (outputs.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    return float(hit.float().mean().item() * 100.0)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE over equal-width confidence bins, in [0, 1]."""
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    conf_sum = torch.zeros(bins, device=probs.device).index_add_(0, idx, conf)
    acc_sum = torch.zeros(bins, device=probs.device).index_add_(0, idx, correct)
    gap = (conf_sum - acc_sum).abs()
    return float((gap.sum() / max(1, conf.numel())).item())


def figures_from_logits(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> EvalResult:
    """All figures from the full logits of a split (fp32)."""
    logits = logits.float()
    probs = logits.softmax(dim=1)
    pred = logits.argmax(dim=1)
    correct = (pred == targets).float()
    per_total = torch.zeros(num_classes, device=logits.device).index_add_(0, targets, torch.ones_like(correct))
    per_hit = torch.zeros(num_classes, device=logits.device).index_add_(0, targets, correct)
    per_class = (per_hit / per_total.clamp_min(1) * 100.0).tolist()
    return EvalResult(
        top1=compute_accuracy(logits, targets, 1),
        top5=compute_accuracy(logits, targets, 5),
        nll=float(F.cross_entropy(logits, targets).item()),
        ece=expected_calibration_error(probs, targets),
        n=int(targets.numel()),
        per_class=[round(v, 4) for v in per_class],
    )


@torch.inference_mode()
def collect_logits(
    predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``predict`` over every batch; logits and labels stay on the device until the end."""
    outs, ys = [], []
    for batch in batches:
        outs.append(predict(batch.x).float())
        ys.append(batch.y)
    return torch.cat(outs), torch.cat(ys)


def evaluate_predictor(
    predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch], num_classes: int
) -> EvalResult:
    logits, targets = collect_logits(predict, batches)
    return figures_from_logits(logits, targets, num_classes)


def top1_of(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]) -> float:
    """Top-1 accuracy in percent (the cheap figure used every epoch)."""
    logits, targets = collect_logits(predict, batches)
    return compute_accuracy(logits, targets, 1)
