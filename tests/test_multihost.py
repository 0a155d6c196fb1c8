"""Several processes train as one: 2 local processes of 2 CPU devices each (gloo collectives).

One scenario runs once per session in a pair of worker processes (this file run as a script):
a teacher trained 3 steps (process 1 on a skewed clock), the same run cut after step 2 and
resumed, and one distillation step from that teacher; the tests check its records against the
same run in this process (1 process, 4 devices). A last pair shows that a process that dies
stops the other.
"""

import contextlib
import itertools
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from test_train import _write_pairs, load_config, micro

from dtpf_jax import checkpoint, export, images, train

REPO = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5  # the dead-peer test: a dead process is noticed after this many seconds


def scenario_config(stage: str, root: pathlib.Path):
    """The micro smoke config on the synthetic pairs under root: 32² crops, 3 steps."""
    cfg = micro(load_config(stage, "smoke"))
    cfg.data.root, cfg.data.train, cfg.data.val, cfg.data.crop = str(root / "data"), ("d",), (), 32
    cfg.eval_every, cfg.checkpoint_every, cfg.steps = 0, 0, 3
    return cfg


def _host(tree) -> dict[str, np.ndarray]:
    """Flat host copy of a replicated tree (this process's first replica)."""
    return {k: np.asarray(x.addressable_data(0)) for k, x in flatten_dict(tree, sep="/").items()}


@contextlib.contextmanager
def recording(patch):
    """Spy on train_and_evaluate through patch(obj, name, value): which part of each global
    batch this process held, the last state, the frozen teacher, the files it wrote."""
    rec = types.SimpleNamespace(batches={}, state=None, frozen=(), files=[])
    build = train.build_step

    def build_step(config, mesh):
        step = build(config, mesh)

        def recorded(state, *args):
            batch = args[-1]
            out = step(state, *args)
            rec.batches[int(out[0]["step"])] = {
                s.index[0].start: np.concatenate(
                    [np.asarray(s.data).sum((1, 2, 3)), np.asarray(t.data).sum((1, 2, 3))]
                )
                for s, t in zip(
                    batch["vis"].addressable_shards, batch["ir"].addressable_shards, strict=True
                )
            }
            rec.state, rec.frozen = out[0], args[:-2]
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

    patch(train, "build_step", build_step)
    patch(images, "atomic_write", atomic_write)
    patch(checkpoint, "atomic_write", atomic_write)
    patch(tensorboardX, "SummaryWriter", SummaryWriter)
    yield rec


