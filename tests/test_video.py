"""The offline video data (models/video.py) and the PASS perception model (models/pass_net.py).

Fixed seeds, printed. Expected values are derived here by hand or measured on the arrays
(noise against the noiseless frames, masks against the digits' boxes), never taken from the
implementation's own helpers.
"""

import numpy as np
import pytest
import torch

from tinyaccel.errors import DTypeError, ShapeError, TinyAccelError
from tinyaccel.models import pass_net, video, zoo

SEED = 0  # the default scene
OTHER = 17


@pytest.fixture(scope="module")
def default_clip():
    print(f"default scene: make_clip(seed={SEED})")
    return video.make_clip(seed=SEED)


def test_same_seed_same_clip_bit_for_bit():
    print(f"seeds {OTHER}, {OTHER + 1}")
    a = video.make_clip(frames=6, seed=OTHER, background="random")
    b = video.make_clip(frames=6, seed=OTHER, background="random")
    c = video.make_clip(frames=6, seed=OTHER + 1, background="random")
    for f in ("frames", "clean", "masks", "labels", "positions"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert a.frames.tobytes() == b.frames.tobytes()
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.positions, c.positions)
    x1, y1 = video.training_set(clips=2, frames_per_clip=2, seed=video.TRAIN_SEED_BASE + 3)
    x2, y2 = video.training_set(clips=2, frames_per_clip=2, seed=video.TRAIN_SEED_BASE + 3)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (4, 64, 96) and y1.shape == (4, 64 // video.FACTOR, 96 // video.FACTOR)


def test_default_scene_is_honest(default_clip):
    """>= 60 frames, >= 2 digits, coverage >= 3 %, 8-bit frames in [0, 1], a static camera."""
    c = default_clip
    t, h, w = c.frames.shape
    print(f"default scene: {t} frames {w}x{h}, {c.labels.shape[1]} digits {c.labels[0]}, "
          f"coverage {c.masks.mean():.4f}, background {c.background}")
    assert t >= 60 and (h, w) == (64, 96) and c.labels.shape == (t, 2)
    assert c.frames.dtype == np.float32 and c.masks.dtype == bool
    assert c.masks.mean() >= 0.03 and c.coverage() == pytest.approx(c.masks.mean())
    # every frame covers some digit pixels (not a clip whose digits left the frame)
    assert c.masks.reshape(t, -1).mean(axis=1).min() >= 0.015
    for x in (c.frames, c.clean):
        assert x.min() >= 0 and x.max() <= 1
        codes = x * 255
        assert np.array_equal(codes, np.round(codes)), "not on the 1/255 grid"
    # changed_fraction by hand: pixels whose noiseless value differs from the previous frame
    changed = [np.mean(c.clean[i] != c.clean[i - 1]) for i in range(1, t)]
    assert c.changed_fraction() == pytest.approx(np.mean(changed))
    assert 0 < c.changed_fraction() < 0.5
    print(f"changed fraction {c.changed_fraction():.4f}")


def test_sensor_noise_reaches_every_pixel_of_every_frame(default_clip):
    """Noise = frame - noiseless frame, in grey levels: std ~2 on every frame, every pixel noisy
    over time, independent from frame to frame, and never swallowed by the [0, 1] clip."""
    c = default_clip
    r = (c.frames.astype(np.float64) - c.clean) * 255
    sigma = c.noise
    assert sigma >= 1
    # clipping cannot eat the noise: the noiseless values stay 6 sigma inside [0, 255]
    assert c.clean.min() * 255 >= 6 * sigma and c.clean.max() * 255 <= 255 - 6 * sigma
    per_frame = r.reshape(len(r), -1)
    # rounding a N(0, 2) draw: std sqrt(4 + 1/12) ~ 2.02; P(|draw| >= 0.5) ~ 0.80
    assert np.all(np.abs(per_frame.std(axis=1) - 2.02) < 0.12), per_frame.std(axis=1)
    assert per_frame.mean(axis=1).__abs__().max() < 0.15
    assert (per_frame != 0).mean(axis=1).min() > 0.75
    # every pixel: its noise over the 72 frames has std >= 1 grey level (and is not constant)
    per_pixel = r.std(axis=0)
    print(f"per-pixel temporal noise std: min {per_pixel.min():.3f}, mean {per_pixel.mean():.3f}")
    assert per_pixel.min() >= 1.0
    # fresh noise on each frame: consecutive frames' noise uncorrelated
    corr = np.corrcoef(per_frame[:-1].ravel(), per_frame[1:].ravel())[0, 1]
    assert abs(corr) < 0.02
    # noise 0: the camera gives the noiseless frames exactly
    quiet = video.make_clip(frames=3, seed=SEED, noise=0.0)
    assert np.array_equal(quiet.frames, quiet.clean)
    assert np.array_equal(quiet.clean, c.clean[:3])


def test_masks_and_changes_lie_on_the_digits(default_clip):
    """Digit pixels lie inside the digits' boxes (from ``positions``) and are bright; all change
    of the noiseless frames lies inside the boxes of this and the previous frame; the digits move
    in straight lines at their speed, bouncing inside the frame."""
    c = default_clip
    t, h, w = c.masks.shape
    p = c.digit_px

    def boxes(i):
        b = np.zeros((h, w), bool)
        for y, x in c.positions[i]:
            b[max(0, int(np.floor(y)) - 1):int(np.ceil(y)) + p + 1,
              max(0, int(np.floor(x)) - 1):int(np.ceil(x)) + p + 1] = True
        return b

    for i in range(t):
        inside = boxes(i)
        assert not (c.masks[i] & ~inside).any(), f"frame {i}: digit pixels outside the boxes"
        for y, x in c.positions[i]:
            box = c.masks[i, int(y):int(y) + p, int(x):int(x) + p]
            assert box.mean() > 0.1, f"frame {i}: a digit box holds almost no ink"
        assert c.clean[i][c.masks[i]].min() > c.clean[i][~inside].max() - 0.2
        if i:
            change = c.clean[i] != c.clean[i - 1]
            assert not (change & ~(inside | boxes(i - 1))).any(), f"frame {i}: static bg moved"
    pos = c.positions
    assert pos.min() >= 0 and (pos[..., 0].max() <= h - p) and (pos[..., 1].max() <= w - p)
    step = np.linalg.norm(np.diff(pos, axis=0), axis=-1)
    free = np.all((pos[1:] > 1.5) & (pos[1:] < np.array([h - p, w - p]) - 1.5), axis=-1) & \
        np.all((pos[:-1] > 1.5) & (pos[:-1] < np.array([h - p, w - p]) - 1.5), axis=-1)
    assert np.all((step[free] >= 0.5 - 1e-9) & (step[free] <= 1.5 + 1e-9))
    # constant velocity away from the borders
    vel = np.diff(pos, axis=0)
    both = free[1:] & free[:-1]
    assert np.allclose(vel[1:][both], vel[:-1][both])
    # a still digit: no change at all
    still = video.make_clip(frames=4, seed=OTHER, speed=(0.0, 0.0))
    assert still.changed_fraction() == 0.0


def test_downsample_mask_by_hand():
    m = np.zeros((4, 8), bool)
    m[:2, :4] = True  # left cell: 8 of 16 pixels -> foreground (>= half)
    m[0, 4:8] = True
    m[1, 4:7] = True  # right cell: 4 + 3 = 7 of 16 pixels -> background
    assert m[:, :4].sum() == 8 and m[:, 4:].sum() == 7
    assert video.downsample_mask(m, 4).tolist() == [[True, False]]
    stack = np.stack([m, ~m])
    assert video.downsample_mask(stack, 4).tolist() == [[[True, False]], [[True, True]]]
    with pytest.raises(ShapeError, match="4x6"):
        video.downsample_mask(np.zeros((4, 6), bool), 4)
    two = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)  # 2x2 cells: 2 of 4 -> yes, 1 of 4 -> no
    assert video.downsample_mask(two, 2).tolist() == [[True, False]]


