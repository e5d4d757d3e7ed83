"""The model registry: name -> builder, FP32 trainer, cached weights.

::

    from tinyaccel.models import zoo
    model, metrics = zoo.load_or_train("digits-cnn")       # trains once, then loads the cache
    model = zoo.MODELS["mobilenet-block"].build(seed=0)    # untrained

The MLPerf Tiny reference models (:mod:`tinyaccel.models.mlperf_tiny`: ``ic-resnet8``,
``kws-dscnn``, ``vww-mobilenet``, ``ad-autoencoder``) are registered with ``weights="random"``:
their datasets cannot be downloaded here, so "training" them gives seeded random weights with
BatchNorm calibrated on seeded random inputs, and no accuracy is claimed.
:data:`DIGITS_MODELS` names the models trained on the digits split. ``pass-segnet``
(:mod:`tinyaccel.models.pass_net`, ``weights="video"``) segments the moving digits of the offline
video clips (:mod:`tinyaccel.models.video`) and brings its own trainer (``ModelSpec.trainer``).

Weights live in a cache directory, produced by a command and never committed::

    tinyaccel zoo train digits-cnn mobilenet-block   # or: tinyaccel zoo train --all
    tinyaccel zoo                                    # list the zoo

The cache is ``$TINYACCEL_CACHE/models`` (default ``~/.cache/tinyaccel/models``); each file is an
``.npz`` (no pickles) holding the state dict and a JSON metadata record (model name, seed, epochs,
metrics, torch version, and a *recipe* hash of the source of the model's module and of the
training loop). The file name carries the seed and epoch count; a file whose recipe differs from the
current code (or whose tensors no longer fit the model) is retrained rather than loaded, so a cache
can never hand out weights that the current code would not train. Concurrent processes (pytest
workers) wait on a lock file while one of them trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyaccel.errors import ShapeError, TinyAccelError

from . import clutter, data, digits, mlperf_tiny, mobilenet_block, pass_net, video

__all__ = ["ModelSpec", "MODELS", "DIGITS_MODELS", "get", "build", "train_fp32", "recipe",
           "cache_dir", "cache_path", "save", "load", "load_or_train", "ensure_trained"]

_META_KEY = "__meta__"


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the zoo: the network, how to train it, and what it is."""

    name: str
    module_class: type[nn.Module]  #: the network; constructed without arguments
    default_epochs: int
    input_shape: tuple[int, ...]  #: per sample: C x H x W, or (features,)
    description: str
    lr: float = 1e-2
    #: ``"digits"``: trained on the digits split; ``"random"``: no dataset here, seeded random
    #: weights with BatchNorm calibrated on seeded random inputs (no accuracy is claimed);
    #: ``"video"``: trained on the offline video clips by its ``trainer``; ``"clutter"``: on the
    #: clutter digits (:mod:`tinyaccel.models.clutter`) by its ``trainer``
    weights: str = "digits"
    #: the model's own training loop, ``trainer(model, epochs, seed) -> metrics`` (None: the
    #: digits classifier loop); its module is part of the :func:`recipe`
    trainer: Callable[[nn.Module, int, int], dict] | None = None
    #: further modules whose source the weights depend on (the trainer's data), for the recipe
    recipe_modules: tuple = ()

    def build(self, seed: int = 0) -> nn.Module:
        """A freshly initialized model, its weights drawn from ``seed``."""
        torch.manual_seed(seed)
        return self.module_class()

    def train_fp32(self, epochs: int | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
        """Train in FP32 on the fixed digits split -> ``(model, metrics)``; deterministic.

        For ``weights="random"`` there is nothing to train: the seeded random model with its
        BatchNorm statistics calibrated (:func:`tinyaccel.models.mlperf_tiny.seeded_random`).
        """
        if self.weights == "random":
            start = time.perf_counter()
            model = mlperf_tiny.seeded_random(self.build(seed), self.input_shape, seed)
            return model, {"weights": "seeded random, BatchNorm calibrated on seeded random "
                                      "inputs; no accuracy", "epochs": 0, "seed": seed,
                           "bn_calibration_samples": mlperf_tiny.BN_CALIBRATION_SAMPLES,
                           "seconds": time.perf_counter() - start}
        model = self.build(seed)
        epochs = self.default_epochs if epochs is None else epochs
        if self.trainer is not None:
            return model, self.trainer(model, epochs, seed)
        metrics = data.fit_classifier(model, data.load_digits_split(), epochs=epochs, seed=seed,
                                      lr=self.lr)
        return model, metrics

    def load_or_train(self, seed: int = 0, epochs: int | None = None,
                      directory: str | Path | None = None) -> tuple[nn.Module, dict]:
        """Cached weights of this model, training them first if needed (see
        :func:`load_or_train`)."""
        return load_or_train(self.name, seed, epochs, directory)


MODELS: dict[str, ModelSpec] = {
    digits.NAME: ModelSpec(digits.NAME, digits.DigitsCNN, digits.DEFAULT_EPOCHS, (1, 8, 8),
                           "3 conv + ReLU, flatten, linear (digits 8x8)"),
    mobilenet_block.NAME: ModelSpec(
        mobilenet_block.NAME, mobilenet_block.MobileNetBlockNet, mobilenet_block.DEFAULT_EPOCHS,
        (1, 8, 8),
        "stem, inverted residual (depthwise, ReLU6, add), avgpool, separable conv, GAP, linear"),
    "ic-resnet8": ModelSpec(
        "ic-resnet8", mlperf_tiny.ResNet8, 0, (3, 32, 32),
        "MLPerf Tiny image classification ResNet-8 (CIFAR-10 shape; random weights)",
        weights="random"),
    "kws-dscnn": ModelSpec(
        "kws-dscnn", mlperf_tiny.DSCNN, 0, (1, 49, 10),
        "MLPerf Tiny keyword spotting DS-CNN (49x10 MFCC; random weights)", weights="random"),
    "vww-mobilenet": ModelSpec(
        "vww-mobilenet", mlperf_tiny.MobileNetV1, 0, (3, 96, 96),
        "MLPerf Tiny visual wake words MobileNetV1 0.25 (96x96; random weights)",
        weights="random"),
    "ad-autoencoder": ModelSpec(
        "ad-autoencoder", mlperf_tiny.FCAutoencoder, 0, (640,),
        "MLPerf Tiny anomaly detection FC autoencoder (640 features; random weights)",
        weights="random"),
    pass_net.NAME: ModelSpec(
        pass_net.NAME, pass_net.PassSegNet, pass_net.DEFAULT_EPOCHS, pass_net.INPUT_SHAPE,
        "PASS perception: 3 conv (the first stride-2) + 1x1 head, digit segmentation at 1/2 "
        "resolution (video frames 96x64)", weights="video", trainer=pass_net.train,
        recipe_modules=(pass_net, video)),
    clutter.NAME: ModelSpec(
        clutter.NAME, clutter.ClutterCNN, clutter.DEFAULT_EPOCHS, (1, clutter.SIZE, clutter.SIZE),
        "3 conv + linear on clutter digits (16x16 digits on photos, noise, occlusion)",
        weights="clutter", trainer=clutter.train, recipe_modules=(clutter, video)),
}

#: The models trained on the digits split (the others have seeded random weights).
DIGITS_MODELS = tuple(name for name, spec in MODELS.items() if spec.weights == "digits")


def get(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise TinyAccelError(f"unknown model {name!r}; the zoo has: "
                             f"{', '.join(sorted(MODELS))}") from None


def build(name: str, seed: int = 0) -> nn.Module:
    """An untrained model ``name``, initialized from ``seed``."""
    return get(name).build(seed)


def train_fp32(name: str, epochs: int | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
    """Train model ``name`` in FP32 (``epochs`` defaults to the model's) -> ``(model, metrics)``."""
    spec = get(name)
    return spec.train_fp32(spec.default_epochs if epochs is None else epochs, seed)


def recipe(name: str) -> str:
    """A hash of the code that trains model ``name`` (its module, the data split and the loop,
    its trainer's module and its ``recipe_modules``)."""
    spec = get(name)
    module = inspect.getmodule(spec.module_class)
    digest = hashlib.sha256()
    extra = tuple(m for m in spec.recipe_modules if m is not module)
    if spec.trainer is not None:
        trainer_module = inspect.getmodule(spec.trainer)
        extra += (trainer_module,) if trainer_module not in (module, *extra) else ()
    for source in (module, data, *extra):
        digest.update(inspect.getsource(source).encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """The weight cache: ``$TINYACCEL_CACHE/models``, default ~/.cache/tinyaccel/models."""
    root = os.environ.get("TINYACCEL_CACHE") or Path.home() / ".cache" / "tinyaccel"
    return Path(root) / "models"


def cache_path(name: str, seed: int = 0, epochs: int | None = None,
               directory: str | Path | None = None) -> Path:
    """The cache file of model ``name`` trained ``epochs`` epochs from ``seed``."""
    spec = get(name)
    epochs = spec.default_epochs if epochs is None else epochs
    return Path(directory or cache_dir()) / f"{name}-seed{seed}-e{epochs}.npz"


def save(name: str, model: nn.Module, metrics: dict, path: str | Path) -> Path:
    """Write ``model``'s state dict and ``metrics`` to ``path`` as an .npz (atomically)."""
    get(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
    if _META_KEY in arrays:
        raise ShapeError(f"model {name!r} has a state-dict entry named {_META_KEY!r}")
    meta = {"model": name, "metrics": metrics, "torch": torch.__version__, "recipe": recipe(name)}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load(name: str, path: str | Path, same_recipe: bool = False) -> tuple[nn.Module, dict]:
    """Load a model saved by :func:`save` -> ``(model, metrics)`` (model in eval mode).

    Raises :class:`~tinyaccel.errors.ShapeError` when the file's tensors do not fit the model,
    or (with ``same_recipe``) when it was trained by code other than the current :func:`recipe`.
    """
    model = build(name)
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(f[_META_KEY].tobytes().decode())
        state = {key: torch.from_numpy(f[key].copy()) for key in f.files if key != _META_KEY}
    if meta.get("model") != name:
        raise ShapeError(f"{path} holds model {meta.get('model')!r}, not {name!r}")
    if same_recipe and meta.get("recipe") != recipe(name):
        raise ShapeError(f"{path} was trained by recipe {meta.get('recipe')}, the current code "
                         f"is recipe {recipe(name)}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))
        raise ShapeError(f"{path} does not fit model {name!r}: differing tensors {diff[:4]}")
    model.load_state_dict(state)
    model.eval()
    return model, meta["metrics"]


def load_or_train(name: str, seed: int = 0, epochs: int | None = None,
                  directory: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Load model ``name`` from the cache, or train it (deterministically) and cache it.

    A cache entry written by another recipe (older code) is retrained and overwritten.
    """
    path = cache_path(name, seed, epochs, directory)
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            try:
                return load(name, path, same_recipe=True)
            except (ShapeError, KeyError, ValueError, OSError):
                pass  # stale or damaged cache entry: retrain and overwrite it
        model, metrics = train_fp32(name, epochs, seed)
        save(name, model, metrics, path)
        return model, metrics


def ensure_trained(name: str, seed: int = 0, epochs: int | None = None,
                   directory: str | Path | None = None,
                   force: bool = False) -> tuple[Path, dict]:
    """Make sure the cache holds model ``name`` (``force``: train it again) -> ``(path, metrics)``.

    What ``tinyaccel zoo train`` does for each model it is given.
    """
    path = cache_path(name, seed, epochs, directory)
    if force:
        path.unlink(missing_ok=True)
    _, metrics = load_or_train(name, seed, epochs, directory)
    return path, metrics


@contextlib.contextmanager
def _locked(lock: Path):
    """Hold an exclusive lock on ``lock`` (POSIX); elsewhere, no locking."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
