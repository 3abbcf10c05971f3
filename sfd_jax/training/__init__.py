"""Training machinery: state, jitted steps, checkpoints, loop, metrics."""
