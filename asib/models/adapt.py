"""Any ``nn.Module`` classifier as a ``FeatureClassifier``: a library user's own model as a teacher or student.

``as_feature_classifier(module)`` wraps the module without copying or changing it: its
parameters are the wrapper's (the same tensors, under ``model.``), so references the user
holds stay valid, and ``module(x)`` still gives its logits.

- Classifier: timm's ``get_classifier()`` where it is an ``nn.Linear``; otherwise the last
  ``nn.Linear`` of a child named ``fc``/``classifier``/``head``/... ; otherwise the last
  ``nn.Linear`` of the module. Its output must be the module's output (the logits).
- Features: timm's ``forward_features`` + ``forward_head(pre_logits=True)`` where they exist;
  otherwise the classifier's input, caught by a forward pre-hook registered for the call.
- Blocks (freezing by block): timm's ``group_matcher(coarse=True)`` where it exists;
  otherwise the module's top-level children (the classifier left out, a lone container
  opened), with the usual folding of parameter-free and norm-only modules.

A module without an ``nn.Linear`` classifier, or whose class count is not the one asked
for, is refused here with one line saying what is missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from asib.errors import ModelError, clip
from asib.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureClassifier,
    ModelCfg,
    ModuleGroup,
    _cover,
    _finish_blocks,
    _timm_model_cfg,
    assemble_blocks,
    has_params,
    module_path,
)

# Children that usually hold the final Linear, in the order they are tried.
HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear", "logits", "output", "out", "linear")

_HINT = (
    "give the module a final nn.Linear whose output is its logits (e.g. self.fc), "
    "or subclass asib.models.FeatureClassifier"
)


def as_feature_classifier(
    module: nn.Module, num_classes: int | None = None, *, where: str = "model"
) -> FeatureClassifier:
    """``module`` as a FeatureClassifier: itself when it is one, else a ``ModuleClassifier`` around it.

    ``num_classes`` (optional) is checked against the classifier's outputs; ``where`` names the
    model in error lines (``student``, ``teachers[1]``).
    """
    if isinstance(module, FeatureClassifier):
        if num_classes is not None and module.num_classes != num_classes:
            raise ModelError(f"{where}: {module.arch} has {module.num_classes} classes, not {num_classes}")
        return module
    if not isinstance(module, nn.Module):
        raise ModelError(f"{where}: expected an nn.Module classifier, got {clip(type(module).__name__, 80)}")
    return ModuleClassifier(module, num_classes, where=where)


def _last_linear(module: nn.Module | None, prefix: str) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` inside ``module`` (itself included), with its dotted path."""
    if module is None:
        return None
    found = None
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


