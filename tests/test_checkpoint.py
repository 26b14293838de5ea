"""Parity that needs hardware or weights we do not ship: run with `pytest -m "gpu or checkpoint"`.

* `gpu`: the PyTorch reference on CUDA against our MLX model (CPU) on the tiny checkpoints.
* `checkpoint`: a released llava-hf checkpoint named by LLAVA_NEXT_CHECKPOINT (a directory or
  Hub id): the first 3x3 logits transformers' conversion script recorded, and a 32-token greedy
  answer identical to the reference's. The reference runs on CUDA when present (dtype from
  LLAVA_NEXT_REFERENCE_DTYPE, default float32), else on the CPU.

Without CUDA or a checkpoint each test skips with a one-line reason (shown by `-ra`).
"""

import json
import os

import numpy as np
import pytest

from mlx_llava_next.commands.parity import build_prompt
from mlx_llava_next.parity import compare_models
from mlx_llava_next.reference import Reference

CHECKPOINT = os.environ.get("LLAVA_NEXT_CHECKPOINT")
REFERENCE_DTYPE = os.environ.get("LLAVA_NEXT_REFERENCE_DTYPE", "float32")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(
    not cuda_available(), reason="needs a CUDA device for the PyTorch reference (torch.cuda.is_available() is False)"
)
needs_checkpoint = pytest.mark.skipif(
    not CHECKPOINT, reason="needs LLAVA_NEXT_CHECKPOINT=/path/to/a llava-hf checkpoint (or a Hub id)"
)

# -- gpu: CUDA reference vs our MLX model on the CPU, tiny checkpoints ----------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tiny_checkpoint):
    from conftest import random_image

    def get(name):
        model, processor = tiny_checkpoint(name).load()
        prompt = build_prompt(processor, "What is shown in this image?")
        return model, processor, processor(prompt, images=[random_image(70, 130, seed=3)])

    return get


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "llama_multilayer"])
def test_cuda_float32_reference_matches_mlx(tiny_checkpoint, tiny_inputs, name):
    model, processor, inputs = tiny_inputs(name)
    ref = Reference(tiny_checkpoint(name).path, device="cuda", dtype="float32")
    report = compare_models(model, processor, ref, inputs, tokens=8)
    assert (report.device, report.dtype) == ("cuda", "float32")
    for stage in ("vision", "projector", "packed", "logits", "logits_before_image", "logits_image",
                  "logits_after_image"):
        assert getattr(report, stage).max_abs <= 1e-4, stage
    assert report.top1_agreement == 1.0
    assert report.first_divergence is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_reference_is_close(tiny_checkpoint, tiny_inputs, dtype):
    # Bounds ~5x what the same comparison gives with half precision on the CPU.
    model, processor, inputs = tiny_inputs("llama")
    ref = Reference(tiny_checkpoint("llama").path, device="cuda", dtype=dtype)
    report = compare_models(model, processor, ref, inputs, tokens=0)
    assert report.dtype == dtype
    assert 0 < report.logits.max_abs <= 1e-2
    assert report.top1_agreement >= 0.9
    assert report.kl_max <= 1e-6


@pytest.mark.gpu
@needs_cuda
def test_cli_parity_on_cuda(tiny_checkpoint, tmp_path):
    from conftest import random_image
    from typer.testing import CliRunner

    from cli import app

    image = tmp_path / "image.png"
    random_image(90, 60, seed=4).save(image)
    path = tiny_checkpoint("qwen2").path
    result = CliRunner().invoke(app, ["parity", str(path), "--image", str(image), "--device", "cuda", "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.stdout)
    assert report["device"] == "cuda" and report["logits"]["max_abs"] <= 1e-4


# -- checkpoint: a released llava-hf checkpoint ---------------------------------------------------

VICUNA_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in this image? ASSISTANT:"
)
# transformers' convert_llava_next_weights_to_hf.py: prompt and logits[0, :3, :3] (fp16 weights on a GPU).
# Positions 0-2 precede the image, so they depend only on the text model (hf-llava-next.md §6).
RECORDED = {
    "llava-v1.6-mistral-7b": (
        "[INST] <image>\nWhat is shown in this image? [/INST]",
        [[-4.8555, -4.6992, -0.1996], [-10.5703, -10.7344, -2.7246], [-7.0391, -7.3672, -0.2634]],
    ),
    "llava-v1.6-vicuna-7b": (
        VICUNA_PROMPT,
        [[1.4883, 0.9976, -0.6992], [-9.7031, -5.7031, -1.5557], [-5.1328, -5.5586, 8.8281]],
    ),
    "llava-v1.6-vicuna-13b": (
        VICUNA_PROMPT,
        [[-0.9614, 7.3125, 0.2106], [-7.2695, -8.5469, 3.6211], [-6.3750, -8.1875, 5.4688]],
    ),
    "llava-v1.6-34b": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in this "
        "image?<|im_end|><|im_start|>assistant\n",
        [[-9.0859, -9.1406, 5.9453], [-5.9570, -5.9766, 2.2754], [-5.7305, -5.7539, 4.0000]],
    ),
    "llama3-llava-next-8b": (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
        "able to understand the visual content that the user provides, and assist the user with a variety of "
        "tasks using natural language.<|eot_id|><|start_header_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is shown in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        [[-3.9648, 1.1396, 3.3145], [-5.3594, -1.5654, -1.9619], [-12.3750, -10.6797, -9.3125]],
    ),
}


