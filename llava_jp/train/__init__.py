"""Two-stage training on accelerate: data, sampler, loop, checkpoints."""
