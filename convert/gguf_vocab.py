"""Tokenizer metadata for a text GGUF, from the checkpoint's transformers tokenizer.

llama.cpp needs its own description of the vocabulary (`tokenizer.ggml.*`):
- SentencePiece-style BPE (Llama-2, Mistral, Vicuna, Yi): model `llama`, one score per token.
  llama.cpp merges the adjacent pair whose result has the highest score, so the score of a
  token is minus the rank of the first transformers merge that produces it; that reproduces
  transformers' merge order whether or not the checkpoint ships a `tokenizer.model`.
- byte-level BPE (Qwen, Llama-3): model `gpt2`, the merges, and `tokenizer.ggml.pre` naming
  the pre-tokenizer regex llama.cpp must use.
Added tokens such as `<image>` are kept (special ones as CONTROL), the vocabulary is padded to
the embedding size with `[PAD<i>]`. The exact transformers tokenizer is stored as well, as
`tokenizer.huggingface.json` (a standard GGUF key llama.cpp ignores), so our loader rebuilds the
reference tokenizer bit for bit.
"""

import json
from typing import Dict, List, Optional

import gguf
from gguf import TokenType

from mlx_llava_next.errors import UnsupportedModelError

_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# transformers pre-tokenizer split regex -> llama.cpp `tokenizer.ggml.pre`
BPE_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _merge_pairs(model: dict) -> List[List[str]]:
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]


def _byte_level_pre(pre: Optional[dict]) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or an error if it has none."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers") or []
    if (pre or {}).get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in BPE_PRE and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
            return BPE_PRE[regex]
    raise UnsupportedModelError(
        f"byte-level tokenizer with pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
        "(known: GPT-2, Llama-3, Qwen2 splits)"
    )


def tokenizer_kind(backend: dict) -> str:
    """'llama' (SentencePiece-style BPE with byte fallback) or 'gpt2' (byte-level BPE)."""
    model = backend.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(backend.get("decoder")):
        return "gpt2"
    raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF "
                                "(SentencePiece-style or byte-level BPE only)")


def _added(tokenizer) -> Dict[int, object]:
    return {i: t for i, t in tokenizer.added_tokens_decoder.items()}


def _spm_vocab(tokenizer, backend: dict, vocab_size: int):
    model = backend["model"]
    pieces = {i: p for p, i in model["vocab"].items()}
    rank: Dict[str, int] = {}
    for r, (a, b) in enumerate(_merge_pairs(model)):
        rank.setdefault(a + b, r)
    added = _added(tokenizer)
    unk = tokenizer.unk_token_id
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i == unk and i in pieces:
            text, score, kind = pieces[i], 0.0, TokenType.UNKNOWN
        elif i in added:
            token = added[i]
            special = token.special
            text = token.content if special else token.content.replace("\u2581", " ")
            score = 0.0 if i in pieces else -1000.0
            kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        elif i in pieces:
            text = pieces[i]
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                kind, score = TokenType.BYTE, 0.0
            else:
                kind, score = TokenType.NORMAL, -float(rank[text]) if text in rank else -1e9
        else:
            text, score, kind = f"[PAD{i}]", -1000.0, TokenType.UNUSED
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


def _does_token_look_special(text: str) -> bool:
    # llama.cpp's converter (conversion/base.py) marks these CONTROL even when not special.
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


def _bpe_vocab(tokenizer, vocab_size: int):
    """llama.cpp's get_vocab_base: byte-level spellings, added tokens pre-normalised."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = _added(tokenizer)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            if not added[i].normalized:
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            if added[i].special or _does_token_look_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def _adds(tokenizer, token_id: Optional[int], position: int) -> bool:
    """Whether encoding plain text puts `token_id` at `position` (0: BOS, -1: EOS)."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[position] == token_id and token_id not in tokenizer("a", add_special_tokens=False)["input_ids"]


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, chat_template: Optional[str]) -> None:
    """Add the `tokenizer.*` keys for a transformers (fast) tokenizer."""
    backend_json = tokenizer.backend_tokenizer.to_str()
    backend = json.loads(backend_json)
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise UnsupportedModelError(f"the tokenizer has ids beyond the embedding size {vocab_size}")
    kind = tokenizer_kind(backend)
    writer.add_tokenizer_model(kind)
    if kind == "llama":
        tokens, scores, types = _spm_vocab(tokenizer, backend, vocab_size)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        writer.add_tokenizer_pre(_byte_level_pre(backend.get("pre_tokenizer")))
        tokens, types = _bpe_vocab(tokenizer, vocab_size)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # gguf-py's convention: a space inside a merge part is written as U+0120+... (chr(32+256))
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in _merge_pairs(backend["model"])]
        writer.add_token_merges(merges)
    for kind_name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                                ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind_name}_token_id")(int(token_id))
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, 0))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, -1))
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, backend_json)
