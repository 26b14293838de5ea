"""Tiny random LLaVA-NeXT checkpoints built with transformers (the reference), fixed seeds.

Each is a complete llava-hf style directory: config, safetensors in a chosen key layout,
tokenizer, image processor, processor config and chat template, so every loader path is
exercised. Tiles are 56 px (CLIP patch 14 -> 4x4 tokens a tile) with pinpoints scaled from
the released [[336,672],...] list, so anyres behaves as on the real models, only smaller.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

TILE = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]

MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% endif %}{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BACKBONES = {
    # name: (text config, tokenizer kind, chat template, vision_feature_layer)
    "llama": (dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0), "spm", VICUNA_TEMPLATE, -2),
    "mistral": (dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=None), "spm", MISTRAL_TEMPLATE, -2),
    "qwen2": (dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, use_sliding_window=False), "bpe", CHATML_TEMPLATE, -2),
    "llama_multilayer": (dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2), "spm", VICUNA_TEMPLATE, [-3, -1]),
    # Mistral's sliding-window attention (the class default when a config leaves the key out).
    "mistral_window": (dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=16), "spm", MISTRAL_TEMPLATE, -2),
    # The released geometry: 336 px tiles, 24x24 tokens a tile, the default pinpoints.
    "mistral_336": (dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=None), "spm", MISTRAL_TEMPLATE, -2),
}
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def geometry(name: str):
    """(tile size, pinpoints) of a tiny backbone."""
    return (336, RELEASED_PINPOINTS) if name.endswith("_336") else (TILE, PINPOINTS)

_TOKENIZER_CACHE = {}


def spm_model_path() -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


def build_tokenizer(kind: str):
    """The real Mistral-7B SentencePiece tokenizer, or a small trained byte-level BPE (Qwen-like)."""
    if kind in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[kind]
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "spm":
        tmp = Path(tempfile.mkdtemp())
        shutil.copy(spm_model_path(), tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            add_bos_token=True, legacy=False)))
        tok = AutoTokenizer.from_pretrained(tmp)
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.add_special_tokens({"pad_token": "<pad>"})
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        words = ("the a scan page text image shows what is in this document number date line "
                 "hello world answer question cat dog red blue green one two three four").split()
        rng = np.random.default_rng(0)
        corpus = [" ".join(rng.choice(words, 12)) for _ in range(400)]
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(corpus, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    _TOKENIZER_CACHE[kind] = tok
    return tok


def build_reference(name: str, seed: int = 0, text_overrides: Optional[dict] = None):
    """(transformers model in float32 eval mode, tokenizer, LlavaNextConfig); text_overrides
    change the text config (e.g. a wider model whose decoder weights dominate its size)."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    text_extra, tok_kind, _, feature_layer = BACKBONES[name]
    tok = build_tokenizer(tok_kind)
    vocab = (len(tok) + 63) // 64 * 64
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=vocab,
                max_position_embeddings=4096, rms_norm_eps=1e-5)
    text.update(text_extra)
    text.update(text_overrides or {})
    if tok_kind == "spm":
        text.update(bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id)
    tile, pinpoints = geometry(name)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=tile, patch_size=14, projection_dim=32)
    config = LlavaNextConfig(
        text_config=text, vision_config=vision, image_grid_pinpoints=pinpoints,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=feature_layer,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights of a realistic scale, and a non-zero newline
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model, tok, config


def build_processor(tok, chat_template, tile: int = TILE, pinpoints=PINPOINTS):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def hub_layout(state_dict: dict) -> dict:
    """transformers in-memory names -> the llava-hf Hub names (transformers 4.39-4.42 saves)."""
    out = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            key = "vision_tower.vision_model." + key[len("model.vision_tower."):]
        elif key.startswith("model."):
            key = key[len("model."):]
        out[key] = value
    return out


def save_checkpoint(name: str, out_dir, layout: str = "hub", shards: int = 2, seed: int = 0,
                    text_overrides: Optional[dict] = None):
    """Write a tiny checkpoint directory; layout in {"hub", "save_pretrained", "in_memory"}."""
    from safetensors.torch import save_file

    model, tok, config = build_reference(name, seed, text_overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_processor(tok, BACKBONES[name][2], *geometry(name))
    processor.save_pretrained(out_dir)
    if layout == "save_pretrained":
        model.save_pretrained(out_dir)
        return model, processor
    config.save_pretrained(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "hub":
        state = hub_layout(state)
    keys = sorted(state)
    chunks = [keys[i::shards] for i in range(shards)]
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(out_dir / fname), metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in chunk})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return model, processor
