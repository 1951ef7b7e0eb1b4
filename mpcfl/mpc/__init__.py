"""The engine boundary: cryptographic randomness, triple providers and communication helpers around CrypTen."""
