"""The CNN model, its orbax cache, the noise helper and the figure-1 fine-tune set (real MNIST)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeif
from jaxeif.data import images, noisy_digits
from jaxeif.models import cnn


@pytest.fixture(scope="module")
def params():
    return cnn.init_params(jax.random.key(0))


def test_architecture_matches_contract(params):
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == {
        "Conv_0": {"kernel": (3, 3, 1, 16), "bias": (16,)},
        "Conv_1": {"kernel": (3, 3, 16, 32), "bias": (32,)},
        "Dense_0": {"kernel": (7 * 7 * 32, 64), "bias": (64,)},
        "Dense_1": {"kernel": (64, 10), "bias": (10,)},
    }
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    assert cnn.apply_fn(params, x).shape == (3, 10)


@pytest.mark.parametrize("channels", [1, 3])
def test_shifted_conv_equals_flax_conv_in_params_and_output(channels):
    """ShiftedConv3x3 (the CNN's first layer) = nn.Conv 3x3 SAME: same init under the same name, same
    output and gradients; and the CNN equals the same network built from nn.Conv."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(3), (2, 9, 7, channels))
    ours, ref = cnn.ShiftedConv3x3(5), nn.Conv(5, (3, 3), padding="SAME")
    p = ours.init(jax.random.key(4), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), p, ref.init(jax.random.key(4), x)))
    p = jax.tree.map(lambda a: a + 0.1, p)  # nonzero bias
    np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=1e-5)
    g = lambda m: jax.grad(lambda q: jnp.sum(jnp.sin(m.apply(q, x))))(p)  # noqa: E731
    chex.assert_trees_all_close(g(ours), g(ref), atol=1e-5, rtol=1e-7)

    class FlaxConvCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x)), (2, 2), strides=(2, 2))
            x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x)), (2, 2), strides=(2, 2))
            x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    images_ = jax.random.uniform(jax.random.key(5), (3, 28, 28, 1))
    params_ = FlaxConvCNN().init(jax.random.key(0), images_)["params"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params_, cnn.init_params(jax.random.key(0))))
    np.testing.assert_allclose(
        cnn.apply_fn(params_, images_), FlaxConvCNN().apply({"params": params_}, images_), atol=1e-5
    )


def test_loss_fn_is_per_example_cross_entropy(params):
    x = np.asarray(jax.random.uniform(jax.random.key(2), (4, 28, 28, 1)))
    y = np.array([0, 3, 9, 3], np.int32)
    logits = np.asarray(cnn.apply_fn(params, x), np.float64)
    z = logits - logits.max(1, keepdims=True)
    expected = np.log(np.exp(z).sum(1)) - z[np.arange(4), y]
    got = [float(cnn.loss_fn(params, (x[i], y[i]))) for i in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jaxeif.losses(cnn.loss_fn, params, (x, y))), expected, rtol=1e-5)
    assert float(cnn.batch_loss(params, x, y)) == pytest.approx(expected.mean(), rel=1e-5)


def test_accuracy_matches_argmax_in_any_batch_size(params):
    x = np.asarray(jax.random.uniform(jax.random.key(3), (11, 28, 28, 1)))
    pred = np.argmax(np.asarray(cnn.apply_fn(params, x)), 1)
    labels = np.where(np.arange(11) % 3 == 0, pred, (pred + 1) % 10).astype(np.int32)  # 4 of 11 right
    assert cnn.accuracy(params, x, labels, batch_size=4) == pytest.approx(4 / 11)
    with pytest.raises(ValueError, match="differ in length"):
        cnn.accuracy(params, x, labels[:3])


@pytest.mark.slow  # trains the CNN
def test_load_or_train_saves_restores_and_refuses_other_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    trained = cnn.load_or_train(ckpt, epochs=1, batch_size=64, train_size=640, progress=False)
    info = cnn.checkpoint_info(ckpt)
    assert info["config"]["train_size"] == 640 and info["n_train"] == 640
    assert 0.3 < info["test_accuracy"] <= 1.0  # 10 Adam steps beat chance (0.1) on the real test split
    restored = cnn.load_or_train(ckpt, epochs=1, batch_size=64, train_size=640, progress=False)
    chex.assert_trees_all_equal(trained, restored)
    fresh = cnn.init_params(jax.random.key(0))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(restored)))
    with pytest.raises(ValueError, match="trained with"):
        cnn.load_or_train(ckpt, epochs=2, batch_size=64, train_size=640, progress=False)


def test_add_gaussian_noise_statistics_and_seeding():
    base = jnp.full((200, 28, 28, 1), 0.5)
    noisy = np.asarray(noisy_digits.add_gaussian_noise(base, 0.5, jax.random.key(0)))
    diff = noisy - 0.5
    assert abs(diff.mean()) < 0.01 and diff.std() == pytest.approx(0.5, rel=0.01)
    assert noisy.min() < 0 and noisy.max() > 1  # no clipping
    again = np.asarray(noisy_digits.add_gaussian_noise(base, 0.5, jax.random.key(0)))
    np.testing.assert_array_equal(noisy, again)
    other = np.asarray(noisy_digits.add_gaussian_noise(base, 0.5, jax.random.key(1)))
    assert not np.array_equal(noisy, other)
    with pytest.raises(ValueError, match="std"):
        noisy_digits.add_gaussian_noise(base, -1.0, jax.random.key(0))


def test_finetune_set_is_mnist_test_sorted_noise_level_major():
    fs = noisy_digits.finetune_set(per_digit=5, noise_stds=(0.5, 1.0), seed=0)
    assert fs.images.shape == (150, 28, 28, 1) and fs.images.dtype == np.float32
    np.testing.assert_array_equal(fs.labels, np.tile(np.repeat(np.arange(10), 5), 3))
    np.testing.assert_array_equal(fs.noise_std, np.repeat([0.0, 0.5, 1.0], 50).astype(np.float32))
    np.testing.assert_array_equal(fs.source, np.tile(np.arange(50), 3))
    x, y = images.load("mnist", "test")
    for d in range(10):  # the first five test images of each digit, in test-set order
        np.testing.assert_array_equal(fs.images[5 * d : 5 * d + 5], x[np.flatnonzero(y == d)[:5]])
    n1 = fs.images[50:100] - fs.images[:50]
    n2 = fs.images[100:] - fs.images[:50]
    assert n1.std() == pytest.approx(0.5, rel=0.02) and n2.std() == pytest.approx(1.0, rel=0.02)
    assert abs(np.corrcoef(n1.ravel(), n2.ravel())[0, 1]) < 0.02  # independent draws per level
    again = noisy_digits.finetune_set(per_digit=5, noise_stds=(0.5, 1.0), seed=0)
    np.testing.assert_array_equal(fs.images, again.images)


def test_load_head_is_the_first_n_of_load():
    x, y = images.load("mnist", "test")
    hx, hy = images.load_head("mnist", "test", 37)
    np.testing.assert_array_equal(hx, x[:37])
    np.testing.assert_array_equal(hy, y[:37])
    with pytest.raises(ValueError, match="fewer"):
        images.load_head("mnist", "test", 10**6)
