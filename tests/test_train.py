"""Training: 1- vs 4-device steps, golden values, frozen teacher, resume, non-finite stop,
validation leak, the smoke configs through the CLI, export.

Compilation dominates here, so the eight step programs of the device tests are lowered once
per session and compiled two at a time; the resume and non-finite tests reuse them.
"""

import concurrent.futures
import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest
from conftest import FAST_COMPILE
from PIL import Image

from dtpf_jax import checkpoint, datasets, export, losses, parallel, steps, train
from dtpf_jax.report import NonFiniteLossError

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def fixed_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    table = losses.IVF_TASK_WEIGHTS
    return {
        "vis": rng.random((4, 64, 64, 3), dtype=np.float32),
        "ir": rng.random((4, 64, 64, 1), dtype=np.float32),
        "text_emb": rng.normal(size=(4, 512)).astype(np.float32),
        "weights": np.asarray(
            [table[k] for k in ("default", "low_light", "over_exposure", "motion_blur")],
            np.float32,
        ),
    }


def micro(cfg):
    """The smoke config with no transformer blocks: every module kind, a quarter the compile."""
    for m in (cfg.model, cfg.get("teacher_model")):
        if m is not None:
            m.num_blocks, m.num_refinement_blocks = (0, 0, 0, 0), 0
    return cfg


def _configs():
    """(stage, optimizer) -> config: AdamW in the paper form, SGD in the official distill form."""
    out = {}
    for stage in ("teacher", "distill"):
        for opt in ("adamw", "sgd"):
            cfg = micro(load_config(stage, "smoke"))
            if opt == "sgd":
                cfg.optimizer.name, cfg.optimizer.lr = "sgd", 0.1
                if stage == "distill":
                    cfg.distill_form = "official"
            out[stage, opt] = cfg
    return out


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _initial_states(cfgs, mesh) -> dict:
    """Host initial states of every config from one compiled init per stage."""
    states = {}
    for stage in ("teacher", "distill"):
        states[stage, "adamw"] = _host(train.init_state(cfgs[stage, "adamw"], mesh))
        base = states[stage, "adamw"]
        params = {"net": base["params"]["net"]}
        cfg = cfgs[stage, "sgd"]
        sgd = {"step": base["step"], "params": params}
        if stage == "distill":  # official form: the adapters are frozen inputs, not params
            sgd["frozen"] = {"adapters": base["params"]["adapters"]}
        sgd["opt_state"] = _host(steps.make_optimizer(cfg).init(params))
        want = jax.eval_shape(steps.make_init(cfg), jax.random.key(0))
        assert jax.tree.structure(sgd) == jax.tree.structure(want)
        states[stage, "sgd"] = sgd
    return states


@pytest.fixture(scope="session")
def programs():
    """Per (stage, optimizer, devices): config, host initial state, compiled step."""
    cfgs, batch = _configs(), fixed_batch()
    states = _initial_states(cfgs, parallel.make_mesh())
    teacher = states["teacher", "adamw"]["params"]["net"]
    lowered = {}
    for (stage, opt), cfg in cfgs.items():
        for n in (4, 1):
            mesh = parallel.make_mesh(jax.devices()[:n])
            frozen = (parallel.replicate(teacher, mesh),) if stage == "distill" else ()
            args = (
                parallel.replicate(states[stage, opt], mesh),
                *frozen,
                train.LearningRates(cfg, 0.0)(1),
                parallel.shard_batch(batch, mesh),
            )
            lowered[stage, opt, n] = train.build_step(cfg, mesh).lower(*args)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles outside the GIL
        done = pool.map(lambda lo: lo.compile(FAST_COMPILE), lowered.values())
        compiled = dict(zip(lowered, done, strict=True))
    return {k: (cfgs[k[:2]], states[k[:2]], compiled[k]) for k in compiled}


