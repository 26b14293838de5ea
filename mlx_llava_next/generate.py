"""Streaming generation and multi-turn chat on top of mlx-lm's generation loop.

mlx-lm's `generate_step` does the work (chunked prefill, pipelined decoding, samplers, KV
caches); this module builds what it needs for LLaVA-NeXT: the expanded token ids and the
merged (L, D) input embeddings, and handles the text side (streaming detokenizer, EOS ids,
stop strings) and the statistics users compare tools by.

`ChatSession` keeps the KV cache across turns: each turn renders the whole conversation with
the chat template, reuses the cached prefix that still matches token for token, and prefills
only the rest. Images are encoded once and their packed features are cached by content hash.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream, wired_limit
from mlx_lm.models.cache import can_trim_prompt_cache, load_prompt_cache, save_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import LlavaNextError, OutputError, PromptError
from .image_processing import load_image
from .kv_cache import adopt, for_saving

SESSION_FORMAT = "mlx-llava-next-chat/1"


class ClampWarning(UserWarning):
    """max_tokens was cut to what the context window leaves."""


# -- options and results ------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Sampling and stopping options (names follow transformers/mlx-lm)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.0  # 0 or 1: off
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()  # stop strings; the text ends before the first one
    eos_token_ids: Optional[Tuple[int, ...]] = None  # None: the tokenizer's + generation_config's
    prefill_step_size: int = 2048

    def __post_init__(self):
        _check_int("max_tokens", self.max_tokens, 1, allow=(-1,))
        _check_real("temperature", self.temperature, 0.0)
        _check_real("top_p", self.top_p, 0.0, 1.0)
        _check_int("top_k", self.top_k, 0)
        _check_real("min_p", self.min_p, 0.0, 1.0)
        if self.repetition_penalty is not None:
            _check_real("repetition_penalty", self.repetition_penalty, 0.0, exclusive_low=True)
        _check_int("repetition_context_size", self.repetition_context_size, 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1)
        _check_int("prefill_step_size", self.prefill_step_size, 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(x, str) for x in self.stop):
            raise PromptError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for x in self.stop:
            check_text("stop", x)
        if self.eos_token_ids is not None:
            for x in self.eos_token_ids:
                _check_int("eos_token_ids", x, 0)

    @classmethod
    def from_kwargs(cls, base: Optional["Sampling"] = None, **kwargs) -> "Sampling":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise PromptError(f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = (kwargs["stop"],)
        for key in ("stop", "eos_token_ids"):
            if kwargs.get(key) is not None:
                try:
                    kwargs[key] = tuple(kwargs[key])
                except TypeError:
                    raise PromptError(f"{key} must be a list, got {kwargs[key]!r}") from None
        return dataclasses.replace(base or cls(), **kwargs)

    def sampler(self):
        return make_sampler(self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self):
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty, repetition_context_size=self.repetition_context_size
        )


def _check_int(name: str, value, low: int, high: Optional[int] = None, allow: Tuple[int, ...] = ()) -> None:
    """PromptError naming `name` unless `value` is an int (not a bool) in [low, high] or in `allow`."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and (value in allow or (value >= low and (high is None or value <= high))):
        return
    bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    extra = f" (or {', '.join(map(str, allow))})" if allow else ""
    raise PromptError(f"{name} must be {bound}{extra}, got {value!r}")


def _check_real(name: str, value, low: float, high: Optional[float] = None, exclusive_low: bool = False) -> None:
    """PromptError naming `name` unless `value` is a finite real number in range."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok and math.isfinite(value) and (value > low if exclusive_low else value >= low) and (high is None or value <= high):
        return
    rng = f"{'>' if exclusive_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    raise PromptError(f"{name} must be a finite number {rng}, got {value!r}")


def check_text(name: str, text) -> str:
    """PromptError unless `text` is a str that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(text, str):
        raise PromptError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{name} contains a lone surrogate ({text[e.start]!r} at position {e.start}), which is not text") from None
    return text


MESSAGE_ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image")


