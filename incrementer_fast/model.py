"""The Incrementer network: a timm ViT encoder and Segmenter's mask-transformer decoder with per-step class
tokens, whose masks are cosine similarities computed by an ``incrementer_fast.nn.CosineMask`` (the fused
``cosine_mask`` op).

Architecture (images (B, 3, H, W); p = patch size; h, w = ⌈H/p⌉, ⌈W/p⌉; N = h·w; K = classes so far)::

    images ──pad to multiples of p──▶ ViT (timm, dynamic_img_size) ──drop prefix tokens──▶ (B, N, E)
      ──proj_dec──▶ (B, N, D) ──concat class tokens (K, D)──▶ n_layers pre-norm blocks ──decoder_norm──▶
      patch_embeddings = patches (B, N, D) @ proj_patch
      class_embeddings = classes (B, K, D) @ proj_classes
      masks = cosine_mask(patch_embeddings, class_embeddings) → (B, K, h, w)   (nn.CosineMask, scale γ)

The masks are float32 whatever the embeddings' dtype (float64 for a float64 model; CosineMask's
``min_out_dtype=torch.float32``): under bf16 autocast the embeddings are bf16, and bf16 masks would quantise
logits near ±γ = ±10 to steps of 2^-4 before the loss. The masks are small (B·K·N values, against B·N·D for
every activation of the encoder).

There is no LayerNorm over the class axis of the masks (Segmenter's ``mask_norm``): its statistics would
change every time classes are added, moving the old classes' logits.

Defaults and why
----------------
* ``d_model=None`` → the encoder's width, as Segmenter does (768 for ViT-B); ``n_heads=None`` → d_model/64;
  ``n_layers=2``, ``mlp_ratio=4``, ``dropout=0.1``: Segmenter's mask transformer.
* ``attn_dropout=0.0``: Segmenter also drops attention probabilities with ``dropout``. Ours is 0 because
  the compile-safe xformers path (a custom op) has no dropout (see incrementer_fast/attention.py); the
  projection and MLP dropouts keep the decoder's regularisation.
* ``drop_path_rate=0.0`` (encoder stochastic depth, timm's linear schedule over the blocks). Segmenter's
  ViT-B recipe uses 0.1; the training config sets it.
* ``scale=10.0`` (γ), fixed: cosine logits lie in [−γ, γ]. With γ = 1 the softmax over K classes can
  never become confident (at most e/(e + (K−1)/e) ≈ 0.27 for K = 21), so cosine classifiers multiply by a
  temperature 1/τ; τ = 0.1 (γ = 10) lets the correct class reach p ≈ 0.999 against K = 21 orthogonal
  classes and p ≈ 0.99 against K = 151, without the overconfident, slowly-decaying logits of larger γ.
  A fixed γ also keeps the old classes' logit range identical across steps. ``learnable_scale=True``
  learns log γ (initialised at log ``scale``) as a decoder parameter, like CLIP's logit scale: the
  CosineMask's ``log_scale``, state-dict key ``cosine_mask.log_scale`` (checkpoints that hold it under
  its earlier key, ``log_scale``, load as well).
* ``new_token_init="trunc_normal"``: new tokens ~ normal(0, 0.02) truncated at ±2σ, the scale at which
  Segmenter initialises its class embeddings; ``"background"`` copies the background token (class 0)
  into every new token (MiB's idea: new classes start where background was).

Class tokens and freezing
-------------------------
The class tokens are held per step in ``class_tokens`` (a ParameterList, one (n_t, D) tensor per step).
``add_classes(n)`` appends a step, sets ``requires_grad=False`` on every earlier step's tokens and clears
their ``.grad``. Frozen tokens then never get a ``.grad`` again, and PyTorch's optimisers skip parameters
whose ``.grad`` is None (``zero_grad(set_to_none=False)`` only zeroes existing grads), so they stay
bit-identical through momentum and weight decay, whichever optimiser holds them. The trainer must still
build a NEW optimiser after ``add_classes`` (the new tokens are new parameters), preferably from the
parameters with ``requires_grad`` only: ``encoder_parameters()`` / ``decoder_parameters()`` yield exactly
those (use them as two param groups for different learning rates).
"""
from __future__ import annotations

