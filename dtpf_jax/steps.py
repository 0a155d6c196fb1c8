"""The training steps: learning-rate schedules, optimizer, initial state and the jitted,
data-parallel train step of each stage (teacher / student on the fusion loss, distillation
against a frozen teacher). `dtpf_jax.train` runs them in its loop; the GPU command
(scripts/device_train.py) compiles one ahead and hands it over.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from dtpf_jax import losses, networks, parallel

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
