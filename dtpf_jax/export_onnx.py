"""ONNX model of a student, for onnxruntime and other runtimes outside Python/JAX.

    python -m dtpf_jax.export_onnx [--weights NAME|FILE] OUT.onnx

Inputs `vis` (N, 3, H, W) and `ir` (N, 1, H, W), float32 in [0, 1]; output `fused`
(N, 3, H, W) in [0, 1]. N, H and W are dynamic: one file takes any batch and any H, W that
are multiples of 8, as the JAX network does (pad other sizes, e.g. by reflection, and crop the
output back). The teacher is not exported: it needs CLIP text embeddings at run time.

The graph is built here, op by op, from the params (`onnx.helper`), not by a JAX exporter.
jax2onnx (0.15-0.17, the maintained one; tried with 0.17.1) converts the tiny test student
correctly for one fixed shape, but (1) every release pins orbax-checkpoint < 0.11.37, which
cannot be installed beside this project's orbax-checkpoint >= 0.12.8; (2) it cannot take
symbolic H and W: the CPU formulations in `blocks` pick block and band sizes in Python from
concrete shapes, so it would be one file per shape; (3) its conversion time grows with the
square of the node count (170 s for the tiny student at 32x32 on 2 cores); (4) on the shipped
student at 128x128 it fails in its lowering of the window-attention band loop (fori_loop).
No StableHLO-to-ONNX converter is published on PyPI. The graph below is the plain form of each
block in NCHW (the layout ONNX convolutions take): 1x1 and depthwise 3x3 convs as Conv; window
attention channels-last inside, its 12x12 key windows built from pads, reshapes and slices,
its relative-position logits gathered from the products with the two tables. It builds in
under a second; `tests/test_export_onnx.py` checks it against the JAX forward.

onnxruntime (CPU) runs it correctly but slower than JAX on the project's 2-core CPU (README,
Speed), so `fuse` keeps JAX; the file is for deployment where JAX is not at hand.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np

from dtpf_jax import infer
from dtpf_jax.checkpoint import WeightsError
from dtpf_jax.images import atomic_write

OPSET = 17
INPUTS = ("vis", "ir")
OUTPUT = "fused"
TEACHER_REFUSED = (
    "a teacher (text-guided) network is not exported to ONNX: it needs CLIP text embeddings "
    "at run time; pass a student"
)


class Graph:
    """A growing list of ONNX nodes and initializers with generated value names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self._n = [], [], 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype=np.float32) -> str:
        name = self._name("c")
        self.initializers.append(self._numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(values, np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        node = self._helper.make_node(op_type, list(inputs), names, name=names[0], **attrs)
        self.nodes.append(node)
        return names[0] if outputs == 1 else names

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def reshape(self, x: str, *dims) -> str:
        """Reshape to dims: ints (0 copies the input's, -1 infers one) or dim() tensors."""
        if all(isinstance(d, int) for d in dims):
            return self.op("Reshape", x, self.ints(*dims))
        parts = [self.ints(d) if isinstance(d, int) else d for d in dims]
        return self.op("Reshape", x, self.op("Concat", *parts, axis=0))

    def slice(self, x: str, axes: Sequence[int], starts: Sequence[int], ends: Sequence[int]):
        return self.op("Slice", x, self.ints(*starts), self.ints(*ends), self.ints(*axes))


BIG = 2**62  # an open slice end


class StudentGraph:
    """The student's forward (networks.FusionNet, text-free) as ONNX nodes, NCHW."""

    def __init__(self, params, cfg):
        self.g, self.p, self.cfg = Graph(), params, cfg
        self.ows = cfg.window_size + int(cfg.window_size * cfg.overlap_ratio)

    # --- layers (each takes the params dict of its Flax module) ---

    def conv(self, x, p, groups: int = 1):
        """Conv1x1 (kernel (in, out)), Conv3x3 (3, 3, in, out) or DWConv3x3 (3, 3, C)."""
        k = np.asarray(p["kernel"], np.float32)
        if k.ndim == 2:
            w, pads = k.T[:, :, None, None], [0, 0, 0, 0]
        elif groups > 1:
            w, pads = k.transpose(2, 0, 1)[:, None], [1, 1, 1, 1]
        else:
            w, pads = k.transpose(3, 2, 0, 1), [1, 1, 1, 1]
        ins = [x, self.g.const(w)] + ([self.g.const(p["bias"])] if "bias" in p else [])
        return self.g.op("Conv", *ins, pads=pads, group=groups)

    def dwconv(self, x, p):
        return self.conv(x, p, groups=int(np.shape(p["kernel"])[-1]))

    def layer_norm(self, x, p, eps: float = 1e-5):
        g, c = self.g, int(np.shape(p["weight"])[0])
        # The mean over channels as a 1x1 conv with weights 1/C: in onnxruntime 1.7x faster
        # than ReduceMean over NCHW's strided channel axis.
        mean = g.const(np.full((1, c, 1, 1), 1 / c))
        mu = g.op("Conv", x, mean)
        d = g.op("Sub", x, mu)
        var = g.op("Conv", g.op("Mul", d, d), mean)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps))))
        w = g.const(np.reshape(p["weight"], (-1, 1, 1)))
        b = g.const(np.reshape(p["bias"], (-1, 1, 1)))
        return g.op("Add", g.op("Mul", g.op("Mul", d, inv), w), b)

    def channel_attention(self, x, p, heads: int):
        """TSAB (MDTA): attention between channels over L2-normalised q, k."""
        g = self.g
        c = int(np.shape(p["project_out"]["kernel"])[-1])
        qkv = self.dwconv(self.conv(x, p["qkv"]), p["qkv_dwconv"])
        q, k, v = (
            g.reshape(t, 0, heads, c // heads, -1) for t in g.op("Split", qkv, outputs=3, axis=1)
        )
        # 1 / max(|q|, 1e-12) over the pixels: the rsqrt of the clamped square, as blocks does.
        inv = lambda t: g.op(
            "Reciprocal",
            g.op("Sqrt", g.op("Max", g.op("ReduceSumSquare", t, axes=[3]), g.const(1e-24))),
        )
        attn = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
        attn = g.op("Mul", g.op("Mul", attn, inv(q)), g.op("Transpose", inv(k), perm=[0, 1, 3, 2]))
        temp = g.const(np.reshape(p["temperature"], (1, heads, 1, 1)))
        attn = g.op("Softmax", g.op("Mul", attn, temp), axis=-1)
        out = g.reshape(g.op("MatMul", attn, v), g.op("Shape", x))
        return self.conv(out, p["project_out"])

    def feed_forward(self, x, p):
        g = self.g
        y = self.dwconv(self.conv(x, p["project_in"]), p["dwconv"])
        x1, x2 = g.op("Split", y, outputs=2, axis=1)
        gelu = g.op(
            "Mul",
            g.op("Mul", x1, g.const(0.5)),
            g.op("Add", g.op("Erf", g.op("Mul", x1, g.const(1 / math.sqrt(2)))), g.const(1.0)),
        )
        return self.conv(g.op("Mul", gelu, x2), p["project_out"])

    def window_attention(self, x, p, heads: int, dim_head: int):
        """SSAB (OCAB): 8x8 query windows, 12x12 key/value windows of the zero-padded input.

        Runs channels-last (NHWC) inside: each window transpose then moves whole runs of
        dim_head values instead of single ones. With the LayerNorm's conv means, onnxruntime
        at 480x640: 22.9 -> 16.1 s, at 128²: 1.50 -> 1.19 s (A/B in one process, busy 2-core
        machine).
        """
        g, ws, ows = self.g, self.cfg.window_size, self.ows
        o, inner, dh = ows - ws, heads * dim_head, dim_head
        if "bias" in p["qkv"]:
            raise ValueError("window attention with a qkv bias is not exported")
        kernel = np.asarray(p["qkv"]["kernel"], np.float32)
        xt = g.op("Transpose", x, perm=[0, 2, 3, 1])  # (N, H, W, C)
        q = g.op("MatMul", xt, g.const(kernel[:, :inner] * dh**-0.5))
        kv = g.op("MatMul", xt, g.const(kernel[:, inner:]))  # zero where x is padded
        # A partial last window row/column: zeros beyond the image (as at every border) and
        # its queries dropped at the end. q and kv are 1x1 convs of x without bias, so
        # padding them is padding x.
        h, w = g.dim(x, 2), g.dim(x, 3)
        nh, nw = (g.op("Div", g.op("Add", d, g.ints(ws - 1)), g.ints(ws)) for d in (h, w))
        eh, ew = (g.op("Sub", g.op("Mul", n, g.ints(ws)), d) for n, d in ((nh, h), (nw, w)))
        pads = lambda top, bottom: g.op(
            "Concat",
            g.ints(0, top, top, 0, 0),
            g.op("Add", eh, g.ints(bottom)),
            g.op("Add", ew, g.ints(bottom)),
            g.ints(0),
            axis=0,
        )
        # q (N, H, W, inner) -> (N, nh, nw, heads, 8x * 8y, d): queries (x, y) of each window.
        q = g.reshape(g.op("Pad", q, pads(0, 0)), 0, nh, ws, nw, ws, heads, dh)
        q = g.op("Transpose", q, perm=[0, 1, 3, 5, 2, 4, 6])
        q = g.reshape(q, 0, 0, 0, 0, ws * ws, dh)
        # Key/value windows: rows 8n .. 8n + 11 of the input padded by o/2 (and up to whole
        # blocks of 8): each block of 8 rows, then the first o rows of the next; then columns.
        kv = g.op("Pad", kv, pads(o // 2, ws - o // 2))
        kv = g.reshape(kv, 0, -1, ws, g.op("Add", nw, g.ints(1)), ws, 2 * inner)
        kv = g.op(
            "Concat",
            g.slice(kv, [1], [0], [-1]),
            g.slice(kv, [1, 2], [1, 0], [BIG, o]),
            axis=2,
        )
        kv = g.op(
            "Concat",
            g.slice(kv, [3], [0], [-1]),
            g.slice(kv, [3, 4], [1, 0], [BIG, o]),
            axis=4,
        )  # (N, nh, 12, nw, 12, 2 inner)
        kv = g.reshape(kv, 0, 0, 0, 0, 0, 2, heads, dh)
        kv = g.op(
            "Transpose", kv, perm=[0, 1, 3, 5, 6, 2, 4, 7]
        )  # (N, nh, nw, 2, heads, 12, 12, d)
        k, v = (
            g.reshape(t, 0, 0, 0, heads, ows * ows, dh)
            for t in g.op("Split", kv, outputs=2, axis=3)
        )
        logits = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 2, 3, 5, 4]))
        # Relative position: q(x, y) . rel_height[i - x + ows - 1] over key rows i and
        # q(x, y) . rel_width[j - y + ows - 1] over key columns j: the products with both
        # whole tables, then the entries each query needs, by one constant-index gather each.
        tables = np.concatenate([p["rel_height"], p["rel_width"]]).astype(np.float32)
        n = tables.shape[0] // 2  # 2 ows - 1 rows per table
        prod = g.reshape(g.op("MatMul", q, g.const(tables.T)), 0, 0, 0, 0, -1)
        x_, y_ = np.divmod(np.arange(ws * ws), ws)  # query (x, y), row-major
        base = (np.arange(ws * ws) * 2 * n)[:, None] + np.arange(ows)[None, :] + ows - 1
        lh = g.op("Gather", prod, g.ints(*(base - x_[:, None]).ravel()), axis=4)
        lw = g.op("Gather", prod, g.ints(*(base + n - y_[:, None]).ravel()), axis=4)
        lh, lw = (g.reshape(t, 0, 0, 0, 0, ws * ws, ows) for t in (lh, lw))
        rel = g.op(
            "Add",
            g.op("Unsqueeze", lh, g.ints(-1)),  # (..., query, i, 1)
            g.op("Unsqueeze", lw, g.ints(-2)),  # (..., query, 1, j)
        )
        logits = g.op("Add", logits, g.reshape(rel, 0, 0, 0, 0, ws * ws, -1))
        out = g.op("MatMul", g.op("Softmax", logits, axis=-1), v)
        # (N, nh, nw, heads, 8x * 8y, d) -> (N, H, W, heads * d) -> project_out, NCHW
        out = g.reshape(out, 0, 0, 0, heads, ws, ws, dh)
        out = g.op("Transpose", out, perm=[0, 1, 4, 2, 5, 3, 6])
        out = g.reshape(out, 0, g.op("Mul", nh, g.ints(ws)), g.op("Mul", nw, g.ints(ws)), inner)
        out = g.op("Slice", out, g.ints(0, 0), g.op("Concat", h, w, axis=0), g.ints(1, 2))
        proj = np.asarray(p["project_out"]["kernel"], np.float32)
        return g.op("Transpose", g.op("MatMul", out, g.const(proj)), perm=[0, 3, 1, 2])

    def block(self, x, p, lvl: int):
        """TransformerBlock: x += TSAB; x += FFN; x += SSAB; x += FFN (pre-norm)."""
        c, g = self.cfg, self.g
        x = g.op(
            "Add",
            x,
            self.channel_attention(
                self.layer_norm(x, p["norm1"]), p["channel_attn"], c.channel_heads[lvl]
            ),
        )
        x = g.op("Add", x, self.feed_forward(self.layer_norm(x, p["norm2"]), p["channel_ffn"]))
        sa = self.window_attention(
            self.layer_norm(x, p["norm3"]),
            p["spatial_attn"],
            c.spatial_heads[lvl],
            c.spatial_dim_head,
        )
        x = g.op("Add", x, sa)
        return g.op("Add", x, self.feed_forward(self.layer_norm(x, p["norm4"]), p["spatial_ffn"]))

    def downsample(self, x, p):
        """3x3 conv C -> C/2, then PixelUnshuffle(2): channel c*4 + i*2 + j <- (c, 2h+i, 2w+j)."""
        y = self.g.op("SpaceToDepth", self.conv(x, p["body_0"]), blocksize=2)
        c = int(np.shape(p["body_0"]["kernel"])[-1])
        # SpaceToDepth orders channels (i*2 + j)*C + c: regroup them as PyTorch's c*4 + i*2 + j.
        perm = (np.arange(4)[None, :] * c + np.arange(c)[:, None]).reshape(-1)
        return self.g.op("Gather", y, self.g.ints(*perm), axis=1)

    def upsample(self, x, p):
        """3x3 conv C -> 2C, then PixelShuffle(2) (DepthToSpace in its CRD order)."""
        return self.g.op("DepthToSpace", self.conv(x, p["body_0"]), blocksize=2, mode="CRD")

    def encoder(self, x, p):
        x = self.conv(x, p["patch_embed_proj"])
        feats = []
        for lvl in range(4):
            if lvl:
                x = self.downsample(x, p[f"down{lvl}_{lvl + 1}"])
            for i in range(self.cfg.num_blocks[lvl]):
                x = self.block(x, p[f"encoder_level{lvl + 1}_{i}"], lvl)
            feats.append(x)
        return feats

    def fusion(self, a, b, p):
        """SCFM fusion: concat -> TSAB + SSAB -> 3x3 conv with bias."""
        c, g = self.cfg, self.g
        x = g.op("Concat", a, b, axis=1)
        y = g.op(
            "Add",
            self.channel_attention(x, p["channel_attn"], c.fusion_channel_heads),
            self.window_attention(
                x, p["spatial_attn"], c.fusion_spatial_heads, c.fusion_spatial_dim_head
            ),
        )
        return self.conv(y, p["conv"])

    def cross_attention(self, a, b, p):
        """SCFM level 4: A' = 1x1[SSAB_A(A), TSAB_B(B)], B' = 1x1[SSAB_B(B), TSAB_A(A)]."""
        c, g = self.cfg, self.g
        sa = lambda t, n: self.window_attention(t, p[n], c.spatial_heads[3], c.spatial_dim_head)
        ca = lambda t, n: self.channel_attention(t, p[n], c.fusion_channel_heads)
        a_out = self.conv(
            g.op("Concat", sa(a, "spatial_attn_A"), ca(b, "channel_attn_B"), axis=1), p["fusion_A"]
        )
        b_out = self.conv(
            g.op("Concat", sa(b, "spatial_attn_B"), ca(a, "channel_attn_A"), axis=1), p["fusion_B"]
        )
        return a_out, b_out

    def forward(self, vis: str, ir: str, clip: bool = True) -> str:
        c, g, p = self.cfg, self.g, self.p
        fa, fb = self.encoder(vis, p["encoder_A"]), self.encoder(ir, p["encoder_B"])
        a4, b4 = self.cross_attention(fa[3], fb[3], p["cross_attention"])
        x = self.fusion(a4, b4, p["feature_fusion_4"])
        for i in range(c.num_blocks[3]):
            x = self.block(x, p[f"decoder_level4_{i}"], 3)
        for lvl in (3, 2, 1):
            x = self.upsample(x, p[f"up{lvl + 1}_{lvl}"])
            f = self.fusion(fa[lvl - 1], fb[lvl - 1], p[f"feature_fusion_{lvl}"])
            x = g.op("Concat", x, f, axis=1)
            if lvl > 1:
                x = self.conv(x, p[f"reduce_chan_level{lvl}"])
            for i in range(c.num_blocks[lvl - 1]):
                x = self.block(x, p[f"decoder_level{lvl}_{i}"], lvl - 1)
        for i in range(c.num_refinement_blocks):
            x = self.block(x, p[f"refinement_{i}"], 0)
        out = g.op("Add", self.conv(x, p["output"]), vis)
        return g.op("Clip", out, g.const(0.0), g.const(1.0)) if clip else out


