"""Two ranks on 127.0.0.1 (mlx.launch, ring backend): split models against one process.

The oracle is the same checkpoint run whole in one process (itself checked against transformers in
test_model_parity.py): logits within 1e-5, the same greedy tokens from `generate` and from a
two-turn ChatSession, per rank, for llama (tensor), qwen2 (tensor, pipeline) and their 4-bit
conversions; each rank's peak memory after loading a wider qwen2 against the one-process peak;
the CLI (`generate --json`, `chat`), a killed rank and bad arguments.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoints

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_rank.py")
LAUNCH_TIMEOUT = 420  # generous: the machine may be busy; a healthy launch takes well under a minute
# A qwen2 whose decoder layers hold ~97% of its bytes (vocab 448, vision tower 32 wide).
WIDE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)

pytestmark = pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch (part of mlx) not on PATH")


def free_port_pair() -> int:
    """A base port with base and base+1 free (the ring listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class Launch:
    """`mlx.launch --backend ring -n 2 ... -- ARGS` with stdin kept open (mlx.launch spins on a closed
    stdin) and stdout/stderr in files."""

    def __init__(self, args, stdin_text: str = "", n: int = 2):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        cmd = ["mlx.launch", "--backend", "ring", "-n", str(n), "--starting-port", str(free_port_pair()),
               "--python", sys.executable, "--", *map(str, args)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=self.out, stderr=self.err,
                                     text=True, start_new_session=True)
        if stdin_text:
            self.proc.stdin.write(stdin_text)
            self.proc.stdin.flush()

    def wait(self, timeout: float = LAUNCH_TIMEOUT):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"the launch did not end within {timeout} s:\n{self.stderr()}")
        finally:
            self.proc.stdin.close()
        return self

    def wait_for(self, text: str, timeout: float = LAUNCH_TIMEOUT) -> float:
        """The time `text` first shows on stderr (the launch may still be running)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.stderr():
                return time.time()
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert text in self.stderr(), self.stderr()
        return time.time()

    def rank_pids(self):
        """{rank: pid} of the launched ranks (mlx.launch exports MLX_RANK to each)."""
        pids = {}
        for pid in subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"MLX_RANK="):
                    pids[int(item[9:])] = int(pid)
        return pids

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()


def cli(*args, stdin_text=None, timeout=LAUNCH_TIMEOUT):
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, input=stdin_text,
                          capture_output=True, text=True, timeout=timeout)


# -- checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny llama and qwen2 (4 heads, 4 / 2 kv heads), their 4-bit conversions, a wider qwen2."""
    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    root = tmp_path_factory.mktemp("distributed")
    paths = {}
    for name in ("llama", "qwen2"):
        checkpoints.save_checkpoint(name, root / name)
        paths[name] = root / name
        paths[f"{name}-q4"] = convert(root / name, root / f"{name}-q4", dtype="float32", show_progress=False,
                                      quantization=QuantConfig(bits=4, group_size=32))  # 64 wide: 2 groups a row
    checkpoints.save_checkpoint("qwen2", root / "wide", text_overrides=WIDE)
    paths["wide"] = root / "wide"
    return paths


