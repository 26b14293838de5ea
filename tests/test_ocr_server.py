"""`POST /v1/ocr` (cli.py serve -> documents.engine): driven over real HTTP (urllib / raw sockets), its answers
checked against `cli.py ocr`'s output files for the same document; bad documents, limits and disconnects."""

import base64
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmarks.document_ocr import cer, document, save_pdf
from cli import app
from mlx_llava_next.commands.serve import start_server
from test_documents import build_pdf, png_header_only, small_pages

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"
KEY = "sekrit"


class Running:
    """A server on a free port of 127.0.0.1, serving from a thread of this process."""

    def __init__(self, model, processor, model_path, **options):
        self.server = start_server(model, processor, "tiny-llava", port=0, model_path=model_path, **options)
        self.engine = self.server.engine
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.engine.stop()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def server(tiny):
    from mlx_llava_next import load

    running = Running(*load(tiny.path), str(tiny.path), api_key=KEY, max_body_mb=1, max_queue=1)
    yield running
    running.close()


@pytest.fixture(scope="module")
def four_pages(tmp_path_factory):
    return save_pdf(tmp_path_factory.mktemp("pdf") / "doc.pdf", small_pages(4, seed=3), 100)


def post(url, body=None, *, key=KEY, raw=None, content_type="application/json", timeout=120):
    """(status, content type, body bytes) of a POST /v1/ocr through urllib."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/ocr", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def cli_ocr(path, out, *args):
    result = CliRunner().invoke(app, ["ocr", str(path), "--out", str(out), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def no_seconds(doc):
    return {**doc, "pages": [{k: v for k, v in p.items() if k != "seconds"} for p in doc["pages"]]}


def test_ocr_endpoint_answers_what_cli_ocr_writes(tiny, server, four_pages, tmp_path):
    options = ["--pages", "1-2,4", "--dpi", 100, "--layout", "whole", "--max-tokens", 6]
    body = {"file": b64(four_pages), "filename": str(four_pages), "pages": "1-2,4", "dpi": 100, "layout": "whole",
            "max_tokens": 6}
    for fmt, ctype in [("json", "application/json"), ("txt", "text/plain"), ("md", "text/markdown"),
                       ("jsonl", "application/x-ndjson")]:
        cli_ocr(four_pages, tmp_path / "cli", *options, "--model", tiny.path, "--format", fmt)
        expected = (tmp_path / "cli" / f"doc.{fmt}").read_text()
        status, content_type, got = post(server.url, {**body, "format": fmt})
        assert status == 200 and content_type.startswith(ctype), got
        got = got.decode()
        if fmt == "json":
            assert no_seconds(json.loads(got)) == no_seconds(json.loads(expected))
            assert [p["page"] for p in json.loads(got)["pages"]] == [1, 2, 4]
        elif fmt == "jsonl":
            rows = lambda t: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in t.splitlines()]
            assert rows(got) == rows(expected)
        else:
            assert got == expected  # the same bytes as the CLI's file
    # an image, as a data: URI, with the default filename
    image = tmp_path / "page.png"
    small_pages(1, seed=9)[0].save(image)
    cli_ocr(image, tmp_path / "cli", "--model", tiny.path, "--max-tokens", 6, "--format", "json")
    expected = json.loads((tmp_path / "cli" / "page.json").read_text())
    status, _, got = post(server.url, {"file": "data:image/png;base64," + b64(image), "max_tokens": 6})
    got = json.loads(got)
    assert status == 200 and got["source"] == "upload"
    assert no_seconds(got)["pages"] == no_seconds(expected)["pages"] and got["settings"] == expected["settings"]


def test_bad_documents_and_limits_are_openai_errors(server, four_pages, tmp_path):
    whole = four_pages.read_bytes()
    catalog = "<< /Type /Catalog /Pages 2 0 R >>"
    encrypted = build_pdf(
        [catalog, "<< /Type /Pages /Kids [3 0 R] /Count 1 >>", "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
         f"<< /Filter /Standard /V 1 /R 2 /O <{'11' * 32}> /U <{'22' * 32}> /P -4 >>"],
        f"/Encrypt 4 0 R /ID [<{'33' * 16}> <{'33' * 16}>] ")
    enc = lambda data: base64.b64encode(data).decode()
    cases = [
        ({"file": enc(whole[: len(whole) // 2]), "filename": "half.pdf"}, 400, "invalid_document", "half.pdf: truncated"),
        ({"file": enc(encrypted)}, 400, "invalid_document", "encrypted"),
        ({"file": enc(build_pdf([catalog, "<< /Type /Pages /Kids [] /Count 0 >>"]))}, 400, "invalid_document", "no pages"),
        ({"file": enc(png_header_only(20000, 20000))}, 400, "invalid_document", "decompression"),
        ({"file": enc(b"just some text, not a document")}, 415, "unsupported_media_type", "neither a PDF"),
        ({"file": "%%% not base64"}, 400, "invalid_document", "base64"),
        ({"file": enc(whole), "pages": "3-1"}, 400, None, "backwards"),
        ({"file": enc(whole), "pages": "9"}, 400, "invalid_document", "`pages` selects no page"),
        ({"file": enc(whole), "format": "docx"}, 400, None, "`format`"),
        ({"file": enc(whole), "layout": "columns"}, 400, None, "`layout`"),
        ({"file": enc(whole), "dpi": 5}, 400, None, "`dpi`"),
        ({"file": enc(whole), "page": "1"}, 400, "unsupported_parameter", "unknown field `page`"),
        ({"pages": "1"}, 400, None, "`file` is required"),
    ]
    for body, status, code, needle in cases:
        got_status, ctype, payload = post(server.url, body)
        error = json.loads(payload)["error"]
        assert (got_status, ctype) == (status, "application/json") and needle in error["message"], (body.keys(), error)
        assert code is None or error["code"] == code, error
        assert "Traceback" not in error["message"] and "/tmp/llava-ocr-" not in error["message"]
    assert post(server.url, {"file": enc(whole)}, key=None)[0] == 401
    assert post(server.url, {"file": enc(whole)}, key="wrong")[0] == 401
    assert post(server.url, raw=b"{}", content_type="application/pdf")[0] == 415
    with pytest.raises(urllib.error.HTTPError) as got:
        urllib.request.urlopen(server.url + "/v1/ocr", timeout=30)
    assert got.value.code == 405 and json.loads(got.value.read())["error"]["code"] == "method_not_allowed"
    # 413 from the headers alone: a 5 MB body over the 1 MiB limit is not read
    with socket.create_connection(("127.0.0.1", server.server.server_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/ocr HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sekrit\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n{")
        head, _, payload = sock.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 413") and json.loads(payload)["error"]["code"] == "request_too_large"
    status, _, payload = post(server.url, {"file": enc(whole), "pages": "1", "layout": "whole", "max_tokens": 2})
    assert status == 200 and [p["page"] for p in json.loads(payload)["pages"]] == [1]  # still serving


def test_queue_full_and_disconnect_cancels_between_pages(server, tmp_path):
    pdf = save_pdf(tmp_path / "long.pdf", small_pages(30, seed=5), 100)
    body = json.dumps({"file": b64(pdf), "layout": "whole", "dpi": 100, "max_tokens": 12}).encode()
    head = (b"POST /v1/ocr HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    engine = server.engine
    socks = []
    try:
        for _ in range(2):  # one runs, one waits (--max-queue 1)
            sock = socket.create_connection(("127.0.0.1", server.server.server_port), timeout=30)
            sock.sendall(head + body)
            socks.append(sock)
            deadline = time.time() + 20
            while not (engine.busy and (len(socks) == 1 or engine.queued() == 1)) and time.time() < deadline:
                time.sleep(0.01)
        status, _, payload = post(server.url, {"file": b64(pdf), "pages": "1"})
        assert status == 429 and json.loads(payload)["error"]["code"] == "queue_full"
        running = engine.busy
    finally:
        for sock in socks:
            sock.close()
    deadline = time.time() + 60
    while (engine.busy or engine.queued()) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.busy is None and engine.queued() == 0
    assert running.outcome == "cancelled" and 1 <= running.pages_done < 30  # stopped after its current page


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="models/demo is not installed")
def test_cli_serve_demo_model_reads_lines_like_cli_ocr(tmp_path):
    """`cli.py serve --model demo` hands the document engine the demo model's line reader, as `ocr` does."""
    images, texts = document(1, 4, 150, 11, seed=11)
    page = images[0].crop((0, 0, images[0].width, 330))  # the 4 lines, not the letter page's blank rest
    pdf = save_pdf(tmp_path / "lines.pdf", [page], 150)
    cli_ocr(pdf, tmp_path / "cli", "--model", "demo", "--format", "json")
    expected = json.loads((tmp_path / "cli" / "lines.json").read_text())
    assert cer(texts[0], expected["pages"][0]["text"]) < 0.1  # the line reader is what reads it
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--model", "demo", "--port", "0"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
        url = line.split(" on ")[1].split()[0].rstrip("/")
        status, _, got = post(url, {"file": b64(pdf), "filename": str(pdf)}, key=None)
        assert status == 200, got
        assert no_seconds(json.loads(got)) == no_seconds(expected)
    finally:
        proc.terminate()
        proc.wait(30)
