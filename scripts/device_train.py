"""One GPU command: measure the train step, train the student, export candidates, time a grid.

    python3 scripts/device_train.py --config configs/distill.py:nodistill,gpu --out OUT \
        --config.data.root=DATA --config.data.captions=CAPTIONS [--budget_s 480] [--t0 EPOCH]

`bash scripts/device_train.sh run` calls this (its header says how to run it on a lent GPU and
what to do with what comes back). Everything ends within --budget_s seconds of --t0 (the
command's start, so that installing the carried wheels counts):

1. timing.json at once (device, versions, install time), rewritten after every measurement and
   with any exception, so that a run that fails still says how far it got and why.
2. The training pairs (stage's lossless WebP files, or PNG) decoded once into uncompressed BMP
   under --scratch (their captions copied as <name>.txt): a 640x480 PNG pair costs ~5x the host
   time of a BMP pair, and 16 of them are read per step.
3. The probe: the input pipeline's batches/s, then the train step of --config at --dtype
   (default bfloat16; `auto`: float32 and bfloat16, each compiled in a thread while the next is
   traced), the init program compiled beside it, then run for --probe_steps on real batches:
   compile s, XLA's planned MB, step s, steps/s, images/s, each step's loss.
4. With --dtype auto, the pick: bfloat16 if its step is at least 10 % faster and its mean loss
   over the second half of the probe within 2 % of float32's (it trains as well), else
   float32. The H200, 2026-12-04: bf16 0.0544 s/step against fp32's 0.0771, XLA planning 10.6
   GB against 21.4, losses within 2 %; but the two compiles side by side took 158 and 231 s of
   a 480 s run, hence bfloat16 by default. If the input pipeline's threads gave fewer than
   1.5 batches per step, grain worker processes read too.
5. Training (train.train_and_evaluate, in this process, running the probe's compiled program:
   reuse_program) with max_train_s = what is left minus --grid_s and --export_s, and a
   checkpoint every 1/--candidates of the steps the probe's rate predicts; validation there
   only with --validate (its first call compiles a full-frame program: 50 s on the H200).
6. The last --candidates checkpoints (the final one and earlier ones at least half an interval
   before it) exported as float16 weight files student_sNNNNN.msgpack, recorded as float32
   networks (fuse runs them on any device), each read back; candidates.json describes them.
7. With --grid_s > 0, the speed grid: scripts/benchmark.py in a subprocess (--grid; records
   written after each configuration, so a cut keeps them) in the time left, then the probe's
   training-step records appended: speed.json. (device_train.sh gives it no time outside its
   smoke form: on a GPU the grid is a second command, MODE=grid, and the training steps'
   figures are in timing.json's probe.)
8. The persistent compile cache packed as xla_cache.tar (pack_compile_cache), once after the
   probe and again at the end, when a file slot is left: a later session carries it back
   (device_train.sh stage) and its train step loads instead of compiling.

timing.json's "phase" says what the run was doing when it was last written.

OUT then holds at most 8 files: run.log (device_train.sh's tee), timing.json, candidates.json,
at most 4 student files of ~8.8 MB, and speed.json (with --grid_s) or xla_cache.tar.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging as std_logging
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image, features

from dtpf_jax import captions, checkpoint, data, datasets, export, fuse, images, parallel, train

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
GRID = (
    "--models student,teacher --sizes 128x128,480x640 --batches 1,16 --dtypes float32,bfloat16 "
    "--runs 10 --warmup 2 --budget 3 --compile-threads 8"
)
BF16_SPEEDUP = 0.9  # bfloat16 is picked if its step takes at most this fraction of float32's
BF16_LOSS_TOLERANCE = 1.02  # ... and its probe loss is at most this multiple of float32's
INPUT_MARGIN = 1.5  # reading threads must give this many batches per step, else add workers
# What the device tool brings back: at most 8 files of at most 16 MiB each, 64 MiB in all.
OUT_FILES, OUT_FILE_BYTES = 8, 16 * 2**20
CACHE_TAR = "xla_cache.tar"


class Timing:
    """timing.json: fields merged in and the file rewritten (atomically) on every call."""

    def __init__(self, path: pathlib.Path, t0: float):
        self.path, self.t0, self.fields = path, t0, {}

    def __call__(self, **fields) -> None:
        self.fields.update(fields, elapsed_s=round(time.time() - self.t0, 1))
        images.atomic_write(self.path, json.dumps(self.fields, indent=1, default=str) + "\n")


def read_training_image(path, mode: str) -> np.ndarray:
    """images.read_image; a WebP file (stage's, webp_tree) through OpenCV where Pillow has no
    WebP (the GPU machine's Pillow is expected to have it, and its OpenCV is the way out)."""
    if pathlib.Path(path).suffix.lower() != ".webp" or features.check("webp"):
        return images.read_image(path, mode)
    import cv2  # the GPU machine has it; only this way out needs it

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise images.DataError(f"{path}: cannot decode: neither Pillow nor OpenCV reads WebP here")
    rgb = Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]))
    return np.asarray(rgb.convert(mode), dtype=np.uint8)


