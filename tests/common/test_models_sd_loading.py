"""Loading SD components and pipelines: local folders, the HF cache, and one-line, fast failures."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from distill_common.errors import ConfigError, ModelLoadError
from distill_common.models.sd_loading import (
    load_sd_components,
    load_sd_pipeline,
    probe_hub,
    resolve_model_source,
)

MISSING_ID = "distill-tests/no-such-sd-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, busy CPU extra OpenMP threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a diffusers folder whose files are symlinks (cheap), so parts can be replaced."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def test_components_from_local_folder(tiny_sd_path: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = load_sd_components(tiny_sd_path)
    assert isinstance(parts.unet, UNet2DConditionModel) and isinstance(parts.vae, AutoencoderKL)
    assert isinstance(parts.text_encoder, CLIPTextModel) and isinstance(parts.tokenizer, CLIPTokenizer)
    assert isinstance(parts.scheduler, PNDMScheduler)
    assert parts.source == str(tiny_sd_path.resolve()) and parts.vae_scale_factor == 4
    assert len(parts.tokenizer) == 49408 and not parts.unet.training
    ids = parts.tokenizer("a photo of a cat", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = parts.text_encoder(ids).last_hidden_state  # (1, 7, 32)
        eps = parts.unet(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=hidden).sample
    assert eps.shape == (1, 4, 16, 16) and torch.isfinite(eps).all()


def test_include_dtype_and_scheduler_override(tiny_sd_path: Path) -> None:
    from diffusers import DDIMScheduler

    parts = load_sd_components(tiny_sd_path, include=("unet", "scheduler"), dtype="bf16", scheduler_cls=DDIMScheduler)
    assert parts.vae is None and parts.text_encoder is None and parts.tokenizer is None
    assert parts.unet.dtype == torch.bfloat16
    assert isinstance(parts.scheduler, DDIMScheduler) and parts.scheduler.config.beta_end == 0.012
    with pytest.raises(ConfigError, match="valid choices"):
        load_sd_components(tiny_sd_path, include=("unet", "safety_checker"))


def test_pipeline_from_local_folder_generates(tiny_sd_path: Path) -> None:
    pipe = load_sd_pipeline(tiny_sd_path)
    assert pipe.safety_checker is None and len(pipe.tokenizer) == 49408
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64)


def test_offline_hub_id_fails_fast_naming_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_sd_components, load_sd_pipeline):
        start = time.perf_counter()
        with pytest.raises(ModelLoadError) as err:
            load(MISSING_ID)
        assert time.perf_counter() - start < 10
        message = str(err.value)
        assert "\n" not in message and MISSING_ID in message and "offline" in message
        assert "local diffusers folder" in message and f"hf download {MISSING_ID} --local-dir DIR" in message


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a hub hanging mid-request)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def test_unresponsive_hub_is_probed_once_with_a_short_timeout(
    silent_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="did not answer a 1 s probe") as err:
        load_sd_components(MISSING_ID, probe_timeout_s=1.0, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    assert "--local-dir DIR" in str(err.value)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    """A local stand-in for the hub's model-info API: 'owner/exists' is found, every other id is a 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            found = self.path.startswith("/api/models/owner/exists")
            body = json.dumps({"id": "owner/exists", "sha": "0" * 40} if found else {"error": "not found"}).encode()
            self.send_response(200 if found else 404)
            if not found:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    import huggingface_hub.constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def test_probe_tells_found_from_missing_ids(fake_hub) -> None:
    assert probe_hub("owner/exists", timeout_s=2) == "ok"
    assert probe_hub("owner/absent", timeout_s=2) == "missing"
    with pytest.raises(ModelLoadError, match="does not exist on the Hugging Face Hub"):
        load_sd_components("owner/absent")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_offline_hub_id_served_from_the_hf_cache(tiny_sd_path: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--distill-tests--tiny-sd"
    linked_copy(tiny_sd_path, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    source = resolve_model_source("distill-tests/tiny-sd", cache_dir=tmp_path / "hub")
    assert (source.kind, source.local_files_only) == ("hub", True)
    parts = load_sd_components("distill-tests/tiny-sd", include=("unet", "tokenizer"), cache_dir=tmp_path / "hub")
    assert parts.unet.config.sample_size == 16 and len(parts.tokenizer) == 49408


def test_folder_that_is_not_diffusers_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"not a diffusers Stable Diffusion folder: expected model_index.json") as err:
        load_sd_components(tmp_path)
    assert "weights.txt" in str(err.value)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_sd_pipeline(tmp_path)


def test_incomplete_folder_names_the_missing_part(tiny_sd_path: Path, tmp_path: Path) -> None:
    folder = linked_copy(tiny_sd_path, tmp_path / "sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelLoadError, match="no usable vae/ subfolder"):
        load_sd_components(folder)
    assert load_sd_components(folder, include=("unet",)).unet is not None  # the other parts still load


def test_two_token_tokenizer_is_refused(tiny_sd_path: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    folder = linked_copy(tiny_sd_path, tmp_path / "sd")
    shutil.rmtree(folder / "tokenizer")
    degenerate = CLIPTokenizer()  # what an offline load without vocabulary files silently yields
    degenerate.save_pretrained(folder / "tokenizer")
    assert len(CLIPTokenizer.from_pretrained(folder / "tokenizer")) == 2
    for load, kwargs in ((load_sd_components, {}), (load_sd_components, {"include": ("tokenizer",)}),
                         (load_sd_pipeline, {})):
        with pytest.raises(ModelLoadError, match="has only 2 tokens") as err:
            load(folder, **kwargs)
        assert "49408" in str(err.value)


def test_missing_paths_and_malformed_ids(tmp_path: Path) -> None:
    for bad in (str(tmp_path / "absent"), "./model.safetensors", "not a model id", "a/b/c"):
        with pytest.raises(ModelLoadError, match="neither an existing path nor a hub id"):
            load_sd_components(bad)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_sd_components(text)


def test_bad_single_file_checkpoint_fails_with_one_line(tiny_sd_path: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "model.safetensors"
    save_file({"unrelated.weight": torch.zeros(3)}, str(checkpoint))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="single_file_config") as err:
        load_sd_components(checkpoint)
    assert time.perf_counter() - start < 10 and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="cannot load the single-file checkpoint"):
        load_sd_pipeline(checkpoint, single_file_config=str(tiny_sd_path))
