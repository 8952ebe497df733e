"""Plain-PyTorch references of every op: the spec. Same signatures as the fused ops in `incrementer_fast`."""
from .core import cds_dice_loss, compute_dtype, cosine_mask, dice_from_sums, fod_loss, fod_token_weights
from .mib_head import mib_head_loss
from .seg_head import entropy_histogram, plop_thresholds, pseudo_label, seg_head_loss

__all__ = ["cosine_mask", "fod_loss", "fod_token_weights", "cds_dice_loss", "compute_dtype", "dice_from_sums",
           "seg_head_loss", "mib_head_loss", "entropy_histogram", "plop_thresholds", "pseudo_label"]
