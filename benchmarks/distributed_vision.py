"""Vision tower under mlx.launch: every rank encodes vs rank 0 encodes and all_sum-broadcasts the features.

usage: mlx.launch --backend ring -n 2 --python $(which python) -- benchmarks/distributed_vision.py
Random weights, a CLIP-like tower (hidden 256, 4 layers, 224 px tiles, 5 tiles) and 2048-wide
features; prints rank 0's median seconds per strategy (features on every rank at the end).
"""

import time

import mlx_llava_next  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.model import Model

CONFIG = {
    "model_type": "llava_next", "image_token_index": 999, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "image_grid_pinpoints": [[224, 448], [448, 224], [448, 448]],
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024,
                      "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 224, "patch_size": 14},
    "text_config": {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1024, "rms_norm_eps": 1e-6},
}


def main():
    world = mx.distributed.init()
    model = Model(LlavaNextConfig.from_dict(CONFIG))
    mx.eval(model.parameters())
    pixels = mx.array(np.random.default_rng(0).standard_normal((1, 5, 3, 224, 224)).astype(np.float32))
    sizes = [[448, 448]]

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))

    def everywhere():
        features = model.encode_images(pixels, sizes)
        mx.eval(features)
        return features

    def from_rank0():
        if world.rank() == 0:
            features = mx.concatenate(model.encode_images(pixels, sizes))
        else:  # the row count follows from the image sizes (anyres), as on rank 0
            features = mx.zeros((n_rows, 2048))
        features = mx.distributed.all_sum(features, group=world, stream=mx.cpu)
        mx.eval(features)
        return features

    n_rows = mx.concatenate(everywhere()).shape[0]
    times = {"every rank encodes": [], "rank 0 encodes + all_sum": []}
    for _ in range(3):
        for name, fn in (("every rank encodes", everywhere), ("rank 0 encodes + all_sum", from_rank0)):
            barrier()
            t = time.perf_counter()
            fn()
            barrier()
            times[name].append(time.perf_counter() - t)
    if world.rank() == 0:
        mb = n_rows * 2048 * 4 / 1e6
        print(f"{world.size()} ranks, {n_rows} feature rows ({mb:.1f} MB float32)")
        for name, ts in times.items():
            print(f"{name}: {np.median(ts):.3f} s")


if __name__ == "__main__":
    main()
