"""Pure flax.linen modules: no I/O, no globals. NHWC inside."""
