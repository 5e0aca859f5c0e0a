"""Training: the loop, the step, the optimizer, checkpoints, sharding and metric files."""
