"""`cli.py serve`: the OpenAI-compatible server (mlx_llava_next/server) on one loaded model."""

from pathlib import Path
from typing import Optional

import typer

from .common import DEFAULT_MODEL, fail, user_errors


def start_server(model, processor, model_id: str, *, host="127.0.0.1", port=8080, api_key=None, media_dir=None,
                 max_queue=16, max_tokens=512, cache_entries=4, cache_mb=2048, image_cache_mb=512,
                 max_body_mb=64, max_image_mb=20, fetch_timeout=10.0, allow_fetch=True, log=None, reader=None,
                 model_path=None):
    """A bound (not yet serving) Server with its Engine; call serve_forever() on it. `reader`: the model's
    line-reader settings (lines.py) for POST /v1/ocr; `model_path` names the model in OCR results."""
    from ..server.app import Server
    from ..server.engine import Engine
    from ..server.images import ImagePolicy

    engine = Engine(model, processor, model_id, max_queue=max_queue, default_max_tokens=max_tokens,
                    cache_entries=cache_entries, cache_bytes=cache_mb << 20, image_cache_bytes=image_cache_mb << 20,
                    reader=reader, model_path=model_path)
    policy = ImagePolicy(media_dir=str(media_dir) if media_dir else None, max_bytes=max_image_mb << 20,
                         timeout=fetch_timeout, allow_remote=allow_fetch)
    return Server(engine, host, port, api_key=api_key, images=policy, max_body_bytes=max_body_mb << 20, log=log)


def serve_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id, local model directory (HF or converted MLX), GGUF, or 'demo'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLAVA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*."),
    media_dir: Optional[Path] = typer.Option(None, "--media-dir", help="Allow file:// image URLs below this directory (refused otherwise)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait for the model; more get 429."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Default max_tokens when a request gives none."),
    cache_entries: int = typer.Option(4, "--cache-entries", help="Conversation KV caches kept for follow-ups."),
    cache_mb: int = typer.Option(2048, "--cache-mb", help="Memory cap of those KV caches (MiB)."),
    image_cache_mb: int = typer.Option(512, "--image-cache-mb", help="Memory cap of cached image features (MiB)."),
    max_body_mb: int = typer.Option(64, "--max-body-mb", help="Largest request body (MiB); more gets 413."),
    fetch: bool = typer.Option(True, "--fetch/--no-fetch", help="Fetch http(s) image URLs (timeout and size cap apply)."),
    fetch_timeout: float = typer.Option(10.0, "--fetch-timeout", help="Seconds for one http(s) image fetch."),
    kv_cache: str = typer.Option("auto", "--kv-cache", help="KV-cache dtype: auto (float16 for quantized models on the x86 fast path), float16 or float32."),
    exact: Optional[bool] = typer.Option(None, "--exact/--int8", help="4-bit layers on x86: float32 activations (results equal to MLX's) or int8 ones (the default: faster, within the README's quality gate)."),
):
    """Serve the model over the OpenAI chat-completions API, with a chat page at /.

    Example: python cli.py serve --model llava-hf/llava-v1.6-mistral-7b-hf --port 8080
    """
    from .generate import kv_cache_choice, line_reader, load_model, resolve_model_arg

    if media_dir is not None and not media_dir.is_dir():
        fail(f"--media-dir {media_dir}: not a directory")
    with user_errors():
        kv = kv_cache_choice(kv_cache, None)
        typer.echo(f"loading {model} ...", err=True)
        m, processor = load_model(model, exact)
        m.kv_cache = kv  # None: kv_cache.py's default policy
        reader, model_path = line_reader(model), str(resolve_model_arg(model))  # for POST /v1/ocr, as cli.py ocr
    try:
        server = start_server(m, processor, model, host=host, port=port, api_key=api_key, media_dir=media_dir,
                              max_queue=max_queue, max_tokens=max_tokens, cache_entries=cache_entries,
                              cache_mb=cache_mb, image_cache_mb=image_cache_mb, max_body_mb=max_body_mb,
                              fetch_timeout=fetch_timeout, allow_fetch=fetch,
                              log=lambda line: typer.echo(line, err=True), reader=reader, model_path=model_path)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    if not server.loopback_only and api_key is None:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
                   err=True)
    typer.echo(f"serving {model} on http://{host}:{server.server_port}/ (OpenAI API under /v1; Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
