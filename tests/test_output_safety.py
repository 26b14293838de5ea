"""Outputs never destroy user files: `--force` replaces only a directory we wrote (marker file),
never the source, a file or an unrelated directory; bad targets and full disks give one `error:`
line and no partial output; outputs get the usual permissions. Oracles: the file system itself
(what exists afterwards, its bytes and modes) and the kernel's EFBIG under RLIMIT_FSIZE."""

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from mlx_llava_next.outputs import MARKER

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def digest(path: Path) -> dict:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def one_error(code, stderr, *words):
    assert code == 1, stderr
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], stderr


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture
def src(tiny_checkpoint):
    return tiny_checkpoint("llama").path


def convert_cli(src, out, *extra):
    return cli("convert", src, "--out", out, "--no-progress", *extra)


# -- --force replaces only our own outputs --------------------------------------------------


def test_force_refuses_unrelated_directory_and_file(src, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    before = digest(mine)
    one_error(*convert_cli(src, mine, "--force")[::2], "not an output of mlx-llava-next")
    assert digest(mine) == before
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    one_error(*convert_cli(src, file, "--force")[::2], "is a file")
    assert file.read_text() == "keep me"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("how", ["same", "symlink", "relative", "parent"])
def test_force_never_touches_the_source(src, tmp_path, how, monkeypatch):
    before = digest(src)
    if how == "same":
        out = src
    elif how == "symlink":
        out = tmp_path / "link"
        out.symlink_to(src)
    elif how == "relative":
        monkeypatch.chdir(src.parent)
        out = Path("..") / src.parent.name / src.name
    else:
        out = src.parent
    (src / MARKER).write_text("")  # even a source that looks like our output is refused
    try:
        one_error(*convert_cli(src, out, "--force")[::2], "source")
    finally:
        (src / MARKER).unlink()
    assert digest(src) == before


def test_force_replaces_our_output_with_normal_permissions(src, tmp_path):
    out = tmp_path / "model"
    previous = os.umask(0o022)
    try:
        code, _, stderr = convert_cli(src, out)
        assert code == 0, stderr
        assert (out / MARKER).is_file()
        (out / "stale.bin").write_bytes(b"x")
        code, _, stderr = convert_cli(src, out, "--force")
        assert code == 0, stderr
    finally:
        os.umask(previous)
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert not leftovers(tmp_path)


@pytest.fixture(scope="module")
def demo_weights():
    """The demo model's parameters (our names) from a fresh, untrained trainee."""
    from mlx.utils import tree_flatten

    from train import train

    params = dict(tree_flatten(train.new_trainee(0).parameters()))
    return {k[len("model."):]: v for k, v in params.items() if k.startswith("model.")}


def test_demo_export_permissions_follow_the_umask_and_replace_only_its_output(demo_weights, tmp_path):
    """train/export.py writes like `convert`: the umask decides the modes (0750/0640 under 027,
    where it forced 0755 before), an earlier export is replaced, anything else is refused
    untouched, and nothing is left beside the output."""
    from train import export

    from mlx_llava_next.errors import OutputError

    out = tmp_path / "demo"
    previous = os.umask(0o027)
    try:
        export.export(demo_weights, out)
        (out / "stale.bin").write_bytes(b"x")
        export.export(demo_weights, out)  # an earlier export (it holds the marker): replaced
    finally:
        os.umask(previous)
    assert (out / MARKER).is_file() and not (out / "stale.bin").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}
    from mlx_llava_next import load

    load(out)  # still a loadable model directory
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    before = digest(mine)
    with pytest.raises(OutputError, match="not an output of mlx-llava-next"):
        export.export(demo_weights, mine)
    assert digest(mine) == before
    with pytest.raises(OutputError, match="source"):
        export.export(demo_weights, out, sources=[out / "model.safetensors"])
    assert not leftovers(tmp_path) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_gguf_force_refuses_unrelated_directory(src, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("a")
    one_error(*cli("convert", src, "--gguf", "--out", mine, "--force", "--no-progress")[::2], "not an output")
    assert (mine / "a.txt").read_text() == "a"


# -- bad targets: one error line ----------------------------------------------------------------


def bad_targets(tmp_path: Path) -> dict:
    file = tmp_path / "file"
    file.write_text("x")
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    if os.geteuid() == 0:
        read_only = Path("/proc/sys/mlx-llava-next-test/out")  # root ignores mode bits
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        read_only = ro / "nested" / "out"
    return {
        "under a file": file / "out",
        "dangling symlink": dangling,
        "symlink loop": loop,
        "read-only": read_only,
        "name too long": tmp_path / ("n" * 300),
    }


@pytest.mark.parametrize("kind", ["under a file", "dangling symlink", "symlink loop", "read-only", "name too long"])
def test_convert_bad_target_one_error(src, tmp_path, kind):
    target = bad_targets(tmp_path)[kind]
    one_error(*convert_cli(src, target)[::2], "")
    assert not leftovers(tmp_path)


def test_ocr_out_is_an_existing_file(tmp_path):
    image = REPO / "examples" / "scan.png"
    out = tmp_path / "texts"
    out.write_text("not a folder")
    one_error(*cli("ocr", image, "--out", out, "--model", tmp_path / "no-model")[::2], "not a directory")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("kind", ["under a file", "dangling symlink", "symlink loop", "read-only", "name too long"])
def test_chat_save_bad_target_one_error(tiny_checkpoint, tmp_path, kind):
    target = bad_targets(tmp_path)[kind]
    from mlx_llava_next.generate import ChatSession
    from mlx_llava_next.errors import OutputError
    from mlx_llava_next.outputs import write_text_atomic

    model, processor = tiny_checkpoint("llama").load()
    session = ChatSession(model, processor, max_tokens=2)
    with pytest.raises(OutputError):
        session.save(target)
    with pytest.raises(OutputError):
        write_text_atomic(target, session.transcript())
    assert not leftovers(tmp_path)


FULL_DISK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from cli import app
sys.argv = ["cli.py"] + sys.argv[1:]
app()
"""


@pytest.mark.slow  # a fresh interpreter and a whole conversion each (30 s on a busy 2-core machine)
@pytest.mark.parametrize("extra", [(), ("--gguf",)])
def test_full_disk_leaves_no_partial_output(src, tmp_path, extra):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK.format(limit=20_000), "convert", str(src), "--out", str(out),
         "--no-progress", *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    one_error(proc.returncode, proc.stderr, "File too large")
    assert not out.exists() and not leftovers(tmp_path)
