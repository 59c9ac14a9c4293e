"""Process groups, device backend, context-parallel attention and resharding mechanics."""
import warnings

# megatron-core warns at import that optional CUDA extensions are absent; the fallbacks are
# exactly what runs here (and Apex is optional on GPU clusters too).
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
