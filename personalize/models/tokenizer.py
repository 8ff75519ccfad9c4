"""A real CLIP BPE tokenizer built offline from the vocabulary that open_clip ships.

SD 1.x/2.x/SDXL use OpenAI's CLIP BPE (49,408 tokens). Its merges ship inside the ``open_clip``
package as ``bpe_simple_vocab_16e6.txt.gz``; from them we write the ``vocab.json`` + ``merges.txt``
that ``transformers.CLIPTokenizer`` reads, so Textual Inversion adds tokens exactly as on SD 1.5.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table of GPT-2 / CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of CLIP's tokenizer into ``out_dir``."""
    from open_clip.tokenizer import default_bpe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A fresh ``CLIPTokenizer`` with the real CLIP vocabulary (49,408 tokens), no download."""
    cache = Path(os.environ.get("PERSONALIZE_CACHE", Path(tempfile.gettempdir()) / "personalize-cache")) / "clip-tokenizer"
    if not (cache / "merges.txt").is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
        write_clip_tokenizer_files(tmp)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race
            pass
    return CLIPTokenizer.from_pretrained(str(cache), model_max_length=model_max_length, pad_token="<|endoftext|>")
