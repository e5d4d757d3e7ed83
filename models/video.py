"""Offline video: static-camera clips with ground truth, video files, and scikit-image's GIF.

Everything here works offline: the backgrounds are real photographs shipped inside scikit-image
(``skimage.data``), the moving objects real handwritten digits shipped inside scikit-learn
(``load_digits``, the fixed split of :mod:`tinyaccel.models.data`).

::

    from tinyaccel.models import video
    clip = video.make_clip(seed=0)          # the default scene: 72 frames 96x64, 2 digits
    clip.frames, clip.masks                 # float32 (T, H, W) in [0, 1], bool (T, H, W)
    truth = video.downsample_mask(clip.masks)          # (T, H/2, W/2): the task's ground truth
    video.iou(prediction, truth), video.miou(prediction, truth)
    x = video.load_video("street.mp4", size=(64, 96), frames=100)   # any file imageio reads
    x = video.sample_gif()                  # scikit-image's real 24-frame GIF (no ground truth)

**The scene** (:func:`make_clip`). A static camera: one grayscale crop of a photo (seeded crop
and zoom, resized to ``height x width``), its grey levels mapped linearly into
[:data:`BG_LOW`, :data:`BG_HIGH`] (a camera exposed for the bright ink). ``digits`` handwritten
digits move over it in straight lines with sub-pixel positions, each with its own seeded velocity
(``speed`` pixels per frame, seeded direction), bouncing off the borders. A digit is its 8 x 8
image (0..16, divided by 16) resampled bilinearly to ``digit_px x digit_px`` *at its sub-pixel
position* (one interpolation does the upscaling and the shift), used as an alpha: overlapping
digits take the maximum alpha ``a``, and the pixel is ``bg * (1 - a) + INK * a`` (:data:`INK`,
alpha blending: the ink is brighter than any background, strokes keep their soft edges). That
is the *clean* frame, quantized to 1/255. The camera then adds sensor noise: i.i.d. Gaussian,
std ``noise`` grey levels (of 255), on every pixel of every frame, clips to [0, 1] and quantizes
to 1/255 (what an 8-bit camera gives). Background and ink are kept far enough from 0 and 1
(:data:`BG_LOW`, :data:`INK`) that the clip almost never bites: the noise reaches every pixel.

**The task and its metric.** Binary segmentation of the moving digits at 1/2 resolution.
A pixel is *digit* when its alpha is at least :data:`INK_LEVEL` (``Clip.masks``);
:func:`downsample_mask` makes a 2 x 2 cell (:data:`FACTOR`) foreground when at least half of its
pixels are digit. :func:`iou` is the foreground IoU over a whole clip (intersections and unions
summed over every cell of every frame, then divided), :func:`miou` the mean of the background
and foreground IoU.

**Seeds.** One seed gives the same clip bit for bit. Test scenes use seeds 0..999
(:data:`TEST_SEEDS`; the default scene is seed 0) and the digits of the *test* part of the split;
every seed from :data:`TRAIN_SEED_BASE` on makes a training scene from the digits of the *train*
part, so a model trained on those has never seen a test scene's crop, noise or digit images:

==========================  ============================================================
seeds                       used by
==========================  ============================================================
0                           the default scene (``tinyaccel video``, reported figures)
1 .. 4                      ``pass_net.VAL_SEEDS``: validation scenes (model choices)
1000 + 10000 s ..           ``pass_net.train`` with seed ``s`` (256 clips: 1000..1255)
5000 .. 5011                ``pass_gate.TRAIN_SEEDS``: the learned host gate
901000 ..                   :func:`training_frames` (PTQ calibration batches)
==========================  ============================================================

**Files.** :func:`load_video` reads what imageio reads without extras -- GIF, PNG, TIFF, JPEG...
through Pillow -- and video containers (MP4, AVI, MKV, MOV, WebM...) through PyAV (the pinned
``av`` wheel, FFmpeg inside), or a folder of image files as frames. :func:`sample_gif` is the only
multi-frame sample scikit-image ships in its wheel: ``no_time_for_that_tiny.gif``, 24 RGB frames of
14 x 25 pixels (a moving figure), returned upscaled to 64 x 112.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tinyaccel.errors import DTypeError, ShapeError, TinyAccelError

__all__ = ["Clip", "make_clip", "downsample_mask", "iou", "miou", "load_video", "sample_gif",
           "training_set", "training_frames", "VideoFileError", "BACKGROUNDS", "TEST_SEEDS",
           "TRAIN_SEED_BASE", "VIDEO_SUFFIXES", "INK", "INK_LEVEL", "BG_LOW", "BG_HIGH", "FACTOR",
           "GIF_PATH"]

#: Photos of ``skimage.data`` (grayscale, shipped in the wheel) a scene can stand on.
BACKGROUNDS = ("camera", "coins", "moon", "text", "page", "brick", "grass", "gravel")
#: Seeds of test scenes (the default scene is seed 0); training clips use seeds >= TRAIN_SEED_BASE.
TEST_SEEDS = range(0, 1000)
TRAIN_SEED_BASE = 1000
#: Background grey levels are mapped linearly into [BG_LOW, BG_HIGH].
BG_LOW, BG_HIGH = 0.06, 0.60
#: The ink's grey level (alpha 1), and the alpha from which a pixel counts as digit.
INK, INK_LEVEL = 0.94, 0.5
#: The task's resolution: segmentation on FACTOR x FACTOR cells.
FACTOR = 2
#: scikit-image's real multi-frame sample: 24 RGB frames of 14 x 25 pixels (a GIF).
GIF_PATH = "data/no_time_for_that_tiny.gif"


class VideoFileError(TinyAccelError, OSError):
    """A video file is missing, or no reader understands it (the message names the file)."""


@dataclass
class Clip:
    """A static-camera clip with its ground truth.

    ``frames`` float32 ``(T, H, W)`` in [0, 1] on the 1/255 grid (noisy, what the camera gives);
    ``clean`` the same without sensor noise; ``masks`` bool ``(T, H, W)``: the digit pixels
    (alpha >= :data:`INK_LEVEL`); ``labels`` int64 ``(T, D)``: each digit's class (constant over
    time); ``positions`` float64 ``(T, D, 2)``: each digit's top-left corner ``(y, x)`` in pixels
    (sub-pixel); ``digit_px``: the digits' size; ``background``: the photo's name; ``seed``.
    """

    frames: np.ndarray
    clean: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    digit_px: int
    background: str
    noise: float
    seed: int

    def changed_fraction(self) -> float:
        """Mean over frames t >= 1 of the fraction of pixels whose noiseless value changed."""
        if len(self.clean) < 2:
            return 0.0
        return float((np.diff(self.clean, axis=0) != 0).mean())

    def coverage(self) -> float:
        """Mean fraction of the pixels covered by digits."""
        return float(self.masks.mean())

    def truth(self, factor: int = FACTOR) -> np.ndarray:
        """The task's ground truth: :func:`downsample_mask` of every frame's mask."""
        return downsample_mask(self.masks, factor)


@lru_cache(maxsize=2)
def _digit_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(N, 8, 8)`` in [0, 1] and labels of one part of the fixed digits split."""
    from .data import load_digits_split
    s = load_digits_split()
    x, y = (s.x_train, s.y_train) if split == "train" else (s.x_test, s.y_test)
    return x[:, 0].numpy().astype(np.float64), y.numpy()


