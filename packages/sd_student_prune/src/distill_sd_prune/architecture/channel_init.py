"""Initialise a narrower student from the teacher's tensors: "teacher-to-student slicing" (the seed's V2.1) or
an orthonormal channel projection (the seed's V1), both written as one operation.

Every channel axis of a student tensor gets a matrix ``P`` (student channels x teacher channels) and the
student tensor is the teacher's with ``P`` applied along each axis: ``W_s = P_out W_t P_in^T`` for a conv or
linear weight, ``b_s = P_out b_t`` for a bias, and the row-normalised ``P**2`` (a weighted mean) for
normalisation scales and shifts. ``slice`` uses a selection matrix (keep the leading channels); ``project``
averages contiguous groups of teacher channels with orthonormal rows (entries ``1/sqrt(group size)``). Where a
student axis is as wide as the teacher's, ``P`` is the identity, so an equal-width student reproduces the
teacher exactly.

Axes are cut per *segment* where channels are not interchangeable:

- attention ``to_q/to_k/to_v`` outputs and ``to_out`` inputs per head (the student keeps the number of heads
  and narrows each head);
- the GEGLU projection's output as its two halves (value, gate);
- the input of an up-block ResNet as ``[hidden, skip]`` (the concatenation of the up path and the skip
  connection);
- the sinusoidal timestep features (``[cos | sin]`` halves): a student half of ``h_s`` frequencies takes, for
  each of its frequencies ``f_j = 10000^(-j / (h_s - shift))``, the teacher feature with the nearest
  frequency, which is the *same* frequency when ``h_t`` is a multiple of ``h_s`` and the shift is 0 (SD's
  case): slicing is then exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill_common.errors import ModelLoadError, unknown_choice

INIT_METHODS = ("slice", "project", "random")
_AFFINE = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Segment:
    """A run of ``teacher`` channels that becomes ``student`` channels; ``kind`` is 'channels' or
    'sinusoid'."""

    teacher: int
    student: int
    kind: str = "channels"


def channel_matrix(
    teacher: int, student: int, method: str, kind: str = "channels", freq_shift: float = 0.0
) -> torch.Tensor:
    """The (student, teacher) matrix of one segment."""
    if student > teacher:
        raise ModelLoadError(
            f"a student axis ({student}) is wider than the teacher's ({teacher}); widths must be <= 1"
        )
    if student == teacher:
        return torch.eye(teacher)
    out = torch.zeros(student, teacher)
    if kind == "sinusoid":  # nearest teacher frequency for each student frequency
        ratio = (teacher - freq_shift) / max(student - freq_shift, 1e-9)
        idx = [min(teacher - 1, int(round(j * ratio))) for j in range(student)]
        out[torch.arange(student), torch.tensor(idx)] = 1.0
        return out
    if method == "slice":
        out[torch.arange(student), torch.arange(student)] = 1.0
        return out
    if method == "project":
        for row, group in enumerate(torch.tensor_split(torch.arange(teacher), student)):
            out[row, group] = 1.0 / math.sqrt(len(group))
        return out
    raise unknown_choice("channel init method", method, INIT_METHODS)


def segments_matrix(segments: list[Segment], method: str, freq_shift: float = 0.0) -> torch.Tensor:
    return torch.block_diag(
        *[channel_matrix(s.teacher, s.student, method, s.kind, freq_shift) for s in segments]
    )


def _single(t: int, s: int) -> list[Segment]:
    return [Segment(t, s)]


def _split(t_parts: list[int], s_parts: list[int], kind: str = "channels") -> list[Segment]:
    return [Segment(t, s, kind) for t, s in zip(t_parts, s_parts, strict=True)]


@dataclass
class _UNetInfo:
    """What the segment rules need to know about one UNet."""

    modules: dict[str, nn.Module]
    channels: list[int]

    @classmethod
    def of(cls, unet: nn.Module) -> _UNetInfo:
        return cls(dict(unet.named_modules()), [int(c) for c in unet.config.block_out_channels])

    def up_resnet_hidden(self, block: int, index: int) -> int:
        """Channels of the up path entering ResNet ``index`` of up block ``block`` (the rest is the skip)."""
        n = len(self.channels)
        out = self.channels[n - 1 - block]
        prev = self.channels[n - block] if block > 0 else self.channels[n - 1]
        return prev if index == 0 else out


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _up_resnet(name: str) -> tuple[int, int] | None:
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "up_blocks" and parts[2] == "resnets":
        return int(parts[1]), int(parts[3])
    return None


def axis_segments(
    module_name: str,
    axis: str,
    s_info: _UNetInfo,
    t_info: _UNetInfo,
    t_module_name: str,
    t_size: int,
    s_size: int,
) -> list[Segment]:
    """Segments of one axis ('out', 'in' or 'channels') of a student module and its teacher counterpart."""
    leaf = module_name.rsplit(".", 1)[-1]
    if (
        axis == "out"
        and leaf in ("to_q", "to_k", "to_v")
        or axis == "in"
        and module_name.endswith("to_out.0")
    ):
        attn_name = (
            _parent(module_name) if leaf in ("to_q", "to_k", "to_v") else _parent(_parent(module_name))
        )
        t_attn = (
            _parent(t_module_name) if leaf in ("to_q", "to_k", "to_v") else _parent(_parent(t_module_name))
        )
        heads = getattr(s_info.modules.get(attn_name), "heads", None)
        t_heads = getattr(t_info.modules.get(t_attn), "heads", None)
        if heads and heads == t_heads and t_size % heads == 0 and s_size % heads == 0:
            return _split([t_size // heads] * heads, [s_size // heads] * heads)
    if axis == "out" and module_name.endswith("ff.net.0.proj") and t_size % 2 == 0 and s_size % 2 == 0:
        return _split([t_size // 2] * 2, [s_size // 2] * 2)  # GEGLU: value and gate halves
    if axis == "in" and module_name == "time_embedding.linear_1" and t_size % 2 == 0 and s_size % 2 == 0:
        return _split([t_size // 2] * 2, [s_size // 2] * 2, kind="sinusoid")
    s_res, t_res = _up_resnet(module_name), _up_resnet(t_module_name)
    leaf_in_resnet = module_name.split(".")[4] if s_res and len(module_name.split(".")) > 4 else ""
    if (
        s_res
        and t_res
        and (
            (axis == "in" and leaf_in_resnet in ("conv1", "conv_shortcut"))
            or (axis == "channels" and leaf_in_resnet == "norm1")
        )
    ):
        s_hidden, t_hidden = s_info.up_resnet_hidden(*s_res), t_info.up_resnet_hidden(*t_res)
        if 0 < s_hidden < s_size and 0 < t_hidden < t_size:
            return _split([t_hidden, t_size - t_hidden], [s_hidden, s_size - s_hidden])
    return _single(t_size, s_size)


def _apply(matrix: torch.Tensor, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    moved = tensor.movedim(dim, 0)
    out = torch.tensordot(matrix.to(tensor.dtype), moved, dims=1)
    return out.movedim(0, dim)


def _affine_matrix(matrix: torch.Tensor) -> torch.Tensor:
    squared = matrix**2
    return squared / squared.sum(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class TransferReport:
    """How each student tensor was initialised: copied unchanged, narrowed from the teacher, or left
    random."""

    method: str
    copied: list[str] = field(default_factory=list)
    narrowed: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"copied": len(self.copied), "narrowed": len(self.narrowed), "random": len(self.random)}


def narrow_tensor(
    teacher_tensor: torch.Tensor,
    student_shape: torch.Size,
    module: nn.Module,
    attr: str,
    segments: Mapping[str, list[Segment]],
    method: str,
    freq_shift: float,
) -> torch.Tensor:
    """The teacher tensor mapped to ``student_shape`` through the per-axis channel matrices."""
    out = teacher_tensor.detach().float()
    if isinstance(module, _AFFINE):
        return _apply(_affine_matrix(segments_matrix(segments["channels"], method, freq_shift)), out, 0)
    out = _apply(segments_matrix(segments["out"], method, freq_shift), out, 0)
    if attr == "weight" and out.dim() >= 2:
        out = _apply(segments_matrix(segments["in"], method, freq_shift), out, 1)
    if tuple(out.shape) != tuple(student_shape):
        raise ModelLoadError(
            f"narrowing {attr} of {type(module).__name__} gave {tuple(out.shape)}, expected "
            f"{tuple(student_shape)}; this layer type is not supported by channel init"
        )
    return out


def transfer_teacher_weights(
    student: nn.Module, teacher: nn.Module, parameter_map: Mapping[str, str], method: str = "slice"
) -> TransferReport:
    """Fill ``student``'s parameters from ``teacher`` through ``parameter_map`` (student name -> teacher
    name).

    Equal shapes are copied; narrower ones are sliced or projected (see the module docstring); ``random``
    keeps the student's own random initialisation everywhere.
    """
    if method not in INIT_METHODS:
        raise unknown_choice("channel init method", method, INIT_METHODS)
    report = TransferReport(method)
    s_state = student.state_dict()
    if method == "random":
        report.random = list(s_state)
        return report
    t_state = teacher.state_dict()
    s_info, t_info = _UNetInfo.of(student), _UNetInfo.of(teacher)
    freq_shift = float(getattr(teacher.config, "freq_shift", 0) or 0)
    new_state: dict[str, torch.Tensor] = {}
    for name, s_tensor in s_state.items():
        t_name = parameter_map.get(name, name)
        if t_name not in t_state:
            raise ModelLoadError(
                f"student tensor {name} maps to {t_name}, which the teacher lacks; the prune plan does "
                "not fit this teacher's architecture"
            )
        t_tensor = t_state[t_name]
        if t_tensor.shape == s_tensor.shape:
            new_state[name] = t_tensor.detach().clone()
            report.copied.append(name)
            continue
        module_name, attr = name.rsplit(".", 1)
        t_module_name = t_name.rsplit(".", 1)[0]
        module = s_info.modules[module_name]
        if t_tensor.dim() != s_tensor.dim():
            raise ModelLoadError(
                f"{name} has {s_tensor.dim()} dims but the teacher's {t_name} has {t_tensor.dim()}"
            )
        if isinstance(module, _AFFINE):
            segments = {
                "channels": axis_segments(
                    module_name,
                    "channels",
                    s_info,
                    t_info,
                    t_module_name,
                    t_tensor.shape[0],
                    s_tensor.shape[0],
                )
            }
        else:
            segments = {
                "out": axis_segments(
                    module_name, "out", s_info, t_info, t_module_name, t_tensor.shape[0], s_tensor.shape[0]
                )
            }
            if t_tensor.dim() >= 2:
                segments["in"] = axis_segments(
                    module_name, "in", s_info, t_info, t_module_name, t_tensor.shape[1], s_tensor.shape[1]
                )
        new_state[name] = narrow_tensor(
            t_tensor, s_tensor.shape, module, attr, segments, method, freq_shift
        ).to(s_tensor.dtype)
        report.narrowed.append(name)
    student.load_state_dict(new_state)
    return report


def channel_projection_matrix(teacher_channels: int, student_channels: int, method: str) -> torch.Tensor:
    """The (student, teacher) matrix that maps a teacher feature map's channels to the student's (single
    segment)."""
    return channel_matrix(teacher_channels, student_channels, "slice" if method == "random" else method)


def describe(report: TransferReport) -> dict[str, Any]:
    return {"method": report.method, **report.counts()}
