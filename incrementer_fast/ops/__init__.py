"""The ops: each one dispatches, before the autograd boundary, to its plain-PyTorch reference
(``incrementer_fast.reference``) or to its Triton kernels registered as ``torch.library`` custom ops in the
namespace ``incrementer_fast``. Same signatures as the references."""
from .cds_dice_loss import cds_dice_loss
from .cosine_mask import cosine_mask
from .fod_loss import fod_loss
from .mib_head_loss import mib_head_loss
from .seg_head import entropy_histogram, plop_thresholds, pseudo_label, seg_head_loss

__all__ = ["cosine_mask", "fod_loss", "cds_dice_loss", "seg_head_loss", "mib_head_loss", "entropy_histogram", "plop_thresholds",
           "pseudo_label"]
