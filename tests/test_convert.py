"""HF checkpoints -> MLX directories: float16, 8-bit, 4-bit, mixed; atomic writes; the quality
report; mlx-vlm's layout. Oracles: transformers (float16 conversion), MLX's own `nn.quantize`
applied in memory (quantized conversions), torch (KL), mlx-lm (bits per weight)."""

import copy
import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_llava_next import fastpath
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from cli import app
from convert.mlx import convert
from mlx_llava_next import load
from mlx_llava_next.loading import cast, load_model
from quantize.mlx import QuantConfig, quantize_model
from quantize.report import REPORT_FILE, kl_and_top1, quality_report, weight_stats

BACKBONES = ["llama", "mistral", "qwen2"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def converted(tiny_checkpoint, tmp_path_factory):
    """converted(name, bits=None) -> MLX directory of the tiny Hub-layout checkpoint (cached)."""
    done = {}

    def get(name, bits=None):
        if (name, bits) not in done:
            out = tmp_path_factory.mktemp("mlx") / f"{name}-{bits or 'f16'}"
            quant = QuantConfig(bits=bits) if bits else None
            convert(tiny_checkpoint(name).path, out, quantization=quant, show_progress=False)
            done[name, bits] = out
        return done[name, bits]

    return get


def image_batch(ckpt, make_image, h=90, w=150):
    return dict(ckpt.hf_processor(text=[ckpt.prompt()], images=[make_image(h, w, seed=3)], return_tensors="np"))


def run(model, batch):
    return model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])


def params(model):
    return dict(tree_flatten(model.parameters()))


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert set(pa) == set(pb)
    for key in pa:
        assert pa[key].dtype == pb[key].dtype, key
        assert mx.array_equal(pa[key], pb[key]).item(), key


def in_memory_quantized(float_dir, config, dtype=None):
    """The float16 conversion loaded as stored and quantized by MLX in memory; then, like the
    loader, other float weights cast to `dtype` (scales and biases stay as quantized)."""
    model, _ = load_model(float_dir, dtype=mx.float16)
    quantize_model(model, config, warn=lambda message: None)
    if dtype is not None:
        model.load_weights(list(cast(params(model), dtype).items()))
    fastpath.auto_enable(model)  # the same kernels as the loaded conversion, as load() picks them
    return model


def stored(model_dir):
    tensors = {}
    for path in Path(model_dir).glob("*.safetensors"):
        tensors.update(mx.load(str(path)))
    return tensors


