"""eit_fast: a faithful reference EIT and fused GPU kernels for it."""
__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .configs import CONFIGS, ConfigError, EITConfig, get_config, list_models
from .factory import create_model
from .flops import count_macs, count_params
from .models import EIT, InputError
from .patching import patch, unpatch
from .runtime import ImplError, info

try:  # timm is optional: with it, every named model is registered with timm.create_model
    import timm as _timm  # noqa: F401
except ImportError:
    pass
else:
    from . import timm_models  # noqa: F401

__all__ = [
    "EIT", "EITConfig", "CONFIGS", "create_model", "get_config", "list_models", "load_checkpoint",
    "save_checkpoint", "count_params", "count_macs", "info", "CheckpointError", "ConfigError", "ImplError",
    "InputError", "patch", "unpatch", "__version__",
]
