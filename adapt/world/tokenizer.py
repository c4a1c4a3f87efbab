"""Build a CLIP-format BPE tokenizer offline from a word list.

No hub is reachable, so the tiny world (and the test fixtures) need a tokenizer
that `CLIPTokenizer.from_pretrained(folder)` loads exactly like Stable
Diffusion's.  We write the two files CLIP's tokenizer reads (vocab.json and
merges.txt) ourselves: every byte symbol is in the vocabulary (so any text
tokenizes), and for each listed word a left-to-right chain of merges makes it a
single token.  Written by hand because neither `tokenizers` nor `transformers`
produces CLIP's exact file layout from a word list.
"""
from __future__ import annotations

import json
from pathlib import Path

# Words of the tiny world's captions plus a few generic ones used by tests and
# templates.  Unknown words still tokenize (into smaller pieces).
DEFAULT_WORDS = """
a an the of on in at with and to photo picture image drawing shape shapes object
small medium large big tiny left right top bottom center middle background
circle square triangle star ring diamond cross heart
red green blue yellow purple orange cyan magenta white black gray pink brown
striped outlined style sks zzstripe zwx dog cat person
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode map (Radford et al. 2019)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(out_dir: str | Path, words: list[str] | None = None, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for CLIPTokenizer into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in dict.fromkeys(w.lower() for w in (words or DEFAULT_WORDS)):
        enc = bytes_to_unicode()
        chars = [enc[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        cur = chars[0]
        for nxt in chars[1:]:
            pair = (cur, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2), encoding="utf-8")
    return out


def build_clip_tokenizer(out_dir: str | Path, words: list[str] | None = None, model_max_length: int = 77):
    """Write the files and load them back through the real `from_pretrained` path."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(out_dir, words, model_max_length)
    return CLIPTokenizer.from_pretrained(str(out_dir))
