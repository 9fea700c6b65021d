"""Losses as small classes with one call, ``loss(model, batch) -> LossOutput`` (the EDM pattern), so one training
loop serves the teacher and every student. Conventions of flow.py: x_t = t x1 + (1 - t) x0, target x1 - x0.

Batches: images ``{"x1": (B, 3, 32, 32) in [-1, 1], "y": (B,)}``; pairs ``{"x0": noise, "x1": teacher image, "y"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill_common.errors import ConfigError, unknown_choice
from distill_rf_cifar.flow import drop_labels, guided_velocity, interpolate, time_sampler, velocity_target


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to minimise
    per_sample: torch.Tensor  # (B,) detached, for per-t-bin logging
    t: torch.Tensor  # (B,) the time of each sample
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # extra scalars the loop reports


class LossHooks:
    """Optional extras of a loss object (mixin) that trains more than the model: a discriminator with its own
    optimiser, an EMA target network. training.loop calls ``after_step`` after each optimiser step of the model and
    checkpoints ``extra_weights`` (safetensors) and ``extra_state``, so resume stays exact."""

    def after_step(self, model: nn.Module) -> dict[str, Any]:
        """Called after every optimiser step of ``model`` (unwrapped); returns scalars to report (window means)."""
        return {}

    def extra_weights(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint as safetensors (trained auxiliary networks)."""
        return {}

    def load_extra_weights(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def extra_state(self) -> dict[str, Any]:
        """Other resumable state (auxiliary optimisers), saved with the optimizer state."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().mean(dim=(1, 2, 3))  # (B,)


def _null_class(model: nn.Module) -> int:
    return model.null_class if hasattr(model, "null_class") else model.module.null_class


class RectifiedFlowLoss(nn.Module):
    """The teacher: ||v(x_t, t, y~) - (x1 - x0)||^2 with fresh noise, t from the time sampler and label dropout
    (Liu et al. 2023, Eq. (2))."""

    def __init__(self, time_sampler_name: str = "logit_normal", label_dropout: float = 0.1) -> None:
        super().__init__()
        self.sample_t = time_sampler(time_sampler_name)
        self.label_dropout = label_dropout

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        t = self.sample_t(x1.shape[0], device=x1.device)
        y = drop_labels(y, _null_class(model), self.label_dropout)
        per = _mse(model(interpolate(x0, x1, t), t, y), velocity_target(x0, x1))
        return LossOutput(per.mean(), per.detach(), t.detach())


class _EndpointDistance(nn.Module):
    """L2 on the velocity, or LPIPS (Zhang et al. 2018) between the predicted image x_t + (1 - t) v and x1."""

    def __init__(self, distance: str = "l2", lpips_resize: int = 224) -> None:
        super().__init__()
        if distance not in ("l2", "lpips"):
            raise unknown_choice("distillation distance", distance, ("l2", "lpips"))
        self.distance = distance
        self.lpips_resize = lpips_resize
        self.lpips = None
        if distance == "lpips":
            from distill_eval.lpips_metric import LPIPSMetric

            self.lpips = LPIPSMetric(net="alex", value_range=(-1.0, 1.0))

    def per_sample(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if self.lpips is None:
            return _mse(v, velocity_target(x0, x1))
        pred = xt.float() + (1 - t.view(-1, 1, 1, 1)) * v.float()  # (B, 3, H, W) the image one Euler step reaches
        target = x1.float()
        if self.lpips_resize and self.lpips_resize != pred.shape[-1]:
            size = (self.lpips_resize, self.lpips_resize)
            pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
        return self.lpips(pred, target)


class KStepDistillationLoss(nn.Module):
    """k-step distillation from teacher pairs (Liu et al. 2023, Sec. 2.3): t is drawn from the k fixed points
    {0, 1/k, ..., (k-1)/k} that k-step Euler visits, x_t lies on the straight line between the pair's noise and
    image, and the target is the pair's velocity x1 - x0, so k Euler steps from x0 land on the teacher's x1.

    ``rollout`` (0..1): that share of the samples at t > 0 starts instead from the state the student's own Euler
    steps reach from x0 (no gradient), and its target is the velocity that reaches the teacher's image from there
    in one step, (x1 - x_t) / (1 - t); on the straight line this equals x1 - x0. It trains the student on the
    states it visits when sampling (exposure bias; DAgger, Ross et al. 2011), at the cost of up to k - 1 extra
    forwards without gradient per rolled-out sample."""

    def __init__(self, k: int = 4, distance: str = "l2", lpips_resize: int = 224, rollout: float = 0.0) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"k-step distillation needs k >= 1, got {k}; pass --options-k 4")
        if not 0.0 <= rollout <= 1.0:
            raise ConfigError(f"the rollout share must lie in [0, 1], got {rollout}; e.g. --options-k-rollout 0.5")
        self.k = k
        self.rollout = rollout
        self.endpoint = _EndpointDistance(distance, lpips_resize)

    @torch.no_grad()
    def _rolled_out(self, model: nn.Module, x0: torch.Tensor, steps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The state ``steps[i]`` Euler steps of the student reach from ``x0[i]`` (fp32 state)."""
        x = x0.float().clone()
        for j in range(int(steps.max())):
            active = steps > j
            t = torch.full((int(active.sum()),), j / self.k, device=x.device)
            x[active] = x[active] + model(x[active], t, y[active]).float() / self.k
        return x

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x0, x1, y = batch["x0"], batch["x1"], batch["y"]
        steps = torch.randint(0, self.k, (x1.shape[0],), device=x1.device)
        t = steps.to(x1.dtype) / self.k
        xt = interpolate(x0, x1, t)
        if self.rollout > 0:
            chosen = (steps > 0) & (torch.rand(steps.shape, device=steps.device) < self.rollout)
            if chosen.any():
                xt = xt.clone()
                xt[chosen] = self._rolled_out(model, x0[chosen], steps[chosen], y[chosen]).to(xt.dtype)
                t4 = t.view(-1, 1, 1, 1)
                x0 = torch.where(chosen.view(-1, 1, 1, 1), (xt - t4 * x1) / (1 - t4), x0)  # the line x_t -> x1
        per = self.endpoint.per_sample(xt, t, model(xt, t, y), x0, x1)
        return LossOutput(per.mean(), per.detach(), t.detach())


class PairDistillationLoss(KStepDistillationLoss):
    """One-step distillation from pairs: k = 1, so t = 0 and x0 + v(x0, 0) must be the teacher's image
    (L2, or LPIPS as Liu et al. use for their one-step student)."""

    def __init__(self, distance: str = "l2", lpips_resize: int = 224) -> None:
        super().__init__(1, distance, lpips_resize)


class ReflowLoss(nn.Module):
    """2-rectified flow (Liu et al. 2023, Sec. 2.2): rectified flow trained on the teacher's (noise, image)
    couplings instead of independent ones; t from the time sampler (uniform by default), target x1 - x0."""

    def __init__(self, time_sampler_name: str = "uniform") -> None:
        super().__init__()
        self.sample_t = time_sampler(time_sampler_name)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x0, x1, y = batch["x0"], batch["x1"], batch["y"]
        t = self.sample_t(x1.shape[0], device=x1.device)
        per = _mse(model(interpolate(x0, x1, t), t, y), velocity_target(x0, x1))
        return LossOutput(per.mean(), per.detach(), t.detach())


class ProgressiveDistillationLoss(nn.Module):
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2) adapted to rectified flow and Euler steps.

    The teacher samples on the grid ``teacher_steps`` (N Euler steps: uniform ``i/N`` for an int N, else the grid's
    points themselves); the
    student samples on :func:`~distill_rf_cifar.samplers.halve_grid` of it. The student starts at a point a of its
    own grid, x_a = a x1 + (1 - a) x0 from data, and must reach in one step to its next point c what the teacher
    reaches in the (two, or for an odd N's last step one) Euler steps between them: target velocity
    (x_c^teacher - x_a) / (c - a), i.e. (v(x_a, a) + v(x_b, b)) / 2 on a uniform grid. Uniform weighting (the
    velocity parametrisation needs no SNR truncation). The frozen teacher samples with CFG scale ``guidance``;
    the student learns the guided velocity directly.

    ``guidance_range`` (w_min, w_max): guided distillation's stage two (Meng et al. 2023, "On Distillation of Guided
    Diffusion Models", Sec. 3.2): teacher and student both take the CFG scale w as an input (the teacher is the
    stage-one or previous round's w-conditioned student); each sample draws w ~ U[w_min, w_max], the target is the
    teacher's two steps *at that w*, and the student is trained at the same w, so it keeps sampling any w in the
    range with one network call per step.
    """

    def __init__(self, teacher: nn.Module, teacher_steps: int | Sequence[float], guidance: float = 1.0,
                 guidance_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        from distill_rf_cifar.flow import is_guidance_conditioned
        from distill_rf_cifar.samplers import halve_grid

        if guidance_range is not None:
            if not is_guidance_conditioned(teacher):
                raise ConfigError("progressive distillation over a guidance range needs a w-conditioned teacher "
                                  "(the stage-one student of --recipe guided)")
            if not 0.0 <= guidance_range[0] <= guidance_range[1]:
                raise ConfigError(f"guidance range {list(guidance_range)} is empty or negative; pass 0 <= "
                                  "--options-guidance-min <= --options-guidance-max")
        self.guidance_range = None if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))

        n = teacher_steps
        grid = [i / n for i in range(n + 1)] if isinstance(n, int) else [float(u) for u in n]
        if len(grid) < 3:
            raise ConfigError(f"progressive distillation halves a teacher of at least 2 steps, got {len(grid) - 1}; "
                              "pass a larger --options-progressive-start")
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_grid = torch.tensor(grid, dtype=torch.float64)
        self.student_grid = torch.tensor(halve_grid(grid), dtype=torch.float64)
        self.teacher_steps = len(grid) - 1
        self.guidance = guidance

    def train(self, mode: bool = True) -> ProgressiveDistillationLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def target(self, xa: torch.Tensor, i: torch.Tensor, y: torch.Tensor,
               w: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity that takes x_a at student grid point i (B,) to the teacher's point at student point i + 1
        (at per-sample CFG scales ``w`` (B,) when given, else at ``guidance``)."""
        guidance = self.guidance if w is None else w
        a = self.student_grid[i]
        c = self.student_grid[i + 1]
        j = torch.searchsorted(self.teacher_grid, a)  # a's index on the teacher grid
        b = self.teacher_grid[torch.clamp(j + 1, max=len(self.teacher_grid) - 1)]  # teacher's midpoint (== c if single)
        shape = (-1, *([1] * (xa.dim() - 1)))
        dtype = xa.dtype
        a_, b_, c_ = (v.to(xa.device, dtype) for v in (a, b, c))
        v1 = guided_velocity(self.teacher, xa, a_, y, guidance)
        xb = xa + (b_ - a_).view(shape) * v1
        double = (b_ < c_).view(shape)  # two teacher steps, else the odd grid's last single step
        v2 = guided_velocity(self.teacher, xb, b_, y, guidance)
        xc = torch.where(double, xb + (c_ - b_).view(shape) * v2, xb)
        return (xc - xa) / (c_ - a_).view(shape)  # (B, 3, H, W)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        i = torch.randint(0, len(self.student_grid) - 1, (x1.shape[0],))
        t = self.student_grid[i].to(x1.device, x1.dtype)
        xt = interpolate(x0, x1, t)
        if self.guidance_range is None:
            per = _mse(model(xt, t, y), self.target(xt, i, y))
        else:  # stage two: the same w (B,) for the teacher's target and the student
            lo, hi = self.guidance_range
            w = lo + (hi - lo) * torch.rand(x1.shape[0], device=x1.device)
            per = _mse(model(xt, t, y, w), self.target(xt, i, y, w))
        return LossOutput(per.mean(), per.detach(), t.detach())


# ---------------------------------------------------------------------------------------------------------------
# Adversarial distillation (ADD, Sauer et al. 2023) and consistency distillation (Song et al. 2023).
# Both train more than the model (discriminator heads with their own Adam; an EMA target network), through LossHooks.


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017; ADD Eq. (3)): E[relu(1 - D(real))] + E[relu(1 + D(fake))].
    Logits (B,) or (B, K) for K heads: summed over heads, averaged over the batch."""
    real = F.relu(1 - real_logits.float()).reshape(real_logits.shape[0], -1).sum(1)
    fake = F.relu(1 + fake_logits.float()).reshape(fake_logits.shape[0], -1).sum(1)
    return real.mean() + fake.mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample generator loss -D(fake) (B,), summed over heads."""
    return -fake_logits.float().reshape(fake_logits.shape[0], -1).sum(1)


