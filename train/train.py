"""Train the demo model (the project's own LLaVA-NeXT `Model` + a training-only glyph head) with MLX, resumably."""

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import mlx_llava_next  # noqa: F401  (puts OpenBLAS under MLX before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.image_processing import ImageProcessor
from mlx_llava_next.model import Model
from mlx_llava_next.text_metrics import edit_distance

from . import data, export, fast

HEAD = "glyph_head."  # training-only parameters (never exported)
READER = None  # the line reader's settings (set in run(): --natural lines go through mlx_llava_next.lines)


class Trainee(nn.Module):
    """The runtime model plus the per-patch glyph classifier on the tower's feature-layer outputs."""

    def __init__(self, config: LlavaNextConfig):
        super().__init__()
        self.model = Model(config)
        self.glyph_head = nn.Linear(config.vision_config["hidden_size"], data.GLYPH_CLASSES)


def image_processor() -> ImageProcessor:
    return ImageProcessor.from_dict(json.loads(json.dumps({
        "size": {"shortest_edge": export.TILE}, "crop_size": {"height": export.TILE, "width": export.TILE},
        "image_grid_pinpoints": export.PINPOINTS, "image_mean": export.CLIP_MEAN, "image_std": export.CLIP_STD,
        "do_pad": True, "resample": 3,
    })))


def new_trainee(seed: int) -> Trainee:
    mx.random.seed(seed)
    t = Trainee(LlavaNextConfig.from_dict(export.model_config()))
    d = t.model.image_newline.shape[0]
    t.model.image_newline = mx.random.normal((d,)) / math.sqrt(d)
    t.model.vision_tower.embeddings.class_embedding = mx.random.normal((128,)) * 0.02
    emb = t.model.vision_tower.embeddings.position_embedding
    emb.weight = emb.weight * 0.02
    return t


# -- batches ------------------------------------------------------------------------------------


def batch_spec(step: int, rng, curriculum: int):
    """(width, length range) for a step: short lines first, longer ones phased in."""
    p = min(1.0, step / max(1, curriculum))
    probs = np.array([1.0, p, p * p]) / (1 + p + p * p)
    w = data.WIDTHS[int(rng.choice(3, p=probs))]
    hi = w // data.CELL_W
    lo = 1 if w == data.WIDTHS[0] else hi // 2 + 1
    return w, lo, hi


