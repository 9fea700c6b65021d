"""The CLIP BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"), rebuilt offline from the BPE merge list that open-clip-torch ships.

OpenAI's vocabulary is derived from the merge list alone: the 256 byte symbols, the same 256 with the
end-of-word marker ``</w>``, one token per merge (the first 48,894 merges), then ``<|startoftext|>`` and
``<|endoftext|>`` -- 49,408 tokens. We write that as ``vocab.json`` + ``merges.txt`` once into a cache folder
and load it with ``transformers.CLIPTokenizer``, so no model hub is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from distill_common.errors import ModelLoadError

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES_HEADER = "#version: 0.2"


def distill_cache_dir() -> Path:
    """The project's cache root: ``$DISTILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/distill``, else ``~/.cache/distill``."""
    env = os.environ.get("DISTILL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "distill"


def clip_bpe_path() -> Path:
    """Locate open-clip-torch's gzipped BPE merge list without importing open_clip (its import is heavy)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _BPE_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the CLIP BPE vocabulary {_BPE_FILE} was not found (open-clip-torch is not installed); "
        "install it with `pip install --no-deps open-clip-torch`"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (the byte-level alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values, code_points = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's token -> id map and its merge list ("a b" lines), built from the gzipped merge file."""
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]  # line 0 is the version header
    if len(merges) != _NUM_MERGES:
        raise ModelLoadError(f"the CLIP BPE file has {len(merges)} merges, expected {_NUM_MERGES}; reinstall open-clip-torch")
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer_files(directory: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory`` (atomically per file); return the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    contents = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": _MERGES_HEADER + "\n" + "\n".join(merges) + "\n",
    }
    for name, text in contents.items():
        # write-then-rename so concurrent test workers never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, directory / name)
    return directory


def _tokenizer_folder(folder: Path) -> Path:
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        write_clip_tokenizer_files(folder)
    return folder


def clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """OpenAI CLIP's tokenizer as a ``transformers.CLIPTokenizer`` (49,408 tokens, 77 positions, pad = ``<|endoftext|>``
    as in Stable Diffusion 1.5). Files are written once to ``cache_dir`` (default ``<distill cache>/clip_tokenizer``)."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_folder(Path(cache_dir or distill_cache_dir() / "clip_tokenizer").expanduser().resolve())
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=CLIP_MAX_LENGTH, pad_token=EOS_TOKEN, local_files_only=True
    )
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ModelLoadError(
            f"the CLIP tokenizer in {folder} has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}; "
            "delete that folder so it is rebuilt"
        )
    return tokenizer
