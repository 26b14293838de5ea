"""Our GGUF pairs in llama.cpp itself (acceptance 3 of the GGUF issue).

Runs when LLAMA_CPP_BIN names a directory holding llama.cpp binaries built from the
llama-cpp-python sdist's vendored tree (see docs/gguf.md); skips otherwise. Needs
llama-mtmd-cli, llama-debug, llama-tokenize and llama-quantize.

Quantized models get `-nr` (no weight repacking): on CPUs with AMX, llama.cpp's AMX path
crashes on Q4_0/Q8_0 weights (ggml-org/llama.cpp#20824).
"""

import os
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGUFReader

BIN = os.environ.get("LLAMA_CPP_BIN")
pytestmark = pytest.mark.skipif(
    not BIN, reason="LLAMA_CPP_BIN is not set (a directory with llama-mtmd-cli, llama-debug, llama-tokenize, llama-quantize)"
)

BACKBONES = ["llama", "mistral", "qwen2"]
QTYPES = ["f32", "f16", "q8_0", "q4_0"]
THREADS = ["-t", "2"]


def tool(name: str) -> str:
    path = Path(BIN) / name
    if not path.is_file():
        pytest.skip(f"{name} is not in LLAMA_CPP_BIN={BIN}")
    return str(path)


def run(args, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace", timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{Path(args[0]).name} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def repack(qtype):
    return ["-nr"] if qtype.startswith("q") else []


@pytest.fixture(scope="session")
def gguf_files(tiny_checkpoint, tmp_path_factory):
    from convert.gguf import convert_to_gguf

    done = {}

    def get(name, qtype):
        if (name, qtype) not in done:
            out = tmp_path_factory.mktemp("llama-cpp") / f"{name}-{qtype}"
            done[name, qtype] = convert_to_gguf(tiny_checkpoint(name).path, out, qtype, progress=False)
        return done[name, qtype]

    return get


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("img") / "image-70x130.png"
    random_image(70, 130, seed=3).save(path)
    return path


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", BACKBONES)
def test_mtmd_cli_answers_about_an_image(gguf_files, image_file, name, qtype):
    text, mmproj = gguf_files(name, qtype)
    result = run([tool("llama-mtmd-cli"), "-m", text, "--mmproj", mmproj, "--image", image_file,
                  "-p", "Describe the image.", "-n", "8", "--temp", "0", "-c", "2048", "--jinja",
                  *THREADS, *repack(qtype)])
    print(f"{name} {qtype}: {result.stdout.strip()!r}")
    assert result.stdout.strip()


def llama_tokenize(text_path, prompt):
    out = run([tool("llama-tokenize"), "-m", text_path, "-p", prompt, "--ids", "--log-disable"]).stdout
    return [int(t) for t in out.strip().strip("[]").split(",") if t.strip()]


@pytest.mark.parametrize("name", BACKBONES)
def test_llama_cpp_tokenizes_like_transformers(tiny_checkpoint, gguf_files, name):
    text_path, _ = gguf_files(name, "f32")
    tokenizer = tiny_checkpoint(name).hf_processor.tokenizer
    for prompt in ["USER: What is the capital of France? ASSISTANT:", "the cat shows a red page",
                   "Hello world!\n\nWhat is   this? 12345", "ünïcödé ✓ text", "[INST] what is in this scan [/INST]"]:
        assert llama_tokenize(text_path, prompt) == tokenizer(prompt)["input_ids"], prompt


@pytest.mark.parametrize("name", BACKBONES)
def test_text_logits_match_transformers(tiny_checkpoint, gguf_files, tmp_path, name):
    ckpt = tiny_checkpoint(name)
    text_path, _ = gguf_files(name, "f32")
    prompt = "USER: What is the capital of France? ASSISTANT:"
    ids = ckpt.hf_processor.tokenizer(prompt)["input_ids"]
    run([tool("llama-debug"), "-m", text_path, "-p", prompt, "--save-logits", "--logits-output-dir", tmp_path, *THREADS])
    stem = text_path.stem
    assert np.fromfile(tmp_path / f"llamacpp-{stem}-tokens.bin", dtype=np.int32).tolist() == ids
    theirs = np.fromfile(tmp_path / f"llamacpp-{stem}.bin", dtype=np.float32)
    with torch.no_grad():
        ref = ckpt.reference(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
    diff = np.abs(theirs - ref).max()
    print(f"{name}: llama.cpp vs transformers last-token logits max |Δ| {diff:.2e} "
          f"(largest |logit| {np.abs(ref).max():.2f}), argmax {theirs.argmax()} vs {ref.argmax()}")
    assert theirs.shape == ref.shape and diff <= 1e-3


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantizer_is_byte_identical_to_llama_quantize(gguf_files, tmp_path, qtype):
    f32_path, _ = gguf_files("mistral", "f32")
    ours, _ = gguf_files("mistral", qtype)
    theirs = tmp_path / f"llama-quantize-{qtype}.gguf"
    run([tool("llama-quantize"), "--pure", f32_path, theirs, qtype.upper(), "2"])
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


# -- where llama.cpp's LLaVA-1.6 image path differs from the reference -----------------------


def capture_tile_embeddings(args, tmp_path):
    """Run llama.cpp with MTMD_DEBUG_EMBEDDINGS on a FIFO; returns every encoded tile's output
    ([n_tokens, n_embd] each, in encode order)."""
    fifo = tmp_path / "embeddings.fifo"
    os.mkfifo(fifo)
    tiles, done = [], threading.Event()

    def reader():
        while not done.is_set():
            with open(fifo, "rb") as f:
                data = f.read()
            if len(data) >= 8:
                n_tokens, n_embd = np.frombuffer(data[:8], dtype=np.int32)
                tiles.append(np.frombuffer(data[8:], dtype=np.float32).reshape(n_tokens, n_embd))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        run(args, env={"MTMD_DEBUG_EMBEDDINGS": str(fifo)})
    finally:
        done.set()
        with open(fifo, "wb"):  # release the reader blocked in open()
            pass
        thread.join(timeout=10)
    return tiles


def llama_cpp_graph(model, pixels, cls_last=True):
    """llama.cpp's llava graph (tools/mtmd/models/llava.cpp) on our weights: [CLS] concatenated
    after the patches, positions added in order, output rows 1..N kept (patch 0 dropped, CLS
    passed on), then the projector."""
    tower = model.vision_tower
    emb = tower.embeddings
    x = mx.array(pixels).transpose(0, 2, 3, 1)
    B, H, W, C = x.shape
    p = emb.patch_size
    w = emb.patch_embedding.weight
    patches = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, -1, p * p * C)
    patches = patches @ w.reshape(w.shape[0], -1).T
    cls = mx.broadcast_to(emb.class_embedding, (B, 1, patches.shape[-1]))
    h = mx.concatenate([patches, cls] if cls_last else [cls, patches], axis=1) + emb.position_embedding.weight
    h = tower.pre_layrnorm(h)
    for layer in tower.encoder.layers:
        h = layer(h)
    return np.array(model.multi_modal_projector(h[:, 1:]))


def test_image_embeddings_vs_reference(tiny_checkpoint, gguf_files, image_file, tmp_path):
    """Measures (and prints) how llama.cpp's image features differ from transformers': its tiles
    match a simulation of its own graph, not the reference, and come in another order/count."""
    from PIL import Image

    from mlx_llava_next import load

    ckpt = tiny_checkpoint("mistral")
    text_path, mmproj = gguf_files("mistral", "f32")
    model, processor = load(text_path.parent)
    tiles = capture_tile_embeddings(
        [tool("llama-mtmd-cli"), "-m", text_path, "--mmproj", mmproj, "--image", image_file, "-p", "Describe.",
         "-n", "1", "--temp", "0", "-c", "2048", "--jinja", *THREADS], tmp_path)
    batch = processor.image_processor([Image.open(image_file)])
    n = int(processor.image_processor.num_patches(batch["image_sizes"][0]))
    pixels = batch["pixel_values"][0, :n]  # [overview, tile(0,0), tile(0,1), ...]
    hf_tiles = np.array(model.multi_modal_projector(model.vision_tower(mx.array(pixels).transpose(0, 2, 3, 1))[:, 1:]))
    sim = llama_cpp_graph(model, pixels)
    order = list(range(1, n)) + [0]  # llama.cpp: slices row-major, overview last
    assert len(tiles) == n
    scale = np.abs(hf_tiles).max()
    vs_sim = max(np.abs(t - sim[i]).max() for t, i in zip(tiles, order))
    vs_hf = max(np.abs(t - hf_tiles[i]).max() for t, i in zip(tiles, order))
    cls_first = llama_cpp_graph(model, pixels, cls_last=False)
    vs_fixed = np.abs(cls_first - hf_tiles).max()
    hf_tokens = processor.num_image_tokens(tuple(batch["image_sizes"][0]))
    print(f"llama.cpp: {len(tiles)} tiles x {tiles[0].shape[0]} = {sum(len(t) for t in tiles)} image tokens "
          f"(slices row-major, overview last, no newline); transformers: {hf_tokens} (overview first, unpadded grid + newlines)")
    print(f"per-tile max |Δ| vs a simulation of llama.cpp's graph {vs_sim:.2e}; vs transformers {vs_hf:.2e} "
          f"(largest |feature| {scale:.2f}); the same graph with [CLS] first vs transformers {vs_fixed:.2e}")
    assert vs_sim <= 2e-3 * max(scale, 1.0)  # the mmproj is read as written: blocks, feature layer, projector
    assert vs_fixed <= 1e-5  # the only per-tile difference is the [CLS] placement
