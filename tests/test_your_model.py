"""docs/your_model.md: every recipe executed and checked against a fine-tune written by hand (one SGD step
on one example with the framework's own gradient, then the loss recomputed); the refusals of model state
and non-array leaves in params, through every EIF entry point."""

import functools
import re
from pathlib import Path

import equinox as eqx  # noqa: E402  (in the test extra: a missing install fails loudly)
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxeif
import jaxeif.frameworks
from jaxeif import checks, runs

DOC = Path(__file__).resolve().parent.parent / "docs" / "your_model.md"
LR = 0.05  # the rate the recipes use


def doc_sections() -> dict[str, list[str]]:
    """{section title: its ```python blocks} of docs/your_model.md."""
    out = {}
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        out[section.splitlines()[0].strip()] = re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
    return out


@functools.cache
def recipe(title: str) -> dict:
    """The namespace after running the section's code blocks, in order, as a reader would."""
    namespace: dict = {}
    for block in doc_sections()[title]:
        exec(compile(block, f"{DOC.name}: {title}", "exec"), namespace)
    return namespace


def example(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def size(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def by_hand(tune, loss_of, base, train, evals) -> np.ndarray:
    """M f[n, m] from `tune(train[i])` (the fine-tuned model) and `loss_of(model, example)`, one entry at a time."""
    out = np.zeros((size(train), size(evals)))
    before = [float(loss_of(base, example(evals, j))) for j in range(size(evals))]
    for i in range(size(train)):
        tuned = tune(example(train, i))
        out[i] = [float(loss_of(tuned, example(evals, j))) - before[j] for j in range(size(evals))]
    return out


def assert_matches(M, expected):
    """Equal to float32 rounding of the losses (a wrong set of fine-tuned weights is off by O(|M|))."""
    M = np.asarray(M)
    assert M.shape == expected.shape
    assert np.abs(expected).max() > 1e-2  # the fine-tunes move the losses: the comparison can fail
    np.testing.assert_allclose(M, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


RECIPES = [
    "A plain function of a dict",
    "Flax NNX",
    "Flax NNX with BatchNorm and Dropout",
    "Flax Linen with batch_stats and dropout RNGs",
    "Equinox",
]


def test_every_code_block_of_the_page_is_run_by_a_test():
    assert [title for title, blocks in doc_sections().items() if blocks] == RECIPES


def test_plain_dict_recipe_fine_tunes_the_head_only():
    ns = recipe("A plain function of a dict")
    frozen, params, train = ns["frozen"], ns["params"], ns["train"]

    def loss(w1, b1, w2, ex):  # written again, all weights as arguments
        return (jnp.tanh(ex["x"] @ w1 + b1) @ w2 - ex["y"]) ** 2

    def tune(ex):  # SGD on w2 alone: w1 and b1 are frozen
        return frozen["w1"], frozen["b1"], params["w2"] - LR * jax.grad(loss, argnums=2)(*tune.base, ex)

    tune.base = (frozen["w1"], frozen["b1"], params["w2"])
    assert_matches(ns["M"], by_hand(tune, lambda w, ex: loss(*w, ex), tune.base, train, train))


def nnx_sgd(model, loss, ex, lr=None):
    """A copy of the nnx model after one SGD step on `ex` (nnx.grad: the gradient of the nnx.Param variables)."""
    tuned = nnx.clone(model)
    grads = nnx.grad(lambda m: loss(m, ex))(tuned)
    nnx.update(tuned, jax.tree.map(lambda p, g: p - (LR if lr is None else lr) * g, nnx.state(tuned, nnx.Param), grads))
    return tuned


def test_nnx_recipe_matches_a_hand_written_fine_tune():
    ns = recipe("Flax NNX")
    model, loss, train = ns["model"], ns["loss"], ns["train"]
    assert_matches(ns["M"], by_hand(functools.partial(nnx_sgd, model, loss), loss, model, train, train))


def test_nnx_batchnorm_dropout_recipe_matches_a_hand_written_fine_tune():
    ns = recipe("Flax NNX with BatchNorm and Dropout")
    model, loss, train, evals = ns["model"], ns["loss"], ns["train"], ns["evals"]
    assert model.norm.use_running_average and model.drop.deterministic
    bound = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ns["loss_fn"])[0]]
    assert any("['norm']['mean']" in p for p in bound)  # the running statistics: an input of the program
    assert not any("mean" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ns["params"])[0])
    assert_matches(ns["M"], by_hand(functools.partial(nnx_sgd, model, loss), loss, model, train, evals))