class TeacherEncoder(nn.Module):
    """The frozen feature network of the discriminator: the teacher's own down path and middle block, applied to an
    image as the clean end of the flow (t = 1, null class). Features at every level (e.g. 16, 8, 8 and 8 px).

    Why this network (ADD uses a frozen DINOv2 ViT-S, which does not exist offline here): the teacher's encoder was
    trained on CIFAR-10 at 32 px, so its features describe exactly these images; it costs about half a teacher forward,
    needs no resizing; and it is available for any teacher. The Inception network of distill_eval would need 299 px
    inputs (~10x the cost on a CPU) and is the FID's own feature extractor: a discriminator on it would optimise the
    evaluation metric directly.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        import copy

        from distill_rf_cifar.models.unet import TIME_SCALE

        net = copy.deepcopy(unet.net)
        self.time_proj, self.time_embedding, self.class_embedding = net.time_proj, net.time_embedding, net.class_embedding
        self.conv_in, self.down_blocks, self.mid_block = net.conv_in, net.down_blocks, net.mid_block
        self.null_class, self.time_value = unet.null_class, TIME_SCALE
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            self.channels = [f.shape[1] for f in self(torch.zeros(1, 3, unet.resolution, unet.resolution))]

    def train(self, mode: bool = True) -> TeacherEncoder:
        return super().train(False)  # frozen: dropout stays off

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        t = torch.full((b,), self.time_value, device=x.device)
        return encoder_levels(self, x, t, torch.full((b,), self.null_class, device=x.device, dtype=torch.long))


def encoder_levels(net: Any, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The features of a diffusers ``UNet2DModel``'s down path and middle block at (x, timesteps, y): one (B, C_l, H_l,
    W_l) map per level, the middle block's last. ``net`` is the UNet2DModel or anything holding its parts
    (:class:`TeacherEncoder`); ``timesteps`` are already scaled (t * TIME_SCALE). Costs about half a forward."""
    emb = net.time_embedding(net.time_proj(timesteps).to(x.dtype))
    emb = emb + net.class_embedding(y).to(x.dtype)
    h = net.conv_in(x)
    feats = []
    for block in net.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
        feats.append(h)  # (B, C_l, H_l, W_l)
    if net.mid_block is not None:
        h = net.mid_block(h, emb)
        feats.append(h)
    return feats


