"""Where Beaver triples and other correlated randomness come from, one module per provider."""
