"""Benchmarks of SCALE against the baselines, on the paper's LLaMA shapes.

Each is a runnable module (``--help`` lists its options):

* ``python -m benchmarks.memory``: bytes of parameters, gradients and
  optimizer state (abstract shapes, nothing allocated), checked against closed
  forms, plus the compiled train step's peak from ``memory_analysis()``.
* ``python -m benchmarks.update_speed``: the jitted optimizer update (plus
  ``apply_updates``) alone, against a bytes-moved floor at the measured copy
  bandwidth.
* ``python -m benchmarks.throughput``: tokens/s of the full train step.

They run on CPU (float32 compute by default) and on a GPU when one is present
(bfloat16 compute by default); see ``--dtype``. Timed benchmarks compute every
ratio inside one process, from interleaved repetitions, so that machine load
affects all optimizers alike; they print the load average they ran under.
"""