def _run(programs, key, steps=1):
    """Run a compiled step from the initial state; host (params before, states, metrics)."""
    cfg, state0, step = programs[key]
    mesh = parallel.make_mesh(jax.devices()[: key[2]])
    teacher = programs["teacher", "adamw", key[2]][1]["params"]["net"]
    frozen = (parallel.replicate(teacher, mesh),) if key[0] == "distill" else ()
    state, batch = parallel.replicate(state0, mesh), parallel.shard_batch(fixed_batch(), mesh)
    states, metrics, rates = [], [], train.LearningRates(cfg, 0.0)
    for n in range(1, steps + 1):
        state, m = step(state, *frozen, rates(n), batch)
        states.append(_host(state))
        metrics.append({k: float(v) for k, v in _host(m).items()})
    return frozen, states, metrics


@pytest.fixture(scope="session")
def runs(programs):
    return {k: _run(programs, k, steps=2 if k[1:] == ("adamw", 4) else 1) for k in programs}


def _check(path, a, b, where=None):
    a, b = (a, b) if where is None else (a[where], b[where])
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage", ["teacher", "distill"])
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_four_device_step_equals_one_device_step(runs, programs, stage, opt):
    (_, s4, m4), (_, s1, m1) = runs[stage, opt, 4], runs[stage, opt, 1]
    s0 = programs[stage, opt, 4][1]
    for k in ("loss", "grad_norm"):  # N x gradients show in grad_norm, Adam's mu, SGD updates
        np.testing.assert_allclose(m4[0][k], m1[0][k], rtol=1e-5, err_msg=k)
    tree_map = jax.tree_util.tree_map_with_path
    tree_map(_check, s4[0]["opt_state"], s1[0]["opt_state"])
    if opt == "sgd":
        tree_map(_check, s4[0]["params"], s1[0]["params"])
        moved = [jax.tree.map(np.subtract, s[0]["params"], s0["params"]) for s in (s4, s1)]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7), *moved)
    else:
        # Adam's first update is lr*g/(|g|+eps): where |g| is at rounding-noise level the
        # device split decides its sign, so params are compared where |g| > 1e-6 (mu > 1e-7).
        sure = jax.tree.map(lambda mu: np.abs(mu) > 1e-7, s1[0]["opt_state"][0].mu)
        tree_map(_check, s4[0]["params"], s1[0]["params"], sure)
    moved = jax.tree.map(np.subtract, s4[0]["params"], s0["params"])
    assert max(np.abs(x).max() for x in jax.tree.leaves(moved)) > 1e-5  # something was learnt


# The micro smoke configs, seed 3407, AdamW, 4 devices, fixed_batch(); step 1's metrics are
# at the initial params, loss_after_one_step is step 2's loss on the same batch.
GOLDEN = {
    "teacher": {"loss": 65.09674, "max": 7.096575, "consist": 6.809781, "grad": 48.19976,
                "ssim": 1.976473, "color": 1.014151, "grad_norm": 81.07784,
                "loss_after_one_step": 64.65562},
    "distill": {"loss": 55.23515, "base_student": 55.12520, "base_parent": 57.61627,
                "feat": 0.5225550, "res": 0.05769285, "grad_norm": 24.97111,
                "loss_after_one_step": 55.12938},
}  # fmt: skip


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_golden_values_of_one_step(runs, stage):
    _, _, metrics = runs[stage, "adamw", 4]
    got = {k: metrics[0][k] for k in GOLDEN[stage] if k in metrics[0]}
    got["loss_after_one_step"] = metrics[1]["loss"]
    for k, want in GOLDEN[stage].items():
        assert got[k] == pytest.approx(want, rel=1e-4, abs=1e-6), (
            f"{stage} {k}: {got[k]!r} != golden {want!r} after one step on a fixed batch "
            "(micro smoke config, seed 3407). Did you mean to change behaviour? If so, update "
            "GOLDEN."
        )


def test_distill_leaves_the_teacher_bit_identical_and_out_of_the_optimizer(runs, programs):
    teacher = _host(programs["teacher", "adamw", 4][1]["params"]["net"])
    for opt in ("adamw", "sgd"):
        frozen, states, _ = runs["distill", opt, 4]
        assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))  # not donated
        jax.tree.map(np.testing.assert_array_equal, _host(frozen[0]), teacher)
        state = states[-1]
        n_teacher = sum(x.size for x in jax.tree.leaves(teacher))
        n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        moments = 2 if opt == "adamw" else 0  # Adam's mu and nu per trainable value
        assert n_opt - moments * n_params < 8 < n_teacher  # step counters only, no teacher
        assert set(state) <= {"step", "params", "opt_state", "frozen"}
    adapters = runs["distill", "adamw", 4][1][0]["params"]["adapters"]  # paper: learnt
    assert not np.array_equal(
        adapters["adapter_0"]["kernel"],
        programs["distill", "adamw", 4][1]["params"]["adapters"]["adapter_0"]["kernel"],
    )
    frozen_after = runs["distill", "sgd", 4][1][0]["frozen"]  # official: frozen, unchanged
    jax.tree.map(
        np.testing.assert_array_equal, frozen_after, programs["distill", "sgd", 4][1]["frozen"]
    )


