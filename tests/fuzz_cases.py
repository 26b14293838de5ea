"""Deterministic fuzz cases over every input class, and the worker that runs them.

A case is (kind, seed): `make(kind, seed, workdir)` builds its input from `random.Random`
seeded with both, so the same id is always the same input. `run_case` feeds it to the entry
point users reach (config and processor loading, safetensors reading, image decoding and
processing, GGUF parsing, generation options and messages, atomic outputs) and classifies:

  clean     one of our error types (LlavaNextError)
  accepted  no error, and the input was not known to be corrupt
  silent    no error for an input known to be corrupt (a truncated or shifted file)
  crash     any other exception
  partial   an output write failed and left a target or temporary file behind

`python fuzz_cases.py worker DIR` reads "kind seed" lines and answers one JSON line each; the
test (test_fuzz.py) adds the outcomes the worker cannot report itself: hang, OOM, hard crash.
"""

import io
import json
import math
import os
import random
import resource
import struct
import sys
import zlib
from pathlib import Path

KINDS = ("config", "processor", "safetensors", "image", "array", "gguf", "options", "messages", "output")

BAD_VALUES = [None, -1, 0, 2**31, 2**63, 10**6, 1e6, 1.5, -0.0, "12", "", "x" * 300, [], [1, 2], {}, {"a": 1},
              True, False, float("nan"), float("inf"), -(2**40)]

TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=384,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32)
CONFIG = dict(model_type="llava_next", text_config=TEXT, vision_config=VISION, image_token_index=320,
              image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-2,
              vision_feature_select_strategy="default", tie_word_embeddings=False)
PROCESSOR = dict(image_processor_type="LlavaNextImageProcessor", size={"shortest_edge": 56},
                 crop_size={"height": 56, "width": 56}, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                 image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                 do_pad=True, resample=3, rescale_factor=1 / 255)


class Case:
    def __init__(self, kind, seed, corrupt=False, note=""):
        self.kind, self.seed, self.corrupt, self.note = kind, seed, corrupt, note


def _rng(kind: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(kind.encode()) * 1_000_003 + seed)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate_tree(rng: random.Random, tree):
    tree = json.loads(json.dumps(tree))
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = [p for p in _paths(tree) if p]
        path = rng.choice(paths)
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        action = rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice(BAD_VALUES)
    return tree


def _json_bytes(rng: random.Random, tree) -> (bytes, bool):
    """(file bytes, corrupt?) for a mutated JSON document."""
    choice = rng.random()
    if choice < 0.55:
        return json.dumps(_mutate_tree(rng, tree), allow_nan=True).encode(), False
    data = json.dumps(tree).encode()
    if choice < 0.65:
        return b"\xef\xbb\xbf" + data, True
    if choice < 0.72:
        return data[: rng.randrange(1, len(data) - 1)], True
    if choice < 0.78:
        i = rng.randrange(len(data))
        return data[:i] + b"\xff\xfe" + data[i:], True
    if choice < 0.84:
        return json.dumps([tree]).encode(), True
    if choice < 0.9:
        n = rng.choice([100, 5000, 100000])
        return b"[" * n + b"]" * n, True
    return json.dumps(tree).encode().replace(b'"', b"'", 1), True


# -- builders ---------------------------------------------------------------------------------


def make(kind: str, seed: int, work: Path) -> Case:
    rng = _rng(kind, seed)
    return globals()[f"_make_{kind}"](rng, Case(kind, seed), work)


def _make_config(rng, case, work):
    data, case.corrupt = _json_bytes(rng, CONFIG)
    (work / "config.json").write_bytes(data)
    return case


def _make_processor(rng, case, work):
    data, case.corrupt = _json_bytes(rng, PROCESSOR)
    (work / "preprocessor_config.json").write_bytes(data)
    return case


def _safetensors(tensors):
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return header, raw, b"".join(blobs)