def test_nnx_dropout_keys_make_each_matrix_reproducible_and_matter():
    ns = recipe("Flax NNX with BatchNorm and Dropout")
    loss_fn, params, train, evals = ns["loss_fn"], ns["params"], ns["train"], ns["evals"]
    again = jaxeif.eif(loss_fn, params, train, evals, lr=LR)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ns["M"]))
    other_keys = {**train, "key": jax.random.split(jax.random.key(99), size(train))}
    other = np.asarray(jaxeif.eif(loss_fn, params, other_keys, evals, lr=LR))
    no_dropout = np.asarray(jaxeif.eif(loss_fn, params, {k: v for k, v in train.items() if k != "key"}, evals, lr=LR))
    scale = np.abs(np.asarray(ns["M"])).max()
    assert np.abs(other - np.asarray(ns["M"])).max() > 1e-3 * scale  # another mask, another fine-tune
    assert np.abs(no_dropout - np.asarray(ns["M"])).max() > 1e-3 * scale  # dropout is on in the fine-tunes


def test_float64_mode_agrees_without_dropout_and_draws_other_masks_with_it():
    """The page's precision note: float64 checks the recipe with dropout off; with it on, the masks change."""
    ns = recipe("Flax NNX with BatchNorm and Dropout")
    loss_fn, params, train, evals = ns["loss_fn"], ns["params"], ns["train"], ns["evals"]
    no_keys = {k: v for k, v in train.items() if k != "key"}
    M32 = np.asarray(jaxeif.eif(loss_fn, params, no_keys, evals, lr=LR))
    M64 = np.asarray(jaxeif.eif(loss_fn, params, no_keys, evals, lr=LR, precision=jaxeif.Precision(dtype="float64")))
    np.testing.assert_allclose(M64, M32, rtol=1e-4, atol=1e-5 * np.abs(M32).max())
    masked64 = np.asarray(jaxeif.eif(loss_fn, params, train, evals, lr=LR, precision=jaxeif.Precision(dtype="float64")))
    assert np.abs(masked64 - np.asarray(ns["M"])).max() > 0.1 * np.abs(np.asarray(ns["M"])).max()
    masked_difference = np.asarray(
        jaxeif.eif(loss_fn, params, train, evals, lr=LR, precision=jaxeif.Precision(difference=True))
    )
    np.testing.assert_allclose(masked_difference, ns["M"], rtol=1e-3, atol=1e-4 * np.abs(np.asarray(ns["M"])).max())


def test_batchnorm_in_train_mode_is_degenerate_on_one_example_and_nnx_loss_warns():
    ns = recipe("Flax NNX with BatchNorm and Dropout")
    model = nnx.clone(ns["model"])
    model.train()
    x = ns["evals"]["x"]
    out = jnp.stack([model(x[j][None])[0] for j in range(3)])  # train mode: normalised by its own statistics
    np.testing.assert_allclose(out, out[0], atol=1e-5)  # the same output whatever the input
    model.eval()
    assert np.ptp(np.asarray([model(x[j][None])[0] for j in range(3)])) > 1e-3  # running stats: it depends again
    model.train()
    with pytest.warns(UserWarning, match=r"BatchNorm .*train mode.*model\.eval\(\)"):
        jaxeif.frameworks.nnx_loss(model, ns["loss"])


