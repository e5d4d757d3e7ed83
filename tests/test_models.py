"""The digits split, the zoo models, seeded training and the weight cache."""

import numpy as np
import pytest
import torch
from torch import fx, nn

from tinyaccel.errors import ShapeError, TinyAccelError
from tinyaccel.models import data, mlperf_tiny, zoo


@pytest.fixture(scope="module")
def trained(pytestconfig, tmp_path_factory):
    """Both zoo models trained with their default epochs from seed 0 (a few seconds each).

    Cached in pytest's cache directory under the current training recipe (shared with
    test_quant.py, whose worker waits on the lock instead of training again).
    """
    cache = getattr(pytestconfig, "cache", None)
    directory = cache.mkdir("tinyaccel-models") if cache else tmp_path_factory.mktemp("models")
    return {name: zoo.load_or_train(name, seed=0, directory=directory)
            for name in zoo.DIGITS_MODELS}


def test_split_is_fixed_stratified_and_scaled():
    split = data.load_digits_split()
    assert split.x_train.shape == (1437, 1, 8, 8) and split.x_test.shape == (360, 1, 8, 8)
    assert split.x_train.dtype == torch.float32 and split.y_test.dtype == torch.int64
    x = torch.cat([split.x_train, split.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # stratified: every class holds 20 % +- 1 image of its samples in the test split
    counts_test = np.bincount(split.y_test.numpy(), minlength=10)
    counts_all = counts_test + np.bincount(split.y_train.numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)
    again = data.load_digits_split.__wrapped__()
    assert torch.equal(again.x_test, split.x_test) and torch.equal(again.y_train, split.y_train)
    other = data.load_digits_split.__wrapped__(seed=1)
    assert not torch.equal(other.y_test, split.y_test)


def test_loader_order_is_seeded():
    split = data.load_digits_split()

    def first(seed):
        return next(iter(data.make_loader(split.x_train, split.y_train, 32, True, seed)))[1]

    assert torch.equal(first(3), first(3))
    assert not torch.equal(first(3), first(4))
    with pytest.raises(ShapeError, match="1437 samples but y has 10"):
        data.make_loader(split.x_train, split.y_train[:10])


def test_calibration_batch_comes_from_training_images():
    split = data.load_digits_split()
    cal = data.calibration_batch(64, seed=5)
    flat_train = split.x_train.reshape(len(split.x_train), -1)
    for img in cal.reshape(64, -1)[:8]:
        assert bool((flat_train == img).all(1).any())
    assert torch.equal(cal, data.calibration_batch(64, seed=5))
    with pytest.raises(ShapeError, match="n=5000"):
        data.calibration_batch(5000)


@pytest.mark.parametrize("name", list(zoo.DIGITS_MODELS))
def test_models_reach_95_percent(trained, name):
    model, metrics = trained[name]
    split = data.load_digits_split()
    assert metrics["test_acc"] == data.accuracy(model, split.x_test, split.y_test)
    print(f"\n{name}: FP32 test accuracy {metrics['test_acc']:.4f} "
          f"({metrics['epochs']} epochs, {metrics['seconds']:.1f} s)")
    assert metrics["test_acc"] >= 0.95


@pytest.mark.parametrize("name", list(zoo.DIGITS_MODELS))
def test_training_is_replayable(name):
    a, ma = zoo.train_fp32(name, epochs=1, seed=7)
    b, mb = zoo.train_fp32(name, epochs=1, seed=7)
    c, _ = zoo.train_fp32(name, epochs=1, seed=8)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
    assert ma["final_loss"] == mb["final_loss"]
    assert any(not torch.equal(va, vc) for va, vc in
               zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_digits_cnn_shape():
    model = zoo.build("digits-cnn")
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) < 30_000


def test_mobilenet_block_exercises_every_layer_kind():
    model = zoo.build("mobilenet-block")
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    mods = list(model.modules())
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mods)
    assert any(isinstance(m, nn.ReLU6) for m in mods)
    assert any(isinstance(m, nn.AvgPool2d) for m in mods)
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in mods)
    graph = fx.symbolic_trace(model).graph
    assert any(n.op == "call_function" and "add" in str(n.target) for n in graph.nodes)


