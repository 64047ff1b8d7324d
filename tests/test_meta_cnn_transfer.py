"""The unseen corruptions of the transfer study (salt-and-pepper, blur) and a tiny end-to-end
`jaxeif meta-cnn-transfer --quick` whose saved numbers agree with each other and with study 1."""

import json

import jax
import numpy as np
import pytest

from jaxeif import cli, meta
from jaxeif.data import noisy_digits as data


def total_variation(x):
    x = np.asarray(x, np.float64)
    return np.abs(np.diff(x, axis=1)).sum() + np.abs(np.diff(x, axis=2)).sum()


# ----------------------------------------------------------------------------- salt-and-pepper


def test_salt_and_pepper_hits_about_p_of_the_pixels_with_zeros_and_ones():
    x = np.full((20, 28, 28, 1), 0.5, np.float32)
    for p in (0.05, 0.3):
        out = np.asarray(data.add_salt_and_pepper(x, p, jax.random.key(1)))
        hit = out != 0.5
        assert abs(hit.mean() - p) < 0.015, (p, hit.mean())
        assert set(np.unique(out[hit]).tolist()) == {0.0, 1.0}
        assert 0.4 < (out[hit] == 1).mean() < 0.6  # salt and pepper equally likely
        assert out.dtype == np.float32 and out.shape == x.shape
    a = np.asarray(data.add_salt_and_pepper(x, 0.3, jax.random.key(1)))
    b = np.asarray(data.add_salt_and_pepper(x, 0.3, jax.random.key(2)))
    assert np.array_equal(a, np.asarray(data.add_salt_and_pepper(x, 0.3, jax.random.key(1)))) and not np.array_equal(
        a, b
    )
    np.testing.assert_array_equal(np.asarray(data.add_salt_and_pepper(x, 0.0, jax.random.key(0))), x)
    assert set(np.unique(np.asarray(data.add_salt_and_pepper(x, 1.0, jax.random.key(0)))).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_salt_and_pepper_refuses_bad_fractions(p):
    with pytest.raises(ValueError, match=r"salt-and-pepper fraction `p` must be a number in \[0, 1\]"):
        data.add_salt_and_pepper(np.zeros((1, 4, 4, 1), np.float32), p, jax.random.key(0))


def test_corruptions_refuse_integer_or_unbatched_images():
    with pytest.raises(TypeError, match="floating point"):
        data.add_salt_and_pepper(np.zeros((1, 4, 4, 1), np.uint8), 0.1, jax.random.key(0))
    with pytest.raises(TypeError, match="floating point"):
        data.gaussian_blur(np.zeros((1, 8, 8, 1), np.int32), 1.0)
    with pytest.raises(ValueError, match=r"f\[n, h, w, c\]"):
        data.gaussian_blur(np.zeros((8, 8, 1), np.float32), 1.0)


# ----------------------------------------------------------------------------- blur


def test_blur_keeps_the_mean_and_lowers_total_variation():
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 2))
    x = x.at[0, :, :14].set(0.0)  # a sharp edge and an off-centre mass, where a lossy border would show
    for sigma in (0.7, 2.0):
        out = np.asarray(data.gaussian_blur(x, sigma))
        np.testing.assert_allclose(out.mean(axis=(1, 2)), np.asarray(x).mean(axis=(1, 2)), rtol=1e-5)
        assert total_variation(out) < 0.6 * total_variation(x)
    c = np.full((1, 10, 10, 1), 0.3, np.float32)
    np.testing.assert_allclose(np.asarray(data.gaussian_blur(c, 1.5)), c, rtol=1e-6)


def test_blur_sigma_is_a_standard_deviation_and_the_blur_is_symmetric():
    delta = np.zeros((1, 27, 27, 1), np.float32)
    delta[0, 13, 13, 0] = 1.0
    sigma = 1.5
    out = np.asarray(data.gaussian_blur(delta, sigma))[0, :, :, 0]
    i = np.arange(27) - 13
    var_rows = (out.sum(1) * i**2).sum()
    assert abs(var_rows - sigma**2) < 0.03 * sigma**2, var_rows
    np.testing.assert_allclose(out, out.T, atol=1e-7)
    np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-7)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_blur_refuses_bad_sigmas(sigma):
    with pytest.raises(ValueError, match=r"blur `sigma` must be a finite number > 0"):
        data.gaussian_blur(np.zeros((1, 28, 28, 1), np.float32), sigma)


