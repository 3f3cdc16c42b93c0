"""Training scripts ported to sam_optax, each beside its plain optax and its
optax.contrib.sam version (docs/examples.md)."""
