"""incrementer_fast: a fast, kernel-backed training backend for Incrementer (CVPR 2023).

Fused ops (Triton on CUDA, the reference on CPU, the kernels through Triton's interpreter on CPU when
TRITON_INTERPRET=1 is set before import), the Incrementer model and a class-incremental pipeline.
"""
from . import reference
from ._checks import check_labels
from ._dispatch import backend
from .ops.cds_dice_loss import cds_dice_loss
from .ops.cosine_mask import cosine_mask
from .ops.fod_loss import fod_loss
from .ops.seg_head import entropy_histogram, plop_thresholds, pseudo_label, seg_head_loss
from .reference import fod_token_weights
from . import attention  # the module (inc.attention.attention is the function): no name shadowing
from .model import Incrementer, IncrementerOutput

__version__ = "0.1.0"

__all__ = [
    "Incrementer",
    "IncrementerOutput",
    "attention",
    "backend",
    "check_labels",
    "reference",
    "cosine_mask",
    "fod_loss",
    "fod_token_weights",
    "cds_dice_loss",
    "seg_head_loss",
    "entropy_histogram",
    "plop_thresholds",
    "pseudo_label",
]
