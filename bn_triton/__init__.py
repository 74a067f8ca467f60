"""bn_triton: Batch Normalization (Ioffe & Szegedy, arXiv:1502.03167) as Triton kernels with a
drop-in PyTorch front end."""
from . import reference
from .dispatch import backend
from .functional import batch_norm
from .nn.convert import convert_batchnorm, fuse_batchnorm_activations
from .nn.ghost import (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
                       GhostBatchNormAct1d, GhostBatchNormAct2d, GhostBatchNormAct3d)
from .nn.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                         BatchNormAct3d)
from .nn.renorm import (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormAct1d,
                        BatchRenormAct2d, BatchRenormAct3d, SyncBatchRenorm)
from .nn.sync import SyncBatchNorm, SyncBatchNormAct
from .switch import disable, enable, enabled, is_enabled

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d",
           "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNorm", "SyncBatchNormAct",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormAct1d",
           "BatchRenormAct2d", "BatchRenormAct3d", "SyncBatchRenorm",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormAct1d",
           "GhostBatchNormAct2d", "GhostBatchNormAct3d",
           "convert_batchnorm", "fuse_batchnorm_activations",
           "enable", "disable", "enabled", "is_enabled", "backend", "reference"]
__version__ = "0.1.0"
