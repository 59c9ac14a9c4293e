"""Offline batch inference: generation with vLLM engines, reward scoring, selection (best-of-n,
conditional SFT, iterative DPO pairs). Used by ``engine.cli.batch_inference``."""
