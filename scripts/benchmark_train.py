"""Time the training steps of the full-size networks on the devices present.

  python scripts/benchmark_train.py                      # batch 4 per device, 128², CPU or GPU
  python scripts/benchmark_train.py --batch 16 --json gpu16.json
  python scripts/benchmark_train.py --stages student --steps 3

Stages: `student` (the student's own step, plain fusion loss with the default weights),
`distill` (student step with the teacher's forward pass and the distillation loss), `teacher`
(text-guided teacher step). Each stage runs in its own process, so its peak RSS is its own;
compile time is measured without a persistent compilation cache. Step times are medians
after two warm-up steps (the first execution of a program carries a one-off cost). The
official PyTorch figure (DESIGN §11: student, batch 4 at 128², L1 loss, AdamW, this 2-core
CPU) is printed beside the CPU results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from dtpf_jax.malloc import TUNED as TUNED_MALLOC

OFFICIAL_CPU_S = {"student": 11.4}  # s/step, official code, batch 4, 128², 2-core CPU


def stage_config(stage: str):
    """configs/teacher.py or configs/distill.py; `student` is the teacher step on the student."""
    name = "distill" if stage == "distill" else "teacher"
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if stage == "student":
        from dtpf_jax.networks import model_config

        config.model = model_config("student")
    return config


def run_stage(stage: str, batch: int, size: int, steps: int) -> dict:
    """Compile and time one stage's step in this process."""
    import jax
    import numpy as np

    from dtpf_jax import losses, networks, parallel, train

    config = stage_config(stage)
    mesh = parallel.make_mesh()
    global_batch = batch * mesh.size
    rng = np.random.default_rng(0)
    host = {
        "vis": rng.random((global_batch, size, size, 3), dtype=np.float32),
        "ir": rng.random((global_batch, size, size, 1), dtype=np.float32),
        "text_emb": rng.normal(size=(global_batch, 512)).astype(np.float32),
        "weights": np.tile(losses.default_weights("ivf"), (global_batch, 1)),
    }
    data = parallel.shard_batch(host, mesh)
    state = train.init_state(config, mesh)
    frozen = ()
    if stage == "distill":
        teacher = networks.build_model(config.teacher_model)
        t_params = networks.init_params(teacher, jax.random.key(1))
        frozen = (jax.device_put(t_params, parallel.replicated(mesh)),)
    jax.block_until_ready((state, frozen))
    t = time.perf_counter()
    lr = train.LearningRates(config, 0.0)(1)
    step = train.build_step(config, mesh).lower(state, *frozen, lr, data).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(2 + steps):
        t = time.perf_counter()
        state, metrics = step(state, *frozen, lr, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[2:])
    device = jax.devices()[0]
    peak_dev = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return {
        "stage": stage,
        "device": f"{mesh.size} x {device.device_kind}",
        "platform": device.platform,
        "batch_per_device": batch,
        "global_batch": global_batch,
        "size": size,
        "compile_s": compile_s,
        "first_step_s": times[0],
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "images_per_s": global_batch / step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mib": None if peak_dev is None else peak_dev / 2**20,
        "loss": float(metrics["loss"]),
        "jax": jax.__version__,
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'stage':<8} {'devices':<14} {'batch':>5} {'size':>4} {'compile s':>9} "
        f"{'1st step s':>10} {'step s':>8} {'steps/s':>8} {'img/s':>7} {'peak RSS MiB':>12} "
        f"{'dev MiB':>8}  official PyTorch CPU"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        official = OFFICIAL_CPU_S.get(r["stage"])
        ref = f"{official:.1f} s/step (L1 loss, batch 4, 128²)" if official else "-"
        dev = "-" if r["peak_device_mib"] is None else f"{r['peak_device_mib']:.0f}"
        lines.append(
            f"{r['stage']:<8} {r['device']:<14} {r['global_batch']:>5} {r['size']:>4} "
            f"{r['compile_s']:>9.1f} {r['first_step_s']:>10.2f} {r['step_s']:>8.3f} "
            f"{r['steps_per_s']:>8.3f} {r['images_per_s']:>7.2f} {r['peak_rss_mib']:>12.0f} "
            f"{dev:>8}  {ref}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="student,distill,teacher")
    parser.add_argument("--batch", type=int, default=4, help="batch per device")
    parser.add_argument("--size", type=int, default=128, help="crop side (multiple of 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--tuned-malloc", action="store_true", help=f"run with GLIBC_TUNABLES={TUNED_MALLOC}"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one stage, JSON on stdout
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(args.child, args.batch, args.size, args.steps)))
        return 0
    env = dict(os.environ)
    if args.tuned_malloc:
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times without a persistent cache
    rows = []
    for stage in args.stages.split(","):
        cmd = [sys.executable, __file__, f"--child={stage}", f"--batch={args.batch}",
               f"--size={args.size}", f"--steps={args.steps}"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{stage}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["tuned_malloc"] = args.tuned_malloc
        print(_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else _table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
