"""One model behind one worker thread: a bounded request queue (chat generations and document OCR), a prompt (KV)
cache and an image-feature cache."""

import dataclasses
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .schema import ApiError, ChatRequest

CACHE_KEY = "llava"  # the one model in mlx-lm's LRUPromptCache trie


@dataclass
class Prepared:
    """A request ready for the model: its token ids, the prefix-cache key (image tokens keyed by the
    image's content hash, so two different images never share a cached prefix) and its images."""

    request: ChatRequest
    ids: List[int]
    key: List[Any]
    images: List[Any]  # decoded PIL images, in `<image>` order
    hashes: List[str]
    sizes: List[Tuple[int, int]]


@dataclass
class Job:
    prepared: Prepared
    sampling: Any  # mlx_llava_next.generate.Sampling
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    events: "queue.Queue" = field(default_factory=queue.Queue)  # ("token", response) / ("done", None) / ("error", e)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: Optional[float] = None  # when the worker took it
    finished: Optional[float] = None
    outcome: Optional[str] = None  # "stop" / "length" / "cancelled" / "error"
    generated: int = 0


@dataclass
class OcrJob:
    """A document to OCR (`POST /v1/ocr`) through documents.engine on the worker; its events are
    ("result", (text, document)) then ("done", None), or ("error", e)."""

    request: Any  # server.documents.OcrRequest
    id: str = field(default_factory=lambda: "ocr-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: Optional[float] = None
    finished: Optional[float] = None
    outcome: Optional[str] = None  # "stop" / "cancelled" / "error"
    pages_done: int = 0


class _Cancelled(Exception):
    """The client of an OCR job went away: stop after the current page."""


class FeatureCache:
    """Packed image features by content hash, least recently used dropped first (count and bytes bound)."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: "OrderedDict[str, Any]" = OrderedDict()
        self.nbytes = 0

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        if key in self._items or value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self.nbytes += value.nbytes
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def __len__(self):
        return len(self._items)


class Engine:
    """Runs one generation at a time on a worker thread; requests wait in a bounded queue."""

    def __init__(self, model, processor, model_id: str, *, max_queue: int = 16, default_max_tokens: int = 512,
                 cache_entries: int = 4, cache_bytes: int = 2 << 30, image_cache_entries: int = 32,
                 image_cache_bytes: int = 512 << 20, min_reuse_tokens: int = 32, reader=None,
                 model_path: Optional[str] = None):
        from mlx_lm.models.cache import LRUPromptCache

        self.model, self.processor, self.model_id = model, processor, model_id
        self.reader = reader  # line-reader settings (lines.py) of a model that reads one line at a time
        self.model_path = model_path or model_id  # names the model in OCR results, as `cli.py ocr` does
        self.default_max_tokens = default_max_tokens
        self.min_reuse_tokens = min_reuse_tokens
        self.prompt_cache = LRUPromptCache(max_size=cache_entries, max_bytes=cache_bytes)
        self.features = FeatureCache(image_cache_entries, image_cache_bytes)
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._prepare_lock = threading.Lock()  # the HF tokenizer is not safe to share between threads
        self.busy: Optional[Job] = None
        self.finished: List[Job] = []  # the last few finished jobs, for inspection (the tests read them)
        self._worker = threading.Thread(target=self._run, name="llava-engine", daemon=True)
        self._worker.start()

    # -- called from request threads ------------------------------------------------------
    def prepare(self, request: ChatRequest, images: Sequence) -> Prepared:
        """Render, tokenize and check the prompt (PromptError on a marker mismatch or a too long prompt)."""
        from ..generate import check_context, image_hash, tokenize

        hashes = [image_hash(x) for x in images]
        sizes = [(x.height, x.width) for x in images]
        with self._prepare_lock:
            text = self.processor.apply_chat_template(request.messages, add_generation_prompt=True)
            ids = tokenize(self.processor, text, sizes)
        check_context(self.model, len(ids))
        key, image_id, it = [], self.processor.image_token_id, iter(zip(hashes, sizes))
        current, left, j = None, 0, 0
        for t in ids:
            if t != image_id:
                key.append(t)
                continue
            if left == 0:
                current, size = next(it)
                left, j = self.processor.num_image_tokens(size), 0
            key.append((current, j))
            left, j = left - 1, j + 1
        return Prepared(request, ids, key, list(images), hashes, sizes)

    def submit(self, prepared: Prepared) -> Job:
        """Queue a request (ApiError 429 when the queue is full, 400 for options generation refuses)."""
        from ..errors import LlavaNextError
        from ..generate import Sampling

        r = prepared.request
        try:
            sampling = Sampling.from_kwargs(
                max_tokens=r.max_tokens or self.default_max_tokens,
                temperature=0.0 if r.temperature is None else float(r.temperature),
                top_p=0.0 if r.top_p is None else float(r.top_p),
                seed=None if r.seed is None else r.seed & 0xFFFFFFFF,
                stop=r.stop,
            )
        except (LlavaNextError, TypeError, ValueError) as e:
            raise ApiError(400, str(e), code="invalid_request") from None
        return self._enqueue(Job(prepared, sampling))

    def submit_ocr(self, request) -> OcrJob:
        """Queue a document (server.documents.OcrRequest); the same queue and 429 as chat requests."""
        return self._enqueue(OcrJob(request))

    def _enqueue(self, job):
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the server is busy ({self._queue.maxsize} requests waiting); retry later",
                           type="server_busy", code="queue_full", headers={"Retry-After": "1"}) from None
        return job

    def queued(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        """Let the worker exit after the running job; jobs still queued are dropped."""
        self._stopping.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    # -- the worker -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopping.is_set():
                return
            if job.cancelled.is_set():
                continue
            self.busy, job.started = job, time.perf_counter()
            try:
                (self._ocr if isinstance(job, OcrJob) else self._generate)(job)
            except Exception as e:  # noqa: BLE001  (reported to the client; the worker goes on)
                job.outcome = "error"
                job.events.put(("error", e))
            finally:
                job.finished = time.perf_counter()
                if isinstance(job, Job):
                    job.prepared.images = []  # the decoded images are not needed any more
                if job.cancelled.is_set():  # nobody will read what is left (tokens hold logprobs)
                    while not job.events.empty():
                        job.events.get_nowait()
                self.busy = None
                self.finished = self.finished[-31:] + [job]

    def _generate(self, job: Job) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        from ..generate import _embed, _token_loop, context_length

        p = job.prepared
        cache, rest = self.prompt_cache.fetch_nearest_cache(CACHE_KEY, p.key)
        keep = len(p.key) - len(rest) if cache is not None else 0
        if cache is not None and keep == len(p.key):  # the whole prompt is cached: re-run its last token
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                keep -= 1
            else:
                cache = None
        if cache is None or keep < self.min_reuse_tokens:
            cache, keep = self.model.make_cache(), 0

        features = self._features_from(p, keep)
        embeddings = _embed(self.model, p.ids[keep:], features)
        # An answer may use what the context window leaves (as a request without max_tokens expects).
        room = max(1, context_length(self.model) - len(p.ids))
        opts = dataclasses.replace(job.sampling, max_tokens=min(job.sampling.max_tokens, room))
        generated: List[int] = []
        ok = False
        try:
            for response in _token_loop(self.model, self.processor, p.ids[keep:], embeddings, cache, opts,
                                        job.started, cached_tokens=keep):
                if job.cancelled.is_set():
                    job.outcome = "cancelled"
                    break
                generated.append(response.token)
                job.generated = len(generated)
                job.events.put(("token", response))
                job.outcome = response.finish_reason
            ok = True
        finally:
            if ok:
                self._store(p.key + generated, cache)
        job.events.put(("done", None))

    def _ocr(self, job: OcrJob) -> None:
        """The uploaded file in a private temporary folder, read by documents.engine.ocr_document (PDFium
        is used from this thread only); stops between pages when the client has gone."""
        import os
        import tempfile
        from pathlib import Path

        from ..documents import output
        from ..documents.engine import ocr_document
        from ..errors import LlavaNextError

        r = job.request

        def page_done(_record):
            job.pages_done += 1
            if job.cancelled.is_set():
                raise _Cancelled()

        with tempfile.TemporaryDirectory(prefix="llava-ocr-") as folder:
            path = Path(folder) / ("document.pdf" if r.kind == "pdf" else "document.image")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(r.data)
            try:
                document = ocr_document(self.model, self.processor, path, layout=r.layout, dpi=r.dpi, pages=r.pages,
                                        prompt=r.prompt, max_tokens=r.max_tokens, model_path=self.model_path,
                                        reader=self.reader, on_page=page_done)
            except _Cancelled:
                job.outcome = "cancelled"
                return
            except LlavaNextError as e:  # broken, truncated, encrypted, no pages, a page over the pixel limit
                message = " ".join(str(e).split()).replace(str(path), r.filename)
                message = message.replace("--pages", "`pages`").replace("--dpi", "`dpi`")  # this API's names
                job.outcome = "error"
                job.events.put(("error", ApiError(400, message, param="file", code="invalid_document")))
                return
        document["source"] = r.filename
        job.outcome = "stop"
        job.events.put(("result", (output.render(document, r.fmt), document)))
        job.events.put(("done", None))

    def _features_from(self, p: Prepared, keep: int) -> List[Any]:
        """Features of the image tokens at positions >= keep; the vision tower runs only on images
        neither in the prefix cache nor in the feature cache."""
        image_id = self.processor.image_token_id
        before = sum(1 for t in p.ids[:keep] if t == image_id)
        needed, start = [], 0
        for h, size in zip(p.hashes, p.sizes):
            n = self.processor.num_image_tokens(size)
            if start + n > before:
                needed.append((h, max(0, before - start)))
            start += n
        by_hash = dict(zip(p.hashes, p.images))
        found = {h: self.features.get(h) for h, _ in needed}
        missing = [h for h, f in found.items() if f is None]
        if missing:  # one vision-tower call over this request's new images
            pixels = self.processor.image_processor([by_hash[h] for h in missing])
            for h, f in zip(missing, self.model.encode_images(pixels["pixel_values"], pixels["image_sizes"])):
                found[h] = f
                self.features.put(h, f)
        return [found[h][offset:] for h, offset in needed]

    def _store(self, key: List[Any], cache) -> None:
        """Keep the cache for a later request that continues this conversation (aligned to what it holds)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        offset = cache[0].offset if cache else 0
        if offset > len(key):
            if not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, offset - len(key))
        key = key[:offset]
        if key:
            self.prompt_cache.insert_cache(CACHE_KEY, key, cache)
