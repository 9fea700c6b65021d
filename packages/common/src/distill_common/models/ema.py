"""Exponential moving average of model weights (Polyak & Juditsky 1992; the warm-up of Tarvainen & Valpola 2017 and
Karras et al. 2022), bound to a module by parameter name, on top of ``diffusers.training_utils.EMAModel``.

At update ``n`` (1-based) with ``s = n - 1 - update_after_step``, the decay is 0 for ``s <= 0`` (the average starts
as a copy of the weights), else ``max(min_decay, min(decay, w(s)))`` with ``w(s) = (1 + s) / (10 + s)`` or, with
``use_ema_warmup``, ``w(s) = 1 - (1 + s / inv_gamma) ** -power``. Each update is
``shadow <- decay * shadow + (1 - decay) * param`` for trainable parameters; frozen ones are copied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ConfigError, ModelLoadError

_SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


class EMA:
    """An EMA of ``model``'s parameters (all of them, or only the trainable ones, e.g. a LoRA's).

    ``update(model)`` after each optimiser step; ``with ema.swapped_in(model):`` to evaluate with the averaged
    weights; ``state_dict``/``load_state_dict`` (or ``save``/``load`` as safetensors) for an exact resume.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.9999,
        *,
        only_trainable: bool = False,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        foreach: bool = False,
    ) -> None:
        from diffusers.training_utils import EMAModel

        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1], got {decay}; use e.g. --ema-decay 0.999")
        self.names = [n for n, p in model.named_parameters() if p.requires_grad or not only_trainable]
        if not self.names:
            raise ConfigError("the model has no parameters to average; unfreeze some or set only_trainable=False")
        self._ema = EMAModel(
            self._parameters(model),
            decay=float(decay),
            min_decay=float(min_decay),
            update_after_step=int(update_after_step),
            use_ema_warmup=bool(use_ema_warmup),
            inv_gamma=inv_gamma,
            power=power,
            foreach=foreach,
        )

    def _parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ConfigError(
                f"the model lacks {len(missing)} parameters the EMA tracks (first: {missing[0]}); "
                "pass the same architecture the EMA was created from"
            )
        return [named[n] for n in self.names]

    @property
    def num_updates(self) -> int:
        return self._ema.optimization_step

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter name (references, not copies)."""
        return dict(zip(self.names, self._ema.shadow_params, strict=True))

    def decay_at(self, update: int) -> float:
        """The decay used by the ``update``-th call of :meth:`update` (1-based)."""
        return self._ema.get_decay(update)

    def update(self, model: torch.nn.Module) -> float:
        """Fold the current weights into the average; returns the decay this update used."""
        self._ema.step(self._parameters(model))
        return float(self._ema.cur_decay_value)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters with the averaged ones."""
        self._ema.copy_to(self._parameters(model))

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into ``model`` (e.g. for evaluation); restores the live ones after."""
        params = self._parameters(model)
        self._ema.store(params)
        self._ema.copy_to(params)
        try:
            yield model
        finally:
            self._ema.restore(params)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EMA:
        self._ema.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Scalars, parameter names and cloned averaged tensors: everything an exact resume needs."""
        state = {k: getattr(self._ema, k) for k in _SCALARS}
        state["names"] = list(self.names)
        state["shadow_params"] = [t.detach().clone() for t in self._ema.shadow_params]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = list(state.get("names", self.names))
        if names != self.names:
            raise ModelLoadError(
                "the EMA state tracks different parameters than this model "
                f"({len(names)} saved vs {len(self.names)} here); resume with the same model and only_trainable setting"
            )
        shadows = state.get("shadow_params")
        if shadows is not None:
            for saved, current in zip(shadows, self._ema.shadow_params, strict=True):
                if saved.shape != current.shape:
                    raise ModelLoadError(
                        f"EMA tensor shape {tuple(saved.shape)} != model's {tuple(current.shape)}; "
                        "resume with the same architecture"
                    )
        device = self._ema.shadow_params[0].device
        self._ema.load_state_dict({k: v for k, v in state.items() if k != "names"})
        self._ema.to(device=device)

    def save(self, path: str | Path) -> Path:
        """Write the EMA as a safetensors file (tensors by parameter name; scalars in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        scalars = {k: getattr(self._ema, k) for k in _SCALARS}
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self.shadow.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"ema": json.dumps(scalars), "names": json.dumps(self.names)})
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> None:
        """Restore an EMA written by :meth:`save` (exact: same averages, same update count)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"EMA file {path} does not exist; pass the ema.safetensors written by EMA.save")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if "ema" not in meta or "names" not in meta:
                raise ModelLoadError(f"{path} is not an EMA file written by EMA.save (no 'ema' metadata)")
            names = json.loads(meta["names"])
            tensors = [handle.get_tensor(n) for n in names]
        self.load_state_dict({**json.loads(meta["ema"]), "names": names, "shadow_params": tensors})
