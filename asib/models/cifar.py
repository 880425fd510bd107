"""The CIFAR zoo: the students and teachers of the standard CIFAR-100 KD tables (CRD, ReviewKD, DKD).

All take 32x32 images natively (3x3 stride-1 stems, no max-pool), so ``small_input`` does
not apply. Each model is a ``FeatureClassifier``: it lists its blocks in ``block_names``
(in forward order); ``features`` runs them and global-average-pools.

| name                  | blocks per stage | widths (stem; stages) | feature dim |
|-----------------------|------------------|-----------------------|-------------|
| resnet8 ... resnet110 | (depth-2)/6      | 16; 16, 32, 64        | 64          |
| resnet8x4, resnet32x4 | 1, 5             | 32; 64, 128, 256      | 256         |
| wrn_D_k               | (D-4)/6          | 16; 16k, 32k, 64k     | 64k         |
| vgg8, vgg13           | 1 / 2 convs      | 64, 128, 256, 512, 512| 512         |
| mobilenetv2           | MobileNetV2 x0.5, stem stride 2 (CRD "mobile_half") | 1280 |
| shufflev2             | ShuffleNetV2 1x: 116, 232, 464, conv 1024 | 1024 |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from asib.models.classifier import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    FeatureClassifier,
    ModelCfg,
    assemble_blocks,
    init_conv_bn,
)
from asib.models.zoo import register_model

CIFAR_CFG = ModelCfg("zoo", CIFAR100_MEAN, CIFAR100_STD, (3, 32, 32))


def conv_bn(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CifarNet(FeatureClassifier):
    """Base of the zoo: blocks run in ``block_names`` order, then global average pooling."""

    block_names: tuple[str, ...] = ()

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__(arch, num_classes, small_input=True, default_cfg=CIFAR_CFG)

    def _finish(self, feature_dim: int, drop_rate: float) -> None:
        self._build_head(feature_dim, drop_rate)
        init_conv_bn(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.block_names:
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return assemble_blocks((name, getattr(self, name)) for name in self.block_names)


# ---------------------------------------------------------------- ResNet (He et al. 2016, CIFAR variant)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, relu=False)
        self.shortcut = (
            conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(CifarNet):
    """ResNet-(6n+2): a 3x3 stem and three stages of n basic blocks (strides 1, 2, 2)."""

    block_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        arch: str,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(arch, num_classes)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (given: {depth})")
        n = (depth - 2) // 6
        self.stem = conv_bn(3, widths[0])
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self._finish(widths[-1], drop_rate)


def _resnet(depth: int, widths: tuple[int, int, int, int]) -> Callable[..., FeatureClassifier]:
    def build(num_classes: int, drop_rate: float = 0.0, arch: str = "") -> FeatureClassifier:
        return CifarResNet(arch, depth, widths, num_classes, drop_rate)

    return build


_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", feature_dim=64)(_resnet(_depth, _NARROW))
register_model("resnet8x4", feature_dim=256)(_resnet(8, _X4))
register_model("resnet32x4", feature_dim=256)(_resnet(32, _X4))


# ---------------------------------------------------------------- Wide ResNet (Zagoruyko & Komodakis 2016)


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 conv shortcut
    (fed the pre-activated input) when the width changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + skip


class WideResNet(CifarNet):
    """WRN-D-k: a 3x3 stem of 16, three stages of (D-4)/6 blocks of widths 16k, 32k, 64k,
    and a final BN-ReLU (folded into the last block)."""

    block_names = ("stem", "layer1", "layer2", "layer3", "final_norm")

    def __init__(self, arch: str, depth: int, widen: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__(arch, num_classes)
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (given: {depth})")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin = 16
        for i, (cout, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            blocks = [WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.final_norm = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self._finish(cin, drop_rate)


def _wrn(depth: int, widen: int) -> Callable[..., FeatureClassifier]:
    def build(num_classes: int, drop_rate: float = 0.0, arch: str = "") -> FeatureClassifier:
        return WideResNet(arch, depth, widen, num_classes, drop_rate)

    return build


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_widen}", feature_dim=64 * _widen)(_wrn(_depth, _widen))


# ---------------------------------------------------------------- VGG with BN (Simonyan & Zisserman 2015)

_VGG = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVGG(CifarNet):
    """Five stages of 3x3 conv-BN-ReLU; 2x2 max-pool after the first three (32 -> 4)."""

    block_names = ("stage1", "stage2", "stage3", "stage4", "stage5")

    def __init__(
        self, arch: str, stages: tuple[tuple[int, ...], ...], num_classes: int, drop_rate: float = 0.0
    ):
        super().__init__(arch, num_classes)
        cin = 3
        for i, widths in enumerate(stages):
            layers: list[nn.Module] = []
            for cout in widths:
                layers.append(conv_bn(cin, cout))
                cin = cout
            if i < 3:
                layers.append(nn.MaxPool2d(2, 2))
            setattr(self, f"stage{i + 1}", nn.Sequential(*layers))
        self._finish(cin, drop_rate)


def _vgg(name: str) -> Callable[..., FeatureClassifier]:
    def build(num_classes: int, drop_rate: float = 0.0, arch: str = "") -> FeatureClassifier:
        return CifarVGG(arch, _VGG[name], num_classes, drop_rate)

    return build


for _name in _VGG:
    register_model(_name, feature_dim=512)(_vgg(_name))


# ---------------------------------------------------------------- MobileNetV2 (Sandler et al. 2018), KD-table variant


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t=1), 3x3 depthwise, 1x1 linear projection; identity skip
    when stride is 1 and widths match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, mid, 1)] if expand != 1 else []
        layers += [conv_bn(mid, mid, 3, stride, groups=mid), conv_bn(mid, cout, 1, relu=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 as in the CIFAR-100 KD tables: stride-2 stem, the 24-wide stage at
    stride 1 (32 -> 16 -> 8 -> 4 -> 2), widths scaled by ``width`` (int(c * width)),
    and a 1x1 conv to 1280 before pooling."""

    # (expansion t, width c, repeats n, stride s) of the paper's Table 2, CIFAR strides.
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )
    block_names = ("stem", *(f"stage{i + 1}" for i in range(len(SETTINGS))), "conv_last")

    def __init__(self, arch: str, num_classes: int, width: float = 0.5, drop_rate: float = 0.0) -> None:
        super().__init__(arch, num_classes)
        cin = int(32 * width)
        self.stem = conv_bn(3, cin, 3, 2)
        for i, (t, c, n, s) in enumerate(self.SETTINGS):
            cout = int(c * width)
            blocks = [
                InvertedResidual(cin if j == 0 else cout, cout, s if j == 0 else 1, t) for j in range(n)
            ]
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
            cin = cout
        last = 1280 if width <= 1.0 else int(1280 * width)
        self.conv_last = conv_bn(cin, last, 1)
        self._finish(last, drop_rate)