def decode_training_data(cfg: ml_collections.ConfigDict, dest: pathlib.Path):
    """cfg (a data config) read from BMP copies of its train and val pairs under dest."""
    roles = ("train", "val")
    pairs = {(p.split, p.name): p for role in roles for p in datasets.source_pairs(cfg, role)}
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.root, caps = str(dest / "data"), dest / "captions"
    for p in pairs.values():
        if pathlib.Path(p.split).is_absolute():
            raise images.DataError(f"{p.split}: training folders must lie under data.root")
        for src, mode in ((p.a, "RGB"), (p.b, "L")):
            folder = dest / "data" / p.split / pathlib.Path(src).parent.name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(read_training_image(src, mode)).save(folder / f"{p.name}.bmp")
        folder_caps = cfg.captions and captions.caption_dir(cfg.captions, p.split)
        found = folder_caps and captions.caption_file(folder_caps, p)
        if found:  # a missing caption is reported by the training run, as without this copy
            (caps / p.split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, caps / p.split / f"{p.name}.txt")
    out.captions = str(caps) if cfg.captions else ""
    return out


def probe(config, mesh, batches: list, dtypes: tuple[str, ...], timing: Timing) -> dict:
    """Compile time, step time and losses of the train step at each compute dtype.

    XLA compiles outside the GIL: the init program and each dtype's step compile in threads
    while the next one is traced; each result is written as it comes.
    """
    pool = concurrent.futures.ThreadPoolExecutor(len(dtypes) + 1)
    # Params are float32 whatever the compute dtype: one initial state serves both.
    init = pool.submit(train.init_state, config, mesh)
    lr = np.float32(config.optimizer.lr)
    abstract = train.abstract_state(config, mesh)  # what init_state returns, as shapes
    results, futures, t_submit = {}, {}, {}

    def compile_one(dt, lowered):
        exe = lowered.compile()
        return exe, round(time.perf_counter() - t_submit[dt], 2), _planned_mb(exe)

    for dt in dtypes:
        cfg = config.copy_and_resolve_references()
        cfg.model.dtype = dt
        t = time.perf_counter()
        lowered = train.build_step(cfg, mesh).lower(abstract, lr, batches[0])
        results[dt] = {"lower_s": round(time.perf_counter() - t, 2)}
        t_submit[dt] = time.perf_counter()
        futures[pool.submit(compile_one, dt, lowered)] = dt
        timing(probe=results)
    compiled = {}
    for fut in concurrent.futures.as_completed(futures):
        dt = futures[fut]
        compiled[dt], compile_s, xla_mb = fut.result()
        results[dt].update(compile_s=compile_s, xla_mb=xla_mb)
        timing(probe=results, probe_note="compile_s: wall time, the dtypes compiled side by side")
        logging.info("probe %s: lowered in %.1f s, compiled in %.1f s, XLA plans %s MB",
                     dt, results[dt]["lower_s"], compile_s, xla_mb)  # fmt: skip
    host0 = jax.device_get(init.result())  # each dtype starts from a copy (steps donate)
    pool.shutdown()
    warm = max(1, min(2, len(batches) - 2))
    for dt in dtypes:
        step, state = compiled[dt], parallel.replicate(host0, mesh)
        metrics, t = [], time.perf_counter()
        for k, batch in enumerate(batches):
            if k == warm:
                jax.block_until_ready(metrics)
                t = time.perf_counter()
            state, m = step(state, lr, batch)
            metrics.append(m)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t) / (len(batches) - warm)
        results[dt].update(
            step_s=round(step_s, 5),
            steps_per_s=round(1 / step_s, 3),
            images_per_s=round(config.batch_size / step_s, 1),
            losses=[round(float(m["loss"]), 5) for m in metrics],
        )
        del state
        timing(probe=results)
        r = results[dt]
        logging.info(
            "probe %s: %.4f s/step, %.2f steps/s, %.1f images/s; losses %s",
            dt, r["step_s"], r["steps_per_s"], r["images_per_s"], r["losses"][-3:],
        )  # fmt: skip
    return results, compiled


