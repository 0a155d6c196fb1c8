"""Several processes train as one: 2 local processes of 2 CPU devices each (gloo collectives).

One scenario runs once per session in a pair of worker processes (this file run as a script,
through the CLI's flags): a distillation run of test_train's micro smoke config cut on time
after step 2 (process 1 on a clock of its own) and resumed to step 3. The tests check what the
processes recorded against the same run in this process (1 process, 4 devices), whose programs
are test_train's (one compilation cache entry for both files). A second pair shows that a
process that dies stops the other. About 60 s on a 2-core machine (90 s with a cold cache).
"""

import contextlib
import itertools
import os
import pathlib
import pickle
import shutil
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from test_train import FAST_COMPILE, _write_pairs, load_config, micro

from dtpf_jax import checkpoint, export, images, parallel, train

REPO = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5  # the dead-peer test: a dead process is noticed after this many seconds


def scenario_config(root: pathlib.Path):
    """test_train's micro distill smoke config (64² crops, batch 4, AdamW) on the pairs under
    root, 3 steps, the teacher read from root/teacher.msgpack."""
    cfg = micro(load_config("distill", "smoke"))
    cfg.data.root, cfg.data.train, cfg.data.val = str(root / "data"), ("d",), ()
    cfg.eval_every, cfg.checkpoint_every, cfg.steps = 0, 0, 3
    cfg.teacher_weights = str(root / "teacher.msgpack")
    return cfg


def _host(tree) -> dict[str, np.ndarray]:
    """Flat host copy of a replicated tree (this process's first replica)."""
    return {k: np.asarray(x.addressable_data(0)) for k, x in flatten_dict(tree, sep="/").items()}


def prepare(root: pathlib.Path) -> None:
    """Training pairs, the teacher's weight file and the student's initial state under root."""
    _write_pairs(root / "data" / "d", [f"p{i}" for i in range(8)], size=72)
    mesh, cfg = parallel.make_mesh(), scenario_config(root)
    teacher = train.init_state(micro(load_config("teacher", "smoke")), mesh)["params"]["net"]
    checkpoint.save_params(root / "teacher.msgpack", jax.device_get(teacher), cfg.teacher_model)
    initial = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), train.init_state(cfg, mesh))
    images.atomic_write(root / "initial.pkl", pickle.dumps(initial))


@contextlib.contextmanager
def recording(patch, root: pathlib.Path):
    """Spy on train_and_evaluate through patch(obj, name, value), starting from the initial
    state of root: which part of each global batch this process held, the last state, every
    local replica of the teacher, the files it wrote."""
    rec = types.SimpleNamespace(batches={}, state=None, teacher=None, files=[])
    initial = pickle.loads((root / "initial.pkl").read_bytes())
    build = train.build_step

    def build_step(config, mesh):
        step = build(config, mesh)

        def recorded(state, teacher, lr, batch):
            out = step(state, teacher, lr, batch)
            rec.batches[int(out[0]["step"])] = {
                v.index[0].start: np.concatenate(
                    [np.asarray(v.data).sum((1, 2, 3)), np.asarray(i.data).sum((1, 2, 3))]
                )
                for v, i in zip(
                    batch["vis"].addressable_shards, batch["ir"].addressable_shards, strict=True
                )
            }
            rec.state, rec.teacher = out[0], teacher
            return out

        return recorded

    def atomic_write(path, payload, real=images.atomic_write):
        rec.files.append(str(path))
        real(path, payload)

    import tensorboardX

    class SummaryWriter(tensorboardX.SummaryWriter):
        def __init__(self, logdir, *args, **kwargs):
            rec.files.append(str(logdir))
            super().__init__(logdir, *args, **kwargs)

    patch(train, "init_state", lambda config, mesh: parallel.replicate(initial, mesh))
    patch(train, "build_step", build_step)
    patch(images, "atomic_write", atomic_write)
    patch(checkpoint, "atomic_write", atomic_write)
    patch(tensorboardX, "SummaryWriter", SummaryWriter)
    yield rec