def test_zoo_save_load_round_trip(trained, tmp_path):
    for name, (model, metrics) in trained.items():
        path = zoo.save(name, model, metrics, tmp_path / f"{name}.npz")
        loaded, loaded_metrics = zoo.load(name, path)
        assert loaded_metrics == metrics
        x = data.load_digits_split().x_test[:16]
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ShapeError, match="holds model 'digits-cnn', not 'mobilenet-block'"):
        zoo.load("mobilenet-block", tmp_path / "digits-cnn.npz")


def test_load_or_train_uses_the_cache_of_the_same_recipe(trained, tmp_path, monkeypatch):
    model, metrics = trained["digits-cnn"]
    path = zoo.save("digits-cnn", model, metrics,
                    zoo.cache_path("digits-cnn", directory=tmp_path))
    calls = []

    def fake_training(self, epochs=None, seed=0):
        calls.append((epochs, seed))
        return model, {**metrics, "retrained": True}

    monkeypatch.setattr(zoo.ModelSpec, "train_fp32", fake_training)
    loaded, loaded_metrics = zoo.load_or_train("digits-cnn", directory=tmp_path)
    assert calls == [] and loaded_metrics == metrics
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    # the same file written by other training code is retrained, not loaded
    monkeypatch.setattr(zoo, "recipe", lambda name: "0123456789abcdef")
    with pytest.raises(ShapeError, match="trained by recipe .* current code is recipe 0123"):
        zoo.load("digits-cnn", path, same_recipe=True)
    _, loaded_metrics = zoo.load_or_train("digits-cnn", directory=tmp_path)
    assert calls == [(zoo.get("digits-cnn").default_epochs, 0)] and loaded_metrics["retrained"]


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYACCEL_CACHE", str(tmp_path))
    assert zoo.cache_path("mobilenet-block", seed=3, epochs=5) == (
        tmp_path / "models" / "mobilenet-block-seed3-e5.npz")


def test_unknown_model_is_named():
    with pytest.raises(TinyAccelError, match="'resnet50'.*digits-cnn"):
        zoo.build("resnet50")


@pytest.mark.parametrize("name", [n for n, s in zoo.MODELS.items() if s.weights == "random"])
def test_random_weight_models_are_seeded_and_batchnorm_calibrated(name):
    """The MLPerf Tiny entries: no training; seeded weights, BatchNorm statistics equal to the
    batch statistics of the seeded calibration inputs (measured here with hooks)."""
    spec = zoo.get(name)
    assert spec.weights == "random" and name not in zoo.DIGITS_MODELS
    a, meta = spec.train_fp32(seed=3)
    b, _ = spec.train_fp32(seed=3)
    c, _ = spec.train_fp32(seed=4)
    assert meta["epochs"] == 0 and "no accuracy" in meta["weights"]
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
    assert any(not torch.equal(va, vc) for va, vc in
               zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    # calibrated: in eval mode each BatchNorm normalizes the calibration batch exactly, i.e. its
    # outputs have per-channel mean beta and (biased) variance gamma^2 v / (v + eps), v its
    # running_var
    x = mlperf_tiny.random_inputs(spec.input_shape, meta["bn_calibration_samples"], seed=4)
    bns = [m for m in a.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.setdefault(m, o)) for m in bns]
    with torch.no_grad():
        a.eval()(x)
    for h in hooks:
        h.remove()
    assert len(outputs) == len(bns) > 0
    for bn in bns:
        out = outputs[bn]
        dims = [0] if out.ndim == 2 else [0, 2, 3]
        v = bn.running_var
        torch.testing.assert_close(out.mean(dims), bn.bias, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.var(dims, unbiased=False),
                                   bn.weight ** 2 * v / (v + bn.eps), rtol=1e-3, atol=1e-6)
        assert int(bn.num_batches_tracked) == 1
    assert not a.training
    assert a(torch.zeros(2, *spec.input_shape)).shape[0] == 2
