"""Runnable comparisons of sam_optax methods: data, models, training, benchmark."""
