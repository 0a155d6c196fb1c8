"""Fine-tune a student's head (its refinement blocks and output conv) on cached features.

  python scripts/finetune_head.py --weights student_ivf --data ../shared/data \
      --train msrs/train --steps 800 --lr 2e-4 --out student_head.msgpack --save-every 200
  # then, the step chosen by validation remade as a file with its record:
  python scripts/finetune_head.py ... (the same) --stop-after 400 --out F --record F.json

Everything before the head is frozen, so its output (the last decoder block's, the head's
input) is computed once per training frame, at full size, and kept in memory as float16;
each step then runs the head alone on random crops of those features. On the 2-core CPU this
is about 4x cheaper per crop than a whole-network step, which is what makes several hundred
steps affordable there (RESULTS.md, the budget table's head fine-tune row). Crops are not
flipped: features of a flipped frame are not the flipped features.

--part level1 trains the whole full-resolution level instead: feature_fusion_1, the
decoder_level1 blocks and the head, on cached up2_1 output and level-1 outputs of both
encoders (concatenated: 3 x dim channels; about 2x the head's step time).

Training frames: the first 95 % (by name) of each --train split, as the trainer's default
validation split leaves them. Loss: the official fusion loss with the task table's `default`
weights. Optimiser: AdamW (weight decay 1e-4), global-norm clip 1.0, cosine from --lr to 1e-7
over --steps. The output is a weight file like `python -m dtpf_jax.export` writes (the frozen
params unchanged, the part's trained), with --save-every files beside it (`<out
stem>_step<N>.msgpack`) to choose from.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtpf_jax import checkpoint, datasets, images, infer, losses, networks, tiling
from dtpf_jax.attention import AttentionFusion, TransformerBlock
from dtpf_jax.blocks import Conv3x3

log = logging.getLogger("finetune_head")


PARTS = ("head", "level1")


def head_names(cfg) -> list[str]:
    return [f"refinement_{i}" for i in range(cfg.num_refinement_blocks)] + ["output"]


def part_names(cfg, part: str = "head") -> list[str]:
    """The top-level param names that --part trains."""
    if part == "head":
        return head_names(cfg)
    if part == "level1":
        blocks = [f"decoder_level1_{i}" for i in range(cfg.num_blocks[0])]
        return ["feature_fusion_1", *blocks, *head_names(cfg)]
    raise ValueError(f"part {part!r} is not one of {PARTS}")


def _level1_block(c, name: str) -> TransformerBlock:
    return TransformerBlock(
        c.channel_heads[0],
        c.spatial_heads[0],
        c.spatial_dim_head,
        c.ffn_expansion_factor,
        c.window_size,
        c.overlap_ratio,
        name=name,
    )


class Head(nn.Module):
    """FusionNet's last part: refinement blocks, 3x3 output conv, global residual on vis."""

    config: object

    @nn.compact
    def __call__(self, x, vis):
        c = self.config
        for name in head_names(c)[:-1]:
            x = _level1_block(c, name)(x)
        return Conv3x3(c.out_ch, name="output")(x) + vis


class Level1(nn.Module):
    """FusionNet's full-resolution level and head, on [up2_1 | encoder_A | encoder_B] level 1."""

    config: object

    @nn.compact
    def __call__(self, f, vis):
        c = self.config
        up, fa, fb = jnp.split(f, 3, axis=-1)
        fused = AttentionFusion(
            c.fusion_channel_heads,
            c.fusion_spatial_heads,
            c.fusion_spatial_dim_head,
            c.window_size,
            c.overlap_ratio,
            name="feature_fusion_1",
        )(fa, fb)
        x = jnp.concatenate([up, fused], -1)
        for name in part_names(c, "level1")[1:-1]:  # decoder_level1_*, then refinement_*
            x = _level1_block(c, name)(x)
        return Conv3x3(c.out_ch, name="output")(x) + vis


TAILS = {"head": Head, "level1": Level1}


