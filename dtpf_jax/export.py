"""Params-only weight file of a trained network from its workdir (best checkpoint by default).

python -m dtpf_jax.export runs/distill student.msgpack [--step N] [--record student.json]

`--record` also writes a JSON record beside it: sha256, size, the exact model config and where
the params come from (stage, step, validation quality, run name), as shipped weights carry.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from dtpf_jax import checkpoint, parallel, train
from dtpf_jax.images import atomic_write


def restore_network(workdir: str | os.PathLike, step: int = 0):
    """(network params, model config, meta) of a checkpoint of `workdir` (0 = best)."""
    config = train.load_workdir_config(workdir)
    mngr = checkpoint.train_manager(workdir, read_only=True)
    try:
        step = checkpoint.select_step(mngr, step)
        state = checkpoint.restore_train_state(
            mngr, step, train.abstract_state(config, parallel.make_mesh())
        )
        quality = (mngr.metrics(step) or {}).get("quality")
    finally:
        mngr.close()
    meta = {"stage": config.stage, "step": step, "quality": quality, "run": config.name}
    return state["params"]["net"], config.model, meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtpf_jax.export", description=__doc__)
    parser.add_argument("workdir", help="training workdir (holds config.json and checkpoints/)")
    parser.add_argument("out", help="weight file to write (msgpack)")
    parser.add_argument("--step", type=int, default=0, help="checkpoint step (default: best)")
    parser.add_argument("--record", default="", help="also write this JSON record of the file")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=checkpoint.STORAGE_DTYPES,
        help="storage precision of the file (float16 halves it; loading gives float32)",
    )
    args = parser.parse_args(argv)
    try:
        params, model_cfg, meta = restore_network(args.workdir, args.step)
    except checkpoint.WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta["storage_dtype"] = args.dtype
    sha = checkpoint.save_params(args.out, params, model_cfg, meta, dtype=args.dtype)
    if args.record:
        record = {
            "file": pathlib.Path(args.out).name,
            "sha256": sha,
            "bytes": pathlib.Path(args.out).stat().st_size,
            **meta,
            "config": model_cfg.to_dict(),
        }
        atomic_write(args.record, json.dumps(record, indent=2, default=list) + "\n")
    quality = "n/a" if meta["quality"] is None else f"{meta['quality']:.4f}"
    print(
        f"{args.out}: {meta['stage']} network of step {meta['step']} (quality {quality}), "
        f"sha256 {sha}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
