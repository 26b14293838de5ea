"""The PyTorch reference path (CPU here) and `cli.py parity`.

The reference module is checked against transformers' own forward and a cache-free greedy
loop on the in-memory model the tiny checkpoint was saved from; parity's figures (KL, top-1)
are recomputed with torch. GPU and real-checkpoint runs are in test_checkpoint.py.
"""

import json

import mlx.nn as nn
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlx_llava_next import load
from mlx_llava_next.commands.parity import build_prompt
from mlx_llava_next.image_processing import load_image
from mlx_llava_next.parity import compare_models, first_divergence
from mlx_llava_next.reference import Reference

BACKBONES = ["llama", "mistral", "qwen2", "llama_multilayer"]
TOKENS = 6


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("parity") / "image.png"
    random_image(70, 130, seed=3).save(path)  # 1x2 grid with padding rows: unpad is exercised
    return path


def run_cli(*args):
    from cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def hf_inputs(ckpt, image):
    """Inputs from transformers' own processor (independent of ours), as numpy."""
    batch = ckpt.hf_processor(images=[image], text=ckpt.prompt(), return_tensors="np")
    return {k: np.asarray(v) for k, v in batch.items()}


# -- the reference module against transformers itself ----------------------------------------------
@pytest.mark.parametrize("name", ["llama", "llama_multilayer"])
def test_reference_outputs_equal_transformers_forward(tiny_checkpoint, make_image, name):
    ckpt = tiny_checkpoint(name)
    inputs = hf_inputs(ckpt, make_image(70, 130, 1))
    ref = Reference(ckpt.path, device="cpu", dtype="float32")  # loaded from disk, eager attention
    out = ref.run(inputs, tokens=TOKENS, eos_token_ids=[])

    oracle = ckpt.reference  # the in-memory model the checkpoint was written from
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    layers = oracle.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    with torch.no_grad():
        expected = oracle(**tensors)
        vision = expected.image_outputs  # hidden states captured inside the full forward
        hidden = torch.cat([vision.hidden_states[i] for i in layers], dim=-1)
        projected = oracle.model.multi_modal_projector(hidden[:, 1:])
    np.testing.assert_allclose(out.logits, expected.logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.vision_hidden_states, hidden.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.projector_output, projected.numpy(), atol=1e-5, rtol=0)
    assert len(out.image_features) == len(vision.pooler_output) == 1
    np.testing.assert_allclose(out.image_features[0], vision.pooler_output[0].numpy(), atol=1e-5, rtol=0)
    n_image_tokens = int((inputs["input_ids"] == oracle.config.image_token_id).sum())
    assert out.image_features[0].shape[0] == n_image_tokens

    # Greedy: argmax of a full forward over the growing sequence, no KV cache.
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    tokens = []
    with torch.no_grad():
        for _ in range(TOKENS):
            logits = oracle(input_ids=ids, attention_mask=mask, pixel_values=tensors["pixel_values"],
                            image_sizes=tensors["image_sizes"]).logits
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    assert out.generated == tokens