import copy
import os
import pickle
import sys
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block
from torch import nn

from . import backbones  # noqa: F401  (registers the package's own timm backbones, e.g. vit_demo_patch8)
from ._files import atomic_write
from .attention import Attention, requested_backend
from .checkpoint_loading import architecture_config, check_counts, check_state
from .constants import NEW_TOKEN_INITS
from .errors import CheckpointError
from .nn import CosineMask

CHECKPOINT_FORMAT = "incrementer_fast.Incrementer/1"
TOKEN_STD = 0.02
# State-dict keys written by earlier versions → today's: the learnt log γ was the model's own parameter
# before the masks became a CosineMask submodule.
RENAMED_STATE_KEYS = {"log_scale": "cosine_mask.log_scale"}


class IncrementerOutput(NamedTuple):
    """What ``Incrementer.forward`` returns.

    masks: (B, K, h, w) patch-resolution logits, h, w = ⌈H/p⌉, ⌈W/p⌉ (padded image / patch size); float32
    (float64 for a float64 model), also under bf16/fp16 autocast.
    patch_embeddings: (B, N, D), N = h·w in row-major order, and class_embeddings: (B, K, D): the very
    tensors ``cosine_mask`` compared (FOD distils them).
    image_size: the input's (H, W) before padding; patch_size: p.
    """

    masks: torch.Tensor
    patch_embeddings: torch.Tensor
    class_embeddings: torch.Tensor
    image_size: tuple[int, int]
    patch_size: int

    def upsample(self, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Full-resolution logits (B, K, H, W): bilinear (align_corners=False) to the padded image size,
        cropped back to the input's (H, W) as Segmenter does; then resized to ``size`` if it is given
        and differs."""
        height, width = self.image_size
        padded = (self.masks.shape[-2] * self.patch_size, self.masks.shape[-1] * self.patch_size)
        target = (height, width) if size is None else (int(size[0]), int(size[1]))
        if padded == (height, width):
            return F.interpolate(self.masks, size=target, mode="bilinear", align_corners=False)
        logits = F.interpolate(self.masks, size=padded, mode="bilinear", align_corners=False)
        logits = logits[..., :height, :width]
        if target != (height, width):
            logits = F.interpolate(logits, size=target, mode="bilinear", align_corners=False)
        return logits


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _pretrained_source(backbone: str) -> str:
    """Where timm would fetch ``backbone``'s default pretrained weights from (for error messages)."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        return "no pretrained weights registered"
    return f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or cfg.file or "none")