def test_blur_wider_than_the_image_is_refused():
    with pytest.raises(ValueError, match=r"radius 30 pixels, not smaller than the image \(28x28\)"):
        data.gaussian_blur(np.zeros((1, 28, 28, 1), np.float32), 10.0)


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--salt-pepper", "1.5", "in (0, 1]"),
        ("--blur-sigmas", "0", "must be > 0"),
        ("--blur-sigmas", "9.5", "sigma <= 9"),
        ("--meta-steps", "0", "must be >= 1"),
    ],
)
def test_bad_flags_stop_before_any_work(flag, value, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["meta-cnn-transfer", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and expected in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_run_writes_consistent_results(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "meta-cnn-transfer",
        "--out",
        str(out),
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--quick",
        "--no-progress",
        "--train-size",
        "640",
        "--meta-steps",
        "2",
        "--noise-stds",
        "1",
        "--salt-pepper",
        "0.2",
        "--blur-sigmas",
        "1.5",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "Transfer of the study-1 lr predictor" in capsys.readouterr().out
    for name in (
        "config.json",
        "results.json",
        "features.npy",
        "eif_uniform.npy",
        "eif_learned.npy",
        "transfer.png",
        "meta_cnn_noise/predictor.npz",
        "meta_cnn_noise/metrics.json",
    ):
        assert (out / name).is_file(), name
    r = json.loads((out / "results.json").read_text())
    s = r["samples"]
    group, labels, source = np.array(s["corruption"]), np.array(s["labels"]), np.array(s["source"])
    lr = np.array(s["lr_learned"])
    assert set(r["table"]) == {"gaussian_1", "salt_pepper_0.2", "blur_1.5"} and (group == "clean").sum() == 20

    # the learned lrs are the saved predictor applied to the saved features
    features = np.load(out / "features.npy")
    np.testing.assert_allclose(np.array(s["features"]), features, rtol=1e-6)
    predictor, phi = meta.load_amortised(out / "meta_cnn_noise/predictor.npz")
    np.testing.assert_allclose(lr, np.asarray(predictor.lr(phi, features)), rtol=1e-5)
    assert np.ptp(lr) > 0  # the predictor was trained away from uniform

    # blur keeps each digit's mean (feature 0); the table is the samples' and matrices' numbers
    clean = np.flatnonzero(group == "clean")
    blur = np.flatnonzero(group == "blur_1.5")
    np.testing.assert_allclose(features[blur, 0], features[clean[source[blur]], 0], rtol=1e-4)
    mats = {k: np.load(out / f"eif_{k}.npy") for k in ("uniform", "learned")}
    assert mats["learned"].shape == (len(group), len(clean))
    for name, row in r["table"].items():
        rows = np.flatnonzero(group == name)
        twins = source[rows]
        assert row["lr_mean_clean"] == pytest.approx(lr[clean].mean(), rel=1e-5)
        assert row["lr_mean_corrupted"] == pytest.approx(lr[rows].mean(), rel=1e-5)
        same = (labels[rows][:, None] == labels[clean][None, :]) & (twins[:, None] != np.arange(len(clean))[None, :])
        for k in ("uniform", "learned"):
            M = mats[k]
            ratio = M[rows][same].mean() / M[clean[twins]][same].mean()
            assert row[f"teaching_ratio_{k}"] == pytest.approx(ratio, rel=1e-5), (name, k)

    # the Gaussian reference is study 1's own held-out evaluation (same digits, same noise)
    s1 = json.loads((out / "meta_cnn_noise/metrics.json").read_text())["heldout"]
    for k, s1_key in (("uniform", "before"), ("learned", "after")):
        assert r["table"]["gaussian_1"][f"teaching_ratio_{k}"] == pytest.approx(
            s1[s1_key]["noise"]["std_1"]["teaching_ratio_same_class"], rel=1e-3
        )
    assert r["within_class_learning_clean"]["uniform"] == pytest.approx(
        s1["before"]["within_class_learning_clean"], rel=1e-3
    )


def test_saved_amortised_predictor_reads_back_the_same_rates(tmp_path):
    features = jax.random.normal(jax.random.key(0), (9, 6))
    predictor = meta.amortised(features, 2e-3, hidden=[5, 3], max_log_gain=2.0)
    phi = jax.tree.map(lambda a: a + 0.2, predictor.init(jax.random.key(1), features))
    meta.save_amortised(tmp_path / "p.npz", predictor, phi)
    back, phi_back = meta.load_amortised(tmp_path / "p.npz")
    assert back.predictor == predictor.predictor and back.base_lr == predictor.base_lr
    np.testing.assert_array_equal(np.asarray(back.lr(phi_back, features)), np.asarray(predictor.lr(phi, features)))
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="is not a saved amortised predictor"):
        meta.load_amortised(tmp_path / "other.npz")