def test_reference_rejects_a_device_or_dtype_it_cannot_run(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    from mlx_llava_next.reference import ReferenceModelError

    with pytest.raises(ReferenceModelError, match="dtype"):
        Reference(ckpt.path, device="cpu", dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(ReferenceModelError, match="CUDA"):
            Reference(ckpt.path, device="cuda")


# -- cli.py parity on every tiny checkpoint -------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_cli_parity_json_on_tiny_checkpoints(tiny_checkpoint, image_file, name):
    ckpt = tiny_checkpoint(name)
    result = run_cli("parity", ckpt.path, "--image", image_file, "--device", "cpu", "--tokens", TOKENS, "--json")
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert isinstance(report, dict)
    assert (report["device"], report["dtype"]) == ("cpu", "float32")
    assert report["logits"]["max_abs"] <= 1e-4
    for stage in ("vision", "projector", "packed", "logits_before_image", "logits_image", "logits_after_image"):
        assert report[stage]["max_abs"] <= 1e-4, stage
    # The split covers every position: text before the image, the image, text after it.
    _, processor = ckpt.load()
    inputs = processor(build_prompt(processor, "What is shown in this image?"), images=[load_image(image_file)])
    vocab = ckpt.reference.config.text_config.vocab_size
    ids = inputs["input_ids"][0]
    image_id = ckpt.reference.config.image_token_id
    first = int(np.argmax(ids == image_id))
    assert report["prompt_tokens"] == len(ids) and report["image_tokens"] == int((ids == image_id).sum())
    assert report["logits_before_image"]["count"] == first * vocab
    assert report["logits_image"]["count"] == report["image_tokens"] * vocab
    assert report["logits_after_image"]["count"] == (len(ids) - first - report["image_tokens"]) * vocab
    assert report["top1_agreement"] == 1.0 and report["top1_last"]
    assert report["kl_max"] < 1e-9
    assert report["first_divergence"] is None
    assert report["greedy_ours"] == report["greedy_reference"] and len(report["greedy_ours"]) >= 1


def test_cli_parity_readable_report(tiny_checkpoint, image_file):
    ckpt = tiny_checkpoint("mistral")
    result = run_cli("parity", ckpt.path, "--image", image_file, "--prompt", "Describe it.", "--tokens", 3)
    assert result.exit_code == 0, result.output[-2000:]
    text = result.stdout
    for label in ("CLIP hidden states", "projector output", "packed image features", "text before the image",
                  "image positions", "text after the image", "top-1 agreement", "KL(reference || ours)",
                  "greedy continuation"):
        assert label in text, label
    assert "identical (3 tokens)" in text


def test_cli_parity_needs_a_reference_for_converted_models(tmp_path, tiny_checkpoint, image_file):
    ckpt = tiny_checkpoint("llama")
    mlx_dir = tmp_path / "converted"
    mlx_dir.mkdir()
    config = json.loads((ckpt.path / "config.json").read_text())
    (mlx_dir / "config.json").write_text(json.dumps({**config, "mlx_llava_next_format": 1}))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for model in (mlx_dir, gguf):
        result = run_cli("parity", model, "--image", image_file, "--json")
        assert result.exit_code == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--reference" in lines[0]
    for args, expected in ((["--dtype", "float64"], "--dtype"), (["--reference", mlx_dir], "llava-hf checkpoint")):
        result = run_cli("parity", ckpt.path, "--image", image_file, *args)
        assert result.exit_code == 1, result.output
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- converted and 4-bit models: --reference, KL and top-1 figures -----------------------------------
@pytest.mark.parametrize("kind", ["mlx-float32", "mlx-4bit", "gguf-f32"])
def test_cli_parity_on_a_conversion(tmp_path, tiny_checkpoint, image_file, kind):
    ckpt = tiny_checkpoint("mistral")
    if kind == "gguf-f32":
        from convert.gguf import convert_to_gguf

        out, _ = convert_to_gguf(ckpt.path, tmp_path / "gguf", qtype="f32", progress=False)
    else:
        from convert.mlx import convert
        from quantize.mlx import QuantConfig

        quantization = QuantConfig(bits=4, group_size=64) if kind == "mlx-4bit" else None
        out = convert(ckpt.path, tmp_path / "mlx", dtype="float32", quantization=quantization, show_progress=False)
    result = run_cli("parity", out, "--reference", ckpt.path, "--image", image_file, "--tokens", TOKENS, "--json")
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.stdout)
    for stage in ("vision", "projector", "packed"):  # the tower and projector stay float
        assert report[stage]["max_abs"] <= 1e-4, stage
    if kind != "mlx-4bit":
        assert report["logits"]["max_abs"] <= 1e-4 and report["top1_agreement"] == 1.0
        assert report["first_divergence"] is None
    else:
        assert report["logits"]["max_abs"] > 1e-3  # the language model is quantized
        assert report["kl_mean"] > 0 and report["kl_max"] >= report["kl_mean"]
        assert 0.0 < report["top1_agreement"] <= 1.0


def test_parity_figures_on_a_4bit_model_match_torch(tiny_checkpoint, image_file):
    # Quantized in memory (the layers a 4-bit conversion quantizes: the language model only);
    # the parity function's KL and top-1 are recomputed independently with torch.
    ckpt = tiny_checkpoint("qwen2")
    model, processor = load(ckpt.path)  # a private copy: the cached one stays float
    nn.quantize(model, group_size=64, bits=4, class_predicate=model.quant_predicate)
    inputs = processor(build_prompt(processor, "What is shown?"), images=[load_image(image_file)])
    ref = Reference(ckpt.path, device="cpu", dtype="float32")
    report = compare_models(model, processor, ref, inputs, tokens=TOKENS)

    # The tower and projector are not quantized: still float-exact.
    for stage in (report.vision, report.projector, report.packed):
        assert stage.max_abs <= 1e-4
    assert report.logits.max_abs > 1e-3  # the language model is

    # KL and top-1 recomputed independently with torch from the two models' logits.
    ours = torch.tensor(np.array(model(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])))[0]
    theirs = torch.tensor(ref.run(inputs).logits)[0].double()
    kl = torch.nn.functional.kl_div(ours.double().log_softmax(-1), theirs.log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1)
    assert report.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4)
    assert report.kl_max == pytest.approx(kl.max().item(), rel=1e-4)
    assert report.kl_last == pytest.approx(kl[-1].item(), rel=1e-4)
    assert report.kl_mean > 0
    agree = (ours.argmax(-1) == theirs.argmax(-1)).double()
    assert report.top1_agreement == pytest.approx(agree.mean().item())
    assert report.top1_last == bool(agree[-1])
    assert report.first_divergence == first_divergence(report.greedy_ours, report.greedy_reference)
    json.dumps(report.to_dict())  # serialisable as --json prints it


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one side stopped (EOS) earlier