def _write_pairs(root: pathlib.Path, names, size=64, seed=0) -> None:
    rng = np.random.default_rng(seed)
    for n in names:
        for sub, shape in (("vi", (size, size, 3)), ("ir", (size, size))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                root / sub / f"{n}.png"
            )


def test_validation_names_are_left_out_of_training(tmp_path):
    _write_pairs(tmp_path / "a", [f"n{i:02d}" for i in range(20)], size=4)
    _write_pairs(tmp_path / "b", [f"n{i:02d}" for i in range(10, 30)], size=4)
    cfg = datasets.default_config("ivf")
    cfg.root, cfg.train, cfg.val, cfg.val_split = str(tmp_path), ("a", "b"), ("a", "b"), (0.9, 1)
    val = {p.name for p in datasets.source_pairs(cfg, "val")}
    assert val == {"n18", "n19", "n28", "n29"}
    kept = train.train_pairs(cfg)
    assert not val & {p.name for p in kept}
    assert len(kept) == 18 + 16  # b/n18 and b/n19 were the same scenes as a's validation pairs


def test_shared_msrs_validation_scene_is_not_trained_on(shared_data):
    cfg = load_config("teacher").data
    cfg.root = str(shared_data)
    kept = {(p.split, p.name) for p in train.train_pairs(cfg)}
    val = {p.name for p in datasets.source_pairs(cfg, "val")}
    assert len(kept) == 32 + 475 - 1 and not val & {n for _, n in kept}
    assert ("msrs_128/train", "00881N") not in kept  # msrs/train's validation frame


@pytest.fixture()
def tiny_run(tmp_path, monkeypatch, programs):
    """A teacher smoke run on 8 synthetic pairs that reuses the session's compiled step.

    Returns run(workdir, fault=None, init_weights="", initial=None, max_train_s=0.0, rates=None,
    schedule="cosine") -> (batch digests by step, error or None); fault(step, batch) may raise
    or return a replacement batch; initial replaces the initial state; rates (a dict) gets the
    learning rate passed to each step.
    """
    _write_pairs(tmp_path / "data" / "d", [f"p{i}" for i in range(8)])
    cfg, state0, compiled = programs["teacher", "adamw", 4]
    cfg = cfg.copy_and_resolve_references()
    cfg.data.root, cfg.data.train, cfg.data.val = str(tmp_path / "data"), ("d",), ()
    cfg.eval_every, cfg.checkpoint_every = 0, 2

    def run(workdir, fault=None, init_weights="", initial=None, max_train_s=0.0, rates=None,
            schedule="cosine"):  # fmt: skip
        seen, rates = {}, {} if rates is None else rates
        cfg.init_weights, cfg.max_train_s, cfg.schedule = str(init_weights), max_train_s, schedule
        first = state0 if initial is None else initial
        monkeypatch.setattr(train, "init_state", lambda c, mesh: parallel.replicate(first, mesh))

        def step(state, lr, batch):
            n = int(state["step"]) + 1
            seen[n] = float(np.asarray(batch["vis"]).sum() + np.asarray(batch["ir"]).sum())
            rates[n] = float(lr)
            return compiled(state, lr, fault(n, batch) if fault else batch)

        monkeypatch.setattr(train, "build_step", lambda c, mesh: step)
        try:
            train.train_and_evaluate(cfg, workdir)
        except (RuntimeError, NonFiniteLossError) as e:
            return seen, e
        return seen, None

    return run


def _killed_at_3(n, batch):
    if n == 3:
        raise RuntimeError("killed")
    return batch


