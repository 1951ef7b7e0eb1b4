"""Tasks: one runner per job type (train, inference), each owning its DP wiring."""
