"""Launchers: the local supervisor, the torchrun/Slurm worker and the environment contract."""