def _timm_head(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """timm's classifier when it is a Linear and the model splits features from head."""
    get = getattr(module, "get_classifier", None)
    if not (callable(get) and callable(getattr(module, "forward_features", None))):
        return None
    head = getattr(module, "forward_head", None)
    if not callable(head) or "pre_logits" not in inspect.signature(head).parameters:
        return None
    classifier = get()
    if not isinstance(classifier, nn.Linear):
        return None
    return module_path(module, classifier), classifier


def find_classifier(module: nn.Module) -> tuple[str, nn.Linear, bool] | None:
    """(path, Linear, is_timm) of the module's final classifier, or None when it has none."""
    timm_head = _timm_head(module)
    if timm_head is not None:
        return (*timm_head, True)
    for name in HEAD_NAMES:
        found = _last_linear(module._modules.get(name), name)
        if found is not None:
            return (*found, False)
    found = _last_linear(module, "")
    return None if found is None else (*found, False)


class ModuleClassifier(FeatureClassifier):
    """A user's ``nn.Module`` classifier seen through the FeatureClassifier interface (see the module docstring).

    ``classifier`` is the module's own final Linear (not a copy); ``features`` is what enters it.
    """

    def __init__(self, module: nn.Module, num_classes: int | None = None, *, where: str = "model") -> None:
        name = type(module).__name__
        found = find_classifier(module)
        if found is None:
            raise ModelError(f"{where}: {name} has no nn.Linear classifier to take features and logits from",
                             hint=_HINT)
        path, linear, timm_like = found
        if num_classes is not None and linear.out_features != num_classes:
            raise ModelError(
                f"{where}: {name}'s classifier {path} has {linear.out_features} outputs, not {num_classes} classes",
                hint="build the model with the data's class count",
            )
        super().__init__(name, linear.out_features, False, _cfg_of(module, timm_like))
        self.model = module
        self.inner_classifier_path = path
        self.feature_dim = int(linear.in_features)
        self.head_drop = nn.Identity()
        self.timm_like = timm_like
        self.where = where

    @property  # type: ignore[override]
    def classifier(self) -> nn.Module:
        """The module's own final Linear (registered once, under ``model.``)."""
        return self.model.get_submodule(self.inner_classifier_path)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.timm_like:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        inputs: list[torch.Tensor] = []
        outputs: list[Any] = []
        classifier = self.classifier
        before = classifier.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
        after = classifier.register_forward_hook(lambda _m, _args, out: outputs.append(out))
        try:
            out = self.model(x)
        finally:
            before.remove()
            after.remove()
        return self._checked(inputs, outputs, out)

    def _checked(self, inputs: list[torch.Tensor], outputs: list[Any], out: Any) -> torch.Tensor:
        """The classifier's input, once it is sure the module's logits are the classifier's output."""
        where, path = f"{self.where}: {self.arch}", self.inner_classifier_path
        if len(inputs) != 1:
            raise ModelError(f"{where}: its classifier {path} ran {len(inputs)} times in one forward, not once",
                             hint=_HINT)
        first = out[0] if isinstance(out, tuple | list) and out else out
        if first is not outputs[0]:
            raise ModelError(f"{where}: its output is not its classifier {path}'s output (something runs after it)",
                             hint=_HINT)
        h = inputs[0]
        if h.ndim != 2:
            raise ModelError(f"{where}: its classifier {path} takes a tensor of shape {tuple(h.shape)},"
                             " not pooled features (batch, dim)", hint=_HINT)
        return h

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        skip = {id(p) for p in self.classifier.parameters()}
        if self.timm_like and hasattr(self.model, "group_matcher"):
            return _timm_blocks(self.model, skip)
        return _child_blocks(self.model, self.classifier)


def _cfg_of(module: nn.Module, timm_like: bool) -> ModelCfg:
    if timm_like:
        return _timm_model_cfg(dict(getattr(module, "pretrained_cfg", None) or {}), False)
    source = "torchvision" if type(module).__module__.startswith("torchvision.") else "module"
    return ModelCfg(source, IMAGENET_MEAN, IMAGENET_STD)


def _timm_blocks(model: nn.Module, skip: set[int]) -> list[tuple[str, nn.Module]]:
    """timm's coarse parameter groups as blocks, the classifier's parameters left out."""
    from timm.models import group_parameters

    params = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    blocks = []
    for gid in sorted(groups):
        ids = {id(params[n]) for n in groups[gid]} - skip
        if ids:
            blocks.append(_cover(model, ids))
    return _finish_blocks(blocks)


def _child_blocks(root: nn.Module, classifier: nn.Module, prefix: str = "model.") -> list[tuple[str, nn.Module]]:
    """The children of ``root`` in order, without the classifier (a child that holds it is
    opened); while that leaves one block with several parts, that block is opened too."""
    named: list[tuple[str, nn.Module]] = []
    loose: list[tuple[str, nn.Parameter]] = []

    def walk(module: nn.Module, path: str) -> None:
        loose.extend((f"{prefix}{path}{n}", p) for n, p in module.named_parameters(recurse=False))
        for name, child in module.named_children():
            if child is classifier:
                continue
            if any(m is classifier for m in child.modules()):
                walk(child, f"{path}{name}.")
            else:
                named.append((f"{prefix}{path}{name}", child))

    walk(root, "")
    blocks = assemble_blocks(named, loose)
    for _ in range(4):  # a model that is one Sequential (plus its head): its layers are the blocks
        if len(blocks) != 1 or isinstance(blocks[0][1], ModuleGroup):
            break
        name, only = blocks[0]
        if sum(1 for c in only.children() if has_params(c)) < 2:
            break
        inner = [(f"{name}.{n}", c) for n, c in only.named_children()]
        held = [(f"{name}.{n}", p) for n, p in only.named_parameters(recurse=False)]
        blocks = assemble_blocks(inner, [*loose, *held])
    return blocks


def adapt_all(modules: Sequence[nn.Module], where: str) -> list[FeatureClassifier]:
    """``as_feature_classifier`` over a list, each named ``where[i]`` in error lines."""
    return [as_feature_classifier(m, where=f"{where}[{i}]") for i, m in enumerate(modules)]
