"""The in-memory loader: a whole split as one uint8 tensor on the device, augmented in batch.

Every epoch's order comes from a generator seeded by (seed, epoch), and every batch's
augmentation from generators seeded by (seed, epoch, rank, batch index), so a run is
reproducible and a resumed epoch (``batches(epoch, start)``) yields exactly the batches
the uninterrupted run would have. No per-image Python loops: crop, flip, normalisation
and mixup/cutmix are tensor operations on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from asib.data.prepared import load_info, load_split
from asib.errors import DataError
from asib.recipe import AugmentSpec

# Stream ids keep the generators of one (seed, epoch) independent of each other.
_ORDER, _SCALARS, _TENSORS = 1, 2, 3


class Batch(NamedTuple):
    """One batch: normalised float images, labels, and the mixing partner (``y2``, ``lam``).

    Unmixed batches have ``y2=None`` and ``lam=1.0``; the loss of a mixed batch is
    ``lam * loss(y) + (1 - lam) * loss(y2)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    y2: torch.Tensor | None = None
    lam: float = 1.0


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (negative seeds allowed)."""
    state = np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _torch_gen(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class InMemoryLoader:
    """Batches of one split, kept on ``device`` as uint8; ``batch_size`` is per rank.

    With ``world_size > 1`` every rank takes a disjoint, strided shard of the epoch's
    permutation; with ``drop_last`` all ranks get the same number of batches (what DDP
    needs), without it the shards cover every sample and may differ by one image.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentSpec | None,
        shuffle: bool,
        seed: int,
        device: str | torch.device,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        num_classes: int | None = None,
        channels_last: bool = False,
    ) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise DataError(
                f"expected uint8 images (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
            )
        if labels.shape != (images_uint8.shape[0],):
            raise DataError(f"{images_uint8.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(
                f"bad loader settings: batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
            raise DataError(
                f"labels go up to {int(labels.max())} but the model has {num_classes} classes",
                hint="the checkpoint and the data do not match; check data.dir",
            )
        channels = images_uint8.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"mean/std have {len(mean)}/{len(std)} values for {channels} channels")
        if min(std) <= 0:
            raise DataError(
                f"std must be positive, got {list(std)}", hint="the images of a channel are all alike"
            )
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        # (x / 255 - mean) / std  ==  (x - 255 mean) / (255 std): one subtract, one divide.
        self._shift = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self._scale = torch.tensor([255.0 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self.batch_size, self.augment, self.shuffle = batch_size, augment, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.channels_last = channels_last
        n = self.images.shape[0]
        per_rank = n // world_size if drop_last else len(range(rank, n, world_size))
        self.num_samples = per_rank
        self._len = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if drop_last and self._len == 0:
            raise DataError(
                f"{n} images make no full batch of {batch_size} per rank (world size {world_size})",
                hint="lower the batch size or use more training data",
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        """The batches of epoch 0: what an evaluation loader needs."""
        return self.batches(0)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices of ``epoch``, in batch order (before dropping the last batch)."""
        n = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(
                n, generator=_torch_gen(_seed(self.seed, epoch, _ORDER), torch.device("cpu"))
            )
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: (n // self.world_size) * self.world_size]
        return order[self.rank :: self.world_size].to(self.device)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` from batch index ``start`` (to resume mid-epoch)."""
        if not 0 <= start <= self._len:
            raise DataError(f"cannot start at batch {start}: an epoch has {self._len}")
        order = self.indices(epoch)
        for b in range(start, self._len):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            # index_select is much faster than advanced indexing for a batch of whole images
            images = self.images.index_select(0, idx)
            yield self._make_batch(images, self.labels.index_select(0, idx), epoch, b)

    def _make_batch(self, x: torch.Tensor, y: torch.Tensor, epoch: int, index: int) -> Batch:
        """Augment (when asked), normalise and mix one batch of uint8 images."""
        aug = self.augment
        if aug is None:
            xf, y2, lam = self._normalise(x), None, 1.0
        else:
            gen = _torch_gen(_seed(self.seed, epoch, self.rank, index, _TENSORS), self.device)
            rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, index, _SCALARS))
            if aug.crop_padding > 0:
                x = random_crop(x, aug.crop_padding, gen)
            if aug.hflip:
                x = random_hflip(x, gen)
            xf, y2, lam = mix(self._normalise(x), y, aug, rng, gen)
        if self.channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        return Batch(xf, y, y2, lam)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self._shift) / self._scale


# ---------------------------------------------------------------- batched augmentation


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch, back to the input size, by one gather."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (B, H, W, C).
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def mix(
    x: torch.Tensor, y: torch.Tensor, aug: AugmentSpec, rng: np.random.Generator, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Mixup or cutmix (50/50 when both are on) with probability ``mix_prob``; returns (x, y2, lam)."""
    modes = [m for m, alpha in (("mixup", aug.mixup_alpha), ("cutmix", aug.cutmix_alpha)) if alpha > 0]
    if not modes or rng.random() >= aug.mix_prob:
        return x, None, 1.0
    mode = modes[int(rng.integers(len(modes)))] if len(modes) > 1 else modes[0]
    alpha = aug.mixup_alpha if mode == "mixup" else aug.cutmix_alpha
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if mode == "mixup":
        return x.mul(lam).add_(x[perm], alpha=1.0 - lam), y[perm], lam
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, y[perm], lam


# ---------------------------------------------------------------- convenience


def make_loader(
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    device: str | torch.device,
    train: bool = False,
    augment: AugmentSpec | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_classes: int | None = None,
    channels_last: bool = False,
) -> InMemoryLoader:
    """A loader over one prepared split, normalised with the dataset's train mean/std.

    ``train=True`` shuffles, drops the last partial batch and applies ``augment``;
    otherwise the order is fixed, every sample is kept and nothing is augmented.
    """
    info = load_info(data_dir)
    images, labels = load_split(data_dir, split)
    if not train and images.shape[0] == 0:
        raise DataError(
            f"{data_dir}: the {split} split is empty", hint="set data.val_fraction > 0 and prepare again"
        )
    return InMemoryLoader(
        images,
        labels,
        batch_size=batch_size,
        mean=info.mean,
        std=info.std,
        augment=augment if train else None,
        shuffle=train,
        seed=seed,
        device=device,
        drop_last=train,
        rank=rank,
        world_size=world_size,
        num_classes=num_classes,
        channels_last=channels_last,
    )
