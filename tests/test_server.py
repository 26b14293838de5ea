"""`cli.py serve`: the OpenAI-compatible server on a tiny checkpoint, driven by the real `openai`
client (answers equal `cli.py generate`'s, token for token), under load (16 concurrent streams,
disconnects), with every bad-request class, and its chat page in a headless Chromium."""

import base64
import http.client
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai  # the real client (in the test extra)
import pytest

from conftest import random_image
from mlx_llava_next import generate, load, stream_generate
from mlx_llava_next.commands.serve import serve_command, start_server

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is shown?"
MAX_TOKENS = 12


# -- fixtures -----------------------------------------------------------------------------


class Running:
    """A server on a free port of 127.0.0.1, serving from a thread of this process."""

    def __init__(self, model, processor, **options):
        self.server = start_server(model, processor, "tiny-llava", port=0, **options)
        self.engine = self.server.engine
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.engine.stop()


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    return tiny_checkpoint("mistral")


@pytest.fixture(scope="module")
def served_model(ck):
    """The server's own copy of the model (the tests' oracle uses ck.load())."""
    return load(ck.path)


@pytest.fixture(scope="module")
def server(served_model):
    running = Running(*served_model, max_queue=32)
    yield running
    running.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "inside").mkdir()
    random_image(70, 100, seed=5).save(root / "inside" / "ok.png")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    random_image(70, 100, seed=6).save(outside)
    (root / "inside" / "link.png").symlink_to(outside)
    return root / "inside", outside