def _make_safetensors(rng, case, work):
    import numpy as np

    tensors = {
        "a.weight": ("F32", [4, 6], np.arange(24, dtype=np.float32).tobytes()),
        "b.bias": ("F16", [6], np.ones(6, dtype=np.float16).tobytes()),
        "c.weight": ("BF16", [2, 3], bytes(12)),
    }
    header, raw, blob = _safetensors(tensors)
    choice = rng.randrange(9)
    if choice == 0:  # header length off by a little
        n = len(raw) + rng.choice([-3, -1, 1, 2, 8])
        data = struct.pack("<Q", n) + raw + blob
        case.corrupt = True
    elif choice == 1:  # shifted offsets
        name = rng.choice(sorted(header))
        shift = rng.choice([-2, -1, 1, 2, 4])
        header[name]["data_offsets"] = [max(0, o + shift) for o in header[name]["data_offsets"]]
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + blob
        case.corrupt = True
    elif choice == 2:  # truncated
        full = struct.pack("<Q", len(raw)) + raw + blob
        data = full[: rng.randrange(0, len(full) - 1)]
        case.corrupt = True
    elif choice == 3:  # absurd shape or dtype
        name = rng.choice(sorted(header))
        key, value = rng.choice(["shape", "dtype"]), rng.choice([[2**40, 2**40], [-1], "F99", [4, 6, 1, 1], None, 7])
        header[name][key] = value
        case.note = f"{name} {key}={value}"
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + blob
        case.corrupt = not (name == "a.weight" and value == [4, 6, 1, 1])  # that one is a consistent reshape
    elif choice == 4:  # absurd header length
        data = struct.pack("<Q", rng.choice([2**63, 2**40, 0])) + raw + blob
        case.corrupt = True
    elif choice == 5:  # bit flips in the header
        full = bytearray(struct.pack("<Q", len(raw)) + raw + blob)
        for _ in range(rng.randrange(1, 4)):
            full[rng.randrange(8, 8 + len(raw))] ^= 1 << rng.randrange(8)
        data = bytes(full)
    elif choice == 6:  # bit flips in the data: still a valid file
        full = bytearray(struct.pack("<Q", len(raw)) + raw + blob)
        full[rng.randrange(8 + len(raw), len(full))] ^= 1 << rng.randrange(8)
        data = bytes(full)
    elif choice == 7:  # extra trailing bytes
        data = struct.pack("<Q", len(raw)) + raw + blob + bytes(rng.randrange(1, 9))
        case.corrupt = True
    else:  # valid
        data = struct.pack("<Q", len(raw)) + raw + blob
    (work / "model.safetensors").write_bytes(data)
    return case


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F", "La", "RGBa"]
FORMATS = ["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", "PPM", "ICO"]


def _image_bytes(rng, mode, fmt, size, frames=1):
    from PIL import Image

    rgb = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    images = []
    for _ in range(frames):
        try:
            images.append(rgb.convert(mode))
        except ValueError:
            images.append(Image.new(mode, size))
    buffer = io.BytesIO()
    extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    images[0].save(buffer, format=fmt, **extra)
    return buffer.getvalue()


def _jpeg_bomb(rng):
    """(JPEG bytes declaring a huge size, is it over the pixel limit?)"""
    data = bytearray(_image_bytes(rng, "RGB", "JPEG", (8, 8)))
    at = data.find(b"\xff\xc0")
    h, w = rng.choice([(20000, 20000), (65000, 65000), (30000, 1)])
    data[at + 5: at + 9] = struct.pack(">HH", h, w)
    return bytes(data), h * w > 10**8


def _make_image(rng, case, work):
    mode, fmt = rng.choice(MODES), rng.choice(FORMATS)
    size = rng.choice([(1, 1), (1, 300), (300, 1), (37, 53), (64, 64), (500, 20)])
    frames = rng.choice([1, 1, 1, 2, 3]) if fmt in ("PNG", "GIF", "TIFF", "WEBP") else 1
    if rng.random() < 0.06:
        (data, case.corrupt), case.note = _jpeg_bomb(rng), "bomb"
    else:
        try:
            data = _image_bytes(rng, mode, fmt, size, frames)
        except (OSError, ValueError, KeyError):  # this format cannot store this mode
            data = _image_bytes(rng, "RGB", "PNG", size, frames)
        change = rng.random()
        if change < 0.3:
            data = data[: rng.randrange(0, max(1, len(data) - 1))]
            case.note = "truncated"
        elif change < 0.55:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 6)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            data, case.note = bytes(flipped), "flipped"
    (work / "image.bin").write_bytes(data)
    return case


def _make_array(rng, case, work):
    case.note = json.dumps({
        "shape": rng.choice([[8], [8, 8], [8, 8, 3], [3, 8, 8], [8, 8, 4], [8, 8, 1], [8, 8, 2], [2, 8, 8, 3],
                             [1, 1, 8, 8, 3], [0, 8, 3], [8, 0, 3], [100000, 100000, 3], [40000, 40000, 3]]),
        "dtype": rng.choice(["uint8", "uint16", "int64", "int8", "bool", "float32", "float64", "complex64", "object"]),
        "value": rng.choice([0, 1, 255, 256, -1, 70000]),
    })
    return case