def _create_encoder(backbone: str, drop_path_rate: float, img_size, pretrained: bool = False) -> nn.Module:
    """A timm ViT whose attention blocks compute through incrementer_fast.attention: random init, or with
    ``pretrained`` timm's own pretrained weights (Hugging Face hub download, then its cache)."""
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        raise ValueError(f"backbone must be a timm model name such as 'vit_tiny_patch16_224', got {backbone!r}")
    kwargs = dict(pretrained=bool(pretrained), num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
    try:
        try:
            encoder = timm.create_model(backbone, attn_layer=Attention, **kwargs)
        except TypeError as error:
            if "attn_layer" not in str(error):
                raise
            # A ViT class without `attn_layer=` (timm < 1.0.23 or another family): build it plainly, then swap.
            encoder = timm.create_model(backbone, **kwargs)
    except TypeError as error:  # e.g. a family without dynamic_img_size (VisionTransformerRelPos)
        raise ValueError(
            f"backbone {backbone!r} cannot be built as a dynamic-size ViT encoder: {error}"
        ) from error
    except OSError as error:  # hub unreachable (offline, HF_HUB_OFFLINE=1) and nothing in the cache
        raise FileNotFoundError(
            f"the pretrained weights of {backbone!r} ({_pretrained_source(backbone)}) are not in the local "
            f"cache and could not be downloaded ({type(error).__name__}: {error}). Either run once with network "
            "access (timm downloads them and caches them under $HF_HOME, by default ~/.cache/huggingface), or "
            "load a local checkpoint with weights=PATH (--weights PATH: timm .pth/.bin, .safetensors or .npz)"
        ) from error
    except RuntimeError as error:  # timm: "No pretrained weights exist for ..."
        if not pretrained:
            raise
        raise ValueError(f"backbone {backbone!r} has no pretrained weights in timm: {error}") from error
    for module in encoder.modules():
        if type(module) is TimmAttention:
            # Attention subclasses timm's without adding state, so re-classing keeps every weight, buffer
            # and flag (qkv, q_norm/k_norm, fused_attn) exactly as timm built them.
            module.__class__ = Attention
    blocks = getattr(encoder, "blocks", None)
    if (
        blocks is None
        or not hasattr(encoder, "patch_embed")
        or not hasattr(encoder, "num_prefix_tokens")
        or not getattr(encoder, "dynamic_img_size", False)
    ):
        raise ValueError(
            f"backbone {backbone!r} ({type(encoder).__name__}) is not a timm ViT with patch_embed, blocks, "
            "num_prefix_tokens and dynamic_img_size"
        )
    attention_types = {type(getattr(block, "attn", None)) for block in blocks}
    foreign = sorted(t.__name__ for t in attention_types if not issubclass(t, Attention))
    if foreign:
        raise ValueError(
            f"backbone {backbone!r} uses attention modules of type {', '.join(foreign)}, which "
            "incrementer_fast cannot route through its attention backends; use a timm VisionTransformer "
            "whose blocks use timm's Attention (e.g. vit_base_patch16_384, deit_small_patch16_224)"
        )
    return encoder


def _load_encoder_weights(encoder: nn.Module, path, backbone: str) -> None:
    """Load a local timm checkpoint (.pth/.pt/.bin, .safetensors, or a JAX .npz) into the encoder.

    The classifier head (``head.*``) is dropped: the encoder has none. Positional embeddings and patch
    embeddings of another grid/patch size are resampled by timm's checkpoint filter. Any other
    difference is a ValueError naming the file and the keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file not found: {path!r}")
    if path.endswith(".npz"):
        if not hasattr(encoder, "load_pretrained"):
            raise ValueError(f"{path!r}: .npz (JAX) weights load only into timm VisionTransformer backbones")
        try:
            encoder.load_pretrained(path)
        except (KeyError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"could not load the .npz checkpoint {path!r} into {backbone!r}: {error}"
            ) from error
        return
    try:
        state = timm.models.load_state_dict(path, weights_only=True)
    except Exception as error:  # unreadable / unpickling blocked / not a checkpoint: all one user error
        raise ValueError(f"could not read encoder weights {path!r}: {error}") from error
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    checkpoint_filter = getattr(sys.modules[type(encoder).__module__], "checkpoint_filter_fn", None)
    if checkpoint_filter is not None:
        try:
            state = checkpoint_filter(state, encoder)
        except Exception as error:
            raise ValueError(
                f"encoder weights {path!r} could not be adapted to {backbone!r}: {error}"
            ) from error
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {path!r} do not match backbone {backbone!r}: "
            f"missing keys [{_short_list(missing)}]; unexpected keys [{_short_list(unexpected)}]"
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(
            f"encoder weights {path!r} do not match backbone {backbone!r}: shapes differ: {_short_list(wrong)}"
        )
    encoder.load_state_dict(state)


class Incrementer(nn.Module):
    """Incrementer for class-incremental semantic segmentation (see the module docstring).

    Args:
        backbone: timm ViT name (``vit_tiny_patch16_224`` for tests, ``vit_base_patch16_384`` paper-scale).
        pretrained: load timm's pretrained weights of ``backbone`` through timm's own mechanism (the Hugging
            Face hub, downloaded once into its cache; offline, the cache alone). A missing download raises
            FileNotFoundError naming both ways to get weights. ``vit_base_patch16_384``'s are the AugReg
            ImageNet-21k weights fine-tuned on ImageNet-1k at 384², the ViT-B/16 of Segmenter and Incrementer.
        num_classes: the first step's class count, background (class 0) included.
        d_model: decoder width (None: the encoder's width). n_layers, n_heads (None: d_model // 64),
            mlp_ratio, dropout, attn_dropout: the decoder's blocks.
        drop_path_rate: the encoder's stochastic depth.
        scale: γ of the cosine masks; learnable_scale: learn log γ (initialised at log ``scale``).
        new_token_init: ``"trunc_normal"`` or ``"background"``, for the tokens ``add_classes`` creates.
        weights: optional local encoder checkpoint (timm .pth/.bin, .safetensors, JAX .npz), loaded as timm
            loads a file (its ``load_state_dict`` and the model's ``checkpoint_filter_fn``, which resamples
            positional embeddings), strictly, with errors naming the file and the keys. Never a download;
            not together with ``pretrained``.
        attention: ``"auto" | "xformers" | "sdpa"`` for every attention block (``"auto"`` defers to
            ``$INCREMENTER_ATTENTION``); see incrementer_fast/attention.py.
        img_size: the encoder's positional-embedding grid (None: the backbone's default). Any input size
            works (dynamic_img_size); this only sets the grid the embeddings are resampled from.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        *,
        d_model: Optional[int] = None,
        n_layers: int = 2,
        n_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        scale: float = 10.0,
        learnable_scale: bool = False,
        new_token_init: str = "trunc_normal",
        pretrained: bool = False,
        weights=None,
        attention: str = "auto",
        img_size=None,
    ) -> None:
        super().__init__()
        _check_count("num_classes", num_classes)
        _check_count("n_layers", n_layers)
        rates = (("dropout", dropout), ("attn_dropout", attn_dropout), ("drop_path_rate", drop_path_rate))
        for name, rate in rates:
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {rate!r}")
        # Built before the encoder, so that it validates scale before the slow part; registered below.
        cosine_mask = CosineMask(scale, learnable_scale=learnable_scale, min_out_dtype=torch.float32)
        if new_token_init not in NEW_TOKEN_INITS:
            raise ValueError(
                f"new_token_init must be one of {', '.join(NEW_TOKEN_INITS)}, got {new_token_init!r}"
            )
        attention = requested_backend(attention)  # validates the name; does not read the environment

        if pretrained and weights is not None:
            raise ValueError(f"give pretrained=True (timm's weights) or weights={weights!r} (a local file), not both")
        self.encoder = _create_encoder(backbone, float(drop_path_rate), img_size, pretrained=bool(pretrained))
        if weights is not None:
            _load_encoder_weights(self.encoder, weights, backbone)
        patch_size = tuple(self.encoder.patch_embed.patch_size)
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"backbone {backbone!r} has non-square patches {patch_size}")
        self.patch_size: int = int(patch_size[0])
        self.in_chans: int = int(self.encoder.patch_embed.proj.in_channels)
        self.data_config: dict = timm.data.resolve_data_config({}, model=self.encoder)

        encoder_dim = int(self.encoder.embed_dim)
        d_model = encoder_dim if d_model is None else d_model
        _check_count("d_model", d_model)
        n_heads = max(1, d_model // 64) if n_heads is None else n_heads
        _check_count("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.new_token_init = new_token_init
        self.config = dict(
            backbone=backbone,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=float(mlp_ratio),
            dropout=float(dropout),
            attn_dropout=float(attn_dropout),
            drop_path_rate=float(drop_path_rate),
            scale=float(scale),
            learnable_scale=bool(learnable_scale),
            new_token_init=new_token_init,
            attention=attention,
            img_size=list(img_size) if isinstance(img_size, (tuple, list)) else img_size,
        )

        self.proj_dec = nn.Linear(encoder_dim, d_model)
        self.class_tokens = nn.ParameterList([nn.Parameter(torch.empty(num_classes, d_model))])
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                n_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=attn_dropout,
                attn_layer=Attention,
                # torch's LayerNorm (eps 1e-5), as Segmenter's blocks; timm's Block defaults to eps 1e-6.
                norm_layer=nn.LayerNorm,
            )
            for _ in range(n_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.proj_patch = nn.Parameter(d_model**-0.5 * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(d_model**-0.5 * torch.randn(d_model, d_model))
        self.cosine_mask = cosine_mask
        self._init_decoder()
        self.set_attention(attention)

    # ----------------------------------------------------------------------------------------- setup
    def _init_decoder(self) -> None:
        """Segmenter's decoder init: trunc-normal(0.02) linear weights, zero biases; tokens by _init_tokens."""
        for module in [self.proj_dec, *self.blocks]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.trunc_normal_(sub.weight, std=0.02)
                    nn.init.zeros_(sub.bias)
        _init_tokens(self.class_tokens[0])

    def set_attention(self, backend: str) -> None:
        """Route every attention block (encoder and decoder) to ``backend``: auto | xformers | sdpa."""
        backend = requested_backend(backend)
        self.config["attention"] = backend
        for module in self.modules():
            if isinstance(module, Attention):
                # None defers to $INCREMENTER_ATTENTION (default auto) at each call.
                module.backend = None if backend == "auto" else backend

    # ------------------------------------------------------------------------------------ properties
    @property
    def classes_per_step(self) -> list[int]:
        return [int(tokens.shape[0]) for tokens in self.class_tokens]

    @property
    def num_classes(self) -> int:
        """Classes seen so far, background included (K)."""
        return sum(self.classes_per_step)

    @property
    def num_old_classes(self) -> int:
        """Classes of the steps before the current one (the frozen tokens), background included."""
        return sum(self.classes_per_step[:-1])

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the backbone's input normalisation, per channel."""
        return tuple(self.data_config["mean"]), tuple(self.data_config["std"])

    @property
    def gamma(self):
        """γ: a Python float, or a 0-dim tensor (exp of the learnt log γ) when learnable."""
        return self.cosine_mask.scale

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's trainable parameters."""
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every other trainable parameter: decoder, current class tokens, learnable γ (not frozen tokens)."""
        return (p for name, p in self.named_parameters() if not name.startswith("encoder.") and p.requires_grad)

    # --------------------------------------------------------------------------------------- forward
    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        shape = tuple(images.shape)
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D (B, {self.in_chans}, H, W), got shape {shape}")
        layout = f"(B, {self.in_chans}, H, W)"
        if shape[1] != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels {layout}, got shape {shape}")
        if shape[0] == 0 or shape[2] == 0 or shape[3] == 0:
            raise ValueError(f"images must be non-empty {layout} with B, H, W ≥ 1, got shape {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype} with shape {shape}")

    def forward(self, images: torch.Tensor) -> IncrementerOutput:
        """images (B, 3, H, W), normalised → IncrementerOutput (masks at patch resolution)."""
        self._check_images(images)
        batch, _, height, width = images.shape
        p = self.patch_size
        pad_h, pad_w = (-height) % p, (-width) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))  # zeros after normalisation, as Segmenter pads
        grid_h, grid_w = (height + pad_h) // p, (width + pad_w) // p

        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens :]
        x = self.proj_dec(tokens)
        classes = torch.cat(list(self.class_tokens), dim=0)
        num_classes = classes.shape[0]
        x = torch.cat([x, classes.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patch_embeddings = x[:, :-num_classes] @ self.proj_patch
        class_embeddings = x[:, -num_classes:] @ self.proj_classes
        # float32 masks (float64 for a float64 model) even from bf16/fp16 embeddings under autocast: logits
        # near ±γ would otherwise be rounded to 2^-4 steps before the CE, the dice and PLOP's entropy.
        masks = self.cosine_mask(patch_embeddings, class_embeddings)
        masks = masks.reshape(batch, num_classes, grid_h, grid_w)
        return IncrementerOutput(masks, patch_embeddings, class_embeddings, (height, width), p)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits (B, K, H, W) for inference."""
        return self(images).upsample()

    # ---------------------------------------------------------------------------- incremental steps
    def add_classes(self, n: int) -> None:
        """Start a new step with ``n`` classes: freeze every existing class token and append ``n`` new ones.

        Build a new optimiser afterwards (the new tokens are new parameters).
        """
        _check_count("n", n)
        for tokens in self.class_tokens:
            tokens.requires_grad_(False)
            tokens.grad = None  # a stale step-0 grad would let weight decay / momentum move the token
        reference = self.class_tokens[0]
        new = torch.empty(n, self.d_model, device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            if self.new_token_init == "background":
                new.copy_(reference[0].expand(n, -1))
            else:
                _init_tokens(new)
        self.class_tokens.append(nn.Parameter(new))

    def frozen_copy(self) -> "Incrementer":
        """An independent copy for distillation: eval mode, no parameter requires grad, no .grad."""
        teacher = copy.deepcopy(self)
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        return teacher

    # ----------------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the submodules load theirs: the keys of earlier versions are renamed in time.
        _rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save(self, path) -> None:
        """Write architecture options, classes per step and weights to ``path`` atomically
        (a temporary file in the same folder, then os.replace).

        Raises ValueError (naming the weights) for non-finite weights, which :meth:`from_checkpoint` would
        refuse, and OSError with the errno and ``path`` for a write the OS refuses (a full disk, a
        read-only folder); no partial file is left either way."""
        path = os.fspath(path)
        bad = [name for name, value in self.state_dict().items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            raise ValueError(f"refusing to save {path}: non-finite weights in {_short_list(bad)}")
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": dict(self.config),
            "classes_per_step": self.classes_per_step,
            "state_dict": self.state_dict(),
        }
        writer = None
        try:
            with atomic_write(path, durable=True) as file:
                writer = _WriteErrorRecorder(file)
                torch.save(checkpoint, writer)
        except BaseException as error:
            # torch.save reports a refused write as a RuntimeError without the OS's reason: give it back,
            # with the checkpoint's path (not the temporary file's).
            cause = writer.error if writer is not None and writer.error is not None else error
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, path) from error
            raise

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", attention: Optional[str] = None,
                        expect: Optional[Mapping] = None) -> "Incrementer":
        """Rebuild a model saved by :meth:`save` (same options and steps; ``attention`` overrides the
        saved backend choice). Calling ``add_classes`` on it continues with the next step.

        Args:
            path: the checkpoint file.
            map_location: where the weights go (as ``torch.load``'s).
            attention: ``"auto" | "xformers" | "sdpa"`` instead of the saved choice.
            expect: constructor arguments the checkpoint must have been built with (``backbone``,
                ``d_model``, ``n_layers``, ... with the constructor's meaning of None: ``d_model=None`` is
                the encoder's width), and optionally ``classes_per_step``. Every differing field is named.

        Returns:
            The model, on ``map_location``.

        Raises:
            FileNotFoundError: no file at ``path``.
            CheckpointError (a ValueError): the file cannot be read (empty, truncated, another format,
                objects other than tensors), its weights do not fit its own architecture or are not
                finite, or it differs from ``expect``; the message names the file and the fields.

        Examples:
            >>> model = Incrementer.from_checkpoint("run/step_0.pt", expect={"n_layers": 2})
        """
        path = os.fspath(path)
        checkpoint = read_checkpoint(path)  # memory-mapped: nothing allocated yet
        if expect is not None:
            differences = _architecture_differences(checkpoint, expect)
            if differences:
                raise CheckpointError(f"checkpoint {path} does not fit: {'; '.join(differences)}")
        # Bounded loading (incrementer_fast.checkpoint_loading): only architecture fields reach the
        # constructor, and every count, name, shape and dtype is checked before the model is allocated.
        config = architecture_config(checkpoint["config"], path)
        if attention is not None:
            config["attention"] = attention
        steps = list(checkpoint["classes_per_step"])
        state = dict(checkpoint["state_dict"])
        _rename_legacy_keys(state)
        check_counts(config, steps, state, path)
        with torch.device("meta"):
            blueprint = cls._from_config(config, steps, path)
        check_state(blueprint.state_dict(), state, path)
        model = cls._from_config(config, steps, path)
        _load_weights(model, state, path)
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return model

    @classmethod
    def _from_config(cls, config: Mapping, steps: Sequence[int], path: str) -> "Incrementer":
        """The model of a checked checkpoint config and its classes per step (on the current default device:
        ``meta`` for the blueprint ``from_checkpoint`` checks the weights against)."""
        options = dict(config)
        try:
            model = cls(options.pop("backbone"), steps[0], **options)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path}: its model cannot be built here: {error}") from error
        for n in steps[1:]:
            model.add_classes(n)
        return model


def read_checkpoint(path, map_location="cpu") -> dict:
    """The contents of an Incrementer checkpoint (``format``, ``config``, ``classes_per_step``,
    ``state_dict``), loaded with ``weights_only=True`` (nothing in the file can run code).

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError naming the file and the
    cause) for one that cannot be read or is not an Incrementer checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a write that never finished?)")
    try:
        try:  # memory-mapped: tensors are read from disk when used, not allocated at load
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)  # a legacy format
    except Exception as error:  # every reader failure of this one file is the same user error
        raise CheckpointError(f"checkpoint {path} cannot be read: {_load_failure(error)}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = (f"format {checkpoint.get('format')!r}" if isinstance(checkpoint, dict) and "format" in checkpoint
                 else f"a {type(checkpoint).__name__}" + (f" with keys {_short_list(sorted(map(str, checkpoint)))}"
                                                          if isinstance(checkpoint, dict) else ""))
        raise CheckpointError(f"checkpoint {path} is not an Incrementer checkpoint written by Incrementer.save "
                              f"(found {found}; expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("config", "classes_per_step", "state_dict") if k not in checkpoint]
    steps = checkpoint.get("classes_per_step")
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if (not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["state_dict"], dict)
            or not isinstance(steps, (list, tuple)) or not steps
            or not all(isinstance(n, int) and n > 0 for n in steps)):
        raise CheckpointError(f"checkpoint {path} has a malformed config, state_dict or classes_per_step "
                              f"({steps!r})")
    return checkpoint


def _load_failure(error: Exception) -> str:
    """Why torch.load failed, in a few words (torch's own messages span paragraphs and, for a refused
    pickle, advise weights_only=False: never the right advice for a checkpoint of ours)."""
    text = str(error)
    if isinstance(error, EOFError):
        return "it ends early (truncated)"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "it is truncated or corrupt (not a complete torch zip archive)"
    if isinstance(error, pickle.UnpicklingError):
        return ("it is not a torch checkpoint of tensors (another format, random bytes, or objects that "
                "weights-only loading refuses)")
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first_line}"[:200]


def _architecture_differences(checkpoint: dict, expect: Mapping) -> list[str]:
    """``field: file X, expected Y`` for each field of ``expect`` the checkpoint differs in."""
    config = checkpoint["config"]
    projection = checkpoint["state_dict"].get("proj_dec.weight")
    encoder_width = int(projection.shape[1]) if isinstance(projection, torch.Tensor) else None
    d_model = expect.get("d_model", config.get("d_model"))
    if d_model is None:
        d_model = encoder_width
    differences = []
    for name, wanted in expect.items():
        if name == "classes_per_step":
            have, wanted = list(checkpoint["classes_per_step"]), list(wanted)
        elif name not in config:
            differences.append(f"{name}: not in the file, expected {wanted!r}")
            continue
        else:
            have = config[name]
            if name == "d_model" and wanted is None:
                wanted = encoder_width
            elif name == "n_heads" and wanted is None:
                wanted = None if d_model is None else max(1, d_model // 64)
            elif isinstance(wanted, tuple):
                wanted = list(wanted)
        if have != wanted:
            differences.append(f"{name}: file {have!r}, expected {wanted!r}")
    return differences


def _load_weights(model: nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state)`` for a state dict ``check_state`` has checked against the model's
    architecture; CheckpointError naming the non-finite weights, if any."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({_short_list(bad)}): it cannot be "
                              "used; delete it to train that step again")
    model.load_state_dict(state)


class _WriteErrorRecorder:
    """A file wrapper for ``torch.save`` that keeps the OSError of a failed write (torch.save replaces it
    with a RuntimeError that has lost the errno)."""

    def __init__(self, file):
        self.file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self.error = error
            raise


def _rename_legacy_keys(state: dict, prefix: str = "") -> None:
    """Rename, in place, the keys under ``prefix`` that ``RENAMED_STATE_KEYS`` maps to today's."""
    for old, new in RENAMED_STATE_KEYS.items():
        if prefix + old in state:
            state[prefix + new] = state.pop(prefix + old)


def _init_tokens(tokens: torch.Tensor) -> None:
    """Normal(0, 0.02) truncated at ±2σ. (timm's and torch's trunc_normal_ truncate at ±2 in absolute
    units, which for std 0.02 is no truncation at all.)"""
    nn.init.trunc_normal_(tokens, std=TOKEN_STD, a=-2 * TOKEN_STD, b=2 * TOKEN_STD)


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


__all__ = ["Incrementer", "IncrementerOutput", "read_checkpoint"]
