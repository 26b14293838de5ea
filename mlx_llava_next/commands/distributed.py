"""`generate`, `chat` and `ocr` with --distributed: rank 0 reads and writes, every rank computes.

Every rank runs the same command line (mlx.launch starts them). Rank 0 alone reads the images,
stdin and files and alone writes stdout and files; it sends each piece of work (the decoded
images as pixel arrays, the question, the sampling seed) to the other ranks with
`distributed.share`, and every rank then makes the same library call on the same inputs, so
their collective operations line up. The other ranks print nothing but their own load errors.
After each answer the ranks compare a digest of the tokens they produced.
"""

import contextlib
import random
import sys
from typing import List, Optional

import typer

from ..errors import LlavaNextError
from .common import fail


class _Rank:
    """This process's place in the launch and the messages it sends or receives."""

    def __init__(self, mode: str):
        from .. import distributed

        self.d = distributed
        self.mode = mode
        self.world = distributed.group(mode)
        self.rank = self.world.rank()
        self.leader = self.rank == 0

    def share(self, obj=None):
        return self.d.share(obj if self.leader else None, self.world)

    def agree(self, tokens) -> None:
        """Every rank produced rank 0's tokens (else their shards were fed different inputs)."""
        mine = self.d.digest(list(tokens))
        if self.share(mine) != mine:
            raise self.d.DistributedError(
                f"rank {self.rank} generated other tokens than rank 0: the ranks do not run the same model, "
                f"inputs or software"
            )


@contextlib.contextmanager
def _errors(rank: _Rank, own: bool = False):
    """Rank 0 reports; the other ranks exit quietly on errors rank 0 reports too (they mirror its work)
    but name themselves, with status 1, on their own (load, lost connection, a digest that differs)."""
    from ..distributed import DistributedError, lost_connection

    leader = rank.leader or own  # own: a failure of this rank alone, which every rank reports
    prefix = "" if rank.leader else f"rank {rank.rank}: "
    try:
        yield
    except DistributedError as e:
        fail(prefix + str(e))
    except RuntimeError as e:
        message = lost_connection(e)
        if message is None:
            raise
        fail(prefix + message)
    except LlavaNextError as e:
        if leader:
            fail(prefix + str(e))
        raise typer.Exit(0)  # not 1: mlx.launch would kill rank 0 before it prints the error
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: rank 0 alone says so
        if rank.leader:
            raise
        raise typer.Exit(130)


def _start(mode: str, model_name: str, read_inputs):
    """Join the launch, let rank 0 check everything and read its inputs, load this rank's part.

    Returns (rank, model, processor, inputs shared by rank 0)."""
    from .. import distributed
    from ..config import LlavaNextConfig
    from ..loading import load, read_config, resolve_model_path
    from .generate import _one_line, resolve_model_arg, resolve_path

    rank = _Rank(mode)
    message = None
    if rank.leader:
        try:
            path = resolve_path(model_name)
            distributed.check_source(path)
            raw = read_config(path)
            distributed.check_splittable(LlavaNextConfig.from_dict(raw), raw, mode, rank.world.size())
            message = {"inputs": read_inputs(), "environment": distributed.environment_digest(path)}
        except (LlavaNextError, OSError) as e:
            message = {"error": _one_line(e)}
    message = rank.share(message)
    with _errors(rank):
        if "error" in message:
            raise LlavaNextError(message["error"])
    with _errors(rank, own=True):  # from here a rank's failure is its own: it names itself
        try:
            path = resolve_model_path(resolve_model_arg(model_name))
            if not rank.leader and distributed.environment_digest(path) != message["environment"]:
                raise distributed.DistributedError(
                    f"{path} (its config, tokenizer or processor files) or the mlx / mlx-lm / mlx-llava-next "
                    f"versions differ from rank 0's: every host needs the same model files and software"
                )
            model, processor = load(path, distributed=mode)
        except LlavaNextError as e:
            raise distributed.DistributedError(str(e)) from None
    return rank, model, processor, message["inputs"]


def _pixels(images) -> list:
    """Decoded images as uint8 arrays: what rank 0 sends; PIL images again on every rank."""
    import numpy as np

    return [np.asarray(img) for img in images]


def _images(arrays) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in arrays]


def _seeded(opts: dict) -> dict:
    """Sampling at temperature > 0 draws the same tokens on every rank only from one seed."""
    if opts.get("seed") is None and opts.get("temperature", 0) > 0:
        return dict(opts, seed=random.randrange(2**31))
    return opts


# -- generate ---------------------------------------------------------------------------------


def generate(mode, model_name, prompt, image_paths: List[str], system, raw, opts, as_json, verbose):
    from . import generate as cmd

    def read_inputs():
        return {"images": _pixels([cmd._checked_image(p) for p in image_paths]), "opts": _seeded(opts)}

    rank, m, processor, inputs = _start(mode, model_name, read_inputs)
    images, opts = _images(inputs["images"]), inputs["opts"]
    with _errors(rank):
        cmd.answer(m, processor, model_name, prompt, images, system, raw, opts, as_json, verbose,
                   leader=rank.leader, agree=rank.agree, extra_stats={"ranks": rank.world.size()})


# -- chat -------------------------------------------------------------------------------------