def test_iou_and_miou_by_hand():
    pred = np.array([[1, 1, 0, 0]], bool)
    gt = np.array([[1, 0, 1, 0]], bool)
    # foreground: intersection 1 (first), union 3; background: intersection 1 (last), union 3
    assert video.iou(pred, gt) == pytest.approx(1 / 3)
    assert video.miou(pred, gt) == pytest.approx(1 / 3)
    # counted over the clip, not averaged per frame: frame 0 perfect (1/1), frame 1 three false
    # positives (0/3) -> 1/4, where a per-frame mean would say 1/2
    p2 = np.zeros((2, 2, 2), bool)
    g2 = np.zeros((2, 2, 2), bool)
    p2[0, 0, 0] = g2[0, 0, 0] = True
    p2[1].flat[:3] = True
    assert video.iou(p2, g2) == pytest.approx(1 / 4)
    # background: frame 0 3/3, frame 1 1/4 -> 4/7; miou = (1/4 + 4/7) / 2
    assert video.miou(p2, g2) == pytest.approx((1 / 4 + 4 / 7) / 2)
    empty = np.zeros((3, 3), bool)
    assert video.iou(empty, empty) == 1.0 and video.miou(empty, empty) == 1.0
    assert video.iou(~empty, empty) == 0.0
    with pytest.raises(ShapeError, match="differ"):
        video.iou(pred, gt[:, :3])