@lru_cache(maxsize=len(BACKGROUNDS))
def _photo(name: str) -> np.ndarray:
    from skimage import data
    if name not in BACKGROUNDS:
        raise ShapeError(f"background {name!r}: use one of {', '.join(BACKGROUNDS)} or 'random'")
    img = np.asarray(getattr(data, name)(), dtype=np.float64)
    img = img / 255.0 if img.max() > 1 else img
    return img if img.ndim == 2 else img[..., :3].mean(axis=-1)


def _background(name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded crop (random zoom, position) of photo ``name``, resized to ``height x width``
    and mapped into [BG_LOW, BG_HIGH]."""
    from skimage.transform import resize
    img = _photo(name)
    scale = min(img.shape[0] / height, img.shape[1] / width)
    zoom = scale * rng.uniform(0.35, 1.0)  # photo pixels per frame pixel
    ch, cw = max(1, int(round(height * zoom))), max(1, int(round(width * zoom)))
    y0 = int(rng.integers(0, img.shape[0] - ch + 1))
    x0 = int(rng.integers(0, img.shape[1] - cw + 1))
    crop = resize(img[y0:y0 + ch, x0:x0 + cw], (height, width), order=1, anti_aliasing=True)
    lo, hi = np.percentile(crop, 1), np.percentile(crop, 99)
    crop = np.clip((crop - lo) / max(hi - lo, 1e-6), 0, 1)
    return BG_LOW + (BG_HIGH - BG_LOW) * crop


def _render(sprite: np.ndarray, y0: float, x0: float, size: int, height: int,
            width: int) -> np.ndarray:
    """The alpha ``(height, width)`` of an 8 x 8 ``sprite`` drawn ``size x size`` with its
    top-left corner at sub-pixel ``(y0, x0)``: bilinear, zero outside the sprite."""
    from scipy.ndimage import map_coordinates
    n = sprite.shape[0]
    # pixel centre i + 0.5 lies at sprite coordinate ((i + 0.5) - y0) * n / size - 0.5
    sy = ((np.arange(height) + 0.5) - y0) * n / size - 0.5
    sx = ((np.arange(width) + 0.5) - x0) * n / size - 0.5
    yy, xx = np.meshgrid(sy, sx, indexing="ij")
    padded = np.pad(sprite, 1)  # zero border: the ink fades to nothing past the sprite's edge
    alpha = map_coordinates(padded, [yy + 1, xx + 1], order=1, mode="constant", cval=0.0)
    return np.clip(alpha, 0.0, 1.0)


def _quantize(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to the 1/255 grid (an 8-bit camera), float32."""
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def make_clip(frames: int = 72, width: int = 96, height: int = 64, digits: int = 2,
              digit_px: int = 20, noise: float = 2.0, speed: tuple[float, float] = (0.5, 1.5),
              seed: int = 0, background: str = "camera", split: str | None = None) -> Clip:
    """A seeded static-camera clip with moving digits (see the module docstring).

    ``background``: a name of :data:`BACKGROUNDS` or ``"random"`` (drawn by the seed);
    ``split``: the digit images' part of the digits split, ``"test"`` or ``"train"`` (default:
    ``"train"`` for seeds >= :data:`TRAIN_SEED_BASE`, else ``"test"``). ``digit_px`` defaults
    to 20 (not 10): two 10-pixel digits cover ~1 % of a 96 x 64 frame, 20 pixels give the >= 3 %
    the default scene must have.

    Raises
    ------
    ShapeError
        A size, count or speed that cannot make a clip (digits larger than the frame, ...).
    """
    if frames < 1 or width < 1 or height < 1 or digits < 0:
        raise ShapeError(f"make_clip: frames={frames}, {width}x{height}, digits={digits} must be "
                         f"positive")
    if not 1 <= digit_px <= min(width, height):
        raise ShapeError(f"digit_px={digit_px} must fit the {width}x{height} frame")
    if not 0 <= speed[0] <= speed[1]:
        raise ShapeError(f"speed={speed} must be (low, high) with 0 <= low <= high")
    if noise < 0:
        raise ShapeError(f"noise={noise} grey levels must be >= 0")
    split = split or ("train" if seed >= TRAIN_SEED_BASE else "test")
    if split not in ("train", "test"):
        raise ShapeError(f"split={split!r}: 'train' or 'test'")
    rng = np.random.default_rng(seed)
    if background == "random":
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg = _background(background, height, width, rng)
    images, classes = _digit_images(split)
    pick = rng.choice(len(images), size=digits, replace=False)
    span = np.array([height - digit_px, width - digit_px], float)
    pos = rng.uniform(0, 1, (digits, 2)) * span
    angle = rng.uniform(0, 2 * np.pi, digits)
    vel = rng.uniform(speed[0], speed[1], digits)[:, None] * np.stack([np.sin(angle),
                                                                        np.cos(angle)], 1)
    positions = np.zeros((frames, digits, 2))
    clean = np.zeros((frames, height, width), np.float32)
    masks = np.zeros((frames, height, width), bool)
    for t in range(frames):
        positions[t] = pos
        alpha = np.zeros((height, width))
        for d in range(digits):
            alpha = np.maximum(alpha, _render(images[pick[d]], pos[d, 0], pos[d, 1], digit_px,
                                              height, width))
        clean[t] = _quantize(bg * (1 - alpha) + INK * alpha)
        masks[t] = alpha >= INK_LEVEL
        # straight lines, bouncing off the borders (reflect the overshoot, flip the velocity)
        pos = pos + vel
        low, high = pos < 0, pos > span
        pos = np.where(low, -pos, np.where(high, 2 * span - pos, pos))
        vel = np.where(low | high, -vel, vel)
    sensor = rng.normal(0.0, noise / 255.0, clean.shape)
    noisy = _quantize(clean + sensor)
    labels = np.broadcast_to(classes[pick], (frames, digits)).astype(np.int64)
    return Clip(noisy, clean, masks, labels, positions, digit_px, background, noise, seed)


def downsample_mask(mask: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """bool ``(..., H, W)`` -> ``(..., H/factor, W/factor)``: a cell is foreground when at least
    half of its ``factor x factor`` pixels are.

    Raises
    ------
    ShapeError
        H or W not a multiple of ``factor``.
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape[-2:]
    if factor < 1 or h % factor or w % factor:
        raise ShapeError(f"a {h}x{w} mask does not split into {factor}x{factor} cells")
    cells = mask.reshape(*mask.shape[:-2], h // factor, factor, w // factor, factor)
    return 2 * cells.sum(axis=(-3, -1)) >= factor * factor


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU over a whole clip: sum(pred & gt) / sum(pred | gt), counted over every
    pixel of every frame (1.0 when both are empty).

    Raises
    ------
    ShapeError
        ``pred`` and ``gt`` of different shapes.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ShapeError(f"prediction {pred.shape} and ground truth {gt.shape} differ")
    union = int((pred | gt).sum())
    return 1.0 if union == 0 else int((pred & gt).sum()) / union


def miou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean of the background and the foreground IoU (each as in :func:`iou`)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return (iou(pred, gt) + iou(~pred, ~gt)) / 2


# -- training data ------------------------------------------------------------------------------

def _training_clip(seed: int, frames: int, height: int, width: int) -> Clip:
    """A random training clip: background, digit count and size, noise and speed drawn from
    ``seed`` (>= TRAIN_SEED_BASE: train digits)."""
    rng = np.random.default_rng([seed, 7])
    px = int(rng.integers(max(6, min(height, width) // 6), max(7, min(height, width) // 2)))
    return make_clip(frames=frames, width=width, height=height,
                     digits=int(rng.integers(1, 5)), digit_px=min(px, height, width),
                     noise=float(rng.uniform(0.5, 4.0)),
                     speed=(0.3, float(rng.uniform(0.6, 3.0))), seed=seed,
                     background="random", split="train")


def training_set(clips: int = 160, frames_per_clip: int = 8, height: int = 64, width: int = 96,
                 seed: int = TRAIN_SEED_BASE,
                 factor: int = FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Training frames and targets from ``clips`` random clips (seeds ``seed``,
    ``seed + 1``, ...; each must be >= :data:`TRAIN_SEED_BASE`): ``x`` float32
    ``(clips * frames_per_clip, H, W)`` and ``y`` bool ``(N, H/factor, W/factor)``.

    Every clip draws its background photo, crop, digit count (1..4), digit size, noise
    (0.5..4 grey levels) and speed; ``frames_per_clip`` frames are spread over a 4x longer clip.
    """
    if seed < TRAIN_SEED_BASE:
        raise ShapeError(f"training seeds start at {TRAIN_SEED_BASE} (below are test scenes), "
                         f"not {seed}")
    xs, ys = [], []
    for i in range(clips):
        clip = _training_clip(seed + i, 4 * frames_per_clip, height, width)
        keep = slice(0, None, 4)
        xs.append(clip.frames[keep])
        ys.append(downsample_mask(clip.masks[keep], factor))
    return np.concatenate(xs), np.concatenate(ys)


def training_frames(n: int, height: int = 64, width: int = 96,
                    seed: int = TRAIN_SEED_BASE + 900_000) -> np.ndarray:
    """``n`` float32 frames ``(n, H, W)`` of random training scenes (never a test scene): a PTQ
    calibration batch at any frame size."""
    if n < 1:
        raise ShapeError(f"training_frames: n={n} must be >= 1")
    per = 4
    clips = -(-n // per)
    out = [_training_clip(seed + i, 2 * per, height, width).frames[::2] for i in range(clips)]
    return np.concatenate(out)[:n]


# -- video files --------------------------------------------------------------------------------

def _gray(frame: np.ndarray, where: str) -> np.ndarray:
    """One decoded frame -> float64 ``(H, W)`` grayscale in [0, 1]."""
    f = np.asarray(frame)
    if f.dtype == np.uint8:
        f = f / 255.0
    elif f.dtype == np.uint16:
        f = f / 65535.0
    elif f.dtype == bool:
        f = f.astype(np.float64)
    elif np.issubdtype(f.dtype, np.floating):
        f = np.clip(f.astype(np.float64), 0, 1)
    else:
        raise DTypeError(f"{where}: pixels of dtype {f.dtype} (uint8, uint16, bool or float)")
    if f.ndim == 3 and f.shape[-1] in (3, 4):
        f = f[..., :3] @ np.array([0.2125, 0.7154, 0.0721])  # ITU-R 709 luma, as skimage
    elif f.ndim == 3 and f.shape[-1] in (1, 2):
        f = f[..., 0]
    if f.ndim != 2:
        raise ShapeError(f"{where}: a frame of shape {np.asarray(frame).shape} is not an image "
                         f"(H, W) or (H, W, 1|3|4)")
    return f


#: File suffixes read with PyAV (video containers); everything else is read with Pillow first.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv",
                  ".flv", ".wmv", ".ts")


def _frames_of(path: Path):
    """Yield the decoded frames of a file, or of the image files in a folder (sorted by name).

    The plugin is chosen by the suffix (PyAV for video containers, Pillow for images), the other
    tried second: imageio's fallback would probe its deprecated legacy plugins, which warn and
    leave files open."""
    import imageio.v3 as iio
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise VideoFileError(f"{path}: an empty folder, no frames")
    for f in files:
        plugins = ("pyav", "pillow") if f.suffix.lower() in VIDEO_SUFFIXES else ("pillow", "pyav")
        failures = []
        for plugin in plugins:
            try:
                with iio.imopen(f, "r", plugin=plugin) as reader:
                    # a reader that opens the file but decodes no frame is a failure too
                    got = False
                    for frame in reader.iter():
                        got = True
                        yield f, frame
                    if got:
                        break
                    failures.append(f"{plugin}: no frames")
            except TinyAccelError:
                raise
            except Exception as exc:  # noqa: BLE001 - every decoder failure means "unreadable"
                failures.append(f"{plugin}: {type(exc).__name__}: {exc}".split("\n")[0])
        else:
            raise VideoFileError(f"{f}: no reader understands it ({'; '.join(failures)})")


def load_video(path: str | os.PathLike, size: tuple[int, int] | None = None,
               frames: int | None = None) -> np.ndarray:
    """A video as float32 ``(T, H, W)`` grayscale in [0, 1] on the 1/255 grid.

    ``path``: a file imageio reads (GIF, PNG/TIFF stacks, and MP4/AVI/MKV... through PyAV), or a
    folder of image files taken as frames in name order. ``size = (height, width)`` resizes every
    frame (bilinear, anti-aliased when shrinking); ``frames`` keeps the first ``frames``.
    Colour frames become luma (ITU-R 709).

    Raises
    ------
    VideoFileError
        The file is missing or no reader understands it.
    ShapeError
        Frames change size within the video, a frame is not an image, ``size``/``frames`` are
        not positive, or the video has no frame.
    DTypeError
        Pixels of a dtype that is not an image's.
    """
    path = Path(path)
    if not path.exists():
        raise VideoFileError(f"{path}: no such file or folder")
    if frames is not None and frames < 1:
        raise ShapeError(f"frames={frames} must be >= 1")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ShapeError(f"size={size} must be (height, width), both >= 1")
    out, first = [], None
    for t, (f, frame) in enumerate(_frames_of(path)):
        if frames is not None and t >= frames:
            break
        g = _gray(frame, f"{f} frame {t}")
        if first is None:
            first = g.shape
        elif g.shape != first:
            raise ShapeError(f"{f}: frame {t} is {g.shape[1]}x{g.shape[0]} (WxH), the video "
                             f"started at {first[1]}x{first[0]}: frames must not change size")
        if size is not None and tuple(size) != g.shape:
            from skimage.transform import resize
            g = resize(g, tuple(size), order=1, anti_aliasing=g.size > size[0] * size[1])
        out.append(_quantize(g))
    if not out:
        raise ShapeError(f"{path}: no frames")
    return np.stack(out)


def sample_gif(size: tuple[int, int] | None = (112, 64)) -> np.ndarray:
    """scikit-image's real 24-frame GIF (``skimage/data/no_time_for_that_tiny.gif``, 14 x 25
    pixels, RGB) as float32 ``(24, H, W)`` grayscale; resized to ``size = (height, width)``
    (default 112 x 64: the aspect kept, both sides multiples of 16 so the model's every layer
    splits into whole patches; ``None``: the native 25 x 14). No ground truth."""
    import skimage
    return load_video(Path(skimage.__file__).parent / GIF_PATH, size=size)
