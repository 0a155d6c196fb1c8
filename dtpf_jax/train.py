"""Teacher, student and distillation training: data-parallel steps, validation, checkpoints.

  python -m dtpf_jax.train --config configs/teacher.py[:variants] [--workdir DIR] [--config.x=y]

A thin absl main around `train_and_evaluate(config, workdir)`. The workdir (default
runs/<config.name>) holds config.json, checkpoints/ (orbax: train state + data iterator, best k
by validation quality + the latest) and tensorboard/; a rerun resumes from the latest step.
Several hosts: one process per host with --multihost, which joins them
(parallel.init_processes: --coordinator HOST:PORT --num_processes N --process_id I, or what
the cluster tells: SLURM, Open MPI, Kubernetes, Cloud TPU); the global batch is config.batch_size.
Text embeddings come from the cache file made beforehand (dtpf_jax.text); CLIP never runs here.
Stages (config.stage): 'teacher' and 'student' train config.model on the fusion loss (the
student ignores the text), 'distill' trains the student against a frozen teacher;
config.init_weights starts a fresh run from a params-only weight file (fine-tuning).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable

import grain
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from dtpf_jax import (
    checkpoint,
    data,
    datasets,
    images,
    metrics,
    parallel,
)
from dtpf_jax.infer import Fuser
from dtpf_jax.report import NonFiniteLossError, Reporter
from dtpf_jax.steps import LearningRates, State, abstract_state, build_step, init_state


class OutOfMemoryError(RuntimeError):
    """A program wanted more memory than its device has (XLA's RESOURCE_EXHAUSTED)."""


class OutOfMemoryHint:
    """`with hint:` turns XLA's out-of-memory error inside into an OutOfMemoryError that says
    where it happened and what to do; reusable, e.g. once per step of a loop."""

    def __init__(self, where: str, fix: str):
        self.where, self.fix = where, fix

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, error, tb) -> None:
        if isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
            xla = str(error).strip().splitlines()[0]
            raise OutOfMemoryError(f"out of memory in {self.where} ({xla}); {self.fix}") from error


_CGROUP_MEMORY = (  # (limit, usage) of cgroup v2, v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_host_memory() -> int | None:
    """Bytes the host can still give (Linux: MemAvailable, or what the cgroup's limit leaves
    where that is lower); None where unknown."""
    found = []
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)  # in kB
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in _CGROUP_MEMORY:
        try:
            found.append(
                int(pathlib.Path(limit).read_text()) - int(pathlib.Path(usage).read_text())
            )
        except (OSError, ValueError):  # absent, or v2's "max" (no limit)
            pass
    return min(found) if found else None


# The process grows a little past XLA's plan on its first step (allocator slack): by 2 % of it
# for the teacher and 4 % for the student at batch 4 on XLA:CPU (2026-12-05).
PLAN_SLACK = 1.05


class MemoryCheckedStep:
    """A jitted CPU step compiled ahead on its first call, and run only where the memory XLA
    plans for it fits what the host has left. Past that the kernel's OOM killer ends the
    process without a word (the teacher at batch 8 on a 24 GiB host, 2 minutes in) instead of
    XLA's out-of-memory error, which OutOfMemoryHint turns into one line."""

    def __init__(self, jitted: Callable, hint: OutOfMemoryHint):
        self.jitted, self.hint, self.compiled = jitted, hint, None

    def __call__(self, *args):
        if self.compiled is None:
            compiled = self.jitted.lower(*args).compile()
            mem, free = compiled.memory_analysis(), available_host_memory()
            if mem is not None and free is not None:
                # Work buffers and outputs; donated arguments' buffers are reused (alias).
                plan = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                if plan * PLAN_SLACK > free:
                    raise OutOfMemoryError(
                        f"out of memory in {self.hint.where}: XLA plans {plan / 1e9:.1f} GB for "
                        f"it ({plan * PLAN_SLACK / 1e9:.1f} with the process's own growth), the "
                        f"host has {free / 1e9:.1f} GB available; {self.hint.fix}"
                    )
            self.compiled = compiled
        return self.compiled(*args)


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config.json a run wrote into its workdir (JSON lists back to tuples)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise checkpoint.WeightsError(f"{path}: not found; is {workdir} a training workdir?")
    tuples = lambda d: {
        k: tuples(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
        for k, v in d.items()
    }
    return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))


# Model settings that change how a network is computed, not its parameters or function.
_NOT_ARCHITECTURE = ("remat",)