def test_nnx_loss_wrt_filter_fine_tunes_only_what_it_selects():
    ns = recipe("Flax NNX")
    only_out = nnx.All(nnx.Param, nnx.PathContains("out"))
    loss_fn, params = jaxeif.frameworks.nnx_loss(ns["model"], ns["loss"], wrt=only_out)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert paths and all(p.startswith("['out']") for p in paths)
    M = jaxeif.eif(loss_fn, params, ns["train"], lr=LR)

    def tune(ex):  # SGD on the last layer alone
        tuned = nnx.clone(ns["model"])
        grads = nnx.grad(lambda m: ns["loss"](m, ex), argnums=nnx.DiffState(0, only_out))(tuned)
        nnx.update(tuned, jax.tree.map(lambda p, g: p - LR * g, nnx.state(tuned, only_out), grads))
        return tuned

    assert_matches(M, by_hand(tune, ns["loss"], ns["model"], ns["train"], ns["train"]))


class TinyCNN(nnx.Module):
    """x f32[b, 6, 6, 1] -> f32[b, 3] logits."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


def test_nnx_cnn_with_batchnorm_through_nnx_loss_matches_a_hand_written_fine_tune():
    model = TinyCNN(nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(8))
    model(jax.random.normal(k1, (16, 6, 6, 1)) + 0.5)  # the running statistics move
    model.eval()
    data = {"x": jax.random.normal(k2, (5, 6, 6, 1)), "y": jnp.arange(5) % 3}

    def loss(m, ex):
        return -jax.nn.log_softmax(m(ex["x"][None])[0])[ex["y"]]

    loss_fn, params = jaxeif.frameworks.nnx_loss(model, loss)
    assert not any("mean" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    M = jaxeif.eif(loss_fn, params, data, lr=0.2)
    assert_matches(M, by_hand(functools.partial(nnx_sgd, model, loss, lr=0.2), loss, model, data, data))


def test_linen_recipe_matches_a_hand_written_fine_tune():
    ns = recipe("Flax Linen with batch_stats and dropout RNGs")
    net, variables, train, evals = ns["net"], ns["variables"], ns["train"], ns["evals"]

    def loss(params, ex):  # written again: batch_stats from `variables`, the dropout key from the example
        key = ex.get("key")
        pred = net.apply(
            {**variables, "params": params},
            ex["x"][None],
            norm_train=False,
            dropout=key is not None,
            rngs=None if key is None else {"dropout": key},
        )[0]
        return (pred - ex["y"]) ** 2

    def tune(ex):
        return jax.tree.map(lambda p, g: p - LR * g, variables["params"], jax.grad(loss)(variables["params"], ex))

    assert_matches(ns["M"], by_hand(tune, loss, variables["params"], train, evals))


def test_equinox_recipe_matches_a_hand_written_fine_tune():
    ns = recipe("Equinox")
    model, loss, train = ns["model"], ns["loss"], ns["train"]

    def tune(ex):
        grads = eqx.filter_grad(lambda m: loss(m, ex))(model)
        return eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))

    assert_matches(ns["M"], by_hand(tune, loss, model, train, train))


def test_eqx_loss_binds_frozen_arrays_as_inputs_and_fine_tunes_only_wrt():
    ns = recipe("Equinox")
    model, loss, train = ns["model"], ns["loss"], ns["train"]
    last_only = jax.tree.map(lambda _: False, model)
    last_only = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), last_only, replace=(True, True))
    loss_fn, params = jaxeif.frameworks.eqx_loss(model, loss, wrt=last_only)
    assert len(jax.tree.leaves(params)) == 2
    assert len(jax.tree.leaves(loss_fn)) == 4  # the first layers' weights: bound in the Partial, program inputs
    M = jaxeif.eif(loss_fn, params, train, lr=LR)

    def tune(ex):
        diff, static = eqx.partition(model, last_only)
        grads = jax.grad(lambda d: loss(eqx.combine(d, static), ex))(diff)
        return eqx.combine(jax.tree.map(lambda p, g: p - LR * g, diff, grads), static)

    assert_matches(M, by_hand(tune, loss, model, train, train))


# ----------------------------------------------------------------------------- refusals


def tiny():
    """params, loss_fn, train of a two-weight regressor (for the refusals)."""
    train = {"x": jnp.arange(8.0).reshape(4, 2), "y": jnp.ones(4)}
    return {"w": jnp.ones(2)}, lambda p, ex: (ex["x"] @ p["w"] - ex["y"]) ** 2, train


def _run_sweep(loss_fn, params, train, *, lr):
    return runs.sweep_eif(loss_fn, params, train, lr=lr)


ENTRY_POINTS = {
    "eif": jaxeif.eif,
    "eif_sweep": lambda f, p, t, *, lr: jaxeif.eif_sweep(f, p, t, lrs=jnp.asarray([lr])),
    "eif_linearized": jaxeif.eif_linearized,
    "eif_sharded": jaxeif.eif_sharded,
    "noise_floor": jaxeif.noise_floor,
    "runs.sweep_eif": _run_sweep,
}


@pytest.mark.parametrize("collection", checks.LINEN_STATE_COLLECTIONS)
def test_a_linen_variables_dict_is_refused_naming_the_collection(collection):
    params, _, train = tiny()
    variables = {"params": params, collection: {"mean": jnp.zeros(2)}}
    loss = lambda v, ex: (ex["x"] @ v["params"]["w"] - ex["y"]) ** 2  # noqa: E731
    for given in (variables, flax.core.freeze(variables)):  # a plain dict, or Linen's FrozenDict
        with pytest.raises(checks.ModelStateError, match=rf"\['{collection}'\].*variables\['params'\]") as info:
            jaxeif.eif(loss, given, train, lr=0.1)
        assert isinstance(info.value, ValueError) and isinstance(info.value, jaxeif.Error)


def test_an_equinox_dropout_setting_in_params_is_refused_naming_it():
    model = eqx.nn.Sequential([eqx.nn.Linear(2, 1, key=jax.random.key(0)), eqx.nn.Dropout(0.1, inference=True)])
    _, _, train = tiny()
    with pytest.raises(checks.ParamsLeafError, match=r"`params`\.layers\[1\]\.p is a Python float \(0\.1\)"):
        jaxeif.eif(lambda m, ex: (m(ex["x"])[0] - ex["y"]) ** 2, model, train, lr=0.1)
    loss_fn, params = jaxeif.frameworks.eqx_loss(model, lambda m, ex: (m(ex["x"])[0] - ex["y"]) ** 2)
    assert len(jax.tree.leaves(params)) == 2  # the Linear's weight and bias; the rate stays in the static part
    assert np.isfinite(np.asarray(jaxeif.eif(loss_fn, params, train, lr=0.001))).all()


def test_params_named_like_a_collection_without_params_beside_it_are_accepted():
    _, _, train = tiny()
    params = {"cache": jnp.ones(2)}  # a user's own weight named "cache": not a Linen variables dict
    M = jaxeif.eif(lambda p, ex: (ex["x"] @ p["cache"] - ex["y"]) ** 2, params, train, lr=0.01)
    assert np.isfinite(np.asarray(M)).all()


def test_nnx_state_with_batch_stats_is_refused_naming_the_variable():
    ns = recipe("Flax NNX with BatchNorm and Dropout")
    state = nnx.state(ns["model"], nnx.Any(nnx.Param, nnx.BatchStat))  # a filter that lets the statistics through
    with pytest.raises(checks.ModelStateError, match=r"\['norm'\]\['mean'\] is an nnx\.BatchStat.*nnx\.split"):
        jaxeif.eif(lambda s, ex: 0.0 * ex["y"], state, ns["train"], lr=0.1)
    with pytest.raises(checks.ModelStateError, match=r"nnx\.(BatchStat|Rng)"):  # the module itself as params
        jaxeif.eif(lambda m, ex: 0.0 * ex["y"], ns["model"], ns["train"], lr=0.1)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_an_equinox_module_as_params_is_refused_naming_the_leaf_everywhere(name):
    model = recipe("Equinox")["model"]
    _, _, train = tiny()
    loss = lambda m, ex: (m(ex["x"][:1].repeat(3)) - ex["y"]) ** 2  # noqa: E731
    with pytest.raises(checks.ParamsLeafError, match=r"`params`\.activation is .*'tanh'.*eqx\.partition") as info:
        ENTRY_POINTS[name](loss, model, train, lr=0.1)
    assert isinstance(info.value, TypeError) and isinstance(info.value, jaxeif.Error)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_linen_variables_dict_is_refused_everywhere(name):
    params, _, train = tiny()
    loss = lambda v, ex: (ex["x"] @ v["params"]["w"] - ex["y"]) ** 2  # noqa: E731
    with pytest.raises(checks.ModelStateError, match="batch_stats"):
        ENTRY_POINTS[name](loss, {"params": params, "batch_stats": {"var": jnp.ones(2)}}, train, lr=0.1)


@pytest.mark.parametrize(
    "bind,where",
    [
        (lambda f: jax.tree_util.Partial(f, jax.nn.relu), r"args\[0\] = .*'relu'"),
        (lambda f: jax.tree_util.Partial(f, act=jax.nn.relu), r"keywords\['act'\] = .*'relu'"),
        (lambda f: jax.tree_util.Partial(f, {"scale": jnp.ones(()), "name": "head"}), r"args\[0\]\['name'\] = .*str"),
    ],
)
def test_a_non_array_bound_in_a_partial_loss_is_refused_naming_its_path(bind, where):
    params, _, train = tiny()

    def loss(act, p, ex):
        return jnp.sum(act(ex["x"] @ p["w"] - ex["y"]) ** 2) if callable(act) else (ex["x"] @ p["w"] - ex["y"]) ** 2

    with pytest.raises(checks.ParamsLeafError, match=where + r".*functools\.partial"):
        jaxeif.eif(bind(loss), params, train, lr=0.1)


@pytest.mark.parametrize(
    "leaf,kind",
    [
        ("head", "str"),
        (np.array([None, 1.0], dtype=object), "ndarray"),
        (jaxeif.frameworks, "module"),
        (0.1, "Python float.*jnp.asarray"),
        (False, "Python bool"),
    ],
)
def test_a_non_array_leaf_in_params_is_refused_naming_its_path(leaf, kind):
    params, loss, train = tiny()
    with pytest.raises(checks.ParamsLeafError, match=rf"`params`\['extra'\] is .*{kind}"):
        jaxeif.eif(loss, {**params, "extra": leaf}, train, lr=0.1)


def test_arrays_numbers_and_typed_keys_bound_in_a_partial_are_accepted():
    params, _, train = tiny()

    def loss(frozen, p, ex):
        noise = 0.0 * jax.random.uniform(frozen["key"])  # a typed key bound in the Partial: an input too
        return (ex["x"] @ p["w"] * frozen["scale"] + frozen["shift"] - ex["y"]) ** 2 + noise

    loss_fn = jax.tree_util.Partial(loss, {"scale": 2.0, "shift": np.float32(0.5), "key": jax.random.key(0)})
    M = jaxeif.eif(loss_fn, params, train, lr=0.001)
    expected = by_hand(
        lambda ex: {"w": params["w"] - 0.001 * jax.grad(loss_fn)(params, ex)["w"]}, loss_fn, params, train, train
    )
    assert_matches(M, expected)
