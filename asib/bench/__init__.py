"""``asib bench``: the engine's throughput against the bare PyTorch a user would otherwise write.

On the recipe's models and data (or synthetic images of the same shape), in one process:

1. data: the in-memory loader (recipe augmentation) vs a torchvision ``DataLoader`` with
   PIL transforms over the same images, with 0 and 2 workers;
2. steps: ``CETask.step`` (first teacher), the ASIB A-step and B-step and a ``kd`` step,
   each with the loop's per-step metric accumulation, vs a bare loop in this file doing the
   same forward, losses, backward and optimizer step with plain torch ops, on copies of the
   same models, the same batches, precision and memory format (and ``torch.compile`` when
   the recipe asks for it);
3. breakdown: data, every teacher's forward, student forward(+backward), fusion modules and
   optimizer, each timed on its own;
4. compile (``compile: true``): the engine compiled vs eager, and the compile seconds.

How it is measured: after warm-up, blocks of ``steps`` steps of each variant alternate,
the order flipping every repeat, each block timed with one device synchronisation at its
end (the only ones: the steps themselves never synchronise). Figures are medians over the
repeats; a ratio is the median of the adjacent engine/bare pairs, so load from other work
on the machine hits both sides alike. Peak memory: CUDA ``max_memory_allocated`` above
the block's start; CPU the resident-set growth over the block (freed heap returned to the
OS first with ``malloc_trim``, the high-water mark reset through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import itertools
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asib.data import Batch, DatasetInfo, InMemoryLoader, load_info, load_split
from asib.engine.checkpoint import load_model, read_info
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan, MetricSums
from asib.engine.progress import Progress
from asib.engine.runtime import Runtime, inference_autocast, make_runtime, set_random_seed
from asib.engine.schedules import get_tau, ramp
from asib.errors import DataError
from asib.methods import build_method
from asib.methods.asib import ASIB, cccp_ramp, get_beta
from asib.methods.base import frozen_outputs
from asib.methods.kd import resolve_teacher
from asib.models import create_model
from asib.pipeline.distill import DistillTask
from asib.pipeline.finetune import CETask
from asib.recipe import AugmentSpec, DistillSpec, ModelSpec, OptimSpec, Recipe, distill_for_method

Step = Callable[[Batch], Any]


@dataclass(frozen=True)
class BenchConfig:
    """How much to run: steps per timed block, warm-up steps, interleaved repeats."""

    steps: int | None = None  # per timed block; default 4 on CPU, 10 on CUDA (keeps the GPU queue full)
    warmup: int = 2
    repeats: int = 15
    device: str | None = None  # overrides the recipe's device
    synthetic: int | None = None  # this many random images instead of the prepared data
    classes: int | None = None  # class count of synthetic data without a prepared dataset
    workers: tuple[int, ...] = (0, 2)  # DataLoader workers of the PIL pipeline
    threads: int | None = None  # torch intra-op threads during the bench (default: torch's own)


@dataclass
class Timing:
    """Timed blocks of one variant: seconds per block, images per block, peak memory."""

    block_seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    images: int = 0  # per block
    steps: int = 0  # per block
    first_step: float = 0.0  # seconds of the very first step (includes any compilation)

    @property
    def seconds(self) -> float:
        return statistics.median(self.block_seconds)

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / self.steps

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def peak_mib(self) -> float:
        return max(self.peaks) / 2**20

    def figures(self) -> dict[str, float]:
        return {
            "images_per_s": round(self.images_per_s, 1),
            "ms_per_step": round(self.ms_per_step, 3),
            "peak_mib": round(self.peak_mib, 4),
        }


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over repeats of a's block time over b's adjacent block time."""
    return statistics.median(x / y for x, y in zip(a.block_seconds, b.block_seconds, strict=True))


