import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dtpf_jax import infer, networks, official

OFFICIAL_COUNTS = {"teacher": 40_289_814, "student": 4_371_772}


def _shapes(kind):
    model = networks.build_model(networks.model_config(kind))
    return jax.eval_shape(lambda: networks.init_params(model, jax.random.key(0)))


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_parameter_counts_equal_official(kind):
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(_shapes(kind)))
    assert n == OFFICIAL_COUNTS[kind]


REGENERATE = 'python -c "from dtpf_jax import networks; networks.write_shape_manifest()"'


def test_shipped_shape_manifest_is_current():
    # dtpf_jax/param_shapes.json spares fuse a 2 s trace; it must be what a trace gives now
    cfg = networks.model_config("student")
    known = networks._manifest().get(networks._shape_key(cfg.to_json()))
    assert known is not None, f"the student's shapes are stale or missing: {REGENERATE}"
    assert dict(known) == dict(networks.trace_param_shapes(cfg.to_json())), REGENERATE
    assert set(dict(known)) == set(flatten_dict(_shapes("student")))


def test_param_shapes_read_the_manifest_and_trace_anything_else(monkeypatch):
    traced = []

    def trace(config_json):
        traced.append(config_json)
        return ((("w",), jax.ShapeDtypeStruct((1,), jnp.float32)),)

    student = networks.model_config("student")
    monkeypatch.setattr(networks, "trace_param_shapes", trace)
    networks._param_shapes.cache_clear()
    try:
        assert len(networks.param_shapes(student)) == 644 and not traced  # from the file
        other = networks.model_config("student")
        other.dim = 8
        assert list(networks.param_shapes(other)) == [("w",)] and len(traced) == 1
        networks._param_shapes.cache_clear()
        # edited network sources: the file no longer applies, the student is traced
        monkeypatch.setattr(networks, "_source_digest", lambda: "edited")
        assert list(networks.param_shapes(student)) == [("w",)] and len(traced) == 2
    finally:
        networks._param_shapes.cache_clear()


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_every_official_tensor_has_a_counterpart(kind, shared_dir):
    rows = official.read_keys_tsv(shared_dir / "official_keys" / f"{kind}_state_dict.tsv")
    ours = flatten_dict(_shapes(kind))
    mapped = {}
    for name, shape in rows:
        path = official.flax_path(name)
        assert path in ours, f"{name} -> {path} has no counterpart"
        assert official.to_flax(name, np.zeros(shape)).shape == ours[path].shape, name
        mapped[path] = name
    assert len(mapped) == len(rows) == len(ours)  # one to one, nothing left over
    assert sum(int(np.prod(s)) for _, s in rows) == OFFICIAL_COUNTS[kind]


def test_official_layout_round_trip():
    rng = np.random.default_rng(0)
    cases = {
        "a.qkv.weight": (12, 4, 1, 1),
        "a.qkv_dwconv.weight": (12, 1, 3, 3),
        "a.conv.weight": (5, 4, 3, 3),
        "a.channel_attn.temperature": (8, 1, 1),
        "prompt_guidance_1.fc.0.weight": (48, 512),
        "a.norm1.body.weight": (7,),
    }
    for name, shape in cases.items():
        v = rng.normal(size=shape)
        np.testing.assert_array_equal(official.to_torch(name, official.to_flax(name, v), shape), v)
    # A 1x1 conv is (out, in) in torch and (in, out) here.
    w = rng.normal(size=(6, 4, 1, 1))
    np.testing.assert_array_equal(official.to_flax("x.weight", w), w[:, :, 0, 0].T)


@pytest.mark.parametrize(
    "kind,widths", [("teacher", (384, 192, 96, 96)), ("student", (128, 64, 32, 32))]
)
def test_full_size_shapes_480x640_and_distillation_features(kind, widths):
    cfg = networks.model_config(kind)
    model = networks.build_model(cfg)
    params = _shapes(kind)
    vis = jax.ShapeDtypeStruct((2, 448, 640, 3), jnp.float32)
    ir = jax.ShapeDtypeStruct((2, 448, 640, 1), jnp.float32)
    text = jax.ShapeDtypeStruct((2, 512), jnp.float32) if cfg.text_dim else None
    out, feats = jax.eval_shape(
        lambda p, v, i, t: model.apply({"params": p}, v, i, t, return_features=True),
        params,
        vis,
        ir,
        text,
    )
    assert out.shape == (2, 448, 640, 3)
    assert tuple(f.shape[-1] for f in feats) == widths
    assert [f.shape[1:3] for f in feats] == [(56, 80), (112, 160), (224, 320), (448, 640)]


def test_teacher_requires_text_and_uses_it(tiny_teacher):
    cfg, params = tiny_teacher
    model = networks.build_model(cfg)
    vis = jnp.full((2, 64, 64, 3), 0.5)
    ir = jnp.full((2, 64, 64, 1), 0.2)
    with pytest.raises(ValueError, match="text embedding"):
        jax.eval_shape(lambda p: model.apply({"params": p}, vis, ir, None), params)
    out = jax.jit(lambda p, t: model.apply({"params": p}, vis, ir, t))(
        params, jnp.stack([jnp.zeros(512), jnp.ones(512)])
    )
    a, b = out[0], out[1]
    assert float(jnp.abs(a - b).max()) > 1e-4


def test_output_is_visible_residual_plus_conv(tiny_student):
    cfg, params = tiny_student
    model = networks.build_model(cfg)
    params = jax.tree.map(np.asarray, params)
    params["output"]["kernel"] = np.zeros_like(params["output"]["kernel"])
    vis = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3))
    out = jax.jit(model.apply)({"params": params}, vis, jnp.zeros((1, 64, 64, 1)))
    np.testing.assert_allclose(out, vis, atol=1e-6)


def test_remat_changes_neither_outputs_nor_gradients(tiny_student):
    # One transformer block (level 1) beside the fusion and cross-attention modules, which
    # are rematerialised too: every kind of remat'd module, a third of tiny's compile.
    cfg = tiny_student[0].copy_and_resolve_references()
    cfg.num_blocks, cfg.num_refinement_blocks = (1, 0, 0, 0), 0
    params = infer.random_params(cfg)
    vis = np.random.default_rng(2).random((1, 64, 64, 3), np.float32)
    ir = np.random.default_rng(3).random((1, 64, 64, 1), np.float32)
    grads = []
    for remat in (True, False):
        c = cfg.copy_and_resolve_references()
        c.remat = remat
        model = networks.build_model(c)
        loss = lambda p, model=model: jnp.mean(jnp.square(model.apply({"params": p}, vis, ir)))
        grads.append(jax.jit(jax.grad(loss))(params))  # built as conftest's XLA_FLAGS say
    flat = [[np.asarray(x) for x in jax.tree.leaves(g)] for g in grads]  # numpy: no op compiles
    assert sum(float(np.abs(x).sum()) for x in flat[0]) > 0
    for a, b in zip(*flat, strict=True):  # equal up to float reassociation
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()) + 1e-8)
    # Only the teacher, whose stored activations would not fit a 24 GiB machine at batch 4,
    # recomputes them by default.
    assert networks.model_config("teacher").remat and not networks.model_config("student").remat