def _make_gguf(rng, case, work):
    import gguf
    import numpy as np

    path = work / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_string("tokenizer.chat_template", rng.choice(["{{ messages }}", "{% for m in messages %}", "{{ raise_exception('no') }}"]))
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    choice = rng.randrange(6)
    if choice == 0:
        data = data[: rng.randrange(4, len(data) - 1)]
        case.corrupt = True
    elif choice == 1:  # absurd tensor / kv counts
        at = rng.choice([8, 16])
        data[at: at + 8] = struct.pack("<Q", rng.choice([2**60, 2**32, 10**6]))
        case.corrupt = True
    elif choice == 2:  # dimension count / dims / type of a tensor
        name = rng.choice([b"token_embd.weight", b"output_norm.weight"])
        at = data.rfind(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        field = rng.choice([0, 4, 12])
        if field == 0:
            data[at: at + 4] = struct.pack("<I", rng.choice([0, 5, 2**31]))
        elif field == 4:
            data[at + 4: at + 12] = struct.pack("<Q", rng.choice([0, 2**62, 3]))
        else:
            n_dims = struct.unpack("<I", data[at: at + 4])[0]
            t = at + 4 + 8 * n_dims
            data[t: t + 4] = struct.pack("<I", rng.choice([8, 2, 99, 2**31]))  # q8_0, q4_0, unknown
        case.corrupt = True
        case.note = f"tensor {name.decode()} field {field}"
    elif choice == 3:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 4:
        version = rng.choice([1, 2, 99])
        data[4:8] = struct.pack("<I", version)
        case.corrupt = version != 2  # version 2 has version 3's layout
    case.note = case.note or f"gguf mutation {choice}"
    path.write_bytes(bytes(data))
    return case


def _make_options(rng, case, work):
    keys = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
            "prefill_step_size", "eos_token_ids", "bogus"]
    pool = BAD_VALUES + [1, 3, 0.5, 0.9, 2**64, 2**64 - 1, -2, "stop", ["a", "\ud800"], ("x",)]
    case.note = {k: rng.choice(pool) for k in rng.sample(keys, rng.randrange(1, 4))}
    return case


def _make_messages(rng, case, work):
    parts = [{"type": "text", "text": "hi"}, {"type": "image"}, {"type": "video"}, {"type": "text", "text": None},
             {"type": "text", "text": "a\udc80"}, "bare", 3, None, {}]
    message = lambda: rng.choice([  # noqa: E731
        {"role": rng.choice(["user", "assistant", "system", "tool", None, 3]),
         "content": rng.choice(["hello", None, 5, [rng.choice(parts) for _ in range(rng.randrange(0, 3))]])},
        {"content": "x"}, "just text", None, [],
    ])
    case.note = rng.choice([[], [message() for _ in range(rng.randrange(1, 4))], "\ud800 question", 7])
    return case


def _make_output(rng, case, work):
    case.note = json.dumps({
        "target": rng.choice(["plain", "under-file", "dangling", "loop", "read-only", "too-long", "existing-dir", "existing-file"]),
        "limit": rng.choice([None, 0, 10, 1000, 50000]),
        "size": rng.choice([0, 100, 5000, 200000]),
        "api": rng.choice(["text", "dir"]),
    })
    return case


# -- running ----------------------------------------------------------------------------------