# ------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    """Wait for the device: the bench's only synchronisation points."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of a block above its start: CUDA allocator peak, or CPU resident-set growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        libc = ctypes.CDLL(None) if device.type == "cpu" else None
        self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else self._cpu_method()
        self._base = 0

    @staticmethod
    def _cpu_method() -> str:
        clear = Path("/proc/self/clear_refs")
        return "rss_high_water_mark" if clear.exists() and _writable(clear) else "ru_maxrss"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        if self._trim is not None:
            self._trim(0)  # hand freed heap back, so the block's working set shows as growth
        if self.method == "rss_high_water_mark":
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method == "rss_high_water_mark":
            return max(0, _proc_status_kib("VmHWM") * 1024 - self._base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise DataError(f"/proc/self/status has no {key}")


def measure(
    variants: dict[str, Step], batches: list[Batch], cfg: BenchConfig, device: torch.device, meter: MemoryMeter
) -> dict[str, Timing]:
    """Warm every variant up, then time interleaved blocks of ``cfg.steps`` steps of each."""
    timings = {name: Timing(images=sum(batches[i % len(batches)].y.shape[0] for i in range(cfg.steps)),
                            steps=cfg.steps) for name in variants}
    for name, step in variants.items():
        for i in range(max(1, cfg.warmup)):
            tick = time.perf_counter()
            step(batches[i % len(batches)])
            sync(device)
            if i == 0:
                timings[name].first_step = time.perf_counter() - tick
    names = list(variants)
    for r in range(cfg.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            step, timing = variants[name], timings[name]
            meter.start()
            tick = time.perf_counter()
            for i in range(cfg.steps):
                step(batches[i % len(batches)])
            sync(device)
            timing.block_seconds.append(time.perf_counter() - tick)
            timing.peaks.append(meter.peak())
    return timings


def count_syncs(step: Step, batch: Batch, device: torch.device) -> int | None:
    """Host-device synchronisations one step makes, from CUDA's sync debug mode (None off CUDA)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ------------------------------------------------------------------ the setting: runtime, data, models


@dataclass
class Setting:
    """Everything the measurements share."""

    recipe: Recipe
    runtime: Runtime
    info: DatasetInfo | None
    images: torch.Tensor  # uint8 (N, C, H, W) on the CPU
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    data_source: str
    teachers: list[nn.Module]  # on the device, never trained by the bench (copied per use)
    teacher_sources: list[str]
    student: nn.Module | None

    def loader(self, batch_size: int, augment: AugmentSpec | None) -> InMemoryLoader:
        if self.images.shape[0] < batch_size:
            raise DataError(f"{self.images.shape[0]} images make no batch of {batch_size}",
                            hint="use more --synthetic images or a smaller batch_size")
        return InMemoryLoader(
            self.images, self.labels, batch_size=batch_size, mean=self.mean, std=self.std, augment=augment,
            shuffle=True, seed=self.recipe.seed, device=self.runtime.device, drop_last=True,
            num_classes=self.num_classes, channels_last=self.runtime.channels_last,
        )

    def split_loaders(self, loader: InMemoryLoader) -> SplitLoaders:
        return SplitLoaders(self.info, loader, None, loader)  # type: ignore[arg-type]


def build_setting(recipe: Recipe, cfg: BenchConfig) -> Setting:
    """Runtime, images (prepared or synthetic) and models: teachers from their checkpoints when
    these exist and fit, else freshly built from their arch (no download)."""
    runtime = make_runtime(cfg.device or recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    set_random_seed(recipe.seed)
    info = load_info(recipe.data_dir) if (recipe.data_dir / "dataset.json").is_file() or cfg.synthetic is None else None
    if cfg.synthetic is None:
        images, labels = load_split(recipe.data_dir, "train")
        source = f"prepared {recipe.data_dir} (train split)"
        num_classes, mean, std = info.num_classes, info.mean, info.std
    else:
        size = info.image_size if info else (recipe.data.image_size or 32,) * 2
        num_classes = info.num_classes if info else (cfg.classes or 10)
        gen = torch.Generator().manual_seed(recipe.seed)
        images = torch.randint(0, 256, (cfg.synthetic, 3, *size), dtype=torch.uint8, generator=gen)
        labels = torch.arange(cfg.synthetic) % num_classes
        mean, std = (info.mean, info.std) if info else ((0.5,) * 3, (0.25,) * 3)
        source = f"synthetic: {cfg.synthetic} random images {size[0]}x{size[1]}, {num_classes} classes"
    teachers, sources = [], []
    for spec in recipe.teachers:
        model, origin = _teacher(recipe, spec, num_classes, runtime)
        teachers.append(model.eval())
        sources.append(origin)
    student = _fresh(recipe.student, num_classes, runtime) if recipe.student is not None else None
    return Setting(recipe, runtime, info, images, labels, tuple(mean), tuple(std), num_classes, source,
                   teachers, sources, student)


def _fresh(spec: ModelSpec, num_classes: int, runtime: Runtime) -> nn.Module:
    model = create_model(spec.arch, num_classes, small_input=spec.small_input, drop_rate=spec.drop_rate)
    return runtime.to_device(model)


def _teacher(recipe: Recipe, spec: Any, num_classes: int, runtime: Runtime) -> tuple[nn.Module, str]:
    path = recipe.teacher_checkpoint(spec)
    if path.is_file():
        info = read_info(path)
        if info.kind == "teacher" and info.num_classes == num_classes:
            model, _ = load_model(path, kinds=("teacher",), device=runtime.device)
            return runtime.to_device(model), f"checkpoint {path}"
        why = f"checkpoint {path} is a {info.kind} of {info.num_classes} classes"
        return _fresh(spec, num_classes, runtime), f"fresh {spec.arch} ({why})"
    return _fresh(spec, num_classes, runtime), f"fresh {spec.arch} (no checkpoint)"


def take_batches(loader: InMemoryLoader, n: int) -> list[Batch]:
    """``n`` batches of the loader, made before any timing (epochs repeat when it has fewer)."""
    return list(itertools.islice(_endless(loader), n))


def _endless(loader: InMemoryLoader) -> Iterator[Batch]:
    for epoch in itertools.count():
        yield from loader.batches(epoch)


# ------------------------------------------------------------------ bare PyTorch, the reference


def bare_optimizer(params: Any, spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer a bare loop would build: one group, the recipe's hyper-parameters."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               nesterov=spec.nesterov and spec.momentum > 0)
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def bare_ce(logits: torch.Tensor, batch: Batch, smoothing: float) -> torch.Tensor:
    loss = F.cross_entropy(logits, batch.y, label_smoothing=smoothing)
    if batch.y2 is None:
        return loss
    return batch.lam * loss + (1 - batch.lam) * F.cross_entropy(logits, batch.y2, label_smoothing=smoothing)


class Bare:
    """Contexts and compiled forwards of the bare loops, mirroring the runtime by hand."""

    def __init__(self, runtime: Runtime) -> None:
        self.device, self.amp, self.teacher_dtype = runtime.device, runtime.amp_dtype, runtime.inference_dtype
        self.compile = runtime.compile

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def teacher_autocast(self) -> torch.autocast:
        dtype = self.teacher_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.compile(model.features) if self.compile else model.features


def bare_finetune(model: nn.Module, spec: Any, bare: Bare) -> Step:
    """Forward, CE, backward, optimizer step: the loop every tutorial writes."""
    model.train()
    opt = bare_optimizer(model.parameters(), spec.optim)
    forward = torch.compile(model) if bare.compile else model

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            logits = forward(batch.x)
        loss = bare_ce(logits.float(), batch, spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bare_fusion(ib: nn.Module, h_s: torch.Tensor, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """IB_MBM by hand: query token, adapted teacher tokens, attention, bottleneck (mu, logvar)."""
    q = ib.q_norm(ib.q_proj(h_s.float())).unsqueeze(1)
    v = torch.stack([a(h.float()) for a, h in zip(ib.adapters, feats, strict=True)], dim=1) + ib.teacher_embed
    fused, _ = ib.mha(q, v, v, need_weights=False)
    u = ib.out_norm(q + fused).squeeze(1)
    return ib.mu_proj(u), ib.logvar_proj(u).clamp(-ib.logvar_clamp, ib.logvar_clamp)


def bare_a_step(student: nn.Module, teachers: list[nn.Module], ib: nn.Module, head: nn.Module,
                recipe: Recipe, ep: EpochPlan, bare: Bare) -> Step:
    """Teacher side learns: CE on the synergy logits + beta KL_IB (+ CCCP toward the fixed student).

    The models come as the engine left them for this stage: teacher blocks that the
    recipe's ``teacher_freeze_schedule`` unfreezes keep ``requires_grad`` and are trained too.
    """
    spec = recipe.distill
    s_feat, t_feats = bare.features(student), [bare.features(t) for t in teachers]
    unfrozen = [[p for p in t.parameters() if p.requires_grad] for t in teachers]
    opt = bare_optimizer([*ib.parameters(), *head.parameters(), *itertools.chain(*unfrozen)], spec.teacher_optim)
    ce_only = ep.stage == 0 and ep.stage_epoch < spec.synergy_warmup_epochs
    beta = 0.0 if ce_only else get_beta(ep.phase_epoch, spec)
    tau = get_tau(sum(spec.stage_epochs()[: ep.stage]), spec, sum(spec.stage_epochs()))
    first_a = spec.synergy_warmup_epochs + spec.teacher_adapt_epochs
    on = spec.cccp and ep.stage >= 1 and not ce_only
    cccp_w = spec.effective_cccp_alpha * cccp_ramp(ep.phase_epoch - first_a, spec) if on else 0.0

    def teacher_feature(f: Callable[[torch.Tensor], torch.Tensor], trains: list, x: torch.Tensor) -> torch.Tensor:
        if trains:
            return f(x)
        with torch.no_grad(), bare.teacher_autocast():
            return f(x)

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            with torch.no_grad():
                h_s = s_feat(batch.x)
                s = student.head(h_s).float()
            feats = [teacher_feature(f, u, batch.x) for f, u in zip(t_feats, unfrozen, strict=True)]
            mu, logvar = bare_fusion(ib, h_s, feats)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if ib.ib else mu
            g = head(z).float()
        mu, logvar = mu.float(), logvar.float()
        loss = bare_ce(g, batch, spec.synergy_label_smoothing)
        loss = loss + beta * (0.5 * (mu.square() + logvar.exp() - logvar - 1)).sum(-1).mean()
        if cccp_w > 0:
            log_g = F.log_softmax(g / tau, dim=-1)
            loss = loss + cccp_w * tau * tau * (log_g.exp() * (log_g - F.log_softmax(s / tau, dim=-1))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bare_b_step(student: nn.Module, teachers: list[nn.Module], ib: nn.Module, head: nn.Module,
                recipe: Recipe, ep: EpochPlan, bare: Bare, fusion: list[nn.Module] | None = None) -> Step:
    """Student learns: CE + KD to the teacher average + KD to the noise-averaged synergy target.

    ``fusion``: the synergy path's adapted teacher copies when blocks were unfrozen (the
    teacher average still comes from ``teachers``)."""
    spec = recipe.distill
    s_feat, t_feats = bare.features(student), [bare.features(t) for t in teachers]
    f_feats = [bare.features(t) for t in fusion] if fusion is not None else None
    opt = bare_optimizer(student.parameters(), spec.student_optim)
    tau = get_tau(ep.phase_epoch, spec, sum(spec.stage_epochs()))
    warm = ramp(ep.phase_epoch, spec.kd_warmup_epochs)
    weights = spec.teacher_weights or [1.0] * len(teachers)
    pi = [w / sum(weights) for w in weights]
    samples = spec.ib_target_samples if ib.ib and spec.synergy_target == "noise_avg" else 0

    def disagreement(t_logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        preds = torch.stack([t.argmax(-1) for t in t_logits])
        wrong = preds != y
        hit = {"both_wrong": wrong.all(0), "any_wrong": wrong.any(0), "pred": (preds != preds[:1]).any(0)}
        return torch.where(hit[spec.disagreement], spec.lambda_high, spec.lambda_low)

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            h_s = s_feat(batch.x)
            s = student.head(h_s).float()
            with torch.inference_mode(), bare.teacher_autocast():
                feats = [f(batch.x) for f in t_feats]
                t_logits = [t.head(h) for t, h in zip(teachers, feats, strict=True)]
                if f_feats is not None:
                    feats = [f(batch.x) for f in f_feats]
            with torch.no_grad():
                mu, logvar = bare_fusion(ib, h_s, feats)
                if samples:
                    eps = torch.randn((samples, *mu.shape), device=mu.device, dtype=mu.dtype)
                    z = (mu + torch.exp(0.5 * logvar) * eps).reshape(samples * mu.shape[0], -1)
                    q = F.softmax(head(z).float() / tau, dim=-1).reshape(samples, mu.shape[0], -1).mean(0)
                else:
                    q = F.softmax(head(mu).float() / tau, dim=-1)
                t_bar = sum(p * t.float() for p, t in zip(pi, t_logits, strict=True))
        log_s = F.log_softmax(s / tau, dim=-1)
        kd = F.kl_div(log_s, F.log_softmax(t_bar / tau, dim=-1), log_target=True, reduction="batchmean")
        if spec.disagreement == "none":
            kd_ens = F.kl_div(log_s, q, reduction="batchmean")
        else:
            w = disagreement(t_logits, batch.y)
            kd_ens = (w * F.kl_div(log_s, q, reduction="none").sum(-1)).sum() / w.sum()
        ce = bare_ce(s, batch, spec.label_smoothing)
        loss = spec.ce_alpha * ce + warm * tau * tau * (spec.kd_alpha * kd + spec.kd_ens_alpha * kd_ens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bare_kd_step(student: nn.Module, teacher: nn.Module, spec: DistillSpec, ep: EpochPlan, bare: Bare) -> Step:
    """Classic KD from one teacher: CE + tau^2 KL(p_t || p_s)."""
    forward, t_feat = (torch.compile(student) if bare.compile else student), bare.features(teacher)
    opt = bare_optimizer(student.parameters(), spec.student_optim)
    tau = get_tau(ep.phase_epoch, spec, sum(spec.stage_epochs()))
    weight = ramp(ep.phase_epoch, spec.kd_warmup_epochs) * spec.kd_alpha * tau * tau

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            s = forward(batch.x).float()
            with torch.inference_mode(), bare.teacher_autocast():
                t = teacher.head(t_feat(batch.x))
        log_t = F.log_softmax(t.float() / tau, dim=-1)
        kd = F.kl_div(F.log_softmax(s / tau, dim=-1), log_t, log_target=True, reduction="batchmean")
        loss = spec.ce_alpha * bare_ce(s, batch, spec.label_smoothing) + weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# ------------------------------------------------------------------ the engine under test


def engine_step(task: Any, ep: EpochPlan) -> Step:
    """The loop's work per batch: the task's step, then the on-device metric sums."""
    task.begin_epoch(ep)
    sums = MetricSums()
    counter = itertools.count()

    def step(batch: Batch) -> None:
        sums.add(task.step(ep, batch), batch.y.shape[0], next(counter))

    return step


def _noop(*_args: Any) -> None:
    return None


def engine_finetune(setting: Setting, runtime: Runtime, loader: InMemoryLoader) -> Step:
    spec = setting.recipe.teachers[0].train
    model = copy.deepcopy(setting.teachers[0])
    task = CETask(model, spec, setting.split_loaders(loader), runtime, _noop)
    return engine_step(task, task.plan()[0])


def method_spec(recipe: Recipe, method: str) -> DistillSpec:
    """The recipe's distill section as ``method`` reads it (another method's knobs left out)."""
    return DistillSpec.model_validate(distill_for_method(recipe.distill.model_dump(exclude_unset=True), method))


def distill_task(setting: Setting, runtime: Runtime, loader: InMemoryLoader, method: str,
                 teachers: list[nn.Module], student: nn.Module) -> DistillTask:
    spec = method_spec(setting.recipe, method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = build_method(spec, teachers, student, [t.name for t in setting.recipe.teachers]).to(runtime.device)
    return DistillTask(m, setting.split_loaders(loader), runtime, _noop, Progress(enabled=False))


def last_epoch(task: DistillTask, phase: str) -> EpochPlan | None:
    """The plan's last epoch of a phase: every term that can be on (CCCP from stage 2) is on."""
    eps = [ep for ep in task.plan() if ep.phase == phase]
    return eps[-1] if eps else None


