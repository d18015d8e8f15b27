"""The contrib optimizers under jax.jit on sharded params (8 simulated devices).

Every method runs three steps (a projection refresh on steps 1 and 3) on a
LLaMA-shaped tree sharded over a 2 x 4 mesh and unsharded; the parameters
and states must agree. The device-count flag must be set before JAX is
imported, so the check runs in a fresh interpreter.
"""

import os
import textwrap

import pytest

import harness

_HERE = os.path.dirname(os.path.abspath(__file__))

_CODE = textwrap.dedent(r'''
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from scale_optax import contrib
    import scale_test_util as tu  # tests/scale_optax: on PYTHONPATH

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ('a', 'b'), axis_types=(AxisType.Auto,) * 2)
    shapes = tu.llama_shapes(vocab=32, d=16, d_ff=24, n_layers=1)
    params = tu.make_params(shapes, seed=0)
    targets = tu.make_params(shapes, seed=1)
    spec = lambda x: P('a', 'b') if x.ndim == 2 else P('b')
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)
    lr = optax.linear_schedule(0.01, 0.001, 3)
    methods = {
        'galore': contrib.galore(lr, rank=4, update_gap=2, weight_decay=0.1),
        'fira': contrib.fira(lr, rank=4, update_gap=2),
        'apollo': contrib.apollo(lr, rank=4, update_gap=2),
        'apollo_mini': contrib.apollo_mini(lr, update_gap=2),
        'stable_spam': contrib.stable_spam(lr, t_max=3, reset_interval=2),
        'swan': contrib.swan(lr),
    }

    def loss(p, t):
        return sum(jnp.sum(jnp.square(a - b) * (1.0 + jnp.arange(a.shape[-1])))
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(t)))

    for name, tx in methods.items():
        @jax.jit
        def step(p, s, t):
            g = jax.grad(loss)(p, t)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        def run(p, t):
            s = jax.jit(tx.init)(p)
            for _ in range(3):
                p, s = step(p, s, t)
                jax.block_until_ready(p)   # One step in flight at a time.
            return p, s

        ref_p, ref_s = run(params, targets)
        sh_p, sh_s = run(jax.device_put(params, shardings),
                         jax.device_put(targets, shardings))
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sh_p)[0],
                                jax.tree.leaves(ref_p)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                       rtol=1e-4, atol=1e-6,
                                       err_msg=f'{name} {path}')
        # States hold bases from an SVD of gradients whose last bits differ
        # with the reduction order: a slightly looser bound.
        for a, b in zip(jax.tree.leaves(sh_s), jax.tree.leaves(ref_s)):
            np.testing.assert_allclose(np.asarray(a, np.float64),
                                       np.asarray(b, np.float64), rtol=1e-3,
                                       atol=1e-4, err_msg=name)
        moved = max(float(jnp.abs(a - b).max()) for a, b in
                    zip(jax.tree.leaves(sh_p), jax.tree.leaves(params)))
        assert moved > 1e-3, (name, moved)
        for a, want in zip(jax.tree.leaves(sh_p), jax.tree.leaves(shardings)):
            assert a.sharding.is_equivalent_to(want, a.ndim), (name, a.sharding)
        print('SHARDED_OK', name, flush=True)
''')


@pytest.mark.slow  # 86 s of CPU for the twelve compiles; run with -m slow.
def test_contrib_sharded_jit_matches_unsharded():
  proc = harness.run_python(_CODE, devices=8, paths=[_HERE], timeout=600)
  assert proc.rc == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  assert proc.stdout.count('SHARDED_OK') == 6, proc.stdout
