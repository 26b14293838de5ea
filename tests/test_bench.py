"""`cli.py bench`: the tiny shape end to end (a smoke test: numbers are never asserted), the GGUF
export llama-bench reads (checked with gguf-py), the transformers worker, the table, CLI errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench, shapes  # noqa: E402
from cli import app  # noqa: E402

HEADLINE = ("vision_s", "prefill_tps", "ttft_s", "decode_tps", "peak_rss_bytes")


@pytest.fixture(scope="module")
def tiny_model():
    from benchmarks import ours

    return ours.build_model(shapes.config("tiny"))


def test_tiny_bench_json_smoke():
    cmd = [sys.executable, "cli.py", "bench", "--shape", "tiny", "--decode-tokens", "4", "--json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is exactly one JSON object
    assert set(result) >= {"ours", "llama.cpp", "transformers", "limits"}
    assert result["llama.cpp"] is None and result["transformers"] is None
    ours = result["ours"]
    assert set(HEADLINE) <= set(ours)
    assert all(ours[k] > 0 for k in HEADLINE)
    assert ours["image_tokens"] == 2928 and ours["prompt_tokens"] == 2928 + 17
    assert ours["ttft_s"] >= ours["vision_s"] + ours["prefill_s"]
    limits = result["limits"]
    assert limits["bandwidth_bytes_per_s"] > 0 and limits["decode_tps"] > 0
    assert limits["peak_rss_target_bytes"] == pytest.approx(1.15 * (limits["weights_bytes"] + limits["kv_cache_bytes"]))  # issue 18


def test_built_model_is_quantized_like_a_converted_checkpoint(tiny_model):
    import mlx.core as mx
    import mlx.nn as nn

    linear = tiny_model.language_model.model.layers[0].mlp.down_proj
    assert isinstance(linear, nn.QuantizedLinear) and linear.bits == 4 and linear.group_size == 64
    assert linear.scales.dtype == mx.float16  # as converted from float16 weights
    assert isinstance(tiny_model.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert tiny_model.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == mx.float32


def test_gguf_export_read_back_with_gguf_py(tiny_model, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from benchmarks.llama_cpp import export_text_gguf, float_weight
    from mlx_llava_next.gguf_layout import permute_rows

    config = shapes.config("tiny")
    text = config["text_config"]
    path = export_text_gguf(tiny_model, config, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == text["num_hidden_layers"]
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == text["num_key_value_heads"]
    assert len(fields["tokenizer.ggml.tokens"].data) == text["vocab_size"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * text["num_hidden_layers"]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    layer = tiny_model.language_model.model.layers[1]
    expected = {
        "blk.1.ffn_down.weight": float_weight(layer.mlp.down_proj),
        "blk.1.attn_q.weight": permute_rows(float_weight(layer.self_attn.q_proj), text["num_attention_heads"]),
        "blk.1.attn_k.weight": permute_rows(float_weight(layer.self_attn.k_proj), text["num_key_value_heads"]),
        "token_embd.weight": float_weight(tiny_model.language_model.model.embed_tokens),
        "output.weight": float_weight(tiny_model.language_model.lm_head),
    }
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        # Q4_0: 16 levels d*(q-8) per block of 32, d = -(the extreme value)/8 in float16: values of the
        # other sign beyond 7|d| are clipped: the error stays within |extreme|/8 (+7/8 of d's float16 rounding)
        blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - want).reshape(-1, 32) <= blocks / 8 * (1 + 7 * 2**-11) + 1e-7), name
        assert np.mean(np.abs(got - want)) < 0.05 * np.mean(np.abs(want)), name  # most values land close


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_BIN"), reason="LLAMA_CPP_BIN is not set (a folder with llama-bench)")
def test_llama_bench_runs_on_the_export(tiny_model, tmp_path):
    from benchmarks import llama_cpp

    path = llama_cpp.export_text_gguf(tiny_model, shapes.config("tiny"), tmp_path / "tiny.gguf")
    try:
        llama_cpp.find_llama_bench(os.environ["LLAMA_CPP_BIN"])
    except FileNotFoundError:
        pytest.skip("no llama-bench in LLAMA_CPP_BIN")
    result = llama_cpp.run(os.environ["LLAMA_CPP_BIN"], path, n_prompt=64, n_gen=4, threads=2)
    assert result["prefill_tps"] > 0 and result["decode_tps"] > 0 and result["peak_rss_bytes"] > 0


def test_transformers_worker_extrapolates_from_fewer_layers():
    from benchmarks import reference

    config = shapes.config("tiny")
    config["text_config"]["num_hidden_layers"] = 4
    result = reference.run(config, dtype="float32", layers=2, decode_tokens=2)
    assert result["extrapolated"] and result["layers_run"] == 2 and result["layers"] == 4
    assert all(result[k] > 0 for k in HEADLINE)
    assert result["prompt_tokens"] == 2928 + 17  # the same prompt as ours


def test_transformers_worker_skips_what_does_not_fit(monkeypatch):
    from benchmarks import reference

    monkeypatch.setattr(reference, "available_bytes", lambda: 1 << 20)
    result = reference.run(shapes.config("mistral-7b"), dtype="bfloat16")
    assert "GB" in result["skipped"] and result["decode_tps"] is None


def test_table_ratios_and_notes():
    entry = dict.fromkeys(HEADLINE)
    result = {
        "shape": "tiny", "bits": 4, "group_size": 64, "machine": {"cpu": "X", "cpus": 2, "load_average": (1.0, 1.0, 1.0)},
        "ours": {**entry, "decode_tps": 3.0, "ttft_s": 100.0, "prefill_tps": 10.0, "peak_rss_bytes": 5e9,
                 "prompt_tokens": 2945, "image_tokens": 2928, "prefill_step": 512, "decode_tokens": 64},
        "llama.cpp": {**entry, "decode_tps": 2.0, "prefill_tps": 20.0, "peak_rss_bytes": 4e9},
        "transformers": {**entry, "skipped": "needs 16 GB"},
        "limits": None,
    }
    text = bench.table(result)
    row = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("|")}
    assert "1.50x" in row["decode after the prompt (tok/s)"]  # ours faster: ratio > 1
    assert "0.50x" in row["prefill (tok/s)"]
    assert "0.80x" in row["peak RSS (GB)"]  # lower is better: llama.cpp's / ours
    assert "transformers: skipped: needs 16 GB" in text
    summary = bench.json_summary(result)
    assert summary["llama.cpp"]["ttft_s"] is None and summary["ours"]["decode_tps"] == 3.0


@pytest.mark.parametrize("args, needle", [
    (["--compare", "vllm"], "unknown --compare"),
    (["--compare", "llama.cpp"], "--llama-cpp-bin"),
    (["--bits", "3"], "--bits"),
    (["--shape", "70b"], "--shape"),
])
def test_bad_options_are_one_line_errors(args, needle):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


@pytest.mark.skipif(not shutil.which("lscpu"), reason="no lscpu to compare with")
def test_machine_info_names_the_cpu_flags_lscpu_reports():
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    flags = set(next(line for line in lscpu.splitlines() if line.startswith("Flags:")).split(":", 1)[1].split())
    machine = bench.machine_info()
    assert machine["cpu_flags"] == [f for f in bench.SIMD_FLAGS if f in flags]
    result = {"shape": "tiny", "bits": 4, "group_size": 64, "machine": machine, "limits": None,
              "ours": {**dict.fromkeys(HEADLINE), "error": "x", "fastpath": {"simd": "avx2+fma"}},
              "llama.cpp": None, "transformers": None}
    note = next(line for line in bench.table(result).splitlines() if line.startswith("- CPU flags:"))
    assert note.startswith("- CPU flags: " + " ".join(machine["cpu_flags"])) and "avx2+fma path" in note
