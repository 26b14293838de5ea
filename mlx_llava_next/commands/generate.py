"""`chat`, `generate`, `ocr` and `info`: the commands a user runs against a model."""

import json
import os
import signal
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import CheckpointError, LlavaNextError, OutputError
from .common import DEFAULT_MODEL, user_errors

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_DIR = REPO_ROOT / "models" / "demo"

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# The OCR instruction, per chat-template family (chat_templates.family); one place to tune it.
OCR_PROMPTS = {
    "default": "Transcribe all the text in this image exactly as written, line by line. Output only the text.",
}

# -- shared options -----------------------------------------------------------------------

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local model directory (HF or converted MLX), GGUF, or 'demo'.")
]
ImagesOpt = Annotated[Optional[List[str]], typer.Option("--image", "-i", help="Image file (repeatable).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate per answer.")]
TempOpt = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (0: off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0: off).")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Min-p sampling threshold (0: off).")]
RepetitionOpt = Annotated[Optional[float], typer.Option("--repetition-penalty", help="e.g. 1.1 (default: off).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible sampling.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print speed and memory stats to stderr.")]
ExactOpt = Annotated[Optional[bool], typer.Option(
    "--exact/--int8", help="4-bit layers on x86: float32 activations (results equal to MLX's) or int8 ones (the default: faster, within the README's quality gate).")]
DistributedOpt = Annotated[Optional[str], typer.Option(
    "--distributed", help="Split the language model over the ranks of mlx.launch: tensor or pipeline (qwen2).")]
KvCacheOpt = Annotated[str, typer.Option(
    "--kv-cache", help="KV cache dtype: auto (float16 for quantized models on the CPU fast path, else "
    "mlx-lm's cache in the model's dtype), float16 or float32.")]


def resolve_model_arg(name: str) -> str:
    """`demo` -> the embedded demo model (<repo>/models/demo); anything else as given."""
    if name == "demo":
        if (DEMO_MODEL_DIR / "config.json").exists():
            return str(DEMO_MODEL_DIR)
        raise CheckpointError(
            f"the demo model is not installed (expected at {DEMO_MODEL_DIR}); "
            f"pass --model with a Hub id or a local model directory"
        )
    return os.path.expanduser(name)


def resolve_path(name: str) -> Path:
    """A local path for the model argument, downloading Hub ids (with progress bars)."""
    from ..loading import resolve_model_path

    arg = resolve_model_arg(name)
    try:
        return resolve_model_path(arg)
    except CheckpointError as e:
        if Path(arg).exists():
            raise
        raise CheckpointError(f"{e} (--model also takes a local directory, e.g. --model ./llava-v1.6-mistral-7b-hf)") from None


def load_model(name: str, exact: Optional[bool] = None):
    from ..loading import load

    return load(resolve_path(name), exact=exact)


def check_exact(exact: Optional[bool], distributed) -> None:
    if exact is not None and distributed is not None:
        raise LlavaNextError("--exact/--int8 are not available with --distributed (a split model always runs float32 activations: MLX's kernels for the sharded layers, --exact's for the rest)")


def kv_cache_choice(kv_cache: str, distributed):
    """--kv-cache as load()'s kv_cache (None for auto); a PromptError for anything else."""
    from ..kv_cache import check_choice

    choice = check_choice(kv_cache)
    if choice is not None and distributed is not None:
        raise LlavaNextError("--kv-cache is not available with --distributed (the ranks keep mlx-lm's cache)")
    return choice


def line_reader(name: str):
    """Line-reader settings of a local model that reads one text line at a time (the demo model;
    see lines.py), else None: such a model gets its images cut into lines and read line by line."""
    from ..lines import reader_settings

    local = Path(resolve_model_arg(name))
    return reader_settings(local) if local.exists() else None


def read_lines(m, processor, reader, images) -> str:
    """A line reader's transcription of images (blank line between images)."""
    from ..lines import model_reader, read_block

    return "\n\n".join(read_block(img, reader, model_reader(m, processor)) for img in images)


def stats_line(r) -> str:
    cached = f" + {r.cached_tokens} cached" if r.cached_tokens else ""
    return (
        f"[prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.1f} tok/s, first token {r.ttft:.2f} s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory {r.peak_memory:.2f} GB | {r.finish_reason or 'stopped'}]"
    )


def sampling_options(max_tokens, temp, top_p, top_k=0, min_p=0.0, repetition_penalty=None, seed=None, stop=None):
    return dict(
        max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
    )


class StopOnCtrlC:
    """While answering, Ctrl-C sets a flag (checked after each token) instead of raising."""

    def __enter__(self):
        self.hit = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


# -- generate -----------------------------------------------------------------------------


