"""One EIF contract: every EIF function takes the shared keywords with the same defaults, types and meaning."""

import inspect
import warnings

import numpy as np
import optax
import pytest

import jaxeif
from jaxeif import lm, multihost, options, runs, store

EIF_FUNCTIONS = [
    jaxeif.eif,
    jaxeif.eif_sweep,
    jaxeif.eif_linearized,
    jaxeif.eif_sharded,
    jaxeif.noise_floor,
    jaxeif.chunk_plan,
    runs.sweep_eif,
    lm.finetuned_eif,
    lm.lora_eif,
    lm.lowrank_sgd_eif,
    lm.linearized_sgd_eif,
    lm.prompted_eif,
    store.fill,
    store.fill_spmd,
    multihost.eif_rows,
]
SHARED = ("lr", "steps", "optimizer", "chunk_size", "precision", "progress", "memory_budget")
WITHOUT_A_BUDGET = {lm.prompted_eif}  # one packed forward pass per row: nothing to plan


def _name(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def test_shared_keywords_have_one_default_and_one_type():
    seen: dict[str, dict] = {}
    for fn in EIF_FUNCTIONS:
        for name, p in inspect.signature(fn).parameters.items():
            if name in SHARED:
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{_name(fn)}: `{name}` must be keyword-only"
                seen.setdefault(name, {})[_name(fn)] = (p.default, p.annotation)
    for name, by_fn in seen.items():
        defaults = {f: d for f, (d, _) in by_fn.items()}
        assert len(set(map(repr, defaults.values()))) == 1, f"`{name}` defaults disagree: {defaults}"
        if name != "lr":  # lr's accepted forms differ by path (host arrays on the low-rank paths)
            types = {f: a for f, (_, a) in by_fn.items()}
            assert len(set(types.values())) == 1, f"`{name}` types disagree: {types}"
    for name in ("steps", "optimizer", "chunk_size", "precision", "progress", "memory_budget"):
        assert next(iter(seen[name].values()))[0] == options.DEFAULTS[name], name


def test_lr_has_no_default_anywhere():
    for fn in EIF_FUNCTIONS:
        params = inspect.signature(fn).parameters
        rate = params.get("lr", params.get("lrs"))
        if fn is lm.prompted_eif:
            assert rate is None  # no fine-tune, no rate
            continue
        assert rate is not None and rate.default is inspect.Parameter.empty, f"{_name(fn)}: `lr` must be required"
        assert rate.kind is inspect.Parameter.KEYWORD_ONLY


def test_memory_budget_wherever_a_layout_is_planned():
    for fn in EIF_FUNCTIONS:
        if fn not in WITHOUT_A_BUDGET:
            assert "memory_budget" in inspect.signature(fn).parameters, _name(fn)


def test_a_missing_lr_is_a_type_error_naming_it():
    params, train = {"w": np.ones(2, np.float32)}, np.ones((3, 2), np.float32)
    loss = lambda p, x: (p["w"] @ x) ** 2  # noqa: E731
    for fn in (jaxeif.eif, jaxeif.eif_linearized, jaxeif.eif_sharded, jaxeif.noise_floor, runs.sweep_eif):
        with pytest.raises(TypeError, match="'lr'"):
            fn(loss, params, train)


def test_chunk_size_auto_and_memory_budget_mean_the_same_in_eif_and_eif_linearized():
    """eif_linearized's "auto" is planned from XLA's memory analysis under memory_budget, as eif's is: a budget
    below one example's gradient program is refused the same way, and the values never depend on the layout."""
    params, train = {"w": np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)}, np.ones((6, 4), np.float32)
    loss = lambda p, x: ((x @ p["w"]) ** 2).sum()  # noqa: E731
    for fn in (jaxeif.eif, jaxeif.eif_linearized):
        with pytest.raises(jaxeif.MemoryBudgetError, match="memory budget"):
            fn(loss, params, train, lr=0.1, memory_budget=1)
    auto = jaxeif.eif_linearized(loss, params, train, lr=0.1)
    for chunk in (None, 1, 4):
        np.testing.assert_allclose(
            jaxeif.eif_linearized(loss, params, train, lr=0.1, chunk_size=chunk), auto, rtol=1e-6
        )


def test_options_are_checked_in_one_place_with_the_argument_named():
    with pytest.raises(TypeError, match="`chunk_size`"):
        options.check_chunk_size("big")
    with pytest.raises(ValueError, match="`memory_budget`"):
        options.check_memory_budget(-1)
    with pytest.raises(TypeError, match=r"`optimizer`.*optax\.adam\(1\.0\)"):
        options.check_optimizer("adam")
    assert options.check_optimizer(optax.sgd(1.0)) is not None
    with pytest.raises(ValueError, match="`precision`"):
        options.check_precision("fp8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert options.check_precision(jaxeif.Precision(difference=True)).difference


def test_public_namespaces_list_what_users_call_and_old_names_warn():
    import jaxeif.meta as meta
    from jaxeif.lm import loss, lowrank

    assert "slot_nll" not in lm.__all__ and "ROW_LENGTH" not in lm.__all__ and "make_step" not in meta.__all__
    for namespace in (jaxeif, lm, meta):
        assert all(hasattr(namespace, name) for name in namespace.__all__)
    with pytest.warns(DeprecationWarning, match=r"jaxeif\.lm\.slot_nll .* import it from jaxeif\.lm\.loss"):
        assert lm.slot_nll is loss.slot_nll
    with pytest.warns(DeprecationWarning, match="jaxeif.lm.lowrank"):
        from jaxeif.lm import sgd_step_lowrank
    assert sgd_step_lowrank is lowrank.sgd_step_lowrank
    with pytest.warns(DeprecationWarning, match="jaxeif.meta.outer"):
        assert meta.make_step is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lm.nothing_here  # noqa: B018
