"""bn_triton: Batch Normalization (Ioffe & Szegedy, arXiv:1502.03167) as Triton kernels with a
drop-in PyTorch front end."""
from . import reference
from .dispatch import backend
from .functional import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm
from .switch import disable, enable, enabled, is_enabled

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_batchnorm",
           "enable", "disable", "enabled", "is_enabled", "backend", "reference"]
__version__ = "0.1.0"
