"""Load Stable Diffusion (Rombach et al. 2022) components and pipelines from a hub id, a local diffusers folder or a
single-file checkpoint, failing fast with one actionable line when the hub is unreachable.

Hub ids are probed once with a short timeout before any download, so an offline machine fails in seconds instead
of retrying for minutes; with ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is used.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ModelLoadError, unknown_choice

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PROBE_TIMEOUT_S = 4.0
REFERENCE_NAME = "reference"  # the shipped reference text-to-image model (distill_common.reference_sd)
# A healthy CLIP tokenizer has ~49k tokens; an offline fallback can silently produce one with 2 or 3.
MIN_CLIP_TOKENS = 49000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Hub ids that were removed and the id that now holds the same weights (runwayml deleted its repo in 2024).
RENAMED_MODELS = {"runwayml/stable-diffusion-v1-5": SD15_MODEL_ID}
_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class SDComponents:
    """The five parts of a Stable Diffusion model; parts not asked for are None. ``source`` says where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 ** (VAE blocks - 1); SD's 8 when no VAE was loaded."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``kind`` is 'folder', 'file' or 'hub'; ``local_files_only`` for hub ids served from cache."""

    kind: str
    location: str
    local_files_only: bool = False


def _local_copy_hint(model: str) -> str:
    if model in RENAMED_MODELS:
        return (f"{model!r} was removed from the Hugging Face Hub and replaced by {RENAMED_MODELS[model]!r}: pass "
                f"--base-model {RENAMED_MODELS[model]} (or a local diffusers folder of it)")
    return (
        f"download it on a machine with internet access (`hf download {model} --local-dir DIR`), "
        "then pass the local diffusers folder DIR instead of the hub id"
    )


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now (read at call time, not at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub URL: ``$HF_ENDPOINT`` read now, else huggingface_hub's configured endpoint."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def probe_hub(repo_id: str, timeout_s: float = PROBE_TIMEOUT_S, revision: str | None = None) -> str:
    """One quick request for the repo's metadata: 'ok', 'missing' (no such repo or revision) or 'unreachable'.

    Runs in a daemon thread joined with ``timeout_s`` so a hanging DNS lookup or a silent server cannot block either.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    result: list[str] = []
    bugs: list[BaseException] = []
    api = HfApi(endpoint=hub_endpoint())

    def ask() -> None:
        try:
            api.model_info(repo_id, revision=revision, timeout=timeout_s)
            result.append("ok")
        except GatedRepoError:
            result.append("ok")  # reachable; from_pretrained reports the access problem with its own message
        except (RepositoryNotFoundError, RevisionNotFoundError):
            result.append("missing")
        except (TypeError, AttributeError, NameError) as exc:  # a programming error, not a network one
            bugs.append(exc)
        except Exception:  # noqa: BLE001 - any transport or server failure means "cannot reach the hub"
            result.append("unreachable")

    worker = threading.Thread(target=ask, daemon=True, name=f"hub-probe-{repo_id}")
    worker.start()
    worker.join(timeout_s + 1.0)
    if bugs:
        raise bugs[0]
    return result[0] if result else "unreachable"


def _in_hf_cache(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model_index.json", "unet/config.json"):
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


def resolve_model_source(model: str | os.PathLike, *, revision: str | None = None,
                         probe_timeout_s: float = PROBE_TIMEOUT_S,
                         cache_dir: str | os.PathLike | None = None) -> ModelSource:
    """Classify ``model`` as a local folder, a single-file checkpoint or a hub id, checking it can be loaded.

    A hub id is probed first (``probe_timeout_s``); offline or unreachable, a copy in the Hugging Face cache
    (``cache_dir``, default the standard one) is used with ``local_files_only``.

    Raises ModelLoadError (one line) for a missing path, an unreachable hub without a cached copy, or an unknown id.
    """
    text = os.fspath(model)
    if text == REFERENCE_NAME:
        from distill_common.reference_sd import reference_sd_folder

        if Path(text).is_dir():
            warnings.warn(f"'{text}' names the shipped reference model; the folder ./{text} here is ignored "
                          f"(pass ./{text} to load it)", stacklevel=2)
        return ModelSource("folder", str(reference_sd_folder()))
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"{text} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); "
                "pass a single-file Stable Diffusion checkpoint or a diffusers folder"
            )
        return ModelSource("file", str(path.resolve()))
    looks_like_path = (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or path.suffix.lower() in SINGLE_FILE_SUFFIXES
    )
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelLoadError(
            f"model {text!r} is neither an existing path nor a hub id like 'owner/name'; "
            "pass a diffusers folder, a .safetensors checkpoint or a Hugging Face model id"
        )
    if not hub_offline():
        status = probe_hub(text, probe_timeout_s, revision)
        if status == "ok":
            return ModelSource("hub", text)
        if status == "missing":
            if text in RENAMED_MODELS and not _in_hf_cache(text, revision, cache_dir):
                raise ModelLoadError(f"model {text!r} does not exist on the Hugging Face Hub any more; "
                                     f"{_local_copy_hint(text)}")
            raise ModelLoadError(
                f"model {text!r} (revision {revision or 'main'}) does not exist on the Hugging Face Hub; "
                "check the id or pass a local diffusers folder"
            )
        reason = f"the Hugging Face Hub did not answer a {probe_timeout_s:g} s probe"
    else:
        reason = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
    if _in_hf_cache(text, revision, cache_dir):
        return ModelSource("hub", text, local_files_only=True)
    raise ModelLoadError(f"cannot load model {text!r}: {reason} and it is not in the local cache; {_local_copy_hint(text)}")


def pipeline_class_name(model: str | os.PathLike, *, revision: str | None = None,
                        probe_timeout_s: float = PROBE_TIMEOUT_S, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The diffusers pipeline class a model declares in ``model_index.json`` (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ...); a single-file checkpoint or a folder without an index counts as SD.
    None when the hub copy's index cannot be read. Raises ModelLoadError like :func:`resolve_model_source`."""
    source = resolve_model_source(model, revision=revision, probe_timeout_s=probe_timeout_s, cache_dir=cache_dir)
    if source.kind == "file":
        return "StableDiffusionPipeline"
    if source.kind == "folder":
        index = Path(source.location) / "model_index.json"
        if not index.is_file():
            return "StableDiffusionPipeline"
        return json.loads(index.read_text()).get("_class_name")
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(source.location, revision=revision, cache_dir=cache_dir,
                                               local_files_only=source.local_files_only or hub_offline())
    except Exception:  # noqa: BLE001 - the loader reports an unreadable model with its own message
        return None
    return config.get("_class_name")


def _check_diffusers_folder(folder: Path, parts: Iterable[str], subfolders: Mapping[str, str]) -> None:
    has_index = (folder / "model_index.json").is_file()
    if not has_index and not (folder / subfolders["unet"] / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        raise ModelLoadError(
            f"{folder} is not a diffusers Stable Diffusion folder: expected model_index.json and the subfolders "
            f"unet/, vae/, text_encoder/, tokenizer/, scheduler/ (found: {', '.join(found) or 'nothing'}); "
            "pass the folder written by save_pretrained or `hf download`, or a single-file .safetensors checkpoint"
        )
    for part in parts:
        sub = folder / subfolders[part]
        if part == "tokenizer":  # vocab.json+merges.txt or tokenizer.json, depending on who saved it
            ok = sub.is_dir() and any(sub.iterdir())
        else:
            ok = (sub / ("scheduler_config.json" if part == "scheduler" else "config.json")).is_file()
        if not ok:
            raise ModelLoadError(
                f"{folder} has no usable {subfolders[part]}/ subfolder for the {part}; "
                "the diffusers folder is incomplete: re-save or re-download it"
            )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise unknown_choice("dtype", dtype, _DTYPE_NAMES)
    return _DTYPE_NAMES[dtype]


def check_tokenizer(tokenizer: Any, text_encoder: Any = None, *, model: str = "", expected_vocab: int | None = None) -> None:
    """Refuse a degenerate tokenizer: fewer tokens than min(text encoder vocab, 49,000).

    Offline, ``CLIPTokenizer.from_pretrained`` can fall back to a 2-token vocabulary without an error; every prompt then
    encodes to unknown tokens and generation silently ignores the text.
    """
    if tokenizer is None:
        return
    if expected_vocab is None and text_encoder is not None:
        expected_vocab = int(text_encoder.config.vocab_size)
    floor = min(expected_vocab, MIN_CLIP_TOKENS) if expected_vocab else MIN_CLIP_TOKENS
    if len(tokenizer) < floor:
        raise ModelLoadError(
            f"the tokenizer of {model or 'the model'} has only {len(tokenizer)} tokens "
            f"(the text encoder expects {expected_vocab or 'about 49408'}): its vocabulary files were not loaded; "
            "pass a complete local diffusers folder whose tokenizer/ holds vocab.json+merges.txt or tokenizer.json"
        )


def _text_encoder_vocab(folder: Path, subfolder: str) -> int | None:
    config = folder / subfolder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")


def _wrap_errors(model: str, what: str, fn: Callable[[], Any], offline_hint: bool) -> Any:
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return fn()
    except ModelLoadError:
        raise
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"cannot load the {what} of {model!r}: a file is missing from the local cache ({_first_line(exc)}); "
            f"{_local_copy_hint(model)}"
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        hint = _local_copy_hint(model) if offline_hint else "check that it is a complete Stable Diffusion model"
        raise ModelLoadError(f"cannot load the {what} of {model!r}: {_first_line(exc)}; {hint}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300].rstrip(".")


def _load_scheduler(location: str, subfolder: str, scheduler_cls: type | None, kwargs: dict[str, Any]):
    import diffusers

    if scheduler_cls is not None:
        return scheduler_cls.from_pretrained(location, subfolder=subfolder, **kwargs)
    config = diffusers.DDPMScheduler.load_config(location, subfolder=subfolder, **kwargs)
    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"scheduler class {name!r} of {location} is unknown to diffusers {diffusers.__version__}")
    return cls.from_config(config)


def load_sd_components(
    model: str | os.PathLike,
    *,
    include: Iterable[str] = COMPONENTS,
    subfolders: Mapping[str, str] | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    variant: str | None = None,
    scheduler_cls: type | None = None,
    single_file_config: str | None = None,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
    cache_dir: str | os.PathLike | None = None,
) -> SDComponents:
    """Load the UNet, VAE, CLIP text encoder, tokenizer and scheduler of a Stable Diffusion model.

    ``model`` is a local diffusers folder, a single-file checkpoint (``.safetensors``/``.ckpt``, loaded through
    ``StableDiffusionPipeline.from_single_file``; ``single_file_config`` names a diffusers folder or id for its
    configs) or a hub id. ``include`` picks the parts (the others are None); ``subfolders`` renames folders
    (e.g. ``{"unet": "unet_ema"}``). Models are put in eval mode on ``device`` with ``dtype``; the tokenizer is
    checked against the text encoder's vocabulary. A hub id is probed first (``probe_timeout_s``); offline or
    unreachable, only the Hugging Face cache (``cache_dir``) is used. Raises ModelLoadError with one line on failure.
    """
    parts = tuple(include)
    for part in parts:
        if part not in COMPONENTS:
            raise unknown_choice("Stable Diffusion component", part, COMPONENTS)
    names = {**{p: p for p in COMPONENTS}, **dict(subfolders or {})}
    torch_dtype = _as_dtype(dtype)
    source = resolve_model_source(model, revision=revision, probe_timeout_s=probe_timeout_s, cache_dir=cache_dir)
    label = os.fspath(model)

    if source.kind == "file":
        pipe = load_sd_pipeline(model, dtype=torch_dtype, device=device, single_file_config=single_file_config,
                                probe_timeout_s=probe_timeout_s, cache_dir=cache_dir)
        scheduler = pipe.scheduler
        if scheduler_cls is not None:
            scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        got = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
               "scheduler": scheduler}
        return SDComponents(**{p: (got[p] if p in parts else None) for p in COMPONENTS}, source=source.location)

    if source.kind == "folder":
        _check_diffusers_folder(Path(source.location), parts, names)
    hub_kwargs: dict[str, Any] = {"local_files_only": source.local_files_only or hub_offline()}
    if revision is not None:
        hub_kwargs["revision"] = revision
    if cache_dir is not None:
        hub_kwargs["cache_dir"] = os.fspath(cache_dir)
    offline_hint = source.kind == "hub"

    def model_kwargs() -> dict[str, Any]:
        return {**hub_kwargs, **({"variant": variant} if variant else {})}

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    loaded: dict[str, Any] = dict.fromkeys(COMPONENTS)
    loaders: dict[str, Callable[[], Any]] = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            source.location, subfolder=names["unet"], dtype=torch_dtype, **model_kwargs()),
        "vae": lambda: AutoencoderKL.from_pretrained(
            source.location, subfolder=names["vae"], dtype=torch_dtype, **model_kwargs()),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            source.location, subfolder=names["text_encoder"], dtype=torch_dtype, **model_kwargs()),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(
            source.location, subfolder=names["tokenizer"], **hub_kwargs),
        "scheduler": lambda: _load_scheduler(source.location, names["scheduler"], scheduler_cls, hub_kwargs),
    }
    for part in parts:
        loaded[part] = _wrap_errors(label, part, loaders[part], offline_hint)
        if isinstance(loaded[part], torch.nn.Module):
            loaded[part] = loaded[part].to(device).eval()

    if loaded["tokenizer"] is not None:
        expected = None
        if loaded["text_encoder"] is not None:
            expected = int(loaded["text_encoder"].config.vocab_size)
        elif source.kind == "folder":
            expected = _text_encoder_vocab(Path(source.location), names["text_encoder"])
        check_tokenizer(loaded["tokenizer"], model=label, expected_vocab=expected)
    return SDComponents(**loaded, source=source.location)


