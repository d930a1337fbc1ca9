"""What a run needs around the math: config checks, checkpoints, reliability, monitoring and
the optimiser."""
