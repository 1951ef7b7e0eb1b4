"""Federated training: local plaintext rounds at each party, their updates averaged under MPC."""