def generate_command(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question (or a formatted prompt with --raw).")],
    image: ImagesOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Use the prompt as is, without the chat template.")] = False,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 0.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepetitionOpt = None,
    seed: SeedOpt = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, tokens, finish_reason, stats.")] = False,
    verbose: VerboseOpt = False,
    distributed: DistributedOpt = None,
    kv_cache: KvCacheOpt = "auto",
    exact: ExactOpt = None,
):
    """Answer one prompt about the images, streamed to stdout.

    Example: python cli.py generate --image examples/scan.png --prompt "What is the date on this letter?"
    """
    opts = sampling_options(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, stop)
    with user_errors():
        from ..generate import Sampling, check_text

        Sampling.from_kwargs(**opts)  # bad options fail before the model loads
        kv = kv_cache_choice(kv_cache, distributed)
        check_text("--prompt", prompt)
        if system is not None:
            check_text("--system", system)
        check_exact(exact, distributed)
        if distributed is not None:  # rank 0 reads the images and prints (commands/distributed.py)
            from . import distributed as split

            return split.generate(distributed, model, prompt, image or [], system, raw, opts, as_json, verbose)
        images = [_checked_image(p) for p in image or []]
        m, processor = load_model(model, exact)
        m.kv_cache = kv  # None: kv_cache.py's default policy
        answer(m, processor, model, prompt, images, system, raw, opts, as_json, verbose)


def answer(m, processor, model: str, prompt, images, system, raw, opts, as_json, verbose,
           leader: bool = True, agree=lambda values: None, extra_stats=None) -> None:
    """One answer, streamed (or one JSON object). Under --distributed every rank runs it: only the
    leader prints, and `agree` checks the ranks produced the same output (commands/distributed.py)."""
    from ..generate import stream_generate

    reader = line_reader(model) if images else None
    if reader is not None:  # a line reader transcribes; the prompt is not used
        text = read_lines(m, processor, reader, images)
        agree([text])
        if leader:
            print(json.dumps({"text": text, "finish_reason": "stop"}) if as_json else text)
        return
    text, tokens, last = [], [], None
    for last in stream_generate(m, processor, prompt, images, raw=True if raw else None, system=system, **opts):
        text.append(last.text)
        tokens.append(last.token)
        if leader and not as_json:
            print(last.text, end="", flush=True)
    agree(tokens)
    if not leader:
        return
    if as_json:
        stats = {k: getattr(last, k) for k in ("prompt_tokens", "generation_tokens", "ttft", "prompt_tps",
                                               "generation_tps", "peak_memory")}
        stats.update(extra_stats or {})
        print(json.dumps({"text": "".join(text), "tokens": tokens, "finish_reason": last.finish_reason, "stats": stats}))
    else:
        print()
    if verbose:
        typer.echo(stats_line(last), err=True)


def _checked_image(path: str):
    from ..image_processing import load_image

    return load_image(path)


# -- chat ---------------------------------------------------------------------------------

CHAT_HELP = """commands:
  /image PATH   add an image to your next question
  /reset        start over (forget the conversation and images)
  /save FILE    write the transcript (FILE.safetensors: the whole session, resumable with --resume)
  /exit         quit (also Ctrl-D); Ctrl-C stops an answer"""


def chat_command(
    image: ImagesOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 0.0,
    seed: SeedOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue a session saved with /save FILE.safetensors.")] = None,
    verbose: VerboseOpt = False,
    distributed: DistributedOpt = None,
    kv_cache: KvCacheOpt = "auto",
    exact: ExactOpt = None,
):
    """Chat about images: answers stream as they are generated; follow-ups reuse the cache.

    Example: python cli.py chat --image examples/scan.png
    Reads one question per line from stdin when it is not a terminal.
    """
    interactive = sys.stdin.isatty()
    opts = sampling_options(max_tokens, temp, top_p, seed=seed)
    with user_errors():
        from ..generate import ChatSession, Sampling, check_text

        Sampling.from_kwargs(**opts)  # bad options fail before the model loads
        kv = kv_cache_choice(kv_cache, distributed)
        if system is not None:
            check_text("--system", system)
        check_exact(exact, distributed)
        if distributed is not None:  # rank 0 reads stdin and prints (commands/distributed.py)
            from . import distributed as split

            return split.chat(distributed, model, image or [], system, resume, opts, verbose)
        pending = [(p, _checked_image(p)) for p in image or []]
        if interactive:
            typer.echo(f"loading {model} ...", err=True)
        m, processor = load_model(model, exact)
        m.kv_cache = kv  # None: kv_cache.py's default policy
        reader = line_reader(model)
        if resume is not None:
            session = ChatSession.load(resume, m, processor, **opts)
        else:
            session = ChatSession(m, processor, system=system, **opts)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        typer.echo("type a question, /help for commands", err=True)
    failed = 0
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            outcome = _chat_command(line, session, pending)
            if outcome == "exit":
                break
            failed += outcome == "error"
            continue
        if pending and reader is not None:  # a line reader transcribes each image; the question is not used
            print(read_lines(m, processor, reader, [img for _, img in pending]), flush=True)
        else:
            failed += not _answer(session, line, pending, verbose)
        pending.clear()
    if failed and not interactive:  # a script sees that some of its questions failed
        typer.echo(f"chat: {failed} error(s)", err=True)
        raise typer.Exit(1)