JOBS = [("llama", "tensor"), ("qwen2", "tensor"), ("qwen2", "pipeline"), ("llama-q4", "tensor"), ("qwen2-q4", "pipeline")]
MEMORY_JOBS = [("wide", "tensor-load"), ("wide", "pipeline-load")]  # first in their processes: nothing else loaded yet


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    """(one-process results per checkpoint, [per job: {rank: results}]) from one launch of every job."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    jobs = MEMORY_JOBS + JOBS
    names = ["wide"] + list(dict.fromkeys(name for name, _ in JOBS))
    modes = ["none-load"] + ["none"] * (len(names) - 1)
    alone = subprocess.run([sys.executable, str(WORKER), one, *sum([[m, str(models[n])] for m, n in zip(modes, names)], [])],
                           cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert alone.returncode == 0, alone.stderr
    launch = Launch([WORKER, two, *sum([[mode, models[name]] for name, mode in jobs], [])]).wait()
    split = [{r: json.loads((two / f"rank{r}-{i}.json").read_text()) for r in (0, 1)
              if (two / f"rank{r}-{i}.json").exists()} for i in range(len(jobs))]
    assert all(len(s) == 2 for s in split), launch.stderr()
    reference = {n: json.loads((one / f"rank0-{i}.json").read_text()) for i, n in enumerate(names)}
    return reference, dict(zip(jobs, split))


@pytest.mark.parametrize("job", range(len(JOBS)), ids=[f"{n}-{m}" for n, m in JOBS])
def test_split_model_matches_one_process(results, job):
    reference, split = results
    name, mode = JOBS[job]
    ref = reference[name]
    for rank, got in split[JOBS[job]].items():
        diff = np.abs(np.array(got["logits"]) - np.array(ref["logits"])).max()
        assert diff < 1e-5, (rank, diff)
        assert got["generate"] == ref["generate"], rank
        assert [t["tokens"] for t in got["chat"]] == [t["tokens"] for t in ref["chat"]], rank
        assert got["chat"][1]["cached"] > 0  # the second turn reused the first turn's (split) cache


@pytest.mark.parametrize("mode", ["tensor-load", "pipeline-load"])
def test_each_rank_holds_about_half_the_weights(results, mode):
    reference, split = results
    whole = reference["wide"]["peak_after_load"]
    assert whole > 50e6  # the wide checkpoint: ~77 MB of float32, 97% of it in the decoder layers
    for rank, got in split[("wide", mode)].items():
        assert got["peak_after_load"] < 0.65 * whole, (rank, got["peak_after_load"] / whole)


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_generate_json_prints_one_answer(models, image_file):
    args = ["generate", "-m", models["qwen2"], "-i", image_file, "--prompt", "What is shown?", "--max-tokens", "8", "--json"]
    alone = cli(*args)
    assert alone.returncode == 0, alone.stderr
    launch = Launch(["cli.py", *args, "--distributed", "tensor"]).wait()
    lines = launch.stdout().splitlines()
    assert len(lines) == 1, launch.stdout() + launch.stderr()  # rank 0's answer only
    got, want = json.loads(lines[0]), json.loads(alone.stdout)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
    assert got["stats"]["ranks"] == 2


@pytest.mark.slow
def test_cli_chat_two_turns(models, image_file):
    args = ["chat", "-m", models["qwen2"], "-i", image_file, "--max-tokens", "6"]
    questions = "What is shown?\nAnd then?\n/exit\n"
    alone = cli(*args, stdin_text=questions)
    assert alone.returncode == 0, alone.stderr
    launch = Launch(["cli.py", *args, "--distributed", "pipeline"], stdin_text=questions).wait()
    assert launch.stdout() == alone.stdout, launch.stderr()
    assert alone.stdout.count("\n") == 2


def test_killed_rank_ends_the_launch(models):
    """Rank 0 waits for a question on stdin, rank 1 for rank 0: killing rank 1 ends both."""
    launch = Launch(["cli.py", "chat", "-m", models["qwen2"], "--distributed", "tensor"])
    deadline = time.time() + LAUNCH_TIMEOUT
    while len(launch.rank_pids()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # both ranks are past their imports and in the first exchange
    os.kill(launch.rank_pids()[1], signal.SIGKILL)
    killed = time.time()
    launch.wait(timeout=60)
    assert time.time() - killed < 30
    assert "rank 1" in launch.stderr()
    assert "Traceback" not in launch.stderr().replace("KeyboardInterrupt", "")


def test_pipeline_on_llama_fails_before_any_weight_is_read(models, tmp_path):
    broken = tmp_path / "llama"
    shutil.copytree(models["llama"], broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")  # reading any weight would fail differently
    launch = Launch(["cli.py", "generate", "-m", broken, "--prompt", "hi", "--distributed", "pipeline"])
    launch.wait_for("error:")
    launch.wait(timeout=30)  # every rank ends within 30 s of the error (start-up time aside)
    errors = [line for line in launch.stderr().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pipeline" in errors[0] and "llama" in errors[0], launch.stderr()
    assert "Traceback" not in launch.stderr() and launch.stdout() == ""


def test_distributed_without_a_launch_is_an_error(models):
    r = cli("generate", "-m", models["qwen2"], "--prompt", "hi", "--distributed", "tensor", timeout=60)
    assert r.returncode == 1 and "mlx.launch" in r.stderr and r.stderr.startswith("error:"), r.stderr
    r = cli("generate", "-m", models["qwen2"], "--prompt", "hi", "--distributed", "sideways", timeout=60)
    assert r.returncode == 1 and "tensor, pipeline" in r.stderr, r.stderr


# -- what cannot be split (no launch needed: the checks run before any weight is read) ---------


def test_unsplittable_checkpoints_are_named(models, tmp_path):
    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    from mlx_llava_next.config import LlavaNextConfig
    from mlx_llava_next.distributed import check_source, check_splittable
    from mlx_llava_next.errors import UnsupportedModelError
    from mlx_llava_next.loading import read_config

    def check(path, mode, n):
        raw = read_config(Path(path))
        check_splittable(LlavaNextConfig.from_dict(raw), raw, mode, n)

    check(models["qwen2"], "tensor", 2)
    check(models["qwen2"], "pipeline", 2)
    with pytest.raises(UnsupportedModelError, match="attention heads.*4 is not divisible by 3"):
        check(models["qwen2"], "tensor", 3)
    with pytest.raises(UnsupportedModelError, match="key/value heads.*2 is not divisible by 4"):
        check(models["qwen2"], "tensor", 4)
    with pytest.raises(UnsupportedModelError, match="pipeline.*llama"):
        check(models["llama"], "pipeline", 2)
    g64 = convert(models["qwen2"], tmp_path / "g64", dtype="float32", show_progress=False,
                  quantization=QuantConfig(bits=4, group_size=64))
    with pytest.raises(UnsupportedModelError, match="1 groups of 64"):
        check(g64, "tensor", 2)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError, match="GGUF"):
        check_source(gguf)


def test_share_round_trips_json_and_arrays():
    from mlx_llava_next.distributed import decode, encode

    obj = {"op": "turn", "text": "héllo", "images": [np.arange(24, dtype=np.uint8).reshape(2, 4, 3)],
           "opts": {"seed": 7, "temperature": 0.5}, "none": None}
    back = decode(encode(obj))
    assert back["text"] == "héllo" and back["opts"] == obj["opts"] and back["none"] is None
    np.testing.assert_array_equal(back["images"][0], obj["images"][0])
