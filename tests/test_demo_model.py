"""The embedded demo model (models/demo): transformers agrees with us, it reads examples/scan.png, training resumes exactly."""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"

needs_demo = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="models/demo is not built")


def _line(seed: int, text: str):
    from train import data

    return data.render_cells(text, np.random.default_rng(seed)).image


@needs_demo
def test_transformers_greedy_equals_ours():
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    import mlx_llava_next as mln

    hf = LlavaNextForConditionalGeneration.from_pretrained(DEMO, dtype=torch.float32).eval()
    hf_proc = LlavaNextProcessor.from_pretrained(DEMO)
    model, processor = mln.load(DEMO)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    prompt = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
    for seed, text in [(1, "Total: $24.40"), (2, "INV-0117 due 03/12/2024"), (3, "k7#Qz m")]:
        image = _line(seed, text)
        batch = hf_proc(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=40, do_sample=False)
        theirs = hf_proc.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        ours = mln.generate(model, processor, "Read it.", images=[image], max_tokens=40).text
        assert ours == theirs
        assert ours == text  # the rendered string is the oracle


@needs_demo
def test_export_has_no_training_only_tensors():
    import mlx.core as mx

    names = mx.load(str(DEMO / "model.safetensors")).keys()
    assert not [n for n in names if "glyph" in n]


@needs_demo
def test_ocr_demo_transcribes_the_example(tmp_path):
    from typer.testing import CliRunner

    import cli
    from train import data

    result = CliRunner().invoke(cli.app, ["ocr", str(REPO / "examples" / "scan.png"), "--model", "demo",
                                          "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scan.txt").read_text().rstrip("\n") == data.SCAN_TEXT


def test_training_resumes_deterministically(tmp_path):
    import mlx.core as mx

    from train import train

    common = ["--steps", "4", "--tokens", "300", "--eval-every", "100", "--eval-lines", "3", "--warmup", "2"]
    train.main(common + ["--out", str(tmp_path / "a"), "--save-every", "100"])
    train.main(common + ["--out", str(tmp_path / "b"), "--save-every", "100", "--stop-at", "2"])
    log = train.main(common + ["--out", str(tmp_path / "b"), "--save-every", "100"])
    assert log[-1]["step"] == 4
    a = mx.load(str(tmp_path / "a" / "model.safetensors"))
    b = mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    before = mx.load(str(tmp_path / "a" / "glyph_head.safetensors"))
    assert before  # the head is trained and saved beside the model, not in it


def test_line_splitting_finds_every_rendered_line():
    """Ink projection cuts blocks of the contract (2-6 lines, 16-36 px, rotation <= 1.5 deg) into
    as many lines as were rendered, in every font."""
    from mlx_llava_next import lines
    from train import data, export

    settings = lines.ReaderSettings.from_dict(export.READER)
    rng = np.random.default_rng(4242)
    for font in ("mono", "sans", "serif", "pillow"):
        for _ in range(3):
            image, text, _ = data.heldout_sample(rng, "block", font)
            found = lines.split_lines(image, settings)
            assert len(found) == text.count("\n") + 1
            assert all(c.image.height == settings.line_height and c.image.width in settings.widths
                       for crops in found for c in crops)