# ------------------------------------------------------------------ the four sections


@dataclass
class Comparison:
    """One engine step against its bare twin (and, with compile on, the eager engine)."""

    name: str
    what: str
    engine: Timing
    bare: Timing
    eager: Timing | None = None
    syncs_per_step: int | None = None  # engine step's host-device synchronisations (CUDA only)

    @property
    def ratio(self) -> float:
        return paired_ratio(self.engine, self.bare)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "engine": self.engine.figures(), "bare": self.bare.figures(),
                               "ratio": round(self.ratio, 4), "syncs_per_step": self.syncs_per_step}
        if self.eager is not None:
            out["compile"] = {
                "eager": self.eager.figures(),
                "speedup": round(paired_ratio(self.eager, self.engine), 4),
                "compile_s": round(max(0.0, self.engine.first_step - self.engine.seconds / self.engine.steps), 2),
            }
        return out


def compare_steps(setting: Setting, cfg: BenchConfig, meter: MemoryMeter, say: Callable[[str], None]) -> list[Comparison]:
    """Section 2 (and 4): every engine step against its bare twin, interleaved."""
    recipe, runtime, bare = setting.recipe, setting.runtime, Bare(setting.runtime)
    eager_rt = dataclasses.replace(runtime, compile=False) if runtime.compile else None
    out: list[Comparison] = []

    def run(name: str, what: str, engine: Callable[[Runtime], Step], bare_step: Step, batches: list[Batch]) -> None:
        say(f"measuring {name}")
        variants = {"engine": engine(runtime), "bare": bare_step}
        if eager_rt is not None:
            variants["eager"] = engine(eager_rt)
        t = measure(variants, batches, cfg, runtime.device, meter)
        syncs = count_syncs(variants["engine"], batches[0], runtime.device)
        out.append(Comparison(name, what, t["engine"], t["bare"], t.get("eager"), syncs))

    if setting.teachers:
        spec = recipe.teachers[0].train
        loader = setting.loader(spec.batch_size, spec.augment)
        batches = take_batches(loader, cfg.steps)
        run("finetune", f"CETask.step on {recipe.teachers[0].name}",
            lambda rt: engine_finetune(setting, rt, loader),
            bare_finetune(copy.deepcopy(setting.teachers[0]), spec, bare), batches)
    if setting.student is None or not setting.teachers:
        return out
    loader = setting.loader(recipe.distill.batch_size, recipe.distill.augment)
    batches = take_batches(loader, cfg.steps)
    runtimes = [rt for rt in (runtime, eager_rt) if rt is not None]
    if len(setting.teachers) >= 2:
        tasks = {rt: distill_task(setting, rt, loader, "asib", *_copies(setting)) for rt in runtimes}
        ref = tasks[runtime]
        phases = [(phase, ep) for phase in ("A", "B") if (ep := last_epoch(ref, phase)) is not None]
        twins = {phase: _twin(ref, ep) for phase, ep in phases}  # before any engine step prepares a model
        for phase, ep in phases:
            student, teachers, fusion, ib, head = twins[phase]
            if phase == "A":
                bare_step = bare_a_step(student, fusion or teachers, ib, head, recipe, ep, bare)
            else:
                bare_step = bare_b_step(student, teachers, ib, head, recipe, ep, bare, fusion)
            what = {"A": "fusion learns", "B": "the student learns"}[phase]
            run(f"asib {phase}-step", f"stage {ep.stage + 1} {phase}-step: {what}, {len(setting.teachers)} teachers",
                lambda rt, ep=ep: engine_step(tasks[rt], ep), bare_step, batches)
    kd_spec = method_spec(recipe, "kd")
    kd_index = resolve_teacher(kd_spec.kd_teacher, [t.name for t in recipe.teachers])
    kd_tasks = {rt: distill_task(setting, rt, loader, "kd", *_copies(setting)) for rt in runtimes}
    kd_ep = last_epoch(kd_tasks[runtime], "B")
    if kd_ep is None:
        return out
    student, teachers, _, _, _ = _twin(kd_tasks[runtime], kd_ep)
    run("kd step", f"method kd from {recipe.teachers[kd_index].name}; the bare loop forwards only that teacher",
        lambda rt: engine_step(kd_tasks[rt], kd_ep),
        bare_kd_step(student, teachers[kd_index], kd_spec, kd_ep, bare), batches)
    return out


