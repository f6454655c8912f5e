"""The vocabulary projection of the loss: the fused, chunked full-sequence path gives the same
loss and gradients as one big matmul, with far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kerasft.train.loss import fused_weighted_nll, token_nll


def _reference(hidden, table, ids, weights, soft_cap, rows=None, delta=None):
    if rows is not None:
        table = table.at[rows].add(delta)
    logits = hidden @ table.T
    if soft_cap:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1)[..., 0]
    return jnp.sum(nll * weights)


@pytest.mark.parametrize("soft_cap", [None, 30.0])
@pytest.mark.parametrize("with_rows", [False, True])
def test_fused_loss_and_grads_equal_the_full_projection(soft_cap, with_rows):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 300, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, size=(2, 300)))
    weights = jnp.asarray(rng.integers(0, 2, size=(2, 300)), jnp.float32)
    rows = jnp.asarray([3, 7]) if with_rows else None
    delta = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32) if with_rows else jnp.zeros((2, 16))

    def fused(h, d):
        return fused_weighted_nll(h, table, ids, weights, soft_cap, rows, d if with_rows else None, chunk=64)

    def reference(h, d):
        return _reference(h, table, ids, weights, soft_cap, rows, d if with_rows else None)

    np.testing.assert_allclose(fused(hidden, delta), reference(hidden, delta), rtol=1e-5)
    got = jax.grad(fused, argnums=(0, 1))(hidden, delta)
    want = jax.grad(reference, argnums=(0, 1))(hidden, delta)
    np.testing.assert_allclose(got[0], want[0], atol=5e-5)
    np.testing.assert_allclose(got[1], want[1], atol=5e-4)
    np.testing.assert_allclose(jnp.sum(token_nll(hidden, table, ids, soft_cap) * weights),
                               _reference(hidden, table, ids, weights, soft_cap), rtol=1e-5)


def test_fused_projection_bounds_the_temporary_memory():
    """At batch 2 x 256 positions and a 32k vocabulary the one-matmul projection keeps every
    logit for the backward pass; the fused one keeps one chunk's worth."""
    hidden = jax.ShapeDtypeStruct((2, 256, 64), jnp.float32)
    table = jax.ShapeDtypeStruct((32768, 64), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    weights = jax.ShapeDtypeStruct((2, 256), jnp.float32)

    def temp_bytes(loss):
        return jax.jit(jax.grad(loss)).lower(hidden, table, ids, weights).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda h, t, i, w: jnp.sum(token_nll(h, t, i) * w))
    fused = temp_bytes(lambda h, t, i, w: fused_weighted_nll(h, t, i, w, chunk=64))
    assert full >= 2 * 256 * 32768 * 4
    assert fused < full / 3
