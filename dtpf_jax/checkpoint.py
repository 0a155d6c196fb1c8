"""Checkpoints: params-only weight files for inference and release.

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

import jax
import ml_collections
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict

from dtpf_jax import networks
from dtpf_jax.data import atomic_write

WEIGHTS_FORMAT = "dtpf_jax.params.v1"


class WeightsError(ValueError):
    """A weight file that is missing, unreadable or of another network."""


def save_params(
    path: str | os.PathLike, params, model_cfg: ml_collections.ConfigDict, meta: dict | None = None
) -> str:
    """Write a params-only weight file atomically; returns its sha256."""
    blob = serialization.msgpack_serialize(
        {
            "format": WEIGHTS_FORMAT,
            "config": model_cfg.to_json(),
            "meta": json.dumps(meta or {}),
            "params": jax.tree.map(lambda x: np.asarray(x, np.float32), params),
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
        params = blob["params"]
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WeightsError(
            f"{path}: cannot read weights ({e}); pass a file written by "
            "`python -m dtpf_jax.export` or scripts/convert_official.py"
        ) from None
    check_params(params, cfg, str(path))
    return params, cfg, meta


def check_params(params, model_cfg: ml_collections.ConfigDict, where: str = "params") -> None:
    """Raise WeightsError unless `params` has exactly the tensors `model_cfg` builds."""
    model = networks.build_model(model_cfg)
    want = flatten_dict(jax.eval_shape(lambda: networks.init_params(model, jax.random.key(0))))
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
