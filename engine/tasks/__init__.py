"""Built-in synthetic, verifiable tasks for the demo, tests and benchmarks (no downloads)."""