def student_onnx(params, cfg, clip: bool = True):
    """onnx.ModelProto of a student: inputs vis (N, 3, H, W), ir (N, 1, H, W) float32 in
    [0, 1] with H, W multiples of 8; output fused (N, 3, H, W), clipped to [0, 1] unless
    clip=False (then the network's output as it is, for comparing with the JAX forward)."""
    import onnx
    from onnx import TensorProto, helper

    if cfg.text_dim:
        raise ValueError(TEACHER_REFUSED)
    net = StudentGraph(params, cfg)
    dims = lambda ch: ["N", ch, "H", "W"]
    out = net.forward(INPUTS[0], INPUTS[1], clip)
    net.g.nodes.append(helper.make_node("Identity", [out], [OUTPUT]))
    graph = helper.make_graph(
        net.g.nodes,
        "dtpf_student",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, dims(ch))
            for n, ch in zip(INPUTS, (cfg.in_ch_a, cfg.in_ch_b), strict=True)
        ],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, dims(cfg.out_ch))],
        net.g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dtpf_jax"
    )
    model.ir_version = 8  # onnxruntime >= 1.14 reads it
    onnx.checker.check_model(model)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dtpf_jax.export_onnx",
        description=__doc__.split("\n\nThe graph")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="ONNX file to write")
    parser.add_argument(
        "--weights",
        default="student",
        help=f"a shipped student ({', '.join(infer.SHIPPED_STUDENTS)}) or a student weight file",
    )
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        print('error: onnx is not installed; pip install "dtpf-jax[onnx]"', file=sys.stderr)
        return 2
    try:
        model = infer.load_model(args.weights)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.text_guided:
        print(f"error: {args.weights}: {TEACHER_REFUSED}", file=sys.stderr)
        return 2
    proto = student_onnx(model.params, model.config)
    blob = proto.SerializeToString()
    try:
        atomic_write(args.out, blob)
    except OSError as e:
        print(f"error: {args.out}: cannot write ({e.strerror}); pass another path", file=sys.stderr)
        return 2
    print(f"{args.out}: {model.source} as ONNX (opset {OPSET}), {len(blob) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