class DiscriminatorHead(nn.Module):
    """A small trainable head on one feature level: conv 3x3 -> LeakyReLU -> conv 1x1 logit map (averaged), plus a
    class projection (Miyato & Koyama 2018), ADD's conditioning of its heads."""

    def __init__(self, channels: int, hidden: int, num_embeddings: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(hidden, hidden, 1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(hidden, 1, 1)
        self.embed = nn.Embedding(num_embeddings, hidden)
        nn.init.normal_(self.embed.weight, std=hidden**-0.5)

    def forward(self, feature: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(feature)  # (B, hidden, H, W)
        return self.out(h).mean(dim=(1, 2, 3)) + (self.embed(y) * h.mean(dim=(2, 3))).sum(1) * h.shape[1] ** -0.5  # (B,)


class Discriminator(nn.Module):
    """D(x, y) -> (B, K) logits: K trainable heads on a frozen :class:`TeacherEncoder`."""

    def __init__(self, encoder: TeacherEncoder, hidden: int = 32, num_embeddings: int = 11, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        with torch.random.fork_rng(devices=[]):  # the heads' initial weights depend on ``seed`` only (exact resume)
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(DiscriminatorHead(c, hidden, num_embeddings) for c in encoder.channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(f.float(), y) for head, f in zip(self.heads, self.encoder(x), strict=True)], dim=1)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over processes (auxiliary networks are not DDP-wrapped)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


class AdversarialDistillationLoss(nn.Module, LossHooks):
    """Adversarial distillation (Sauer et al. 2023, ADD) from teacher pairs, for a k-step student (k in 1..4).

    The student starts at one of its k Euler points t in {0, 1/k, ..., (k-1)/k} on the line between a pair's noise x0
    and teacher image x1 (t = 0: the noise itself) and jumps to the end in one call: x_student = x_t + (1 - t) v(x_t).
    Student loss: -D(x_student) + lambda ||x_student - x_teacher||^2 (the squared norm over the image's 3 x H x W
    values: a per-pixel mean would weigh the distillation term ~3,000x less than the hinge term at 32 px, and
    the student collapses to what fools D within ~100 steps), where x_teacher is the teacher's multi-step
    sample from the same noise (the pair's x1; the tutorial's distillation term; ADD re-noises the student's output
    and uses lambda = 2.5). After each student step, the discriminator (frozen :class:`TeacherEncoder`, trainable
    heads, own Adam) takes one step on the hinge loss relu(1 - D(real)) + relu(1 + D(fake)) with real CIFAR-10
    training images, plus the R1 penalty gamma/2 ||grad_x D(real)||^2 (Mescheder et al. 2018). Reported: the
    generator's adversarial and distillation terms, the discriminator loss, R1, and D's accuracy on real (D > 0) and
    fake (D < 0) images. Batches hold pairs and real images (:class:`~distill_rf_cifar.training.data.PairsWithImages`).
    """

    def __init__(self, teacher: nn.Module, k: int = 4, weight: float = 0.5, d_learning_rate: float = 1e-5,
                 r1_weight: float = 0.003, head_channels: int = 32) -> None:
        super().__init__()
        if not 1 <= k <= 4:
            raise ConfigError(f"adversarial distillation samples in 1-4 steps, got {k}; pass --options-adv-steps 1..4")
        if weight < 0 or r1_weight < 0 or d_learning_rate <= 0:
            raise ConfigError("adversarial distillation needs --options-adv-weight >= 0, --options-adv-r1-weight >= 0 "
                              "and --options-adv-d-learning-rate > 0")
        self.k, self.weight, self.r1_weight = k, weight, r1_weight
        self.discriminator = Discriminator(TeacherEncoder(teacher), head_channels, teacher.null_class + 1)
        self.d_optimizer = torch.optim.Adam(self.discriminator.heads.parameters(), lr=d_learning_rate)
        self._pending: tuple[torch.Tensor, ...] | None = None

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x0, x1, y = batch["x0"], batch["x1"], batch["y"]
        t = torch.randint(0, self.k, (x1.shape[0],), device=x1.device).to(x1.dtype) / self.k
        xt = interpolate(x0, x1, t)
        x_student = xt + (1 - t.view(-1, 1, 1, 1)) * model(xt, t, y)  # (B, 3, H, W)
        heads = self.discriminator.heads
        heads.requires_grad_(False)  # the student's step must not touch the discriminator
        try:
            adv = hinge_generator_loss(self.discriminator(x_student, y))
        finally:
            heads.requires_grad_(True)
        distill = (x_student.float() - x1.float()).square().flatten(1).sum(1)  # ||.||^2 per image, not per pixel
        per = adv + self.weight * distill
        self._pending = (x_student.detach().float(), y, batch["real"].float(), batch["real_y"])
        return LossOutput(per.mean(), per.detach(), t.detach(),
                          {"loss_g_adv": adv.detach().mean(), "loss_distill": distill.detach().mean()})

    def discriminator_step(self, real: torch.Tensor, real_y: torch.Tensor, fake: torch.Tensor,
                           fake_y: torch.Tensor) -> dict[str, float]:
        """One Adam step of the heads on hinge + R1; returns the loss and accuracies."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        real = real.detach().requires_grad_(self.r1_weight > 0)
        self.d_optimizer.zero_grad(set_to_none=True)
        # R1 differentiates twice through the encoder; the fused CPU/flash attention kernels have no double backward
        with sdpa_kernel([SDPBackend.MATH] if self.r1_weight > 0 else list(SDPBackend)):
            real_logits = self.discriminator(real, real_y)  # (B, K)
        fake_logits = self.discriminator(fake.detach(), fake_y)
        loss_d = hinge_discriminator_loss(real_logits, fake_logits)
        r1 = torch.zeros((), device=real.device)
        if self.r1_weight > 0:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = grad.square().flatten(1).sum(1).mean()
        (loss_d + 0.5 * self.r1_weight * r1).backward()
        params = list(self.discriminator.heads.parameters())
        _all_reduce_grads(params)
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)
        return {"loss_d": float(loss_d.detach()), "r1": float(r1.detach()),
                "d_acc_real": float((real_logits.detach().sum(1) > 0).float().mean()),
                "d_acc_fake": float((fake_logits.detach().sum(1) < 0).float().mean())}

    def after_step(self, model: nn.Module) -> dict[str, float]:
        if self._pending is None:
            return {}
        fake, y, real, real_y = self._pending
        self._pending = None
        return self.discriminator_step(real, real_y, fake, y)

    def extra_weights(self) -> dict[str, torch.Tensor]:
        return {f"heads.{k}": v for k, v in self.discriminator.heads.state_dict().items()}

    def load_extra_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.discriminator.heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items()
                                                  if k.startswith("heads.")})

    def extra_state(self) -> dict[str, Any]:
        return {"d_optimizer": self.d_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "d_optimizer" in state:
            self.d_optimizer.load_state_dict(state["d_optimizer"])


def consistency_function(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(x, t, y), c_skip = 1, c_out = 1 - t (see
    :class:`ConsistencyDistillationLoss`); exactly x at t = 1."""
    from distill_rf_cifar.samplers import consistency_endpoint

    return consistency_endpoint(x, t, model(x, t, y))


class ConsistencyDistillationLoss(nn.Module, LossHooks):
    """Consistency distillation (Song et al. 2023, Algorithm 2) on the flow teacher, in this package's convention
    x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data).

    Parametrisation: f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(x, t) with c_skip(t) = 1 and c_out(t) = 1 - t, F the
    UNet's velocity output. f is the image one Euler step from (x, t) reaches, so the student starts as the teacher
    (F = v) and the boundary condition f(x, 1) = x holds exactly (c_out(1) = 0 in floating point, not only in the
    limit; Song et al. need sigma_min > 0 for theirs). Training: on the uniform grid t_n = n/N, n ~ U{0..N-1},
    x_{t_n} = t_n x1 + (1 - t_n) x0 from a data image; one teacher ODE step (Euler or Heun, teacher CFG scale)
    gives x_hat at t_{n+1}; loss d(f_theta(x_{t_n}, t_n), f_theta-(x_hat, t_{n+1})) with theta- an EMA of theta
    (decay mu, updated after every optimiser step; the loop keeps its own, slower EMA for sampling). For n = N - 1 the
    target is x_hat itself. d is the squared L2 distance (or LPIPS, as Song et al.). Sampled with multistep consistency
    sampling (samplers.sample_consistency).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, grid: int = 16, target_decay: float = 0.95,
                 solver: str = "euler", guidance: float = 1.0, distance: str = "l2", lpips_resize: int = 224) -> None:
        super().__init__()
        import copy

        if grid < 1:
            raise ConfigError(f"consistency distillation needs a time grid of >= 1 interval, got {grid}; "
                              "pass --options-cd-grid 16")
        if not 0 <= target_decay < 1:
            raise ConfigError(f"the target network's EMA decay must lie in [0, 1), got {target_decay}; "
                              "pass --options-cd-target-decay 0.95")
        if solver not in ("euler", "heun"):
            raise unknown_choice("consistency teacher solver", solver, ("euler", "heun"))
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.target = copy.deepcopy(student).eval().requires_grad_(False)
        self.grid, self.decay, self.solver, self.guidance = grid, target_decay, solver, guidance
        self.distance = distance
        self.lpips_resize = lpips_resize
        self.lpips = None
        if distance == "lpips":
            from distill_eval.lpips_metric import LPIPSMetric

            self.lpips = LPIPSMetric(net="alex", value_range=(-1.0, 1.0))
        elif distance != "l2":
            raise unknown_choice("consistency distance", distance, ("l2", "lpips"))

    def train(self, mode: bool = True) -> ConsistencyDistillationLoss:
        super().train(mode)
        self.teacher.eval()
        self.target.eval()
        return self

    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, dt: float, y: torch.Tensor) -> torch.Tensor:
        """One ODE step of the teacher from (x, t) to t + dt (Heun: Euler where the step ends at the data, t = 1, as
        in :func:`~distill_rf_cifar.samplers.sample_heun`)."""
        v = guided_velocity(self.teacher, x, t, y, self.guidance)
        x_next = x + dt * v
        if self.solver == "heun":
            from distill_rf_cifar.samplers import reaches_data

            corrected = x + dt * 0.5 * (v + guided_velocity(self.teacher, x_next, t + dt, y, self.guidance))
            at_data = reaches_data(t + dt).view(-1, *([1] * (x.dim() - 1)))
            x_next = torch.where(at_data, x_next, corrected)
        return x_next

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.lpips is None:
            return _mse(a, b)
        if self.lpips_resize and self.lpips_resize != a.shape[-1]:
            size = (self.lpips_resize, self.lpips_resize)
            a = F.interpolate(a.float(), size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b.float(), size=size, mode="bilinear", align_corners=False)
        return self.lpips(a.float(), b.float())

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        n = torch.randint(0, self.grid, (x1.shape[0],), device=x1.device)
        t, dt = n.to(x1.dtype) / self.grid, 1.0 / self.grid
        t_next = (n + 1).to(x1.dtype) / self.grid  # exactly 1.0 for n = N - 1
        xt = interpolate(x0, x1, t)
        with torch.no_grad():
            x_hat = self.teacher_step(xt, t, dt, y)
            target = consistency_function(self.target, x_hat, t_next, y)
        per = self._distance(consistency_function(model, xt, t, y), target)
        return LossOutput(per.mean(), per.detach(), t.detach())

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> dict[str, float]:
        """theta- <- mu theta- + (1 - mu) theta (parameters; buffers copied)."""
        for p_t, p in zip(self.target.parameters(), model.parameters(), strict=True):
            p_t.lerp_(p.detach().to(p_t.dtype), 1 - self.decay)
        for b_t, b in zip(self.target.buffers(), model.buffers(), strict=True):
            b_t.copy_(b)
        return {}

    def extra_weights(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def load_extra_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.target.load_state_dict({k.removeprefix("target."): v for k, v in tensors.items()
                                     if k.startswith("target.")})


# ------------------------------------------------------------------------------------------------------------------
# Guidance-conditioned distillation and score distillation sampling (issue 12, items 3 and 4).
# ------------------------------------------------------------------------------------------------------------------


class GuidanceConditionedLoss(nn.Module):
    """Guided distillation, stage one (Meng et al. 2023, "On Distillation of Guided Diffusion Models", Eq. 6).

    A student v_s(x, t, y, w) that takes the CFG scale w as an input learns the teacher's guided velocity
    v_u + w (v_c - v_u) in one forward, for w ~ U[w_min, w_max] per sample, x_t = t x1 + (1 - t) x0 from data and
    fresh noise, t from the time sampler. Sampling it with scale w then costs one network call per step, not two.
    """

    def __init__(self, teacher: nn.Module, w_min: float = 1.0, w_max: float = 8.0,
                 time_sampler_name: str = "logit_normal") -> None:
        super().__init__()
        if not 0.0 <= w_min <= w_max:
            raise ConfigError(f"guidance range [{w_min}, {w_max}] is empty or negative; pass 0 <= "
                              "--options-guidance-min <= --options-guidance-max (e.g. 1 and 8)")
        if getattr(teacher, "guidance_conditioned", False):
            raise ConfigError("the teacher already takes w as an input; distil from a CFG teacher (a plain rf generator)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.sample_t = time_sampler(time_sampler_name)

    def train(self, mode: bool = True) -> GuidanceConditionedLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def target(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The CFG teacher's output v_u + w (v_c - v_u) for per-sample w (B,): one forward over the doubled batch."""
        return guided_velocity(self.teacher, xt, t, y, w)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        t = self.sample_t(x1.shape[0], device=x1.device)
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(x1.shape[0], device=x1.device)  # (B,)
        xt = interpolate(x0, x1, t)
        per = _mse(model(xt, t, y, w), self.target(xt, t, y, w))
        return LossOutput(per.mean(), per.detach(), t.detach())


def epsilon_from_velocity(xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The noise a velocity implies: x_t = t x1 + (1 - t) x0 and v = x1 - x0 give x_t = x0 + t v, so
    eps_hat = x0_hat = x_t - t v (the flow's epsilon-prediction; t (B,) or a scalar)."""
    t4 = torch.as_tensor(t, device=xt.device, dtype=xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
    return xt - t4 * v


SDS_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "uniform": lambda t: torch.ones_like(t),  # w(t) = 1
    "noise_variance": lambda t: (1 - t) ** 2,  # w(t) = sigma_t^2, DreamFusion's choice, with sigma_t = 1 - t here
}


class ScoreDistillation(nn.Module):
    """Score distillation sampling (Poole et al. 2022, "DreamFusion", Eq. 3) with a flow teacher.

    For an image x (any parametrisation x = g(theta)), t ~ U[t_min, t_max] (away from the ends, where the
    teacher's epsilon is degenerate) and eps ~ N(0, I): x_t = t x + (1 - t) eps, eps_hat = x_t - t v_cfg(x_t, t, y)
    (:func:`epsilon_from_velocity`), and grad_x = w(t) (eps_hat - eps), the teacher's Jacobian skipped. Calling the
    module returns the surrogate sum(grad.detach() * x), whose gradient with respect to x is exactly that.
    """

    def __init__(self, teacher: nn.Module, guidance: float = 100.0, t_min: float = 0.02, t_max: float = 0.98,
                 weighting: str = "uniform") -> None:
        super().__init__()
        if not 0.0 < t_min < t_max < 1.0:
            raise ConfigError(f"SDS draws t in (t_min, t_max) strictly inside (0, 1), got [{t_min}, {t_max}]; "
                              "pass e.g. --t-min 0.02 --t-max 0.98")
        if weighting not in SDS_WEIGHTINGS:
            raise unknown_choice("SDS weighting", weighting, SDS_WEIGHTINGS)
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance, self.t_min, self.t_max = float(guidance), float(t_min), float(t_max)
        self.weight = SDS_WEIGHTINGS[weighting]

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.rand(n, device=device)

    @torch.no_grad()
    def gradient(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """w(t) (eps_hat - eps) for images x (B, 3, H, W) at times t (B,) with noise eps (B, 3, H, W)."""
        xt = interpolate(eps, x, t)  # x is the data end (t = 1), eps the noise end
        v = guided_velocity(self.teacher, xt, t, y, self.guidance)
        return self.weight(t).view(-1, 1, 1, 1).to(x.dtype) * (epsilon_from_velocity(xt, t, v) - eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        t = self.sample_t(x.shape[0], device=x.device)
        grad = self.gradient(x.detach(), y, t, torch.randn_like(x))
        surrogate = (grad * x).flatten(1).sum(1)  # d/dx = grad
        return LossOutput(surrogate.sum(), grad.square().mean(dim=(1, 2, 3)), t)


# ------------------------------------------------------------------------------------------------------------------
# DMD2: a one-step student by distribution matching with an online fake score (issue 23).
# ------------------------------------------------------------------------------------------------------------------


def unet_bottleneck(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The middle-block features (B, C, H/2^L, W/2^L) of a :class:`~distill_rf_cifar.models.unet.ClassConditionalUNet`
    at (x, t, y): its down path and middle block only (:func:`encoder_levels`), with gradients to its weights and x."""
    from distill_rf_cifar.models.unet import TIME_SCALE

    m = unet.module if not hasattr(unet, "net") and hasattr(unet, "module") else unet
    if m.num_classes == 0:
        y = torch.zeros_like(y)
    return encoder_levels(m.net, x, t.to(x.dtype) * TIME_SCALE, y)[-1]


def one_step_sample(model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The one-step student's image: one Euler step from the noise, x = x0 + v(x0, 0, y) (B, 3, H, W)."""
    return x0 + model(x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype), y)


class DistributionMatchingLoss(nn.Module, LossHooks):
    """DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"), on the flow
    teacher, for a one-step student x = x0 + v_theta(x0, 0, y) started from the teacher's weights.

    Two score networks: the *real* score is the frozen teacher (queried at CFG scale ``guidance``); the *fake* score is
    a copy of the teacher trained online on the student's samples with the flow-matching loss
    ||v_fake(x_t, t, y) - (x - x0)||^2 (t from the teacher's time sampler), its own AdamW (gradient norm clipped to 1).
    The two time-scale update rule (DMD2 Sec. 4.2): after every optimiser step of the student the loop calls
    :meth:`after_step`, which takes ``fake_updates`` steps of the fake network (default 5; the first on the student's
    batch just made, the others on fresh samples of the updated student), so the fake score tracks the generator.

    Distribution-matching gradient (DMD, Yin et al. 2024 CVPR, Eq. 7-8), in this package's convention
    x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data): draw t ~ U[t_min, t_max] and eps ~ N(0, I), x_t = t x +
    (1 - t) eps, predict the clean image of each score network as the end one Euler step reaches,
    x_hat = x_t + (1 - t) v(x_t, t, y), and take

        grad = (x_hat_fake - x_hat_real) / mean_{C,H,W} |x - x_hat_real|

    (the fake-minus-real score difference, normalised per image as DMD does). The student minimises
    0.5 * mean_{C,H,W} (x - sg(x - grad))^2, whose gradient with respect to x is grad / (C H W): it moves x towards the
    teacher's prediction and away from the fake one. Neither score network receives a gradient from this loss.

    Optional GAN term (DMD2 Sec. 4.3), ``gan_weight > 0``: a small head (:class:`DiscriminatorHead`: conv, class
    projection) on the fake network's bottleneck (:func:`unet_bottleneck`) classifies noised real CIFAR-10 images
    against noised student samples (t ~ U[t_min, t_max] for both). Non-saturating losses (Goodfellow et al. 2014):
    the student adds gan_weight * softplus(-D(x_t^fake)); the fake network and head add
    gan_d_weight * [softplus(D(fake)) + softplus(-D(real))] to their flow-matching loss in each fake update.
    Batches: CIFAR-10 images ``{"x1", "y"}``: the labels drive the student's classes, the images are the GAN's reals.
    """

    def __init__(self, teacher: nn.Module, *, fake_updates: int = 5, fake_learning_rate: float = 2e-4,
                 guidance: float = 1.0, t_min: float = 0.02, t_max: float = 0.98,
                 time_sampler_name: str = "logit_normal", gan_weight: float = 0.0, gan_d_weight: float = 0.01,
                 head_channels: int = 32, seed: int = 0) -> None:
        super().__init__()
        import copy

        if fake_updates < 1:
            raise ConfigError(f"DMD2 updates the fake score >= 1 time per generator step, got {fake_updates}; "
                              "pass --options-dmd-fake-updates 5")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ConfigError(f"DMD draws t in [t_min, t_max] inside [0, 1], got [{t_min}, {t_max}]; pass e.g. "
                              "--options-dmd-t-min 0.02 --options-dmd-t-max 0.98")
        if not (fake_learning_rate > 0 and gan_weight >= 0 and gan_d_weight >= 0 and guidance >= 0):
            raise ConfigError("DMD2 needs --options-dmd-fake-learning-rate > 0, --options-dmd-gan-weight >= 0, "
                              "--options-dmd-gan-d-weight >= 0 and a CFG scale >= 0")
        self.real = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.fake_updates, self.guidance = int(fake_updates), float(guidance)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.sample_t = time_sampler(time_sampler_name)
        self.gan_weight, self.gan_d_weight = float(gan_weight), float(gan_d_weight)
        self.head: nn.Module | None = None
        if self.gan_weight > 0:
            with torch.no_grad():
                probe = torch.zeros(1, 3, teacher.resolution, teacher.resolution)
                channels = unet_bottleneck(self.fake, probe, torch.zeros(1), torch.zeros(1, dtype=torch.long)).shape[1]
            with torch.random.fork_rng(devices=[]):  # the head's initial weights depend on ``seed`` only
                torch.manual_seed(seed)
                self.head = DiscriminatorHead(channels, head_channels, _null_class(teacher) + 1)
        params = [*self.fake.parameters(), *(self.head.parameters() if self.head is not None else [])]
        self.fake_optimizer = torch.optim.AdamW(params, lr=fake_learning_rate, weight_decay=0.0)
        self.fake_steps_done = 0  # fake-network optimiser steps so far (checkpointed)
        self._pending: tuple[torch.Tensor, ...] | None = None
        self._autocast: tuple[str, bool, torch.dtype] | None = None

    def train(self, mode: bool = True) -> DistributionMatchingLoss:
        super().train(mode)
        self.real.eval()
        return self

    def _draw_t(self, n: int, device: torch.device) -> torch.Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.rand(n, device=device)

    @torch.no_grad()
    def dmd_gradient(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(x_hat_fake - x_hat_real) / mean |x - x_hat_real| (B, 3, H, W), fp32, for samples x at times t (B,)."""
        xt = interpolate(eps, x, t)
        rest = (1 - t).view(-1, *([1] * (x.dim() - 1))).float()
        x_real = xt.float() + rest * guided_velocity(self.real, xt, t, y, self.guidance).float()
        was_training = self.fake.training
        self.fake.eval()  # its prediction, not a dropout sample of it
        try:
            x_fake = xt.float() + rest * self.fake(xt, t, y).float()
        finally:
            self.fake.train(was_training)
        norm = (x.float() - x_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-6)
        return torch.nan_to_num((x_fake - x_real) / norm)

    def discriminate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """GAN logits (B,) of images x: noised to t ~ U[t_min, t_max], the fake network's bottleneck, the head."""
        assert self.head is not None
        t = self._draw_t(x.shape[0], x.device)
        xt = interpolate(torch.randn_like(x), x, t)
        return self.head(unet_bottleneck(self.fake, xt, t, y).float(), y)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        real, y = batch["x1"], batch["y"]
        device_type = real.device.type
        self._autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        x = one_step_sample(model, torch.randn_like(real), y)  # (B, 3, H, W), the student's images
        t = self._draw_t(x.shape[0], x.device)
        grad = self.dmd_gradient(x.detach(), y, t, torch.randn_like(x))
        dmd = 0.5 * (x.float() - (x.detach().float() - grad)).square().mean(dim=(1, 2, 3))  # d/dx = grad / (C H W)
        per, metrics = dmd, {"loss_dmd": dmd.detach().mean(), "dmd_grad_rms": grad.square().mean().sqrt()}
        if self.head is not None:
            frozen = [p for p in (*self.fake.parameters(), *self.head.parameters()) if p.requires_grad]
            for p in frozen:  # the student's step must not train the fake network or the head
                p.requires_grad_(False)
            try:
                g_gan = F.softplus(-self.discriminate(x, y))  # (B,) non-saturating generator loss
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            per = per + self.gan_weight * g_gan
            metrics["loss_g_gan"] = g_gan.detach().mean()
        self._pending = (x.detach(), y, real)
        return LossOutput(per.mean(), per.detach(), t.detach(), metrics)

    def fake_step(self, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor | None = None) -> dict[str, float]:
        """One AdamW step of the fake score (and GAN head) on student samples x (flow matching, + the GAN term)."""
        x = x.detach()
        device_type, enabled, dtype = self._autocast or (x.device.type, False, torch.float32)
        self.fake.train()
        self.fake_optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            x0 = torch.randn_like(x)
            t = self.sample_t(x.shape[0], device=x.device)
            loss_fake = _mse(self.fake(interpolate(x0, x, t), t, y), velocity_target(x0, x)).mean()
            total, stats = loss_fake, {"loss_fake": float(loss_fake.detach())}
            if self.head is not None and real is not None:
                fake_logits, real_logits = self.discriminate(x, y), self.discriminate(real, y)
                loss_d = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
                total = total + self.gan_d_weight * loss_d
                stats.update({"loss_d_gan": float(loss_d.detach()),
                              "d_acc_real": float((real_logits.detach() > 0).float().mean()),
                              "d_acc_fake": float((fake_logits.detach() < 0).float().mean())})
        total.backward()
        params = [p for group in self.fake_optimizer.param_groups for p in group["params"]]
        _all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.fake_optimizer.step()
        self.fake_optimizer.zero_grad(set_to_none=True)
        self.fake_steps_done += 1
        return stats

    def after_step(self, model: nn.Module) -> dict[str, float]:
        """The two time-scale update: ``fake_updates`` fake-score steps after each student step."""
        if self._pending is None:
            return {}
        x, y, real = self._pending
        self._pending = None
        device_type, enabled, dtype = self._autocast or (x.device.type, False, torch.float32)
        stats: dict[str, list[float]] = {}
        for i in range(self.fake_updates):
            if i > 0:  # fresh samples of the student as it is now
                with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    x = one_step_sample(model, torch.randn_like(x), y).float()
            for k, v in self.fake_step(x, y, real).items():
                stats.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def extra_weights(self) -> dict[str, torch.Tensor]:
        out = {f"fake.{k}": v for k, v in self.fake.state_dict().items()}
        if self.head is not None:
            out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    def load_extra_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fake.load_state_dict({k.removeprefix("fake."): v for k, v in tensors.items() if k.startswith("fake.")})
        if self.head is not None:
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})

    def extra_state(self) -> dict[str, Any]:
        return {"fake_optimizer": self.fake_optimizer.state_dict(), "fake_steps_done": self.fake_steps_done}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "fake_optimizer" in state:
            self.fake_optimizer.load_state_dict(state["fake_optimizer"])
        self.fake_steps_done = int(state.get("fake_steps_done", 0))
