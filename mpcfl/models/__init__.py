"""Models: specs and heads, the torch.fx to CrypTen converter, the zoo, user factories."""
