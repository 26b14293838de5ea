"""llama.cpp on the same weights: export the random text model to GGUF Q4_0, run llama-bench.

llama-bench measures the text model only (random token ids, no image): prompt processing of as
many tokens as our image prompt (`pp`), and text generation (`tg`) both after an empty context
and after a context as long as our prompt (`-d`), which is what our decode rate sees.
"""

import json
import os
from pathlib import Path
from typing import Optional

import gguf
import mlx.core as mx
import numpy as np

from mlx_llava_next import fastpath
from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.gguf_layout import from_gguf, permute_rows, qk_heads, text_shapes
from convert.gguf import text_hyperparameters
from quantize.ggml import encode, nbytes, tensor_type

from .memory import run_measured


def float_weight(module) -> np.ndarray:
    """A layer's weight as float32 numpy (dequantized when quantized)."""
    if "scales" not in module:
        return np.array(module.weight.astype(mx.float32))
    if fastpath.available():
        return fastpath.dequantize(module["weight"], module["scales"], module["biases"], module.group_size, module.bits)
    w = mx.dequantize(module["weight"], module["scales"], module["biases"], module.group_size, module.bits)
    return np.array(w.astype(mx.float32))


def synthetic_vocab(writer: gguf.GGUFWriter, size: int) -> None:
    """A SentencePiece-style vocabulary of `size` tokens: llama-bench draws random ids from it."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), size)]
    types += [T.NORMAL] * (size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def export_text_gguf(model, config: dict, path, qtype: str = "q4_0") -> Path:
    """The language model of `model` as a llama.cpp GGUF (tensor by tensor, bounded memory)."""
    text = LlavaNextConfig.from_dict(config).text_config
    modules = dict(model.named_modules())
    shapes = text_shapes(text, tied=False)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    text_hyperparameters(writer, text, "mlx-llava-next benchmark (random weights)", qtype)
    synthetic_vocab(writer, text["vocab_size"])
    planned = [(name, shape, tensor_type(name, shape, qtype)) for name, shape in shapes.items()]
    for name, shape, ggml_type in planned:
        writer.add_tensor_info(name, shape, np.float32, nbytes(shape, ggml_type), raw_dtype=ggml_type)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, ggml_type in planned:
        ours = from_gguf(name)  # e.g. language_model.model.layers.0.self_attn.q_proj.weight
        module = modules[ours.rsplit(".", 1)[0]]
        array = float_weight(module) if ours.endswith(".weight") and module.weight.ndim == 2 else np.array(module.weight)
        heads = qk_heads(ours, text)
        if heads:
            array = permute_rows(array, heads)
        writer.write_tensor_data(encode(array.reshape(shape), ggml_type))
        del array
    writer.close()
    return path


def find_llama_bench(bin_dir) -> Path:
    for candidate in (Path(bin_dir) / "llama-bench", Path(bin_dir) / "bin" / "llama-bench"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"no llama-bench executable in {bin_dir}")


def llama_bench(exe: Path, gguf_path, args, timeout: Optional[float]) -> tuple:
    cmd = [str(exe), "-m", str(gguf_path), "-r", "1", "--no-warmup", "--repack", "0", "-o", "json", *args]
    code, out, err, rss = run_measured(cmd, timeout=timeout)
    if code != 0:
        tail = (err or out).strip().splitlines()[-3:]
        raise RuntimeError(f"llama-bench failed (exit {code}): {' | '.join(tail)}")
    return json.loads(out), rss, " ".join(cmd)


def seconds(test: dict) -> float:
    return float(np.mean(test["samples_ns"])) / 1e9 if test.get("samples_ns") else test["avg_ns"] / 1e9


def run(bin_dir, gguf_path, n_prompt: int, n_gen: int, threads: int, depth: bool = True,
        timeout: Optional[float] = None) -> dict:
    """llama-bench pp{n_prompt} and tg{n_gen} (and tg{n_gen} after {n_prompt} tokens of context)."""
    exe = find_llama_bench(bin_dir)
    tests, rss, command = llama_bench(exe, gguf_path, ["-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads)], timeout)
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    result = {
        "vision_s": None,
        "prefill_s": seconds(pp),
        "prefill_tps": n_prompt / seconds(pp),
        "ttft_s": None,  # text only: llama-bench has no image path
        "decode_tps_short": n_gen / seconds(tg),
        "decode_tps": None,
        "peak_rss_bytes": rss,
        "prompt_tokens": n_prompt,
        "commands": [command],
        "build": pp.get("build_commit"),
        "cpu": pp.get("cpu_info"),
        "type": pp.get("model_type"),
    }
    if depth:
        tests, rss_depth, command = llama_bench(
            exe, gguf_path, ["-p", "0", "-n", str(n_gen), "-d", str(n_prompt), "-t", str(threads)], timeout)
        result["decode_tps"] = n_gen / seconds(tests[0])
        result["peak_rss_bytes"] = max(rss, rss_depth)
        result["commands"].append(command)
    return result