def run_scenario(root: pathlib.Path, process: int) -> dict:
    """The scenario's runs in workdirs under root; what they did, on host."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        steps = {}  # one program per stage for the whole scenario: process 1 compiles each once
        build = train.build_step
        mp.setattr(train, "build_step", lambda c, m: steps.get(c.stage) or steps.setdefault(
            c.stage, build(c, m)))  # fmt: skip
        with pytest.MonkeyPatch.context() as mp2, recording(mp2.setattr) as rec:
            # Cut on time after step 2 (a clock reading at the start, then one a step) by
            # process 0's clock: alone, process 1's would stop it after step 1.
            clock = itertools.count(0.0, 400.0 if process == 0 else 1200.0)
            mp2.setattr(train, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
            cfg = scenario_config("teacher", root)
            cfg.max_train_s = 700.0
            train.run(cfg, root / "cut")
        out["cut"], files = {"batches": rec.batches}, rec.files

        with pytest.MonkeyPatch.context() as mp2, recording(mp2.setattr) as rec:
            train.run(scenario_config("teacher", root), root / "cut")  # resumes at step 3
        out["resumed"] = {"params": _host(rec.state["params"]), "batches": rec.batches}
        files += rec.files

        with pytest.MonkeyPatch.context() as mp2, recording(mp2.setattr) as rec:
            cfg = scenario_config("distill", root)
            cfg.teacher_workdir, cfg.steps = str(root / "cut"), 1
            train.run(cfg, root / "distill")
        out["files"] = files + rec.files
    teacher = flatten_dict(rec.frozen[0], sep="/")
    out["distill"] = {
        "teacher_deleted": any(x.is_deleted() for x in teacher.values()),
        "teacher": [  # every local replica, not only the first
            {k: np.asarray(x.addressable_shards[d].data) for k, x in teacher.items()}
            for d in range(jax.local_device_count())
        ],
        "student": _host(rec.state["params"]["net"]),
    }
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
        "train", "--config=configs/teacher.py:smoke", f"--workdir={workdir}", "--multihost",
        f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={process}",
        f"--heartbeat_timeout={heartbeat}",
    ])  # fmt: skip
    train.start_process(flags.FLAGS)
    if mode == "dead":
        train.run(scenario_config("teacher", root), flags.FLAGS.workdir)
        return
    out = run_scenario(root, process)
    out["pid"] = os.getpid()
    images.atomic_write(root / f"process_{process}.pkl", pickle.dumps(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_pair(root: pathlib.Path, mode: str) -> list[subprocess.Popen]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
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
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """(records of processes 0 and 1, the 1-process reference, their logs, root)."""
    root = tmp_path_factory.mktemp("multihost")
    _write_pairs(root / "data" / "d", [f"p{i}" for i in range(8)], size=40)
    procs = start_pair(root, "scenario")
    try:  # the reference while the pair runs: 1 process, 4 devices, the same config
        with pytest.MonkeyPatch.context() as mp, recording(mp.setattr) as rec:
            train.train_and_evaluate(scenario_config("teacher", root), root / "reference")
        ref = {"params": _host(rec.state["params"]), "batches": rec.batches}
        logs = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i}: exit {p.returncode}\n{log[-4000:]}"
    got = [pickle.loads((root / f"process_{i}.pkl").read_bytes()) for i in (0, 1)]
    return types.SimpleNamespace(procs=got, ref=ref, logs=logs, root=root)


def _assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=f"{what}: {k}")


def _batches(p: dict) -> dict:
    """Step -> {global sample index: digest} of a process, across the cut and the resume."""
    return p["cut"]["batches"] | p["resumed"]["batches"]


def test_two_processes_train_as_one_process_with_four_devices(scenario):
    for i, p in enumerate(scenario.procs):
        # Its clock (1200 s a step) would have stopped it after step 1: process 0's rules.
        assert sorted(p["cut"]["batches"]) == [1, 2] and sorted(p["resumed"]["batches"]) == [3]
        _assert_close(p["resumed"]["params"], scenario.ref["params"], 1e-5, f"process {i}")
    _assert_close(*(p["resumed"]["params"] for p in scenario.procs), 0.0, "the two replicas")


def test_each_process_reads_its_own_part_of_the_global_batch_in_order(scenario):
    for step in (1, 2, 3):  # step 3 after the resume: each iterator restored its own position
        whole = scenario.ref["batches"][step]  # {0: digest of sample 0, ..., 3: ...}
        assert sorted(whole) == [0, 1, 2, 3]
        for i, p in enumerate(scenario.procs):
            part = _batches(p)[step]
            assert sorted(part) == [2 * i, 2 * i + 1]  # its two devices: its half, in order
            for index, digest in part.items():
                np.testing.assert_array_equal(digest, whole[index], err_msg=f"step {step}")


def test_one_checkpoint_resumes_both_processes(scenario):
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


def _net(params: dict) -> dict:
    return {k[4:]: v for k, v in params.items() if k.startswith("net/")}


def test_distillation_keeps_the_teacher_bit_identical_in_both_processes(scenario):
    teacher = _net(scenario.procs[0]["resumed"]["params"])  # the checkpoint it was read from
    for i, p in enumerate(scenario.procs):
        d = p["distill"]
        assert not d["teacher_deleted"]  # passed to the step, never donated
        assert len(d["teacher"]) == 2
        for replica in d["teacher"]:
            _assert_close(replica, teacher, 0.0, f"process {i} teacher")
    _assert_close(*(p["distill"]["student"] for p in scenario.procs), 0.0, "student replicas")


def test_only_process_0_writes_logs_and_files(scenario):
    p0, p1 = scenario.procs  # files: what each wrote through atomic_write or tensorboardX
    assert p1["files"] == []
    assert (
        sorted(pathlib.Path(f).name for f in p0["files"])
        == ["config.json"] * 3 + ["tensorboard"] * 3
    )  # the cut, resumed and distillation runs
    for run in ("cut", "distill"):
        events = b"".join(p.read_bytes() for p in (scenario.root / run / "tensorboard").iterdir())
        assert b"train/loss" in events
    log0, log1 = scenario.logs
    assert "step 3/3" in log0 and "process 0 of 2: 2 local devices, 4 in all" in log0
    assert "step 3/3" not in log1 and "compiled the train step" not in log1


def test_a_process_that_dies_stops_the_other_within_the_heartbeat_timeout(tmp_path):
    _write_pairs(tmp_path / "data" / "d", [f"p{i}" for i in range(8)], size=40)
    t = time.monotonic()
    procs = start_pair(tmp_path, "dead")
    try:
        logs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    took = time.monotonic() - t
    # Process 1 sees another workdir than process 0's: it stops with the reason, at once.
    assert procs[1].returncode == 1, logs[1][-3000:]
    assert "[process 1] error:" in logs[1] and "does not see the config.json" in logs[1]
    # Process 0 would wait for it in the first step's all-reduce: JAX stops it instead.
    assert procs[0].returncode != 0, logs[0][-3000:]
    assert "another task died" in logs[0], logs[0][-3000:]
    assert took < 30, f"took {took:.0f} s"


def test_process_flags_need_multihost():
    from absl import app

    f = types.SimpleNamespace(multihost=False, coordinator=None, num_processes=2, process_id=1)
    with pytest.raises(app.UsageError, match="--num_processes, --process_id describe a multi"):
        train.start_process(f)


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
