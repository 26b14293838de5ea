"""Config normalisation against what transformers resolves for each released checkpoint.

The dicts below are shaped like the llava-hf `config.json` files (partial text configs, legacy
keys), without weights. transformers' LlavaNextConfig is the oracle.
"""

import copy

import pytest
from transformers import LlavaNextConfig as HFLlavaNextConfig

from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.errors import UnsupportedModelError

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VISION = dict(hidden_size=1024, image_size=336, intermediate_size=4096, model_type="clip_vision_model",
              num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768, vocab_size=32000)


def hub_config(text_config, image_token_index=32000, **extra):
    config = dict(
        architectures=["LlavaNextForConditionalGeneration"], ignore_index=-100,
        image_grid_pinpoints=PINPOINTS, image_token_index=image_token_index, model_type="llava_next",
        projector_hidden_act="gelu", text_config=text_config, torch_dtype="float16",
        use_image_newline_parameter=True, vision_config=dict(VISION), vision_feature_layer=-2,
        vision_feature_select_strategy="default", vocab_size=text_config.get("vocab_size"),
    )
    config.update(extra)
    return config


RELEASED = {
    "llava-v1.6-mistral-7b-hf": hub_config(dict(
        _name_or_path="mistralai/Mistral-7B-Instruct-v0.2", architectures=["MistralForCausalLM"],
        intermediate_size=14336, max_position_embeddings=32768, model_type="mistral", num_key_value_heads=8,
        rms_norm_eps=1e-05, rope_theta=1000000.0, sliding_window=None, torch_dtype="bfloat16", vocab_size=32064)),
    "llava-v1.6-vicuna-7b-hf": hub_config(dict(
        _name_or_path="lmsys/vicuna-7b-v1.5", architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
        model_type="llama", pad_token_id=0, rms_norm_eps=1e-05, torch_dtype="float16", vocab_size=32064)),
    "llava-v1.6-vicuna-13b-hf": hub_config(dict(
        _name_or_path="lmsys/vicuna-13b-v1.5", architectures=["LlamaForCausalLM"], hidden_size=5120,
        intermediate_size=13824, max_position_embeddings=4096, model_type="llama", num_attention_heads=40,
        num_hidden_layers=40, num_key_value_heads=40, pad_token_id=0, rms_norm_eps=1e-05, torch_dtype="float16",
        vocab_size=32064)),
    "llava-v1.6-34b-hf": hub_config(dict(
        _name_or_path="NousResearch/Nous-Hermes-2-Yi-34B", architectures=["LlamaForCausalLM"],
        eos_token_id=7, hidden_size=7168, intermediate_size=20480, max_position_embeddings=4096,
        model_type="llama", num_attention_heads=56, num_hidden_layers=60, num_key_value_heads=8,
        pad_token_id=0, rms_norm_eps=1e-05, rope_theta=5000000.0, torch_dtype="bfloat16", vocab_size=64064),
        image_token_index=64000),
    "llama3-llava-next-8b-hf": hub_config(dict(
        _name_or_path="meta-llama/Meta-Llama-3-8B-Instruct", architectures=["LlamaForCausalLM"],
        bos_token_id=128000, eos_token_id=128009, intermediate_size=14336, max_position_embeddings=8192,
        model_type="llama", num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=500000.0,
        torch_dtype="bfloat16", vocab_size=128320), image_token_index=128256),
    "llava-next-72b-hf": hub_config(dict(
        _name_or_path="Qwen/Qwen1.5-72B-Chat", architectures=["Qwen2ForCausalLM"], hidden_size=8192,
        intermediate_size=24576, max_position_embeddings=32768, model_type="qwen2", num_attention_heads=64,
        num_hidden_layers=80, num_key_value_heads=64, rope_theta=1000000.0, torch_dtype="bfloat16",
        vocab_size=152064), image_token_index=151646),
    "llava-next-110b-hf": hub_config(dict(
        _name_or_path="Qwen/Qwen1.5-110B-Chat", architectures=["Qwen2ForCausalLM"], hidden_size=8192,
        intermediate_size=49152, max_position_embeddings=32768, model_type="qwen2", num_attention_heads=64,
        num_hidden_layers=80, num_key_value_heads=8, rms_norm_eps=1e-06, rope_theta=1000000.0,
        torch_dtype="bfloat16", vocab_size=152064), image_token_index=151646),
}


