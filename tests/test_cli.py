"""The command line: generate/chat/ocr/info on tiny checkpoints, through real subprocesses (a
pipe and a pseudo-terminal) where it matters and typer's in-process runner elsewhere."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from conftest import random_image
from mlx_llava_next import ChatSession, generate
from mlx_llava_next.commands import generate as commands
from mlx_llava_next.image_processing import load_image
from test_generate import hf_greedy

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is shown?"


def run_cli(*args, input: bytes = b"", env=None, timeout=300):
    """`python cli.py ...` in a subprocess; stdout/stderr decoded without newline translation."""
    proc = subprocess.run(
        [sys.executable, "cli.py", *map(str, args)], cwd=REPO, input=input, capture_output=True,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def invoke(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scan.png"
    random_image(90, 150, seed=1).save(path)
    return path


# -- generate -----------------------------------------------------------------------------


def test_generate_json_subprocess_matches_transformers(tiny_checkpoint, image_file):
    ck = tiny_checkpoint("mistral")
    rc, out, err = run_cli("generate", "--model", ck.path, "--image", image_file, "--prompt", QUESTION,
                           "--max-tokens", 20, "--json")
    assert rc == 0, err
    result = json.loads(out)
    expected = hf_greedy(ck, [load_image(image_file)], QUESTION, 20)
    eos = ck.reference.generation_config.eos_token_id
    if eos in expected:  # both sides stop at EOS; the CLI keeps transformers' defaults
        expected = expected[: expected.index(eos) + 1]
    assert len(expected) >= 16 and result["tokens"] == expected
    assert result["finish_reason"] == ("length" if len(expected) == 20 else "stop")
    assert result["stats"]["prompt_tokens"] > 0 and result["stats"]["generation_tokens"] == len(expected)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_generate_json_matches_transformers(tiny_checkpoint, image_file, name):
    ck = tiny_checkpoint(name)
    result = invoke("generate", "--model", ck.path, "-i", image_file, "-p", QUESTION, "--max-tokens", 16, "--json")
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.stdout)["tokens"]
    expected = hf_greedy(ck, [load_image(image_file)], QUESTION, 16)
    n = min(len(tokens), len(expected))
    assert n == 16 or (tokens[-1] in ck.hf_processor.tokenizer.all_special_ids and n >= 16)
    assert tokens[:n] == expected[:n]


def test_generate_streams_text_and_stats(tiny_checkpoint, image_file):
    ck = tiny_checkpoint("llama")
    model, processor = ck.load()
    result = invoke("generate", "--model", ck.path, "-i", image_file, "-p", QUESTION, "--max-tokens", 8, "--verbose")
    assert result.exit_code == 0, result.output
    expected = generate(model, processor, QUESTION, images=[load_image(image_file)], max_tokens=8)
    assert result.stdout == expected.text + "\n"
    assert re.search(r"prompt: \d+ tokens.*generation: 8 tokens.*peak memory", result.stderr)


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "prompt too long", "unknown command option"])
def test_bad_input_is_one_line_error(tiny_checkpoint, tmp_path, image_file, case):
    ck = tiny_checkpoint("llama")
    args = ["generate", "--model", ck.path, "--max-tokens", 2]
    if case == "missing image":
        result = invoke(*args, "-i", tmp_path / "nope.png", "-p", QUESTION)
        assert_one_line_error(result, "nope.png", "not found")
    elif case == "corrupt image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        result = invoke(*args, "-i", bad, "-p", QUESTION)
        assert_one_line_error(result, "bad.png")
    elif case == "prompt too long":
        result = invoke(*args, "-i", image_file, "-p", "word " * 5000)
        assert_one_line_error(result, "context window is 4096 tokens")
    else:
        result = invoke("generate", "--model", ck.path, "--prompt", QUESTION, "--temp", "hot")
        assert result.exit_code != 0 and "Traceback" not in result.output


def test_unknown_model_offline(tmp_path):
    rc, out, err = run_cli("generate", "--model", "nobody-here/no-such-llava", "--prompt", "hi",
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "no-such-llava" in err and "offline" in err and "--model" in err


def test_demo_model_hook(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "DEMO_MODEL_DIR", tmp_path / "models" / "demo")
    with pytest.raises(Exception, match="demo model is not installed"):
        commands.resolve_model_arg("demo")
    (tmp_path / "models" / "demo").mkdir(parents=True)
    (tmp_path / "models" / "demo" / "config.json").write_text("{}")
    assert commands.resolve_model_arg("demo") == str(tmp_path / "models" / "demo")
    assert commands.resolve_model_arg("llava-hf/x") == "llava-hf/x"


# -- chat ---------------------------------------------------------------------------------


def test_chat_through_a_pipe(tiny_checkpoint, image_file, tmp_path):
    ck = tiny_checkpoint("mistral")
    transcript = tmp_path / "chat.txt"
    script = "\n".join([
        QUESTION,
        f"/image {tmp_path / 'missing.png'}",  # a bad image: reported, the session goes on
        "word " * 5000,  # longer than the context window: reported, the session goes on
        "And the colour?",
        f"/save {transcript}",
        "",
    ])
    rc, out, err = run_cli("chat", "--model", ck.path, "--image", image_file, "--max-tokens", 6, "--verbose",
                           input=script.encode())
    assert rc == 1, err  # a script learns that some of its lines failed
    model, processor = ck.load()
    chat = ChatSession(model, processor, max_tokens=6)
    first = chat.ask(QUESTION, [load_image(image_file)])
    second = chat.ask("And the colour?")
    assert out == f"{first.text}\n{second.text}\n"
    errors = error_lines(err)
    assert len(errors) == 2 and "missing.png" in errors[0] and "context window" in errors[1]
    assert re.search(r"prompt: \d+ tokens \+ \d+ cached", err)  # the follow-up reused the cache
    saved = transcript.read_text()
    assert "USER: [image]\nWhat is shown?" in saved and "USER: And the colour?" in saved
    assert "word word" not in saved


def test_chat_resume_saved_session(tiny_checkpoint, image_file, tmp_path):
    ck = tiny_checkpoint("qwen2")
    session = tmp_path / "s.safetensors"
    first = invoke("chat", "--model", ck.path, "-i", image_file, "--max-tokens", 5,
                   input=f"{QUESTION}\n/save {session}\n/exit\nnever asked\n")
    assert first.exit_code == 0 and session.exists(), first.output
    resumed = invoke("chat", "--model", ck.path, "--resume", session, "--max-tokens", 5, input="Any text?\n")
    assert resumed.exit_code == 0, resumed.output
    model, processor = ck.load()
    chat = ChatSession(model, processor, max_tokens=5)
    a1 = chat.ask(QUESTION, [load_image(image_file)])
    a2 = chat.ask("Any text?")
    assert first.stdout == a1.text + "\n" and resumed.stdout == a2.text + "\n"


def _read_until(fd, pattern, buffer, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, buffer[0])
        if match:
            return match
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            buffer[0] += data.decode("utf-8", "replace")
    raise AssertionError(f"waited for {pattern!r}; the terminal shows: {buffer[0][-1500:]!r}")


def test_chat_in_a_terminal_ctrl_c_stops_the_answer(tiny_checkpoint, image_file):
    ck = tiny_checkpoint("mistral")
    max_tokens = 400  # long enough to still be answering when Ctrl-C arrives
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty, so \x03 raises SIGINT
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "cli.py", "chat", "--model", str(ck.path), "--image",
                                  str(image_file), "--max-tokens", str(max_tokens), "--temp", "1.0",
                                  "--seed", "0", "--verbose"])
    screen = [""]
    try:
        _read_until(fd, r"> ", screen)
        os.write(fd, b"What is shown?\r")
        _read_until(fd, r"What is shown\?\r?\n.{8}", screen)  # the answer is streaming
        os.write(fd, b"\x03")
        stopped = _read_until(fd, r"\[stopped\]\r?\n\[prompt: .*generation: (\d+) tokens.*\| stopped\]\r?\n> ", screen)
        assert int(stopped.group(1)) < max_tokens
        os.write(fd, b"And now?\r")
        _read_until(fd, rf"And now\?[\s\S]*\+ \d+ cached.*generation: {max_tokens} tokens.*\| length\]\r?\n> ", screen)
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == 0
        assert "Traceback" not in screen[0] and "KeyboardInterrupt" not in screen[0]
    finally:
        if pid is not None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


# -- ocr ----------------------------------------------------------------------------------


def test_ocr_folder_skip_force_and_bad_files(tiny_checkpoint, tmp_path):
    ck = tiny_checkpoint("llama")
    model, processor = ck.load()
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, size in enumerate([(90, 150), (120, 60), (56, 56)]):
        random_image(*size, seed=10 + i).save(scans / f"page{i}.png")
    out = tmp_path / "texts"
    args = ["ocr", scans, "--model", ck.path, "--out", out, "--max-tokens", 5]

    first = invoke(*args)
    assert first.exit_code == 0, first.output
    written = sorted(out.glob("*.txt"))
    assert [p.name for p in written] == ["page0.txt", "page1.txt", "page2.txt"]
    prompt = commands.OCR_PROMPTS["default"]
    for i, path in enumerate(written):
        expected = generate(model, processor, prompt, images=[load_image(scans / f"page{i}.png")], max_tokens=5)
        assert path.read_text() == expected.text.strip() + "\n"
    assert "OCR" in first.stderr and "3 written" in first.stderr  # progress bar and summary

    stamps = [p.stat().st_mtime_ns for p in written]
    second = invoke(*args)
    assert second.exit_code == 0 and "0 written, 3 skipped" in second.stderr
    assert [p.stat().st_mtime_ns for p in written] == stamps

    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    third = invoke(*args[:2], tmp_path / "gone.jpg", *args[2:], "--force")
    assert third.exit_code == 1
    errors = error_lines(third.stderr)
    assert len(errors) == 2 and any("broken.png" in e for e in errors) and any("gone.jpg" in e for e in errors)
    assert "3 written" in third.stderr and not (out / "broken.txt").exists()

    beside = invoke("ocr", scans / "page0.png", "--model", ck.path, "--max-tokens", 5, "--prompt", "Read it.")
    assert beside.exit_code == 0, beside.output
    expected = generate(model, processor, "Read it.", images=[load_image(scans / "page0.png")], max_tokens=5)
    assert (scans / "page0.txt").read_text() == expected.text.strip() + "\n"


# -- info ---------------------------------------------------------------------------------


def test_info(tiny_checkpoint):
    import checkpoints

    ck = tiny_checkpoint("mistral")
    result = invoke("info", ck.path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    reference = dict(ck.reference.named_parameters())
    assert info["parameters"]["total"] == sum(p.numel() for p in reference.values())
    assert info["parameters"]["vision_tower"] == sum(p.numel() for k, p in reference.items() if "vision_tower" in k)
    assert info["architecture"] == "LlavaNextForConditionalGeneration"
    assert info["text_backbone"]["model_type"] == "mistral" and info["text_backbone"]["layers"] == 2
    assert info["dtype"] == "float32" and info["quantization"] is None
    assert info["chat_template"] == "checkpoint (chat_template.jinja)"
    assert info["image_grid_pinpoints"] == checkpoints.PINPOINTS
    assert info["size_bytes"] == sum(p.stat().st_size for p in Path(ck.path).iterdir())
    text = invoke("info", ck.path)
    assert text.exit_code == 0 and re.search(r"image grid pinpoints\s+56x112, 112x56", text.stdout)
