"""Models: the feature/head interface of every family, the registry, weights, freezing.

Tiny inputs (2 images, 32x32) and cheap models, so the file runs in well under a minute on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from asib.errors import CheckpointError, ModelError, RecipeError
from asib.models import (
    FeatureClassifier,
    apply_freeze_level,
    check_recipe_models,
    count_trainable_parameters,
    create_model,
    is_known_model,
    list_models,
    load_weights,
    model_from_spec,
    setup_partial_freeze_schedule,
    trainable_parameter_names,
    zoo_feature_dims,
)
from asib.recipe import StudentSpec, recipe_from_dict

ZOO_DIMS = {
    "resnet8": 64,
    "resnet14": 64,
    "resnet20": 64,
    "resnet32": 64,
    "resnet44": 64,
    "resnet56": 64,
    "resnet110": 64,
    "resnet8x4": 256,
    "resnet32x4": 256,
    "wrn_16_1": 64,
    "wrn_16_2": 128,
    "wrn_40_1": 64,
    "wrn_40_2": 128,
    "vgg8": 512,
    "vgg13": 512,
    "mobilenetv2": 1280,
    "shufflev2": 1024,
}
WRAPPED_DIMS = {"resnet18": 512, "convnext_atto": 320, "tv.resnet18": 512, "tv.mobilenet_v3_small": 1024}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and immune to a busy machine (two OpenMP threads
    on two shared cores ran these forwards 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def check_interface(model: FeatureClassifier, x: torch.Tensor, dim: int, classes: int) -> None:
    """features (B, d), head (B, C), forward == head(features), classifier outside the blocks."""
    model.eval()
    with torch.no_grad():
        f = model.features(x)
        assert f.shape == (x.shape[0], dim) and model.feature_dim == dim
        logits = model.head(f)
        assert logits.shape == (x.shape[0], classes)
        assert torch.equal(model(x), logits)
    assert isinstance(model.classifier, nn.Linear) and model.classifier_params()
    check_partition(model)


def check_partition(model: FeatureClassifier) -> None:
    """Every parameter is in exactly one block or in the classifier."""
    seen = [id(p) for block in model.blocks() for p in block.parameters()] + [
        id(p) for p in model.classifier_params()
    ]
    assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------- interface, per family


def test_zoo_names_and_dims() -> None:
    assert zoo_feature_dims() == ZOO_DIMS
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
    assert list_models(source="zoo") == list(ZOO_DIMS)


@pytest.mark.parametrize("arch", list(ZOO_DIMS))
def test_zoo_interface(arch: str, x: torch.Tensor) -> None:
    model = create_model(arch, num_classes=7)
    assert model.arch == arch and model.small_input and model.default_cfg.input_size == (3, 32, 32)
    check_interface(model, x, ZOO_DIMS[arch], 7)


@pytest.mark.parametrize("arch", list(WRAPPED_DIMS))
def test_wrapped_interface(arch: str, x: torch.Tensor) -> None:
    model = create_model(arch, num_classes=5)
    check_interface(model, x, WRAPPED_DIMS[arch], 5)
    # The classifier was moved out of the wrapped model, not duplicated.
    assert not any(
        k.endswith(f"{model.inner_classifier_path}.weight") for k in model.state_dict() if "model." in k
    )


def test_blocks_of_a_vit_hold_its_tokens() -> None:
    """Parameters held by the model itself (cls_token, pos_embed) join the stem block."""
    model = create_model("vit_tiny_patch16_224", 5)
    names = [name for name, _ in model.named_blocks()]
    assert names[0] == "model.patch_embed+model.cls_token+model.pos_embed" and len(names) == 13
    check_partition(model)
    apply_freeze_level(model, len(names))
    assert trainable_parameter_names(model) == {n for n, _ in model.named_parameters()}


def test_drop_rate_acts_before_the_classifier(x: torch.Tensor) -> None:
    model = create_model("resnet8", 3, drop_rate=0.5).train()
    f = model.features(x).detach()
    assert not torch.equal(model.head(f), model.head(f))
    model.eval()
    assert torch.equal(model.head(f), model.classifier(f))


# (arch, small_input, the module that ends the stem, its output size for 32x32 images)
STEMS = [
    ("resnet10t", False, "maxpool", (8, 8)),
    ("resnet10t", True, "maxpool", (32, 32)),
    ("convnext_atto", True, "stem", (32, 32)),
    ("tv.resnet18", True, "maxpool", (32, 32)),
    ("tv.convnext_tiny", True, "features.0", (32, 32)),
]


@pytest.mark.parametrize(("arch", "small", "stem", "size"), STEMS)
def test_small_input_keeps_32x32_after_the_stem(
    arch: str, small: bool, stem: str, size: tuple[int, int], x: torch.Tensor
) -> None:
    model = create_model(arch, 4, small_input=small).eval()
    seen = []
    model.model.get_submodule(stem).register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape[-2:]))
    )
    with torch.no_grad():
        assert model(x).shape == (2, 4)
    assert seen == [size]
    first = next(m for m in model.model.modules() if isinstance(m, nn.Conv2d))
    assert (first.kernel_size == (3, 3) and first.stride == (1, 1)) == small
    assert model.small_input == small and (model.default_cfg.input_size == (3, 32, 32)) == small


def test_small_input_unsupported_family_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="small_input is not implemented for 'tv.mobilenet_v3_small'"):
        create_model("tv.mobilenet_v3_small", 4, small_input=True)


# ---------------------------------------------------------------- registry


def test_unknown_arch_did_you_mean() -> None:
    with pytest.raises(ModelError) as err:
        create_model("resnet1522", 10)
    assert str(err.value) == "unknown model 'resnet1522'; did you mean 'resnet152'?"
    with pytest.raises(ModelError, match="did you mean 'tv.resnet18'"):
        create_model("tv.resnet1", 10)
    with pytest.raises(ModelError, match="did you mean 'wrn_40_2'"):
        create_model("wrn_40_3", 10)
    assert (
        is_known_model("resnet32x4")
        and is_known_model("tv.efficientnet_b0")
        and is_known_model("convnext_atto")
    )
    assert (
        is_known_model("timm.vgg13")
        and not is_known_model("resnet1522")
        and not is_known_model("resnet18.nope")
    )


def test_check_recipe_models_gives_yaml_paths() -> None:
    recipe = recipe_from_dict(
        {
            "name": "t",
            "teachers": [{"name": "a", "arch": "resnet32x4"}, {"name": "b", "arch": "resnet1522"}],
            "student": {"arch": "resnet8x5"},
        }
    )
    with pytest.raises(RecipeError) as err:
        check_recipe_models(recipe)
    assert err.value.problems == [
        "teachers[1].arch: unknown model 'resnet1522'; did you mean 'resnet152'?",
        "student.arch: unknown model 'resnet8x5'; did you mean 'resnet8x4'?",
    ]
    check_recipe_models(recipe_from_dict({"name": "ok", "student": {"arch": "tv.resnet18"}}))


def test_pretrained_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty caches: nothing to fall back on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for arch in ("resnet18", "tv.resnet18"):
        start = time.monotonic()
        with pytest.raises(
            ModelError, match=f"could not download pretrained weights for '{arch}'.*weights: PATH"
        ):
            create_model(arch, 10, pretrained=True)
        assert time.monotonic() - start < 5
    with pytest.raises(ModelError, match="no pretrained weights"):
        create_model("resnet8", 10, pretrained=True)


def test_model_from_spec(x: torch.Tensor) -> None:
    model = model_from_spec(StudentSpec(arch="resnet10t", small_input=True), num_classes=3)
    assert model.small_input and model.arch == "resnet10t" and model(x).shape == (2, 3)


# ---------------------------------------------------------------- weights


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial running stats, so a load that forgot buffers would show."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


def test_load_weights_safetensors_exact(tmp_path: Path, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    src = create_model("resnet8", 10)
    randomize_bn(src)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    torch.manual_seed(1)
    dst = create_model("resnet8", 10, weights=path)
    assert torch.equal(outputs(src, x), outputs(dst, x))
    assert dst.load_report.classifier_loaded and dst.load_report.loaded == len(src.state_dict())


def test_load_weights_inner_timm_pth_exact(tmp_path: Path, x: torch.Tensor) -> None:
    """A plain timm state dict (DDP prefixes, nested under 'state_dict') fits the wrapper."""
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("resnet10t", num_classes=6)
    randomize_bn(plain)
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}}, path)
    model = create_model("resnet10t", 6)
    report = load_weights(model, path)
    assert report.classifier_loaded and not report.unexpected
    assert torch.equal(outputs(plain, x), outputs(model, x))


def test_load_weights_classifier_mismatch_is_skipped(tmp_path: Path, x: torch.Tensor) -> None:
    src = create_model("tv.resnet18", 10)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = create_model("tv.resnet18", 4)
    head = dst.classifier.weight.detach().clone()
    report = load_weights(dst, path)
    assert sorted(report.skipped_classifier) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(dst.classifier.weight, head)
    with torch.no_grad():
        assert torch.equal(src.eval().features(x), dst.eval().features(x))


def test_load_weights_missing_key_is_an_error(tmp_path: Path) -> None:
    state = create_model("resnet8", 10).state_dict()
    del state["layer2.0.conv1.1.weight"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="lacks 1 tensors .*layer2.0.conv1.1.weight"):
        load_weights(create_model("resnet8", 10), path)
    with pytest.raises(ModelError, match="another shape"):
        load_weights(create_model("resnet8x4", 10), path)


def test_load_weights_bad_files(tmp_path: Path) -> None:
    model = create_model("resnet8", 10)
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(model, tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_weights(model, tmp_path)
    good = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(model, cut)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes((tmp_path / "w.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(model, cut_pth)


# ---------------------------------------------------------------- freezing

# Per architecture: the parameter-name prefixes of each block, input to output.
BLOCK_PREFIXES = {
    "resnet10t": [("model.conv1.", "model.bn1."), ("model.layer1.",), ("model.layer2.",), ("model.layer3.",), ("model.layer4.",)],
    "convnext_atto": [("model.stem.",), ("model.stages.0.",), ("model.stages.1.",), ("model.stages.2.",), ("model.stages.3.", "model.head.norm.")],
    "resnet8": [("stem.",), ("layer1.",), ("layer2.",), ("layer3.",)],
}  # fmt: skip


@pytest.mark.parametrize("arch", list(BLOCK_PREFIXES))
def test_freeze_levels_train_exactly_the_last_blocks(arch: str) -> None:
    model = create_model(arch, 5)
    names = [n for n, _ in model.named_parameters()]
    blocks = BLOCK_PREFIXES[arch]
    assert len(model.blocks()) == len(blocks)
    head = {"classifier.weight", "classifier.bias"}
    assert {n for n in names if n.startswith(sum(blocks, ()))} | head == set(names)
    for level in range(len(blocks) + 3):  # beyond the block count: every block trains
        apply_freeze_level(model, level)
        prefixes = sum(blocks[max(0, len(blocks) - level) :], ()) if level else ()
        expected = {n for n in names if prefixes and n.startswith(prefixes)} | head
        assert trainable_parameter_names(model) == expected, level
        assert (level >= len(blocks)) == (expected == set(names))
        assert count_trainable_parameters(model) == sum(
            p.numel() for n, p in model.named_parameters() if n in expected
        )
    apply_freeze_level(model, -1)
    assert trainable_parameter_names(model) == set(names) and not model.frozen_norms
    apply_freeze_level(model, -1, train_head=False)
    assert trainable_parameter_names(model) == set(names) - head
    apply_freeze_level(model, 0, train_head=False)
    assert trainable_parameter_names(model) == set() and count_trainable_parameters(model) == 0


def test_frozen_batchnorm_stays_in_eval(x: torch.Tensor) -> None:
    model = create_model("resnet8", 5)
    apply_freeze_level(model, 1)  # layer3 and the classifier train
    model.eval()
    model.train()
    frozen_bn, live_bn = model.stem[1], model.layer3[0].conv1[1]
    assert not frozen_bn.training and live_bn.training and "stem.1" in model.frozen_norms
    before = frozen_bn.running_mean.clone(), frozen_bn.running_var.clone()
    live_before = live_bn.running_mean.clone()
    model(x).sum().backward()
    assert torch.equal(frozen_bn.running_mean, before[0]) and torch.equal(frozen_bn.running_var, before[1])
    assert not torch.equal(live_bn.running_mean, live_before)
    assert model.stem[0].weight.grad is None and model.layer3[0].conv1[0].weight.grad is not None
    apply_freeze_level(model, -1)
    model.train()
    assert frozen_bn.training


def test_frozen_batchnorm_in_a_timm_model(x: torch.Tensor) -> None:
    model = create_model("resnet10t", 5)
    apply_freeze_level(model, 1)
    model.train()
    assert not model.model.bn1.training and not model.model.layer3[0].bn1.training
    assert model.model.layer4[0].bn1.training
    mean = model.model.layer1[0].bn1.running_mean.clone()
    model(x)
    assert torch.equal(model.model.layer1[0].bn1.running_mean, mean)


def test_freeze_schedules() -> None:
    assert setup_partial_freeze_schedule({}, 4) == ([-1, -1, -1, -1], [0, 0, 0, 0])
    assert setup_partial_freeze_schedule({"num_stages": 4}, student_pretrained=True) == (
        [-1, 2, 1, 0],
        [0, 0, 0, 0],
    )
    spec = {"num_stages": 3, "student_freeze_schedule": [-1, 1, 0], "teacher_freeze_schedule": [1, 1, 0]}
    assert setup_partial_freeze_schedule(spec, 3) == ([-1, 1, 0], [1, 1, 0])
    with pytest.raises(RecipeError, match="student_freeze_schedule: has 3 entries but there are 4 stages"):
        setup_partial_freeze_schedule(spec, 4)
    with pytest.raises(RecipeError, match="unknown key"):
        setup_partial_freeze_schedule({"student_freeze_shedule": [0]}, 1)
