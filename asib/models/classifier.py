"""The one interface of every teacher and student: ``features(x) -> (B, d)``, ``head(f) -> (B, C)``.

``FeatureClassifier`` is the base; ``TimmClassifier`` and ``TorchvisionClassifier`` wrap a
built timm / torchvision model (its final Linear is moved out into ``self.classifier``), and
the CIFAR zoo (``asib.models.cifar``) subclasses it natively. ``blocks()`` lists the model's
trainable groups from input to output (stem first, classifier excluded); partial freezing
counts blocks from the end (``asib.models.freeze``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from asib.errors import ModelError

if TYPE_CHECKING:
    from asib.models.weights import LoadReport

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class ModelCfg:
    """Per-model data, like timm's ``default_cfg``: what the weights expect as input."""

    source: str  # "zoo", "timm" or "torchvision"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ModuleGroup(nn.Module):
    """Several modules (and loose parameters, e.g. a ViT's ``cls_token``) that form one block.

    Used for freezing and parameter grouping only; it is not callable, and it is never
    registered inside the model, so state-dict names are unchanged.
    """

    def __init__(self, modules: Sequence[nn.Module], params: Sequence[nn.Parameter] = ()) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.loose = nn.ParameterList(params)

    def forward(self, *args: object) -> None:
        raise TypeError("a ModuleGroup is a group of modules for freezing, not a layer to call")


@dataclass
class _Block:
    """A block under construction: a name, whole modules, and loose parameters."""

    name: str
    modules: list[nn.Module]
    params: list[nn.Parameter]

    def has_params(self) -> bool:
        return bool(self.params) or any(has_params(m) for m in self.modules)

    def is_norm_only(self) -> bool:
        return not self.params and all(is_norm_only(m) for m in self.modules if has_params(m))

    def build(self) -> tuple[str, nn.Module]:
        if len(self.modules) == 1 and not self.params:
            return self.name, self.modules[0]
        return self.name, ModuleGroup(self.modules, self.params)


def has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def is_norm_only(module: nn.Module) -> bool:
    """True when every parameter-holding sub-module is a normalization layer."""
    holders = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(holders) and all(isinstance(m, NORM_TYPES) for m in holders)


def assemble_blocks(
    named: Iterable[tuple[str, nn.Module]], loose: Sequence[tuple[str, nn.Parameter]] = ()
) -> list[tuple[str, nn.Module]]:
    """Drop parameter-free modules, fold a norm-only block into the one before it, and
    give ``loose`` parameters (embeddings held by a container) to the first block.

    A lone BatchNorm/LayerNorm (``bn1`` after ``conv1``, a final ``norm``) is not a block of
    its own: freezing "the last block" should never mean "just a LayerNorm".
    """
    return _finish_blocks([_Block(name, [m], []) for name, m in named], loose)


def _finish_blocks(
    blocks: list[_Block], loose: Sequence[tuple[str, nn.Parameter]] = ()
) -> list[tuple[str, nn.Module]]:
    out: list[_Block] = []
    for block in blocks:
        if not block.has_params():
            continue
        if out and block.is_norm_only():
            prev = out[-1]
            out[-1] = _Block(
                f"{prev.name}+{block.name}", prev.modules + block.modules, prev.params + block.params
            )
        else:
            out.append(block)
    if loose:
        names = "+".join(n for n, _ in loose)
        if out:
            first = out[0]
            out[0] = _Block(f"{first.name}+{names}", first.modules, [p for _, p in loose] + first.params)
        else:
            out.append(_Block(names, [], [p for _, p in loose]))
    return [block.build() for block in out]


