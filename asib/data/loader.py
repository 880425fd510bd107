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
_STREAM_BASE = 1000  # streams other than 0 add this to their id in the seed


class Batch(NamedTuple):
    """One batch: normalised float images, labels, and the mixing partner (``y2``, ``lam``).

    Unmixed batches have ``y2=None`` and ``lam=1.0``; the loss of a mixed batch is
    ``lam * loss(y) + (1 - lam) * loss(y2)``. ``idx``: each image's index in its split (of a
    mixed image, the one whose label is ``y``), or None where the batch's source does not say.
    """

    x: torch.Tensor
    y: torch.Tensor
    y2: torch.Tensor | None = None
    lam: float = 1.0
    idx: torch.Tensor | None = None


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (negative seeds allowed)."""
    state = np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _epoch_key(epoch: int, stream: int) -> tuple[int, ...]:
    """The seed parts of an epoch of a stream (stream 0 keeps the plain epoch number)."""
    return (epoch,) if stream == 0 else (epoch, _STREAM_BASE + stream)


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
        self.batch_size, self.augment, self.shuffle = batch_size, augment, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.channels_last = channels_last
        self.labels = labels.to(self.device, torch.int64)
        self.num_images = n = images_uint8.shape[0]
        # (x / 255 - mean) / std  ==  x * inv + bias: one fused multiply-add per pixel.
        inv = [1.0 / (255.0 * s) for s in std]
        bias = [-m / s for m, s in zip(mean, std, strict=True)]
        self._inv = torch.tensor(inv, device=self.device).view(1, -1, 1, 1)
        self._bias = torch.tensor(bias, device=self.device).view(1, -1, 1, 1)
        self._pad = augment.crop_padding if augment is not None else 0
        self._hflip = augment is not None and augment.hflip
        self.images: torch.Tensor | None = None
        if self._pad > 0 or self._hflip:
            self._init_window_gather(images_uint8)
        else:
            self.images = images_uint8.to(self.device)
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

    def indices(self, epoch: int, stream: int = 0) -> torch.Tensor:
        """This rank's sample indices of ``epoch``, in batch order (before dropping the last batch)."""
        n = self.num_images
        if self.shuffle:
            order = torch.randperm(
                n, generator=_torch_gen(_seed(self.seed, *_epoch_key(epoch, stream), _ORDER), torch.device("cpu"))
            )
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: (n // self.world_size) * self.world_size]
        return order[self.rank :: self.world_size].to(self.device)

    def batches(self, epoch: int, start: int = 0, stream: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` from batch index ``start`` (to resume mid-epoch).

        ``stream`` picks an independent sequence of orders and augmentations: the student's
        epochs use stream 0 whatever else a method trains, so at one seed every method's
        n-th student epoch sees the same batches; ASIB's teacher-side epochs draw stream 1.
        """
        if not 0 <= start <= self._len:
            raise DataError(f"cannot start at batch {start}: an epoch has {self._len}")
        order = self.indices(epoch, stream)
        key = _epoch_key(epoch, stream)
        for b in range(start, self._len):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._make_batch(idx, self.labels.index_select(0, idx), key, b)

    def _init_window_gather(self, images: torch.Tensor) -> None:
        """Keep the split zero-padded once, channels last, so that a batch's crops and flips are
        one gather of its pixels (no per-batch pad, flip or layout change).

        ``self._offsets[f]`` holds, for every output pixel in the order the batch is returned
        (H, W, C when channels_last, else C, H, W), its offset from the window's corner in the
        padded image, mirrored left-right when ``f == 1``.
        """
        p = self._pad
        _, c, h, w = images.shape
        padded = F.pad(images.to(self.device), (p, p, p, p)).permute(0, 2, 3, 1)
        self._padded = padded.contiguous().view(-1)  # (N, Hp, Wp, C), flattened
        hp, wp = h + 2 * p, w + 2 * p
        # int32 offsets halve the index traffic; int64 only when the split needs it
        self._index_dtype = torch.int32 if self._padded.numel() < 2**31 else torch.int64
        rows = torch.arange(h).view(h, 1, 1) * (wp * c)
        chans = torch.arange(c).view(1, 1, c)
        tables = []
        for cols in (torch.arange(w), torch.arange(w - 1, -1, -1)):
            offset = rows + cols.view(1, w, 1) * c + chans  # (H, W, C)
            if not self.channels_last:
                offset = offset.permute(2, 0, 1)  # (C, H, W): the batch comes out NCHW
            tables.append(offset.reshape(-1))
        self._offsets = torch.stack(tables).to(self.device, self._index_dtype)
        self._strides = (hp * wp * c, wp * c, c)  # image, row, column steps in the padded split
        self._shape = (h, w, c) if self.channels_last else (c, h, w)

    def _make_batch(self, idx: torch.Tensor, y: torch.Tensor, key: tuple[int, ...], index: int) -> Batch:
        """Gather (cropped, flipped), normalise and mix the images ``idx`` of one batch."""
        aug = self.augment
        gen = None if aug is None else _torch_gen(_seed(self.seed, *key, self.rank, index, _TENSORS), self.device)
        if self.images is None:  # crops or flips: one gather from the padded split
            assert gen is not None
            xf = self._gather_windows(idx, gen)
        else:
            x = self.images.index_select(0, idx)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # uint8: the cheap place to convert
            xf = torch.addcmul(self._bias, x, self._inv)
        if aug is None or gen is None:
            return Batch(xf, y, idx=idx)
        rng = np.random.default_rng(_seed(self.seed, *key, self.rank, index, _SCALARS))
        xf, y2, lam = mix(xf, y, aug, rng, gen)
        if self.channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        return Batch(xf, y, y2, lam, idx)

    def _gather_windows(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Per-sample random crop (a window of the zero-padded image) and left-right flip with
        probability 1/2, by one gather, then normalisation in one multiply-add."""
        b, p, dev = idx.shape[0], self._pad, self.device
        step_image, step_row, step_col = self._strides
        corner = idx * step_image
        if p > 0:
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev)
            corner = corner + dy * step_row + dx * step_col
        corner = corner.to(self._index_dtype)[:, None]
        if self._hflip:
            flip = torch.rand(b, generator=gen, device=dev) < 0.5
            offsets = self._offsets.index_select(0, flip.long()).add_(corner)
        else:
            offsets = self._offsets[0] + corner
        x = self._padded.index_select(0, offsets.view(-1)).view(b, *self._shape)
        if self.channels_last:  # (B, H, W, C) in memory: normalise there, return the NCHW view
            c = self._shape[2]
            return torch.addcmul(self._bias.view(c), x, self._inv.view(c)).permute(0, 3, 1, 2)
        return torch.addcmul(self._bias, x, self._inv)


# ---------------------------------------------------------------- batched augmentation


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
        return x.mul(lam).add_(x.index_select(0, perm), alpha=1.0 - lam), y[perm], lam
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
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pad: int = 0,
) -> InMemoryLoader:
    """A loader over one prepared split, normalised with the dataset's train mean/std
    (or the ``mean``/``std`` given, e.g. a pretrained teacher's).

    ``train=True`` shuffles, drops the last partial batch and applies ``augment``;
    otherwise the order is fixed, every sample is kept and nothing is augmented. ``pad``
    zero-pads every image by that many pixels on each side, once, as it is loaded.
    """
    info = load_info(data_dir)
    images, labels = load_split(data_dir, split)
    if not train and images.shape[0] == 0:
        raise DataError(
            f"{data_dir}: the {split} split is empty", hint="set data.val_fraction > 0 and prepare again"
        )
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither (then the dataset's own are used)")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise DataError(f"pad must be a whole number of pixels, 0 or more (given: {pad!r})")
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
    return InMemoryLoader(
        images,
        labels,
        batch_size=batch_size,
        mean=info.mean if mean is None else mean,
        std=info.std if std is None else std,
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