def tree_digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).iterdir())}


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# -- 1. conversions equal their oracles ------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_float16_conversion_matches_transformers(tiny_checkpoint, converted, make_image, name):
    ckpt = tiny_checkpoint(name)
    out = converted(name)
    assert all(v.dtype == mx.float16 for v in stored(out).values())
    # transformers with the same float16-rounded weights, computing in float32
    rounded = copy.deepcopy(ckpt.reference).half().float()
    batch = image_batch(ckpt, make_image)
    with torch.no_grad():
        expected = rounded(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    model, _ = load(out)
    diff = np.abs(np.array(run(model, batch)) - expected).max()
    assert diff <= 1e-4, f"{name}: max |Δlogit| {diff:.2e}"
    with torch.no_grad():
        original = ckpt.reference(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(expected - original).max() > 0  # the rounding is real, so the check above is sharp


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", BACKBONES)
def test_quantized_conversion_equals_in_memory_quantization(tiny_checkpoint, converted, make_image, name, bits):
    model, config = load_model(converted(name, bits), dtype=mx.float16)  # as stored
    assert_same_params(model, in_memory_quantized(converted(name), QuantConfig(bits=bits)))
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    # logits in float32 (MLX's float16 quantized kernels are very slow on CPU)
    reference = in_memory_quantized(converted(name), QuantConfig(bits=bits), dtype=mx.float32)
    model, _ = load_model(converted(name, bits), dtype=mx.float32)
    assert_same_params(model, reference)
    batch = image_batch(tiny_checkpoint(name), make_image)
    assert mx.array_equal(run(model, batch), run(reference, batch)).item()


# -- 2. the quality report -------------------------------------------------------------------------

def test_kl_and_top1_match_torch():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 500)).astype(np.float32)
    quant = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)
    quant[:10] = rng.normal(size=(10, 500))  # some positions disagree
    kl, agree = kl_and_top1(ref, quant, chunk=64)
    p, q = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1), torch.log_softmax(torch.tensor(quant, dtype=torch.float64), -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(kl, expected, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(agree, ref.argmax(-1) == quant.argmax(-1))
    assert 0 < agree.mean() < 1


@pytest.mark.parametrize("name", BACKBONES)
def test_report_8bit_close_4bit_worse(tiny_checkpoint, converted, name):
    source = tiny_checkpoint(name).path
    r8, r4 = quality_report(source, converted(name, 8)), quality_report(source, converted(name, 4))
    assert r8["positions"] > 100
    assert r8["mean_kl"] < 1e-3 and r8["top1_agreement"] >= 0.97, (r8["mean_kl"], r8["top1_agreement"])
    assert all(math.isfinite(r4[k]) for k in ("mean_kl", "max_kl", "top1_agreement"))
    assert r4["mean_kl"] > r8["mean_kl"] and r4["top1_agreement"] < r8["top1_agreement"]
    assert r4["quantized_weights"]["size_on_disk_bytes"] < r8["quantized_weights"]["size_on_disk_bytes"]


@pytest.mark.parametrize("bits", [8, 4])
def test_bits_per_weight_agree_with_mlx_lm(converted, bits):
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

    stats = weight_stats(converted("mistral", bits))
    model, _ = load_model(converted("mistral", bits), dtype=mx.float16)  # as stored
    # mlx-lm counts the parameters of leaf modules only: add the two arrays held by others
    counted = get_total_parameters(model)
    extra = model.image_newline.size + model.vision_tower.embeddings.class_embedding.size
    expected = compute_bits_per_weight(model) * counted / (counted + extra)
    assert stats["bits_per_weight"] == pytest.approx(expected, rel=1e-12)
    # every text layer quantized, float16 scale + bias per 64 weights
    assert stats["text_bits_per_weight"] == pytest.approx(bits + 32 / 64, abs=0.01)


# -- 3. the 4-bit CLI output -----------------------------------------------------------------------

def test_cli_4bit_config_vision_float16_and_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "q4"
    code, stdout, stderr = cli("convert", tiny_checkpoint("mistral").path, "--out", out, "-q", "--report", "--no-progress")
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["mlx_llava_next_format"] == 1
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    tensors = stored(out)
    vision = {k: v for k, v in tensors.items() if k.startswith(("vision_tower.", "multi_modal_projector.", "image_newline"))}
    assert vision and all(v.dtype == mx.float16 for v in vision.values())
    assert not any(k.endswith(".scales") for k in vision)
    assert tensors["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja", "README.md"):
        assert (out / name).exists(), name
    assert "mistral" in (out / "README.md").read_text() and "4-bit" in (out / "README.md").read_text()
    report = json.loads((out / REPORT_FILE).read_text())
    assert math.isfinite(report["mean_kl"]) and 0 <= report["top1_agreement"] <= 1
    assert f"{100 * report['top1_agreement']:.2f}%" in stdout and "bits per weight" in stdout
    assert report["quantized_weights"]["size_on_disk_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))


def test_converted_processor_equals_source(tiny_checkpoint, converted, make_image):
    ckpt = tiny_checkpoint("qwen2")
    _, ours = load(converted("qwen2", 4))
    _, source = ckpt.load()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = ours.apply_chat_template(messages)
    assert text == source.apply_chat_template(messages) == ckpt.prompt("What is this?")
    a, b = ours(text, images=[make_image(70, 40)]), source(text, images=[make_image(70, 40)])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_small_shards_and_index(tiny_checkpoint, converted, tmp_path):
    out = tmp_path / "sharded"
    convert(tiny_checkpoint("llama").path, out, quantization=QuantConfig(bits=8), show_progress=False,
            max_shard_bytes=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for name in files:
        tensors = mx.load(str(out / name))
        assert {k for k, f in index["weight_map"].items() if f == name} == set(tensors)
        size = sum(v.nbytes for v in tensors.values())
        assert size <= 400_000 or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    a, _ = load_model(out, dtype=mx.float16)
    b, _ = load_model(converted("llama", 8), dtype=mx.float16)
    assert_same_params(a, b)


# -- mixed recipes and the quantize command --------------------------------------------------------

def test_quantize_command_equals_convert(converted, tmp_path):
    out = tmp_path / "q8"
    code, _, stderr = cli("quantize", converted("qwen2"), "--out", out, "--bits", "8", "--no-progress")
    assert code == 0, stderr
    a, _ = load_model(out, dtype=mx.float16)
    b, _ = load_model(converted("qwen2", 8), dtype=mx.float16)
    assert_same_params(a, b)
    code, _, stderr = cli("quantize", out, "--out", tmp_path / "again")
    assert code == 1 and "already quantized" in stderr and not (tmp_path / "again").exists()


def test_mixed_recipe(converted, tmp_path, tiny_checkpoint, make_image):
    out = tmp_path / "mixed"
    code, _, stderr = cli("quantize", converted("llama"), "--out", out, "--recipe", "mixed_3_6", "--no-progress")
    assert code == 0, stderr
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["language_model.lm_head"]["bits"] == 6
    # 2 layers: the last eighth is layer 1 (mlx-lm's rule), so its down_proj/v_proj get 6 bits
    assert quant["language_model.model.layers.1.mlp.down_proj"]["bits"] == 6
    assert quant["language_model.model.layers.1.self_attn.v_proj"]["bits"] == 6
    assert quant["language_model.model.layers.0.mlp.down_proj"]["bits"] == 3
    assert quant["language_model.model.layers.1.self_attn.q_proj"]["bits"] == 3
    model, _ = load_model(out, dtype=mx.float16)
    assert model.language_model.lm_head.bits == 6
    assert model.language_model.model.layers[1].self_attn.q_proj.bits == 3
    reference = in_memory_quantized(converted("llama"), QuantConfig(recipe="mixed_3_6"))
    assert_same_params(model, reference)


# -- 4. atomic output ------------------------------------------------------------------------------

def test_existing_output_refused_without_force(tiny_checkpoint, converted, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(converted("mistral"), out)
    before = tree_digest(out)
    code, stdout, stderr = cli("convert", tiny_checkpoint("mistral").path, "--out", out, "-q")
    assert code == 1
    assert stderr.strip().count("\n") == 0 and "already exists" in stderr and "--force" in stderr
    assert tree_digest(out) == before
    code, _, stderr = cli("convert", tiny_checkpoint("mistral").path, "--out", out, "-q", "--force", "--no-progress")
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


SLOW_CLI = """
import sys, time
import convert.shards as shards
write = shards._raw_bytes
def slow(array):
    time.sleep(0.05)  # give the test time to interrupt the conversion part-way
    return write(array)
shards._raw_bytes = slow
from cli import app
sys.argv = ["cli.py"] + sys.argv[1:]
app()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_interrupted_conversion_leaves_no_target(tiny_checkpoint, tmp_path, signum):
    out = tmp_path / "target"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", str(tiny_checkpoint("llama").path), "--out", str(out), "-q"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".tmp-target-*/*.safetensors")):  # part-way: a shard is being written
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # the temporary directory is gone too


# -- 6. bad input ----------------------------------------------------------------------------------

def test_not_a_llava_next_checkpoint(tmp_path):
    plain = tmp_path / "llama"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    mx.save_safetensors(str(plain / "model.safetensors"), {"model.embed_tokens.weight": mx.zeros((4, 4))})
    code, _, stderr = cli("convert", plain, "--out", tmp_path / "out")
    assert code == 1 and "'llama' is not LLaVA-NeXT" in stderr and stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = cli("convert", empty, "--out", tmp_path / "out")
    assert code == 1 and "no config.json" in stderr
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("mistral").path, src)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, stderr = cli("convert", src, "--out", tmp_path / "out", "-q")
    assert code == 1 and "model-00002-of-00002.safetensors" in stderr and "truncated" in stderr
    assert stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_group_size_not_dividing_a_layer_falls_back(tiny_checkpoint, converted, tmp_path, make_image):
    # text hidden size 64, MLP 128: with group size 128 only down_proj (input 128) divides
    out = tmp_path / "g128"
    code, _, stderr = cli("convert", tiny_checkpoint("llama").path, "--out", out, "-q", "--group-size", "128", "--no-progress")
    assert code == 0, stderr
    assert "language_model.model.layers.0.self_attn.q_proj not quantized" in stderr
    assert "group size 128" in stderr and "down_proj not quantized" not in stderr
    tensors = stored(out)
    assert "language_model.model.layers.1.mlp.down_proj.scales" in tensors
    assert "language_model.model.layers.1.self_attn.q_proj.scales" not in tensors
    model, _ = load_model(out, dtype=mx.float16)
    assert_same_params(model, in_memory_quantized(converted("llama"), QuantConfig(group_size=128)))


def test_bad_settings_one_line_errors(tiny_checkpoint, tmp_path):
    for args in (["-q", "--bits", "7"], ["-q", "--group-size", "48"], ["--recipe", "mixed_9_9"], ["--quantize-vision"]):
        code, _, stderr = cli("convert", tiny_checkpoint("mistral").path, "--out", tmp_path / "out", *args)
        assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, (args, stderr)
    assert not (tmp_path / "out").exists()


def test_quantize_vision(converted, tmp_path):
    out = tmp_path / "qv"
    code, _, stderr = cli("quantize", converted("mistral"), "--out", out, "--quantize-vision", "--group-size", "32", "--no-progress")
    assert code == 0, stderr
    tensors = stored(out)
    assert "vision_tower.encoder.layers.0.mlp.fc1.scales" in tensors
    assert "multi_modal_projector.linear_1.scales" in tensors
    # read as plain arrays by the tower, never quantized
    assert tensors["vision_tower.embeddings.position_embedding.weight"].dtype == mx.float16
    model, _ = load_model(out, dtype=mx.float16)
    assert_same_params(model, in_memory_quantized(converted("mistral"), QuantConfig(group_size=32, quantize_vision=True)))


# -- mlx-vlm's layout ------------------------------------------------------------------------------

def save_mlx_vlm_checkpoint(ckpt, out: Path, dtype=mx.float32, bits=None, group_size=64, legacy=False):
    """A tiny checkpoint as mlx-vlm writes LLaVA-NeXT, from its module tree
    (mlx_vlm/models/llava_next): Model{vision_tower: VisionModel{vision_model: ClipVisionModel{
    embeddings, pre_layrnorm, encoder.layers, post_layernorm}}, language_model: LanguageModel{
    model: Llama{embed_tokens, layers, norm}, lm_head}, multi_modal_projector{linear_1, linear_2},
    image_newline}; its VisionModel.sanitize stores the patch conv OHWI. Quantized like its
    convert: the language model's Linear/Embedding layers, vision and projector skipped; or, as
    2024 releases did (`legacy`), every nn.Linear, vision and projector included, no Embedding,
    and a `quantization` block without "mode"."""
    weights = {}
    for key, value in ckpt.reference.state_dict().items():
        if key == "lm_head.weight":
            name = "language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            name = "language_model.model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            name = "vision_tower.vision_model." + key[len("model.vision_tower."):]
        else:
            name = key[len("model."):]
        array = mx.array(value.float().numpy()).astype(dtype)
        if name.endswith("patch_embedding.weight"):
            array = array.transpose(0, 2, 3, 1)
        weights[name] = array
    config = json.loads((ckpt.path / "config.json").read_text())
    if bits:
        if legacy:  # 2-D weights are Linear layers, except the two embeddings
            chosen = [n for n, v in weights.items() if v.ndim == 2 and "embed" not in n]
        else:
            chosen = [n for n, v in weights.items() if n.startswith("language_model.") and v.ndim == 2]
        for name in chosen:
            path = name[: -len(".weight")]
            weights[name], weights[f"{path}.scales"], weights[f"{path}.biases"] = mx.quantize(weights[name], group_size, bits)
        block = {"group_size": group_size, "bits": bits}
        config["quantization"] = config["quantization_config"] = block if legacy else {**block, "mode": "affine"}
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config))
    for path in ckpt.path.iterdir():
        if path.suffix in (".json", ".jinja", ".model") and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(path, out / path.name)


def test_loads_mlx_vlm_layout(tiny_checkpoint, converted, tmp_path, make_image):
    ckpt = tiny_checkpoint("mistral")
    batch = image_batch(ckpt, make_image)
    save_mlx_vlm_checkpoint(ckpt, tmp_path / "vlm")
    model, processor = load(tmp_path / "vlm")
    with torch.no_grad():
        expected = ckpt.reference(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(np.array(run(model, batch)) - expected).max() <= 1e-4
    save_mlx_vlm_checkpoint(ckpt, tmp_path / "vlm4", dtype=mx.float16, bits=4)
    model, _ = load_model(tmp_path / "vlm4", dtype=mx.float16)
    assert_same_params(model, in_memory_quantized(converted("mistral"), QuantConfig(bits=4)))
    save_mlx_vlm_checkpoint(ckpt, tmp_path / "legacy", dtype=mx.float16, bits=8, group_size=32, legacy=True)
    model, _ = load_model(tmp_path / "legacy", dtype=mx.float16)
    reference, _ = load_model(converted("mistral"), dtype=mx.float16)
    nn.quantize(reference, 32, 8, class_predicate=lambda path, module: isinstance(module, nn.Linear))
    assert_same_params(model, reference)
    assert model.vision_tower.encoder.layers[0].mlp.fc1.bits == 8
    # and our converter reads it like any other layout
    convert(tmp_path / "vlm", tmp_path / "ours", show_progress=False)
    assert_same_params(load_model(tmp_path / "ours", dtype=mx.float16)[0], load_model(converted("mistral"), dtype=mx.float16)[0])
