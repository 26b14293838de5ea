"""GGUF export (text + mmproj) and the GGUF loader, on the tiny checkpoints.

Oracles: gguf-py reads the files and dequantizes every tensor (compared with the transformers
weights within each format's own error bound), llama.cpp's naming and Q/K permutation as its
converter documents them (written out here, independently of `gguf_layout`), transformers'
GGUF tokenizer reader, and our runtime on the safetensors checkpoint (itself checked against
transformers in test_model_parity.py). llama.cpp itself: tests/test_llama_cpp.py.
"""

import shutil
import struct
import time
import tracemalloc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from convert.common import OutputExistsError
from mlx_llava_next.outputs import MARKER
from convert.gguf import convert_to_gguf
from mlx_llava_next import CheckpointError, UnsupportedModelError, load
from mlx_llava_next.generate import generate

BACKBONES = ["llama", "mistral", "qwen2"]
QTYPES = ["f32", "f16", "q8_0", "q4_0"]


@pytest.fixture(scope="session")
def gguf_export(tiny_checkpoint, tmp_path_factory):
    """gguf_export(name, qtype) -> (out_dir, text_path, mmproj_path), each exported once."""
    done = {}

    def get(name, qtype):
        if (name, qtype) not in done:
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{qtype}"
            done[name, qtype] = (out, *convert_to_gguf(tiny_checkpoint(name).path, out, qtype, progress=False))
        return done[name, qtype]

    return get


# -- llama.cpp's conventions, written from its converter (convert_hf_to_gguf.py, legacy mmproj) --

