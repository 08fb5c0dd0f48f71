"""Models shipped with the project for demos, tests and benchmarks (no hub downloads)."""
