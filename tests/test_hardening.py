"""Bad options and messages give one PromptError naming the argument (API) or one `error:` line
(CLI); token ids past the tokenizer decode to nothing, as transformers decodes them, with the
same greedy tokens as transformers; Ctrl-C while starting up; piped chat's exit status.
Oracles: transformers (greedy tokens under the same logits bias, its tokenizer's decode), the
process exit status and stderr."""

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from typer.testing import CliRunner

from cli import app
from conftest import random_image
from mlx_llava_next import ChatSession, PromptError, generate, stream_generate

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is shown?"


def cli(*args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return result.exit_code, result.stdout, result.stderr


# -- token ids the tokenizer lacks -----------------------------------------------------------


class ForceEvery3rd(LogitsProcessor):
    """transformers side: at every third position, make `token` win."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] % 3 == 0:
            scores[:, self.token] += 1e4
        return scores


class BiasedLM:
    """Our side, the same bias: at every third position (cache offset) `token` wins."""

    def __init__(self, lm, token):
        self.lm, self.token = lm, token

    def __call__(self, inputs, cache=None, input_embeddings=None):
        logits = self.lm(inputs, cache=cache, input_embeddings=input_embeddings)
        if cache[0].offset % 3 == 0:
            bias = mx.zeros((logits.shape[-1],)).at[self.token].add(1e4)
            logits = logits + bias.astype(logits.dtype)
        return logits

    def __getattr__(self, name):
        return getattr(self.lm, name)


class WithLM:
    def __init__(self, model, lm):
        self._model, self.language_model = model, lm

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # SentencePiece and byte-level BPE detokenizers
def test_out_of_vocab_ids_decode_to_nothing_like_transformers(tiny_checkpoint, name):
    ck = tiny_checkpoint(name)
    model, processor = ck.load()
    tok = ck.hf_processor.tokenizer
    rows = model.config.text_config["vocab_size"]
    oov = len(tok) + (rows - len(tok)) // 2
    assert len(tok) <= oov < rows  # the output layer has rows the tokenizer lacks
    image = random_image(90, 150, seed=1)
    n = 12
    inputs = ck.hf_processor(text=ck.prompt(QUESTION), images=[image], return_tensors="pt")
    config = copy.deepcopy(ck.reference.generation_config)
    config.eos_token_id, config.pad_token_id, config.max_new_tokens, config.do_sample = None, 0, n, False
    with torch.no_grad():
        out = ck.reference.generate(**inputs, generation_config=config,
                                    logits_processor=LogitsProcessorList([ForceEvery3rd(oov)]))
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert oov in expected
    biased = WithLM(model, BiasedLM(model.language_model, oov))
    result = generate(biased, processor, QUESTION, images=[image], max_tokens=n, eos_token_ids=())
    assert result.tokens == expected  # the same tokens chosen
    assert result.text == tok.decode(expected)  # the oov ids decode to nothing, as in transformers


# -- options ---------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("max_tokens", 0), ("max_tokens", -2), ("max_tokens", 2.5), ("max_tokens", "3"), ("max_tokens", True),
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf), ("top_p", 2.0), ("top_p", math.nan),
    ("min_p", 5.0), ("top_k", -1), ("repetition_penalty", -1.0), ("repetition_penalty", 0.0),
    ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("prefill_step_size", 0), ("stop", [1]),
    ("eos_token_ids", ["x"]), ("repetition_context_size", 0), ("no_such_option", 1),
]


@pytest.mark.parametrize("key, value", BAD_OPTIONS, ids=[f"{k}={v!r}" for k, v in BAD_OPTIONS])
def test_bad_option_is_a_prompt_error_naming_it(tiny_checkpoint, key, value):
    model, processor = tiny_checkpoint("llama").load()
    with pytest.raises(PromptError, match=key):
        generate(model, processor, QUESTION, **{key: value})
    with pytest.raises(PromptError, match=key):
        ChatSession(model, processor, **{key: value})


BAD_MESSAGES = [
    ([], "empty"),
    ([{"content": "hi"}], "role"),
    ([{"role": "user", "content": None}], "content"),
    ([{"role": "user", "content": 3}], "content"),
    (["hello"], r"messages\[0\]"),
    ([{"role": "user", "content": [{"type": "video"}]}], "type"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a\udc80b"}]}], "surrogate"),
]


@pytest.mark.parametrize("messages, word", BAD_MESSAGES)
def test_malformed_messages(tiny_checkpoint, messages, word):
    model, processor = tiny_checkpoint("llama").load()
    with pytest.raises(PromptError, match=word):
        generate(model, processor, messages, max_tokens=1)


def test_lone_surrogates_in_question_and_system(tiny_checkpoint):
    model, processor = tiny_checkpoint("llama").load()
    with pytest.raises(PromptError, match="prompt.*surrogate"):
        generate(model, processor, "bad \ud800 text", max_tokens=1)
    with pytest.raises(PromptError, match="system.*surrogate"):
        generate(model, processor, "fine", system="\udfff", max_tokens=1)
    with pytest.raises(PromptError, match="system"):
        ChatSession(model, processor, system="\ud800")
    with pytest.raises(PromptError, match="question"):
        ChatSession(model, processor).ask("\ud800")


def test_chat_reports_the_users_own_marker_count(tiny_checkpoint):
    model, processor = tiny_checkpoint("llama").load()
    chat = ChatSession(model, processor, max_tokens=2)
    with pytest.raises(PromptError, match=r"has 2 `<image>` marker\(s\) and 1 image"):
        chat.ask("<image> <image> what?", images=[random_image(60, 60)])


def test_huge_max_tokens_is_clamped_with_a_note(tiny_checkpoint):
    model, processor = tiny_checkpoint("llama").load()
    with pytest.warns(UserWarning, match="context window"):
        responses = stream_generate(model, processor, QUESTION, max_tokens=10**9, eos_token_ids=())
        next(responses)
        responses.close()


@pytest.mark.parametrize("args, word", [
    (("--max-tokens", "0"), "max_tokens"), (("--max-tokens", "-5"), "max_tokens"), (("--temp", "-1"), "temperature"),
    (("--top-p", "2"), "top_p"), (("--min-p", "5"), "min_p"), (("--temp", "nan"), "temperature"),
])
def test_cli_bad_options_one_error_line_before_loading(args, word, tmp_path):
    # a model path that does not exist: the option must be refused first
    code, _, stderr = cli("generate", "--model", tmp_path / "none", "--prompt", "hi", *args)
    assert code == 1 and stderr.count("\n") == 1 and stderr.startswith("error: ") and word in stderr, stderr
    if args[0] in ("--max-tokens", "--temp"):
        code, _, stderr = cli("chat", "--model", tmp_path / "none", *args, input="hi\n")
        assert code == 1 and stderr.startswith("error: ") and word in stderr, stderr
    if args[0] == "--max-tokens":
        code, _, stderr = cli("ocr", REPO / "examples" / "scan.png", "--model", tmp_path / "none", *args)
        assert code == 1 and stderr.startswith("error: ") and word in stderr, stderr


def test_piped_chat_exits_non_zero_after_errors(tiny_checkpoint):
    path = tiny_checkpoint("llama").path
    code, stdout, stderr = cli("chat", "--model", path, "--max-tokens", "2", input="/image nowhere.png\nhello\n")
    assert code == 1 and "error: nowhere.png" in stderr, stderr
    code, _, stderr = cli("chat", "--model", path, "--max-tokens", "2", input="hello\n")
    assert code == 0, stderr


def _wait_until_sigint_is_caught(proc, timeout: float = 30.0) -> None:
    """Until the process has a SIGINT handler (cli.py's first lines): a signal that comes while
    Python itself is still initialising kills it by the default action, which no code can change."""
    status = f"/proc/{proc.pid}/status"
    if not os.path.exists(status):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        caught = next((line.split()[1] for line in open(status) if line.startswith("SigCgt:")), "0")
        if int(caught, 16) & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.005)


@pytest.mark.parametrize("delay", [0.4, 1.2])  # importing typer, the commands, mlx; loading the model
def test_ctrl_c_while_starting_up(tiny_checkpoint, delay):
    proc = subprocess.Popen([sys.executable, "cli.py", "generate", "--model", str(tiny_checkpoint("llama").path),
                             "--prompt", "hi", "--max-tokens", "500"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_until_sigint_is_caught(proc)  # before that, the interpreter itself is still starting
    time.sleep(delay)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip() in ("", "interrupted"), stderr


# -- info on quantized conversions -------------------------------------------------------------


@pytest.mark.parametrize("recipe", [None, "mixed_3_6"])
def test_info_counts_quantized_parameters_and_names_mixed_recipes(tiny_checkpoint, tmp_path, recipe):
    import json

    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    ck = tiny_checkpoint("qwen2")  # attention biases beside quantized weights
    out, plain = tmp_path / "q", tmp_path / "f"
    convert(ck.path, out, quantization=QuantConfig(bits=4, group_size=32, quantize_vision=True, recipe=recipe),
            show_progress=False, warn=lambda m: None)
    convert(ck.path, plain, show_progress=False)
    # the oracle: element counts of the float conversion's tensors (the same parameters, unpacked)
    expected = sum(math.prod(v.shape) for f in plain.glob("*.safetensors") for v in mx.load(str(f)).values())
    code, stdout, stderr = cli("info", out, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["parameters"]["total"] == expected
    if recipe:
        assert info["quantization"].startswith("mixed") and "6-bit" in info["quantization"]
    else:
        assert info["quantization"] == "4-bit affine, group size 32"


def test_info_on_a_gguf_directory_says_so(tmp_path):
    (tmp_path / "model-f16.gguf").write_bytes(b"GGUF")
    code, _, stderr = cli("info", tmp_path)
    assert code == 1 and "GGUF" in stderr and stderr.count("\n") == 1, stderr


# -- checkpoint files: one CheckpointError naming the field -------------------------------------

import json as _json  # noqa: E402
import shutil as _shutil  # noqa: E402

from mlx_llava_next import CheckpointError, ImageError, load  # noqa: E402


def copy_checkpoint(tiny_checkpoint, tmp_path, name="llama"):
    out = tmp_path / "ckpt"
    _shutil.copytree(tiny_checkpoint(name).path, out)
    return out


def edit_json(path, change):
    data = _json.loads(path.read_text())
    change(data)
    path.write_text(_json.dumps(data))


@pytest.mark.parametrize("field, value, word", [
    ("num_hidden_layers", 2**31, "num_hidden_layers"), ("hidden_size", "64", "hidden_size"),
    ("num_attention_heads", 0, "num_attention_heads"), ("vocab_size", None, "vocab_size"),
    ("rms_norm_eps", -1, "rms_norm_eps"), ("layer_types", ["full_attention", "mamba"], "layer_types"),
    ("max_position_embeddings", 1.5, "max_position_embeddings"),
])
def test_bad_text_config_fields(tiny_checkpoint, tmp_path, field, value, word):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["text_config"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=word):
        load(ckpt)


@pytest.mark.parametrize("change, word", [
    (lambda c: c.__setitem__("image_grid_pinpoints", [[100000, 100000]]), "image_grid_pinpoints"),
    (lambda c: c.__setitem__("vision_config", [1, 2]), "vision_config"),
    (lambda c: c["vision_config"].__setitem__("patch_size", 0), "patch_size"),
    (lambda c: c.__setitem__("vision_feature_layer", "last"), "vision_feature_layer"),
])
def test_bad_top_level_config_fields(tiny_checkpoint, tmp_path, change, word):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_json(ckpt / "config.json", change)
    with pytest.raises(CheckpointError, match=word):
        load(ckpt)


@pytest.mark.parametrize("data, word", [
    (lambda raw: b"\xef\xbb\xbf" + raw, "byte-order mark"), (lambda raw: raw[:10] + b"\xff" + raw[10:], "UTF-8"),
    (lambda raw: b"[" + raw + b"]", "object"), (lambda raw: b"[" * 100000 + b"]" * 100000, "config"),
])
@pytest.mark.parametrize("file", ["config.json", "processor_config.json"])
def test_undecodable_json_files(tiny_checkpoint, tmp_path, data, word, file):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    (ckpt / file).write_bytes(data((ckpt / file).read_bytes()))
    with pytest.raises(CheckpointError, match=word):
        load(ckpt)


@pytest.mark.parametrize("change, word", [
    (lambda p: p.__setitem__("crop_size", {"height": 10**6, "width": 10**6}), "crop_size"),
    (lambda p: p.__setitem__("image_grid_pinpoints", [[100000, 100000]]), "image_grid_pinpoints"),
    (lambda p: p.__setitem__("image_std", [0, 0, 0]), "image_std"),
    (lambda p: p.__setitem__("size", "big"), "size"),
])
def test_bad_processor_config(tiny_checkpoint, tmp_path, change, word):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_json(ckpt / "processor_config.json", lambda c: change(c["image_processor"]))
    with pytest.raises(CheckpointError, match=word):
        load(ckpt)


def _shard(ckpt):
    return sorted(ckpt.glob("*.safetensors"))[0]


@pytest.mark.parametrize("how", ["header+1", "header-1", "shifted", "extra-bytes"])
def test_safetensors_lengths_and_offsets_checked(tiny_checkpoint, tmp_path, how):
    import struct

    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    shard = _shard(ckpt)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = _json.loads(raw[8:8 + n])
    if how.startswith("header"):
        raw = struct.pack("<Q", n + (1 if how == "header+1" else -1)) + raw[8:]
    elif how == "shifted":
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [o + 2 for o in header[name]["data_offsets"]]
        text = _json.dumps(header).encode().ljust(n)
        raw = raw[:8] + text[:n] + raw[8 + n:] if len(text) == n else struct.pack("<Q", len(text)) + text + raw[8 + n:]
    else:
        raw = raw + b"\0" * 4
    shard.write_bytes(raw)
    with pytest.raises(CheckpointError, match=shard.name):
        load(ckpt)


def test_index_without_weight_map_and_unlisted_tensor(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    index = ckpt / "model.safetensors.index.json"
    original = index.read_text()
    index.write_text(_json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load(ckpt)
    index.write_text(original)
    shard = _shard(ckpt)
    tensors = load_file(str(shard))
    tensors["language_model.model.layers.0.extra.weight"] = next(iter(tensors.values()))
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="extra"):
        load(ckpt)


def test_image_arrays_checked_before_allocating():
    import numpy as np

    from mlx_llava_next.image_processing import ImageProcessor

    processor = ImageProcessor()
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (100000, 100000, 3))
    started = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        processor([huge])
    assert time.perf_counter() - started < 1.0
    for bad in (np.zeros((2, 8, 8, 3, 1), np.uint8), np.zeros((8, 8, 3), bool), np.zeros((8, 8, 3), np.float32),
                np.full((8, 8, 3), 300, np.int64)):
        with pytest.raises(ImageError):
            processor([bad])


def test_decompression_bomb_jpeg_fails_fast(tmp_path):
    import io
    import struct

    from PIL import Image

    from mlx_llava_next.image_processing import load_image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc0")
    data[at + 5: at + 9] = struct.pack(">HH", 20000, 20000)  # declared 20000x20000
    started = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        load_image(bytes(data))
    assert time.perf_counter() - started < 2.0


# -- GGUF -------------------------------------------------------------------------------------


def small_gguf(path, tensors, template="{{ messages[0]['content'] }}"):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.chat_template", template)
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_one_d_quantized_tensor_and_block_index(tmp_path):
    import gguf
    import numpy as np

    from mlx_llava_next.gguf_loading import vision_names
    from mlx_llava_next.gguf_reader import read_header

    q8 = np.zeros(34, np.uint8)  # one q8_0 block of 32 weights, written as raw bytes
    path = small_gguf(tmp_path / "a.gguf", {"output_norm.weight": (q8, gguf.GGMLQuantizationType.Q8_0)})
    with pytest.raises(CheckpointError, match="1-D"):
        read_header(path)
    path = small_gguf(tmp_path / "b.gguf", {"v.blk.x.attn_q.weight": (np.ones((2, 4), np.float32), None)})
    with pytest.raises(CheckpointError, match="block index"):
        vision_names(read_header(path))


@pytest.mark.parametrize("template, kind, word", [
    ("{% for m in messages %}", CheckpointError, "jinja"),
    ("{{ raise_exception('roles must alternate') }}", PromptError, "roles must alternate"),
])
def test_chat_template_errors(tiny_checkpoint, template, kind, word):
    from mlx_llava_next.processing import Processor

    model, processor = tiny_checkpoint("llama").load()
    make = lambda: Processor(processor.tokenizer, processor.image_processor, processor.config, chat_template=template)  # noqa: E731
    if kind is CheckpointError:
        with pytest.raises(CheckpointError, match=word):
            make()
    else:
        with pytest.raises(PromptError, match=word):
            generate(model, make(), QUESTION, max_tokens=1)
