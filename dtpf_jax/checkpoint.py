"""Checkpoints: orbax train-state checkpoints of a run; params-only weight files for release.

A run keeps `<workdir>/checkpoints` (orbax CheckpointManager): the train state plus the grain
iterator state per step, the best k steps by validation quality and the latest.

A weight file is one msgpack blob {"format", "config", "meta", "params"}: the params of one
network, the exact `config.model` that builds it (JSON) and free-form metadata (stage,
step, source). Loading checks the params against the network the config builds, so a file
of the wrong network gives a one-line error instead of a shape crash deep inside jit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict

from dtpf_jax import networks
from dtpf_jax.images import atomic_write

if TYPE_CHECKING:  # orbax and grain load lazily: fuse and load_model need neither
    import grain
    import orbax.checkpoint as ocp

WEIGHTS_FORMAT = "dtpf_jax.params.v1"


class WeightsError(ValueError):
    """A weight file that is missing, unreadable or of another network."""


STORAGE_DTYPES = ("float32", "float16")


def save_params(
    path: str | os.PathLike,
    params,
    model_cfg: ml_collections.ConfigDict,
    meta: dict | None = None,
    dtype: str = "float32",
) -> str:
    """Write a params-only weight file atomically; returns its sha256.

    `dtype='float16'` halves the file (the shipped student: 8.7 MB instead of 17.5 MB);
    loading always gives float32 params.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, not {dtype!r}")
    blob = serialization.msgpack_serialize(
        {
            "format": WEIGHTS_FORMAT,
            "config": model_cfg.to_json(),
            "meta": json.dumps(meta or {}),
            "params": jax.tree.map(lambda x: np.asarray(x, np.float32).astype(dtype), params),
        }
    )
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, blob)
    return hashlib.sha256(blob).hexdigest()


def load_params(path: str | os.PathLike):
    """(params, model config, meta) from a weight file, checked against the network."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: weight file not found; pass a file written by "
            "`python -m dtpf_jax.export` or scripts/convert_official.py"
        )
    try:
        blob = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
            raise ValueError("not a dtpf_jax weight file")
        cfg = networks.model_config_from_json(blob["config"])
        meta = json.loads(blob.get("meta") or "{}")
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), blob["params"])
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WeightsError(
            f"{path}: cannot read weights ({e}); pass a file written by "
            "`python -m dtpf_jax.export` or scripts/convert_official.py"
        ) from None
    check_params(params, cfg, str(path))
    return params, cfg, meta


def check_params(params, model_cfg: ml_collections.ConfigDict, where: str = "params") -> None:
    """Raise WeightsError unless `params` has exactly the tensors `model_cfg` builds."""
    want = networks.param_shapes(model_cfg)
    got = flatten_dict(params)
    missing = sorted("/".join(k) for k in set(want) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(want))
    bad = sorted(
        "/".join(k) for k in set(want) & set(got) if tuple(np.shape(got[k])) != tuple(want[k].shape)
    )
    if missing or extra or bad:
        first = (missing or extra or bad)[0]
        raise WeightsError(
            f"{where}: weights do not fit the network of their config ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(bad)} of another shape, e.g. {first}); "
            "is it a file for another network?"
        )


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# --- orbax train-state checkpoints of a run -------------------------------------------------

CHECKPOINT_DIR = "checkpoints"


def _quality(metrics: dict) -> float:
    return float(metrics["quality"])


def train_manager(
    workdir: str | os.PathLike, keep_best: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """Manager of <workdir>/checkpoints keeping the best `keep_best` by quality and the latest.

    Steps saved without metrics (periodic saves between validations) survive only while latest.
    """
    import orbax.checkpoint as ocp

    keep = ocp.checkpoint_managers
    policy = keep.AnyPreservationPolicy(
        [
            keep.LatestN(n=1),
            keep.BestN(get_metric_fn=_quality, n=keep_best, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_quality,  # for best_step(); preservation is the policy's alone
        best_mode="max",
        create=not read_only,
        read_only=read_only,
    )
    # orbax needs absolute paths.
    return ocp.CheckpointManager(pathlib.Path(workdir).resolve() / CHECKPOINT_DIR, options=options)


def save_train_state(
    mngr: ocp.CheckpointManager,
    step: int,
    state,
    data_iter: grain.DatasetIterator | None = None,
    quality: float | None = None,
) -> None:
    """Save the replicated train state (and the iterator position) at `step`, ranked by quality."""
    import grain
    import orbax.checkpoint as ocp

    # A host copy of the (replicated) state: orbax's device-array path spends seconds slicing
    # replicas on its first save, a copy costs one transfer; restore gives jax.Arrays back.
    host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
    items = {"state": ocp.args.StandardSave(host)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = None if quality is None else {"quality": float(quality)}
    mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore_train_state(
    mngr: ocp.CheckpointManager,
    step: int,
    abstract_state,
    data_iter: grain.DatasetIterator | None = None,
):
    """The train state at `step`, shaped and sharded as `abstract_state` (ShapeDtypeStructs).

    With `data_iter`, the iterator is also moved to where it stood at that step.
    """
    import grain
    import orbax.checkpoint as ocp

    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        _check_processes(pathlib.Path(mngr.directory) / str(step) / "data_iter")
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def _check_processes(folder: pathlib.Path) -> None:
    """Each process resumes its own data position: the checkpoint's process count must be ours."""
    n = jax.process_count()
    if (folder / f"process_{jax.process_index()}-of-{n}.json").is_file():
        return
    saved = sorted({p.name.rsplit("-of-", 1)[1][:-5] for p in folder.glob("process_*-of-*.json")})
    raise WeightsError(
        f"{folder.parent}: saved by a run of {' or '.join(saved) or 'an unknown number of'} "
        f"processes, resumed by {n}: resume it with as many (--multihost), or train in a new "
        "workdir (--config.init_weights=FILE from `python -m dtpf_jax.export` keeps its network)"
    )


def select_step(mngr: ocp.CheckpointManager, step: int = 0) -> int:
    """`step` if saved; 0 = the best by validation quality (the latest if none was validated)."""
    steps = mngr.all_steps()
    if not steps:
        raise WeightsError(f"{mngr.directory}: no checkpoints; train first or check the workdir")
    if step:
        if step not in steps:
            raise WeightsError(f"{mngr.directory}: no step {step}; saved steps: {sorted(steps)}")
        return step
    return mngr.best_step() or mngr.latest_step()