def test_killed_run_resumes_with_the_same_batches_and_params(tmp_path, tiny_run):
    whole, err = tiny_run(tmp_path / "whole")
    assert err is None and sorted(whole) == [1, 2, 3, 4]
    first, err = tiny_run(tmp_path / "cut", fault=_killed_at_3)
    assert str(err) == "killed" and sorted(first) == [1, 2, 3]
    rest, err = tiny_run(tmp_path / "cut")  # resumes from step 2 (checkpoint_every 2)
    assert err is None and sorted(rest) == [3, 4]
    assert [first[1], first[2], rest[3], rest[4]] == [whole[n] for n in (1, 2, 3, 4)]
    a, _, meta = export.restore_network(tmp_path / "whole", 4)
    b, _, _ = export.restore_network(tmp_path / "cut", 4)
    assert meta["step"] == 4
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-7), _host(a), _host(b)
    )


def test_max_train_s_stops_on_time_with_a_checkpoint_and_resumes(tmp_path, tiny_run, monkeypatch):
    clock = itertools.count(0.0, 10.0)  # each reading 10 s later: the loop start, then a step
    monkeypatch.setattr(train, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    seen, err = tiny_run(tmp_path / "run", max_train_s=25.0)  # 30 s >= 25 s after step 3
    assert err is None and sorted(seen) == [1, 2, 3]
    _, _, meta = export.restore_network(tmp_path / "run", 3)  # saved although not periodic
    assert meta["step"] == 3
    rest, err = tiny_run(tmp_path / "run")  # no limit: resumes at step 4 of 4
    assert err is None and sorted(rest) == [4]


def test_time_cosine_fits_the_decay_to_the_time_left(tmp_path, tiny_run, programs, monkeypatch):
    o = programs["teacher", "adamw", 4][0].optimizer

    def cosine(done, length):
        return o.lr_min + (o.lr - o.lr_min) * (1 + math.cos(math.pi * done / length)) / 2

    plain, fitted = {}, {}
    for rates, schedule in ((plain, "cosine"), (fitted, "time_cosine")):
        clock = itertools.count(0.0, 10.0)  # the loop start at 0 s, then each step 10 s later
        fake = types.SimpleNamespace(monotonic=lambda c=clock: next(c))
        monkeypatch.setattr(train, "time", fake)
        run = tiny_run(tmp_path / schedule, max_train_s=25.0, rates=rates, schedule=schedule)
        assert run[1] is None
    assert sorted(plain) == sorted(fitted) == [1, 2, 3]  # both stop on time after step 3 of 4
    for n in (1, 2, 3):  # 'cosine' decays over the 4 steps planned, and is cut at step 3
        assert plain[n] == pytest.approx(cosine(n - 1, 4), rel=1e-5)
    # 'time_cosine': steps 1 and 2 as planned (no rate yet: step 1 includes the compile);
    # after step 2 (t = 20 s): 0.1 steps/s x 5 s left -> the decay ends at step 2.5.
    assert [fitted[1], fitted[2]] == pytest.approx([plain[1], plain[2]], rel=1e-5)
    assert fitted[3] == pytest.approx(cosine(2, 2.5), rel=1e-5)
    assert fitted[3] < 0.25 * plain[3]
    with pytest.raises(ValueError, match="max_train_s"):  # no time limit to fit it to
        tiny_run(tmp_path / "nolimit", schedule="time_cosine")


@pytest.mark.parametrize("schedule", ["cosine", "official_cosine"])
def test_host_learning_rates_make_the_updates_of_optax_with_the_schedule(schedule):
    cfg = load_config("teacher", "smoke")
    cfg.steps, cfg.grad_clip, cfg.schedule, cfg.official_t_max = 5, 0.0, schedule, 2
    o = cfg.optimizer
    o.lr, o.weight_decay = 0.1, 0.05
    if schedule == "cosine":
        want_lr = optax.cosine_decay_schedule(o.lr, 5, alpha=o.lr_min / o.lr)
    else:  # torch's CosineAnnealingLR(T_max=2) stepped every iteration: a period of 4 steps

        def want_lr(n):
            return o.lr_min + (o.lr - o.lr_min) * (1 + np.cos(np.pi * n / 2)) / 2

    want_tx = optax.adamw(want_lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    tx, rates = steps.make_optimizer(cfg), train.LearningRates(cfg, 0.0)
    state = {"step": 0, "params": {"w": np.linspace(-1.0, 1.0, 6, dtype=np.float32)}}
    state["opt_state"] = tx.init(state["params"])
    want, want_opt = state["params"], want_tx.init(state["params"])
    for n in range(1, 8):  # past the cosine's end (then at its floor), past a period
        assert rates(n) == pytest.approx(float(want_lr(n - 1)), rel=1e-5, abs=1e-12)
        grads = {"w": np.float32(n) * np.cos(np.arange(6, dtype=np.float32))}
        state = steps._apply_gradients(state, grads, tx, rates(n))
        updates, want_opt = want_tx.update(grads, want_opt, want)
        want = optax.apply_updates(want, updates)
        np.testing.assert_allclose(state["params"]["w"], want["w"], rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(want_opt)  # checkpoints
    cfg.schedule = "linear"
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        train.LearningRates(cfg, 0.0)


def test_init_weights_starts_the_network_from_a_file_with_a_fresh_optimizer(
    tmp_path, tiny_run, programs
):
    cfg, state0, _ = programs["teacher", "adamw", 4]
    start = jax.tree.map(lambda x: x + np.float32(0.01), state0["params"]["net"])
    weights = tmp_path / "start.msgpack"
    checkpoint.save_params(weights, start, cfg.model)
    want = {**state0, "params": {"net": start}}  # step 0 and the fresh optimizer state of state0
    for name, kwargs in [("file", {"init_weights": weights}), ("ref", {"initial": want}),
                         ("plain", {})]:  # fmt: skip
        assert tiny_run(tmp_path / name, **kwargs)[1] is None
    a, b, plain = (
        _host(export.restore_network(tmp_path / n, 4)[0]) for n in ("file", "ref", "plain")
    )
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    assert not np.allclose(a["output"]["kernel"], plain["output"]["kernel"])
    # A resumed run keeps its checkpoint: the file is read only for a fresh start.
    assert tiny_run(tmp_path / "file", init_weights=tmp_path / "missing.msgpack")[1] is None

    # remat changes how gradients are computed, not the network: not a mismatch.
    same = cfg.copy_and_resolve_references()
    same.model.remat = not cfg.model.remat
    same.init_weights = str(weights)
    got = train.init_from_weights(state0, same, parallel.make_mesh())["params"]["net"]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), _host(got), _host(start))

    other = cfg.copy_and_resolve_references()
    other.model.dim = 16
    other.init_weights = str(weights)
    with pytest.raises(checkpoint.WeightsError, match=r"start\.msgpack: built with other.*dim=8"):
        train.init_from_weights(state0, other, parallel.make_mesh())


def test_non_finite_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path, tiny_run):
    nan_at_3 = lambda n, b: {**b, "vis": b["vis"] * np.float32("nan")} if n == 3 else b
    _, err = tiny_run(tmp_path / "nan", fault=nan_at_3)
    assert isinstance(err, NonFiniteLossError)
    assert "at step 3" in str(err) and "last good checkpoint: step 2 in" in str(err)
    mngr = checkpoint.train_manager(tmp_path / "nan", read_only=True)
    assert mngr.all_steps() == [2]  # the NaN state (step 4 is checkpointed) was never saved


