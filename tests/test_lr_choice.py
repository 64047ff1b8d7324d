"""The lr sweep's plateau rules (jaxeif.lr_choice) and its neighbour agreement."""

import numpy as np
import pytest

from jaxeif import lr_choice


def test_top_of_first_plateau():
    lrs = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    agree = [np.nan, 0.3, 0.97, 0.99, 0.96, 0.2, 0.98]  # plateau 1e-4..1e-2, then a stray agreeing point
    assert lr_choice.choose_lr(lrs, agree, 0.95, rule="top_of_first_plateau") == 1e-2
    assert lr_choice.choose_lr(lrs, agree, 0.965, rule="top_of_first_plateau") == 1e-3
    with pytest.raises(ValueError, match="no plateau"):
        lr_choice.choose_lr(lrs, [np.nan] * 7, 0.95, rule="top_of_first_plateau")


def test_middle_of_longest_plateau():
    lrs = 10.0 ** np.arange(-6, 0)
    agree = np.array([np.nan, 0.2, 0.99, 0.98, 0.97, 0.5])  # noise, plateau 1e-5..1e-2, non-linear
    assert lr_choice.choose_lr(lrs, np.nan_to_num(agree, nan=-1), 0.95, rule="middle_of_longest_plateau") in (
        1e-4,
        1e-3,
    )
    with pytest.raises(ValueError, match="no two consecutive"):
        lr_choice.choose_lr(lrs, np.zeros(6), 0.95, rule="middle_of_longest_plateau")


def test_the_two_rules_differ_on_the_same_sweep_and_unknown_rules_are_refused():
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    agree = [np.nan, 0.99, 0.2, 0.99, 0.99, 0.99, 0.1]  # a short plateau 1e-5..1e-4, a long one 1e-3..1
    assert lr_choice.choose_lr(lrs, agree, 0.95, rule="top_of_first_plateau") == 1e-4
    assert lr_choice.choose_lr(lrs, agree, 0.95, rule="middle_of_longest_plateau") in (1e-2, 1e-1)
    with pytest.raises(ValueError, match="not a plateau rule"):
        lr_choice.choose_lr(lrs, agree, 0.95, rule="largest")


def test_agreement_is_scale_free_and_ignores_diagonal():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    B = 7.0 * A + np.diag(rng.normal(size=6) * 100)
    assert lr_choice.agreement(A, B) == pytest.approx(1.0)
    assert lr_choice.agreement(A, -A) == pytest.approx(-1.0)
    assert np.isnan(lr_choice.agreement(A, np.zeros((6, 6))))  # EIF == 0: no plateau there
    assert lr_choice.agreement([A, A], [B, -B]) == pytest.approx(0.0, abs=1e-12)  # a list pools its matrices


def test_summarise_skips_non_finite_entries_in_the_magnitude():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 5))
    mats = [s * base for s in (1.0, 2.0, 4.0)]
    mats[2][0, 1] = np.nan
    sweep = lr_choice.summarise([1e-3, 1e-2, 1e-1], mats, threshold=0.5)
    assert np.isnan(sweep.agreement[0]) and np.isnan(sweep.agreement[2]) and np.all(np.isfinite(sweep.magnitude))
    assert sweep.chosen == 1e-3 and sweep.rule == "middle_of_longest_plateau"