def _run(case: Case, work: Path):
    """Feed the case to its entry point; returns nothing or raises."""
    kind = case.kind
    if kind == "config":
        from mlx_llava_next.config import LlavaNextConfig
        from mlx_llava_next.loading import read_config

        LlavaNextConfig.from_dict(read_config(work))
    elif kind == "processor":
        import numpy as np

        from mlx_llava_next.image_processing import ImageProcessor

        ImageProcessor.from_pretrained(work)(np.zeros((30, 40, 3), np.uint8))
    elif kind == "safetensors":
        import mlx.core as mx

        from mlx_llava_next.loading import read_safetensors

        mx.eval(list(read_safetensors(work / "model.safetensors").values()))
    elif kind == "image":
        from mlx_llava_next.image_processing import ImageProcessor, load_image

        image = load_image((work / "image.bin").read_bytes())
        ImageProcessor.from_dict(PROCESSOR)([image])
    elif kind == "array":
        import numpy as np

        from mlx_llava_next.image_processing import ImageProcessor

        spec = json.loads(case.note)
        big = math.prod(spec["shape"]) > 10**7
        if spec["dtype"] == "object":
            array = np.empty(spec["shape"][:3] if not big else [2, 2], dtype=object)
        elif big:
            array = np.broadcast_to(np.array(spec["value"] % 256, dtype=np.uint8), spec["shape"])
        else:
            array = np.full(spec["shape"], spec["value"] if spec["dtype"] != "bool" else 1).astype(spec["dtype"])
        ImageProcessor.from_dict(PROCESSOR)([array])
    elif kind == "gguf":
        from mlx_llava_next.gguf_reader import check_tiling, read_header

        check_tiling(read_header(work / "model.gguf"))
    elif kind == "options":
        from mlx_llava_next.generate import Sampling

        Sampling.from_kwargs(**case.note)
    elif kind == "messages":
        from mlx_llava_next.generate import check_messages, check_text

        if isinstance(case.note, list):
            check_messages(case.note)
        else:
            check_text("prompt", case.note)
    elif kind == "output":
        _run_output(json.loads(case.note), work)


def _run_output(spec, work: Path):
    from mlx_llava_next.outputs import atomic_output_dir, write_text_atomic

    base = work / "out"
    base.mkdir()
    target = base / "target"
    kind = spec["target"]
    if kind == "under-file":
        (base / "f").write_text("x")
        target = base / "f" / "target"
    elif kind == "dangling":
        target.symlink_to(base / "nowhere")
    elif kind == "loop":
        target.symlink_to(target)
    elif kind == "read-only":
        target = Path("/proc/sys/fuzz-target") if os.geteuid() == 0 else base / "ro" / "t"
        if os.geteuid() != 0:
            (base / "ro").mkdir(mode=0o555)
    elif kind == "too-long":
        target = base / ("n" * 300)
    elif kind == "existing-dir":
        target.mkdir()
        (target / "user.txt").write_text("keep")
    elif kind == "existing-file":
        target.write_text("keep")
    payload = "y" * spec["size"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if spec["limit"] is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["limit"], hard))
    try:
        if spec["api"] == "text":
            write_text_atomic(target, payload)
        else:
            with atomic_output_dir(target, force=True) as tmp:
                (tmp / "data.bin").write_text(payload)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        _check_no_partial(spec, base, target, payload)


class Partial(Exception):
    pass


def _check_no_partial(spec, base, target, payload):
    leftovers = [p.name for p in base.rglob("*") if p.name.startswith((".tmp-", ".target.")) or ".tmp" in p.name]
    if leftovers:
        raise Partial(f"left behind: {leftovers}")
    if spec["target"] == "existing-dir" and not (target / "user.txt").exists():
        raise Partial("a user directory was replaced")
    file = target / "data.bin" if spec["api"] == "dir" else target
    if os.path.isfile(file) and not os.path.islink(file) and file.read_text() not in (payload, "keep"):
        raise Partial("a partial file is in place")


def run_case(kind: str, seed: int, root: Path) -> dict:
    import shutil

    from mlx_llava_next.errors import LlavaNextError

    work = root / f"{kind}-{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        case = make(kind, seed, work)
        try:
            _run(case, work)
        except Partial as e:
            return {"outcome": "partial", "detail": str(e)}
        except LlavaNextError as e:
            return {"outcome": "clean", "detail": str(e)[:200]}
        except MemoryError:
            return {"outcome": "oom", "detail": "MemoryError"}
        except BaseException as e:  # noqa: BLE001  (the point: anything else is a crash)
            return {"outcome": "crash", "detail": f"{type(e).__name__}: {e}"[:300]}
        return {"outcome": "silent" if case.corrupt else "accepted", "detail": case.note if isinstance(case.note, str) else ""}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def worker(root: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import mlx_llava_next  # noqa: F401  (the BLAS, then mlx)
    import mlx_llava_next.generate  # noqa: F401
    import mlx_llava_next.gguf_reader  # noqa: F401
    import mlx_llava_next.loading  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, seed = line.split()
        result = run_case(kind, int(seed), Path(root))
        result.update(kind=kind, seed=int(seed))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    worker(sys.argv[2])