def _out_of_memory_at_2(n, batch):
    if n == 2:  # a real XLA allocation failure: 128 TiB is past any CPU's address space
        jax.jit(lambda: jax.numpy.ones((2**47,), np.uint8))().block_until_ready()
    return batch


def test_out_of_memory_says_where_and_what_to_do_in_one_line(tmp_path, tiny_run, monkeypatch):
    seen, err = tiny_run(tmp_path / "oom", fault=_out_of_memory_at_2)
    assert isinstance(err, train.OutOfMemoryError) and sorted(seen) == [1, 2]
    n = jax.device_count()  # 4 fake CPU devices, 1 crop each
    assert str(err).startswith(
        f"out of memory in the teacher train step, {4 // n} crop{'s' * (n < 4)} of 64² per device "
        f"(global batch 4 over {n} cpu device"
    )
    assert "RESOURCE_EXHAUSTED" in str(err) and "lower --config.batch_size" in str(err)
    with pytest.raises(jax.errors.JaxRuntimeError, match="^INTERNAL"):  # others pass unchanged
        with train.OutOfMemoryHint("here", "fix"):
            raise jax.errors.JaxRuntimeError("INTERNAL: not memory")

    def fail(config, workdir):
        raise err

    monkeypatch.setattr(train, "train_and_evaluate", fail)
    with pytest.raises(SystemExit) as e:
        train.run(load_config("teacher", "smoke"), "unused")
    assert e.value.code == f"error: {err}" and "\n" not in e.value.code


