import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtpf_jax import infer, networks, tiling


def _smooth_pair(h, w, b=1):
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    vis = np.stack(
        [0.5 + 0.3 * np.sin(3 * xx + 2 * yy), 0.4 + 0.2 * np.cos(2 * xx), 0.3 + 0.2 * yy], -1
    )
    ir = (0.5 + 0.4 * np.sin(4 * yy) * np.cos(3 * xx))[..., None]
    return (
        np.repeat(vis[None], b, 0).astype(np.float32),
        np.repeat(ir[None], b, 0).astype(np.float32),
    )


def test_bucket_sizes():
    sizes = (1, 64, 65, 191, 256, 257, 384, 385, 480, 640)
    coarse = [64, 64, 128, 192, 256, 384, 384, 512, 512, 640]
    assert [infer.bucket_size(n) for n in sizes] == coarse  # the default
    assert [infer.bucket_size(n, "coarse") for n in sizes] == coarse
    fine = [32, 64, 96, 192, 256, 288, 384, 416, 480, 640]
    assert [infer.bucket_size(n, "fine") for n in sizes] == fine
    with pytest.raises(ValueError, match="unknown buckets"):
        infer.bucket_size(10, "exact")


def test_choose_buckets_weighs_compiles_against_padding():
    assert infer.choose_buckets([(480, 640)] * 20) == "fine"  # one shape either way
    # RoadScene-like: many odd sizes, few coarse shapes.
    mixed = [(200 + 7 * k, 400 + 11 * k) for k in range(40)]
    fine = {(infer.bucket_size(h, "fine"), infer.bucket_size(w, "fine")) for h, w in mixed}
    coarse = {(infer.bucket_size(h), infer.bucket_size(w)) for h, w in mixed}
    assert len(fine) >= 20 and len(coarse) <= 6
    assert infer.choose_buckets(mixed) == "coarse"
    # Two sizes sharing a coarse bucket: fine costs one more compile, which 2 images of
    # 480x640 (2 x 32 padded rows) do not repay, but many do.
    two = [(480, 640), (500, 640)]
    assert infer.choose_buckets(two) == "coarse"
    assert infer.choose_buckets(two * 200) == "fine"


def test_tile_starts_cover_the_image():
    assert tiling.tile_starts(128) == [0]
    assert tiling.tile_starts(300) == [0, 64, 128, 172]
    starts = tiling.tile_starts(480)
    assert starts[-1] + tiling.TILE == 480 and len(starts) == 7  # 7 x 9 = 63 windows at 480x640


@pytest.mark.parametrize("h, w", [(1024, 1280), (3000, 4000), (1080, 1920), (300, 5000), (70, 90)])
def test_large_tiles_cover_the_frame_on_the_window_grid(h, w):
    rows, cols = tiling.plan_large(h, w)
    assert rows.length * cols.length <= tiling.LARGE_TILE_PIXELS
    for axis, n in ((rows, h), (cols, w)):
        starts = np.array(axis.starts)
        assert starts[0] == 0 and starts[-1] + axis.length >= n and starts[-1] < n
        assert (starts % tiling.ALIGN == 0).all() and axis.length % networks.SIZE_MULTIPLE == 0
        seams = axis.length - np.diff(starts)
        assert (seams >= tiling.LARGE_OVERLAP).all() and (seams <= axis.length / 2).all()
        weights = tiling.seam_weights(axis, n)
        total = np.zeros(starts[-1] + axis.length)
        for s, wt in zip(starts, weights, strict=True):
            total[s : s + axis.length] += wt
            inner = [] if s == 0 else [0]  # a tile's first pixels after a seam's start
            assert all(wt[i] == 0 for i in inner)
        np.testing.assert_allclose(total[:n], 1.0, atol=1e-12)  # a partition of unity
        # The owned parts (frame statistics) partition [0, n), each inside its tile, cut on
        # multiples of 8 (whole level-4 pixels) where two tiles overlap.
        parts = zip(starts, tiling.ownership(axis, n), strict=True)
        owned = [(s + a, s + b) for s, (a, b) in parts]
        assert owned[0][0] == 0 and owned[-1][1] == n
        cuts = [(b0, a1) for (_, b0), (a1, _) in zip(owned[:-1], owned[1:], strict=True)]
        assert all(b0 == a1 and a1 % 8 == 0 for b0, a1 in cuts)
        assert all(s <= a < b <= s + axis.length for s, (a, b) in zip(starts, owned, strict=True))
    # Few extra pixels: the two benchmark sizes run at most 20 % more than the frame.
    if (h, w) in ((1024, 1280), (3000, 4000)):
        assert rows.work * cols.work <= 1.2 * h * w