def make_batch(step: int, seed: int, curriculum: int, token_budget: int, proc: ImageProcessor, natural: float = 0.0):
    rng = np.random.default_rng([seed, step])
    w, lo, hi = batch_spec(step, rng, curriculum)
    n_img = proc.num_image_tokens((data.CELL_H, w), export.PATCH)
    B = max(2, token_budget // (n_img + hi + 3))
    lines = []
    for _ in range(B):
        line = data.normalized_line(rng, w, READER) if natural and rng.random() < natural else None
        lines.append(line or data.render_cells(data.random_text(rng, hi, lo), rng, width=w))
    return collate(lines, proc)


def collate(lines, proc: ImageProcessor):
    out = proc([l.image for l in lines])
    T = max(len(l.text) for l in lines) + 1
    inputs = np.full((len(lines), T), export.PAD, np.int32)  # "\n" then the text
    targets = np.full((len(lines), T), export.PAD, np.int32)  # the text then </s>
    for i, l in enumerate(lines):
        ids = export.text_ids(l.text)
        inputs[i, : len(ids) + 1] = [export.NEWLINE] + ids
        targets[i, : len(ids) + 1] = ids + [export.EOS]
    # glyph labels per grid tile patch: canvas rows 1-2 hold the line (8 px of padding above, below)
    width = lines[0].image.width
    tiles = width // export.TILE
    side = export.TILE // export.PATCH
    canvas = np.full((len(lines), side, width // export.PATCH), -1, np.int32)
    canvas[:, 1:3] = np.stack([l.glyphs for l in lines])
    labels = canvas.reshape(len(lines), side, tiles, side).transpose(0, 2, 1, 3).reshape(len(lines), tiles, side * side)
    return dict(pixels=out["pixel_values"], sizes=out["image_sizes"], inputs=inputs, targets=targets,
                labels=labels, texts=[l.text for l in lines])


# -- loss -----------------------------------------------------------------------------------------


def image_embeddings(model: Model, pixels, sizes):
    """(per-tile patch features of the feature layer [B, tiles, P, Dv], packed image features [B, N, D])."""
    B, n_tiles = pixels.shape[:2]
    feats = model.vision_tower(pixels.reshape(B * n_tiles, *pixels.shape[2:]).transpose(0, 2, 3, 1))[:, 1:]
    proj = model.multi_modal_projector(feats).reshape(B, n_tiles, feats.shape[1], -1)
    packed = mx.stack([model.pack(proj[b], tuple(int(v) for v in sizes[b])) for b in range(B)])
    return feats.reshape(B, n_tiles, feats.shape[1], -1), packed


def loss_fn(trainee: Trainee, pixels, sizes, inputs, targets, labels, glyph_weight: float):
    model = trainee.model
    feats, packed = image_embeddings(model, pixels, sizes)
    embed = model.language_model.model.embed_tokens
    B = inputs.shape[0]
    bos = embed(mx.full((B, 1), export.BOS, dtype=mx.int32))
    h = mx.concatenate([bos, packed, embed(inputs)], axis=1)
    logits = model.language_model(None, input_embeddings=h)[:, 1 + packed.shape[1]:]
    mask = (targets != export.PAD).astype(mx.float32)
    lm = (fast.cross_entropy(logits, targets) * mask).sum() / mask.sum()
    glyph_logits = trainee.glyph_head(feats[:, 1:])
    gmask = (labels >= 0).astype(mx.float32)
    gl = (fast.cross_entropy(glyph_logits, mx.maximum(labels, 0)) * gmask).sum() / mx.maximum(gmask.sum(), 1)
    return lm + glyph_weight * gl, (lm, gl)


# -- greedy reading (held-out CER while training) --------------------------------------------------


def greedy_read(model: Model, pixels, sizes, max_chars: int):
    """Batched greedy transcription of same-size line images (the chat template's prompt)."""
    from mlx_lm.models.cache import make_prompt_cache

    _, packed = image_embeddings(model, pixels, sizes)
    embed = model.language_model.model.embed_tokens
    B = packed.shape[0]
    h = mx.concatenate([embed(mx.full((B, 1), export.BOS, dtype=mx.int32)), packed,
                        embed(mx.full((B, 1), export.NEWLINE, dtype=mx.int32))], axis=1)
    cache = make_prompt_cache(model.language_model)
    logits = model.language_model(None, cache=cache, input_embeddings=h)[:, -1]
    out = []
    for _ in range(max_chars + 1):
        tok = mx.argmax(logits, axis=-1)
        out.append(np.array(tok))
        if all((np.stack(out) == export.EOS).any(0)):
            break
        logits = model.language_model(tok[:, None].astype(mx.int32), cache=cache)[:, -1]
    toks = np.stack(out, 1)
    texts = []
    for row in toks:
        s = []
        for t in row:
            if t == export.EOS:
                break
            s.append(export.VOCAB[t] if 4 <= t < export.IMAGE else "")
        texts.append("".join(s))
    return texts


def heldout_lines(seed: int, n: int):
    """Held-out lines of the training renderer, from another seed (grouped by width)."""
    rng = np.random.default_rng([seed, 10**6])
    groups = {}
    for _ in range(n):
        w = data.WIDTHS[int(rng.integers(3))]
        hi = w // data.CELL_W
        lo = 1 if w == data.WIDTHS[0] else hi // 2 + 1
        groups.setdefault(w, []).append(data.render_cells(data.random_text(rng, hi, lo), rng, width=w))
    return groups


def evaluate(model: Model, groups, proc) -> dict:
    errors = chars = exact = n = 0
    for w, lines in groups.items():
        b = collate(lines, proc)
        got = greedy_read(model, mx.array(b["pixels"]), b["sizes"], w // data.CELL_W)
        for g, t in zip(got, b["texts"]):
            errors += edit_distance(g, t)
            chars += len(t)
            exact += g == t
            n += 1
    return {"cer": errors / max(1, chars), "exact": exact / max(1, n)}


# -- checkpoints -------------------------------------------------------------------------------------


def save_checkpoint(path: Path, trainee: Trainee, opt, step: int, args: dict, log: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    params = dict(tree_flatten(trainee.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"),
                        {k[len("model."):]: v for k, v in params.items() if k.startswith("model.")})
    mx.save_safetensors(str(tmp / "glyph_head.safetensors"),
                        {k: v for k, v in params.items() if k.startswith(HEAD)})
    state = dict(tree_flatten(opt.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), {k: v for k, v in state.items() if isinstance(v, mx.array)})
    (tmp / "state.json").write_text(json.dumps({"step": step, "args": args, "log": log}, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def load_init(trainee: Trainee, init: Path) -> None:
    """Start from an exported model directory (e.g. models/demo): the glyph head starts fresh."""
    from mlx_llava_next.loading import load_model

    model, _ = load_model(init)
    trainee.model.update(model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="checkpoint directory (resumed from when it exists)")
    p.add_argument("--init", help="start from an exported model directory, e.g. models/demo")
    p.add_argument("--steps", type=int, default=3000, help="length of the schedule (total steps)")
    p.add_argument("--stop-at", type=int, help="stop (after saving) at this step; rerun to resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=3000, help="language-model tokens a batch")
    p.add_argument("--curriculum", type=int, default=600, help="steps over which long lines are phased in")
    p.add_argument("--lr", type=float, default=2e-3, help="decoder learning rate")
    p.add_argument("--vision-lr", type=float, default=3e-3, help="tower, projector and glyph head")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--glyph-weight", type=float, default=1.0)
    p.add_argument("--natural", type=float, default=0.0,
                   help="fraction of lines typeset naturally (16-36 px) and normalised by the runtime's line reader")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-lines", type=int, default=60)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--export", help="also export the model (llava-hf) here at every save")
    p.add_argument("--no-fast", action="store_true", help="MLX's own activations (slower on Linux CPUs)")
    args = p.parse_args(argv)
    with contextlib.nullcontext() if args.no_fast else fast.installed():
        return run(args)


def run(args):
    global READER
    from mlx_llava_next.lines import ReaderSettings

    READER = ReaderSettings.from_dict(export.READER)
    out = Path(args.out)
    proc = image_processor()
    trainee = new_trainee(args.seed)
    if args.init and not (out / "state.json").exists():
        load_init(trainee, Path(args.init))

    def schedule(lr):
        end = max(1, args.steps - args.warmup)
        return optim.join_schedules([optim.linear_schedule(lr * 0.01, lr, args.warmup),
                                     optim.cosine_decay(lr, end, lr * 0.1)], [args.warmup])

    opt = optim.MultiOptimizer(
        [optim.AdamW(schedule(args.vision_lr), weight_decay=0.01), optim.AdamW(schedule(args.lr), weight_decay=0.01)],
        [lambda path, _: not path.startswith("model.language_model.")],
    )
    step, log = 0, []
    if (out / "state.json").exists():
        st = json.loads((out / "state.json").read_text())
        step, log = st["step"], st["log"]
        weights = dict(mx.load(str(out / "model.safetensors")))
        weights = {"model." + k: v for k, v in weights.items()}
        weights.update(mx.load(str(out / "glyph_head.safetensors")))
        trainee.load_weights(list(weights.items()))
        opt.init(trainee.trainable_parameters())
        saved = mx.load(str(out / "optimizer.safetensors"))
        opt.state = tree_unflatten(list({**dict(tree_flatten(opt.state)), **saved}.items()))
        print(f"resumed {out} at step {step}", flush=True)
    mx.eval(trainee.parameters())
    groups = heldout_lines(args.seed + 1, args.eval_lines)
    grad_fn = nn.value_and_grad(trainee, loss_fn)

    def train_step(b):
        (loss, (lm, gl)), grads = grad_fn(trainee, mx.array(b["pixels"]), b["sizes"], mx.array(b["inputs"]),
                                          mx.array(b["targets"]), mx.array(b["labels"]), args.glyph_weight)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(trainee, grads)
        mx.eval(trainee.parameters(), opt.state, loss, lm, gl)
        return float(lm), float(gl)

    started = time.time() - (log[-1]["time"] if log else 0.0)
    stop = min(args.steps, args.stop_at or args.steps)
    while step < stop:
        b = make_batch(step, args.seed, args.curriculum, args.tokens, proc, args.natural)
        lm, gl = train_step(b)
        step += 1
        entry = {"step": step, "time": round(time.time() - started, 1), "lm_loss": round(lm, 4), "glyph_loss": round(gl, 4)}
        if step % args.eval_every == 0 or step == args.steps:
            trainee.model.eval()
            entry.update(evaluate(trainee.model, groups, proc))
        if step % 20 == 0 or "cer" in entry:
            print(json.dumps(entry), flush=True)
            log.append(entry)
        if step % args.save_every == 0 or step == stop:
            save_checkpoint(out, trainee, opt, step, vars(args), log)
            if args.export:
                weights = {k[len("model."):]: v for k, v in tree_flatten(trainee.parameters()) if k.startswith("model.")}
                export.export(weights, args.export)
    return log


if __name__ == "__main__":
    main()