def test_cpu_step_that_would_not_fit_stops_before_it_runs(monkeypatch):
    free = train.available_host_memory()
    if sys.platform == "linux":  # bytes, between nothing and the machine's RAM
        assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ran = []

    def add_4_mib(x):  # its output: 4 MiB
        jax.debug.callback(lambda: ran.append(1))  # runs only where the program does
        return x + jax.numpy.zeros((1 << 20,), np.float32)

    hint = train.OutOfMemoryHint("the step", "do less")
    monkeypatch.setattr(train, "available_host_memory", lambda: 64 << 20)
    step = train.MemoryCheckedStep(jax.jit(add_4_mib), hint)
    assert np.array_equal(step(np.float32(2)), np.full(1 << 20, 2)) and ran == [1]
    assert step(np.float32(3))[0] == 3 and ran == [1, 1]  # compiled once, then reused
    mem = jax.jit(add_4_mib).lower(np.float32(2)).compile().memory_analysis()
    plan = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    assert plan >= 4 << 20
    # Just above the plan is not enough: the process itself grows past it (allocator slack).
    monkeypatch.setattr(train, "available_host_memory", lambda: int(plan * 1.02))
    with pytest.raises(train.OutOfMemoryError, match=r"^out of memory in the step: XLA plans"):
        train.MemoryCheckedStep(jax.jit(add_4_mib), hint)(np.float32(2))
    assert ran == [1, 1]  # it never ran
    monkeypatch.setattr(train, "available_host_memory", lambda: int(plan * 1.08))
    train.MemoryCheckedStep(jax.jit(add_4_mib), hint)(np.float32(2))
    assert ran == [1, 1, 1]


def test_cli_turns_a_non_finite_loss_into_a_nonzero_exit(monkeypatch):
    def fail(config, workdir):
        raise NonFiniteLossError("non-finite loss (nan) at step 3; last good checkpoint: none")

    monkeypatch.setattr(train, "train_and_evaluate", fail)
    with pytest.raises(SystemExit) as e:
        train.run(load_config("teacher", "smoke"), "unused")
    assert "at step 3" in str(e.value.code)  # a message, hence exit status 1


def test_nodistill_stage_trains_the_student_alone_on_the_fusion_loss():
    cfg = micro(load_config("distill", "nodistill,smoke"))
    mesh = parallel.make_mesh()
    state = jax.eval_shape(steps.make_init(cfg), jax.random.key(0))
    assert set(state["params"]) == {"net"} and "frozen" not in state  # no adapters, no teacher
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fixed_batch())
    lr = jax.ShapeDtypeStruct((), np.float32)
    new, metrics = jax.eval_shape(train.build_step(cfg, mesh), state, lr, batch)  # no teacher
    assert set(metrics) == {"loss", "grad_norm", *losses.WEIGHT_KEYS}
    assert jax.tree.structure(new) == jax.tree.structure(state)
    cfg.intensity_l2 = 100.0  # the optional squared-error intensity term reaches the step
    _, metrics = jax.eval_shape(train.build_step(cfg, mesh), state, lr, batch)
    assert set(metrics) == {"loss", "grad_norm", "intensity_l2", *losses.WEIGHT_KEYS}
    distill = micro(load_config("distill", "smoke"))
    distill.intensity_l2 = 100.0  # not read by the distill step: refused, not silently ignored
    with pytest.raises(ValueError, match="intensity_l2"):
        train.build_step(distill, mesh)