def check_messages(messages) -> List[Dict[str, Any]]:
    """A list of HF-style chat messages, checked; PromptError naming the first bad one."""
    messages = list(messages)
    if not messages:
        raise PromptError("messages is empty; give at least one message")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise PromptError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in MESSAGE_ROLES:
            raise PromptError(f"{where}['role'] must be one of {', '.join(MESSAGE_ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if isinstance(content, str):
            check_text(f"{where}['content']", content)
            continue
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"{where}['content'] must be a string or a list of parts, got "
                              f"{'nothing' if content is None else type(content).__name__}")
        for j, part in enumerate(content):
            pw = f"{where}['content'][{j}]"
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                got = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PromptError(f"{pw} must be a part of type {' or '.join(PART_TYPES)}, got {got!r}")
            if part["type"] == "text":
                check_text(f"{pw}['text']", part.get("text"))
    return messages


@dataclass
class GenerationResponse:
    """One generated token. `text` is the new text it completes (may be empty); the last
    response of a generation has `finish_reason` "stop" (EOS or a stop string) or "length"."""

    text: str
    token: int
    logprobs: mx.array  # log-softmax of the (processed) logits the token was sampled from
    prompt_tokens: int  # tokens prefilled by this call
    cached_tokens: int  # prompt tokens reused from an earlier turn's KV cache
    generation_tokens: int
    ttft: float  # seconds from the call to the first token: images, embeddings, prefill
    prompt_tps: float  # prompt_tokens / ttft
    generation_tps: float  # tokens per second after the first
    peak_memory: float  # GB, process peak so far
    finish_reason: Optional[str] = None


@dataclass
class GenerationResult:
    """A finished generation: the whole text, every sampled token (an EOS token included, as
    transformers returns it), why it ended, and the stats of the last response."""

    text: str
    tokens: List[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    ttft: float
    prompt_tps: float
    generation_tps: float
    peak_memory: float

    def stats(self) -> Dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("text", "tokens", "finish_reason")}


def collect(responses: Iterable[GenerationResponse]) -> GenerationResult:
    text, tokens, last = [], [], None
    for last in responses:
        text.append(last.text)
        tokens.append(last.token)
    if last is None:
        raise LlavaNextError("generation produced no token")
    return GenerationResult(
        text="".join(text), tokens=tokens, finish_reason=last.finish_reason or "length",
        prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens,
        generation_tokens=last.generation_tokens, ttft=last.ttft, prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps, peak_memory=last.peak_memory,
    )


# -- stop strings -------------------------------------------------------------------------


class StopStrings:
    """Streams text while holding back any tail that could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> Tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0 if final else self._partial_tail()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def _partial_tail(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        for n in range(min(len(self.pending), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


# -- prompt -------------------------------------------------------------------------------


def user_message(text: str, n_images: int) -> Dict[str, Any]:
    """One user turn: its images first (the llava-hf templates render them before the text)."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def format_prompt(processor, prompt, n_images: int, raw: Optional[bool] = None, system: Optional[str] = None) -> str:
    """The prompt text to tokenize.

    - a list of messages: rendered with the processor's chat template;
    - a string with `raw=True`, or (raw=None) one that already contains the image token: used
      as is (an already formatted prompt, one `<image>` per image);
    - any other string: a user question, rendered as one user message with one image part per
      image (after an optional system message).
    """
    if isinstance(prompt, (list, tuple)):
        return processor.apply_chat_template(check_messages(prompt), add_generation_prompt=True)
    check_text("prompt", prompt)
    if system is not None:
        check_text("system", system)
    if raw or (raw is None and processor.image_token in prompt):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [user_message(prompt, n_images)]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def tokenize(processor, text: str, image_sizes: Sequence) -> List[int]:
    """Token ids of `text` with each `<image>` expanded for its image. BOS is added unless the
    rendered text already starts with it (some chat templates write it themselves)."""
    expanded = processor.expand_image_tokens([text], list(image_sizes))[0]
    bos = processor.hf_tokenizer.bos_token
    add_special = not (bos and expanded.startswith(bos))
    return list(processor.hf_tokenizer(expanded, add_special_tokens=add_special)["input_ids"])


def context_length(model) -> int:
    return int(model.config.text_config["max_position_embeddings"])


def check_context(model, n_prompt: int) -> None:
    limit = context_length(model)
    if n_prompt > limit:
        raise PromptError(
            f"the prompt is {n_prompt} tokens long (images included) but the model's context window "
            f"is {limit} tokens; shorten the text or use fewer/smaller images"
        )


