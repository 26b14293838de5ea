"""Users never need torch, and bad input gets a specific, catchable error."""

import json
import shutil
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from mlx_llava_next import CheckpointError, ImageError, PromptError, UnsupportedModelError, load

NO_TORCH = textwrap.dedent(
    """
    import sys
    # As if torch were not installed: `import torch` raises ImportError and
    # importlib.util.find_spec("torch") (how transformers probes for it) returns None.
    sys.modules["torch"] = None
    try:
        import torch
        raise SystemExit("torch import was not blocked")
    except ImportError:
        pass

    import numpy as np
    from PIL import Image
    from mlx_llava_next import load
    model, processor = load(sys.argv[1])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8))
    batch = processor("USER: <image>\\nWhat is shown? ASSISTANT:", images=[image])
    logits = model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
    assert sys.modules["torch"] is None
    print("OK", logits.shape)
    """
)


def test_load_forward_and_preprocessing_without_torch(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(ckpt.path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


# -- prompts ----------------------------------------------------------------------------

@pytest.mark.parametrize("markers,n_images", [(1, 2), (2, 1), (0, 1), (1, 0)])
def test_marker_and_image_counts_must_match(tiny_checkpoint, make_image, markers, n_images):
    _, processor = tiny_checkpoint("mistral").load()
    text = "[INST] " + "<image>\n" * markers + "What? [/INST]"
    with pytest.raises(PromptError, match="marker"):
        processor(text, images=[make_image(60, 60, i) for i in range(n_images)])


def test_feature_count_mismatch_in_the_model_is_a_prompt_error(tiny_checkpoint, make_image):
    model, processor = tiny_checkpoint("mistral").load()
    batch = processor("[INST] <image>\nWhat? [/INST]", images=[make_image(60, 90)])
    ids = batch["input_ids"][:, 3:]  # drop some tokens but keep the images: counts no longer match
    ids = np.concatenate([ids[:, :5], ids[:, 6:]], axis=1)
    with pytest.raises(PromptError, match="do not match"):
        model(ids, batch["pixel_values"], batch["image_sizes"])


# -- images -----------------------------------------------------------------------------

def test_bad_image_files_raise_image_error(tiny_checkpoint, tmp_path):
    _, processor = tiny_checkpoint("mistral").load()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path in [empty, text, tmp_path / "missing.png"]:
        with pytest.raises(ImageError, match=path.name):
            processor("[INST] <image>\nWhat? [/INST]", images=[str(path)])


# -- checkpoints ------------------------------------------------------------------------

def copy_checkpoint(ckpt, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(ckpt.path, target)
    return target


def rewrite_shard(path, edit):
    weights = mx.load(str(path))
    edit(weights)
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    target = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path)
    shard = sorted(target.glob("*.safetensors"))[0]
    victim = sorted(mx.load(str(shard)))[0]
    rewrite_shard(shard, lambda w: w.pop(victim))
    index = json.loads((target / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(victim)
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        load(target)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    target = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path)
    shard = sorted(target.glob("*.safetensors"))[0]
    victim = next(k for k, v in mx.load(str(shard)).items() if v.ndim == 2 and "language_model" in k)
    rewrite_shard(shard, lambda w: w.__setitem__(victim, w[victim][:-1]))
    with pytest.raises(CheckpointError, match="shape"):
        load(target)


def test_truncated_shard_is_named(tiny_checkpoint, tmp_path):
    target = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path)
    shard = sorted(target.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load(target)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    target = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path)
    shard = sorted(target.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load(target)


def test_unsupported_model_type(tiny_checkpoint, tmp_path):
    target = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "idefics2"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="idefics2"):
        load(target)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load(str(tmp_path / "nope"))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="someone/not-a-model"):
        load("someone/not-a-model")