def test_config_variants_and_names():
    assert load_config("teacher", "official,smoke").name == "teacher_official_smoke"
    d = load_config("distill", "official")
    assert (d.teacher_workdir, d.distill_form, d.schedule) == (
        "runs/teacher_official",
        "official",
        "official_cosine",
    )
    m = load_config("distill_med", "ct_mri,smoke")
    assert (m.name, m.teacher_workdir, m.data.kind) == (
        "distill_med_ct_mri_smoke",
        "runs/teacher_med_ct_mri_smoke",
        "medical",
    )
    assert m.data.train == ("harvard/ct_mri/train",) and m.model.dim == 8
    assert load_config("teacher_med").data.train == ("harvard/pet_mri/train",)
    nodistill = load_config("distill", "nodistill,smoke")
    assert (nodistill.stage, nodistill.model.text_dim) == ("student", 0)
    with pytest.raises(ValueError, match="unknown config variant"):
        load_config("teacher", "fast")


def _train_cli(*runs: tuple[str, pathlib.Path, list[str]]) -> list[str]:
    """Run `python -m dtpf_jax.train --config=configs/C --workdir=W EXTRA` concurrently.

    Two at a time: while one process traces (single-threaded Python), the other computes.
    """
    env = dict(os.environ)
    # conftest's XLA_FLAGS, as the in-process tests: 4 devices, fast-compiling programs.
    assert "device_count=4" in env["XLA_FLAGS"] and "optimization_level=0" in env["XLA_FLAGS"]
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir or "")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dtpf_jax.train", f"--config=configs/{c}", f"--workdir={w}"]
            + extra,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c, w, extra in runs
    ]
    logs = [p.communicate(timeout=900)[1] for p in procs]
    for (c, _, _), p, log in zip(runs, procs, logs, strict=True):
        assert p.returncode == 0, f"{c}: exit {p.returncode}\n{log[-3000:]}"
    return logs


def test_smoke_configs_through_the_cli_then_export(tmp_path, shared_data):
    chains = {
        "ivf": ("teacher.py:smoke", "distill.py:smoke"),
        "med": ("teacher_med.py:spect_mri,smoke", "distill_med.py:spect_mri,smoke"),
    }
    teachers = {k: tmp_path / k / "teacher" for k in chains}
    students = {k: tmp_path / k / "student" for k in chains}
    # The micro model (no transformer blocks, as `programs`): the CLI path, not the blocks,
    # is under test here, and the blocks' training steps are compiled by other tests.
    no_blocks = "_blocks=(0,0,0,0)", "_refinement_blocks=0"
    teacher_micro = [f"--config.model.num{s}" for s in no_blocks]
    student_micro = [f"--config.{m}.num{s}" for m in ("model", "teacher_model") for s in no_blocks]
    logs = _train_cli(*((t, teachers[k], teacher_micro) for k, (t, _) in chains.items()))
    for log in logs:
        assert "step 4 validation (clean convention" in log and "compiled the train step" in log
    _train_cli(
        *(
            (d, students[k], [f"--config.teacher_workdir={teachers[k]}", *student_micro])
            for k, (_, d) in chains.items()
        )
    )
    for w in [*teachers.values(), *students.values()]:
        assert train.load_workdir_config(w).name.endswith("smoke")  # config.json, read back
        events = b"".join(p.read_bytes() for p in (w / "tensorboard").glob("events.*"))
        for tag in (b"train/loss", b"train/lr", b"train/steps_per_s", b"val_clean/quality",
                    b"val_clean/VIF", b"val/vis_ir_fused"):  # fmt: skip
            assert tag in events, tag
        assert checkpoint.train_manager(w, read_only=True).all_steps() == [2, 4]
    out = tmp_path / "student.msgpack"
    record = tmp_path / "student.json"
    assert export.main([str(students["ivf"]), str(out), "--record", str(record)]) == 0
    params, model_cfg, meta = checkpoint.load_params(out)
    assert model_cfg.dim == 8 and model_cfg.text_dim == 0
    assert meta["stage"] == "distill" and meta["step"] == 4 and 0 < meta["quality"] < 2
    rec = json.loads(record.read_text())
    assert rec["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert rec["step"] == 4 and rec["config"]["dim"] == 8 and rec["bytes"] == out.stat().st_size
