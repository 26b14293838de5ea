"""Text side of the processor: chat templates, `<image>` expansion, tokenization, padding.

`Processor(text=..., images=...)` returns what transformers' LlavaNextProcessor returns
(numpy arrays): input_ids, attention_mask, pixel_values, image_sizes.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import chat_templates
from .config import LlavaNextConfig
from .errors import CheckpointError, PromptError
from .image_processing import ImageProcessor

IMAGE_TOKEN = "<image>"


def _read_json(path: Path) -> Dict[str, Any]:
    from .checks import read_json_object

    return read_json_object(path) if path.exists() else {}


def read_chat_template(model_dir: Path) -> Optional[str]:
    """The checkpoint's multimodal template: chat_template.jinja/.json, else the tokenizer's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja}: the chat template is not UTF-8 text (byte {e.start})") from None
    template = _read_json(model_dir / "chat_template.json").get("chat_template")
    template = template or _read_json(model_dir / "processor_config.json").get("chat_template")
    return template or _read_json(model_dir / "tokenizer_config.json").get("chat_template")


class Processor:
    def __init__(
        self,
        tokenizer,
        image_processor: ImageProcessor,
        config: LlavaNextConfig,
        image_token: str = IMAGE_TOKEN,
        num_additional_image_tokens: int = 1,
        chat_template: Optional[str] = None,
        chat_template_source: str = "checkpoint",
    ):
        self.tokenizer = tokenizer  # mlx-lm TokenizerWrapper (streaming detokenizer, EOS ids)
        self.hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self.image_processor = image_processor
        self.config = config
        self.image_token = image_token
        self.image_token_id = config.image_token_index
        self.patch_size = int(config.vision_config["patch_size"])
        self.vision_feature_select_strategy = config.vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        if chat_template is None:
            chat_template, chat_template_source = chat_templates.builtin_for(config, self.hf_tokenizer)
        if not isinstance(chat_template, str):
            raise CheckpointError(f"the chat template must be a string, got {type(chat_template).__name__}")
        _compile_template(chat_template)  # a syntax error is the checkpoint's, found at load time
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source

    @classmethod
    def from_pretrained(cls, model_dir, config: LlavaNextConfig, tokenizer) -> "Processor":
        """From a checkpoint directory (CheckpointError on a bad processor config or template)."""
        model_dir = Path(model_dir)
        processor_config = _read_json(model_dir / "processor_config.json")
        # A processor saved without these knobs would count tokens wrong (N-1 / N+1): CLIP
        # checkpoints always have one extra (CLS) token, dropped by the "default" strategy.
        extra = processor_config.get("num_additional_image_tokens") or 1
        template = read_chat_template(model_dir)
        return cls(
            tokenizer,
            ImageProcessor.from_pretrained(model_dir),
            config,
            image_token=processor_config.get("image_token", IMAGE_TOKEN),
            num_additional_image_tokens=extra,
            chat_template=template,
        )

    # -- counting -------------------------------------------------------------------------
    def num_image_tokens(self, image_size) -> int:
        return self.image_processor.num_image_tokens(
            image_size, self.patch_size, self.vision_feature_select_strategy, self.num_additional_image_tokens
        )

    def expand_image_tokens(self, texts: List[str], image_sizes: Sequence) -> List[str]:
        """Replace each `<image>` (left to right, prompt by prompt) by its N copies."""
        n_markers = sum(t.count(self.image_token) for t in texts)
        if n_markers != len(image_sizes):
            raise PromptError(
                f"the prompt has {n_markers} `{self.image_token}` marker(s) but {len(image_sizes)} image(s) "
                f"were given; put one `{self.image_token}` where each image belongs"
            )
        sizes = iter(image_sizes)
        expanded = []
        for text in texts:
            pieces = text.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.image_token * self.num_image_tokens(tuple(next(sizes))) + piece
            expanded.append(out)
        return expanded

    # -- main entry -----------------------------------------------------------------------
    def __call__(
        self,
        text: Union[str, List[str]],
        images=None,
        padding_side: str = "left",
        add_special_tokens: bool = True,
    ) -> Dict[str, np.ndarray]:
        texts = [text] if isinstance(text, str) else list(text)
        out: Dict[str, np.ndarray] = {}
        image_sizes: Sequence = []
        if images is not None and not (isinstance(images, (list, tuple)) and len(images) == 0):
            out.update(self.image_processor(images))
            image_sizes = out["image_sizes"]
        texts = self.expand_image_tokens(texts, image_sizes)
        ids = [self.hf_tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        out["input_ids"], out["attention_mask"] = self._pad(ids, padding_side)
        return out

    def _pad(self, ids: List[List[int]], side: str):
        pad_id = self.hf_tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.hf_tokenizer.eos_token_id or 0
        length = max(len(x) for x in ids)
        input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, seq in enumerate(ids):
            sl = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            input_ids[row, sl] = seq
            mask[row, sl] = 1
        return input_ids, mask

    # -- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        """Render HF-style messages (content: str or parts {"type": "image"|"text"})."""
        from jinja2 import TemplateError

        messages = [chat_templates.normalize_message(m) for m in messages]
        try:
            rendered = self.hf_tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except TemplateError as e:  # the template's raise_exception(): e.g. roles must alternate
            raise PromptError(f"the chat template refused these messages: {e}") from None
        if not isinstance(rendered, str):
            raise PromptError(f"the chat template rendered a {type(rendered).__name__}, not text")
        if tokenize:
            return self.hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return rendered

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _compile_template(template: str) -> None:
    """CheckpointError if jinja cannot parse the chat template (as transformers compiles it)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except TemplateError as e:
        raise CheckpointError(f"the checkpoint's chat template is not valid jinja: {e}") from None
    except RecursionError:
        raise CheckpointError("the checkpoint's chat template is nested too deeply") from None
