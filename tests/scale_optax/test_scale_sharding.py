"""SCALE under jax.jit on a sharded parameter tree (8 simulated CPU devices).

The device-count flag must be set before JAX is imported, so the check runs
in a fresh interpreter.
"""

import os
import textwrap

import harness

_HERE = os.path.dirname(os.path.abspath(__file__))

_CODE = textwrap.dedent(r'''
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import scale_optax
    import scale_test_util as tu  # tests/scale_optax: on PYTHONPATH

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ('a', 'b'), axis_types=(AxisType.Auto,) * 2)

    shapes = tu.llama_shapes(vocab=32, d=16, d_ff=24, n_layers=2)
    params = tu.make_params(shapes, seed=0)
    targets = tu.make_params(shapes, seed=1)
    # Matrices over both mesh axes (the fan-in axis 0 over 'a', so the column
    # RMS needs a cross-device reduction); vectors over 'b'.
    spec = lambda x: P('a', 'b') if x.ndim == 2 else P('b')
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)

    tx = scale_optax.scale(optax.linear_schedule(0.05, 0.005, 4),
                           weight_decay=0.1)

    def loss(p, t):
        return sum(jnp.sum(jnp.square(a - b) * (1.0 + jnp.arange(a.shape[-1])))
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(t)))

    @jax.jit
    def step(p, s, t):
        l, g = jax.value_and_grad(loss)(p, t)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    def run(p, t):
        s = jax.jit(tx.init)(p)
        for _ in range(4):
            p, s, l = step(p, s, t)
            l.block_until_ready()     # One step in flight at a time on CPU.
        return p, s

    ref_p, ref_s = run(params, targets)
    sh_params = jax.device_put(params, shardings)
    sh_targets = jax.device_put(targets, shardings)
    head = sh_params['lm_head']['kernel']
    assert len(head.sharding.device_set) == 8
    assert head.addressable_shards[0].data.shape == (8, 8)
    sh_p, sh_s = run(sh_params, sh_targets)
    jax.block_until_ready((sh_p, sh_s))

    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sh_p)[0],
                            jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-6, err_msg=scale_optax.path_str(path))
    for a, b in zip(jax.tree.leaves(sh_s), jax.tree.leaves(ref_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-6)
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(sh_p), jax.tree.leaves(params)))
    assert moved > 1e-2, moved
    # Params and the head's momentum keep the input sharding across updates.
    for a, want in zip(jax.tree.leaves(sh_p), jax.tree.leaves(shardings)):
        assert a.sharding.is_equivalent_to(want, a.ndim), (a.sharding, want)
    ema = sh_s[0].inner_state.ema['lm_head']['kernel']
    assert ema.sharding.is_equivalent_to(
        shardings['lm_head']['kernel'], 2), ema.sharding
    # column_normalize adds the same numbers in the same order on one device
    # and on eight, whichever axis is sharded: bitwise the same result.
    g = jax.random.normal(jax.random.key(3), (200, 48)) * jnp.arange(1, 49)
    cn = scale_optax.column_normalize()
    normalize = jax.jit(lambda g: cn.update(g, cn.init(g))[0])
    one = np.asarray(normalize(g))
    for gspec in (P('a', 'b'), P(('a', 'b'), None), P(None, ('a', 'b'))):
        got = normalize(jax.device_put(g, NamedSharding(mesh, gspec)))
        np.testing.assert_array_equal(np.asarray(got), one, err_msg=str(gspec))
    print('SHARDED_OK', sh_p['lm_head']['kernel'].sharding.spec,
          sh_s[0].inner_state.ema['lm_head']['kernel'].sharding.spec)
''')


def test_sharded_jit_matches_unsharded():
  proc = harness.run_python(_CODE, devices=8, paths=[_HERE])
  assert proc.rc == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  assert 'SHARDED_OK' in proc.stdout, proc.stdout