def make_feature_fn(cfg, part: str = "head"):
    """Jitted (params, vis, ir) -> the part's input: for the head the last level-1 decoder
    block's output; for level1 up2_1's output and both encoders' level-1 outputs, concatenated."""
    net = networks.build_model(cfg)
    wanted = {
        "head": [f"decoder_level1_{cfg.num_blocks[0] - 1}"],
        "level1": ["up2_1", "encoder_A", "encoder_B"],
    }[part]

    def features(params, vis, ir):
        _, state = net.apply(
            {"params": params},
            vis,
            ir,
            capture_intermediates=lambda mdl, method: mdl.name in wanted and method == "__call__",
            mutable=["intermediates"],
        )
        got = [state["intermediates"][n]["__call__"][0] for n in wanted]
        got = [g[0] if isinstance(g, (list, tuple)) else g for g in got]  # an encoder's level 1
        return jnp.concatenate(got, -1)

    return jax.jit(features)


def cache_features(model: infer.Model, pairs: list[datasets.Pair], part: str = "head"):
    """Per frame: float16 features (H, W, C), vis (H, W, 3) and ir (H, W, 1) in [0, 1]."""
    fn = make_feature_fn(model.config, part)
    frames = []
    for k, p in enumerate(pairs):
        vis = images.to_float(images.read_image(p.a, "RGB"))
        ir = images.to_float(images.read_image(p.b, "L"))
        h, w = vis.shape[:2]
        hp, wp = infer.bucket_size(h, "fine"), infer.bucket_size(w, "fine")
        f = fn(
            model.params,
            tiling.reflect_pad(vis[None], hp, wp),
            tiling.reflect_pad(ir[None], hp, wp),
        )
        frames.append((np.asarray(f[0, :h, :w], np.float16), vis, ir))
        log.info("features %d/%d: %s", k + 1, len(pairs), p.name)
    return frames


def sample_batch(frames, rng: np.random.Generator, batch: int, crop: int):
    """`batch` random crops: frame indices, then all rows, then all columns."""
    idx = rng.integers(0, len(frames), batch)
    ys = rng.integers(0, np.array([frames[k][0].shape[0] - crop + 1 for k in idx]))
    xs = rng.integers(0, np.array([frames[k][0].shape[1] - crop + 1 for k in idx]))
    crops = [
        [a[y : y + crop, x : x + crop] for a in frames[k]]
        for k, y, x in zip(idx, ys, xs, strict=True)
    ]
    return tuple(np.stack(parts) for parts in zip(*crops, strict=True))


def train_head(
    model: infer.Model,
    frames,
    *,
    steps,
    lr,
    crop,
    batch,
    seed,
    kind,
    part="head",
    stop_after=None,
    on_save=None,
    save_every=0,
):
    """The model's params with the part's trained: a cosine of `steps` steps, run to its end or
    to `stop_after`."""
    head = TAILS[part](model.config)
    names = part_names(model.config, part)
    hp = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), {k: model.params[k] for k in names})
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=min(1.0, 1e-7 / lr))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt = tx.init(hp)
    weights = jnp.asarray(losses.default_weights(kind))

    @jax.jit
    def step(hp, opt, f, v, i):
        def loss_fn(hp):
            fused = head.apply({"params": hp}, f.astype(jnp.float32), v)
            return losses.fusion_loss(fused, v, i, weights)[0]

        loss, grads = jax.value_and_grad(loss_fn)(hp)
        updates, opt = tx.update(grads, opt, hp)
        return optax.apply_updates(hp, updates), opt, loss

    rng = np.random.default_rng(seed)
    t0, recent = time.perf_counter(), []
    last = steps if stop_after is None else min(stop_after, steps)
    for s in range(1, last + 1):
        hp, opt, loss = step(hp, opt, *sample_batch(frames, rng, batch, crop))
        recent.append(float(loss))
        if s % 50 == 0 or s in (1, last):
            dt = time.perf_counter() - t0
            log.info("step %d/%d loss %.4f (%.0f s)", s, steps, np.mean(recent), dt)
            recent = []
        if on_save and save_every and s % save_every == 0 and s < last:
            on_save(s, {**model.params, **hp})
    return {**model.params, **hp}