def _twin(task: DistillTask, ep: EpochPlan) -> tuple[nn.Module, list[nn.Module], list[nn.Module] | None, Any, Any]:
    """Copies of the engine's models as its ``begin_epoch`` leaves them for ``ep``: train/eval
    modes, frozen blocks and frozen norms included, so the bare loop computes the same:
    (student, teachers, the synergy path's adapted teachers or None, IB_MBM, synergy head).
    Taken before the engine's first step (a prepared model may carry a compiled ``features``)."""
    task.begin_epoch(ep)
    m = task.m
    fusion = getattr(m, "fusion_teachers", None)
    return (copy.deepcopy(m.student), [copy.deepcopy(t) for t in m.teachers],
            [copy.deepcopy(t) for t in fusion] if fusion is not None else None,
            copy.deepcopy(getattr(m, "ib_mbm", None)), copy.deepcopy(getattr(m, "synergy_head", None)))


def _copies(setting: Setting) -> tuple[list[nn.Module], nn.Module]:
    return [copy.deepcopy(t) for t in setting.teachers], copy.deepcopy(setting.student)


def compare_data(setting: Setting, cfg: BenchConfig, meter: MemoryMeter) -> dict[str, Timing]:
    """Section 1: the in-memory loader vs DataLoader + PIL transforms over the same images."""
    spec = setting.recipe.distill
    n = max(4 * cfg.steps, 8)
    loader = setting.loader(spec.batch_size, spec.augment)
    device = setting.runtime.device
    in_memory = _endless(loader)
    variants: dict[str, Step] = {"in_memory": lambda _b: next(in_memory)}
    pil_iters = {w: _pil_batches(setting, spec.batch_size, spec.augment, w, n * (cfg.repeats + 1) + cfg.warmup)
                 for w in cfg.workers}
    for w, it in pil_iters.items():
        variants[f"dataloader_pil_w{w}"] = lambda _b, it=it: next(it)
    dummy = [Batch(torch.zeros(0), torch.zeros(spec.batch_size))]
    data_cfg = dataclasses.replace(cfg, steps=n)
    return measure(variants, dummy, data_cfg, device, meter)


