"""Model names to FeatureClassifiers, in the spirit of timm's ``register_model`` / ``create_model``.

A name resolves in this order:
1. the CIFAR zoo (``resnet32x4``, ``wrn_40_2``, ``vgg13``, ...; see ``asib.models.cifar``);
2. ``tv.<name>``: a torchvision classifier (``tv.resnet18``, ``tv.efficientnet_b0``);
3. ``timm.<name>``: a timm model, also when a zoo name shadows it (``timm.vgg13``);
4. any other timm name (``resnet18``, ``convnext_atto``, ``resnet50.a1_in1k``).
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from asib.errors import ModelError, RecipeError, did_you_mean
from asib.models import cifar  # noqa: F401  (registers the zoo)
from asib.models.classifier import FeatureClassifier, TimmClassifier, TorchvisionClassifier
from asib.models.weights import (
    check_torchvision_pretrained,
    download_error,
    load_weights,
    timm_pretrained_overlay,
)
from asib.models.zoo import ZOO, ZooEntry
from asib.recipe import ModelSpec, Recipe

Source = Literal["zoo", "tv", "timm"]


def _zoo() -> dict[str, ZooEntry]:
    return ZOO


def zoo_feature_dims() -> dict[str, int | None]:
    """Every zoo name and its feature width, in registration order."""
    return {name: entry.feature_dim for name, entry in _zoo().items()}


@lru_cache(maxsize=1)
def _tv_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _resolve(arch: str) -> tuple[Source, str] | None:
    """(source, name inside that source), or None for an unknown name."""
    if arch in _zoo():
        return "zoo", arch
    if arch.startswith("tv."):
        return ("tv", arch[3:]) if arch[3:] in _tv_names() else None
    name = arch[5:] if arch.startswith("timm.") else arch
    return ("timm", name) if _timm_known(name) else None


def _timm_known(name: str) -> bool:
    """A timm architecture, with a valid pretrained tag if one is given (``resnet50.a1_in1k``)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        return False
    if "." in name:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:  # timm's answer to an invalid tag
            return False
    return True


def _all_names(arch: str = "") -> list[str]:
    """Candidates for did-you-mean; tagged timm names only when ``arch`` has a tag."""
    timm_names = list(_timm_names())
    if "." in arch.removeprefix("tv.").removeprefix("timm."):
        import timm

        timm_names += timm.list_models(pretrained=True)
    if arch.startswith("timm."):
        return [f"timm.{n}" for n in timm_names]
    return [*_zoo(), *(f"tv.{n}" for n in _tv_names()), *timm_names]


def is_known_model(arch: str) -> bool:
    """Whether ``arch`` names a zoo, torchvision (``tv.``) or timm model."""
    return _resolve(arch) is not None


def unknown_model_message(arch: str) -> str:
    """``unknown model 'resnet1522'; did you mean 'resnet152'?``"""
    return f"unknown model '{arch}'{did_you_mean(arch, _all_names(arch))}"