def write_weights(path, params, model_cfg, meta, step, dtype, record=None) -> str:
    """A weight file (and optionally its JSON record, as export --record writes) of `step`."""
    m = {**meta, "step": step, "quality": None}
    m["finetune_head"] = {**meta["finetune_head"], "step": step}
    sha = checkpoint.save_params(path, params, model_cfg, m, dtype=dtype)
    if record:
        rec = {"file": pathlib.Path(path).name, "sha256": sha}
        rec |= {"bytes": pathlib.Path(path).stat().st_size, **m, "config": model_cfg.to_dict()}
        images.atomic_write(record, json.dumps(rec, indent=2, default=list) + "\n")
    return sha


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="student_ivf", help="shipped student name or weight file")
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path(datasets.DATA_ROOT))
    p.add_argument("--train", nargs="+", default=["msrs/train"], help="splits under --data")
    p.add_argument("--kind", default="ivf", choices=("ivf", "medical"), help="loss weight table")
    p.add_argument(
        "--part",
        default="head",
        choices=PARTS,
        help="what trains: the head (refinement blocks + output conv), or level1: also "
        "feature_fusion_1 and the decoder_level1 blocks",
    )
    p.add_argument("--steps", type=int, default=800, help="length of the cosine schedule")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="write --out at step N of the --steps schedule and stop (a --save-every file "
        "chosen by validation, remade with its record)",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, metavar="N")
    p.add_argument("--dtype", default="float16", choices=checkpoint.STORAGE_DTYPES)
    p.add_argument("--out", required=True, type=pathlib.Path, help="weight file to write")
    p.add_argument("--record", type=pathlib.Path, help="also write this JSON record of --out")
    args = p.parse_args(argv)
    images.show_info_logs()

    model = infer.load_model(args.weights)
    if model.text_guided:
        p.error(f"{args.weights}: a text-guided network; this script fine-tunes students")
    pairs = []
    for rel in args.train:
        splits = datasets.find_splits(args.data / rel)
        if not splits:
            p.error(f"{args.data / rel}: no vi/ir or A/mri layout")
        for split in splits:
            found = datasets.split_pairs(split, args.data)
            pairs += found[datasets.span_slice(len(found), (0.0, 0.95))]
    small = [q.name for q in pairs if min(images.read_image(q.b, "L").shape) < args.crop]
    if small:
        p.error(f"{len(small)} training frames are smaller than --crop {args.crop}: {small[:4]}")
    meta = {
        **model.meta,
        "stage": "student",
        "run": "finetune_head",
        "finetune_head": {
            "from": str(args.weights),
            "from_sha256": checkpoint.file_sha256(model.source),
            "train": args.train,
            "frames": len(pairs),
            **{k: getattr(args, k) for k in ("kind", "steps", "lr", "crop", "batch", "seed")},
            # recorded for level1 only: a head run's record stays as the shipped file's
            **({"part": args.part} if args.part != "head" else {}),
        },
        "storage_dtype": args.dtype,
    }

    def save(path: pathlib.Path, step: int, params, record: pathlib.Path | None = None) -> None:
        sha = write_weights(path, params, model.config, meta, step, args.dtype, record)
        print(f"{path}: {args.part} step {step}, sha256 {sha}", flush=True)

    t0 = time.perf_counter()
    frames = cache_features(model, pairs, args.part)
    log.info("cached the features of %d frames in %.0f s", len(frames), time.perf_counter() - t0)
    params = train_head(
        model,
        frames,
        steps=args.steps,
        stop_after=args.stop_after,
        lr=args.lr,
        crop=args.crop,
        batch=args.batch,
        seed=args.seed,
        kind=args.kind,
        part=args.part,
        save_every=args.save_every,
        on_save=lambda s, prm: save(
            args.out.with_name(f"{args.out.stem}_step{s}{args.out.suffix}"), s, prm
        ),
    )
    save(args.out, min(args.stop_after or args.steps, args.steps), params, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