def test_load_video_round_trip_and_errors(tmp_path):
    import imageio.v3 as iio
    rng = np.random.default_rng(OTHER)
    print(f"seed {OTHER}")
    frames = rng.integers(0, 256, (5, 16, 24), dtype=np.uint8)
    gif = tmp_path / "clip.gif"
    iio.imwrite(gif, frames)
    x = video.load_video(gif)
    assert x.shape == (5, 16, 24) and x.dtype == np.float32
    assert np.array_equal(np.round(x * 255).astype(np.uint8), frames)  # grey GIF: lossless
    assert video.load_video(gif, frames=2).shape == (2, 16, 24)
    assert video.load_video(gif, size=(32, 48)).shape == (5, 32, 48)
    # colour -> ITU-R 709 luma
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 1] = 255
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i, f in enumerate(rgb):
        iio.imwrite(folder / f"{i:03d}.png", f)
    assert np.allclose(video.load_video(folder), round(0.7154 * 255) / 255)
    # errors: missing, unreadable, frames changing size
    with pytest.raises(video.VideoFileError, match="no such file"):
        video.load_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 20)
    with pytest.raises(video.VideoFileError, match="junk.mp4"):
        video.load_video(junk)
    assert issubclass(video.VideoFileError, TinyAccelError)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    iio.imwrite(sizes / "000.png", np.zeros((8, 8), np.uint8))
    iio.imwrite(sizes / "001.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(ShapeError, match="frame 1 is 10x8.*started at 8x8"):
        video.load_video(sizes)
    with pytest.raises(ShapeError, match="frames=0"):
        video.load_video(gif, frames=0)
    npy = tmp_path / "ints.tif"
    iio.imwrite(npy, np.zeros((4, 4), np.int32))
    with pytest.raises((DTypeError, video.VideoFileError)):
        video.load_video(npy)


def test_load_video_mp4(tmp_path):
    """MP4 through PyAV (the pinned ``av``): lossy, so compared within a few grey levels."""
    import imageio.v3 as iio
    clip = video.make_clip(frames=8, seed=OTHER)
    path = tmp_path / "clip.mp4"
    rgb = np.repeat(np.round(clip.frames * 255).astype(np.uint8)[..., None], 3, axis=-1)
    iio.imwrite(path, rgb, plugin="pyav", codec="libx264", fps=24)
    x = video.load_video(path)
    err = np.abs(x - clip.frames).mean() * 255
    print(f"mp4 round trip: mean abs error {err:.2f} grey levels")
    assert x.shape == clip.frames.shape and err < 6


def test_sample_gif_is_skimages_moving_gif():
    g = video.sample_gif()
    native = video.sample_gif(size=None)
    assert native.shape == (24, 25, 14) and g.shape == (24, 112, 64)
    assert g.dtype == np.float32 and 0 <= g.min() and g.max() <= 1
    # a moving object: consecutive frames differ, not all the same
    assert sum(not np.array_equal(a, b) for a, b in zip(native, native[1:], strict=False)) >= 12


def test_training_data_never_is_a_test_scene():
    with pytest.raises(ShapeError, match="training seeds start at"):
        video.training_set(clips=1, seed=5)
    assert video.TRAIN_SEED_BASE > max(video.TEST_SEEDS)
    calib = video.training_frames(5, 32, 48)
    assert calib.shape == (5, 32, 48) and calib.dtype == np.float32


def test_model_shapes_fit_the_patches():
    """96 x 64 input -> logits 2 x 16 x 24; every layer's output a multiple of 4 (and 2)."""
    model = zoo.build(pass_net.NAME)
    assert zoo.get(pass_net.NAME).weights == "video"
    assert pass_net.NAME not in zoo.DIGITS_MODELS
    shapes = {}

    def keep(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape)
        return hook

    for name, mod in model.named_children():
        mod.register_forward_hook(keep(name))
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 64, 96))
    assert tuple(out.shape) == (2, 2, 32, 48)
    expect = {"c1": (16, 32, 48), "c2": (16, 32, 48), "c3": (16, 32, 48), "head": (2, 32, 48)}
    for name, shape in expect.items():
        assert tuple(shapes[name][1:]) == shape, name
        assert shape[1] % 4 == 0 and shape[2] % 4 == 0
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cached_model_segments_the_default_scene(default_clip):
    """Only when the zoo cache holds pass-segnet (``tinyaccel zoo train pass-segnet``)."""
    path = zoo.cache_path(pass_net.NAME)
    if not path.exists():
        pytest.skip(f"{path} not cached: tinyaccel zoo train {pass_net.NAME}")
    try:
        model, _ = zoo.load(pass_net.NAME, path, same_recipe=True)
    except ShapeError as exc:
        pytest.skip(f"stale cache: {exc}")
    pred = pass_net.predict(model, default_clip.frames)
    score = video.iou(pred, video.downsample_mask(default_clip.masks))
    print(f"FP32 foreground IoU on the default scene: {score:.4f}")
    assert score >= 0.6
