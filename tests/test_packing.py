"""Packing: the layout of packed rows (visibility, positions, scored slots) and that a packed row's
logits equal each sample's logits computed alone, for plain, sliding-window and LongRoPE decoders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeif import packing
from jaxeif.models import phi3


def test_layout_of_a_prefix_with_two_continuations_and_a_sample():
    pieces = [
        packing.Piece([5, 6], [0, 0], 0),
        packing.Piece([7], [1], 0, parent=0),
        packing.Piece([8, 9], [1, 1], 1, parent=0),
        packing.Piece([1, 2, 3], [0, 1, 1], 2),
    ]
    p = packing.pack(pieces, row_length=64, multiple=4)
    assert p.ids.shape == (1, 8) and p.groups == 3
    np.testing.assert_array_equal(p.ids[0], [5, 6, 7, 8, 9, 1, 2, 3])
    np.testing.assert_array_equal(p.positions[0], [0, 1, 2, 2, 3, 0, 1, 2])
    v = p.visible[0]
    assert (
        v[2, :2].all() and not v[3, 2] and v[3, :2].all() and v[4, 3] and not v[4, 2]
    )  # siblings don't see each other
    assert v[6, 5] and not v[6, :5].any() and not v[:5, 5:].any()  # the sample sees only itself
    n = int(p.weight[0].astype(bool).sum())
    np.testing.assert_array_equal(p.at[0, :n], [1, 1, 3, 5, 6])  # the prefix's last token predicts both continuations
    np.testing.assert_array_equal(p.target[0, :n], [7, 8, 9, 2, 3])
    np.testing.assert_array_equal(p.group[0, :n], [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(p.spans, [[0, 0, 2], [0, 2, 1], [0, 3, 2], [0, 5, 3]])


def test_long_families_split_and_bad_pieces_are_refused():
    pre = [[1, 2, 3]] * 2
    conts = [[4, 5], [6], [7, 8, 9]]
    p = packing.prefixed(pre, conts, row_length=8, multiple=1)
    assert p.ids.shape[0] > 2  # each prefix repeated in several rows
    assert sorted(np.unique(p.group[p.weight > 0]).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="score\\[0\\] must be 0"):
        packing.pack([packing.Piece([1, 2], [1, 1], 0)])
    with pytest.raises(ValueError, match="parent 3 must be a piece without a parent listed before it"):
        packing.pack([packing.Piece([1, 2], [0, 1], 0), packing.Piece([3], [1], 1, parent=3)])
    with pytest.raises(ValueError, match="no tokens"):
        packing.pack([packing.Piece([], [], 0)])
    with pytest.raises(ValueError, match="nothing to pack"):
        packing.pack([])


def _config(**kw):
    base = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return phi3.Phi3Config(**{**base, **kw})


LONGROPE = dict(
    rope_type="longrope",
    original_max_position_embeddings=12,
    partial_rotary_factor=0.5,
    short_factor=(1.0, 1.5),
    long_factor=(3.0, 5.0),
    attention_factor=1.2,
)


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 3}, LONGROPE], ids=["plain", "sliding", "longrope"])
def test_packed_logits_equal_each_sample_alone(kw):
    config = _config(**kw)
    apply_fn = jax.jit(phi3.make_apply_fn(config))
    params = phi3.init_params(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    lengths = [5, 9, 4] if "rope_type" not in kw else [5, 10, 4]  # below LongRoPE's switch at 12 tokens
    samples = [rng.integers(0, 50, n).tolist() for n in lengths]
    prefix = rng.integers(0, 50, 3).tolist()
    pieces = [packing.Piece(s, [0.0] + [1.0] * (len(s) - 1), k) for k, s in enumerate(samples)]
    pieces += [packing.Piece(prefix, [0.0] * 3, 3), packing.Piece(samples[0], [1.0] * 5, 4, parent=3)]
    p = packing.pack(pieces, row_length=64, multiple=8)
    assert p.ids.shape[1] > 12  # the row is longer than LongRoPE's switch; every chain is shorter
    logits = np.asarray(apply_fn(params, p.ids, p.visible, positions=p.positions))[0]
    for k, s in enumerate(samples):
        _, start, n = p.spans[k]
        alone = np.asarray(apply_fn(params, jnp.asarray([s])))[0]
        np.testing.assert_allclose(logits[start : start + n], alone, atol=1e-5)
    _, start, n = p.spans[4]
    alone = np.asarray(apply_fn(params, jnp.asarray([prefix + samples[0]])))[0]
    np.testing.assert_allclose(logits[start : start + n], alone[3:], atol=1e-5)