class _PILImages(torch.utils.data.Dataset):
    """What a user's dataset does per item: a PIL image through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _pil_batches(setting: Setting, batch_size: int, aug: AugmentSpec, workers: int, n_batches: int) -> Iterator[Batch]:
    from torchvision import transforms as T

    h, w = setting.images.shape[-2:]
    steps: list[Any] = [T.RandomCrop((h, w), padding=aug.crop_padding)] if aug.crop_padding else []
    steps += [T.RandomHorizontalFlip()] if aug.hflip else []
    steps += [T.ToTensor(), T.Normalize(setting.mean, setting.std)]
    dataset = _PILImages(setting.images.permute(0, 2, 3, 1).numpy(), setting.labels.numpy(), T.Compose(steps))
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=n_batches * batch_size)
    device, cuda = setting.runtime.device, setting.runtime.device.type == "cuda"
    fmt = torch.channels_last if setting.runtime.channels_last else torch.contiguous_format
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                     drop_last=True, pin_memory=cuda, persistent_workers=workers > 0)
    for x, y in dl:
        yield Batch(x.to(device, non_blocking=cuda, memory_format=fmt), y.to(device, non_blocking=cuda))


def breakdown(setting: Setting, cfg: BenchConfig, meter: MemoryMeter) -> dict[str, dict[str, float]]:
    """Section 3: where a step's time goes, each part timed on its own (ms per batch)."""
    recipe, runtime = setting.recipe, setting.runtime
    out: dict[str, dict[str, float]] = {}
    if setting.teachers:
        spec = recipe.teachers[0].train
        loader = setting.loader(spec.batch_size, spec.augment)
        model = copy.deepcopy(setting.teachers[0]).train()
        runtime.prepare(model)
        opt = bare_optimizer(model.parameters(), spec.optim)
        parts = {"data": _data_part(loader), "model forward+backward": _fwd_bwd(model, runtime, spec.label_smoothing),
                 "optimizer": _opt_step(opt)}
        out["finetune"] = _ms(measure(parts, take_batches(loader, cfg.steps), cfg, runtime.device, meter))
    if setting.student is None or len(setting.teachers) < 2:
        return out
    loader = setting.loader(recipe.distill.batch_size, recipe.distill.augment)
    batches = take_batches(loader, cfg.steps)
    task = distill_task(setting, runtime, loader, "asib", *_copies(setting))
    d = task.m
    assert isinstance(d, ASIB)
    runtime.prepare(*d.models())
    for phase in ("A", "B"):
        ep = last_epoch(task, phase)
        if ep is None:
            continue
        task.begin_epoch(ep)
        with torch.no_grad(), runtime.autocast(), runtime.inference_precision():
            feats = frozen_outputs(d.synergy_teachers, batches[0].x)[0]
            h_s = d.student.features(batches[0].x)
        feats = [f.clone() for f in feats]  # inference tensors cannot be saved for the fusion's backward
        parts: dict[str, Step] = {"data": _data_part(loader)}
        for spec_t, t in zip(recipe.teachers, d.synergy_teachers, strict=True):
            if phase == "A" and any(p.requires_grad for p in t.parameters()):
                parts[f"teacher {spec_t.name} forward+backward (unfrozen blocks)"] = _teacher_train(t, runtime)
                continue
            parts[f"teacher {spec_t.name} forward"] = _teacher_fwd(t, runtime, runtime.inference_dtype)
            if runtime.inference_dtype is not None:
                parts[f"teacher {spec_t.name} forward, fp32 (reference)"] = _teacher_fwd(t, runtime, None)
        if phase == "A":
            parts["student forward (no grad)"] = _student_fwd(d.student, runtime)
            parts["fusion forward+backward"] = _fusion_a(d, h_s, feats, runtime)
            parts["optimizer (teacher side)"] = _opt_step(task.optimizers["A"], task.schedulers["A"])
        else:
            parts["student forward+backward"] = _fwd_bwd(d.student, runtime, recipe.distill.label_smoothing)
            parts["fusion forward + synergy target"] = _fusion_b(d, h_s, feats, runtime)
            parts["optimizer (student)"] = _opt_step(task.optimizers["B"], task.schedulers["B"])
        out[f"asib {phase}-step"] = _ms(measure(parts, batches, cfg, runtime.device, meter))
    return out