def _read_line(interactive: bool) -> Optional[str]:
    """The next question; None at end of input."""
    if not interactive:
        line = sys.stdin.readline()
        return line if line else None
    while True:
        try:
            return input("> ")
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("^C (/exit or Ctrl-D to quit)")


def _chat_command(line: str, session, pending: list) -> Optional[str]:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/image":
            if not arg:
                raise LlavaNextError("/image needs a file path")
            img = _checked_image(arg)
            pending.append((arg, img))
            typer.echo(f"[image {arg} ({img.width}x{img.height}) will go with your next question]", err=True)
        elif name == "/reset":
            session.reset()
            pending.clear()
            typer.echo("[conversation cleared]", err=True)
        elif name == "/save":
            if not arg:
                raise LlavaNextError("/save needs a file name")
            if arg.endswith(".safetensors"):
                written = session.save(arg)
            else:
                from ..outputs import write_text_atomic

                written = write_text_atomic(arg, session.transcript())
            typer.echo(f"[saved {written}]", err=True)
        elif name == "/help":
            typer.echo(CHAT_HELP, err=True)
        else:
            raise LlavaNextError(f"unknown command {name} (try /help)")
    except (LlavaNextError, OSError) as e:
        typer.echo(f"error: {_one_line(e)}", err=True)
        return "error"
    return None


def _answer(session, question: str, pending: list, verbose: bool) -> bool:
    """Stream one answer; False if it failed (the error is printed)."""
    last = None
    with StopOnCtrlC() as ctrl_c:
        responses = session.stream(question, [img for _, img in pending])
        try:
            for last in responses:
                print(last.text, end="", flush=True)
                if ctrl_c.hit:
                    break
        except LlavaNextError as e:
            typer.echo(f"error: {_one_line(e)}", err=True)
            return False
        finally:
            responses.close()  # records the (possibly partial) answer in the session
    print()
    if ctrl_c.hit:
        typer.echo("[stopped]", err=True)
    if verbose and last is not None:
        typer.echo(stats_line(last), err=True)
    return True


