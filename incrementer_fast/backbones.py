"""The package's own timm backbones, registered with timm when this module is imported.

``incrementer_fast.model`` imports this module, so every name here is known to ``timm.create_model`` (and to
``Incrementer`` / ``Incrementer.from_checkpoint``) as soon as ``incrementer_fast`` is imported, in any
process: a checkpoint of a run that used one of them loads without importing the training pipeline.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = ["DEMO_BACKBONE"]

DEMO_BACKBONE = "vit_demo_patch8"


@register_model
def vit_demo_patch8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A plain timm VisionTransformer of ViT-Tiny's width (192, 3 heads, MLP 4×) with 4 blocks and 8-pixel
    patches, for the CPU demo.

    Why not ``vit_tiny_patch16_224``: trained from scratch on the synthetic set on a CPU, its 16-pixel
    patches leave a 6 × 6 grid on 96² images and 12 blocks learn slowly with SGD — after 4 epochs of step 0
    it reached 12.7% mIoU (background only, in effect), where this backbone on 64² images (8 × 8 patches)
    reached 38-43% in the same CPU time (notes in the README). The demo now starts it from weights pretrained
    for it on synthetic classes disjoint from the demo's (``DEMO_ENCODER_WEIGHTS``,
    scripts/pretrain_demo_encoder.py).
    """
    if pretrained:
        raise ValueError(f"{DEMO_BACKBONE} has no weights in timm; the demo's pretrained encoder is a local file: "
                         "weights=incrementer_fast.continual.config.DEMO_ENCODER_WEIGHTS (what the demo preset uses)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm's factory passes these; a bare VisionTransformer takes none
    options = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0)
    options.update(kwargs)
    return VisionTransformer(**options)