def list_models(pattern: str | None = None, source: Source | None = None) -> list[str]:
    """Names matching the shell-style ``pattern``: zoo first, then ``tv.*``, then timm."""
    groups: dict[Source, list[str]] = {
        "zoo": list(_zoo()),
        "tv": [f"tv.{n}" for n in _tv_names()],
        "timm": list(_timm_names()),
    }
    names = [n for src, members in groups.items() if source in (None, src) for n in members]
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(
    arch: str,
    num_classes: int,
    small_input: bool = False,
    pretrained: bool = False,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> FeatureClassifier:
    """Build a FeatureClassifier by name.

    ``pretrained`` downloads timm/torchvision weights (then the classifier is reset to
    ``num_classes``); ``weights`` loads a local file (``load_weights``; its report is kept
    in ``model.load_report``). ``drop_rate`` is dropout before the classifier. Extra
    ``kwargs`` go to the builder (e.g. timm's ``drop_path_rate``).
    """
    if pretrained and weights:
        raise ModelError(f"'{arch}': give either pretrained or weights, not both")
    resolved = _resolve(arch)
    if resolved is None:
        raise ModelError(unknown_model_message(arch), hint="list the names with asib.models.list_models()")
    source, name = resolved
    if source == "zoo":
        if pretrained:
            raise ModelError(
                f"zoo model '{arch}' has no pretrained weights; use weights: PATH (e.g. a teacher you trained) "
                "or pretrained: false"
            )
        model: FeatureClassifier = _zoo()[name].builder(num_classes, drop_rate=drop_rate, arch=arch, **kwargs)
    elif source == "tv":
        inner = _build_torchvision(name, arch, num_classes, pretrained, kwargs)
        model = TorchvisionClassifier(inner, arch, num_classes, small_input, drop_rate)
    else:
        inner = _build_timm(name, arch, num_classes, pretrained, kwargs)
        model = TimmClassifier(inner, arch, num_classes, small_input, drop_rate)
    if weights:
        model.load_report = load_weights(model, weights)
    return model


def _build_timm(name: str, arch: str, num_classes: int, pretrained: bool, kwargs: dict[str, Any]) -> Any:
    import timm

    if not pretrained:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    overlay = timm_pretrained_overlay(name)
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay or None, **kwargs
        )
    except OSError as exc:  # the hub's offline/connection/HTTP errors are all OSErrors
        raise download_error(arch, type(exc).__name__) from None


_TV_NO_AUX = ("googlenet", "inception_v3")


def _build_torchvision(
    name: str, arch: str, num_classes: int, pretrained: bool, kwargs: dict[str, Any]
) -> Any:
    import torchvision

    if name in _TV_NO_AUX:
        kwargs = {"aux_logits": False, **({} if pretrained else {"init_weights": True}), **kwargs}
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    check_torchvision_pretrained(name, arch)
    try:
        # The DEFAULT weights fix the class count; the wrapper then resets the classifier.
        return torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    except OSError as exc:
        raise download_error(arch, type(exc).__name__) from None


def build_model(name: str, **kwargs: Any) -> FeatureClassifier:
    """Alias of ``create_model(name, **kwargs)``."""
    return create_model(name, **kwargs)


def create_teacher_by_name(name: str, num_classes: int, **kwargs: Any) -> FeatureClassifier:
    """A teacher by architecture name; keywords as ``create_model`` (pretrained, small_input, weights, drop_rate)."""
    return create_model(name, num_classes, **kwargs)


def create_student_by_name(name: str, num_classes: int, **kwargs: Any) -> FeatureClassifier:
    """A student by architecture name; keywords as ``create_model``."""
    return create_model(name, num_classes, **kwargs)


def model_from_spec(spec: ModelSpec, num_classes: int) -> FeatureClassifier:
    """Build the model a recipe's ``ModelSpec`` (teacher or student) describes."""
    return create_model(
        spec.arch,
        num_classes,
        small_input=spec.small_input,
        pretrained=spec.pretrained,
        weights=spec.weights,
        drop_rate=spec.drop_rate,
    )


def check_recipe_models(recipe: Recipe) -> None:
    """Check every model name of a recipe without building anything; one line per problem
    with its YAML path (``teachers[1].arch: unknown model ...``). Raises RecipeError."""
    specs = [(f"teachers[{i}]", t) for i, t in enumerate(recipe.teachers)]
    if recipe.student is not None:
        specs.append(("student", recipe.student))
    problems = []
    for where, spec in specs:
        resolved = _resolve(spec.arch)
        if resolved is None:
            problems.append(f"{where}.arch: {unknown_model_message(spec.arch)}")
        elif resolved[0] == "zoo" and spec.pretrained:
            problems.append(f"{where}.pretrained: zoo model '{spec.arch}' has no pretrained weights")
    if problems:
        raise RecipeError(problems, hint="zoo names, tv.<torchvision name>, or any timm name")