def _one_line(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return f"no such file: {e.filename or e}"
    return " ".join(str(e).split())


# -- ocr ----------------------------------------------------------------------------------


# `ocr` itself is in commands/ocr.py (documents: PDFs, page layout, formats, resumable runs).


def _image_files(paths: List[Path], errors: List[str]) -> List[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{path}: no image files in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{path}: file not found")
    return files


# -- info ---------------------------------------------------------------------------------


def info_command(
    model: Annotated[str, typer.Argument(help="Hub id or local model directory.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Describe a checkpoint without loading its weights.

    Example: python cli.py info llava-hf/llava-v1.6-mistral-7b-hf
    """
    with user_errors():
        details = describe(resolve_path(model))
    if as_json:
        print(json.dumps(details, indent=2))
        return
    p = details["parameters"]
    t = details["text_backbone"]
    v = details["vision_tower"]
    rows = [
        ("model", details["path"]),
        ("format", details["format"]),
        ("architecture", details["architecture"]),
        ("text backbone", f"{t['model_type']}: {t['layers']} layers, hidden {t['hidden_size']}, "
                          f"{t['heads']} heads ({t['kv_heads']} kv), vocab {t['vocab_size']}, context {t['context']}"),
        ("vision tower", f"CLIP: {v['layers']} layers, hidden {v['hidden_size']}, tile {v['image_size']} px, "
                         f"patch {v['patch_size']}, feature layer {v['feature_layer']} ({v['select_strategy']})"),
        ("parameters", f"{_human(p['total'])} (language {_human(p['language_model'])}, "
                       f"vision {_human(p['vision_tower'])}, projector {_human(p['projector'])})"),
        ("dtype", details["dtype"]),
        ("quantization", details["quantization"] or "none"),
        ("size on disk", f"{details['size_bytes'] / 1e9:.2f} GB"),
        ("chat template", details["chat_template"]),
        ("image grid pinpoints", ", ".join(f"{h}x{w}" for h, w in details["image_grid_pinpoints"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def describe(path: Path) -> dict:
    """What `info` prints: read from config.json, safetensors headers and the tokenizer."""
    from ..config import LlavaNextConfig
    from ..loading import MLX_FORMAT_KEY, load_tokenizer, read_config, weight_files

    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists()):
        raise CheckpointError(f"{path}: info reads HF and converted MLX directories, not GGUF (a GGUF pair loads "
                              f"with --model in chat/generate/ocr; llama.cpp's gguf-dump describes it)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: info reads model directories (HF or converted MLX), not single files")
    raw = read_config(path)
    config = LlavaNextConfig.from_dict(raw)
    quant = raw.get("quantization")
    counts, dtypes = _count_parameters(weight_files(path), quant)
    text, vision = config.text_config, config.vision_config
    return {
        "path": str(path),
        "format": "converted MLX" if raw.get(MLX_FORMAT_KEY) is not None else "Hugging Face (llava-hf)",
        "architecture": ", ".join(raw.get("architectures") or ["LlavaNextForConditionalGeneration"]),
        "text_backbone": {
            "model_type": text["model_type"], "layers": text["num_hidden_layers"], "hidden_size": text["hidden_size"],
            "heads": text["num_attention_heads"], "kv_heads": text["num_key_value_heads"],
            "vocab_size": text["vocab_size"], "context": text["max_position_embeddings"],
        },
        "vision_tower": {
            "layers": vision["num_hidden_layers"], "hidden_size": vision["hidden_size"],
            "image_size": vision["image_size"], "patch_size": vision["patch_size"],
            "feature_layer": config.vision_feature_layer, "select_strategy": config.vision_feature_select_strategy,
        },
        "parameters": counts,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else "unknown",
        "quantization": _describe_quantization(quant),
        "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "chat_template": _template_source(path, config, load_tokenizer, raw),
        "image_grid_pinpoints": config.image_grid_pinpoints,
    }


def _describe_quantization(quant: Optional[dict]) -> Optional[str]:
    """'4-bit affine, group size 64', or for a mixed recipe every bit width with its layer count."""
    if not quant:
        return None
    layers = [v for v in quant.values() if isinstance(v, dict) and "bits" in v]
    text = f"{quant['bits']}-bit {quant.get('mode', 'affine')}, group size {quant['group_size']}"
    if not layers:
        return text
    widths = Counter(f"{v['bits']}-bit" + (f" group {v['group_size']}" if v.get("group_size") != quant["group_size"] else "")
                     for v in layers)
    other = ", ".join(f"{n} layer(s) {width}" for width, n in sorted(widths.items()))
    return f"mixed: {text} by default; {other}"


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise CheckpointError(f"{path.name}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def _count_parameters(files, quant: Optional[dict]):
    """Parameter counts per component (quantized weights counted unpacked) and float dtypes."""
    tensors = {}
    for f in files:
        tensors.update(_safetensors_header(f))
    quantized = {k[: -len(".scales")] for k in tensors if k.endswith(".scales")}
    counts = Counter(language_model=0, vision_tower=0, projector=0)
    dtypes = Counter()
    for key, meta in tensors.items():
        module, _, leaf = key.rpartition(".")
        n = 1
        for d in meta["shape"]:
            n *= d
        if module in quantized and leaf in ("scales", "biases"):
            continue
        if module in quantized and leaf == "weight":  # packed uint32: 32 / bits weights each
            layer = (quant or {}).get(module)
            bits = layer.get("bits") if isinstance(layer, dict) else (quant or {}).get("bits", 4)
            n = n * 32 // bits
        elif meta["dtype"] in SAFETENSORS_DTYPES:
            dtypes[SAFETENSORS_DTYPES[meta["dtype"]]] += n
        if "vision_tower" in key:
            counts["vision_tower"] += n
        elif "multi_modal_projector" in key or "image_newline" in key:
            counts["projector"] += n
        else:
            counts["language_model"] += n
    counts = dict(counts)
    counts["total"] = sum(counts.values())
    return counts, dtypes


def _template_source(path: Path, config, load_tokenizer, raw: dict) -> str:
    from ..chat_templates import builtin_for

    if (path / "chat_template.jinja").exists():
        return "checkpoint (chat_template.jinja)"
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.exists() and json.loads(file.read_text()).get("chat_template"):
            return f"checkpoint ({name})"
    tokenizer = load_tokenizer(path, raw)
    return builtin_for(config, getattr(tokenizer, "_tokenizer", tokenizer))[1]


# -- registration -------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
    app.command("generate")(generate_command)
    from .ocr import ocr_command

    app.command("ocr")(ocr_command)
    app.command("info")(info_command)