TEXT_NAMES = {
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
VISION_NAMES = {
    "embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight", "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def llama_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(ckpt):
    """GGUF name -> source float32 array (as llama.cpp's converter lays it out), text and mmproj."""
    state = {k: v.detach().float().numpy() for k, v in ckpt.reference.state_dict().items()}
    cfg = ckpt.reference.config
    text_cfg = cfg.text_config
    text, vision = {"output.weight": state["lm_head.weight"]}, {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            rest = key[len("model.language_model."):]
            if rest.startswith("layers."):
                _, i, sub = rest.split(".", 2)
                name = f"blk.{i}.{TEXT_NAMES[sub]}"
                if text_cfg.model_type != "qwen2" and "q_proj" in sub:
                    value = llama_permute(value, text_cfg.num_attention_heads)
                if text_cfg.model_type != "qwen2" and "k_proj" in sub:
                    value = llama_permute(value, text_cfg.num_key_value_heads)
            else:
                name = TEXT_NAMES[rest]
            text[name] = value
        elif key.startswith("model.vision_tower."):
            rest = key[len("model.vision_tower."):].replace("vision_model.", "")
            if rest.startswith("encoder.layers."):
                _, _, i, sub = rest.split(".", 3)
                if int(i) >= cfg.vision_config.num_hidden_layers - 1:  # feature layer -2: last block unused
                    continue
                module, param = sub.rsplit(".", 1)
                vision[f"v.blk.{i}.{VISION_NAMES[module]}.{param}"] = value
            elif rest in VISION_NAMES:
                vision[VISION_NAMES[rest]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index, param = key.split("linear_")[1].split(".")
            vision[f"mm.{0 if index == '1' else 2}.{param}"] = value
        elif key == "model.image_newline":
            vision["v.image_newline"] = value
    return text, vision


def format_error_bound(source, qtype):
    """Largest error each element may have after quantize + dequantize, from the format."""
    half_ulp = 2.0 ** -11  # float16 relative rounding
    if qtype == Q.F32:
        return np.zeros_like(source)
    if qtype == Q.F16:
        return np.abs(source) * half_ulp + 2.0 ** -25
    blocks = source.reshape(-1, 32)
    if qtype == Q.Q8_0:  # d = amax / 127 (stored as f16), |x - d q| <= d / 2
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = d * (0.5 + 127 * half_ulp)
    else:  # Q4_0: d = -max / 8 with the signed extreme, q clamped to 15: half a step, a whole one at the top
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = np.abs(extreme) / 8
        top = blocks / (extreme / -8) >= 7.5
        bound = d * (np.where(top, 1.0, 0.5) + 8 * half_ulp)
    return np.broadcast_to(bound, blocks.shape).reshape(source.shape) + 1e-12


def expected_type(name, shape, qtype):
    """llama.cpp's rule: 1-D stays F32; 2-D weights take the file type (f16 mmproj)."""
    if len(shape) == 1 or qtype == "f32":
        return Q.F32
    return {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]


# -- acceptance 1: files read back, every tensor within its format's error -----------------------


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", BACKBONES)
def test_export_reads_back_within_format_error(tiny_checkpoint, gguf_export, name, qtype):
    ckpt = tiny_checkpoint(name)
    _, text_path, mmproj_path = gguf_export(name, qtype)
    assert text_path.name == f"{ckpt.path.name}-{qtype}.gguf"
    assert mmproj_path.name == f"mmproj-{ckpt.path.name}-{'f32' if qtype == 'f32' else 'f16'}.gguf"
    text, vision = expected_tensors(ckpt)
    worst = {}
    for path, expected, file_qtype in ((text_path, text, qtype), (mmproj_path, vision, "f32" if qtype == "f32" else "f16")):
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(expected), path.name
        for gname, source in expected.items():
            t = tensors[gname]
            want = expected_type(gname, source.shape, file_qtype)
            assert t.tensor_type == want, (gname, t.tensor_type.name)
            assert tuple(int(d) for d in reversed(t.shape)) == source.shape, gname
            restored = dequantize(t.data, t.tensor_type).reshape(source.shape)
            err = np.abs(restored.astype(np.float64) - source)
            bound = format_error_bound(source, t.tensor_type)
            assert (err <= bound).all(), f"{gname} ({t.tensor_type.name}): max excess {(err - bound).max():.3g}"
            worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0), float(err.max()))
    print(f"{name} {qtype}: max |dequantized - source| by type {worst}")


def test_metadata_follows_llama_cpp(tiny_checkpoint, gguf_export):
    ckpt = tiny_checkpoint("mistral")
    _, text_path, mmproj_path = gguf_export("mistral", "q8_0")
    cfg = ckpt.reference.config
    fields = {k: f.contents() for k, f in GGUFReader(text_path).fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 7
    assert fields["llama.block_count"] == cfg.text_config.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == cfg.text_config.num_key_value_heads
    assert fields["llama.rope.freq_base"] == cfg.text_config.rope_parameters["rope_theta"]
    assert fields["llama.context_length"] == cfg.text_config.max_position_embeddings
    tok = ckpt.hf_processor.tokenizer
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[cfg.image_token_index] == "<image>" and types[cfg.image_token_index] == 3  # CONTROL
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert fields["tokenizer.ggml.add_bos_token"] is True and "[INST]" in fields["tokenizer.chat_template"]
    clip = {k: f.contents() for k, f in GGUFReader(mmproj_path).fields.items()}
    assert clip["general.architecture"] == "clip" and clip["clip.projector_type"] == "mlp"
    assert clip["clip.vision.feature_layer"] == [cfg.vision_config.num_hidden_layers - 1]  # HF index of layer -2
    assert clip["clip.vision.block_count"] == cfg.vision_config.num_hidden_layers - 1
    # clip.cpp reads (width, height) pairs; transformers lists (height, width)
    assert clip["clip.vision.image_grid_pinpoints"] == [v for h, w in cfg.image_grid_pinpoints for v in (w, h)]
    assert clip["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert np.allclose(clip["clip.vision.image_mean"], ckpt.hf_processor.image_processor.image_mean)


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_ggml_vocab_rebuilds_the_tokenizer(tiny_checkpoint, gguf_export, name):
    """transformers' own GGUF tokenizer reader, fed only our tokenizer.ggml.* keys (it ignores
    tokenizer.huggingface.json), tokenizes plain text like the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    out, text_path, _ = gguf_export(name, "f32")
    theirs = AutoTokenizer.from_pretrained(out, gguf_file=text_path.name)
    ours = tiny_checkpoint(name).hf_processor.tokenizer
    for text in ["the cat shows a red page", "Hello world!\n\nWhat is   this? 12345", " leading space", "ünïcödé ✓ text"]:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text


# -- acceptance 2: our runtime on the GGUF pair ------------------------------------------------


def logits_pair(ckpt, gguf_dir, make_image):
    ref_model, ref_proc = ckpt.load()
    model, processor = load(gguf_dir)
    image = make_image(70, 130, seed=3)
    prompt = ckpt.prompt("What is in this picture?")
    ours, theirs = processor(prompt, images=[image]), ref_proc(prompt, images=[image])
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    args = (ours["input_ids"], ours["pixel_values"], ours["image_sizes"])
    return np.array(model(*args)), np.array(ref_model(*args)), (model, processor)


@pytest.mark.parametrize("name", BACKBONES)
def test_f32_gguf_logits_equal_safetensors(tiny_checkpoint, gguf_export, make_image, name):
    got, want, _ = logits_pair(tiny_checkpoint(name), gguf_export(name, "f32")[0], make_image)
    print(f"{name} f32 GGUF: max |Δlogit| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("name", BACKBONES)
def test_f16_gguf_logits_close(tiny_checkpoint, gguf_export, make_image, name):
    got, want, _ = logits_pair(tiny_checkpoint(name), gguf_export(name, "f16")[0], make_image)
    diff, scale = np.abs(got - want).max(), np.abs(want).max()
    print(f"{name} f16 GGUF: max |Δlogit| {diff:.2e} (largest |logit| {scale:.2f})")
    assert diff <= 1e-2 * scale


@pytest.mark.parametrize("name", BACKBONES)
def test_q8_0_gguf_same_greedy_tokens(tiny_checkpoint, gguf_export, make_image, name):
    ckpt = tiny_checkpoint(name)
    model, processor = load(gguf_export(name, "q8_0")[0])
    quantized = [m for _, m in model.language_model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.bits == 8 and m.group_size == 32 for m in quantized)  # runs as Q8, not dequantized
    image, question = make_image(90, 60, seed=5), "Describe the image."
    kwargs = dict(max_tokens=8, eos_token_ids=())
    got = generate(model, processor, question, images=[image], **kwargs).tokens
    want = generate(*ckpt.load(), question, images=[image], **kwargs).tokens
    print(f"{name} q8_0 GGUF greedy: {got} (safetensors {want})")
    assert got == want


def dequantized_model(ckpt, text_path):
    """Oracle for the quantized runtime: our model on the safetensors checkpoint with every text
    weight replaced by gguf-py's dequantization of the file (Q/K rows put back by inverting
    llama.cpp's permutation)."""
    model, _ = load(ckpt.path)
    cfg = ckpt.reference.config.text_config
    back = {v: k for k, v in TEXT_NAMES.items()}
    weights = []
    for t in GGUFReader(text_path).tensors:
        value = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name == "output.weight":
            name = "lm_head.weight"
        elif t.name.startswith("blk."):
            _, i, sub = t.name.split(".", 2)
            name = f"model.layers.{i}.{back[sub]}"
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(sub.split(".")[0])
            if heads and cfg.model_type != "qwen2":
                side = value.shape[0] // heads // 2
                value = value.reshape(heads, side, 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        else:
            name = "model." + back[t.name]
        weights.append(("language_model." + name, mx.array(value.astype(np.float32))))
    model.load_weights(weights, strict=False)  # the text model only
    return model


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_q4_0_gguf_runs_the_blocks_exactly(tiny_checkpoint, gguf_export, make_image, name):
    ckpt = tiny_checkpoint(name)
    out, text_path, _ = gguf_export(name, "q4_0")
    got, want, (model, processor) = logits_pair(ckpt, out, make_image)
    embed = model.language_model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and embed.bits == 4 and embed.group_size == 32
    batch = processor(ckpt.prompt("What is in this picture?"), images=[make_image(70, 130, seed=3)])
    args = (batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
    oracle = np.array(dequantized_model(ckpt, text_path)(*args))
    print(f"{name} q4_0 GGUF: max |Δlogit| vs gguf-py dequantized {np.abs(got - oracle).max():.2e}, "
          f"vs f32 weights {np.abs(got - want).max():.2e}")
    assert np.abs(got - oracle).max() <= 1e-4


def test_load_accepts_text_file_path(gguf_export):
    out, text_path, _ = gguf_export("qwen2", "f32")
    model, processor = load(text_path)
    assert processor.chat_template_source == "checkpoint" and "<|im_start|>" in processor.chat_template


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_gguf_tokenizer_matches_checkpoint(tiny_checkpoint, gguf_export, name):
    """The tokenizer our loader builds: from tokenizer.huggingface.json, and (for files from other
    converters) from the tokenizer.ggml.* keys alone."""
    from mlx_llava_next.gguf_loading import load_tokenizer
    from mlx_llava_next.gguf_reader import read_header

    out, text_path, _ = gguf_export(name, "f32")
    _, processor = load(out)
    header = read_header(text_path)
    del header.metadata["tokenizer.huggingface.json"]
    rebuilt = load_tokenizer(header)._tokenizer
    ref = tiny_checkpoint(name).hf_processor.tokenizer
    for text in ["USER: <image>\nHi  there", "[INST] <image>\nWhat? [/INST]", "<|im_start|>user\nhello<|im_end|>",
                 "Hello world!\n\nWhat is   this? 12345"]:
        assert processor.hf_tokenizer(text)["input_ids"] == ref(text)["input_ids"], text
        assert rebuilt(text)["input_ids"] == ref(text)["input_ids"], text
    ids = ref("a red cat")["input_ids"]
    assert processor.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert processor.tokenizer.eos_token_ids == {ref.eos_token_id}


# -- converter behaviour -----------------------------------------------------------------------


def test_output_is_atomic_and_needs_force(tiny_checkpoint, tmp_path, monkeypatch):
    import convert.gguf as exporter

    src = tiny_checkpoint("qwen2").path
    out = tmp_path / "out"
    written = convert_to_gguf(src, out, "f32", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == sorted([p.name for p in written] + [MARKER])  # the marker: --force may replace it
    with pytest.raises(OutputExistsError):
        convert_to_gguf(src, out, "q8_0", progress=False)
    calls, encode = [], exporter.encode

    def failing(array, ggml_type):  # a crash after some tensors were written
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return encode(array, ggml_type)

    monkeypatch.setattr(exporter, "encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_gguf(src, out, "q8_0", force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier output is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# -- acceptance 4: bad files -------------------------------------------------------------------


def copy_pair(gguf_export, tmp_path, name="llama", qtype="f16"):
    out, text_path, mmproj_path = gguf_export(name, qtype)
    dst = tmp_path / "pair"
    shutil.copytree(out, dst)
    return dst / text_path.name, dst / mmproj_path.name


def patch(path, old: bytes, new: bytes, last=False):
    data = bytearray(path.read_bytes())
    at = data.rfind(old) if last else data.find(old)
    assert at >= 0 and len(old) == len(new)
    data[at : at + len(old)] = new
    path.write_bytes(bytes(data))


def tensor_info_dims(name: str, dims):
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)


def kv_u32(key: str, value: int):
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<II", 4, value)


def expect_error(path, *words, kind=CheckpointError):
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(kind) as info:
        load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(info.value)
    print(f"{path.name}: {message}")
    assert all(w in message for w in words), message
    assert peak < 64 << 20 and time.perf_counter() - start < 30  # nothing sized by the bad metadata
    return message


def test_truncated_gguf(gguf_export, tmp_path):
    text, _ = copy_pair(gguf_export, tmp_path)
    text.write_bytes(text.read_bytes()[: text.stat().st_size // 2])
    expect_error(text, "truncated", text.name)
    text.write_bytes(text.read_bytes()[:100])  # cut inside the metadata
    expect_error(text, "truncated")


def test_absurd_counts_and_sizes(gguf_export, tmp_path):
    text, _ = copy_pair(gguf_export, tmp_path)
    original = text.read_bytes()
    for offset, value, words in [(8, 1 << 60, "tensors"), (16, 1 << 60, "metadata entries")]:
        data = bytearray(original)
        data[offset : offset + 8] = struct.pack("<Q", value)  # tensor count, kv count
        text.write_bytes(bytes(data))
        expect_error(text, words)
    # a string length of 2**62 bytes (the first key's length)
    data = bytearray(original)
    data[24:32] = struct.pack("<Q", 1 << 62)
    text.write_bytes(bytes(data))
    expect_error(text, "claims")
    # a tokens array claiming 2**61 entries
    text.write_bytes(original)
    key = b"tokenizer.ggml.tokens"
    at = original.find(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4
    data = bytearray(original)
    data[at : at + 8] = struct.pack("<Q", 1 << 61)
    text.write_bytes(bytes(data))
    expect_error(text, "items")
    # metadata sizes that the tensors contradict: checked before the model is built
    text.write_bytes(original)
    patch(text, kv_u32("llama.embedding_length", 64), kv_u32("llama.embedding_length", 1 << 30))
    expect_error(text, "hidden_size", "1073741824")  # bounded by the config check
    text.write_bytes(original)
    patch(text, kv_u32("llama.block_count", 2), kv_u32("llama.block_count", 1 << 31))
    expect_error(text, "block_count")


def test_tensor_data_outside_file(gguf_export, tmp_path):
    text, _ = copy_pair(gguf_export, tmp_path)
    info = tensor_info_dims("output.weight", (64, 32064)) + struct.pack("<I", 1)  # F16
    data = text.read_bytes()
    at = data.rfind(info) + len(info)
    offset = struct.unpack("<Q", data[at : at + 8])[0]
    text.write_bytes(data[:at] + struct.pack("<Q", offset + (1 << 40)) + data[at + 8 :])
    expect_error(text, "outside the file", "output.weight")
    text.write_bytes(data[:at] + struct.pack("<Q", offset + 32) + data[at + 8 :])  # now overlaps its neighbour
    expect_error(text, "overlap")


def test_unknown_architecture(gguf_export, tmp_path):
    text, mmproj = copy_pair(gguf_export, tmp_path)
    arch = b"general.architecture" + struct.pack("<IQ", 8, 5)
    patch(text, arch + b"llama", arch + b"bloom")
    expect_error(text, "architecture 'bloom'", kind=UnsupportedModelError)
    patch(text, arch + b"bloom", arch + b"llama")
    key = b"clip.projector_type" + struct.pack("<IQ", 8, 3)
    patch(mmproj, key + b"mlp", key + b"ldp")
    expect_error(text, "projector type 'ldp'", kind=UnsupportedModelError)


def test_wrong_tensor_shape(gguf_export, tmp_path):
    text, mmproj = copy_pair(gguf_export, tmp_path)
    info = tensor_info_dims("blk.1.ffn_up.weight", (64, 128))
    patch(text, info, tensor_info_dims("blk.1.ffn_up.weight", (64, 64)), last=True)
    expect_error(text, "blk.1.ffn_up.weight", "(64, 64)", "expected (128, 64)")
    patch(text, tensor_info_dims("blk.1.ffn_up.weight", (64, 64)), info, last=True)
    patch(mmproj, tensor_info_dims("mm.2.weight", (64, 64)), tensor_info_dims("mm.2.weight", (32, 64)), last=True)
    expect_error(text, "mm.2.weight", "expected (64, 64)")


def test_missing_mmproj(gguf_export, tmp_path):
    text, mmproj = copy_pair(gguf_export, tmp_path)
    expect_error(mmproj, "is an mmproj")
    mmproj.unlink()
    expect_error(text.parent, "no mmproj")
    expect_error(text, "no mmproj")


# -- issue 13: a tensor whose dimension count or type disagrees; chat templates in a GGUF --------


def rewrite(path, template=None, shapes=()):
    """Write `path` again with gguf-py (its metadata and tensors as read by GGUFReader), with the
    chat template replaced and some tensors given another shape of the same data."""
    import gguf

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    tmp = path.with_name(path.name + ".new")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = template if field.name == "tokenizer.chat_template" and template is not None else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    data = {t.name: np.asarray(t.data).reshape(dict(shapes).get(t.name, t.data.shape)) for t in reader.tensors}
    for t in reader.tensors:
        writer.add_tensor_info(t.name, data[t.name].shape, data[t.name].dtype, data[t.name].nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data[t.name])
    writer.close()
    del reader
    tmp.replace(path)


def test_tensor_type_that_does_not_fit_its_data(gguf_export, tmp_path):
    """A tensor the header gives a narrower type than its data (F16 over F32 bytes): the shapes
    match, so before the tiling check it loaded silently and read half its bytes as garbage."""
    text, _ = copy_pair(gguf_export, tmp_path, qtype="f32")
    info = tensor_info_dims("blk.0.ffn_up.weight", (64, 128))
    patch(text, info + struct.pack("<I", Q.F32), info + struct.pack("<I", Q.F16))
    expect_error(text, "unused bytes after tensor 'blk.0.ffn_up.weight'", "wrong type or shape")


@pytest.mark.parametrize("name, shape", [
    ("blk.0.ffn_up.weight", (1, 128, 64)),  # 3 dimensions for a matrix
    ("blk.0.ffn_up.weight", (128 * 64,)),  # 1 dimension for a matrix
    ("blk.1.attn_norm.weight", (1, 64)),  # 2 dimensions for a vector
    ("v.blk.0.ln1.weight", (2, 16)),  # the vision tower's, same size
])
def test_dimension_count_that_disagrees_with_the_model(gguf_export, tmp_path, name, shape):
    """The same data under another dimension count is refused, naming the tensor and both shapes."""
    text, mmproj = copy_pair(gguf_export, tmp_path, qtype="f32")
    target = mmproj if name.startswith("v.") else text
    expected = dict((t.name, tuple(t.data.shape)) for t in GGUFReader(str(target)).tensors)[name]
    rewrite(target, shapes={name: shape})
    assert [len(t.shape) for t in GGUFReader(str(target)).tensors if t.name == name] == [len(shape)]  # n_dims
    expect_error(text, name, f"has shape {shape}", f"expected {expected}")


@pytest.mark.parametrize("template, when, word", [
    ("{% for m in messages %}{{ m['content'] }}", "load", "not valid jinja"),  # no endfor
    ("{{ raise_exception('roles must alternate user/assistant') }}", "prompt", "roles must alternate"),
])
def test_gguf_chat_template_errors(gguf_export, tmp_path, make_image, template, when, word):
    """A real GGUF pair whose tokenizer.chat_template is rewritten (gguf-py): a syntax error is a
    CheckpointError when it is loaded, a template's raise_exception() a PromptError from generate
    and chat; the CLI prints one `error:` line; jinja's own exceptions never escape."""
    from typer.testing import CliRunner

    from cli import app
    from mlx_llava_next import PromptError

    text, _ = copy_pair(gguf_export, tmp_path)
    assert "tokenizer.chat_template" in GGUFReader(str(text)).fields  # our converter writes one
    rewrite(text, template=template)
    assert GGUFReader(str(text)).fields["tokenizer.chat_template"].contents() == template
    image = tmp_path / "cat.png"
    make_image(60, 90).save(image)
    if when == "load":
        with pytest.raises(CheckpointError, match=word):
            load(text.parent)
    else:
        model, processor = load(text.parent)
        with pytest.raises(PromptError, match=word):
            generate(model, processor, "What is shown?", images=[str(image)], max_tokens=2)
    for command in (["generate", "--model", text.parent, "-i", image, "-p", "What is shown?", "--max-tokens", 2],
                    ["chat", "--model", text.parent, "-i", image, "--max-tokens", 2]):
        result = CliRunner().invoke(app, [str(a) for a in command], input="What is shown?\n")
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 1, (command[0], result.stderr)
        assert "Traceback" not in result.stderr and "jinja2" not in result.stderr, result.stderr
        assert any(line.startswith("error: ") and word in line for line in lines), result.stderr
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