def _data_part(loader: InMemoryLoader) -> Step:
    batches = _endless(loader)
    return lambda _batch: next(batches)


def _ms(timings: dict[str, Timing]) -> dict[str, float]:
    return {name: round(t.ms_per_step, 3) for name, t in timings.items()}


def _fwd_bwd(model: nn.Module, runtime: Runtime, smoothing: float) -> Step:
    def step(batch: Batch) -> None:
        model.zero_grad(set_to_none=True)
        with runtime.autocast():
            logits = model(batch.x)
        bare_ce(logits.float(), batch, smoothing).backward()

    return step


def _opt_step(opt: torch.optim.Optimizer, sched: Any = None) -> Step:
    """optimizer.step (+ schedule step) on the gradients the last backward left."""

    def step(_batch: Batch) -> None:
        opt.step()
        if sched is not None:
            sched.step()

    return step


def _teacher_fwd(teacher: nn.Module, runtime: Runtime, dtype: torch.dtype | None) -> Step:
    rt = dataclasses.replace(runtime, inference_dtype=dtype)

    def step(batch: Batch) -> None:
        with torch.inference_mode(), runtime.autocast(), rt.inference_precision(), inference_autocast(rt.device):
            teacher.head(teacher.features(batch.x))

    return step


def _teacher_train(teacher: nn.Module, runtime: Runtime) -> Step:
    """A partly unfrozen teacher in the A-step: forward with gradients, backward into its open blocks."""

    def step(batch: Batch) -> None:
        teacher.zero_grad(set_to_none=True)
        with runtime.autocast():
            h = teacher.features(batch.x)
        h.float().square().mean().backward()

    return step


