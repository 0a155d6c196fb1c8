"""Speed and size of the DTPF student and teacher, beside the official PyTorch figures.

    python scripts/benchmark.py --quick                 # batch 1, fp32, 128² and 256x320, 3 runs
    python scripts/benchmark.py --json bench.json       # the full grid (long on a 2-core CPU)
    python scripts/benchmark.py --quick --malloc-tuned  # the same under the CLIs' malloc setting
    python scripts/benchmark.py --batches 1,16 --no-flops --max-s 150 --json speed.json  # a GPU
    python scripts/benchmark.py --models '' --cli-images 0 --large  # 1280x1024 and 4000x3000

For each model x size x batch x dtype: parameters, FLOPs as XLA reports them
(`jax.jit(f).lower(...).compile().cost_analysis()`, all ops, not only conv/matmul, of the
forward with window attention in one piece: XLA counts a loop's body once, and on CPU the
window attention of large inputs runs as a loop over bands of rows), compile
time (trace + lower + compile, no persistent cache), median latency of --runs calls after
--warmup calls (per batch; a config stops early after --budget seconds of timed calls), XLA's
planned memory (arguments + temporaries + outputs) and the measured peak (CPU: the process's
RSS high-water mark, reset per config; GPU: the allocator's peak so far). Then images/s of
the fuse CLI's loop (read, fuse, write PNG) on a folder, the student's exported ONNX graph
(`dtpf_jax.export_onnx`) under onnxruntime (CPU, --ort-threads, same process, same weights and
inputs as the JAX row before it; batch 1, fp32), and a table like the paper's
Table VII with the official PyTorch CPU latencies from DESIGN §11 (torch 2.13, 2 threads,
batch 1, fp32) and the student/teacher latency ratio. Weights are random: speed does not
depend on them. No CLIP runs: the teacher gets a random 512-d text embedding.

glibc malloc: XLA:CPU maps fresh buffers every call. This script runs in the environment it is
given (glibc's defaults unless GLIBC_TUNABLES is set): the project's speed targets are judged
there (DESIGN §11). `python -m dtpf_jax.fuse` / `.evaluate` / `.train` re-execute themselves
under `dtpf_jax.malloc.TUNED` (fewer page faults); --malloc-tuned re-runs this script under
the same setting, to measure what the CLIs get. The header prints the setting in force.

Runs unchanged on a GPU (no transformers, no training stack); the CLI figure needs grain.
--json writes the records after each configuration, so a run cut short keeps what it measured;
--max-s starts no configuration after that many seconds; --no-flops skips the cost analysis
(a second compile per configuration); --tiny measures models of dim 8 without transformer
blocks, for rehearsals of a GPU command on a CPU.

--large [HxW,...] times big frames (default 1024x1280 and 3000x4000) through the fuse CLI in
fresh processes, cold and warm, with CPU time and peak RSS (`benchmark_large`, beside this
script); --large-check adds the distance to a full-frame pass, --large-pair a real pair.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import benchmark_large
import jax
import jax.numpy as jnp
import numpy as np

from dtpf_jax import attention, infer, malloc, networks

# Official PyTorch nets on the project CPU (DESIGN §11): (model, H, W) -> ms, batch 1, fp32.
OFFICIAL_MS = {
    ("student", 128, 128): 962,
    ("student", 256, 256): 4300,
    ("student", 448, 640): 26500,
    ("teacher", 128, 128): 2290,
    ("teacher", 256, 256): 11800,
    ("teacher", 448, 640): 67500,
}
DTYPE_LABEL = {"float32": "fp32", "bfloat16": "bf16"}
# The official nets need H, W multiples of 64, so their nearest figure stands in for 480x640.
OFFICIAL_SIZE = {(480, 640): (448, 640)}


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _list(text: str, kind=str) -> list:
    return [kind(t) for t in text.split(",") if t]


def peak_reset() -> None:
    """Reset the RSS high-water mark (Linux); on GPU the allocator peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Peak device memory (GPU) or peak RSS since peak_reset (CPU), in MB."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return stats.get("peak_bytes_in_use", float("nan")) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_piece_cost(fwd, args) -> dict:
    """XLA's cost analysis of fwd with the window attention in one piece (no band loop,
    whose body XLA would count once); the bands do the same work plus a small overlap."""
    saved = attention.WINDOW_CHUNK_LOGITS, attention.WINDOW_CHUNK_LOGITS_ACCELERATOR
    attention.WINDOW_CHUNK_LOGITS = attention.WINDOW_CHUNK_LOGITS_ACCELERATOR = sys.maxsize
    try:  # a new function object: jit's trace cache would hand back the banded trace
        cost = jax.jit(lambda *a: fwd(*a)).lower(*args).compile().cost_analysis()
    finally:
        attention.WINDOW_CHUNK_LOGITS, attention.WINDOW_CHUNK_LOGITS_ACCELERATOR = saved
    return cost[0] if isinstance(cost, list | tuple) else cost


