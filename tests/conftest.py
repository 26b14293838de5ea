"""Session fixtures: tiny LLaVA-NeXT checkpoints built once per test run."""

import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_llava_next  # noqa: F401  first, so a fast BLAS is loaded before mlx.core (see blas.py)

sys.path.insert(0, str(Path(__file__).parent))

import checkpoints  # noqa: E402


class TinyCheckpoint:
    """A tiny checkpoint on disk plus its transformers reference model and HF processor."""

    def __init__(self, name, path, reference, hf_processor):
        self.name, self.path, self.reference, self.hf_processor = name, path, reference, hf_processor
        self._loaded = None

    def load(self):
        """(model, processor) from our loader, cached: treat as read-only."""
        if self._loaded is None:
            from mlx_llava_next import load

            self._loaded = load(self.path)
        return self._loaded

    def prompt(self, question: str = "What is shown?", n_images: int = 1) -> str:
        """A single-turn prompt rendered with the checkpoint's own (HF) chat template."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.hf_processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(name, layout="hub") -> TinyCheckpoint (built once each)."""
    built = {}

    def get(name: str, layout: str = "hub") -> TinyCheckpoint:
        key = (name, layout)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{name}-{layout}")
            reference, hf_processor = checkpoints.save_checkpoint(name, path, layout=layout)
            built[key] = TinyCheckpoint(name, path, reference, hf_processor)
        return built[key]

    return get


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def make_image():
    return random_image