def _student_fwd(student: nn.Module, runtime: Runtime) -> Step:
    def step(batch: Batch) -> None:
        with torch.no_grad(), runtime.autocast():
            student.head(student.features(batch.x))

    return step


def _fusion_a(d: ASIB, h_s: torch.Tensor, feats: list[torch.Tensor], runtime: Runtime) -> Step:
    """IB_MBM + synergy head forward, CE + KL, backward: the A-step's trainable part."""
    from asib.methods.losses import cross_entropy, ib_kl

    def step(batch: Batch) -> None:
        d.ib_mbm.zero_grad(set_to_none=True)
        d.synergy_head.zero_grad(set_to_none=True)
        with runtime.autocast():
            out = d.ib_mbm(h_s, feats)
            g = d.synergy_head(out.z).float()
        (cross_entropy(g, batch.y) + d.spec.ib_beta * ib_kl(out.mu, out.logvar)).backward()

    return step


def _fusion_b(d: ASIB, h_s: torch.Tensor, feats: list[torch.Tensor], runtime: Runtime) -> Step:
    """IB_MBM forward and the noise-averaged synergy target, without gradients."""
    from asib.models import synergy_target

    spec = d.spec

    def step(_batch: Batch) -> None:
        with torch.no_grad(), runtime.autocast():
            out = d.ib_mbm(h_s, feats)
            synergy_target(d.ib_mbm, d.synergy_head, out, spec.tau, spec.ib_target_samples, mode=spec.synergy_target)

    return step


