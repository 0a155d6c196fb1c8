"""Teacher (text-guided) and student (text-free) fusion networks, built from `config.model`.

Both are the official `Text_XRestormer` / `XRestormer` U-Net: two encoders (visible RGB, IR
gray), SCFM fusion per level, a decoder with optional FiLM text modulation, refinement blocks
and a 3x3 output conv plus a global residual on the visible input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict

from dtpf_jax.attention import AttentionFusion, CrossAttention, TransformerBlock
from dtpf_jax.blocks import Conv1x1, Conv3x3, Downsample, FiLM, Upsample
from dtpf_jax.images import atomic_write

# H and W must be multiples of this: three 2x downsamplings (the window attention pads a
# partial last window row/column itself).
SIZE_MULTIPLE = 8


def model_config(kind: str = "student") -> ml_collections.ConfigDict:
    """Official model settings: 'teacher' (dim 48, text) or 'student' (dim 16, no text)."""
    cfg = ml_collections.ConfigDict(
        dict(
            dim=16,
            in_ch_a=3,
            in_ch_b=1,
            out_ch=3,
            num_blocks=(2, 2, 2, 2),
            num_refinement_blocks=2,
            channel_heads=(1, 2, 4, 8),
            spatial_heads=(2, 2, 3, 4),
            spatial_dim_head=16,
            window_size=8,
            overlap_ratio=0.5,
            ffn_expansion_factor=2.0,
            fusion_channel_heads=8,
            fusion_spatial_heads=4,
            fusion_spatial_dim_head=32,
            text_dim=0,
            film_form="paper",
            remat=False,  # training memory vs speed only: see FusionNet._remat
            dtype="float32",
        )
    )
    if kind == "teacher":
        cfg.dim = 48
        cfg.ffn_expansion_factor = 2.66
        cfg.num_refinement_blocks = 4
        cfg.text_dim = 512
        cfg.remat = True
    elif kind != "student":
        raise ValueError(f"unknown model kind {kind!r}; use 'teacher' or 'student'")
    return cfg


def model_config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `cfg.to_json()` (JSON lists back to the tuples of `model_config`)."""
    d = json.loads(text)
    return ml_collections.ConfigDict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    )


class Encoder(nn.Module):
    """Patch embed + 4 levels of X-Restormer blocks; returns the outputs of all 4 levels."""

    dim: int
    num_blocks: Sequence[int]
    channel_heads: Sequence[int]
    spatial_heads: Sequence[int]
    spatial_dim_head: int
    ffn_expansion: float
    window: int
    overlap_ratio: float
    remat: bool = True

    @nn.compact
    def __call__(self, x):
        block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        x = Conv3x3(self.dim, name="patch_embed_proj")(x)
        feats = []
        for lvl in range(4):
            if lvl:
                x = Downsample(name=f"down{lvl}_{lvl + 1}")(x)
            for i in range(self.num_blocks[lvl]):
                x = block(
                    self.channel_heads[lvl],
                    self.spatial_heads[lvl],
                    self.spatial_dim_head,
                    self.ffn_expansion,
                    self.window,
                    self.overlap_ratio,
                    name=f"encoder_level{lvl + 1}_{i}",
                )(x)
            feats.append(x)
        return feats


