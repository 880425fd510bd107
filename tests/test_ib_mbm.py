"""IB_MBM, the synergy head, the builder and the B-step synergy target (METHOD.md, Modules)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asib.errors import ModelError
from asib.models.ib_mbm import IBMBM, IBOutput, SynergyHead, build_ib_mbm_from_teachers, synergy_target
from asib.recipe import DistillSpec, IBMBMSpec

SPEC = IBMBMSpec(dim=16, heads=2, dropout=0.0, head_dropout=0.0, logvar_clamp=3.0)


class TinyClassifier(nn.Module):
    """Stand-in for the FeatureClassifier wrapper: features(x), head(f), feature_dim, num_classes."""

    def __init__(self, in_dim: int, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.body = nn.Linear(in_dim, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _setup(ib: bool = True, batch: int = 5) -> tuple[IBMBM, SynergyHead, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    module = IBMBM(query_dim=12, teacher_dims=[8, 20], spec=SPEC, ib=ib)
    head = SynergyHead(SPEC.dim, num_classes=4, dropout=0.0)
    h_s = torch.randn(batch, 12)
    feats = [torch.randn(batch, 8), torch.randn(batch, 20)]
    return module, head, h_s, feats


def test_samples_in_training_with_ib_on() -> None:
    module, _, h_s, feats = _setup(ib=True)
    module.train()
    a, b = module(h_s, feats), module(h_s, feats)
    assert isinstance(a, IBOutput)
    assert a.z.shape == a.mu.shape == a.logvar.shape == (5, SPEC.dim)
    assert not torch.allclose(a.z, a.mu)
    assert not torch.allclose(a.z, b.z)
    torch.testing.assert_close(a.mu, b.mu)


def test_no_sampling_in_eval_or_with_ib_off() -> None:
    module, _, h_s, feats = _setup(ib=True)
    module.eval()
    out = module(h_s, feats)
    assert torch.equal(out.z, out.mu)
    module.train()
    module.ib = False  # the engine switches this attribute
    out = module(h_s, feats)
    assert torch.equal(out.z, out.mu)


def test_attention_weights_over_teachers() -> None:
    module, _, h_s, feats = _setup()
    attn = module.eval()(h_s, feats).attn
    assert attn.shape == (5, 2)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(5))


def test_logvar_is_clamped() -> None:
    module, _, h_s, feats = _setup()
    with torch.no_grad():
        module.logvar_proj.weight.zero_()
        module.logvar_proj.bias.fill_(100.0)
    assert torch.equal(module(h_s, feats).logvar, torch.full((5, SPEC.dim), 3.0))
    with torch.no_grad():
        module.logvar_proj.bias.fill_(-100.0)
    assert torch.equal(module(h_s, feats).logvar, torch.full((5, SPEC.dim), -3.0))


def test_gradient_reaches_adapters_embeddings_and_query() -> None:
    module, head, h_s, feats = _setup()
    module.train()
    out = module(h_s, feats)
    F.cross_entropy(head(out.z), torch.tensor([0, 1, 2, 3, 0])).backward()
    for adapter in module.adapters:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert module.teacher_embed.grad is not None and module.teacher_embed.grad.abs().sum() > 0
    assert module.q_proj.weight.grad is not None and module.q_proj.weight.grad.abs().sum() > 0
    assert module.logvar_proj.weight.grad is not None and module.logvar_proj.weight.grad.abs().sum() > 0


def test_wrong_number_of_teacher_features() -> None:
    module, _, h_s, feats = _setup()
    with pytest.raises(ValueError):
        module(h_s, feats[:1])


# ---------------------------------------------------------------- synergy target


def test_synergy_target_is_the_noise_average() -> None:
    module, head, h_s, feats = _setup()
    module.eval()
    head.eval()
    out = module(h_s, feats)
    tau, samples = 2.0, 5
    torch.manual_seed(123)
    q = synergy_target(module, head, out, tau, samples, ib=True)
    torch.manual_seed(123)
    eps = torch.randn(samples, *out.mu.shape)
    sigma = torch.exp(0.5 * out.logvar)
    with torch.no_grad():
        manual = torch.stack(
            [F.softmax(head(out.mu + sigma * eps[k]) / tau, -1) for k in range(samples)]
        ).mean(0)
    assert q.shape == (5, 4) and q.dtype == torch.float32
    torch.testing.assert_close(q, manual)
    torch.testing.assert_close(q.sum(-1), torch.ones(5))
    assert not q.requires_grad


def test_synergy_target_mu_mode_and_ib_off() -> None:
    module, head, h_s, feats = _setup()
    module.eval()
    head.eval()
    out = module(h_s, feats)
    with torch.no_grad():
        sharp = F.softmax(head(out.mu) / 3.0, -1)
    torch.testing.assert_close(synergy_target(module, head, out, 3.0, 8, ib=False), sharp)
    torch.testing.assert_close(synergy_target(module, head, out, 3.0, 8, ib=True, mode="mu"), sharp)
    module.ib = False  # default follows the module's switch
    torch.testing.assert_close(synergy_target(module, head, out, 3.0, 8), sharp)


def test_noise_average_is_less_sharp_with_large_logvar() -> None:
    module, head, h_s, feats = _setup()
    module.eval()
    head.eval()
    with torch.no_grad():
        module.logvar_proj.weight.zero_()
        module.logvar_proj.bias.fill_(3.0)  # sigma = e^1.5
        head.net[-1].weight.mul_(20.0)  # a confident head: G(mu) is nearly one-hot
    out = module(h_s, feats)
    torch.manual_seed(0)
    q_avg = synergy_target(module, head, out, 1.0, 32, ib=True)
    q_mu = synergy_target(module, head, out, 1.0, 32, ib=True, mode="mu")

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    assert (entropy(q_avg) > entropy(q_mu)).all()


# ---------------------------------------------------------------- builder


def test_build_reads_widths_from_models() -> None:
    teachers = [TinyClassifier(6, 8, 4), TinyClassifier(6, 24, 4), TinyClassifier(6, 5, 4)]
    student = TinyClassifier(6, 10, 4)
    spec = DistillSpec(ib_mbm=IBMBMSpec(dim=16, heads=4))
    module, head = build_ib_mbm_from_teachers(teachers, student, spec)
    assert module.q_proj.in_features == student.feature_dim
    assert module.num_teachers == 3
    x = torch.randn(3, 6)
    out = module(student.features(x), [t.features(x) for t in teachers])
    assert out.attn.shape == (3, 3)
    assert head(out.z).shape == (3, 4)


def test_build_accepts_a_dict_spec() -> None:
    teachers = [TinyClassifier(6, 8, 4), TinyClassifier(6, 12, 4)]
    module, head = build_ib_mbm_from_teachers(
        teachers, TinyClassifier(6, 10, 4), {"ib": False, "ib_mbm": {"dim": 16, "heads": 2}}
    )
    assert module.ib is False and module.dim == 16
    assert head.net[-1].out_features == 4


def test_build_rejects_bad_teacher_sets() -> None:
    student = TinyClassifier(6, 10, 4)
    with pytest.raises(ModelError):
        build_ib_mbm_from_teachers([TinyClassifier(6, 8, 4)], student, DistillSpec())
    with pytest.raises(ModelError):
        build_ib_mbm_from_teachers([TinyClassifier(6, 8, 4), TinyClassifier(6, 8, 5)], student, DistillSpec())


def test_models_module_does_not_import_engine() -> None:
    code = (
        "import sys, asib.models.ib_mbm; "
        "bad = [m for m in sys.modules if m.startswith('asib.engine')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
