"""The ``evaluate`` step: score any checkpoint the project writes on a prepared split."""

from __future__ import annotations

from pathlib import Path

import torch

from asib.engine.metrics import EvalResult, evaluate_predictor
from asib.errors import CheckpointError, DataError


def evaluate_checkpoint(
    path: str | Path, data_dir: str | Path, split: str = "test", device: str = "auto", batch_size: int = 512
) -> tuple[EvalResult, dict[str, object]]:
    """Score any checkpoint the project writes on a prepared split; also return what was scored."""
    from asib.data import load_info
    from asib.engine.checkpoint import load_model, read_info
    from asib.engine.loaders import eval_loader
    from asib.engine.runtime import make_runtime

    info = read_info(path)  # fails on a missing, truncated or foreign file before the data is read
    data = load_info(data_dir)
    if info.num_classes != data.num_classes:
        raise CheckpointError(
            f"{path}: the {info.kind} has {info.num_classes} classes but {data_dir} has {data.num_classes}"
        )
    if split not in data.counts or data.counts[split] == 0:
        raise DataError(f"{data_dir}: has no '{split}' split (splits: {', '.join(k for k, v in data.counts.items() if v)})")
    runtime = make_runtime(device)
    loader = eval_loader(data_dir, split, data, batch_size, runtime)
    if info.kind == "synergy":
        from asib.engine.checkpoint import load_synergy_predictor

        predict = load_synergy_predictor(info, runtime)
    else:
        model, _ = load_model(path, device=runtime.device)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with runtime.autocast():
                return model(x)

    result = evaluate_predictor(predict, loader.batches(0), data.num_classes)
    return result, {"checkpoint": str(path), "kind": info.kind, "arch": info.arch, "split": split, "classes": data.classes}
