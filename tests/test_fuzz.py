"""Deterministic fuzzing (cases in fuzz_cases.py): every generated bad input ends in one of our
errors or is accepted; never a crash, hang, out-of-memory, partial output or a corrupt file
silently accepted. Cases run many to a worker subprocess under a memory limit (RLIMIT_AS) and a
per-case timeout; a worker that dies or stalls marks its case and is restarted.

The quick slice runs by default; `pytest -m fuzz tests/test_fuzz.py` runs the full corpus."""

import collections
import json
import os
import resource
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz_cases import KINDS

HERE = Path(__file__).resolve().parent
MEMORY_LIMIT = 8 << 30  # address space: MLX and numpy reserve some; a runaway allocation fails
CASE_TIMEOUT = 20.0
FAILURES = ("crash", "hang", "oom", "partial", "silent")


class Worker:
    def __init__(self, root: Path):
        def limits():
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            os.nice(5)

        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fuzz_cases.py"), "worker", str(root)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, preexec_fn=limits, env=env, cwd=HERE.parent)
        assert json.loads(self._line(120.0) or "{}").get("ready"), "fuzz worker did not start"

    def _line(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def run(self, kind: str, seed: int) -> dict:
        self.proc.stdin.write(f"{kind} {seed}\n")
        self.proc.stdin.flush()
        line = self._line(CASE_TIMEOUT)
        if line:
            return json.loads(line)
        if line is None:
            self.close()
            return {"outcome": "hang", "detail": f"no answer in {CASE_TIMEOUT} s"}
        code = self.proc.wait()
        return {"outcome": "oom" if code in (-9, -6) else "crash", "detail": f"worker died (exit {code})"}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def fuzz(cases, root: Path):
    outcomes, failures = collections.Counter(), []
    worker = Worker(root)
    try:
        for kind, seed in cases:
            result = worker.run(kind, seed)
            outcomes[result["outcome"]] += 1
            if result["outcome"] in FAILURES:
                failures.append((kind, seed, result["outcome"], result.get("detail", "")))
            if worker.proc.poll() is not None:
                worker = Worker(root)
    finally:
        worker.close()
    return outcomes, failures


def corpus(per_kind: int, start: int = 0):
    return [(kind, seed) for seed in range(start, start + per_kind) for kind in KINDS]


def report(outcomes, failures, elapsed):
    summary = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
    print(f"\nfuzz: {sum(outcomes.values())} cases in {elapsed:.1f} s: {summary}")
    return "\n".join(f"{k} seed {s}: {o}: {d}" for k, s, o, d in failures[:20])


def test_fuzz_quick_slice(tmp_path):
    started = time.time()
    outcomes, failures = fuzz(corpus(24), tmp_path)  # 216 cases
    details = report(outcomes, failures, time.time() - started)
    assert not failures, details
    assert outcomes["clean"] > 100 and outcomes["accepted"] > 25  # both kinds of input are exercised


@pytest.mark.fuzz
def test_fuzz_full(tmp_path, request):
    if "fuzz" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full corpus runs with -m fuzz")
    started = time.time()
    outcomes, failures = fuzz(corpus(160, start=24), tmp_path)  # 1,440 more cases
    details = report(outcomes, failures, time.time() - started)
    assert not failures, details