def chat(mode, model_name, image_paths: List[str], system, resume, opts, verbose):
    """The chat loop of commands/generate.py, one message to the other ranks per turn. Ctrl-C ends
    the launch (mlx.launch passes it to every rank); /save writes transcripts only (each rank
    holds a part of the KV cache, so a .safetensors session is not one file)."""
    from ..generate import ChatSession
    from . import generate as cmd

    if resume is not None:
        fail("--resume is not available with --distributed: each rank holds only its part of the KV cache")

    def read_inputs():
        return {"images": _pixels([cmd._checked_image(p) for p in image_paths]), "opts": _seeded(opts)}

    rank, m, processor, inputs = _start(mode, model_name, read_inputs)
    pending = _images(inputs["images"])
    reader = cmd.line_reader(model_name)
    session = ChatSession(m, processor, system=system, **inputs["opts"])
    failed = 0
    while True:
        with _errors(rank):
            work = rank.share(_next_turn(session, pending) if rank.leader else None)
        if work["op"] == "exit":
            break
        if work["op"] == "reset":
            session.reset()
            pending = []
            continue
        images = _images(work["images"])
        with _errors(rank):
            try:
                if images and reader is not None:
                    text = cmd.read_lines(m, processor, reader, images)
                    tokens = [text]
                    if rank.leader:
                        print(text, flush=True)
                else:
                    tokens = []
                    for r in session.stream(work["text"], images):
                        tokens.append(r.token)
                        if rank.leader:
                            print(r.text, end="", flush=True)
                    if rank.leader:
                        print(flush=True)
                        if verbose:
                            typer.echo(cmd.stats_line(r), err=True)
            except LlavaNextError as e:  # the same on every rank: the conversation goes on
                failed += 1
                tokens = [type(e).__name__]
                if rank.leader:
                    typer.echo(f"error: {cmd._one_line(e)}", err=True)
            rank.agree(tokens)
        pending = []
    if failed and rank.leader and not sys.stdin.isatty():
        typer.echo(f"chat: {failed} error(s)", err=True)
    if failed and not sys.stdin.isatty():
        raise typer.Exit(1)


def _next_turn(session, pending: list) -> dict:
    """Rank 0: read lines until one is work for every rank (a question, /reset, the end)."""
    from . import generate as cmd

    interactive = sys.stdin.isatty()
    while True:
        line = cmd._read_line(interactive)
        if line is None:
            return {"op": "exit"}
        line = line.strip()
        if not line:
            continue
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return {"op": "exit"}
        if name == "/reset":
            typer.echo("[conversation cleared]", err=True)
            pending.clear()
            return {"op": "reset"}
        if name == "/save" and arg.strip().endswith(".safetensors"):
            typer.echo("error: /save FILE.safetensors is not available with --distributed (each rank holds "
                       "only its part of the KV cache); /save FILE writes the transcript", err=True)
            continue
        if line.startswith("/"):
            cmd._chat_command(line, session, pending)  # /image, /save FILE, /help: rank 0 only
            pending[:] = [p[1] if isinstance(p, tuple) else p for p in pending]
            continue
        images, pending[:] = list(pending), []
        return {"op": "turn", "text": line, "images": _pixels(images)}


# -- ocr --------------------------------------------------------------------------------------


def ocr(mode, model_name, paths, out, force, prompt, max_tokens):
    """`ocr` with rank 0 choosing the jobs, reading each image and writing each .txt."""
    from ..chat_templates import family
    from ..generate import generate as generate_answer
    from . import generate as cmd

    errors: List[str] = []
    summary = {}

    def read_inputs():
        files = cmd._image_files(paths, errors)
        jobs, skipped, targets = [], 0, {}
        for f in files:
            target = (out or f.parent) / f"{f.stem}.txt"
            if target in targets:
                errors.append(f"{f}: its output {target} is also the output of {targets[target]}; OCR them separately")
                continue
            targets[target] = f
            if target.exists() and not force:
                skipped += 1
            else:
                jobs.append((f, target))
        summary.update(jobs=jobs, skipped=skipped)
        return {"jobs": len(jobs)}

    rank, m, processor, inputs = _start(mode, model_name, read_inputs)
    reader = cmd.line_reader(model_name)
    instruction = prompt or cmd.OCR_PROMPTS.get(family(m.config, processor.hf_tokenizer), cmd.OCR_PROMPTS["default"])
    if rank.leader and out is not None:
        out.mkdir(parents=True, exist_ok=True)
    written = 0
    jobs = summary.get("jobs", [None] * inputs["jobs"])
    for job in jobs:
        with _errors(rank):
            image = None
            if rank.leader:
                try:
                    image = _pixels([cmd._checked_image(job[0])])
                except LlavaNextError as e:
                    errors.append(f"{job[0]}: {cmd._one_line(e)}")
            image = rank.share(image)
            if image is None:
                continue
            try:
                if reader is not None:
                    text = cmd.read_lines(m, processor, reader, _images(image))
                    rank.agree([text])
                else:
                    result = generate_answer(m, processor, instruction, images=_images(image), max_tokens=max_tokens)
                    text = result.text
                    rank.agree(result.tokens)
            except LlavaNextError as e:
                if rank.leader:
                    message = cmd._one_line(e)
                    errors.append(message if message.startswith(str(job[0])) else f"{job[0]}: {message}")
                continue
            if rank.leader:
                try:
                    from ..outputs import write_text_atomic
                except ImportError:
                    write_text_atomic = cmd._write_atomic
                try:
                    write_text_atomic(job[1], text.strip() + "\n")
                except (LlavaNextError, OSError) as e:
                    errors.append(cmd._one_line(e))
                    continue
                written += 1
    if not rank.leader:
        return
    for message in errors:
        typer.echo(f"error: {message}", err=True)
    skipped = summary.get("skipped", 0)
    line = f"ocr: {written} written, {skipped} skipped" + (" (already done; --force redoes them)" if skipped else "")
    if errors:
        line += f", {len(errors)} failed"
    typer.echo(line + f" ({rank.world.size()} ranks, {mode})", err=True)
    if errors:
        raise typer.Exit(1)
