"""The policy: YAML loaded and validated (load, schema), compiled once into an immutable plan (compile,
plan), reloaded by swapping one reference (reload), and the secrets it knows redacted from every output."""
