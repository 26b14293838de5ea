"""`python cli.py bench`: our runtime vs llama.cpp vs transformers, side by side, same machine.

Each runtime runs in its own process (so each peak RSS is its own, and memory is returned
between them): `python -m benchmarks.bench --worker NAME ARGS_JSON` prints one JSON line.
The parent measures the machine's limits before and after the runtimes (the best of the two):
memory bandwidth (all threads reading a 1 GB buffer) and float32 GEMM throughput, and turns
them into the fastest possible decode and prefill for the weights the model holds.
"""

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import memory

RUNTIMES = ("ours", "llama.cpp", "transformers")
# the /proc/cpuinfo flags that decide which kernels can run (ours, OpenBLAS's, llama.cpp's)
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_bf16", "amx_int8")
KEYS = ("vision_s", "prefill_tps", "ttft_s", "decode_tps", "peak_rss_bytes")


# -- machine limits ---------------------------------------------------------------------------


# Peak RSS at most this multiple of (weights + KV cache at the prompt's length): issue 18's bar.
RSS_TARGET = 1.15


def measure_bandwidth(size: int = 1 << 30) -> Dict[str, float]:
    """Read bandwidth in bytes/s: the best of a few passes over `size` bytes on all threads."""
    import numpy as np

    from mlx_llava_next import fastpath

    buffer = np.ones(size // 4, dtype=np.float32)
    if fastpath.available():
        read, how = fastpath.native.stream_sum, f"sum of a {size >> 20} MB float32 buffer, native kernel, all threads"
    else:
        read, how = np.sum, f"numpy sum of a {size >> 20} MB float32 buffer, one thread"
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        read(buffer)
        best = min(best, time.perf_counter() - start)
    return {"bandwidth_bytes_per_s": buffer.nbytes / best, "bandwidth_method": how}


def measure_gemm(m: int = 1024, n: int = 4096, k: int = 4096) -> float:
    """float32 GEMM FLOP/s through MLX (the BLAS prefill and the vision tower use)."""
    import mlx_llava_next  # noqa: F401
    import mlx.core as mx

    a, b = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(a, b, a @ b.T)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        mx.eval(a @ b.T)
        best = min(best, time.perf_counter() - start)
    return 2 * m * n * k / best


def limits(machine: dict, ours: dict, config: dict) -> dict:
    """Fastest possible decode (weights + KV cache read once a token) and prefill (GEMM-bound)."""
    from .reference import text_params
    from .shapes import kv_cache_bytes  # not from .ours: that would load MLX, mlx-lm and torch here

    bw = machine["bandwidth_bytes_per_s"]
    prompt = ours["prompt_tokens"]
    itemsize = 2 if ours.get("kv_cache_dtype") == "float16" else 4  # our float16 cache, else float32
    kv = kv_cache_bytes(config, prompt + ours["decode_tokens"], itemsize)
    read = ours["decode_read_bytes"]
    text = dict(config["text_config"])
    # prefill multiplies every token through the decoder layers (the head sees only the last one)
    flops_per_token = 2 * (text_params(text, text["num_hidden_layers"]) - 2 * text["vocab_size"] * text["hidden_size"])
    return {
        **machine,
        "weights_bytes": ours["weights_bytes"],
        "decode_read_bytes": read,
        "kv_cache_bytes": kv,
        "decode_tps": bw / (read + kv_cache_bytes(config, prompt, itemsize)),
        "decode_tps_short": bw / read,
        "prefill_tps": machine["gemm_flops_per_s"] / flops_per_token,
        "peak_rss_target_bytes": RSS_TARGET * (ours["weights_bytes"] + kv),
    }


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu" not in info:
                    info["cpu"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = [flag for flag in SIMD_FLAGS if flag in present]
                    break
    except OSError:
        pass
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["load_average"] = os.getloadavg()
    except (OSError, ValueError, AttributeError):
        pass
    from mlx_llava_next import blas

    info["blas"] = blas.loaded
    if blas.loaded:
        import ctypes

        try:  # OpenBLAS picks its kernels for the CPU at run time (e.g. Haswell: AVX2, Cooperlake: AVX-512 BF16)
            corename = ctypes.CDLL(blas.loaded).openblas_get_corename
            corename.restype = ctypes.c_char_p
            info["blas_core"] = corename().decode()
        except (OSError, AttributeError):
            pass
    return info


# -- workers ----------------------------------------------------------------------------------


def run_worker(name: str, args: dict, timeout: Optional[float] = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", name, json.dumps(args)]
    root = Path(__file__).resolve().parent.parent
    code, out, err, rss = memory.run_measured(cmd, timeout=timeout, cwd=str(root))
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])
        return {"error": f"{name} worker failed (exit {code}): {tail}", **{k: None for k in KEYS}}
    result = json.loads(lines[-1])
    result["process_peak_rss_bytes"] = rss
    return result


def worker_main(name: str, args: dict) -> dict:
    from .shapes import config as shape_config

    config = shape_config(args["shape"])
    if name == "ours":
        from . import ours

        return ours.main(config, args["bits"], args["group_size"], args["decode_tokens"], args["prefill_step"],
                         args.get("gguf_path"), exact=args.get("exact"))
    if name == "transformers":
        from . import reference

        return reference.run(config, dtype=args["dtype"], layers=args.get("layers"),
                             decode_tokens=args["decode_tokens"], threads=args["threads"],
                             max_seconds=args["max_seconds"])
    raise ValueError(f"unknown worker {name!r}")


# -- the whole benchmark ----------------------------------------------------------------------


def run(shape: str = "mistral-7b", bits: int = 4, group_size: int = 64, compare: List[str] = (),
        llama_cpp_bin: Optional[str] = None, decode_tokens: int = 64, prefill_step: int = 2048,
        threads: int = 2, transformers_dtype: str = "bfloat16", transformers_layers: Optional[int] = None,
        transformers_max_seconds: float = 7200.0, llama_cpp_depth: bool = True, workdir: Optional[str] = None,
        log=lambda message: None, exact: Optional[bool] = None) -> dict:
    """Run every runtime asked for; returns {"ours", "llama.cpp", "transformers", "limits", "machine", ...}."""
    from .shapes import PROBES
    from .shapes import config as shape_config

    config = shape_config(shape)
    probe = PROBES[shape]
    machine = machine_info()
    log("measuring memory bandwidth and GEMM throughput")
    machine.update(measure_bandwidth(probe["bandwidth_bytes"]))
    machine["gemm_flops_per_s"] = measure_gemm(*probe["gemm_mnk"])
    probes = [(machine["bandwidth_bytes_per_s"], machine["gemm_flops_per_s"])]
    result = {"shape": shape, "bits": bits, "group_size": group_size, "machine": machine,
              "ours": None, "llama.cpp": None, "transformers": None}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        gguf_path = str(Path(tmp) / f"{shape}-q4_0.gguf") if "llama.cpp" in compare else None
        log(f"ours: {shape}, {bits}-bit, group {group_size}")
        result["ours"] = run_worker("ours", {"shape": shape, "bits": bits, "group_size": group_size,
                                             "decode_tokens": decode_tokens, "prefill_step": prefill_step,
                                             "gguf_path": gguf_path, "exact": exact})
        if "llama.cpp" in compare:
            result["llama.cpp"] = run_llama_cpp(result["ours"], llama_cpp_bin, gguf_path, decode_tokens, threads,
                                                llama_cpp_depth, log)
    if "transformers" in compare:
        log(f"transformers: {transformers_dtype}" + (f", {transformers_layers} layers" if transformers_layers else ""))
        result["transformers"] = run_worker("transformers", {
            "shape": shape, "dtype": transformers_dtype, "layers": transformers_layers,
            "decode_tokens": decode_tokens, "threads": threads, "max_seconds": transformers_max_seconds})
    # Probed again at the end: on a shared machine one probe can land on a busy moment, and the
    # limit is the best the machine showed.
    log("measuring memory bandwidth and GEMM throughput again")
    probes.append((measure_bandwidth(probe["bandwidth_bytes"])["bandwidth_bytes_per_s"], measure_gemm(*probe["gemm_mnk"])))
    machine["probes"] = [{"bandwidth_bytes_per_s": b, "gemm_flops_per_s": g} for b, g in probes]
    machine["bandwidth_bytes_per_s"] = max(b for b, _ in probes)
    machine["gemm_flops_per_s"] = max(g for _, g in probes)
    if result["ours"] and not result["ours"].get("error"):
        result["limits"] = limits(machine, result["ours"], config)
    else:
        result["limits"] = None
    machine["load_average_after"] = os.getloadavg()
    return result


def run_llama_cpp(ours: dict, bin_dir: Optional[str], gguf_path: str, decode_tokens: int, threads: int,
                  depth: bool, log) -> dict:
    from . import llama_cpp

    if ours.get("error"):
        return {"error": "not run: our worker failed before exporting the GGUF", **{k: None for k in KEYS}}
    if not bin_dir:
        return {"error": "--llama-cpp-bin DIR (the folder with llama-bench) is needed", **{k: None for k in KEYS}}
    log("llama.cpp: llama-bench on the same weights (GGUF Q4_0)")
    try:
        result = llama_cpp.run(bin_dir, gguf_path, ours["prompt_tokens"], decode_tokens, threads, depth=depth)
    except (OSError, RuntimeError, ValueError, StopIteration) as e:
        return {"error": str(e), **{k: None for k in KEYS}}
    result["gguf_bytes"] = os.path.getsize(gguf_path)
    return result


# -- output -----------------------------------------------------------------------------------


def json_summary(result: dict) -> dict:
    """The `--json` object: per runtime the five headline keys (null where n/a) plus details."""
    out = {}
    for name in RUNTIMES:
        entry = result.get(name)
        if entry is None:
            out[name] = None
            continue
        out[name] = {**{k: entry.get(k) for k in KEYS}, **{k: v for k, v in entry.items() if k not in KEYS}}
    out["limits"] = result.get("limits")
    out["machine"] = result.get("machine")
    out["shape"], out["bits"], out["group_size"] = result["shape"], result["bits"], result["group_size"]
    return out


ROWS = [
    # (label, key, unit scale, format, higher is better)
    ("image preprocessing (s)", "preprocess_s", 1, "{:.2f}", False),
    ("vision tower + projector (s)", "vision_s", 1, "{:.1f}", False),
    ("prefill (tok/s)", "prefill_tps", 1, "{:.2f}", True),
    ("prefill time (s)", "prefill_s", 1, "{:.1f}", False),
    ("time to first token (s)", "ttft_s", 1, "{:.1f}", False),
    ("decode after the prompt (tok/s)", "decode_tps", 1, "{:.2f}", True),
    ("decode, short context (tok/s)", "decode_tps_short", 1, "{:.2f}", True),
    ("peak RSS (GB)", "peak_rss_bytes", 1e-9, "{:.2f}", False),
]


def _cell(entry: Optional[dict], key: str, scale: float, fmt: str) -> str:
    if not entry or entry.get(key) is None:
        return "–"
    return fmt.format(entry[key] * scale)


def _ratio(ours: Optional[dict], other: Optional[dict], key: str, higher: bool) -> str:
    if not ours or not other or not ours.get(key) or not other.get(key):
        return "–"
    r = ours[key] / other[key] if higher else other[key] / ours[key]
    return f"{r:.2f}x"


def table(result: dict) -> str:
    """A markdown table: each runtime, ours relative to each (>1: ours better), and the limits."""
    ours = result.get("ours")
    others = [n for n in RUNTIMES[1:] if result.get(n) is not None]
    lim = result.get("limits") or {}
    names = {"ours": "ours (MLX, 4-bit)".replace("4", str(result["bits"])), "llama.cpp": "llama.cpp Q4_0",
             "transformers": "transformers"}
    if result.get("transformers") and result["transformers"].get("dtype"):
        t = result["transformers"]
        names["transformers"] = f"transformers {t['dtype']}" + (
            f" ({t['layers_run']} of {t['layers']} layers, extrapolated)" if t.get("extrapolated") else "")
    header = ["", names["ours"]] + [names[n] for n in others] + [f"ours vs {n}" for n in others] + ["limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    limit_cells = {
        "prefill_tps": lim.get("prefill_tps"), "decode_tps": lim.get("decode_tps"),
        "decode_tps_short": lim.get("decode_tps_short"), "peak_rss_bytes": lim.get("peak_rss_target_bytes"),
    }
    for label, key, scale, fmt, higher in ROWS:
        row = [label, _cell(ours, key, scale, fmt)] + [_cell(result[n], key, scale, fmt) for n in others]
        row += [_ratio(ours, result[n], key, higher) for n in others]
        limit = limit_cells.get(key)
        row.append("–" if limit is None else (fmt.format(limit * scale) + (" (target)" if key == "peak_rss_bytes" else "")))
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for name in RUNTIMES:
        entry = result.get(name)
        if entry and entry.get("error"):
            notes.append(f"{name}: {entry['error']}")
        if entry and entry.get("skipped"):
            notes.append(f"{name}: skipped: {entry['skipped']}")
    m = result.get("machine", {})
    if lim:
        notes.append(
            f"limits: read bandwidth {lim['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({lim['bandwidth_method']}; best of a probe before and after the runs), "
            f"float32 GEMM {lim['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s; decode reads {lim['decode_read_bytes'] / 1e9:.2f} GB "
            f"of weights a token (+ {lim['kv_cache_bytes'] / 1e9:.2f} GB KV cache at the prompt's length); "
            f"peak RSS target = {RSS_TARGET} x (weights {lim['weights_bytes'] / 1e9:.2f} GB + KV cache)")
    if ours and not ours.get("error"):
        notes.append(f"prompt: {ours['prompt_tokens']} tokens ({ours['image_tokens']} image tokens, 672x672 image); "
                     f"prefill in chunks of {ours['prefill_step']}; decode: {ours['decode_tokens']} tokens, greedy; "
                     f"KV cache {ours.get('kv_cache_dtype', 'float32')}"
                     + (f" (decode step: native/kv.c, {ours['fastpath']['kv']} path)"
                        if ours.get("kv_cache_dtype") and ours.get("fastpath", {}).get("kv") else ""))
    notes.append(f"machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, "
                 f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB RAM, BLAS {m.get('blas')}"
                 + (f" ({m['blas_core']} kernels)" if m.get("blas_core") else "") + ", "
                 f"load average {', '.join(f'{x:.1f}' for x in m.get('load_average', ()))}")
    if m.get("cpu_flags") is not None:
        fast = (ours or {}).get("fastpath", {})
        simd = fast.get("simd")
        if simd and fast.get("int8") and not ours.get("exact") and ours.get("bits") == 4:  # fastpath.INT8_BITS
            simd = (f"int8-activation {fast['int8']} path (this CPU runs {', '.join(fast['int8_paths'])}); "
                    f"float kernels (vision tower, LM head; all layers with --exact): {simd}")
        elif simd:
            simd = f"{simd} path" + (" (float32 activations: --exact)" if ours.get("exact") else "")
        notes.append(f"CPU flags: {' '.join(m['cpu_flags']) or 'none of ' + ' '.join(SIMD_FLAGS)}"
                     + (f"; our kernels ran their {simd}" if simd else ""))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    if sys.argv[2] == "ours":
        # Our runtime needs no torch (only the test extra installs it), but transformers, which
        # mlx-lm imports, loads it whenever it is installed: ~1-2 s and ~0.3 GB of RSS that a user's
        # install does not have. Hidden here, so the worker measures what users run.
        sys.modules.setdefault("torch", None)
    print(json.dumps(worker_main(sys.argv[2], json.loads(sys.argv[3]))), flush=True)