def prepare(kind: str, h: int, w: int, batch: int, dtype: str, args) -> dict:
    """One configuration's weights and inputs on the device and its traced, lowered forward."""
    cfg = networks.model_config(kind)
    cfg.dtype = dtype
    if args.tiny:  # the tests' smallest: every module kind but the transformer blocks
        cfg.dim, cfg.num_blocks, cfg.num_refinement_blocks = 8, (0, 0, 0, 0), 0
    model = networks.build_model(cfg)
    params = jax.device_put(infer.random_params(cfg))
    rng = np.random.default_rng(0)
    vis = jax.device_put(rng.random((batch, h, w, 3), np.float32))
    ir = jax.device_put(rng.random((batch, h, w, 1), np.float32))
    text = jax.device_put(rng.normal(size=(batch, cfg.text_dim)).astype(np.float32))
    text = text if cfg.text_dim else None
    hp, wp = infer.bucket_size(h, args.buckets), infer.bucket_size(w, args.buckets)

    def fwd(p, v, i, t):
        # As fuse does for any size: reflect-pad to the shape bucket, run, crop back (fuse
        # picks fine buckets for a folder of one size: 480x640 runs unpadded).
        pad = lambda x: jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="reflect")
        return model.apply({"params": p}, pad(v), pad(i), t)[:, :h, :w].astype(jnp.float32)

    t0 = time.perf_counter()
    lowered = jax.jit(fwd).lower(params, vis, ir, text)
    return {
        "key": (kind, h, w, batch, dtype),
        "fwd": fwd,
        "inputs": (params, vis, ir, text),
        "lowered": lowered,
        "lower_s": time.perf_counter() - t0,
        "padded": f"{hp}x{wp}",
    }


def measure(prep: dict, compiled, compile_s: float, args) -> dict:
    """Params, XLA FLOPs, median latency and memory of a configuration's compiled forward:
    its record (compile_s: trace + lower + compile)."""
    kind, h, w, batch, dtype = prep["key"]
    params, vis, ir, text = prep["inputs"]
    cost = one_piece_cost(prep["fwd"], prep["inputs"]) if args.flops else {}
    peak_reset()  # after compiling: XLA's compiler alone can take more memory than a call
    mem = compiled.memory_analysis()
    planned = (
        mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        if mem is not None
        else float("nan")
    )
    for _ in range(args.warmup):
        compiled(params, vis, ir, text).block_until_ready()
    times, spent = [], 0.0
    while len(times) < args.runs and (not times or spent < args.budget):
        t0 = time.perf_counter()
        compiled(params, vis, ir, text).block_until_ready()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return {
        "model": kind,
        "height": h,
        "width": w,
        "batch": batch,
        "dtype": dtype,
        "compile_s": round(compile_s, 3),
        "median_ms": round(1000 * statistics.median(times), 2),
        "images_per_s": round(batch / statistics.median(times), 2),
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "gflops": round(float(cost.get("flops", float("nan"))) / 1e9, 3) if cost else None,
        "runs": len(times),
        "padded": prep["padded"],
        "xla_mb": round(planned / 2**20, 1),
        "peak_mb": round(peak_mb(), 1),
    }


