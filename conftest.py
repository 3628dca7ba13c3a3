"""Strict JAX settings for every test and doctest: silent promotions are bugs here."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
