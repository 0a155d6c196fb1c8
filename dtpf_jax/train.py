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

import functools
import json
import logging as std_logging
import math
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from jax import lax

from dtpf_jax import (
    checkpoint,
    data,
    datasets,
    images,
    losses,
    metrics,
    networks,
    parallel,
)
from dtpf_jax.infer import Fuser
from dtpf_jax.report import NonFiniteLossError, Reporter

State = dict[str, Any]


SCHEDULES = ("cosine", "official_cosine", "time_cosine")


class LearningRates:
    """Each step's learning rate, computed on the host (plain floats: no device sync) and
    passed to the jitted step.

    'cosine': one decay from optimizer.lr to lr_min over config.steps (optax's
    cosine_decay_schedule at count step - 1). 'official_cosine': the official
    CosineAnnealingLR(T_max) stepped every iteration and never reset, period 2 x official_t_max.
    'time_cosine' (needs config.max_train_s): one decay whose length is fitted again after every
    step so that it ends when max_train_s does, whatever the device's speed: the steps done +
    the measured steps/s x the seconds left, at most config.steps. The rate is measured from the
    end of the first step (its compile) on, so validations and checkpoints count against it as
    they count against the time. A resumed run fits the rest of the decay to its own
    max_train_s from the step it resumes at.
    """

    def __init__(self, config: ml_collections.ConfigDict, t_loop: float):
        if config.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {config.schedule!r}; use one of {', '.join(SCHEDULES)}"
            )
        self.kind, self.t_max = config.schedule, config.get("official_t_max", 0)
        self.max_s, self.t_loop = float(config.get("max_train_s", 0.0)), t_loop
        if self.kind == "time_cosine" and self.max_s <= 0:
            raise ValueError(
                "schedule 'time_cosine' fits the decay to config.max_train_s: set it (seconds)"
            )
        self.lr, self.lr_min = config.optimizer.lr, config.optimizer.lr_min
        self.cap = self.length = float(max(config.steps, 1))
        self.mark: tuple[int, float] | None = None  # (step, time) when the first step ended

    def __call__(self, step: int) -> np.float32:
        n = step - 1  # updates before this one: optax's count
        if self.kind == "official_cosine":
            phase = math.pi * n / self.t_max
        else:
            phase = math.pi * min(n, self.length) / self.length
        return np.float32(self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(phase)) / 2)

    def observe(self, step: int, now: float) -> None:
        """Step `step` has been dispatched; now is time.monotonic() after it."""
        if self.kind != "time_cosine":
            return
        if self.mark is None:
            self.mark = (step, now)
            return
        s0, t0 = self.mark
        if now > t0:
            left = max(self.max_s - (now - self.t_loop), 0.0)
            self.length = max(min(self.cap, step + (step - s0) / (now - t0) * left), 1.0)

    @property
    def horizon(self) -> int:
        """The last step as now planned (where the decay ends)."""
        return math.ceil(self.length)


def _unit_rate(count: jax.Array) -> float:
    """The optimizer's own learning rate: 1; the step scales the updates by LearningRates'.

    AdamW's decoupled weight decay is scaled by it too, as in optax.adamw(lr). A schedule and not
    the float 1.0, so that the state keeps optax's step count (earlier checkpoints restore).
    """
    del count
    return 1.0


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer at unit learning rate: the step multiplies its updates by the host's rate."""
    o = config.optimizer
    if o.name == "adamw":
        tx = optax.adamw(_unit_rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        tx = optax.sgd(_unit_rate)
    else:
        raise ValueError(f"unknown optimizer {o.name!r}; use 'adamw' or 'sgd'")
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx) if config.grad_clip else tx


def _abstract_features(model: networks.FusionNet) -> list[jax.ShapeDtypeStruct]:
    """Shapes of the decoder features [dec4, dec3, dec2, dec1] at 64², computing nothing."""
    c = model.config
    vis = jax.ShapeDtypeStruct((1, 64, 64, c.in_ch_a), jnp.float32)
    ir = jax.ShapeDtypeStruct((1, 64, 64, c.in_ch_b), jnp.float32)
    txt = jax.ShapeDtypeStruct((1, c.text_dim), jnp.float32) if c.text_dim else None
    params = jax.eval_shape(lambda: networks.init_params(model, jax.random.key(0)))
    fn = lambda p, v, i, t: model.apply({"params": p}, v, i, t, return_features=True)
    return jax.eval_shape(fn, params, vis, ir, txt)[1]


