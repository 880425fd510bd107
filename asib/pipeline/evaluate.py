"""The ``evaluate`` step: score any checkpoint the project writes on a prepared split.

Accuracies and ECE are in percent (ECE: the mean |confidence - accuracy| over 15 equal-width
confidence bins, weighted by the bins' shares of the images, times 100), NLL in nats per
image. Without a data folder the one named by the checkpoint's recipe is used. A checkpoint
whose header records the input size and normalisation it was trained with is refused on data
prepared otherwise: the model would run, and score near chance, without a word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asib.data import DatasetInfo
from asib.engine.checkpoint import CheckpointInfo
from asib.errors import CheckpointError, DataError, short_repr

UNITS = {"top1": "percent", "top5": "percent", "ece": "percent", "nll": "nats per image",
         "per_class.top1": "percent", "confusion": "images; rows: true class, columns: predicted class"}
ECE_BINS = 15


@dataclass(frozen=True)
class Evaluation:
    """Figures of one checkpoint on one split, and what was scored."""

    checkpoint: str
    kind: str
    arch: str
    data: str  # the prepared data folder
    data_from_recipe: bool  # True when the folder was read from the checkpoint's recipe
    split: str
    classes: tuple[str, ...]
    n: int
    top1: float  # percent
    top5: float  # percent
    nll: float  # nats per image
    ece: float  # percent
    per_class: list[float]  # top-1 of each class, percent
    per_class_n: list[int]  # images of each class in the split
    confusion: list[list[int]]  # [true][predicted] image counts

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``asib evaluate --json``."""
        return {
            "checkpoint": self.checkpoint, "kind": self.kind, "arch": self.arch,
            "data": self.data, "split": self.split, "n": self.n,
            "top1": self.top1, "top5": self.top5, "nll": self.nll, "ece": self.ece, "units": UNITS,
            "per_class": [
                {"class": name, "top1": acc, "n": count}
                for name, acc, count in zip(self.classes, self.per_class, self.per_class_n, strict=True)
            ],
            "classes": list(self.classes),
            "confusion": self.confusion,
        }


def evaluate_checkpoint(
    path: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 512,
) -> Evaluation:
    """Score any checkpoint the project writes on a prepared split (``data_dir`` None: the data
    its recipe names). Refuses data of another class count, input size or normalisation."""
    from asib.data import load_info
    from asib.engine.checkpoint import load_model, read_info
    from asib.engine.loaders import eval_loader
    from asib.engine.metrics import collect_logits, figures_from_logits
    from asib.engine.runtime import make_runtime

    info = read_info(path)  # fails on a missing, truncated or foreign file before the data is read
    trained = training_header(info)
    from_recipe = data_dir is None
    data_dir = recipe_data_dir(trained) if data_dir is None else Path(data_dir)
    data = load_info(data_dir)
    check_data_fits(info, data, data_dir, trained)
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

    logits, targets = collect_logits(predict, loader.batches(0))
    figures = figures_from_logits(logits, targets, data.num_classes)
    confusion = confusion_matrix(logits.argmax(1), targets, data.num_classes)
    return Evaluation(
        checkpoint=str(path), kind=info.kind, arch=info.arch, data=str(data_dir), data_from_recipe=from_recipe,
        split=split, classes=tuple(data.classes), n=figures.n,
        top1=figures.top1, top5=figures.top5, nll=figures.nll, ece=100.0 * figures.ece,
        per_class=list(figures.per_class), per_class_n=[sum(row) for row in confusion], confusion=confusion,
    )