def configurations(grid: list, args, t0: float):
    """(key, record) per configuration in grid order; stops at --max-s. A failed configuration
    (e.g. out of memory) is a record with its error, and the ones after it still run.

    --compile-threads N: configurations are traced here and compiled in N threads, up to N
    ahead of the one being timed (XLA compiles outside the GIL; a GPU compile is mostly host
    work: 34 s for the student at 128² on the H200). A record then says how many compiles ran
    beside its timed calls ("compiles_beside"), and its compile_s is wall time in a shared pool.
    Without it, one thread compiles each configuration as its turn comes.
    """

    def failed(key, e):
        return dict(zip(("model", "height", "width", "batch", "dtype"), key, strict=True)) | {
            "error": f"{type(e).__name__}: {str(e)[:300]}"
        }

    def late(key):
        if args.max_s and time.perf_counter() - t0 > args.max_s:
            kind, h, w, batch, dtype = key
            print(f"--max-s {args.max_s:g}: {kind} {h}x{w} batch {batch} {dtype} and after skipped")
            return True
        return False

    def compile_timed(lowered):
        t = time.perf_counter()
        return lowered.compile(), time.perf_counter() - t

    threads = max(1, args.compile_threads)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    ahead, todo = [], list(grid)  # ahead: (key, prep or exception, future or None)
    try:
        while todo or ahead:
            while todo and len(ahead) < threads:
                if late(todo[0]):
                    todo = []
                    break
                key = todo.pop(0)
                try:
                    prep = prepare(*key, args)
                    ahead.append((key, prep, pool.submit(compile_timed, prep["lowered"])))
                except Exception as e:
                    ahead.append((key, e, None))
            if not ahead:
                return
            key, prep, fut = ahead.pop(0)
            try:
                if fut is None:
                    raise prep
                compiled, compile_s = fut.result()
                beside = sum(not f.done() for _, _, f in ahead if f is not None)
                rec = measure(prep, compiled, prep["lower_s"] + compile_s, args)
                if args.compile_threads:
                    rec.update(compile_threads=threads, compiles_beside=beside)
            except Exception as e:
                rec = failed(key, e)
            del prep, fut
            yield key, rec
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def bench_onnxruntime(h: int, w: int, args) -> dict:
    """Median latency of the student's ONNX graph in onnxruntime, on the JAX row's weights and
    inputs (batch 1), padded as `prepare` pads them; "compile" = session creation."""
    import onnxruntime as ort

    from dtpf_jax import export_onnx

    cfg = networks.model_config("student")
    params = infer.random_params(cfg)
    rng = np.random.default_rng(0)
    vis, ir = rng.random((1, h, w, 3), np.float32), rng.random((1, h, w, 1), np.float32)
    hp, wp = infer.bucket_size(h, args.buckets), infer.bucket_size(w, args.buckets)
    pad = lambda x: np.pad(x, ((0, 0), (0, 0), (0, hp - h), (0, wp - w)), mode="reflect")
    feed = {"vis": pad(vis.transpose(0, 3, 1, 2)), "ir": pad(ir.transpose(0, 3, 1, 2))}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.ort_threads, 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(
        export_onnx.student_onnx(params, cfg).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        sess.run(None, feed)
    times, spent = [], 0.0
    while len(times) < args.runs and (not times or spent < args.budget):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return {
        "model": "student (onnxruntime)",
        "height": h,
        "width": w,
        "batch": 1,
        "dtype": "float32",
        "compile_s": round(compile_s, 3),
        "median_ms": round(1000 * statistics.median(times), 2),
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "gflops": None,
        "runs": len(times),
        "padded": f"{hp}x{wp}",
        "ort_threads": args.ort_threads,
    }


def bench_cli(n: int, h: int, w: int, folder: str | None) -> dict:
    """Images/s of the fuse CLI's loop (read, fuse, write) with the default student."""
    from dtpf_jax import demo, fuse, plan
    from dtpf_jax.images import write_png_atomic

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        if folder:
            vis_dir, ir_dir = pathlib.Path(folder) / "vi", pathlib.Path(folder) / "ir"
        else:
            vis_dir, ir_dir = root / "vis", root / "ir"
            vis_dir.mkdir(), ir_dir.mkdir()
            vis, ir = demo.make_pair(h, w)
            for k in range(n):
                write_png_atomic(vis_dir / f"{k:04d}.png", vis)
                write_png_atomic(ir_dir / f"{k:04d}.png", ir)
        t0 = time.perf_counter()
        jobs = plan.plan_jobs(str(vis_dir), str(ir_dir), root / "out")
        plan.check_inputs(jobs)
        model = infer.load_model("student")
        plan.prepare_out(root / "out")
        buckets = infer.choose_buckets([j.size for j in jobs])  # as the CLI's --buckets auto
        stats = fuse.run(jobs, model, [None] * len(jobs), "auto", "rgb", 0, True, 16, buckets)
        wall = time.perf_counter() - t0
    hh, ww = jobs[0].size
    return {
        "model": "student (fuse CLI)",
        "height": hh,
        "width": ww,
        "batch": 1,
        "dtype": "float32",
        "compile_s": round(stats.compile_s, 3),
        "median_ms": round(1000 / stats.images_per_s, 2),
        "params": int(sum(np.size(x) for x in jax.tree.leaves(model.params))),
        "gflops": None,
        "images": stats.images,
        "images_per_s": round(stats.images_per_s, 3),
        "wall_s": round(wall, 2),
    }


def write_json(path: str, records: list[dict]) -> None:
    tmp = pathlib.Path(f"{path}.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)


def official_ms(rec: dict) -> float | None:
    if rec["batch"] != 1 or rec["dtype"] != "float32":
        return None
    h, w = OFFICIAL_SIZE.get((rec["height"], rec["width"]), (rec["height"], rec["width"]))
    return OFFICIAL_MS.get((rec["model"], h, w))


def table(records: list[dict], cpu: bool = True) -> str:
    """Table VII-style text: ours beside the official PyTorch CPU figures, then the ratios."""
    cols = ("model", "input", "batch", "dtype", "params", "GFLOPs", "compile s", "median ms")
    cols += ("ms/img", "XLA MB", "peak MB", "torch ms", "speed-up")
    widths = (22, 9, 6, 6, 8, 8, 10, 10, 9, 8, 8, 10, 9)
    fmt = lambda cells: "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    lines = [fmt(cols), "-" * sum(widths)]
    for r in records:
        if "error" in r:
            where = f"{r['model']} {r['height']}x{r['width']} batch {r['batch']} {r['dtype']}"
            lines.append(f"{where}: {r['error']}")
            continue
        ref = official_ms(r) if cpu else None
        star = "*" if ref and (r["height"], r["width"]) in OFFICIAL_SIZE else ""
        gf = f"{r['gflops']:.1f}" if r.get("gflops") is not None else "-"
        lines.append(
            fmt(
                (
                    r["model"],
                    f"{r['height']}x{r['width']}",
                    r["batch"],
                    DTYPE_LABEL.get(r["dtype"], r["dtype"]),
                    f"{r['params'] / 1e6:.2f}M",
                    gf,
                    f"{r['compile_s']:.1f}",
                    f"{r['median_ms']:.1f}",
                    f"{r['median_ms'] / r['batch']:.1f}",
                    f"{r['xla_mb']:.0f}" if "xla_mb" in r else "-",
                    f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-",
                    f"{ref}{star}" if ref else "-",
                    f"{ref / r['median_ms']:.2f}x" if ref else "-",
                )
            )
        )
    key = lambda r: (r["model"], r["height"], r["width"], r["batch"], r["dtype"])
    ok = [r for r in records if "error" not in r]
    by_key, notes = {key(r): r for r in ok}, []
    for s in ok:
        t = by_key.get(("teacher", *key(s)[1:]))
        if s["model"] == "student" and t:
            ref_s, ref_t = official_ms(s), official_ms(t)
            off = f" (official torch on CPU: {ref_s / ref_t:.2f})" if ref_s and ref_t else ""
            notes.append(
                f"student/teacher latency {s['height']}x{s['width']} batch {s['batch']} "
                f"{s['dtype']}: {s['median_ms'] / t['median_ms']:.2f}{off}"
            )
    notes += [
        "torch ms: official PyTorch on the project CPU (DESIGN §11: torch 2.13, 2 threads, "
        "batch 1, fp32), shown on CPU only; * = its 448x640 figure (the official nets cannot "
        "take 480x640; ours runs it as fuse does, padded to its --buckets shape bucket: fine "
        "(default) 480x640 as is, coarse 512x640; the padding is included in the time)",
        "GFLOPs: XLA cost analysis of the whole forward in one piece (elementwise ops and "
        "padding included); "
        "DESIGN §2 counts conv/matmul only: student 16.3, teacher 110.5 at 128x128",
        "student (onnxruntime): the student's ONNX graph (dtpf_jax.export_onnx) in "
        "onnxruntime, CPU, --ort-threads intra-op threads, the JAX row's weights and inputs; "
        "compile s: session creation",
        "XLA MB: planned arguments + temporaries + outputs; peak MB: "
        + ("process RSS high-water mark" if cpu else "allocator peak so far in this process"),
    ]
    return "\n".join(lines + [""] + notes)


def header() -> str:
    dev = jax.devices()[0]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} devices), "
        f"{os.cpu_count()} CPUs, load {load}; jax {jax.__version__}, python "
        f"{platform.python_version()}\nGLIBC_TUNABLES: "
        f"{os.environ.get('GLIBC_TUNABLES') or 'unset (glibc default)'}"
        f"; XLA_FLAGS: {os.environ.get('XLA_FLAGS') or 'unset'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1, fp32, 128² and 256x320, 3 runs")
    p.add_argument("--models", default="student,teacher")
    p.add_argument("--sizes", default="128x128,480x640", help="HxW list")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--runs", type=int, default=10, help="timed calls per config (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--budget", type=float, default=120.0, help="max seconds of timed calls")
    p.add_argument(
        "--buckets",
        default="fine",
        choices=infer.BUCKETS,
        help="the shape bucket each size is padded to, as fuse --buckets (fine: what fuse "
        "picks for a folder of one size; coarse: 480x640 runs at 512x640)",
    )
    p.add_argument(
        "--ort-threads",
        type=int,
        default=2,
        help="onnxruntime threads for the student's batch-1 fp32 ONNX rows (0: no such rows)",
    )
    p.add_argument("--cli-images", type=int, default=8, help="0: skip the CLI figure")
    p.add_argument("--cli-size", default="480x640", help="synthetic CLI image size HxW")
    p.add_argument("--cli-folder", help="a split folder with vi/ and ir/ instead (e.g. msrs/test)")
    p.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    p.add_argument(
        "--flops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="XLA's FLOP count of each configuration (one more compile each)",
    )
    p.add_argument(
        "--max-s", type=float, default=0.0, help="start no configuration after S seconds (0: off)"
    )
    p.add_argument(
        "--compile-threads",
        type=int,
        default=0,
        metavar="N",
        help="compile up to N configurations ahead, side by side, of the one being timed",
    )
    p.add_argument("--tiny", action="store_true", help="dim 8, no blocks: for rehearsals only")
    p.add_argument(
        "--large",
        nargs="?",
        const=benchmark_large.SIZES,
        default="",
        metavar="HxW,...",
        help=f"big frames through the fuse CLI, cold and warm (default {benchmark_large.SIZES})",
    )
    p.add_argument("--large-pair", metavar="VIS,IR", help="resize this pair (default: demo)")
    p.add_argument(
        "--large-passes",
        type=int,
        default=1,
        metavar="N",
        help="big frames: fuse --large-passes N (2: tiles on the frame's TSAB statistics)",
    )
    p.add_argument(
        "--large-check-pixels",
        type=int,
        default=benchmark_large.CHECK_PIXELS,
        metavar="N",
        help="--large-check only up to N pixels (a full pass takes ~1.2 GiB a megapixel)",
    )
    p.add_argument(
        "--large-check", action="store_true", help="big frames: distance to a full-frame pass"
    )
    p.add_argument(
        "--malloc-tuned", action="store_true", help="re-run under the CLIs' dtpf_jax.malloc.TUNED"
    )
    args = p.parse_args(argv)
    if args.malloc_tuned and os.environ.get("GLIBC_TUNABLES") != malloc.TUNED:
        # glibc reads its tunables at process start: only a fresh process gets them.
        malloc.reexec_tuned([sys.executable, *sys.argv])
    if args.quick:
        args.sizes, args.batches, args.dtypes, args.runs = "128x128,256x320", "1", "float32", 3
        args.cli_images, args.cli_size = min(args.cli_images, 4), "256x320"
    try:  # compile_s must be a real compile, not a persistent-cache hit
        jax.config.update("jax_enable_compilation_cache", False)
    except AttributeError:
        jax.config.update("jax_compilation_cache_dir", None)
    print(header(), flush=True)
    ort_rows = args.ort_threads > 0 and jax.devices()[0].platform == "cpu" and not args.tiny
    if ort_rows and importlib.util.find_spec("onnxruntime") is None:
        print('onnxruntime rows skipped: pip install "dtpf-jax[onnx]"')
        ort_rows = False
    records, t0 = [], time.perf_counter()
    env = os.environ.get("GLIBC_TUNABLES") or "default"
    device = jax.devices()[0].device_kind
    grid = [
        (kind, dtype, h, w, batch)
        for kind in _list(args.models)
        for dtype in _list(args.dtypes)
        for h, w in map(_size, _list(args.sizes))
        for batch in _list(args.batches, int)
    ]
    grid = [(kind, h, w, batch, dtype) for kind, dtype, h, w, batch in grid]
    for (kind, h, w, batch, dtype), rec in configurations(grid, args, t0):
        rec.update(device=device, glibc_tunables=env, tiny=args.tiny)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if kind == "student" and batch == 1 and dtype == "float32" and ort_rows:
            try:
                rec = bench_onnxruntime(h, w, args)
            except Exception as e:
                rec = {"model": "student (onnxruntime)", "height": h, "width": w, "batch": 1}
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec.update(device=device, glibc_tunables=env)
            print(json.dumps(rec), flush=True)
            records.append(rec)
        if args.json:  # after each: a run cut short keeps what it measured
            write_json(args.json, records)
    if args.cli_images:
        try:
            rec = bench_cli(args.cli_images, *_size(args.cli_size), args.cli_folder)
            print(json.dumps(rec), flush=True)
            records.append(rec)
        except ImportError as e:
            print(f"fuse CLI figure skipped: {e}")
    large = []
    for h, w in map(_size, _list(args.large)):
        check = args.large_check and h * w <= args.large_check_pixels
        large.append(benchmark_large.bench(h, w, args.large_pair, check, args.large_passes))
        print(json.dumps(large[-1]), flush=True)
        if args.json:
            write_json(args.json, records + large)
    for r in records + large:
        r.update(device=device, glibc_tunables=env)
    print()
    if records:
        print(table(records, cpu=jax.devices()[0].platform == "cpu"))
    if large:
        print(benchmark_large.table(large))
    if args.json:
        write_json(args.json, records + large)
        print(f"records: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