# ------------------------------------------------------------------ the whole bench


@dataclass
class BenchReport:
    """Every figure of one bench run; ``to_dict`` is what ``--json`` prints."""

    setting: dict[str, Any]
    data: dict[str, Any]
    steps: list[Comparison]
    breakdown: dict[str, dict[str, float]]

    @property
    def ratios(self) -> dict[str, float]:
        return {c.name: c.ratio for c in self.steps}

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "data": self.data,
            "steps": {c.name: c.to_dict() for c in self.steps},
            "breakdown": self.breakdown,
            "max_ratio": round(max(self.ratios.values()), 4) if self.steps else None,
        }


def run_bench(recipe: Recipe, cfg: BenchConfig, say: Callable[[str], None] | None = None) -> BenchReport:
    """Build the setting, then measure data, steps and breakdown; see the module docstring."""
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(recipe, cfg, say or _noop)
    finally:
        torch.set_num_threads(previous)


def _run_bench(recipe: Recipe, cfg: BenchConfig, say: Callable[[str], None]) -> BenchReport:
    setting = build_setting(recipe, cfg)
    runtime = setting.runtime
    if cfg.steps is None:
        cfg = dataclasses.replace(cfg, steps=10 if runtime.device.type == "cuda" else 4)
    meter = MemoryMeter(runtime.device)
    say("measuring the data pipelines")
    data_t = compare_data(setting, cfg, meter)
    data = {name: t.figures() for name, t in data_t.items()}
    for w in cfg.workers:
        data[f"speedup_vs_w{w}"] = round(paired_ratio(data_t[f"dataloader_pil_w{w}"], data_t["in_memory"]), 2)
    steps = compare_steps(setting, cfg, meter, say)
    say("measuring the breakdown")
    parts = breakdown(setting, cfg, meter)
    about = {
        "recipe": recipe.name,
        "device": str(runtime.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": setting.data_source,
        "image_size": list(setting.images.shape[-2:]),
        "num_classes": setting.num_classes,
        "batch_size": {"finetune": recipe.teachers[0].train.batch_size if recipe.teachers else None,
                       "distill": recipe.distill.batch_size},
        "teachers": {t.name: src for t, src in zip(recipe.teachers, setting.teacher_sources, strict=True)},
        "student": f"fresh {recipe.student.arch}" if recipe.student else None,
        "precision": {
            "train": str(runtime.amp_dtype).replace("torch.", "") + " autocast" if runtime.amp_dtype else "fp32",
            "teachers": str(runtime.inference_dtype).replace("torch.", "") + " autocast"
            if runtime.inference_dtype else "as train",
            "channels_last": runtime.channels_last,
            "compile": runtime.compile,
        },
        "memory": meter.method,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
    }
    return BenchReport(about, data, steps, parts)
