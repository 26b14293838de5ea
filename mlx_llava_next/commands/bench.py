"""`cli.py bench`: speed and memory of ours vs llama.cpp vs transformers (benchmarks/bench.py)."""

import json
from typing import List, Optional

import typer

from .common import fail, user_errors

COMPARE = ("transformers", "llama.cpp")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        shape: str = typer.Option("mistral-7b", "--shape", help="Model shape (random weights): mistral-7b or tiny."),
        bits: int = typer.Option(4, "--bits", help="Quantization of the language model: 4 or 8."),
        group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
        compare: Optional[List[str]] = typer.Option(
            None, "--compare", help="Also run: transformers, llama.cpp (repeat the option for both)."
        ),
        llama_cpp_bin: Optional[str] = typer.Option(None, "--llama-cpp-bin", help="Folder with llama-bench."),
        llama_cpp_depth: bool = typer.Option(
            True, "--llama-cpp-depth/--no-llama-cpp-depth",
            help="Also time llama.cpp's decoding after a prompt-long context (one more prefill).",
        ),
        decode_tokens: int = typer.Option(64, "--decode-tokens", help="Tokens to decode."),
        prefill_step: int = typer.Option(2048, "--prefill-step", help="Prefill chunk (tokens); 2048 is what generation uses."),
        threads: int = typer.Option(2, "--threads", help="Threads for llama.cpp and torch."),
        transformers_dtype: str = typer.Option("bfloat16", "--transformers-dtype", help="float32, float16 or bfloat16."),
        transformers_layers: Optional[int] = typer.Option(
            None, "--transformers-layers",
            help="Run the reference with N decoder layers and extrapolate to the full depth (when it does not fit).",
        ),
        transformers_max_hours: float = typer.Option(
            2.0, "--transformers-max-hours", help="Skip the reference when its estimated run time is longer."
        ),
        workdir: Optional[str] = typer.Option(None, "--workdir", help="Where the temporary GGUF goes (default: the temp dir)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
        exact: Optional[bool] = typer.Option(None, "--exact/--int8", help="Our 4-bit layers with float32 activations or int8 ones (the default, as in generate)."),
    ):
        """Build a model of a released checkpoint's shape with random weights and time image -> answer."""
        from benchmarks.bench import json_summary, run, table
        from benchmarks.shapes import SHAPES

        compare = list(compare or [])
        unknown = [c for c in compare if c not in COMPARE]
        if unknown:
            fail(f"unknown --compare {unknown[0]!r} (use {' or '.join(COMPARE)})")
        if shape not in SHAPES:
            fail(f"unknown --shape {shape!r} (use {' or '.join(SHAPES)})")
        if bits not in (4, 8):
            fail("--bits must be 4 or 8")
        if group_size not in (32, 64, 128):
            fail("--group-size must be 32, 64 or 128")
        if decode_tokens < 1 or prefill_step < 1 or threads < 1:
            fail("--decode-tokens, --prefill-step and --threads must be positive")
        if "llama.cpp" in compare and not llama_cpp_bin:
            fail("--compare llama.cpp needs --llama-cpp-bin DIR (the folder with llama-bench)")
        log = (lambda m: None) if as_json else (lambda m: typer.echo(f"[bench] {m}", err=True))
        with user_errors():
            result = run(shape=shape, bits=bits, group_size=group_size, compare=compare,
                         llama_cpp_bin=llama_cpp_bin, decode_tokens=decode_tokens, prefill_step=prefill_step,
                         threads=threads, transformers_dtype=transformers_dtype,
                         transformers_layers=transformers_layers,
                         transformers_max_seconds=transformers_max_hours * 3600,
                         llama_cpp_depth=llama_cpp_depth, workdir=workdir, log=log, exact=exact)
        if as_json:
            typer.echo(json.dumps(json_summary(result)))
        else:
            typer.echo(table(result))
        if result["ours"] and result["ours"].get("error"):
            fail(result["ours"]["error"])