def run_scenario(root: pathlib.Path, process: int) -> dict:
    """The cut run and its resumption in root/cut; what this process did, on host."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        build, built = train.build_step, {}

        def build_once(config, mesh):  # one step for both runs: process 1 compiles it once
            if not built:
                built["step"] = build(config, mesh)
            return built["step"]

        mp.setattr(train, "build_step", build_once)
        with pytest.MonkeyPatch.context() as mp2, recording(mp2.setattr, root) as rec:
            # Cut on time after step 2 (a reading at the start, then one a step) by process 0's
            # clock: alone, process 1's would stop it after step 1.
            clock = itertools.count(0.0, 400.0 if process == 0 else 1200.0)
            mp2.setattr(train, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
            cfg = scenario_config(root)
            cfg.max_train_s = 700.0
            train.run(cfg, root / "cut")
        out["cut"], files = {"batches": rec.batches}, rec.files
        with pytest.MonkeyPatch.context() as mp2, recording(mp2.setattr, root) as rec:
            train.run(scenario_config(root), root / "cut")  # resumes at step 3
    teacher = flatten_dict(rec.teacher, sep="/")
    out["resumed"] = {
        "params": _host(rec.state["params"]),
        "batches": rec.batches,
        "teacher_deleted": any(x.is_deleted() for x in teacher.values()),
        "teachers": [  # every local replica, not only the first
            {k: np.asarray(x.addressable_shards[d].data) for k, x in teacher.items()}
            for d in range(jax.local_device_count())
        ],
    }
    out["files"] = files + rec.files
    return out


def worker(process: int, coordinator: str, root: str, mode: str) -> None:
    """One process of a pair, through the CLI's flags and start-up (train.start_process)."""
    from absl import flags, logging

    logging.use_absl_handler()  # as absl's app.run: INFO to stderr
    logging.set_verbosity(logging.INFO)
    root = pathlib.Path(root)
    train.define_flags()
    heartbeat = HEARTBEAT_S if mode == "dead" else 60
    workdir = root / ("stray" if process == 1 else "run")  # 'dead': not one shared folder
    flags.FLAGS([
        "train", "--config=configs/distill.py:smoke", f"--workdir={workdir}", "--multihost",
        f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={process}",
        f"--heartbeat_timeout={heartbeat}",
    ])  # fmt: skip
    train.start_process(flags.FLAGS)
    if mode == "dead":
        cfg = micro(load_config("teacher", "smoke"))
        cfg.data.root, cfg.data.train, cfg.data.val = str(root / "data"), ("d",), ()
        cfg.eval_every = 0
        train.run(cfg, flags.FLAGS.workdir)
        return
    out = run_scenario(root, process)
    images.atomic_write(root / f"process_{process}.pkl", pickle.dumps(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_pair(root: pathlib.Path, mode: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of `mode`; their stderr goes to root/stderr_<i>.txt."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (  # as test_train's programs: LLVM -O0, a third less compile
        "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
        " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir or "")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    address = f"localhost:{free_port()}"
    return [
        subprocess.Popen(
            [sys.executable, __file__, str(i), address, str(root), mode],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(root / f"stderr_{i}.txt").open("w"),
        )
        for i in (0, 1)
    ]


def finish(procs: list[subprocess.Popen], root: pathlib.Path, timeout: float):
    """(stderr of each, seconds until each exited); both killed after `timeout` s."""
    t, ended = time.monotonic(), {}
    while len(ended) < len(procs) and time.monotonic() - t < timeout:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic() - t
        time.sleep(0.1)
    for p in procs:
        p.kill()
        p.wait()
    logs = [(root / f"stderr_{i}.txt").read_text() for i in range(len(procs))]
    return logs, [ended.get(i, float("inf")) for i in range(len(procs))]


def compiled_as_test_train(jitted):
    """The step compiled at its first call as test_train.programs compiles its own: the same
    program and options, hence one entry of the compilation cache for both files."""
    compiled = []

    def call(*args):
        if not compiled:
            compiled.append(jitted.lower(*args).compile(FAST_COMPILE))
        return compiled[0](*args)

    return call


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """(records of processes 0 and 1, the 1-process reference, their logs, root)."""
    root = tmp_path_factory.mktemp("multihost")
    prepare(root)
    procs = start_pair(root, "scenario")
    try:  # the reference while the pair runs: 1 process, 4 devices, 3 steps in one go
        with pytest.MonkeyPatch.context() as mp:
            build = train.build_step
            mp.setattr(train, "build_step", lambda c, m: compiled_as_test_train(build(c, m)))
            with recording(mp.setattr, root) as rec:
                train.train_and_evaluate(scenario_config(root), root / "reference")
        ref = {"params": _host(rec.state["params"]), "batches": rec.batches}
    except BaseException:
        finish(procs, root, timeout=0)
        raise
    logs, took = finish(procs, root, timeout=600)  # about 60 s on an idle 2-core machine; 330 s seen under load 8
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, (
            f"process {i}: exit {p.returncode} after {took[i]:.0f} s\n" + (log[-4000:])
        )
    got = [pickle.loads((root / f"process_{i}.pkl").read_bytes()) for i in (0, 1)]
    return types.SimpleNamespace(procs=got, ref=ref, logs=logs, root=root)


def _assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=f"{what}: {k}")


def _net(params: dict) -> dict:
    return {k[4:]: v for k, v in params.items() if k.startswith("net/")}


def test_two_processes_train_as_one_process_with_four_devices(scenario):
    for i, p in enumerate(scenario.procs):
        # Its own clock (1200 s a step) would have cut it after step 1: process 0's rules.
        assert sorted(p["cut"]["batches"]) == [1, 2] and sorted(p["resumed"]["batches"]) == [3]
        _assert_close(p["resumed"]["params"], scenario.ref["params"], 1e-5, f"process {i}")
    _assert_close(*(p["resumed"]["params"] for p in scenario.procs), 0.0, "the two replicas")


def test_each_process_reads_its_own_part_of_the_global_batch_in_order(scenario):
    for step in (1, 2, 3):  # step 3 after the resume: each iterator restored its own position
        whole = scenario.ref["batches"][step]  # {0: digest of sample 0, ..., 3: ...}
        assert sorted(whole) == [0, 1, 2, 3]
        for i, p in enumerate(scenario.procs):
            part = (p["cut"]["batches"] | p["resumed"]["batches"])[step]
            assert sorted(part) == [2 * i, 2 * i + 1]  # its two devices: its half, in order
            for index, digest in part.items():
                np.testing.assert_array_equal(digest, whole[index], err_msg=f"step {step}")


def test_one_checkpoint_resumes_both_processes(scenario, tmp_path):
    ckpt = scenario.root / "cut" / "checkpoints"
    assert sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit()) == [2, 3]
    for step in ("2", "3"):  # one train state, written once; each process's iterator position
        written = [p.name for p in (ckpt / step / "state").glob("ocdbt.process_*")]
        assert written == ["ocdbt.process_0"]
        positions = sorted(p.name for p in (ckpt / step / "data_iter").glob("process_*"))
        assert positions == ["process_0-of-2.json", "process_1-of-2.json"]
    # An ordinary checkpoint: export reads it here, in one process of 4 devices.
    net, _, meta = export.restore_network(scenario.root / "cut", 3)
    got = {k: np.asarray(v) for k, v in flatten_dict(net, sep="/").items()}
    assert meta["step"] == 3
    _assert_close(got, _net(scenario.procs[0]["resumed"]["params"]), 0.0, "exported")
    # Each process resumes its own data position: one process cannot resume this run.
    shutil.copytree(scenario.root / "cut", tmp_path / "cut")
    cfg = scenario_config(scenario.root)
    cfg.steps = 4
    with pytest.raises(checkpoint.WeightsError, match="a run of 2 processes, resumed by 1"):
        train.train_and_evaluate(cfg, tmp_path / "cut")


def test_distillation_keeps_the_teacher_bit_identical_in_both_processes(scenario):
    params, _, _ = checkpoint.load_params(scenario.root / "teacher.msgpack")
    teacher = flatten_dict(params, sep="/")
    for i, p in enumerate(scenario.procs):
        assert not p["resumed"]["teacher_deleted"]  # passed to every step, never donated
        assert len(p["resumed"]["teachers"]) == 2
        for replica in p["resumed"]["teachers"]:
            _assert_close(replica, teacher, 0.0, f"process {i} teacher")


def test_only_process_0_writes_logs_and_files(scenario):
    p0, p1 = scenario.procs  # files: what each wrote through atomic_write or tensorboardX
    assert p1["files"] == []
    assert (
        sorted(pathlib.Path(f).name for f in p0["files"])
        == ["config.json"] * 2 + ["tensorboard"] * 2
    )  # the cut run and its resumption
    events = b"".join(p.read_bytes() for p in (scenario.root / "cut" / "tensorboard").iterdir())
    assert b"train/loss" in events
    log0, log1 = scenario.logs
    assert "step 3/3" in log0 and "process 0 of 2: 2 local devices, 4 in all" in log0
    assert "step 3/3" not in log1 and "compiled the train step" not in log1


def test_a_process_that_dies_stops_the_other_within_the_heartbeat_timeout(tmp_path):
    _write_pairs(tmp_path / "data" / "d", [f"p{i}" for i in range(8)], size=72)
    procs = start_pair(tmp_path, "dead")
    logs, took = finish(procs, tmp_path, timeout=90)
    # Process 1 sees another workdir than process 0's: it stops with the reason, at once.
    assert procs[1].returncode == 1, logs[1][-3000:]
    assert "error: " in logs[1] and "does not see the config.json process 0 wrote there" in logs[1]
    # Process 0, busy compiling, then waiting for it in the first step, is stopped by JAX.
    assert took[0] - took[1] < HEARTBEAT_S + 10, f"exits after {took[0]:.0f}, {took[1]:.0f} s"
    assert procs[0].returncode not in (0, -9) and "another task died" in logs[0], logs[0][-3000:]


def test_process_flags_are_checked_before_joining():
    from absl import app

    f = types.SimpleNamespace(multihost=False, coordinator=None, num_processes=2, process_id=1)
    with pytest.raises(app.UsageError, match="--num_processes, --process_id describe a multi"):
        train.start_process(f)
    cli = [sys.executable, "-m", "dtpf_jax.train", "--config=configs/teacher.py:smoke",
           "--multihost", "--coordinator=localhost:1", "--num_processes=2",
           "--process_id=2"]  # fmt: skip
    run = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "--multihost: process_id and num_processes must be nonnegative" in run.stderr


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
