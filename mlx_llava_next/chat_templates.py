"""Built-in chat templates for checkpoints that ship none, one per released family.

They follow the llava-hf `chat_template.json` files (images of a message rendered before its
text) and the prompt formats of the HF conversion script.
"""

from typing import Any, Dict, Tuple

_IMAGES = "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
_TEXT = "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"

TEMPLATES: Dict[str, str] = {
    # llava-v1.6-mistral-7b-hf
    "mistral": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' }}" + _TEXT + "{{ '\\n<</SYS>>\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}" + _IMAGES + _TEXT + "{{ ' [/INST]' }}"
        "{% else %}{{ ' ' }}" + _TEXT + "{{ '</s> ' }}{% endif %}{% endfor %}"
    ),
    # llava-v1.6-vicuna-7b/13b-hf
    "vicuna": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}" + _TEXT + "{{ ' ' }}"
        "{% else %}{{ message['role'].upper() + ': ' }}" + _IMAGES + _TEXT + "{{ ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # llava-v1.6-34b-hf (Yi) and llava-next-72b/110b-hf (Qwen1.5)
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        + _IMAGES + _TEXT + "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # llama3-llava-next-8b-hf
    "llama3": (
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
        "{% for c in message['content'] if c['type'] == 'text' %}{{ '\\n' + c['text'] }}{% endfor %}"
        "{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def family(config, tokenizer) -> str:
    """Which released family a checkpoint belongs to, from its text backbone and vocabulary."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    model_type = config.text_config["model_type"]
    if model_type == "qwen2" or "<|im_start|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in vocab:
        return "llama3"
    return "mistral" if model_type == "mistral" else "vicuna"


def builtin_for(config, tokenizer) -> Tuple[str, str]:
    """(template, source description) for a checkpoint without its own template."""
    name = family(config, tokenizer)
    return TEMPLATES[name], f"built-in ({name})"


def normalize_message(message: Dict[str, Any]) -> Dict[str, Any]:
    """Accept string content and OpenAI-style parts; return HF content parts."""
    content = message.get("content", "")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    else:
        parts = []
        for part in content:
            kind = part.get("type")
            if kind in ("image", "image_url", "input_image"):
                parts.append({"type": "image"})
            elif kind in ("text", "input_text"):
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise ValueError(f"unknown message content part type {kind!r}")
    return {"role": message["role"], "content": parts}
