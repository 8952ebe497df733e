"""incrementer_fast: a fast, kernel-backed training backend for Incrementer (CVPR 2023).

Fused ops (Triton on CUDA, the reference on CPU, the kernels through Triton's interpreter on CPU when
TRITON_INTERPRET=1 is set before import; ``use_backend`` picks either for a block), the Incrementer model and
a class-incremental pipeline.

Importing the package loads only torch, triton and the ops: the model (``Incrementer``, which needs timm),
``attention`` and the ``continual`` pipeline are imported on first use.
"""
import importlib
from typing import TYPE_CHECKING

from . import reference
from ._checks import check_labels
from ._dispatch import backend, use_backend
from .ops.cds_dice_loss import cds_dice_loss
from .ops.cosine_mask import cosine_mask
from .ops.fod_loss import fod_loss
from .ops.mib_head_loss import mib_head_loss
from .ops.seg_head import entropy_histogram, plop_thresholds, pseudo_label, seg_head_loss
from .reference import fod_token_weights

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from . import attention, continual, nn
    from .model import Incrementer, IncrementerOutput

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself), imported by __getattr__ on first access.
_LAZY = {
    "Incrementer": (".model", "Incrementer"),
    "IncrementerOutput": (".model", "IncrementerOutput"),
    "attention": (".attention", None),  # the module (inc.attention.attention is the function)
    "continual": (".continual", None),
    "nn": (".nn", None),
}

__all__ = [
    "Incrementer",
    "IncrementerOutput",
    "attention",
    "backend",
    "check_labels",
    "continual",
    "nn",
    "reference",
    "use_backend",
    "cosine_mask",
    "fod_loss",
    "fod_token_weights",
    "cds_dice_loss",
    "seg_head_loss",
    "mib_head_loss",
    "entropy_histogram",
    "plop_thresholds",
    "pseudo_label",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
