"""Jobs: the YAML schema (pydantic), loading with one-line errors, the fingerprint."""
