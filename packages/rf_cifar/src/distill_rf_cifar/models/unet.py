"""A compact class-conditional UNet for 32x32 images: diffusers' ``UNet2DModel`` (the DDPM layout of Ho et al.
2020: residual blocks, optional self-attention per resolution, sinusoidal time embedding) with a learned class
embedding added to the time embedding. Label ``num_classes`` is the null class that classifier-free guidance
(Ho & Salimans 2022) trains by label dropout.

Sizes (fp32 weights): the default (64 channels, multipliers 1-1-2, one block per level, attention at 16 px)
has 3,085,827 parameters = 12.3 MB, the size of the seed project's teacher; the smoke preset 264,307 (1.1 MB);
the cpu preset 1,065,059 (4.3 MB); the paper preset is DDPM's CIFAR-10 network, 35,751,939 (143 MB).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distill_rf_cifar.config import UNetConfig

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as the DDPM timestep t * 1000
GUIDANCE_SCALE = 100.0  # w in [1, ~15] is embedded like a timestep w * 100 (sinusoidal, then an MLP)


class ClassConditionalUNet(nn.Module):
    """``forward(x (B, 3, 32, 32), t (B,) in [0, 1], y (B,) in 0..num_classes[, w (B,)]) -> (B, 3, 32, 32)`` velocity.

    With ``guidance_embedding=True`` the network also takes the CFG scale w (Meng et al. 2023, "On Distillation of
    Guided Diffusion Models", stage one): a sinusoidal embedding of w and an MLP, added to the time + class
    embedding. Its last layer starts at zero, so a freshly converted teacher (:func:`with_guidance_embedding`) is
    exactly the teacher's conditional model for every w. This flag is not part of :class:`UNetConfig` (whose hash
    identifies trained teachers); ``generator.json`` records it as ``guidance_conditioned``.
    """

    def __init__(self, cfg: UNetConfig, resolution: int = 32, guidance_embedding: bool = False) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        cfg.validate()
        self.config = dataclasses.replace(cfg)
        self.resolution = resolution
        self.num_classes = cfg.num_classes
        self.null_class = cfg.num_classes  # the extra embedding row used for the unconditional branch
        down, up = [], []
        size = resolution
        for _ in cfg.channel_mults:
            attn = size in cfg.attention_resolutions
            down.append("AttnDownBlock2D" if attn else "DownBlock2D")
            up.append("AttnUpBlock2D" if attn else "UpBlock2D")
            size //= 2
        self.net = UNet2DModel(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults),
            layers_per_block=cfg.res_blocks,
            down_block_types=tuple(down),
            up_block_types=tuple(reversed(up)),
            add_attention=cfg.mid_attention,
            attention_head_dim=None,  # one head per attention layer, as DDPM
            dropout=cfg.dropout,
            norm_num_groups=cfg.norm_groups,
            num_class_embeds=cfg.num_classes + 1,
        )
        self.guidance_conditioned = guidance_embedding
        self._w_emb: torch.Tensor | None = None
        if guidance_embedding:
            from diffusers.models.embeddings import TimestepEmbedding, Timesteps

            width, emb_dim = cfg.base_channels * cfg.channel_mults[0], self.net.time_embedding.linear_2.out_features
            self.guidance_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.guidance_embedding = TimestepEmbedding(width, emb_dim)
            nn.init.zeros_(self.guidance_embedding.linear_2.weight)  # start as the teacher's conditional model
            nn.init.zeros_(self.guidance_embedding.linear_2.bias)
            self.net.time_embedding.register_forward_hook(self._add_guidance)

    def _add_guidance(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if self._w_emb is None else output + self._w_emb.to(output.dtype)  # (B, emb_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(x.shape)}"
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if self.num_classes == 0:  # unconditional: every label is the null class
            y = torch.zeros_like(y)
        if not self.guidance_conditioned:
            assert w is None, "this UNet takes no guidance scale; build it with guidance_embedding=True"
            return self.net(x, t.to(x.dtype) * TIME_SCALE, class_labels=y).sample  # (B, 3, H, W)
        w = torch.ones(x.shape[0], device=x.device) if w is None else torch.as_tensor(w, device=x.device).float()
        w = w.expand(x.shape[0]) if w.dim() == 0 else w
        self._w_emb = self.guidance_embedding(self.guidance_proj(w * GUIDANCE_SCALE).to(x.dtype))  # (B, emb_dim)
        try:
            return self.net(x, t.to(x.dtype) * TIME_SCALE, class_labels=y).sample  # (B, 3, H, W)
        finally:
            self._w_emb = None


def with_guidance_embedding(model: ClassConditionalUNet) -> ClassConditionalUNet:
    """A guidance-conditioned copy of ``model`` (Meng et al. 2023): the same weights, plus a w-embedding whose
    output starts at zero, so it predicts the teacher's conditional velocity for every w until trained."""
    if model.guidance_conditioned:
        return model
    student = ClassConditionalUNet(model.config, model.resolution, guidance_embedding=True)
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_") for k in missing), (missing, unexpected)
    return student.to(next(model.parameters()).device)


def build_unet(cfg: UNetConfig, guidance_embedding: bool = False) -> ClassConditionalUNet:
    return ClassConditionalUNet(cfg, guidance_embedding=guidance_embedding)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