def checkpoint_family(name: str, raw_config: dict):
    """Which released checkpoint this is: from its name (path, Hub id, `_name_or_path`) when it
    says, else from the text model's shape (hf-llava-next.md §4). None for 72b/110b (their
    recorded values were never checked against the original) and unknown models."""
    names = " ".join([name, str(raw_config.get("_name_or_path", ""))]).lower().replace("_", "-")
    for family in RECORDED:
        if family.removeprefix("llava-") in names:  # e.g. "v1.6-vicuna-13b", "llama3-llava-next-8b"
            return family
    from mlx_llava_next.config import LlavaNextConfig

    text = LlavaNextConfig.from_dict(raw_config).text_config
    if text["model_type"] == "mistral":
        return "llava-v1.6-mistral-7b"
    if text["model_type"] != "llama":
        return None
    if text["vocab_size"] >= 128000:
        return "llama3-llava-next-8b"
    return {4096: "llava-v1.6-vicuna-7b", 5120: "llava-v1.6-vicuna-13b", 7168: "llava-v1.6-34b"}.get(text["hidden_size"])


def test_checkpoint_family_detection():
    mistral = {"text_config": {"model_type": "mistral"}}
    assert checkpoint_family("/models/x", mistral) == "llava-v1.6-mistral-7b"
    assert checkpoint_family("llava-hf/llava-v1.6-vicuna-13b-hf", {}) == "llava-v1.6-vicuna-13b"
    assert checkpoint_family("/m/models--llava-hf--llava-v1.6-34b-hf/snapshots/abc", {}) == "llava-v1.6-34b"
    assert checkpoint_family("/x", {"text_config": {"vocab_size": 128320}}) == "llama3-llava-next-8b"
    assert checkpoint_family("/x", {"text_config": {"vocab_size": 32064}}) == "llava-v1.6-vicuna-7b"
    assert checkpoint_family("/x", {"text_config": {"model_type": "qwen2", "hidden_size": 8192}}) is None


@pytest.fixture(scope="module")
def checkpoint():
    """(path, family) of LLAVA_NEXT_CHECKPOINT; skips when its family has no recorded values."""
    from mlx_llava_next.loading import read_config, resolve_model_path

    path = resolve_model_path(CHECKPOINT)
    return path, checkpoint_family(f"{CHECKPOINT} {path}", read_config(path))


def fp16_tolerance(expected: np.ndarray) -> np.ndarray:
    """1e-3, widened to one float16 step where the recorded value's own spacing is larger (a
    value of 10 is only stored to 2^-7 ~ 0.0078; two fp16 implementations may round either way)."""
    return np.maximum(1e-3, np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32))


@pytest.mark.checkpoint
@needs_checkpoint
def test_conversion_script_logits(checkpoint):
    import mlx.core as mx

    from mlx_llava_next import load
    from mlx_llava_next.image_processing import load_image

    path, family = checkpoint
    if family is None:
        pytest.skip(f"no verified conversion-script logits for {CHECKPOINT} (72b/110b or an unknown model)")
    prompt, recorded = RECORDED[family]
    model, processor = load(path, dtype=mx.float16)
    image = load_image(np.zeros((336, 336, 3), dtype=np.uint8))
    ids = processor(prompt, images=[image])["input_ids"]
    first_image = int(np.argmax(ids[0] == model.config.image_token_index))
    assert first_image >= 3, "the recorded positions must precede the image"
    # Causal model: positions 0-2 see only tokens 0-2, so three tokens give the recorded logits
    # (float16 on a CPU is slow; the full 2k-token prompt would take many minutes).
    logits = np.array(model(ids[:, :3]).astype(mx.float32))[0, :3, :3]
    expected = np.array(recorded, dtype=np.float32)
    close = bool((np.abs(logits - expected) <= fp16_tolerance(expected)).all())
    assert close, f"{family}: logits[0, :3, :3] are\n{logits}\nthe conversion script recorded\n{expected}"


@pytest.mark.checkpoint
@needs_checkpoint
def test_greedy_answer_matches_reference(checkpoint):
    from mlx_llava_next import load
    from mlx_llava_next.parity import format_report
    from skimage import data
    from PIL import Image

    path, _ = checkpoint
    model, processor = load(path)  # float32 on the CPU
    image = Image.fromarray(data.astronaut()).resize((336, 336), Image.BICUBIC)  # ~1.2k image tokens
    inputs = processor(build_prompt(processor, "What is shown in this image?"), images=[image])
    ref = Reference(path, dtype=REFERENCE_DTYPE)
    report = compare_models(model, processor, ref, inputs, tokens=32, model_name=str(path), reference_name=str(path))
    print(format_report(report))
    assert report.first_divergence is None, format_report(report)
    assert len(report.greedy_ours) == 32 or report.greedy_ours[-1] in processor.tokenizer.eos_token_ids