def _model_differences(a, b, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fields in which two model configs differ (compared as JSON, so tuples equal lists)."""
    keys = (set(a) | set(b)) - set(ignore) - set(_NOT_ARCHITECTURE)
    return sorted(k for k in keys if json.dumps(a.get(k)) != json.dumps(b.get(k)))


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Teacher params (replicated) from config.teacher_weights or config.teacher_workdir."""
    if config.teacher_weights:
        params, model_cfg, _ = checkpoint.load_params(config.teacher_weights)
        params, source = parallel.replicate(params, mesh), config.teacher_weights
    else:
        tconfig = load_workdir_config(config.teacher_workdir)
        model_cfg = tconfig.model
        mngr = checkpoint.train_manager(config.teacher_workdir, read_only=True)
        step = checkpoint.select_step(mngr, config.teacher_step)
        state = checkpoint.restore_train_state(mngr, step, abstract_state(tconfig, mesh))
        params, source = state["params"]["net"], f"{mngr.directory} step {step}"
        mngr.close()
    differ = _model_differences(model_cfg, config.teacher_model)
    if differ:
        raise checkpoint.WeightsError(
            f"teacher {source} was built with other model settings than config.teacher_model "
            f"({', '.join(f'{k}={model_cfg.get(k)!r}' for k in differ)}); set "
            "--config.teacher_model.<field> to match or point to the matching teacher"
        )
    logging.info("teacher params from %s", source)
    return params


def init_from_weights(state: State, config: ml_collections.ConfigDict, mesh) -> State:
    """A fresh state whose network params come from the params-only file config.init_weights.

    Fine-tuning: the optimizer state stays fresh and the step at 0. The file must hold the
    network config.model describes.
    """
    params, model_cfg, _ = checkpoint.load_params(config.init_weights)
    differ = _model_differences(model_cfg, config.model, ignore=("dtype",))
    if differ:
        raise checkpoint.WeightsError(
            f"{config.init_weights}: built with other model settings than config.model "
            f"({', '.join(f'{k}={model_cfg.get(k)!r}' for k in differ)}); pass weights of this "
            "network or set --config.model.<field> to match"
        )
    # load_params checked every tensor against the network of the file's config, which is
    # config.model's up to the compute dtype: the tree is the one the state holds.
    net = parallel.replicate(params, mesh)
    logging.info("network params initialised from %s", config.init_weights)
    return state | {"params": state["params"] | {"net": net}}


def train_pairs(cfg: ml_collections.ConfigDict) -> list[datasets.Pair]:
    """Training pairs minus every pair whose name is a validation pair's.

    The same scene can sit in two training folders (16 of the 34 msrs/train frames are also in
    msrs_128/train), so a split by position alone would leak validation scenes into training.
    """
    pairs = datasets.source_pairs(cfg, "train")
    held_out = {p.name for p in datasets.source_pairs(cfg, "val")} if cfg.val else set()
    kept = [p for p in pairs if p.name not in held_out]
    if len(kept) < len(pairs):
        dropped = sorted({f"{p.split}/{p.name}" for p in pairs if p.name in held_out})
        shown = ", ".join(dropped[:8])
        logging.info(
            "left out %d training pairs named as validation pairs: %s", len(dropped), shown
        )
    return kept


def validate(
    fuser: Fuser, params, val_ds: grain.MapDataset, config: ml_collections.ConfigDict
) -> tuple[metrics.Scores, np.ndarray]:
    """Mean quality metrics over the validation pairs and a vis | ir | fused image of the first."""
    params = jax.tree.map(lambda x: x.addressable_data(0), params)  # one device, not N copies
    scores, grid = [], None
    for ex in data.iter_pairs(val_ds):
        emb = ex["text_emb"][None] if fuser.text_dim else None
        fused = fuser(params, ex["vis"], ex["ir"], emb, mode=config.val_mode)[0]
        scores.append(
            metrics.evaluate_float(
                fused, ex["vis"], ex["ir"][..., 0], config.val_convention, metrics.QUALITY_METRICS
            )
        )
        if grid is None:
            grid = images.to_uint8(np.concatenate([ex["vis"], ex["ir"].repeat(3, -1), fused], 1))
    return metrics.mean_scores(scores), grid


def run_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data as the run reads it: the text-free 'student' stage reads no embeddings.

    Its captions (if any) set the per-sample task weights only, so fine-tuning a student needs
    no CLIP and no embedding cache.
    """
    cfg = ml_collections.ConfigDict(config.data.to_dict())
    if config.stage == "student":
        cfg.text_dim = 0
    return cfg


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    step_fn: Callable | None = None,
) -> dict:
    """Train config.stage in workdir, resuming from its latest checkpoint; the last metrics.

    step_fn: the train step already built (and compiled) for config, as build_step makes it
    (scripts/device_train.py hands in its probe's program: no second trace on a GPU).
    """
    workdir = pathlib.Path(workdir).resolve()
    mesh = parallel.make_mesh()
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        images.atomic_write(workdir / "config.json", config.to_json_best_effort(indent=2))
    check_shared_workdir(workdir)
    logging.info(
        "%s stage, %d devices (%d processes), global batch %d, workdir %s",
        config.stage,
        mesh.size,
        jax.process_count(),
        config.batch_size,
        workdir,
    )
    rates = LearningRates(config, t_loop=0.0)  # a bad schedule fails here, before any loading
    frozen = (load_teacher(config, mesh),) if config.stage == "distill" else ()
    per_device, platform = config.batch_size // mesh.size, mesh.devices.flat[0].platform
    devices = f"{mesh.size} {platform} device{'s' * (mesh.size > 1)}"
    step_memory = OutOfMemoryHint(
        f"the {config.stage} train step, {per_device} crop{'s' * (per_device > 1)} of "
        f"{config.data.crop}² per device (global batch {config.batch_size} over {devices})",
        f"lower --config.batch_size (a multiple of {mesh.size}), or train on more devices or "
        "ones with more memory",
    )
    if step_fn is None:
        step_fn = build_step(config, mesh)
        # One process (several compile through parallel.StartTogether); a stand-in step
        # without .lower (tests patch build_step) runs as it is.
        if platform == "cpu" and jax.process_count() == 1 and hasattr(step_fn, "lower"):
            step_fn = MemoryCheckedStep(step_fn, step_memory)
    data_cfg = run_data_config(config)
    pairs = train_pairs(data_cfg)
    train_iter = data.make_train_iter(
        data_cfg, global_batch=config.batch_size, seed=config.seed, mesh=mesh, pairs=pairs
    )
    val_ds = data.make_eval_pairs(data_cfg, "val") if config.eval_every else None
    fuser = Fuser(config.model)
    mngr = checkpoint.train_manager(workdir, config.keep_best)
    start = mngr.latest_step() or 0
    if start:
        state = checkpoint.restore_train_state(
            mngr, start, abstract_state(config, mesh), train_iter
        )
        logging.info("resumed from step %d of %s", start, mngr.directory)
    else:
        state = init_state(config, mesh)
        if config.get("init_weights"):
            state = init_from_weights(state, config, mesh)
    if start >= config.steps:
        logging.info("already at step %d of %d: nothing to train", start, config.steps)
    reporter = Reporter(config, workdir, start, len(pairs))
    last_good = f"step {start} in {mngr.directory}" if start else "none"
    max_s, t_loop = rates.max_s, time.monotonic()  # max_s: config.max_train_s
    rates.t_loop = t_loop
    # Time decides the last step and time_cosine's rates: every process must read one clock,
    # or one would stop and save while the others wait in the next step's all-reduce.
    shared_clock = max_s > 0 and jax.process_count() > 1
    val_memory = OutOfMemoryHint(
        f"validation ({config.val_mode} mode)",
        "set --config.val_mode=tiles (128² windows) or --config.eval_every=0 (no validation)",
    )
    try:
        for step in range(start + 1, config.steps + 1):
            batch = next(train_iter)
            lr = rates(step)
            with reporter.timed_dispatch(step), step_memory:
                state, step_metrics = step_fn(state, *frozen, lr, batch)
                # Metrics are read one step late so that the device is never idle waiting for us.
                reporter.push(step, step_metrics, last_good, float(lr))
            now = time.monotonic()
            if shared_clock:
                now = t_loop + parallel.first_process_value(now - t_loop)
            rates.observe(step, now)
            reporter.total = rates.horizon
            timed_out = max_s > 0 and now - t_loop >= max_s
            last = step == config.steps or timed_out
            evaluate = bool(config.eval_every) and (step % config.eval_every == 0 or last)
            periodic = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            if evaluate or periodic or last:
                with step_memory:
                    reporter.flush(last_good)  # a non-finite step must never be saved
                with reporter.paused():
                    quality = None
                    if evaluate:
                        with val_memory:
                            scores, grid = validate(fuser, state["params"]["net"], val_ds, config)
                        quality = metrics.quality(scores)
                        reporter.validation(step, scores, quality, grid, len(val_ds))
                    checkpoint.save_train_state(mngr, step, state, train_iter, quality)
                last_good = f"step {step} in {mngr.directory}"
            if timed_out and step < config.steps:
                logging.info(
                    "max_train_s: %.0f s passed; stopping at step %d of %d (a rerun resumes)",
                    max_s,
                    step,
                    config.steps,
                )
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        reporter.close()
    return reporter.last


def check_shared_workdir(workdir: pathlib.Path) -> None:
    """With several processes: every one must see the config.json process 0 has just written.

    orbax writes the arrays from process 0 and each process's data-iterator position into the
    one workdir, so a folder on each host's own disk would give checkpoints no run can resume.
    """
    parallel.wait_for_all_processes("config.json written")
    if jax.process_count() > 1 and not (workdir / "config.json").is_file():
        raise images.DataError(
            f"{workdir}: process {jax.process_index()} does not see the config.json process 0 "
            "wrote there; put the workdir on a filesystem every host shares (NFS, a cluster "
            "filesystem) and pass the same --workdir to every process"
        )


def _fail(message: str) -> None:
    """Exit with `message`; with several processes at once, without JAX's shutdown barrier.

    The other processes may be waiting in the step's all-reduce for this one: they stop when
    its heartbeats do (--heartbeat_timeout), saying that another task died. A normal exit
    would wait for them at the shutdown barrier first, for minutes.
    """
    if jax.process_count() == 1:
        sys.exit(message)
    print(f"[process {jax.process_index()}] {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """train_and_evaluate for the CLI: known failures end with a one-line error, exit status 1."""
    try:
        train_and_evaluate(config, workdir)
    except NonFiniteLossError as e:
        logging.error("%s", e)
        _fail(f"error: {e}")
    except (images.DataError, checkpoint.WeightsError, OutOfMemoryError) as e:
        _fail(f"error: {e}")
    except Exception:
        if jax.process_count() == 1:
            raise
        traceback.print_exc()
        _fail("error: this process failed (traceback above); the others stop too")


def start_process(f: flags.FlagValues) -> None:
    """What the CLI does before training: join the other processes, compile cache, logging."""
    explicit = {"coordinator": f.coordinator, "num_processes": f.num_processes,
                "process_id": f.process_id}  # fmt: skip
    if f.multihost:
        try:
            parallel.init_processes(**explicit, heartbeat_timeout=f.heartbeat_timeout)
        except ValueError as e:  # what jax.distributed says of missing or wrong values
            hint = (
                ""
                if None not in explicit.values()
                else " No cluster detected? Give every process --coordinator HOST:PORT (process "
                "0's host, a free port), --num_processes N and its --process_id"
            )
            raise app.UsageError(f"--multihost: {e}{hint}") from None
    elif any(v is not None for v in explicit.values()):
        given = ", ".join(f"--{k}" for k, v in explicit.items() if v is not None)
        raise app.UsageError(f"{given} describe a multi-process run: add --multihost")
    if f.compile_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compile_cache))
    # orbax reports every save at INFO through absl; keep its warnings, drop the chatter.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start_process(flags.FLAGS)
    config = flags.FLAGS.config
    run(config, flags.FLAGS.workdir or os.path.join("runs", config.name))


def define_flags() -> None:
    """The CLI's flags (defined on demand so that importing this module defines none)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:variants]")
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("workdir", None, "run folder (default runs/<config.name>); resumes")
    flags.DEFINE_bool(
        "multihost",
        False,
        "one process of a multi-process run (one per host): jax.distributed.initialize(), "
        "with what is not given below detected (SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )
    flags.DEFINE_string("coordinator", None, "with --multihost: HOST:PORT of process 0")
    flags.DEFINE_integer("num_processes", None, "with --multihost: processes in all", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "with --multihost: this one, 0..n-1", lower_bound=0)
    flags.DEFINE_integer(
        "heartbeat_timeout",
        100,
        "with --multihost: seconds after which a process that died is noticed by the others, "
        "which then stop with an error",
        lower_bound=1,
    )
    flags.DEFINE_string(
        "compile_cache",
        "~/.cache/dtpf_jax/jax",
        "persistent XLA compilation cache ('' = off; $JAX_COMPILATION_CACHE_DIR wins)",
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
