"""One rank of tests/test_distributed.py (run under mlx.launch, or alone as the one-process oracle).

usage: python distributed_rank.py OUT_DIR MODE PATH [MODE PATH ...]   (MODE: tensor, pipeline, none;
MODE-load: load and measure only)
Writes OUT_DIR/rank<R>-<i>.json per job: the process's peak memory right after loading, then logits
of a fixed image prompt, greedy `generate` text and tokens and a two-turn ChatSession.
"""

import gc
import json
import sys
from pathlib import Path

import numpy as np

import mlx_llava_next  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
from PIL import Image

from mlx_llava_next import ChatSession, generate, load


def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (70, 120, 3), dtype=np.uint8))


def run(path: str, mode: str) -> dict:
    mode, _, only = mode.partition("-")
    gc.collect()  # the previous job's model is gone before this one's peak is measured
    mx.clear_cache()
    mx.reset_peak_memory()
    # one process with --exact: what a split model computes (float32 activations throughout)
    model, processor = load(path, distributed=mode) if mode != "none" else load(path, exact=True)
    peak_after_load = mx.get_peak_memory()
    if only == "load":
        return {"rank": mx.distributed.init().rank(), "peak_after_load": peak_after_load}
    img = image()
    batch = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
        add_generation_prompt=True), images=[img])
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    mx.eval(logits)
    answer = generate(model, processor, "What is shown?", images=[img], max_tokens=12)
    chat = ChatSession(model, processor, max_tokens=8)
    turns = [chat.ask("Describe the image.", images=[img]), chat.ask("And the colours?")]
    return {
        "rank": mx.distributed.init().rank(),
        "peak_after_load": peak_after_load,
        "logits": np.asarray(logits[0, -8:]).tolist(),
        "generate": {"text": answer.text, "tokens": answer.tokens},
        "chat": [{"text": t.text, "tokens": t.tokens, "cached": t.cached_tokens} for t in turns],
    }


def main(argv):
    out = Path(argv[0])
    jobs = list(zip(argv[1::2], argv[2::2]))
    for i, (mode, path) in enumerate(jobs):
        result = run(path, mode)
        (out / f"rank{result['rank']}-{i}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
