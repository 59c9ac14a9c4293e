"""Process groups, device backend, context-parallel attention and resharding mechanics."""
import warnings

# megatron-core warns at import that optional CUDA extensions are absent; the fallbacks are
# exactly what runs here (and Apex is optional on GPU clusters too).
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
warnings.filterwarnings("ignore", message=r".*`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*")
warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf.*")

# Before megatron-core is first imported: a Transformer Engine that installs but fails to load
# (OSError / RuntimeError) would otherwise crash megatron's ImportError-only guards.
# And its import-time torch.compile decorations, deferred to first use.
from parallel.megatron_patches import defer_jit_compilation, guard_transformer_engine  # noqa: E402

guard_transformer_engine()
defer_jit_compilation()
