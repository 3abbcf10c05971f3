"""SFD time sampling, objective and three-phase sampler: pure functions of params, batch and rng."""
