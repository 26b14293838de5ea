#!/usr/bin/env python3
"""Write a random checkpoint shaped like llava-hf/llava-v1.6-mistral-7b-hf (Hub key layout,
float16, ~15 GB in 4 shards) without holding it in memory: each tensor is generated lazily
and written on its own (convert/shards.py). Used to measure converting a 7B model.

    python benchmarks/make_7b_checkpoint.py /tmp/llava-7b-random
    /usr/bin/time -v python cli.py convert /tmp/llava-7b-random --out /tmp/llava-7b-4bit -q
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.common import atomic_output_dir, progress  # noqa: E402
from convert.shards import write_shards  # noqa: E402

# The released config.json (text sizes left at MistralConfig's defaults are spelled out here).
CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "ignore_index": -100,
    "image_token_index": 32000,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "torch_dtype": "bfloat16", "vocab_size": 32064,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "projection_dim": 768, "vocab_size": 32000, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    },
}
PREPROCESSOR = {
    "image_processor_type": "LlavaNextImageProcessor", "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
    "do_rescale": True, "do_resize": True, "image_grid_pinpoints": CONFIG["image_grid_pinpoints"],
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
PROCESSOR = {"processor_class": "LlavaNextProcessor", "image_token": "<image>", "patch_size": 14,
             "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}"
    "{% endif %}{% endfor %}"
)


def shapes(config: dict) -> dict:
    """Every tensor of the Hub checkpoint: name -> shape (transformers 4.x names)."""
    t, v = config["text_config"], config["vision_config"]
    D, F, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = D // t["num_attention_heads"] * t["num_key_value_heads"]
    out = {"image_newline": (D,), "language_model.lm_head.weight": (V, D),
           "language_model.model.embed_tokens.weight": (V, D), "language_model.model.norm.weight": (D,)}
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
                    p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
                    p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                    p + "mlp.down_proj.weight": (D, F), p + "input_layernorm.weight": (D,),
                    p + "post_attention_layernorm.weight": (D,)})
    d, f, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    c = "vision_tower.vision_model."
    out.update({c + "embeddings.class_embedding": (d,), c + "embeddings.patch_embedding.weight": (d, 3, patch, patch),
                c + "embeddings.position_embedding.weight": ((v["image_size"] // patch) ** 2 + 1, d)})
    for norm in ("pre_layrnorm", "post_layernorm"):
        out.update({c + f"{norm}.weight": (d,), c + f"{norm}.bias": (d,)})
    for i in range(v["num_hidden_layers"]):
        p = f"{c}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.update({p + f"self_attn.{proj}.weight": (d, d), p + f"self_attn.{proj}.bias": (d,)})
        for norm in ("layer_norm1", "layer_norm2"):
            out.update({p + f"{norm}.weight": (d,), p + f"{norm}.bias": (d,)})
        out.update({p + "mlp.fc1.weight": (f, d), p + "mlp.fc1.bias": (f,),
                    p + "mlp.fc2.weight": (d, f), p + "mlp.fc2.bias": (d,)})
    out.update({"multi_modal_projector.linear_1.weight": (D, d), "multi_modal_projector.linear_1.bias": (D,),
                "multi_modal_projector.linear_2.weight": (D, D), "multi_modal_projector.linear_2.bias": (D,)})
    return out


def random_tensors(config: dict) -> dict:
    """Lazy float16 arrays: N(0, 0.02) weights, norm scales near 1 (generated when written)."""
    tensors = {}
    for i, (name, shape) in enumerate(sorted(shapes(config).items())):
        value = mx.random.normal(shape, dtype=mx.float16, scale=0.02, key=mx.random.key(i))
        tensors[name] = value + 1 if "norm" in name and name.endswith(".weight") else value
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--text-layers", type=int, default=32, help="fewer for a quick smaller run")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    config = json.loads(json.dumps(CONFIG))
    config["text_config"]["num_hidden_layers"] = args.text_layers
    with atomic_output_dir(args.out, args.force) as tmp:
        write_shards(tmp, random_tensors(config), max_bytes=4_500_000_000, metadata={"format": "pt"},
                     progress=lambda items, total: progress(items, total, "writing"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        try:  # the real Mistral-7B tokenizer ships with mistral-common (a test dependency)
            import mistral_common

            shutil.copyfile(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                            tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                   "bos_token": "<s>", "eos_token": "</s>"}))
        except ImportError:
            pass
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