def _local_net(v, i, t):
    """A 3x3 box filter plus 64x64 block means from the tile's origin (window attention's
    grid at level 4): large tiles reproduce it exactly only on the full frame's grid."""
    x = 0.6 * np.asarray(v) + 0.4 * np.asarray(i)
    b, h, w, c = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    box = sum(p[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    blocks = x.reshape(b, h // 64, 64, w // 64, 64, c).mean((2, 4), keepdims=True)
    return 0.5 * box + 0.5 * np.broadcast_to(blocks, (b, h // 64, 64, w // 64, 64, c)).reshape(
        x.shape
    )


def test_large_tiles_reproduce_a_local_net_exactly():
    vis, ir = _smooth_pair(320, 448, b=2)
    vis = vis + 0.2 * np.random.default_rng(0).random(vis.shape, np.float32) - 0.1
    calls = []
    out = tiling.large_tiles(
        _local_net, vis, ir, None, 192 * 192, progress=lambda *a: calls.append(a)
    )
    assert calls == [(k, 12) for k in range(13)]  # 2 images x 2 x 3 tiles of 192 x 192
    np.testing.assert_allclose(out, np.clip(_local_net(vis, ir, None), 0, 1), atol=1e-6)
    # A frame off the tile grid: the last tiles run past its end (padded) and are cropped
    # back; away from that border the output is what the net gives on the frame.
    vis, ir = vis[:, :300, :420], ir[:, :300, :420]
    out = tiling.large_tiles(_local_net, vis, ir, None, 192 * 192)
    assert out.shape == (2, 300, 420, 3)
    want = np.clip(_local_net(vis[:, :256, :384], ir[:, :256, :384], None), 0, 1)
    np.testing.assert_allclose(out[:, :255, :383], want[:, :255, :383], atol=1e-6)


def test_odd_sizes_come_back_at_their_size_and_in_range(tiny_student):
    cfg, params = tiny_student
    fuse = infer.Fuser(cfg)
    vis, ir = _smooth_pair(37, 91, b=2)
    out = fuse(params, vis, ir)
    assert out.shape == (2, 37, 91, 3)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    # 2-D / 3-D inputs are accepted as a batch of one.
    assert fuse(params, vis[0], ir[0, ..., 0]).shape == (1, 37, 91, 3)


def test_fine_buckets_run_partial_windows_at_the_images_size(tiny_student):
    cfg, params = tiny_student
    fuse = infer.Fuser(cfg)
    vis, ir = _smooth_pair(37, 91)
    coarse = fuse(params, vis, ir)  # 64 x 128
    fine = fuse(params, vis, ir, buckets="fine")  # 64 x 96: a partial window at level 4 (12 wide)
    assert fuse.trace_count == 2 and fine.shape == coarse.shape == (1, 37, 91, 3)
    assert np.isfinite(fine).all() and fine.min() >= 0.0 and fine.max() <= 1.0
    # The same network on a differently padded input: close, not equal (TSAB's channel
    # statistics and the border windows see the padding).
    assert 0 < np.abs(fine - coarse).mean() < 0.05


def test_network_names_the_size_rule_for_other_sizes(tiny_student):
    cfg, params = tiny_student
    vis, ir = _smooth_pair(36, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        networks.build_model(cfg).apply({"params": params}, vis, ir)


def test_jit_compiles_once_per_bucket(tiny_student):
    cfg, params = tiny_student
    fuse = infer.Fuser(cfg)
    for h, w in [(37, 91), (50, 100), (64, 128), (60, 70)]:  # buckets 64x128, 64x128, 64x128
        fuse(params, *_smooth_pair(h, w))  # ... and 64x128 again
    assert fuse.trace_count == 1
    fuse(params, *_smooth_pair(65, 91))  # 128 x 128: a new bucket
    assert fuse.trace_count == 2


def test_tiles_blend_a_pointwise_net_exactly(tiny_student):
    """The Gaussian blending is a partition of unity: a pointwise net comes back unchanged."""
    cfg, _ = tiny_student
    fuse = infer.Fuser(cfg)
    fuse._apply = lambda p, v, i, t: jnp.clip(0.6 * v + 0.4 * i, 0, 1)
    vis, ir = _smooth_pair(200, 333)
    tiles = fuse(None, vis, ir, mode="tiles", tile_batch=4)
    np.testing.assert_allclose(tiles, 0.6 * vis + 0.4 * ir, atol=2e-6)


def test_tiles_and_full_agree_on_a_smooth_image(tiny_student):
    cfg, params = tiny_student
    fuse = infer.Fuser(cfg)
    vis, ir = _smooth_pair(192, 256)
    full = fuse(params, vis, ir, mode="full")
    calls = []
    tiles = fuse(params, vis, ir, mode="tiles", tile_batch=6, progress=lambda *a: calls.append(a))
    assert calls == [(0, 6), (6, 6)]  # 2 x 3 tiles of 128², in one call
    # 2 x 3 large tiles of 128² (the shape compiled by test_jit_compiles_once_per_bucket).
    large = fuse(
        params, vis, ir, mode="large", tile_pixels=128 * 128, progress=lambda *a: calls.append(a)
    )
    assert calls[2:] == [(k, 6) for k in range(7)]
    assert tiles.shape == large.shape == full.shape == (1, 192, 256, 3)
    # A random net has global context (channel attention), so tiles only approximate the
    # full image; they must still be far closer to it than the net's change to its input.
    for out in (tiles, large):
        gap = np.abs(full - out).mean()
        assert gap < 0.05 and gap < 0.35 * np.abs(full - vis).mean()  # tiles: 0.031 and 0.23


def test_large_tiles_share_the_frames_channel_statistics(tiny_student):
    """passes=2: pass 1 adds up each TSAB layer's sums over the pixels each tile owns, pass 2
    runs every tile on those frame sums instead of its own."""
    cfg, params = tiny_student
    fuse = infer.Fuser(cfg)
    vis, ir = _smooth_pair(192, 256)
    vis = np.clip(vis + 0.3 * np.random.default_rng(0).random(vis.shape, np.float32) - 0.15, 0, 1)
    full = fuse(params, vis, ir, mode="full")
    one = fuse(params, vis, ir, mode="large", tile_pixels=128 * 128)
    traces = fuse.trace_count

    def two_passes(tile_pixels: int):
        calls = []
        kw = dict(mode="large", passes=2, progress=lambda *a: calls.append(a))
        return fuse(params, vis, ir, tile_pixels=tile_pixels, **kw), calls

    two, calls = two_passes(128 * 128)
    assert fuse.trace_count == traces + 2  # a program per pass, one shape each
    assert calls == [(k, 12) for k in range(13)]  # 2 passes over 2 x 3 tiles
    # A random net's tiles differ from the full frame by their statistics and their seams;
    # the frame's statistics take away about a third of the gap (0.028 -> 0.018).
    gap1, gap2 = np.abs(one - full).mean(), np.abs(two - full).mean()
    assert gap2 < 0.8 * gap1, (gap1, gap2)
    # The first TSAB layer sees only local features (3x3 convs, a norm): its owned sums,
    # added over the tiles, are the frame's own.
    frame = fuse._apply_collect(params, vis, ir, None, np.ones((1, 192, 256), np.float32))
    rows, cols = tiling.plan_large(192, 256, 128 * 128)
    added = None
    for y, (y0, y1) in zip(rows.starts, tiling.ownership(rows, 192), strict=True):
        for x, (x0, x1) in zip(cols.starts, tiling.ownership(cols, 256), strict=True):
            mask = np.zeros((1, 128, 128), np.float32)
            mask[:, y0:y1, x0:x1] = 1
            tv, ti = vis[:, y : y + 128, x : x + 128], ir[:, y : y + 128, x : x + 128]
            own = fuse._apply_collect(params, tv, ti, None, mask)
            added = own if added is None else jax.tree.map(np.add, added, own)
    first = lambda t: t["encoder_A"]["encoder_level1_0"]["channel_attn"]["sums"]
    for got, want in zip(first(added), first(frame), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    later = lambda t: t["refinement_0"]["channel_attn"]["sums"][0]
    assert not np.allclose(later(added), later(frame), rtol=1e-3)  # tiles differ further on
    # On the whole frame's own sums, pass 2 is a full pass.
    again = fuse._apply_global(params, vis, ir, None, frame)
    np.testing.assert_allclose(np.asarray(again), full, atol=1e-5)
    # Pass 1 runs tiles of half the pixels (its memory): with room for the frame in one
    # tile, pass 2 is that tile on the sums of 1 x 3 smaller ones, close to the full pass.
    one_tile, calls = two_passes(192 * 256)
    assert calls == [(k, 4) for k in range(5)]
    assert 0 < np.abs(one_tile - full).mean() < 0.7 * gap2  # 0.011 against 0.018
    with pytest.raises(ValueError, match="passes must be 1 or 2"):
        fuse(params, vis, ir, mode="large", passes=3)


def test_teacher_needs_text(tiny_teacher):
    cfg, params = tiny_teacher
    fuse = infer.Fuser(cfg)
    vis, ir = _smooth_pair(64, 64)
    with pytest.raises(ValueError, match="text"):
        fuse(params, vis, ir)
    assert fuse(params, vis, ir, np.zeros(512)).shape == (1, 64, 64, 3)


def test_size_mismatch_is_an_error(tiny_student):
    cfg, params = tiny_student
    with pytest.raises(ValueError, match="sizes differ"):
        infer.Fuser(cfg)(params, np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 70, 1)))