def confusion_matrix(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Image counts, rows the true class and columns the predicted one."""
    flat = (targets.long() * num_classes + pred.long()).cpu()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).tolist()


# ---------------------------------------------------------------- the data a checkpoint was trained on


def training_header(info: CheckpointInfo) -> CheckpointInfo:
    """The header that says how a checkpoint was trained: its own, or for a synergy checkpoint
    the header of the student it is queried with (the synergy's own names no data)."""
    if info.kind != "synergy":
        return info
    from asib.engine.checkpoint import read_info, synergy_student_path

    student = synergy_student_path(info)
    return read_info(student) if student.is_file() else info


def recipe_data_dir(info: CheckpointInfo) -> Path:
    """The prepared-data folder the checkpoint's recipe names (``data.dir``, else data/<name>).

    Only the recipe's ``data`` section and name are read: a recipe of an older asib may hold
    keys this version no longer accepts, and evaluating needs none of them.
    """
    recipe = info.json_field("recipe")
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{info.path}: its header holds no recipe, so it names no data; give --data DIR",
                              hint="a prepared data folder, from asib prepare-data RECIPE")
    data = recipe.get("data")
    folder = data.get("dir") if isinstance(data, dict) else None
    name = recipe.get("name")
    if isinstance(folder, str) and folder:
        found = Path(folder)
    elif isinstance(name, str) and name:
        found = Path("data") / name
    else:
        raise CheckpointError(f"{info.path}: its recipe names no data folder; give --data DIR")
    if not (found / "dataset.json").is_file():
        beside = info.path.parent / "recipe.yaml"
        how = f"asib prepare-data {beside}" if beside.is_file() else "asib prepare-data RECIPE"
        raise DataError(
            f"{info.path}: no --data given, and {found}, the data its recipe names, is not prepared here",
            hint=f"give --data DIR, or prepare it ({how}) in the folder the run was started from",
        )
    return found


def _floats(info: CheckpointInfo, key: str, length: int | None = None) -> tuple[float, ...] | None:
    """A list of numbers from the header, None when absent; a malformed one is a CheckpointError."""
    value = info.json_field(key)
    if value is None:
        return None
    ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or (length is not None and len(value) != length):
        raise CheckpointError(f"{info.path}: asib.{key} in its header is {short_repr(value, 60)}, not a list of"
                              f" {length or 'some'} numbers", hint="re-run the step that wrote it")
    return tuple(float(v) for v in value)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def _described(size: Sequence[float] | None, mean: Sequence[float] | None, std: Sequence[float] | None) -> str:
    parts = [f"{int(size[0])}x{int(size[1])} images" if size else "images"]
    if mean is not None and std is not None:
        parts.append(f"(mean {', '.join(f'{v:.4g}' for v in mean)}; std {', '.join(f'{v:.4g}' for v in std)})")
    return " ".join(parts)


def check_data_fits(
    info: CheckpointInfo, data: DatasetInfo, data_dir: str | Path, trained: CheckpointInfo | None = None
) -> None:
    """Refuse data the checkpoint cannot be scored on: another class count, or another input size
    or normalisation than its header (``trained``: the header that records them) says it was
    trained with. A header without them (a checkpoint written by a library user) is accepted."""
    if info.num_classes != data.num_classes:
        raise CheckpointError(
            f"{info.path}: the {info.kind} has {info.num_classes} classes but {data_dir} has {data.num_classes}"
        )
    trained = trained or info
    size = _floats(trained, "image_size", 2)
    mean, std = _floats(trained, "mean"), _floats(trained, "std")
    size_differs = size is not None and tuple(int(v) for v in size) != tuple(data.image_size)
    norm_differs = (mean is not None and not _close(mean, data.mean)) or (std is not None and not _close(std, data.std))
    if size_differs or norm_differs:
        raise CheckpointError(
            f"{info.path}: trained on {_described(size, mean, std)}, but {data_dir} holds"
            f" {_described(data.image_size, data.mean if mean else None, data.std if std else None)}",
            hint="evaluate on data prepared as its training data was (the same data.image_size and training"
            " split); without --data, the data its recipe names is used",
        )


# ---------------------------------------------------------------- the confusion plot


def plot_confusion(evaluation: Evaluation, out: str | Path) -> Path:
    """A PNG of the confusion matrix, each row as shares of its true class (counts written in the
    cells up to 30 classes, class names on the axes up to 60)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CheckpointError("--plot needs matplotlib, which is not installed",
                              hint="pip install 'asib[report]'") from None
    from asib.engine.io import atomic_write

    counts = torch.tensor(evaluation.confusion, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)
    k = len(evaluation.classes)
    side = min(4.0 + 0.28 * k, 24.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if k <= 60:
        names = [c if len(c) <= 18 else c[:17] + "…" for c in evaluation.classes]
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    dark = shares[i, j] > 0.5
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{evaluation.kind} {evaluation.arch} on {Path(evaluation.data).name} ({evaluation.split}, "
                 f"n={evaluation.n}): top-1 {evaluation.top1:.2f}%", fontsize=10)
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return out
