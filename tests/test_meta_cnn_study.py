"""Study 1 helpers: the meta-train / held-out split keeps every noisy sample paired with its own clean twin."""

import numpy as np

from jaxeif.data.noisy_digits import FinetuneSet
from jaxeif.experiments.meta_cnn_noise import pairs, split_set


def fake_set(per_digit=3, levels=(0.0, 0.5, 1.0)):
    """A finetune_set-shaped set whose pixels encode (level, digit, rank) so pairings can be read back."""
    n = 10 * per_digit
    clean_id = np.arange(n)
    images = np.concatenate(
        [np.full((n, 28, 28, 1), 0.0) + clean_id[:, None, None, None] + 1000 * k for k in range(len(levels))]
    ).astype(np.float32)
    return FinetuneSet(
        images,
        np.tile(np.repeat(np.arange(10), per_digit), len(levels)).astype(np.int32),
        np.repeat(np.asarray(levels, np.float32), n),
        np.tile(clean_id, len(levels)).astype(np.int32),
    )


def test_split_is_disjoint_and_pairs_twins():
    fs = fake_set()
    train, held = split_set(fs, 3, 0, 2), split_set(fs, 3, 2, 1)
    ids = lambda s: set((s.images[:, 0, 0, 0] % 1000).astype(int).tolist())
    assert ids(train).isdisjoint(ids(held)) and len(ids(train)) == 20 and len(ids(held)) == 10
    for s, k in ((train, 20), (held, 10)):
        assert len(s.labels) == 3 * k and np.all(s.noise_std[:k] == 0)
        twins, noisy = pairs(s)
        np.testing.assert_array_equal(s.images[twins, 0, 0, 0] % 1000, s.images[noisy, 0, 0, 0] % 1000)
        np.testing.assert_array_equal(s.labels[twins], s.labels[noisy])
        assert np.all(s.noise_std[twins] == 0) and np.all(s.noise_std[noisy] > 0)
