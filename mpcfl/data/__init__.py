"""Party data: reading a party's own files, validating and preprocessing them, and sharing them."""
