"""The reference text-to-image model's training tasks for :func:`~distill_common.reference_sd.training.train_component`.

- :class:`VAETask`: SD's first stage (Rombach et al. 2022, Sec. 3.1 / Appendix G): L1 reconstruction, an optional
  perceptual (LPIPS) term and a 1e-6-weighted KL to N(0, I). At export the latent scaling factor is set to
  1 / std of the scaled latents over the data, as SD 1.5's 0.18215 was chosen. With ``decoder_only`` the
  encoder (and so the latent space a UNet was trained on) stays frozen and only the decoder is fine-tuned, as
  Stability's ft-EMA / ft-MSE decoders were for SD 1.x; the scaling factor is then kept.
- :class:`UNetTask`: SD's epsilon-prediction objective on the frozen VAE's latents (Ho et al. 2020), SD 1.5's
  scaled-linear betas, Min-SNR-gamma loss weighting (Hang et al. 2023), and caption dropout for classifier-free
  guidance (Ho & Salimans 2022). The CLIP text encoder is trained jointly with the UNet (it starts from random
  weights: no CLIP weights exist offline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from distill_common.models.tiny_sd import SD15_SCHEDULER_CONFIG


def flip_some(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip a random half of the batch horizontally."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


class VAETask:
    name = "vae"

    def __init__(self, vae, images_uint8: torch.Tensor, *, perceptual: Callable | None = None,
                 perceptual_weight: float = 1.0, kl_weight: float = 1e-6, decoder_only: bool = False) -> None:
        self.vae = vae
        self.images = images_uint8  # (N, 3, 32, 32) uint8
        self.perceptual, self.perceptual_weight, self.kl_weight = perceptual, perceptual_weight, kl_weight
        self.decoder_only = decoder_only
        if decoder_only:
            for frozen in (vae.encoder, getattr(vae, "quant_conv", None)):
                if frozen is not None:
                    frozen.requires_grad_(False)
        self.modules = {"vae": vae}

    def loss(self, generator: torch.Generator, batch_size: int):
        idx = torch.randint(len(self.images), (batch_size,), generator=generator)
        x = flip_some(uint8_to_unit(self.images[idx]), generator)
        with torch.set_grad_enabled(not self.decoder_only and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        rec = self.vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        kl = posterior.kl().float().mean()
        total = l1 if self.decoder_only else l1 + self.kl_weight * kl
        parts = {"l1": l1.item(), "kl": kl.item()}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(rec, x).float().mean()
            total = total + self.perceptual_weight * p
            parts["lpips"] = p.item()
        return total, parts

    @torch.no_grad()
    def latent_std(self, n: int = 4096, batch: int = 256) -> float:
        """Std of the unscaled latent samples over ``n`` training images (SD's scaling factor is 1 / this)."""
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(self.images), generator=g)[:n]
        zs = []
        for i in range(0, len(idx), batch):
            post = self.vae.encode(uint8_to_unit(self.images[idx[i:i + batch]])).latent_dist
            zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
        return float(torch.cat(zs).std())

    def export(self, folder: Path) -> None:
        if not self.decoder_only:  # a frozen encoder keeps the latent space, and the scaling its UNet was trained with
            std = self.latent_std()
            self.vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)


class UNetTask:
    name = "unet"

    def __init__(self, unet, text_encoder, latent_moments: torch.Tensor, labels: torch.Tensor,
                 caption_ids: torch.Tensor, empty_ids: torch.Tensor, *, scaling_factor: float,
                 caption_dropout: float = 0.1, min_snr_gamma: float = 5.0,
                 train_text_encoder: bool = True) -> None:
        """``latent_moments``: (N, 8, h, w) VAE posterior mean and log-variance of each training image (and its
        flip, as separate rows); ``labels`` (N,); ``caption_ids`` (classes, templates, 77) token ids;
        ``empty_ids`` (77,) the unconditional (empty) caption."""
        from diffusers import DDPMScheduler

        self.unet, self.text_encoder = unet, text_encoder
        self.moments, self.labels = latent_moments, labels
        self.caption_ids, self.empty_ids = caption_ids, empty_ids
        self.scaling_factor, self.caption_dropout, self.min_snr_gamma = scaling_factor, caption_dropout, min_snr_gamma
        text_encoder.requires_grad_(train_text_encoder)
        self.modules = {"unet": unet, "text_encoder": text_encoder}
        sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items()
                                 if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                          "prediction_type")})
        self.alphas_cumprod = sched.alphas_cumprod.float()
        self.num_train_timesteps = sched.config.num_train_timesteps

    def loss(self, generator: torch.Generator, batch_size: int):
        idx = torch.randint(len(self.moments), (batch_size,), generator=generator)
        mean, logvar = self.moments[idx].float().chunk(2, dim=1)
        z0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)) * self.scaling_factor
        labels = self.labels[idx]
        template = torch.randint(self.caption_ids.shape[1], (batch_size,), generator=generator)
        ids = self.caption_ids[labels, template]
        drop = torch.rand(batch_size, generator=generator) < self.caption_dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        t = torch.randint(self.num_train_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        ab = self.alphas_cumprod[t][:, None, None, None]
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        context = self.text_encoder(ids)[0]
        pred = self.unet(zt, t, context).sample.float()
        per_image = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        snr = ab.flatten() / (1 - ab.flatten())
        weight = torch.clamp(snr, max=self.min_snr_gamma) / snr if self.min_snr_gamma > 0 else torch.ones_like(snr)
        loss = (weight * per_image).mean()
        return loss, {"mse": per_image.mean().item()}

    def export(self, folder: Path) -> None:
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)


@torch.no_grad()
def encode_moments(vae, images_uint8: torch.Tensor, batch: int = 256, *, flips: bool = False, bf16: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """VAE posterior (mean, logvar) of every image, and of its horizontal flip when ``flips``: (N or 2N, 8, h, w)
    in fp16 (latents of a 32 px image are 16x16x4)."""
    out: list[torch.Tensor] = []
    views: Sequence[bool] = (False, True) if flips else (False,)
    total, done = len(images_uint8) * len(views), 0
    for flip in views:
        for i in range(0, len(images_uint8), batch):
            x = uint8_to_unit(images_uint8[i:i + batch])
            if flip:
                x = x.flip(-1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                post = vae.encode(x).latent_dist
            out.append(torch.cat([post.mean.float(), post.logvar.float()], dim=1).half())
            done += len(x)
            if progress is not None:
                progress(done, total)
    return torch.cat(out)