def reuse_program(compiled, config, mesh):
    """The probe's compiled step for the training loop (no second trace and cache load: ~20 s
    on the H200); if the loop's arguments do not fit it, the step is built again, once."""
    fallback = None

    def step(*args):
        nonlocal fallback
        if fallback is None:
            try:  # arguments are checked before anything runs: nothing is donated on failure
                return compiled(*args)
            except (TypeError, ValueError) as e:
                logging.warning("the probe's program does not fit the loop (%s); building it", e)
                fallback = train.build_step(config, mesh)
        return fallback(*args)

    return step


def _planned_mb(compiled) -> float | None:
    """XLA's planned memory of a compiled program: arguments + temporaries + outputs, MB."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    return round(total / 2**20, 1)


def pick_dtype(results: dict) -> tuple[str, str]:
    """(dtype, why): bfloat16 where it is faster and trains as well as float32."""
    if len(results) == 1:
        return next(iter(results)), "--dtype (not probed against the other)"
    fp, bf = results["float32"], results["bfloat16"]
    half = len(fp["losses"]) // 2
    loss = {k: statistics.mean(r["losses"][half:]) for k, r in results.items()}
    faster = bf["step_s"] <= BF16_SPEEDUP * fp["step_s"]
    as_well = loss["bfloat16"] <= BF16_LOSS_TOLERANCE * loss["float32"]
    why = (
        f"step {bf['step_s']:.4f} s (bf16) vs {fp['step_s']:.4f} s (fp32); probe loss over the "
        f"second half {loss['bfloat16']:.4f} vs {loss['float32']:.4f}"
    )
    return ("bfloat16" if faster and as_well else "float32"), why


def candidate_steps(steps: list[int], every: int, n: int) -> list[int]:
    """The final step and the n - 1 latest before it that lie at least every / 2 before it."""
    final = steps[-1]
    earlier = [s for s in steps[:-1] if final - s >= every / 2]
    return ([*earlier[-(n - 1) :], final] if n > 1 else [final]) if earlier else [final]


def export_candidates(workdir, steps: list[int], out: pathlib.Path, extra: dict) -> list[dict]:
    records = []
    for step in steps:
        params, model_cfg, meta = export.restore_network(workdir, step)
        meta.update(extra, trained_dtype=model_cfg.dtype, storage_dtype="float16")
        model_cfg.dtype = "float32"  # compute dtype is the user's choice (fuse, load_model)
        path = out / f"student_s{step:05d}.msgpack"
        sha = checkpoint.save_params(path, params, model_cfg, meta, dtype="float16")
        checkpoint.load_params(path)  # reads back and checks against the network
        records.append({"file": path.name, "sha256": sha, "bytes": path.stat().st_size, **meta})
    return records


def speed_grid(out: pathlib.Path, grid: str, seconds: float, probe_results: dict, config) -> None:
    """scripts/benchmark.py within `seconds`, then the probe's training steps: speed.json."""
    path = out / "speed.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--json", str(path)]
    cmd += ["--no-flops", "--cli-images", "0", "--max-s", f"{max(seconds - 45, 1):.0f}"]
    # This process keeps its share (device_train.sh: at most 40 %, taken as needed).
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.55")
    try:
        subprocess.run(cmd + shlex.split(grid), timeout=seconds, env=env, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        logging.warning("speed grid cut short: %s", e)
    records = json.loads(path.read_text()) if path.is_file() else []
    device = jax.devices()[0].device_kind
    for dt, r in probe_results.items():
        records.append(
            {
                "model": "student",
                "kind": "train_step",
                "height": config.data.crop,
                "width": config.data.crop,
                "batch": config.batch_size,
                "dtype": dt,
                "compile_s": r["compile_s"],
                "median_ms": round(1000 * r["step_s"], 2),
                "steps_per_s": r["steps_per_s"],
                "images_per_s": r["images_per_s"],
                "device": device,
            }
        )
    images.atomic_write(path, json.dumps(records, indent=1) + "\n")


def _tar_bytes(size: int) -> int:
    """What a file of `size` bytes adds to a tar: a 512-byte header and 512-byte blocks."""
    return 512 + -(-size // 512) * 512


def cache_rank(rel: pathlib.Path) -> int:
    """Packing order of a cache entry, most wanted first: XLA's autotuning results (small, keyed
    per fusion), the train steps' programs (jit__teacher_step-*, jit__distill_step-*: the long
    compiles), then the rest. Stage carries what fits of a tar in this order."""
    if rel.parts[0].startswith("xla_gpu"):
        return 0
    return 1 if "_step-" in rel.name else 2


def pack_compile_cache(cache_dir: pathlib.Path, out: pathlib.Path) -> dict:
    """The persistent compile cache as out/xla_cache.tar, for a later session to carry back
    (device_train.sh stage, XLA_CACHE_TAR): a warm cache should spare the train step's compile
    (1.5-4 minutes on the H200); XLA's per-fusion autotuning results, packed first, should still
    serve a step whose code changed. Within the tool's limits: no tar if out would hold more
    than 8 files; entries that would take the tar over 16 MiB are left out (the later compiled
    first)."""
    others = [p for p in out.iterdir() if p.name != CACHE_TAR]
    dest = out / CACHE_TAR
    if len(others) >= OUT_FILES or not cache_dir.is_dir():
        dest.unlink(missing_ok=True)
        return {"packed": 0, "why": "no file slot left" if cache_dir.is_dir() else "no cache"}
    entries = [p for p in cache_dir.rglob("*") if p.is_file()]
    entries.sort(key=lambda p: (cache_rank(p.relative_to(cache_dir)), p.stat().st_mtime))
    part, size, packed = out / f"{CACHE_TAR}.part", 1024, 0  # 1024: the tar's end blocks
    with tarfile.open(part, "w") as tar:
        for p in entries:
            cost = _tar_bytes(p.stat().st_size)
            if size + cost > OUT_FILE_BYTES:
                continue
            tar.add(p, arcname=str(p.relative_to(cache_dir)))
            size, packed = size + cost, packed + 1
    os.replace(part, dest)
    return {"packed": packed, "left_out": len(entries) - packed, "bytes": dest.stat().st_size}


def trim_cache_tar(argv: list[str] | None = None) -> int:
    """SRC DEST ROOM: SRC's entries in their packing order, each that still fits in ROOM bytes,
    as DEST (device_train.sh stage: what fits in what travels). A bad SRC carries nothing."""
    src, dest, room = argv or sys.argv[1:]
    kept, size = [], 1024
    try:
        with tarfile.open(src) as tar_in:
            members = tar_in.getmembers()
            for m in members:
                cost = _tar_bytes(m.size)
                if not m.isfile() or size + cost > int(room):
                    continue
                kept.append(m)
                size += cost
            if kept:
                with tarfile.open(dest, "w") as tar_out:
                    for m in kept:
                        tar_out.addfile(m, tar_in.extractfile(m))
    except (OSError, tarfile.TarError) as e:
        print(f"warning: {src}: {e}; no compile cache carried", file=sys.stderr)
        return 1
    print(f"compile cache: {len(kept)} of {len(members)} entries of {src} carried")
    return 0


def webp_tree(argv: list[str] | None = None) -> int:
    """ROOT: each 8-bit image under ROOT replaced by a lossless WebP file that decodes to the
    same pixels, as RGB and as gray (device_train.sh stage: msrs/train's PNGs, 14.5 -> 9.8 MiB,
    leave that much more of what travels to the compile cache). A file that would not come back
    the same, or that is larger as WebP, stays as it is; without WebP in Pillow, all do."""
    (root,) = argv or sys.argv[1:]
    if not features.check("webp"):
        print("warning: this Pillow has no WebP: the training images travel as they are")
        return 0
    before = after = 0
    for src in sorted(pathlib.Path(root).rglob("*")):
        if src.suffix.lower() not in images.IMAGE_EXTS or src.suffix.lower() == ".webp":
            continue
        size = src.stat().st_size
        before += size
        with Image.open(src) as img:
            eight_bit = img.mode in ("L", "RGB")
            encoded = io.BytesIO()
            if eight_bit:
                img.save(encoded, "WEBP", lossless=True, quality=100, method=6)
        dest = src.with_suffix(".webp")
        if eight_bit and encoded.tell() < size and not dest.exists():
            images.atomic_write(dest, encoded.getvalue())
            if all(
                np.array_equal(images.read_image(dest, m), images.read_image(src, m))
                for m in ("RGB", "L")
            ):
                src.unlink()
                size = encoded.tell()
            else:
                dest.unlink()
        after += size
    print(f"training images: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (WebP)")
    return 0


def run(config: ml_collections.ConfigDict, out: pathlib.Path, timing: Timing) -> None:
    f = flags.FLAGS
    deadline = timing.t0 + f.budget_s
    dev = jax.devices()[0]
    timing(
        device=dev.device_kind,
        platform=dev.platform,
        devices=jax.device_count(),
        jax=jax.__version__,
        python=sys.version.split()[0],
        budget_s=f.budget_s,
        install_s=f.install_s,
        run=config.name,
        batch=config.batch_size,
        crop=config.data.crop,
    )
    timing(phase="decoding the training data")
    scratch = pathlib.Path(f.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    t = time.perf_counter()
    config.data = decode_training_data(config.data, scratch)
    mesh = parallel.make_mesh()
    data_cfg = train.run_data_config(config)
    pairs = train.train_pairs(data_cfg)
    batches_it = data.make_train_iter(
        data_cfg, global_batch=config.batch_size, seed=config.seed, mesh=mesh, pairs=pairs
    )
    batches = [next(batches_it)]
    t_read = time.perf_counter()
    batches += [next(batches_it) for _ in range(f.probe_steps - 1)]
    jax.block_until_ready(batches)
    rate = (len(batches) - 1) / max(time.perf_counter() - t_read, 1e-9)
    del batches_it
    timing(
        decode_s=round(t_read - t, 2),
        pipeline={"batches_per_s": round(rate, 1), "pairs": len(pairs)},
    )
    logging.info("input pipeline: %.1f batches/s of %d", rate, config.batch_size)

    dtypes = DTYPES if f.dtype == "auto" else (f.dtype,)
    timing(phase="probe: compiling the train step")
    results, compiled = probe(config, mesh, batches, dtypes, timing)
    bring_back_cache(out, timing)  # the train step's program, should the run go no further
    dtype, why = pick_dtype(results)
    config.model.dtype = dtype
    steps_per_s = results[dtype]["steps_per_s"]
    # Reading threads alone too slow for the step: worker processes too (each reads with
    # read_threads; a pool costs seconds to start).
    if rate < INPUT_MARGIN * steps_per_s and not config.data.num_workers:
        config.data.num_workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    timing(dtype=dtype, dtype_why=why, input_workers=config.data.num_workers)
    logging.info(
        "compute dtype %s: %s; input %.1f batches/s for %.1f steps/s: %d worker processes",
        dtype, why, rate, steps_per_s, config.data.num_workers,
    )  # fmt: skip
    del batches

    train_s = max(deadline - time.time() - f.grid_s - f.export_s, 10.0)
    expected = max(1, min(config.steps, int(steps_per_s * train_s * 0.9)))
    every = max(1, expected // f.candidates)
    config.max_train_s = train_s
    config.checkpoint_every = every
    # Validation on the device is off unless asked for: the candidates are scored on the CPU
    # (scripts/select_student.py), and its first call compiles a full-frame program (50 s on
    # the H200, 2026-12-04).
    config.eval_every = every if f.validate else 0
    config.keep_best = 1000  # every checkpoint stays: the candidates come from them
    workdir = scratch / "run"
    timing(train={"max_train_s": round(train_s, 1), "expected_steps": expected, "every": every})
    logging.info("train %.0f s (~%d steps), a candidate every %d steps", train_s, expected, every)
    t = time.perf_counter()
    timing(phase="training")
    step = reuse_program(compiled[dtype], config, mesh)
    del compiled
    last = train.train_and_evaluate(config, workdir, step_fn=step)
    timing(train=dict(timing.fields["train"], wall_s=round(time.perf_counter() - t, 1), **last))

    mngr = checkpoint.train_manager(workdir, read_only=True)
    saved = sorted(mngr.all_steps())
    quality = {s: (mngr.metrics(s) or {}).get("quality") for s in saved}
    mngr.close()
    steps = candidate_steps(saved, every, f.candidates)
    extra = {"device": dev.device_kind, "trained_s": round(train_s, 1), "batch": config.batch_size}
    timing(phase="exporting candidates")
    records = export_candidates(workdir, steps, out, extra)
    images.atomic_write(
        out / "candidates.json",
        json.dumps(
            {"candidates": records, "validation_quality": quality, "config": config.to_dict()},
            indent=1,
            default=list,
        )
        + "\n",
    )
    timing(exported=[r["file"] for r in records])
    logging.info("candidates: %s", ", ".join(r["file"] for r in records))

    left = deadline - time.time() - 5
    if f.grid_s > 0 and left > 20:
        timing(phase="speed grid")
        speed_grid(out, f.grid, left, results, config)
    else:
        logging.warning("speed grid skipped (--grid_s %g, %.0f s left)", f.grid_s, left)
    timing(done=True, phase="done")


_BUILDS: fuse.Stats | None = None  # programs built and loaded from the cache, the whole run


def bring_back_cache(out: pathlib.Path, timing: Timing) -> None:
    """pack_compile_cache, its outcome and the cache's hits so far in timing.json."""
    cache = jax.config.jax_compilation_cache_dir
    field = dict(timing.fields.get("compile_cache", {}), hits=_BUILDS.cached)
    field.update(compiled=_BUILDS.compiles)
    if cache and flags.FLAGS.bring_back_cache:
        try:
            field.update(pack_compile_cache(pathlib.Path(cache), out))
        except OSError as e:  # the cache is a bonus: never the reason a run fails
            field.update(packed=0, why=f"{type(e).__name__}: {e}")
    timing(compile_cache=field)


def main(argv: list[str]) -> None:
    global _BUILDS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.compile_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compile_cache))
    _BUILDS = fuse.Stats().__enter__()  # listens until the process ends
    logging.get_absl_logger().addFilter(  # as train.main: orbax's save chatter out
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )
    if not 1 <= f.candidates <= 4:
        raise app.UsageError("--candidates: 1 to 4 (8 files come back: 4 are logs and records)")
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = Timing(out / "timing.json", f.t0 or time.time())
    cache = jax.config.jax_compilation_cache_dir
    entries = sum(p.is_file() for p in pathlib.Path(cache).rglob("*")) if cache else 0
    timing(compile_cache={"dir": cache, "entries_at_start": entries})
    try:
        run(f.config, out, timing)
    except BaseException as e:
        timing(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        if isinstance(e, images.DataError | checkpoint.WeightsError):
            sys.exit(f"error: {e}")
        raise
    finally:
        bring_back_cache(out, timing)


def define_flags() -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/distill.py:nodistill,gpu[,smoke]")
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("out", None, "folder for what comes back (at most 8 files)")
    flags.mark_flag_as_required("out")
    flags.DEFINE_float("budget_s", 480, "seconds from --t0 to the end of everything")
    flags.DEFINE_float("t0", 0, "the command's start (epoch seconds; 0 = now)")
    flags.DEFINE_float("install_s", 0, "seconds spent installing wheels before (recorded)")
    flags.DEFINE_enum(
        "dtype",
        "bfloat16",
        ["auto", *DTYPES],
        "compute dtype; auto = probe both side by side (the H200's probe of 2026-12-04 chose "
        "bfloat16: 1.42x faster steps, half the memory, loss within 2 %)",
    )
    flags.DEFINE_bool("validate", False, "validate at each candidate (a full-frame compile)")
    flags.DEFINE_integer("probe_steps", 30, "steps of the probe per dtype (2 of them warm-up)")
    flags.DEFINE_integer("candidates", 4, "student files to bring back (at most 4)")
    flags.DEFINE_float("grid_s", 150, "seconds kept for the speed grid (0: no grid)")
    flags.DEFINE_float("export_s", 30, "seconds kept for exporting the candidates")
    flags.DEFINE_string("grid", GRID, "scripts/benchmark.py arguments of the speed grid")
    flags.DEFINE_string("scratch", "/tmp/dtpf_device", "decoded data and the run's workdir")
    flags.DEFINE_string("compile_cache", "~/.cache/dtpf_jax/jax", "persistent XLA cache")
    flags.DEFINE_bool(
        "bring_back_cache", True, f"the compile cache as OUT/{CACHE_TAR} (if a file slot is left)"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