@pytest.fixture(scope="module")
def strict(served_model, media):
    """A locked-down server: API key, media dir, a queue of one, small body and fetch limits."""
    running = Running(*served_model, api_key="sekrit", media_dir=media[0], max_queue=1, max_body_mb=1,
                      fetch_timeout=1.0)
    yield running
    running.close()


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text, *urls):
    return {"role": "user", "content": [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


def hf_prompt_tokens(ck, messages, images) -> int:
    """Prompt length by transformers' own processor and the checkpoint's template (the oracle)."""
    def parts(content):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        return [{"type": "image"} if p["type"] == "image_url" else p for p in content]

    hf_messages = [{"role": m["role"], "content": parts(m["content"])} for m in messages]
    text = ck.hf_processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    return ck.hf_processor(text=text, images=images or None, return_tensors="np")["input_ids"].shape[1]


def count_encodes(model, monkeypatch):
    calls = []
    encode = model.encode_images

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return encode(*args, **kwargs)

    monkeypatch.setattr(model, "encode_images", counting)
    return calls


# -- 1. the openai client: answers equal `cli.py generate`'s ------------------------------


def test_openai_client_answers_equal_cli_generate_and_follow_up_is_cached(ck, server, tmp_path, monkeypatch):
    image = random_image(90, 150, seed=1)
    path = tmp_path / "img.png"
    image.save(path)
    proc = subprocess.run([sys.executable, "cli.py", "generate", "--model", str(ck.path), "--image", str(path),
                           "--prompt", QUESTION, "--max-tokens", str(MAX_TOKENS), "--json"],
                          cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    cli = json.loads(proc.stdout)
    expected_finish = "stop" if cli["tokens"][-1] == ck.hf_processor.tokenizer.eos_token_id else "length"
    client = server.client()
    messages = [user(QUESTION, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())]
    n_prompt = hf_prompt_tokens(ck, messages, [image])

    reply = client.chat.completions.create(model="tiny-llava", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == cli["text"]
    assert reply.choices[0].finish_reason == expected_finish == cli["finish_reason"]
    assert reply.usage.completion_tokens == len(cli["tokens"])
    assert reply.usage.prompt_tokens == n_prompt
    assert reply.usage.total_tokens == n_prompt + len(cli["tokens"])
    assert reply.id.startswith("chatcmpl-") and reply.model == "tiny-llava" and reply.object == "chat.completion"

    # Streaming: one chunk per token that completes text, exactly as our stream_generate yields them.
    model, processor = ck.load()
    expected_deltas = [r.text for r in stream_generate(model, processor, QUESTION, [image], max_tokens=MAX_TOKENS) if r.text]
    assert "".join(expected_deltas) == cli["text"]
    stream = client.chat.completions.create(model="tiny-llava", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == expected_deltas
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [expected_finish]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens == n_prompt and usage.completion_tokens == len(cli["tokens"])
    assert len({c.id for c in chunks}) == 1

    # Follow-up turn: the earlier conversation is served from the prefix cache, no vision tower run.
    encodes = count_encodes(server.engine.model, monkeypatch)
    follow = messages + [{"role": "assistant", "content": cli["text"]}, user("And what colour is it?")]
    reply2 = client.chat.completions.create(model="tiny-llava", messages=follow, temperature=0, max_tokens=MAX_TOKENS)
    assert encodes == []
    n_follow = hf_prompt_tokens(ck, follow, [image])
    cached = reply2.usage.prompt_tokens_details.cached_tokens
    assert reply2.usage.prompt_tokens == n_follow
    assert n_prompt <= cached < n_follow
    # ... and the cache changes nothing: a fresh generation over the whole conversation agrees.
    hf_follow = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                 {"role": "assistant", "content": cli["text"]}, {"role": "user", "content": "And what colour is it?"}]
    fresh = generate(model, processor, hf_follow, [image], max_tokens=MAX_TOKENS)
    assert reply2.choices[0].message.content == fresh.text
    assert reply2.usage.completion_tokens == fresh.generation_tokens

    # A new conversation (another system prompt: no shared prefix) with the same image: its
    # features come from the image cache, the vision tower still does not run.
    system = [{"role": "system", "content": "You describe pictures."}] + messages
    reply3 = client.chat.completions.create(model="tiny-llava", messages=system, temperature=0, max_tokens=MAX_TOKENS)
    assert encodes == [] and reply3.usage.prompt_tokens_details.cached_tokens == 0
    assert reply3.usage.prompt_tokens == hf_prompt_tokens(ck, system, [image])
    assert reply3.choices[0].message.content == generate(model, processor, QUESTION, [image], system="You describe pictures.",
                                                         max_tokens=MAX_TOKENS).text
    # ... while a new image is encoded, once.
    other = [user(QUESTION, data_uri(random_image(100, 70, seed=2)))]
    client.chat.completions.create(model="tiny-llava", messages=other, temperature=0, max_tokens=2)
    assert encodes == [1]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_data_uri_image_formats(ck, server, fmt):
    image = random_image(70, 90, seed=11)
    if fmt == "GIF":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    reply = server.client().chat.completions.create(
        model="x", messages=[user(QUESTION, b64(buffer.getvalue(), f"image/{fmt.lower()}"))], max_tokens=3)
    model, processor = ck.load()
    assert reply.choices[0].message.content == generate(model, processor, QUESTION, [buffer.getvalue()], max_tokens=3).text


def test_sampling_parameters(ck, server):
    model, processor = ck.load()
    client = server.client()
    image = random_image(80, 120, seed=12)
    messages = [user(QUESTION, data_uri(image))]
    greedy = generate(model, processor, QUESTION, [image], max_tokens=10).text
    # stop: the text ends before the first stop string, finish_reason "stop"
    stop = greedy[len(greedy) // 2:][:3]
    reply = client.chat.completions.create(model="x", messages=messages, max_tokens=10, stop=[stop])
    assert reply.choices[0].message.content == greedy[:greedy.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    # temperature + top_p + seed: reproducible, and what generate() samples with the same options
    sampled = [client.chat.completions.create(model="x", messages=messages, max_tokens=10, temperature=1.0, top_p=0.9,
                                              seed=7).choices[0].message.content for _ in range(2)]
    expected = generate(model, processor, QUESTION, [image], max_tokens=10, temperature=1.0, top_p=0.9, seed=7).text
    assert sampled == [expected, expected] and expected != greedy
    # max_completion_tokens is max_tokens' newer name
    reply = client.chat.completions.create(model="x", messages=messages, max_completion_tokens=4)
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"


def test_cache_memory_is_bounded(served_model):
    from mlx_llava_next.server.engine import FeatureCache

    def conversation(client, seed):
        first = [user(QUESTION, data_uri(random_image(60, 90, seed=seed)))]
        answer = client.chat.completions.create(model="x", messages=first, max_tokens=4).choices[0].message.content
        follow = first + [{"role": "assistant", "content": answer}, user("More?")]
        return client.chat.completions.create(model="x", messages=follow, max_tokens=4).usage.prompt_tokens_details.cached_tokens

    small = Running(*served_model, cache_entries=2)
    try:
        client = small.client()
        assert [conversation(client, seed) > 0 for seed in (20, 21, 22)] == [True] * 3
        assert len(small.engine.prompt_cache) == 2  # the oldest conversation was dropped
    finally:
        small.close()
    no_room = Running(*served_model, cache_mb=0)  # a byte budget of 0 keeps nothing
    try:
        assert conversation(no_room.client(), 23) == 0 and len(no_room.engine.prompt_cache) == 0
    finally:
        no_room.close()
    import mlx.core as mx

    features = FeatureCache(max_entries=3, max_bytes=1000)
    for i in range(5):
        features.put(str(i), mx.zeros((100,), dtype=mx.float32))  # 400 bytes each
    assert len(features) == 2 and features.nbytes == 800 and features.get("4") is not None and features.get("0") is None


# -- 2. load: concurrent streams, disconnects ----------------------------------------------


def test_16_concurrent_streams_each_get_their_solo_answer(ck, server):
    model, processor = ck.load()
    jobs = []
    for i in range(16):
        image = random_image(60 + 7 * i, 140 - 5 * i, seed=100 + i)
        question = f"Question {i}: what is in picture number {i}?"
        solo = generate(model, processor, question, [image], max_tokens=8).text
        jobs.append((question, image, solo))
    client = server.client()
    results, errors = [None] * 16, []
    barrier = threading.Barrier(16)

    def ask(i):
        question, image, _ = jobs[i]
        try:
            barrier.wait()
            stream = client.chat.completions.create(model="x", messages=[user(question, data_uri(image))],
                                                    temperature=0, max_tokens=8, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == [solo for _, _, solo in jobs]
    assert len(set(results)) > 1  # the prompts really differ in their answers


def test_disconnect_mid_stream_frees_the_model(server):
    messages = [user("Tell me a very long story.", data_uri(random_image(80, 80, seed=9)))]
    body = json.dumps({"messages": messages, "stream": True, "max_tokens": 100000, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.0 200")
    events = 0
    while events < 6:  # a few tokens: the long generation is running
        events += reader.readline().startswith(b"data: ")
    long_job = server.engine.busy
    assert long_job is not None and long_job.outcome is None
    reader.close()
    sock.close()  # the client goes away mid-stream

    started = time.perf_counter()
    stream = server.client().chat.completions.create(model="x", messages=[user("Hi")], max_tokens=2, stream=True)
    first = next(iter(stream))
    waited = time.perf_counter() - started
    list(stream)
    assert first.choices[0].delta.role == "assistant"
    print(f"next request waited {waited:.3f} s; the cancelled one had generated {long_job.generated} tokens")
    assert waited < 1.0, f"the next request waited {waited:.2f} s"
    assert long_job.outcome == "cancelled" and long_job.generated < 1000


# -- 3. bad requests -----------------------------------------------------------------------


def request(running, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(text) if text else None


def bomb_png() -> bytes:
    """A PNG header claiming 60000x60000 pixels (3.6 gigapixels) over a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


GOOD_IMAGE = random_image(60, 80, seed=3)
BAD_REQUESTS = {
    # name: (json body or raw bytes, expected status, expected param or None)
    "bad json": (b"{not json", 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "no messages": ({"model": "x"}, 400, "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    "bad temperature": ({"messages": [user("hi")], "temperature": "hot"}, 400, "temperature"),
    "max_tokens 0": ({"messages": [user("hi")], "max_tokens": 0}, 400, "max_tokens"),
    "n > 1": ({"messages": [user("hi")], "n": 2}, 400, "n"),
    "tools": ({"messages": [user("hi")], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "bad part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]"),
    "undecodable image": ({"messages": [user("hi", b64(b"this is not a picture"))]}, 400, "messages[0].content[1].image_url"),
    "bad base64": ({"messages": [user("hi", "data:image/png;base64,@@@")]}, 400, "messages[0].content[1].image_url"),
    "bomb image": ({"messages": [user("hi", b64(bomb_png()))]}, 400, "messages[0].content[1].image_url"),
    "marker mismatch": ({"messages": [user("compare <image> with this", data_uri(GOOD_IMAGE))]}, 400, "messages"),
    "prompt too long": ({"messages": [user("word " * 5000)]}, 400, "messages"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}', 400, "messages[0].content"),
    "too many images": ({"messages": [user("hi", *["data:image/png;base64,AAAA"] * 17)]}, 400, "messages"),
    "unknown scheme": ({"messages": [user("hi", "ftp://example.com/a.png")]}, 400, "messages[0].content[1].image_url"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_stays_up(server, name):
    body, status, param = BAD_REQUESTS[name]
    raw = body if isinstance(body, bytes) else None
    got, _, error = request(server, "POST", "/v1/chat/completions", body=None if raw else body, raw=raw)
    assert got == status
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert error["error"]["param"] == param
    assert request(server, "GET", "/health")[0] == 200


def test_routes_auth_body_size_and_content_type(strict):
    key = {"Authorization": "Bearer sekrit"}
    checks = [
        (request(strict, "GET", "/nope"), 404, "not_found"),
        (request(strict, "GET", "/v1/chat/completions", headers=key), 405, "method_not_allowed"),
        (request(strict, "POST", "/v1/completions", {"prompt": "x"}, key), 404, "not_found"),
        (request(strict, "POST", "/v1/chat/completions", {"messages": [user("hi")]}), 401, "invalid_api_key"),
        (request(strict, "POST", "/v1/chat/completions", {"messages": [user("hi")]}, {"Authorization": "Bearer wrong"}), 401, "invalid_api_key"),
        (request(strict, "GET", "/v1/models"), 401, "invalid_api_key"),
        (request(strict, "POST", "/v1/chat/completions", raw=b"{}", headers={**key, "Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        # DNS rebinding: a page served as evil.example that resolves to 127.0.0.1 gets nothing.
        (request(strict, "GET", "/v1/models", headers={**key, "Host": "evil.example:8080"}), 403, "host_not_allowed"),
        (request(strict, "GET", "/", headers={"Host": "evil.example"}), 403, "host_not_allowed"),
    ]
    for (status, _, body), expected, code in checks:
        assert status == expected and body["error"]["code"] == code, body
        assert request(strict, "GET", "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        strict.client("wrong").chat.completions.create(model="x", messages=[user("hi")])
    assert request(strict, "GET", "/v1/models", headers={**key, "Host": f"localhost:{strict.port}"})[0] == 200
    assert strict.client("sekrit").chat.completions.create(model="x", messages=[user("hi")], max_tokens=2).usage.completion_tokens >= 1

    # 413: the server answers from the headers alone, without reading the 5 MB body.
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sekrit\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n{")
        reply = sock.makefile("rb").read()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 413") and json.loads(payload)["error"]["code"] == "request_too_large"
    assert request(strict, "GET", "/health")[0] == 200


def test_default_bind_is_localhost(served_model):
    import inspect

    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_command).parameters["host"].default.default == "127.0.0.1"
    running = Running(*served_model)
    try:
        assert running.server.server_address[0] == "127.0.0.1"
    finally:
        running.close()


@pytest.mark.slow  # a second Python process loading everything (~5 s, more on a busy machine)
def test_cli_serve_binds_localhost_and_stops_on_ctrl_c(ck, tmp_path):
    import signal

    from typer.testing import CliRunner

    from cli import app

    bad = CliRunner().invoke(app, ["serve", "--model", str(ck.path), "--media-dir", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and bad.stderr.strip().splitlines() == [f"error: --media-dir {tmp_path / 'nope'}: not a directory"]
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--model", str(ck.path), "--port", "0"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
        url = line.split(" on ")[1].split()[0].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        if os.path.exists("/proc/net/tcp"):  # the listening socket is on 127.0.0.1 only
            rows = [r.split() for r in Path("/proc/net/tcp").read_text().splitlines()[1:]]
            listening = {r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port}
            assert listening == {f"0100007F:{port:04X}"}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["model"] == str(ck.path)
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0 and "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_file_urls_only_below_media_dir(ck, strict, server, media):
    inside, outside = media
    key = {"Authorization": "Bearer sekrit"}
    ok = {"messages": [user("hi", (inside / "ok.png").as_uri())], "max_tokens": 3}
    status, _, body = request(strict, "POST", "/v1/chat/completions", ok, key)
    assert status == 200, body
    model, processor = ck.load()
    assert body["choices"][0]["message"]["content"] == generate(model, processor, "hi", [inside / "ok.png"], max_tokens=3).text
    for url in [outside.as_uri(), (inside / "link.png").as_uri(), (inside / ".." / ".." / outside.parent.name / "secret.png").as_uri(),
                "file:///etc/passwd"]:
        status, _, body = request(strict, "POST", "/v1/chat/completions", {"messages": [user("hi", url)]}, key)
        assert status == 400 and body["error"]["code"] == "image_url_refused", (url, body)
        assert request(strict, "GET", "/health")[0] == 200
    # Without --media-dir every file:// URL is refused.
    status, _, body = request(server, "POST", "/v1/chat/completions", ok)
    assert status == 400 and "--media-dir" in body["error"]["message"]


class _Images(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_image_urls_fetched_with_limits(ck, strict, tmp_path):
    random_image(64, 96, seed=7).save(tmp_path / "pic.png")
    (tmp_path / "big.png").write_bytes(b"\0" * (21 << 20))
    files = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Images(*a, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)  # accepts the connection, never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    key = {"Authorization": "Bearer sekrit"}
    base = f"http://127.0.0.1:{files.server_port}"
    try:
        body = {"messages": [user("hi", f"{base}/pic.png")], "max_tokens": 3}
        status, _, reply = request(strict, "POST", "/v1/chat/completions", body, key)
        assert status == 200, reply
        model, processor = ck.load()
        assert reply["choices"][0]["message"]["content"] == generate(model, processor, "hi", [tmp_path / "pic.png"], max_tokens=3).text
        for url, needle in [(f"{base}/missing.png", "HTTP 404"), (f"{base}/big.png", "byte limit"),
                            (f"http://127.0.0.1:{closed_port}/x.png", "fetching the image failed"),
                            (f"http://127.0.0.1:{stalled.getsockname()[1]}/x.png", "fetching the image failed")]:
            started = time.perf_counter()
            status, _, reply = request(strict, "POST", "/v1/chat/completions", {"messages": [user("hi", url)]}, key)
            assert status == 400 and needle in reply["error"]["message"], (url, reply)
            assert time.perf_counter() - started < 5  # fetch timeout is 1 s here: never a hang
            assert request(strict, "GET", "/health")[0] == 200
    finally:
        files.shutdown()
        stalled.close()


def test_full_queue_gets_429_with_retry_after(strict):
    key = {"Authorization": "Bearer sekrit"}
    long = json.dumps({"messages": [user("Tell a long story")], "stream": True, "max_tokens": 100000})
    conns = []
    try:
        for _ in range(2):  # one runs, one waits (--max-queue 1)
            conn = http.client.HTTPConnection("127.0.0.1", strict.port, timeout=30)
            conn.request("POST", "/v1/chat/completions", long, {"Content-Type": "application/json", **key})
            conns.append(conn)
            deadline = time.time() + 10
            while not (strict.engine.busy and (len(conns) == 1 or strict.engine.queued() == 1)) and time.time() < deadline:
                time.sleep(0.01)
        status, headers, body = request(strict, "POST", "/v1/chat/completions", {"messages": [user("hi")]}, key)
        assert status == 429 and headers.get("Retry-After") == "1" and body["error"]["code"] == "queue_full"
        assert request(strict, "GET", "/health")[0] == 200
    finally:
        for conn in conns:
            conn.close()
    deadline = time.time() + 5
    while (strict.engine.busy or strict.engine.queued()) and time.time() < deadline:
        time.sleep(0.05)
    assert strict.engine.busy is None and strict.engine.queued() == 0  # both were cancelled by the disconnects


# -- 4. the chat page in a real browser ----------------------------------------------------


class WebDriver:
    """Just enough of the W3C WebDriver protocol to drive Chromium through chromedriver (JSON over
    HTTP, standard library only)."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, chromium, chromedriver, profile):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen([chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.process.kill()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,800"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.loads(response.read())["value"]

    def call(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self.call("POST", "/url", {"url": url})

    def find(self, css):
        return self.call("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def type(self, css, text, clear=False):
        element = self.find(css)
        if clear:
            self.call("POST", f"/element/{element}/clear", {})
        self.call("POST", f"/element/{element}/value", {"text": text})

    def click(self, css):
        self.call("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script, *args):
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script, timeout=30):
        deadline = time.time() + timeout
        while not self.js(script):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for: {script}")
            time.sleep(0.05)

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.call("GET", "/screenshot")))

    def quit(self):
        try:
            self.call("DELETE", "")
        finally:
            self.process.terminate()
            self.process.wait(10)


IDLE_WITH = "return document.querySelectorAll('.stats').length == arguments[0] && document.body.dataset.state == 'idle'"
LAST_ANSWER = "const a = document.querySelectorAll('.msg.assistant .text'); return a[a.length - 1].textContent"


def test_chat_page_in_headless_chromium(ck, server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver "
                    f"(missing: {'chromium' if not chromium else 'chromedriver'}; apt-get install chromium chromium-driver)")
    scan = REPO / "examples" / "scan.png"
    question = "What does this scan say?"
    model, processor = ck.load()
    expected = generate(model, processor, question, [scan], max_tokens=MAX_TOKENS).text
    browser = WebDriver(chromium, chromedriver, tmp_path / "profile")
    try:
        browser.get(server.url + "/")
        assert "mlx-llava-next" in browser.call("GET", "/title")
        browser.type("#file", str(scan))  # a real file chosen in the file input
        browser.wait("return document.querySelector('#preview img') !== null", timeout=10)
        browser.type("#max-tokens", str(MAX_TOKENS), clear=True)
        browser.type("#prompt", question)
        browser.click("#send")
        browser.wait(IDLE_WITH.replace("arguments[0]", "1"))
        answer = browser.js(LAST_ANSWER)
        assert answer == expected
        assert browser.js("return document.querySelector('.msg.user img').src").startswith("data:image/png;base64,")

        # A follow-up: the page sends the whole conversation, the server answers from its cache.
        follow = "And who signed it?"
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": answer}, {"role": "user", "content": follow}]
        browser.type("#prompt", follow)
        browser.click("#send")
        browser.wait(IDLE_WITH.replace("arguments[0]", "2"))
        assert browser.js(LAST_ANSWER) == generate(model, processor, conversation, [scan], max_tokens=MAX_TOKENS).text
        stats = browser.js("const s = document.querySelectorAll('.stats'); return s[s.length - 1].textContent")
        cached = int(stats.split("(")[1].split(" cached")[0])
        assert cached > 0, stats

        # Stop: a long answer is cut by the Stop button, and the server stops generating it.
        browser.type("#max-tokens", "3000", clear=True)
        browser.type("#prompt", "Tell me everything.")
        browser.click("#send")
        browser.wait("const a = document.querySelectorAll('.msg.assistant .text'); return a.length == 3 && a[2].textContent.length > 5")
        browser.click("#stop")
        browser.wait("return document.body.dataset.state == 'idle'", timeout=10)
        assert browser.js("const s = document.querySelectorAll('.stats'); return s[s.length - 1].textContent") == "stopped"
        deadline = time.time() + 2
        while server.engine.busy is not None and time.time() < deadline:
            time.sleep(0.02)
        assert server.engine.busy is None and server.engine.finished[-1].outcome == "cancelled"

        shot = tmp_path / "chat.png"
        browser.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
        print(f"screenshot: {shot}; stats: {stats}; stopped after {server.engine.finished[-1].generated} tokens")
    finally:
        browser.quit()
