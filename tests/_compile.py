"""Compiler options for the few test programs that run long enough for optimisation to pay.

``scripts/test.sh`` turns XLA:CPU's LLVM optimisation off for the whole suite (``FAST_COMPILE``):
most tests compile many tiny programs and run each once. A test that trains for hundreds of
steps in one program runs several times slower that way; it passes ``OPTIMIZED`` to its
``jax.jit`` (``compiler_options`` override ``XLA_FLAGS`` for that one program) and gets the
default optimisation back: ``test_bad_batches`` takes 8 s instead of 45 s.
"""

# XLA's defaults, which FAST_COMPILE in scripts/test.sh changes; keep the two in step.
OPTIMIZED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}
