"""Write a trained demo model as a llava-hf directory (config, safetensors, char tokenizer, processor files)."""

import argparse
import json
from pathlib import Path

from mlx_llava_next.errors import OutputError

from .data import CHARSET, MAX_CHARS, WIDTHS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIALS + ["\n"] + list(CHARSET) + ["<image>"]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD, BOS, EOS, NEWLINE, IMAGE = 0, 1, 2, 4, TOKEN_ID["<image>"]
TILE, PATCH = 32, 8
PINPOINTS = [[32, 64], [32, 128], [32, 256], [64, 128], [64, 256], [128, 256]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The model transcribes: the question is not shown to it (it was never trained on questions).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{{ '</s>' }}"
    "{% endif %}{% endfor %}"
)

# How `cli.py ocr`/`chat` feed this model (mlx_llava_next/lines.py): one text line at a time.
READER = {
    "reads": "lines",
    "line_height": 16,  # rows of a line image (one glyph cell)
    "char_width": 8,  # a character's advance in the line image (one patch)
    "baseline": 11,  # the last ink row above the baseline in the line image
    "cap_height": 11,  # rows from the top of ascenders to that row, as measured by lines.cap_and_baseline
    "max_width": WIDTHS[-1],  # wider lines are read in pieces
    "max_chars": MAX_CHARS,
    "widths": list(WIDTHS),
}


def text_ids(text: str):
    return [TOKEN_ID.get(c, 3) for c in text]


def model_config() -> dict:
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "image_token_index": IMAGE,
        "image_grid_pinpoints": PINPOINTS,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": TILE, "patch_size": PATCH,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 128, "num_channels": 3,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": len(VOCAB),
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "tie_word_embeddings": False,
        },
        "line_reader": READER,
    }


def write_tokenizer(out: Path) -> None:
    """A character-level tokenizer: a byte-level `tokenizers` BPE with no merges (one token per
    printable ASCII character; GPT-2's byte alphabet writes space and newline as 'Ġ' and 'Ċ'),
    loaded by AutoTokenizer and writable to GGUF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    def byte_char(t):
        return {" ": "\u0120", "\n": "\u010a"}.get(t, t)

    vocab = {byte_char(t): i for t, i in TOKEN_ID.items()}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, model_max_length=512, chat_template=CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def write_processor_files(out: Path) -> None:
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
        "do_resize": True, "size": {"shortest_edge": TILE}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": TILE, "width": TILE}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
        "do_pad": True, "image_grid_pinpoints": PINPOINTS,
    }, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaNextProcessor", "patch_size": PATCH, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": "<image>",
    }, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, indent=2))


def hub_weights(weights: dict, config: dict) -> dict:
    """Our parameter names -> llava-hf Hub names; the tower's unused last block and post-LN are
    filled in (transformers builds them; their output is never read)."""
    import mlx.core as mx

    out = {}
    for k, v in weights.items():
        if k.startswith("vision_tower."):
            if k == "vision_tower.embeddings.patch_embedding.weight":
                v = v.transpose(0, 3, 1, 2)
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        out[k] = v
    vc = config["vision_config"]
    built = 1 + max(int(k.split(".")[4]) for k in out if k.startswith("vision_tower.vision_model.encoder.layers."))
    for layer in range(built, vc["num_hidden_layers"]):
        for k in [k for k in out if k.startswith(f"vision_tower.vision_model.encoder.layers.{built - 1}.")]:
            out[k.replace(f"layers.{built - 1}.", f"layers.{layer}.")] = mx.zeros_like(out[k])
    d = vc["hidden_size"]
    out["vision_tower.vision_model.post_layernorm.weight"] = mx.ones((d,))
    out["vision_tower.vision_model.post_layernorm.bias"] = mx.zeros((d,))
    return out


def export(weights: dict, out_dir, readme: str = "", dtype: str = "float32", sources=()) -> Path:
    """Write the directory atomically with the runtime's output rules (mlx_llava_next/outputs.py:
    a temporary directory renamed into place, the usual umask-respecting permissions, the marker
    file); an existing `out_dir` is replaced only when it is an earlier output (it holds the
    marker), never a directory of someone else's or one of `sources` (OutputError)."""
    import mlx.core as mx

    from mlx_llava_next.outputs import atomic_output_dir

    out_dir = Path(out_dir)
    config = model_config()
    config["torch_dtype"] = dtype
    with atomic_output_dir(out_dir, force=True, sources=sources) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.astype(getattr(mx, dtype)) for k, v in hub_weights(weights, config).items()}
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "pt"})
        write_tokenizer(tmp)
        write_processor_files(tmp)
        if readme:
            (tmp / "README.md").write_text(readme)
    return out_dir


def main():
    import mlx.core as mx

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a training checkpoint directory (train/train.py --out)")
    p.add_argument("--out", default="models/demo")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage dtype (float16 halves the committed file; the runtime computes in float32)")
    args = p.parse_args()
    ckpt = Path(args.checkpoint)
    weights = {k: v for k, v in mx.load(str(ckpt / "model.safetensors")).items()}
    readme = (ckpt / "MODEL_CARD.md").read_text() if (ckpt / "MODEL_CARD.md").exists() else ""
    try:
        print(export(weights, args.out, readme, args.dtype, sources=[ckpt]))
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
