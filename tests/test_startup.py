"""Start-up cost: `import mlx_llava_next` and `cli.py --help` import no heavy module (mlx, mlx-lm,
transformers, torch, numpy, PIL, rich) until a command, a model or a tokenizer needs one.

Each check runs in a fresh interpreter and reads its `sys.modules`, which does not depend on how
busy the machine is; the one timing check has a generous bound for a shared machine."""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("mlx", "mlx_lm", "transformers", "torch", "numpy", "PIL", "rich", "huggingface_hub", "safetensors")


def _loaded_after(code: str) -> list:
    """The heavy top-level packages in `sys.modules` after running `code` in a new interpreter."""
    probe = (
        f"import sys, json\n{code}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_package_loads_no_heavy_module():
    assert _loaded_after("import mlx_llava_next") == []
    # the error types are there without anything heavy
    assert _loaded_after("from mlx_llava_next import LlavaNextError, ImageError, PromptError") == []


def test_bench_parent_loads_no_runtime():
    # `cli.py bench` probes the machine and derives limits in the parent; the runtimes (and their
    # imports: mlx-lm, transformers, torch) belong to the worker processes
    code = ("from benchmarks import bench, shapes\n"
            "assert shapes.kv_cache_bytes(shapes.config('mistral-7b'), 1) == 2 * 32 * 8 * 128 * 4")
    assert _loaded_after(code) == []


def test_public_names_load_on_first_use():
    out = subprocess.run([sys.executable, "-c", (
        "import sys, mlx_llava_next as m\n"
        "assert 'mlx_lm' not in sys.modules\n"
        "from mlx_llava_next import generate, stream_generate, ChatSession, load\n"
        "import mlx_llava_next.generate as g\n"
        "import mlx_llava_next.loading\n"
        "mod = sys.modules['mlx_llava_next.generate']\n"
        "assert callable(generate) and generate is mod.generate and g is mod.generate and m.generate is mod.generate\n"
        "assert stream_generate is mod.stream_generate and ChatSession is mod.ChatSession\n"
        "assert load is sys.modules['mlx_llava_next.loading'].load\n"
        "assert set(m.__all__) <= set(dir(m))\n"
        "try:\n    m.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
        "print('ok')"
    )], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _help_of_every_command() -> str:
    """Python that imports cli.py as a module and prints the help of the group and of each command."""
    return (
        "import runpy, typer.main\n"
        "app = runpy.run_path('cli.py')['app']\n"
        "group = typer.main.get_command(app)\n"
        "names = list(group.commands)\n"
        "assert {'chat', 'generate', 'ocr', 'info', 'convert', 'quantize', 'parity', 'bench'} <= set(names), names\n"
        "for args in [['--help']] + [[name, '--help'] for name in names]:\n"
        "    try:\n"
        "        group.main(args, prog_name='cli.py')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
    )


def test_cli_help_loads_no_heavy_module():
    # every command module's top-level imports, and typer building each command's options
    assert _loaded_after(_help_of_every_command()) == []


def test_cli_help_is_fast():
    # The budget is 0.5 s (README); the bound here leaves room for a busy shared machine, the
    # module check above is the precise guard.
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
        assert out.returncode == 0 and "Commands" in out.stdout, out.stderr
    assert best < 2.0, f"cli.py --help took {best:.2f} s"
