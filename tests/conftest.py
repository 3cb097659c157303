"""Suite-wide settings: quiet megatron-core's 'no Transformer Engine' warnings, fixed threads."""
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