def as_image(source):
    """Paths and bytes are decoded here (errors name the file); PIL images and arrays pass through."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        return load_image(source)
    return source


def image_hash(image) -> str:
    """Content hash of a decoded image (PIL image or array)."""
    h = hashlib.sha256()
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
        h.update(f"pil:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        array = np.ascontiguousarray(np.asarray(image))
        h.update(f"array:{array.dtype}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


# -- the token loop -----------------------------------------------------------------------


def known_token_ids(tokenizer, detokenizer) -> int:
    """How many token ids the tokenizer can decode. The output layer may have more rows (the
    llava-hf mistral release: 32,064 rows, 32,002 tokens); those ids decode to nothing, as
    transformers' tokenizers decode them, instead of failing in mlx-lm's detokenizer."""
    tokenmap = getattr(detokenizer, "tokenmap", None)
    if tokenmap is not None:
        return len(tokenmap)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return max(len(hf), max(hf.get_vocab().values(), default=-1) + 1)


def _token_loop(
    model,
    processor,
    prompt_ids: Sequence[int],
    embeddings: mx.array,
    cache,
    opts: Sampling,
    started: float,
    cached_tokens: int = 0,
) -> Iterator[GenerationResponse]:
    """Run mlx-lm's generate_step over (ids, embeddings) and turn its tokens into responses."""
    tokenizer = processor.tokenizer
    eos = set(tokenizer.eos_token_ids) if opts.eos_token_ids is None else set(opts.eos_token_ids)
    detokenizer = tokenizer.detokenizer  # a fresh copy per call
    known = known_token_ids(tokenizer, detokenizer)
    stopper = StopStrings(opts.stop)
    # Never run past the context window: positions beyond it were never trained.
    room = context_length(model) - cached_tokens - len(prompt_ids)
    max_tokens = max(1, min(opts.max_tokens, room)) if opts.max_tokens >= 0 else max(1, room)
    if opts.max_tokens > max_tokens:
        warnings.warn(f"max_tokens {opts.max_tokens} is more than the context window leaves after the prompt; "
                      f"generating at most {max_tokens} tokens", ClampWarning, stacklevel=2)
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    steps = generate_step(
        mx.array(prompt_ids, dtype=mx.uint32),
        model.language_model,
        max_tokens=max_tokens,
        sampler=opts.sampler(),
        logits_processors=opts.logits_processors(),
        prompt_cache=cache,
        prefill_step_size=opts.prefill_step_size,
        input_embeddings=embeddings,
    )
    first = None
    with wired_limit(model, [generation_stream]):
        for n, (token, logprobs) in enumerate(steps, start=1):
            now = time.perf_counter()
            if first is None:
                first = now
            finish = None
            if token in eos:
                finish = "stop"
            else:
                if token < known:  # ids past the tokenizer (a padded lm_head) decode to nothing
                    detokenizer.add_token(token)
                if n == max_tokens:
                    finish = "length"
            if finish:
                detokenizer.finalize()
            text, hit = stopper.feed(detokenizer.last_segment, final=finish is not None)
            if hit:
                finish = "stop"
            ttft = first - started
            yield GenerationResponse(
                text=text,
                token=token,
                logprobs=logprobs,
                prompt_tokens=len(prompt_ids),
                cached_tokens=cached_tokens,
                generation_tokens=n,
                ttft=ttft,
                prompt_tps=len(prompt_ids) / max(ttft, 1e-9),
                generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
            )
            if finish:
                return


def _embed(model, ids: Sequence[int], features: Sequence[mx.array]) -> mx.array:
    """(L, D) embeddings with image features merged, evaluated now: mlx-lm prefills on its own
    stream, so the vision rows must be computed first."""
    embeddings = model.embed_inputs(np.asarray(ids, dtype=np.int64)[None], image_features=list(features))[0]
    mx.eval(embeddings)
    return embeddings


# -- one-shot generation ------------------------------------------------------------------


def stream_generate(
    model,
    processor,
    prompt,
    images: Optional[Sequence] = None,
    *,
    raw: Optional[bool] = None,
    system: Optional[str] = None,
    **sampling,
) -> Iterator[GenerationResponse]:
    """Generate an answer token by token.

    prompt: a user question (rendered with the chat template, one image part per image), an
    already formatted prompt (`raw=True`, or any prompt containing `<image>`), or a list of
    HF-style messages. images: paths, bytes, PIL images or arrays, in `<image>` order.
    sampling: see `Sampling` (max_tokens, temperature, top_p, top_k, min_p,
    repetition_penalty, seed, stop, eos_token_ids, ...).
    """
    started = time.perf_counter()
    opts = Sampling.from_kwargs(**sampling)
    images = [as_image(x) for x in (images or [])]
    text = format_prompt(processor, prompt, len(images), raw=raw, system=system)
    pixels = processor.image_processor(images) if images else None
    sizes = pixels["image_sizes"] if images else []
    ids = tokenize(processor, text, sizes)
    check_context(model, len(ids))
    features = model.encode_images(pixels["pixel_values"], sizes) if images else []
    embeddings = _embed(model, ids, features)
    yield from _token_loop(model, processor, ids, embeddings, model.make_cache(), opts, started)