@register_model("mobilenetv2", feature_dim=1280)
def mobilenetv2(num_classes: int, drop_rate: float = 0.0, arch: str = "mobilenetv2") -> FeatureClassifier:
    """CIFAR MobileNetV2 x0.5 (CRD's ``mobile_half``)."""
    return CifarMobileNetV2(arch, num_classes, 0.5, drop_rate)


# ---------------------------------------------------------------- ShuffleNetV2 (Ma et al. 2018), CIFAR variant


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split channels in half, transform one half (1x1, 3x3 dw, 1x1), concat,
    shuffle. Stride 2: both branches see the whole input and halve the resolution."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride == 2 else cin // 2
        if stride == 1 and cin != cout:
            raise ValueError("a stride-1 shuffle unit keeps its width")
        self.left = (
            nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, relu=False), conv_bn(cin, half, 1))
            if stride == 2
            else nn.Identity()
        )
        self.right = nn.Sequential(
            conv_bn(branch_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            keep, work = x.chunk(2, dim=1)
            out = torch.cat((keep, self.right(work)), dim=1)
        else:
            out = torch.cat((self.left(x), self.right(x)), dim=1)
        return channel_shuffle(out)


class CifarShuffleNetV2(CifarNet):
    """ShuffleNetV2 1x for 32x32: 3x3 stride-1 stem of 24, three stages (one stride-2 unit
    then 3/7/3 units) of widths 116/232/464, a 1x1 conv to 1024."""

    block_names = ("stem", "stage1", "stage2", "stage3", "conv_last")

    def __init__(self, arch: str, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__(arch, num_classes)
        self.stem = conv_bn(3, 24)
        cin = 24
        for i, (cout, repeats) in enumerate(((116, 3), (232, 7), (464, 3))):
            units = [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(repeats)]
            setattr(self, f"stage{i + 1}", nn.Sequential(*units))
            cin = cout
        self.conv_last = conv_bn(cin, 1024, 1)
        self._finish(1024, drop_rate)


@register_model("shufflev2", feature_dim=1024)
def shufflev2(num_classes: int, drop_rate: float = 0.0, arch: str = "shufflev2") -> FeatureClassifier:
    """CIFAR ShuffleNetV2 1x (CRD's ``ShuffleV2``)."""
    return CifarShuffleNetV2(arch, num_classes, drop_rate)
