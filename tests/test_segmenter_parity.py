"""The decoder is Segmenter's mask transformer: an independent transcription of Segmenter's decoder and of
its forward wrapper, fed our weights, computes our masks, patch and class embeddings in float64.

Transcribed (not imported: Segmenter is not a dependency) from rstrudel/segmenter, MIT licence,
Copyright (c) 2021 Robin Strudel: ``segm/model/decoder.py`` (``MaskTransformer.forward``),
``segm/model/blocks.py`` (``Block``, ``Attention``, ``FeedForward``), ``segm/model/segmenter.py``
(``Segmenter.forward``: pad to the patch size, drop the CLS token, decode, bilinear upsampling to the
padded size, crop back) and ``segm/model/utils.py`` (``padding``, ``unpadding``). ``einops.rearrange``
is written as reshape/transpose.

The documented departures of incrementer_fast.model are the only switches of the transcription:
``mask_norm`` (Segmenter's LayerNorm over the classes; ours has none, its statistics would change at
every step), the cosine scale γ (ours multiplies the cosines by γ; Segmenter's are unscaled before
``mask_norm``), and the dropout of the attention probabilities (ours 0; both are identities in eval
mode, where this comparison runs). Segmenter's vector norm has no eps clamp; ours clamps at 1e-8, which
is inactive for these non-zero embeddings.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import incrementer_fast as inc

GAMMA = 10.0


# ----------------------------------------------------------------------------- the transcription
def _layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm["weight"], norm["bias"], eps=1e-5)  # nn.LayerNorm default


def _linear(x, layer):
    return x @ layer["weight"].T + layer["bias"]


def segmenter_attention(x, attn, heads):
    """blocks.py Attention.forward (eval: attn_drop and proj_drop are identities)."""
    B, N, C = x.shape
    qkv = _linear(x, attn["qkv"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (C // heads) ** -0.5
    weights = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return _linear(y, attn["proj"])


def segmenter_block(x, block, heads):
    """blocks.py Block.forward (drop_path: the decoder's is 0 in Segmenter's config, an identity)."""
    x = x + segmenter_attention(_layer_norm(x, block["norm1"]), block["attn"], heads)
    hidden = F.gelu(_linear(_layer_norm(x, block["norm2"]), block["fc1"]))  # nn.GELU(), exact erf form
    return x + _linear(hidden, block["fc2"])


def segmenter_mask_transformer(x, weights, grid_size, heads, mask_norm=None):
    """decoder.py MaskTransformer.forward on encoder patch tokens x (B, N, d_encoder); returns the masks
    (B, n_cls, GS_h, GS_w) and, for the comparison, the projected patch and class embeddings."""
    n_cls = weights["cls_emb"].shape[1]
    x = _linear(x, weights["proj_dec"])
    cls_emb = weights["cls_emb"].expand(x.size(0), -1, -1)
    x = torch.cat((x, cls_emb), 1)
    for block in weights["blocks"]:
        x = segmenter_block(x, block, heads)
    x = _layer_norm(x, weights["decoder_norm"])
    patches, cls_seg_feat = x[:, :-n_cls], x[:, -n_cls:]
    patches = patches @ weights["proj_patch"]
    cls_seg_feat = cls_seg_feat @ weights["proj_classes"]
    patch_embeddings, class_embeddings = patches, cls_seg_feat
    patches = patches / patches.norm(dim=-1, keepdim=True)
    cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
    masks = patches @ cls_seg_feat.transpose(1, 2)
    if mask_norm is not None:
        masks = _layer_norm(masks, mask_norm)
    masks = masks.transpose(1, 2).reshape(masks.shape[0], n_cls, grid_size[0], grid_size[1])  # b (h w) n -> b n h w
    return masks, patch_embeddings, class_embeddings


def segmenter_forward(images, encoder_features, weights, patch_size, heads, num_extra_tokens):
    """segmenter.py Segmenter.forward, the encoder's output given (our encoder computes it)."""
    H_ori, W_ori = images.size(2), images.size(3)
    pad_h = (patch_size - H_ori % patch_size) % patch_size  # utils.padding
    pad_w = (patch_size - W_ori % patch_size) % patch_size
    H, W = H_ori + pad_h, W_ori + pad_w
    x = encoder_features[:, num_extra_tokens:]
    masks, patch_embeddings, class_embeddings = segmenter_mask_transformer(
        x, weights, (H // patch_size, W // patch_size), heads)
    logits = F.interpolate(masks, size=(H, W), mode="bilinear")  # align_corners defaults to False
    logits = logits[:, :, :H_ori, :W_ori]  # utils.unpadding
    return masks, logits, patch_embeddings, class_embeddings


# ----------------------------------------------------------------------------- our weights, mapped
def segmenter_weights(model):
    """Our decoder's parameters under Segmenter's names (MaskTransformer's state, as nested dicts)."""
    def linear(module):
        return {"weight": module.weight, "bias": module.bias}

    return {
        "proj_dec": linear(model.proj_dec),
        "cls_emb": torch.cat(list(model.class_tokens), 0).unsqueeze(0),
        "blocks": [{"norm1": linear(b.norm1), "attn": {"qkv": linear(b.attn.qkv), "proj": linear(b.attn.proj)},
                    "norm2": linear(b.norm2), "fc1": linear(b.mlp.fc1), "fc2": linear(b.mlp.fc2)}
                   for b in model.blocks],
        "decoder_norm": linear(model.decoder_norm),
        "proj_patch": model.proj_patch,
        "proj_classes": model.proj_classes,
    }


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("height,width,steps", [(32, 24, [4]), (29, 19, [3, 2])])
def test_decoder_computes_what_segmenters_mask_transformer_computes(height, width, steps):
    torch.manual_seed(0)
    model = inc.Incrementer("test_vit", steps[0], d_model=128, scale=GAMMA, attention="sdpa")
    for n in steps[1:]:
        model.add_classes(n)
    with torch.no_grad():  # random, non-degenerate tokens and norms (the inits are near-constant)
        for tokens in model.class_tokens:
            tokens.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    model = model.double().eval()
    assert model.config["n_heads"] == 128 // 64  # Segmenter: n_heads = d_model // 64

    features = {}
    model.encoder.norm.register_forward_hook(lambda module, args, output: features.setdefault("x", output))
    images = torch.randn(2, 3, height, width, dtype=torch.float64)
    with torch.no_grad():
        out = model(images)
        logits = out.upsample()
        masks, seg_logits, patch_embeddings, class_embeddings = segmenter_forward(
            images, features["x"], segmenter_weights(model), model.patch_size, model.config["n_heads"],
            model.encoder.num_prefix_tokens)

    assert out.masks.dtype == torch.float64 and out.masks.shape == masks.shape
    assert rel(out.patch_embeddings, patch_embeddings) < 1e-12
    assert rel(out.class_embeddings, class_embeddings) < 1e-12
    assert rel(out.masks, GAMMA * masks) < 1e-12
    assert rel(logits, GAMMA * seg_logits) < 1e-12
    assert logits.shape[-2:] == (height, width)

    # The one architectural departure, shown: Segmenter's mask_norm (identity-initialised LayerNorm over
    # the classes) changes the masks, and would again whenever classes are added.
    identity_norm = {"weight": torch.ones(model.num_classes, dtype=torch.float64),
                     "bias": torch.zeros(model.num_classes, dtype=torch.float64)}
    with torch.no_grad():
        normed, *_ = segmenter_mask_transformer(
            features["x"][:, model.encoder.num_prefix_tokens:], segmenter_weights(model),
            out.masks.shape[-2:], model.config["n_heads"], mask_norm=identity_norm)
    assert rel(normed, masks) > 0.1
    assert math.isfinite(rel(normed, masks))
