"""The chunked vocabulary projection: same loss and gradients as one big matmul, far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kerasft.train.loop import token_nll


@pytest.mark.parametrize("soft_cap", [None, 30.0])
def test_chunked_nll_and_grads_equal_the_full_projection(soft_cap):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 300, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, size=(2, 300)))
    chunked = token_nll(hidden, table, ids, soft_cap, chunk=64)
    full = token_nll(hidden, table, ids, soft_cap, chunk=10**6)
    reference = -jnp.take_along_axis(jax.nn.log_softmax(
        (lambda z: jnp.tanh(z / soft_cap) * soft_cap if soft_cap else z)(hidden @ table.T)), ids[..., None], -1)[..., 0]
    np.testing.assert_allclose(chunked, reference, atol=2e-5)
    np.testing.assert_allclose(full, reference, atol=2e-5)
    grads = [jax.grad(lambda h, t, c=c: token_nll(h, t, ids, soft_cap, chunk=c).sum(), argnums=(0, 1))(hidden, table)
             for c in (64, 10**6)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_chunking_bounds_the_temporary_memory():
    """At batch 2 x 256 positions and a 32k vocabulary the full projection keeps every logit for
    the backward pass; the chunked one keeps one chunk's worth."""
    hidden = jax.ShapeDtypeStruct((2, 256, 64), jnp.float32)
    table = jax.ShapeDtypeStruct((32768, 64), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def temp_bytes(chunk):
        grad = jax.grad(lambda h, t, i: token_nll(h, t, i, None, chunk=chunk).sum())
        return jax.jit(grad).lower(hidden, table, ids).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(10**6), temp_bytes(64)
    logits_bytes = 2 * 256 * 32768 * 4
    assert full >= logits_bytes
    assert chunked < full / 3
