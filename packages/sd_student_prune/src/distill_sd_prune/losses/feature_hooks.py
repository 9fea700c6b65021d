"""Forward hooks that record the outputs of named blocks, for feature distillation (BK-SDM's feature KD).

Names are resolved on the *unwrapped* model: DDP / DataParallel / Accelerate keep the real network under
``.module`` and ``torch.compile`` under ``._orig_mod``, so ``down_blocks.0``, ``module.down_blocks.0`` and
``module._orig_mod.down_blocks.0`` all name the same block, whichever of the wrapped or bare model is passed.
Hooks live on the block objects themselves, so calling the wrapper's forward records them as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distill_common.errors import ConfigError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / Accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")
            and hasattr(model, "module")
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model`` (wrapped or not; wrapper prefixes in ``name`` are ignored)."""
    modules = dict(unwrap_model(model).named_modules())
    clean = strip_wrapper_prefixes(name)
    if clean in modules:
        return modules[clean]
    close = [n for n in modules if n and (n.endswith(clean) or clean.endswith(n))][:5]
    hint = f" (close: {', '.join(close)})" if close else ""
    raise ConfigError(
        f"no module named {name!r} in {type(unwrap_model(model)).__name__}; "
        f"pass block names like 'down_blocks.0' or 'up_blocks.1'{hint}"
    )


def output_tensor(output: Any) -> torch.Tensor:
    """The main hidden state of a block's output: a tensor, the first item of a tuple, or ``.sample``."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "sample") and torch.is_tensor(output.sample):
        return output.sample
    if isinstance(output, dict) and "sample" in output:
        return output["sample"]
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"cannot take a feature tensor from a block output of type {type(output).__name__}")


class FeatureRecorder:
    """Records ``{name: output tensor}`` of the named blocks on every forward of ``model``.

    ``detach=True`` for a frozen teacher. ``clear()`` before a forward, read ``features`` after, ``remove()``
    (or use it as a context manager) to take the hooks off.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, detach: bool = False) -> None:
        self.names = [strip_wrapper_prefixes(n) for n in names]
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [resolve_module(model, n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = output_tensor(output)
            self.features[name] = tensor.detach() if self.detach else tensor

        return record

    def clear(self) -> None:
        self.features = {}

    def missing(self) -> list[str]:
        return [n for n in self.names if n not in self.features]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@contextmanager
def recording(model: nn.Module, names: Iterable[str], *, detach: bool = False) -> Iterator[FeatureRecorder]:
    recorder = FeatureRecorder(model, names, detach=detach)
    try:
        yield recorder
    finally:
        recorder.remove()