def transformers_resolved(config: dict) -> dict:
    hf = HFLlavaNextConfig(**copy.deepcopy(config))
    text = hf.text_config
    rope = getattr(text, "rope_parameters", None) or {}
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return dict(
        model_type=text.model_type, hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        intermediate_size=text.intermediate_size, rms_norm_eps=text.rms_norm_eps,
        rope_theta=rope.get("rope_theta", getattr(text, "rope_theta", None)), vocab_size=text.vocab_size,
        head_dim=head_dim, max_position_embeddings=text.max_position_embeddings,
        image_token_index=hf.image_token_id, tie_word_embeddings=hf.tie_word_embeddings,
        vision_feature_layer=hf.vision_feature_layer, image_grid_pinpoints=hf.image_grid_pinpoints,
        vision_hidden=hf.vision_config.hidden_size, vision_layers=hf.vision_config.num_hidden_layers,
    )


def ours_resolved(config: dict) -> dict:
    ours = LlavaNextConfig.from_dict(copy.deepcopy(config))
    text = ours.text_config
    keys = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "rms_norm_eps", "rope_theta", "vocab_size", "head_dim", "max_position_embeddings"]
    resolved = {k: text[k] for k in keys}
    resolved.update(
        image_token_index=ours.image_token_index, tie_word_embeddings=ours.tie_word_embeddings,
        vision_feature_layer=ours.vision_feature_layer, image_grid_pinpoints=ours.image_grid_pinpoints,
        vision_hidden=ours.vision_config["hidden_size"], vision_layers=ours.vision_config["num_hidden_layers"],
    )
    return resolved


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_resolve_like_transformers(name):
    assert ours_resolved(RELEASED[name]) == transformers_resolved(RELEASED[name])


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_transformers5_saved_configs_resolve_the_same(name, tmp_path):
    """transformers 5 re-saves with `rope_parameters`; the values must not change."""
    saved = HFLlavaNextConfig(**copy.deepcopy(RELEASED[name])).to_dict()
    assert "rope_parameters" in saved["text_config"]
    assert ours_resolved(saved) == transformers_resolved(RELEASED[name])


def test_mlx_lm_args_keep_an_untied_head_and_the_rope_theta():
    ours = LlavaNextConfig.from_dict(HFLlavaNextConfig(**RELEASED["llava-v1.6-34b-hf"]).to_dict())
    args = ours.mlx_lm_args()
    assert args["tie_word_embeddings"] is False
    assert args["rope_theta"] == 5000000.0
    assert args["model_type"] == "llama"


def test_mistral_default_sliding_window_is_kept_when_the_key_is_absent():
    text = dict(RELEASED["llava-v1.6-mistral-7b-hf"]["text_config"])
    del text["sliding_window"]
    config = hub_config(text)
    assert LlavaNextConfig.from_dict(config).text_config["sliding_window"] == HFLlavaNextConfig(**config).text_config.sliding_window


@pytest.mark.parametrize("layer", [-2, [-3, -1], [-24, -20, -12, -1]])
def test_vision_feature_layer_int_or_list(layer):
    config = dict(RELEASED["llava-v1.6-vicuna-7b-hf"], vision_feature_layer=layer)
    assert ours_resolved(config)["vision_feature_layer"] == transformers_resolved(config)["vision_feature_layer"]


@pytest.mark.parametrize("bad", [
    dict(model_type="llava"),
    dict(text_config=dict(model_type="gemma")),
    dict(vision_config=dict(model_type="siglip_vision_model")),
])
def test_unsupported_model_types_are_named(bad):
    config = dict(RELEASED["llava-v1.6-vicuna-7b-hf"], **bad)
    with pytest.raises(UnsupportedModelError, match="not|supported"):
        LlavaNextConfig.from_dict(config)