def generate(model, processor, prompt, images: Optional[Sequence] = None, **kwargs) -> GenerationResult:
    """The whole answer at once; arguments as `stream_generate`."""
    return collect(stream_generate(model, processor, prompt, images, **kwargs))


# -- multi-turn chat ----------------------------------------------------------------------


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _model_signature(model) -> Dict[str, Any]:
    t = model.config.text_config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size")
    return {k: t.get(k) for k in keys}


class ChatSession:
    """A conversation whose KV cache and image features survive from turn to turn.

    >>> chat = ChatSession(model, processor, system=None, max_tokens=256)
    >>> for r in chat.stream("What is in this scan?", images=["scan.png"]):
    ...     print(r.text, end="", flush=True)
    >>> chat.ask("And the date?").text        # prefills only the new question
    """

    def __init__(self, model, processor, system: Optional[str] = None, **sampling):
        self.model = model
        self.processor = processor
        self.system = None if system is None else check_text("system", system)
        self.sampling = Sampling.from_kwargs(**sampling)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: List[Dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self.image_hashes: List[str] = []  # every image of the conversation, in order
        self.image_sizes: Dict[str, Tuple[int, int]] = {}
        self._features: Dict[str, mx.array] = {}  # packed features per image hash
        self.tokens: List[int] = []  # what the KV cache holds, token by token
        self.cache = self.model.make_cache()

    # -- one turn -------------------------------------------------------------------------
    def stream(self, text: str, images: Sequence = (), **sampling) -> Iterator[GenerationResponse]:
        """Ask `text` (with `images` shown before it) and stream the answer. Stopping early
        (closing the generator, e.g. on Ctrl-C) keeps the partial answer in the history."""
        started = time.perf_counter()
        opts = Sampling.from_kwargs(self.sampling, **sampling)
        check_text("the question", text)
        images = [as_image(x) for x in images]
        marks = text.count(self.processor.image_token)
        if marks:
            raise PromptError(
                f"the question has {marks} `{self.processor.image_token}` marker(s) and {len(images)} image(s) "
                f"come with it; the chat template places the images, so leave the marker out of the text"
            )
        hashes = [image_hash(x) for x in images]
        new = {h: x for h, x in zip(hashes, images) if h not in self._features}
        pixels = self.processor.image_processor(list(new.values())) if new else None
        sizes = dict(self.image_sizes)
        if new:
            sizes.update({h: tuple(int(v) for v in s) for h, s in zip(new, pixels["image_sizes"])})

        messages = self.messages + [user_message(text, len(images))]
        all_hashes = self.image_hashes + hashes
        rendered = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenize(self.processor, rendered, [sizes[h] for h in all_hashes])
        check_context(self.model, len(ids))

        keep = self._reuse_prefix(ids)
        if new:  # the vision tower runs once per image, over the new images of this turn
            encoded = self.model.encode_images(pixels["pixel_values"], pixels["image_sizes"])
            self._features.update(zip(new, encoded))
            self.image_sizes.update({h: sizes[h] for h in new})
        embeddings = _embed(self.model, ids[keep:], self._features_after(ids, keep, all_hashes))

        # From here the turn belongs to the conversation, however generation ends.
        answer: List[str] = []
        generated: List[int] = []
        try:
            for response in _token_loop(
                self.model, self.processor, ids[keep:], embeddings, self.cache, opts, started, cached_tokens=keep
            ):
                answer.append(response.text)
                generated.append(response.token)
                yield response
        finally:
            reply = "".join(answer).replace(self.processor.image_token, "").strip()
            self.messages = messages + [{"role": "assistant", "content": reply}]
            self.image_hashes = all_hashes
            self.tokens = ids + generated
            self._sync_cache()

    def ask(self, text: str, images: Sequence = (), **sampling) -> GenerationResult:
        return collect(self.stream(text, images, **sampling))

    # -- cache bookkeeping ----------------------------------------------------------------
    def _cache_offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def _fresh_cache(self) -> None:
        self.cache = self.model.make_cache()
        self.tokens = []

    def _reuse_prefix(self, ids: List[int]) -> int:
        """Trim the cache to the longest prefix it shares with `ids` (keeping at least one token
        to prefill, which yields the first logits) and return that prefix length."""
        self._sync_cache()
        keep = min(_common_prefix(self.tokens, ids), len(ids) - 1)
        if keep < len(self.tokens):
            # e.g. the template writes the answer back differently from how it was sampled
            # (`</s>` after it, other spacing): drop the cached tokens past the divergence.
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(self.tokens) - keep)
                self.tokens = self.tokens[:keep]
            else:  # e.g. a rotating (sliding-window) cache that has wrapped
                self._fresh_cache()
                keep = 0
        return keep

    def _sync_cache(self) -> None:
        """Make `self.tokens` and the cache agree (after an interrupted or finished turn)."""
        offset = self._cache_offset()
        if offset > len(self.tokens):
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, offset - len(self.tokens))
            else:
                self._fresh_cache()
        elif offset < len(self.tokens):
            self.tokens = self.tokens[:offset]

    def _features_after(self, ids: List[int], keep: int, hashes: List[str]) -> List[mx.array]:
        """Features of the image tokens at positions >= keep (an image cut by `keep` is sliced)."""
        image_id = self.processor.image_token_id
        before = sum(1 for t in ids[:keep] if t == image_id)
        out, start = [], 0
        for h in hashes:
            n = self.processor.num_image_tokens(self.image_sizes[h])
            if start + n > before:
                if h not in self._features:
                    raise PromptError(
                        "an image of the restored conversation is needed again but only its hash was "
                        "saved; start a new session (/reset) or pass the image again"
                    )
                out.append(self._features[h][max(0, before - start) :])
            start += n
        return out

    # -- persistence ----------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the KV cache and the conversation (mlx-lm prompt-cache file, .safetensors)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        self._sync_cache()
        metadata = {
            "format": SESSION_FORMAT,
            "system": json.dumps(self.system),
            "messages": json.dumps(self.messages),
            "image_hashes": json.dumps(self.image_hashes),
            "image_sizes": json.dumps({h: list(s) for h, s in self.image_sizes.items()}),
            "tokens": json.dumps(self.tokens),
            "model": json.dumps(_model_signature(self.model)),
        }
        from .outputs import check_parent, write_errors

        if os.path.lexists(path) and (os.path.islink(path) or not path.is_file()):
            raise OutputError(f"cannot write {path}: it exists and is not a regular file")
        check_parent(path)
        tmp = path.with_name(f".{path.stem[:64]}.{os.getpid()}.tmp.safetensors")
        try:
            with write_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_prompt_cache(str(tmp), for_saving(self.cache), metadata)  # our caches as mlx-lm's KVCache
                os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path, model, processor, **sampling) -> "ChatSession":
        """Restore a saved session. The images are known by hash only: they are not encoded
        again unless the conversation must be re-read before them."""
        path = Path(path)
        if not path.exists():
            raise LlavaNextError(f"{path}: no such session file")
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:
            raise LlavaNextError(f"{path}: not a readable session file ({type(e).__name__}: {e})") from None
        if meta.get("format") != SESSION_FORMAT:
            raise LlavaNextError(f"{path}: not an mlx-llava-next chat session (format {meta.get('format')!r})")
        if json.loads(meta["model"]) != _model_signature(model) or len(cache) != len(model.make_cache()):
            raise LlavaNextError(f"{path}: the session was saved with a different model")
        session = cls(model, processor, system=json.loads(meta["system"]), **sampling)
        session.messages = json.loads(meta["messages"])
        session.image_hashes = json.loads(meta["image_hashes"])
        session.image_sizes = {h: tuple(s) for h, s in json.loads(meta["image_sizes"]).items()}
        session.tokens = json.loads(meta["tokens"])
        session.cache = adopt(model, cache)  # back to our cache where the model's policy wants it
        session._sync_cache()
        return session

    def transcript(self) -> str:
        """The conversation as plain text (images shown as `[image]`)."""
        lines = []
        for message in self.messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join("[image]\n" if p["type"] == "image" else p.get("text", "") for p in content)
            lines.append(f"{message['role'].upper()}: {content.strip()}")
        return "\n\n".join(lines) + "\n"