def make_init(config: ml_collections.ConfigDict) -> Callable[[jax.Array], State]:
    """Pure rng -> fresh train state {step, params: {net[, adapters]}, opt_state[, frozen]}."""
    tx = make_optimizer(config)
    # Params are float32 at any compute dtype: one init program (and compile) serves them all.
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.dtype = "float32"
    model = networks.build_model(model_cfg)

    def init(rng: jax.Array) -> State:
        k_net, k_adapters = jax.random.split(rng)
        params = {"net": networks.init_params(model, k_net)}
        state = {"step": jnp.zeros((), jnp.int32)}
        if config.stage == "distill":
            teacher = networks.build_model(config.teacher_model)
            feats = (_abstract_features(model), _abstract_features(teacher))
            adapters = losses.init_adapters(k_adapters, *feats)
            if losses.adapters_trainable(config.distill_form):
                params["adapters"] = adapters
            else:
                state["frozen"] = {"adapters": adapters}  # saved with the student, never optimised
        return state | {"params": params, "opt_state": tx.init(params)}

    return init


def init_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> State:
    """A fresh train state from config.seed, replicated over the mesh."""
    # Runs once: an unoptimised build (LLVM -O0) halves its compile time; values differ from
    # an optimised build by float rounding at most.
    init = jax.jit(
        make_init(config),
        out_shardings=parallel.replicated(mesh),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return init(jax.random.key(config.seed))


def abstract_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> State:
    """Shapes, dtypes and (replicated) shardings of the train state: the orbax restore target."""
    repl = parallel.replicated(mesh)
    shapes = jax.eval_shape(make_init(config), jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def _apply_gradients(state: State, grads, tx: optax.GradientTransformation, lr) -> State:
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state["params"], updates)
    return state | {"step": state["step"] + 1, "params": params, "opt_state": opt_state}


def _teacher_step(
    state: State, lr: jax.Array, batch: dict, *, model, tx, intensity_l2: float = 0.0
) -> tuple[State, dict]:
    def loss_fn(params):
        params = parallel.device_varying(params)
        fused = model.apply({"params": params["net"]}, batch["vis"], batch["ir"], batch["text_emb"])
        loss, terms = losses.fusion_loss(
            fused, batch["vis"], batch["ir"], batch["weights"], intensity_l2
        )
        return parallel.global_mean(loss), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **parallel.global_mean(terms)}
    return _apply_gradients(state, grads, tx, lr), out


def _distill_step(
    state: State, teacher_params, lr: jax.Array, batch: dict, *, student, teacher, tx, config
) -> tuple[State, dict]:
    vis, ir = batch["vis"], batch["ir"]
    # The teacher is an input, never differentiated: its forward pass stays out of the VJP.
    t_out, t_feats = teacher.apply(
        {"params": lax.stop_gradient(teacher_params)},
        vis,
        ir,
        batch["text_emb"],
        return_features=True,
    )

    def loss_fn(params):
        params = parallel.device_varying(params)
        adapters = params["adapters"] if "adapters" in params else state["frozen"]["adapters"]
        s_out, s_feats = student.apply({"params": params["net"]}, vis, ir, return_features=True)
        total, terms = losses.distill_loss(
            s_out,
            s_feats,
            t_out,
            t_feats,
            adapters,
            vis,
            ir,
            table_default_weights=losses.default_weights(config.data.kind),
            form=config.distill_form,
            feature_weight=config.feature_weight,
            result_weight=config.result_weight,
        )
        return parallel.global_mean(total), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    terms = parallel.global_mean({k: v for k, v in terms.items() if k != "total"})
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **terms}
    return _apply_gradients(state, grads, tx, lr), out


def build_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable:
    """The jitted data-parallel step: teacher (state, lr, batch), distill (state, teacher, lr,
    batch), lr a float32 scalar (LearningRates).

    Returns (new state, metrics); the state argument is donated, the teacher params are not.
    """
    tx = make_optimizer(config)
    if config.stage in ("teacher", "student"):
        # 'student': the text-free student on the fusion loss alone (the no-distillation
        # ablation, or fine-tuning); its network ignores the text embedding.
        fn = functools.partial(
            _teacher_step,
            model=networks.build_model(config.model),
            tx=tx,
            intensity_l2=float(config.get("intensity_l2", 0.0)),
        )
        return parallel.data_parallel_step(fn, mesh, num_args=3)
    if config.stage == "distill":
        if config.get("intensity_l2", 0.0):
            raise ValueError(
                "config.intensity_l2 is read by the teacher and text-free student steps only; "
                "the distill step keeps the paper's loss: set it to 0 or use :nodistill"
            )
        fn = functools.partial(
            _distill_step,
            student=networks.build_model(config.model),
            teacher=networks.build_model(config.teacher_model),
            tx=tx,
            config=config,
        )
        return parallel.data_parallel_step(fn, mesh, num_args=4)
    raise ValueError(f"unknown stage {config.stage!r}; use 'teacher', 'student' or 'distill'")


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
    step_fn = step_fn or build_step(config, mesh)
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
    try:
        for step in range(start + 1, config.steps + 1):
            batch = next(train_iter)
            lr = rates(step)
            with reporter.timed_dispatch(step):
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
                reporter.flush(last_good)  # a non-finite step must never be saved
                with reporter.paused():
                    quality = None
                    if evaluate:
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
    except (images.DataError, checkpoint.WeightsError) as e:
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