class FusionNet(nn.Module):
    """DTPF fusion U-Net; with text_dim > 0 it is the teacher (FiLM at 4 places)."""

    config: ml_collections.ConfigDict

    def _remat(self, cls):
        # remat: recompute each block's inside in the backward pass instead of storing it.
        # Train step at batch 4, 128², XLA temp memory: teacher 12.0 GiB with it, 15.7 GiB
        # without; student 4.1 GiB with it, 5.1 GiB without and 14 % faster.
        return nn.remat(cls) if self.config.get("remat", True) else cls

    def _block(self, lvl: int, name: str):
        c = self.config
        return self._remat(TransformerBlock)(
            c.channel_heads[lvl],
            c.spatial_heads[lvl],
            c.spatial_dim_head,
            c.ffn_expansion_factor,
            c.window_size,
            c.overlap_ratio,
            name=name,
        )

    def _blocks(self, x, lvl: int, n: int, prefix: str):
        for i in range(n):
            x = self._block(lvl, f"{prefix}_{i}")(x)
        return x

    def _fusion(self, name: str):
        c = self.config
        return self._remat(AttentionFusion)(
            c.fusion_channel_heads,
            c.fusion_spatial_heads,
            c.fusion_spatial_dim_head,
            c.window_size,
            c.overlap_ratio,
            name=name,
        )

    def _film(self, x, text_emb, lvl: int):
        if not self.config.text_dim:
            return x
        if text_emb is None:
            raise ValueError("the teacher needs a (B, 512) text embedding")
        return FiLM(self.config.film_form, name=f"prompt_guidance_{lvl}")(x, text_emb)

    @nn.compact
    def __call__(self, vis, ir, text_emb=None, return_features: bool = False):
        """vis (B, H, W, 3), ir (B, H, W, 1) in [0, 1], H and W multiples of 8."""
        if vis.shape[1] % SIZE_MULTIPLE or vis.shape[2] % SIZE_MULTIPLE:
            raise ValueError(
                f"image size {vis.shape[1]}x{vis.shape[2]}: H and W must be multiples of "
                f"{SIZE_MULTIPLE}; pad first (infer.Fuser and fuse_images pad any size)"
            )
        c = self.config
        dtype = jnp.dtype(c.dtype)
        vis, ir = vis.astype(dtype), ir.astype(dtype)
        enc = lambda n: Encoder(
            c.dim,
            c.num_blocks,
            c.channel_heads,
            c.spatial_heads,
            c.spatial_dim_head,
            c.ffn_expansion_factor,
            c.window_size,
            c.overlap_ratio,
            c.get("remat", True),
            name=n,
        )
        fa = enc("encoder_A")(vis)
        fb = enc("encoder_B")(ir)

        a4, b4 = self._remat(CrossAttention)(
            c.spatial_heads[3],
            c.spatial_dim_head,
            c.fusion_channel_heads,
            c.window_size,
            c.overlap_ratio,
            name="cross_attention",
        )(fa[3], fb[3])
        x = self._fusion("feature_fusion_4")(a4, b4)
        x = self._film(x, text_emb, 4)
        dec4 = x = self._blocks(x, 3, c.num_blocks[3], "decoder_level4")

        feats = [dec4]
        for lvl in (3, 2, 1):
            x = Upsample(name=f"up{lvl + 1}_{lvl}")(x)
            x = self._film(x, text_emb, lvl)
            x = jnp.concatenate(
                [x, self._fusion(f"feature_fusion_{lvl}")(fa[lvl - 1], fb[lvl - 1])], -1
            )
            if lvl > 1:  # level 1 keeps 2*dim channels, as in Restormer
                x = Conv1x1(x.shape[-1] // 2, name=f"reduce_chan_level{lvl}")(x)
            x = self._blocks(x, lvl - 1, c.num_blocks[lvl - 1], f"decoder_level{lvl}")
            feats.append(x)

        x = self._blocks(x, 0, c.num_refinement_blocks, "refinement")
        out = Conv3x3(c.out_ch, name="output")(x) + vis
        return (out, feats) if return_features else out


def build_model(model_cfg: ml_collections.ConfigDict) -> FusionNet:
    return FusionNet(model_cfg)


SHAPES_FILE = pathlib.Path(__file__).with_name("param_shapes.json")
_NETWORK_SOURCES = ("networks.py", "blocks.py", "attention.py")  # what decides the params


def param_shapes(model_cfg: ml_collections.ConfigDict) -> dict:
    """{path tuple: ShapeDtypeStruct} of the params `model_cfg` builds (flattened).

    Loading a weight file checks against it. The student's shapes ship in SHAPES_FILE (a
    trace costs ~2 s of every `fuse` start), used only while the network's source files are
    the ones they were written from (write_shape_manifest; tests/test_networks.py checks them);
    any other config or source is traced, once per config and process.
    """
    return dict(_param_shapes(model_cfg.to_json()))


@functools.lru_cache(maxsize=16)
def _param_shapes(config_json: str) -> tuple:
    known = _manifest().get(_shape_key(config_json))
    return known if known is not None else trace_param_shapes(config_json)


def trace_param_shapes(config_json: str) -> tuple:
    """((path tuple, ShapeDtypeStruct), ...) of a config, from jax.eval_shape of its init."""
    model = build_model(model_config_from_json(config_json))
    tree = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return tuple(flatten_dict(tree).items())


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    h = hashlib.sha256()
    for name in _NETWORK_SOURCES:
        h.update(pathlib.Path(__file__).with_name(name).read_bytes())
    return h.hexdigest()


def _shape_key(config_json: str) -> str:
    return hashlib.sha256(f"{_source_digest()}\n{config_json}".encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _manifest() -> dict:
    def leaf(spec: str) -> jax.ShapeDtypeStruct:  # "float32[128,384]"
        dtype, dims = spec.rstrip("]").split("[")
        return jax.ShapeDtypeStruct(tuple(int(d) for d in dims.split(",") if d), dtype)

    try:
        raw = json.loads(SHAPES_FILE.read_text())
        return {
            key: tuple((tuple(p.split("/")), leaf(s)) for p, s in entry["params"].items())
            for key, entry in raw.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no manifest, or a broken one: trace


def write_shape_manifest(path: str | os.PathLike = SHAPES_FILE, kinds=("student",)) -> None:
    """Trace the default configs of `kinds` and write their shapes, keyed to these sources:
    python -c "from dtpf_jax import networks; networks.write_shape_manifest()" """
    out = {}
    for kind in kinds:
        config_json = model_config(kind).to_json()
        params = {  # one string per tensor: a line each, so a diff shows which changed
            "/".join(k): f"{v.dtype}[{','.join(map(str, v.shape))}]"
            for k, v in trace_param_shapes(config_json)
        }
        out[_shape_key(config_json)] = {"kind": kind, "params": params}
    atomic_write(path, json.dumps(out, indent=1, sort_keys=True) + "\n")


def init_params(model: FusionNet, rng, height: int = 64, width: int = 64):
    """Random parameters (a small input suffices: no shape depends on H, W).

    Jitted: run eagerly, init would compile every op of the forward pass one by one.
    """
    c = model.config
    vis = jnp.zeros((1, height, width, c.in_ch_a), jnp.float32)
    ir = jnp.zeros((1, height, width, c.in_ch_b), jnp.float32)
    text = jnp.zeros((1, c.text_dim), jnp.float32) if c.text_dim else None
    return jax.jit(lambda r: model.init(r, vis, ir, text)["params"])(rng)