def module_path(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``root`` (found by identity)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ModelError(f"{type(target).__name__} is not a sub-module of {type(root).__name__}")


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Swap the sub-module at dotted ``path`` for ``new``; returns the old one."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent.get_submodule(leaf)
    setattr(parent, leaf, new)
    return old


def small_input_conv(old: nn.Conv2d, init: str) -> nn.Conv2d:
    """A 3x3 stride-1 conv with ``old``'s channels, for 32x32 images.

    ``init`` follows the family: "kaiming" (ResNets) or "trunc_normal" (ConvNeXt).
    """
    conv = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
    if init == "kaiming":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    else:
        nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def small_input_error(arch: str, family: str) -> ModelError:
    return ModelError(
        f"small_input is not implemented for '{arch}' ({family}); it is for ResNet/ResNeXt and ConvNeXt "
        "(timm or tv.) and every CIFAR-zoo model",
        hint="use a zoo model (e.g. resnet32x4, wrn_40_2) or resize the data (data.image_size) and set small_input: false",
    )


class FeatureClassifier(nn.Module):
    """A classifier split into a pooled feature extractor and a (dropout +) Linear head.

    Attributes: ``arch``, ``num_classes``, ``small_input``, ``feature_dim``, ``default_cfg``;
    ``frozen_norms`` names the BatchNorm layers that freezing keeps in eval mode, even
    across a later ``train()`` call.
    """

    classifier: nn.Module

    def __init__(self, arch: str, num_classes: int, small_input: bool, default_cfg: ModelCfg) -> None:
        super().__init__()
        if num_classes < 1:
            raise ModelError(f"num_classes must be at least 1 (given: {num_classes})")
        self.arch = arch
        self.num_classes = int(num_classes)
        self.small_input = bool(small_input)
        self.default_cfg = default_cfg
        self.feature_dim = 0
        # State-dict names of parameters that small_input replaced (pretrained files do not fit them).
        self.adapted_param_names: frozenset[str] = frozenset()
        # Name of the classifier inside a wrapped timm/torchvision model ("fc", "head.fc"), if any.
        self.inner_classifier_path: str | None = None
        self.frozen_norms: frozenset[str] = frozenset()
        self.load_report: LoadReport | None = None  # set when built with weights=PATH

    def _build_head(self, feature_dim: int, drop_rate: float, classifier: nn.Module | None = None) -> None:
        """Register the head last, so parameters are ordered input to output."""
        if not 0.0 <= drop_rate < 1.0:
            raise ModelError(f"drop_rate must be in [0, 1) (given: {drop_rate})")
        self.feature_dim = int(feature_dim)
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        if classifier is None or getattr(classifier, "out_features", self.num_classes) != self.num_classes:
            classifier = nn.Linear(self.feature_dim, self.num_classes)  # e.g. ImageNet weights, fewer classes
        self.classifier = classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features, (B, feature_dim)."""
        raise NotImplementedError

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Logits from features: dropout (``drop_rate``) then ``self.classifier``."""
        return self.classifier(self.head_drop(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """Blocks with their names, input to output, classifier excluded."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """Blocks from input to output (stem first); the classifier is not one of them."""
        return [module for _, module in self.named_blocks()]

    def classifier_params(self) -> list[nn.Parameter]:
        return list(self.classifier.parameters())

    def train(self, mode: bool = True) -> FeatureClassifier:
        """Like ``nn.Module.train``, but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode and self.frozen_norms:
            for name, module in self.named_modules():
                if name in self.frozen_norms:
                    module.eval()
        return self

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, feature_dim={self.feature_dim}"


# ---------------------------------------------------------------- timm


# Stage containers of timm models without a group_matcher.
_TIMM_FALLBACK_EXPAND = ("stages", "blocks", "layers", "features")


class TimmClassifier(FeatureClassifier):
    """A timm model: features by ``forward_features`` + ``forward_head(pre_logits=True)``,
    blocks by its own ``group_matcher(coarse=True)``."""

    def __init__(
        self, inner: nn.Module, arch: str, num_classes: int, small_input: bool, drop_rate: float = 0.0
    ):
        timm_cfg = dict(getattr(inner, "pretrained_cfg", None) or {})  # timm's own per-model data
        super().__init__(arch, num_classes, small_input, _timm_model_cfg(timm_cfg, small_input))
        adapted = _adapt_timm_small_input(inner, arch, timm_cfg) if small_input else []
        classifier = inner.get_classifier()
        if isinstance(classifier, tuple | list):
            raise ModelError(
                f"timm model '{arch}' has {len(classifier)} classifier heads (distilled); not supported"
            )
        path = module_path(inner, classifier)
        replace_module(inner, path, nn.Identity())
        self.model = inner
        self.inner_classifier_path = path
        self.adapted_param_names = frozenset(f"model.{n}" for n in adapted)
        classifier, feature_dim = _as_head(classifier, arch)
        self._build_head(feature_dim, drop_rate, classifier)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        from timm.models import group_parameters

        if not hasattr(self.model, "group_matcher"):  # a few timm families (MetaFormer) lack one
            return children_blocks(self.model, _TIMM_FALLBACK_EXPAND)
        params = dict(self.model.named_parameters())
        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        blocks = [_cover(self.model, {id(params[n]) for n in groups[gid]}) for gid in sorted(groups)]
        return _finish_blocks(blocks)


def _timm_model_cfg(timm_cfg: dict[str, Any], small_input: bool) -> ModelCfg:
    """mean/std/input size from timm's pretrained cfg (ImageNet defaults when absent)."""
    mean = tuple(float(v) for v in timm_cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in timm_cfg.get("std") or IMAGENET_STD)
    c, h, w = (3, 32, 32) if small_input else tuple(int(v) for v in timm_cfg.get("input_size") or (3, 224, 224))
    return ModelCfg("timm", mean, std, (c, h, w))


def _as_head(classifier: nn.Module, arch: str) -> tuple[nn.Module, int]:
    """timm's classifier as a (B, d) -> (B, C) module, and d.

    A 1x1 Conv2d classifier (DLA, DPN) becomes the equivalent Linear (weights copied); an
    MLP head (MetaFormer's MlpHead, RepViT's) is kept whole, d read from its first Linear.
    """
    if isinstance(classifier, nn.Linear):
        return classifier, classifier.in_features
    if isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1) and classifier.groups == 1:
        linear = nn.Linear(classifier.in_channels, classifier.out_channels, bias=classifier.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(classifier.weight.flatten(1))
            if classifier.bias is not None:
                linear.bias.copy_(classifier.bias)
        return linear, linear.in_features
    first = next((m for m in classifier.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ModelError(
            f"timm model '{arch}' ends in a {type(classifier).__name__}, not a Linear head; not supported"
        )
    return classifier, first.in_features


def _cover(root: nn.Module, group: set[int]) -> _Block:
    """The block of parameters ``group`` (ids): the fewest whole sub-modules of ``root``
    whose parameters all belong to it, plus any left over (e.g. ``cls_token``) as loose.

    timm groups parameters by name (``layer1.0.conv1.weight``, ...); folding them up to
    ``layer1`` makes a block a real module, with its buffers and parameter-free norms.
    """
    chosen: list[str] = []
    covered: set[int] = set()
    for name, module in root.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        ids = {id(p) for p in module.parameters()}
        if ids and ids <= group:
            chosen.append(name)
            covered |= ids
    loose = [(n, p) for n, p in root.named_parameters() if id(p) in group and id(p) not in covered]
    label = "+".join([f"model.{n}" for n in chosen] + [f"model.{n}" for n, _ in loose])
    return _Block(label, [root.get_submodule(n) for n in chosen], [p for _, p in loose])


def _adapt_timm_small_input(inner: nn.Module, arch: str, timm_cfg: dict[str, Any]) -> list[str]:
    """3x3 stride-1 first conv and no max-pool (ResNet family); 3x3 stride-1 stem conv
    instead of the 4x4/4 patchify (ConvNeXt, so stage 1 runs at 32x32). Returns the
    replaced parameter names."""
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet

    if isinstance(inner, ResNet):
        path, init = str(timm_cfg.get("first_conv") or "conv1"), "kaiming"
        inner.maxpool = nn.Identity()
    elif isinstance(inner, ConvNeXt):
        path, init = str(timm_cfg.get("first_conv") or "stem.0"), "trunc_normal"
    else:
        raise small_input_error(arch, f"timm {type(inner).__name__}")
    old = inner.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise small_input_error(arch, f"timm {type(inner).__name__} with a {type(old).__name__} stem")
    new = small_input_conv(old, init)
    replace_module(inner, path, new)
    return [f"{path}.{n}" for n, _ in new.named_parameters()]


# ---------------------------------------------------------------- torchvision

# Containers whose children are the real stages (ViT: the encoder's layers).
_TV_EXPAND = ("features", "trunk_output", "layers", "blocks", "encoder", "encoder.layers")


def children_blocks(
    root: nn.Module, expand: Sequence[str], prefix: str = "model."
) -> list[tuple[str, nn.Module]]:
    """Blocks from the children of ``root`` in order, descending into the containers
    named in ``expand`` (dotted paths); parameters held directly by ``root`` or by those
    containers (class token, position embedding) join the first block."""
    named: list[tuple[str, nn.Module]] = []
    loose: list[tuple[str, nn.Parameter]] = []

    def walk(module: nn.Module, path: str) -> None:
        loose.extend((f"{prefix}{path}{n}", p) for n, p in module.named_parameters(recurse=False))
        for name, child in module.named_children():
            if f"{path}{name}" in expand:
                walk(child, f"{path}{name}.")
            else:  # a classifier's container keeps what precedes the final Linear
                named.append((f"{prefix}{path}{name}", child))

    walk(root, "")
    return assemble_blocks(named, loose)


_TV_HEADS = ("fc", "classifier", "head", "heads")


class TorchvisionClassifier(FeatureClassifier):
    """A torchvision classifier whose final Linear (``fc`` or the last layer of
    ``classifier``/``head``/``heads``) is moved out; the rest returns pooled features.

    The Dropout right before that Linear is removed too: ``drop_rate`` (head dropout)
    replaces it, the same for every family.
    """

    def __init__(
        self, inner: nn.Module, arch: str, num_classes: int, small_input: bool, drop_rate: float = 0.0
    ):
        size = (3, 32, 32) if small_input else (3, 224, 224)
        super().__init__(
            arch, num_classes, small_input, ModelCfg("torchvision", IMAGENET_MEAN, IMAGENET_STD, size)
        )
        adapted = _adapt_tv_small_input(inner, arch) if small_input else []
        path, linear = _tv_classifier(inner, arch)
        parent_path, _, leaf = path.rpartition(".")
        if parent_path:
            parent = inner.get_submodule(parent_path)
            names = [n for n, _ in parent.named_children()]
            for name in reversed(names[: names.index(leaf)]):
                if not isinstance(parent.get_submodule(name), nn.Dropout):
                    break
                setattr(parent, name, nn.Identity())
        replace_module(inner, path, nn.Identity())
        self.model = inner
        self.inner_classifier_path = path
        self.adapted_param_names = frozenset(f"model.{n}" for n in adapted)
        self._build_head(linear.in_features, drop_rate, linear)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor):  # e.g. GoogLeNet aux outputs in train mode
            raise ModelError(f"torchvision model '{self.arch}' returned {type(out).__name__}, not a tensor")
        return out

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return children_blocks(self.model, _TV_EXPAND)


def _tv_classifier(inner: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    for attr in _TV_HEADS:
        module = getattr(inner, attr, None)
        if isinstance(module, nn.Linear):
            return attr, module
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
            last = [n for n, _ in module.named_children()][-1]
            return f"{attr}.{last}", module[-1]
    raise ModelError(
        f"torchvision model '{arch}' has no final Linear classifier (fc/classifier/head); not supported"
    )


def _adapt_tv_small_input(inner: nn.Module, arch: str) -> list[str]:
    """ResNet: 3x3 stride-1 conv1, no max-pool. ConvNeXt: 3x3 stride-1 stem conv."""
    from torchvision.models import ConvNeXt, ResNet

    if isinstance(inner, ResNet):
        path, init = "conv1", "kaiming"
        inner.maxpool = nn.Identity()
    elif isinstance(inner, ConvNeXt):
        path, init = "features.0.0", "trunc_normal"
    else:
        raise small_input_error(arch, f"torchvision {type(inner).__name__}")
    new = small_input_conv(inner.get_submodule(path), init)
    replace_module(inner, path, new)
    return [f"{path}.{n}" for n, _ in new.named_parameters()]


def init_conv_bn(module: nn.Module) -> None:
    """He init for convs (fan_out), ones/zeros for norms, small uniform for Linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