def load_sd_pipeline(
    model: str | os.PathLike,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
    pipeline_cls: type | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
    cache_dir: str | os.PathLike | None = None,
    **pipeline_kwargs: Any,
):
    """Load a full pipeline (default ``StableDiffusionPipeline``, safety checker off) from a folder, file or hub id.

    ``pipeline_kwargs`` go to ``from_pretrained``/``from_single_file`` (e.g. ``scheduler=...`` to swap the sampler).
    The progress bar is disabled; the tokenizer is checked against the text encoder. Raises ModelLoadError.
    """
    torch_dtype = _as_dtype(dtype)
    # resolve first: a bad id or an unreachable hub fails before the (slow) diffusers pipeline import
    source = resolve_model_source(model, revision=revision, probe_timeout_s=probe_timeout_s, cache_dir=cache_dir)
    if pipeline_cls is None:
        from diffusers import StableDiffusionPipeline

        pipeline_cls = StableDiffusionPipeline
    cls = pipeline_cls
    label = os.fspath(model)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": source.local_files_only or hub_offline(),
                              **pipeline_kwargs}
    if "safety_checker" not in kwargs and _has_safety_checker(cls, source, revision, cache_dir):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if revision is not None:
        kwargs["revision"] = revision
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    if variant is not None and source.kind != "file":
        kwargs["variant"] = variant

    if source.kind == "file":
        if single_file_config is not None:
            kwargs["config"] = single_file_config
        try:
            pipe = cls.from_single_file(source.location, **kwargs)
        except Exception as exc:  # noqa: BLE001 - from_single_file raises many unrelated types
            extra = (" pass single_file_config=<a local diffusers folder of the same architecture> so no hub "
                     "config is fetched" if single_file_config is None else " check it is a Stable Diffusion checkpoint")
            raise ModelLoadError(f"cannot load the single-file checkpoint {label}: {_first_line(exc)};{extra}") from exc
    else:
        if source.kind == "folder":
            _check_diffusers_folder(Path(source.location), ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
                                    {p: p for p in COMPONENTS})
        pipe = _wrap_errors(label, "pipeline", lambda: cls.from_pretrained(source.location, **kwargs),
                            source.kind == "hub")
    check_tokenizer(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None), model=label)
    check_tokenizer(getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None), model=label)  # SDXL
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _has_safety_checker(cls: type, source: ModelSource, revision: str | None,
                        cache_dir: str | os.PathLike | None) -> bool:
    """Whether the pipeline takes a safety checker (to turn it off): by its class, or for diffusers' AutoPipeline
    classes (which take ``**kwargs``) by the model's ``model_index.json``, so SDXL is not handed an unknown part."""
    if "safety_checker" in _init_parameters(cls):
        return True
    if not cls.__name__.startswith("AutoPipeline") or source.kind == "file":
        return False
    if source.kind == "folder":
        index_file = Path(source.location) / "model_index.json"
        return index_file.is_file() and "safety_checker" in json.loads(index_file.read_text())
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source.location, revision=revision, cache_dir=cache_dir,
                                              local_files_only=source.local_files_only or hub_offline())
    except Exception:  # noqa: BLE001 - from_pretrained reports an unreadable model with its own message
        return False
    return "safety_checker" in index


def _init_parameters(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
