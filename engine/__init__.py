import parallel  # noqa: F401  (quiets megatron-core import warnings before megatron is imported)
