"""Full-MPC training: the SGD loop, its runner, checkpoints, bounds, DP-SGD, the plaintext baseline and the audit."""
