"""inc.Incrementer: shapes and padding, class steps and freezing, the frozen teacher, checkpoints, local
encoder weights, parity of the encoder with timm's own attention, torch.compile, input validation.

Tiny on purpose: vit_tiny_patch16_224 (12 blocks, width 192) where the backbone itself is under test
(shapes, weights, parity with timm); timm's `test_vit` (6 blocks, width 64, patch 16) for the tests that
train or compile; d_model 64; images of a few patches.
"""
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from timm.layers import Attention as TimmAttention

import incrementer_fast as inc
from incrementer_fast.attention import ENV_VAR, XFORMERS_INSTALLED, Attention

BACKBONE = "vit_tiny_patch16_224"
SMALL_BACKBONE = "test_vit"


Incrementer = inc.Incrementer


def tiny(num_classes=5, backbone=BACKBONE, **options):
    options.setdefault("d_model", 64)
    return Incrementer(backbone, num_classes, **options)


def batch(height=32, width=32, size=2, num_classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, height, width, generator=generator)
    labels = torch.randint(0, num_classes, (size, height, width), generator=generator)
    return images, labels


def training_loss(output, labels):
    return F.cross_entropy(output.upsample(), labels) + output.patch_embeddings.square().mean()


@pytest.fixture(autouse=True)
def _default_attention(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("height,width", [(32, 32), (48, 40), (17, 33), (16, 16)])
def test_output_shapes(height, width):
    torch.manual_seed(0)
    model = tiny(5)
    images, _ = batch(height, width)
    out = model(images)
    grid_h, grid_w = -(-height // 16), -(-width // 16)
    assert model.patch_size == 16
    assert out.masks.shape == (2, 5, grid_h, grid_w)
    assert out.patch_embeddings.shape == (2, grid_h * grid_w, 64)  # prefix (cls) token dropped
    assert out.class_embeddings.shape == (2, 5, 64)
    assert out.upsample().shape == (2, 5, height, width)
    assert out.upsample(size=(20, 24)).shape == (2, 5, 20, 24)
    model.eval()
    assert torch.equal(model.logits(images), model(images).upsample())


def test_non_multiple_input_is_padded_and_cropped_back():
    torch.manual_seed(0)
    model = tiny(4).eval()
    images, _ = batch(40, 56)
    padded = F.pad(images, (0, 8, 0, 8))  # to 48 × 64, zeros as the model pads
    out, out_padded = model(images), model(padded)
    torch.testing.assert_close(out.masks, out_padded.masks, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.upsample(), out_padded.upsample()[..., :40, :56], rtol=0, atol=1e-6)


def test_masks_are_scaled_cosines_of_the_returned_embeddings():
    torch.manual_seed(0)
    model = tiny(6, scale=7.5)
    out = model(batch(32, 48)[0])
    patches, classes = out.patch_embeddings.double(), out.class_embeddings.double()
    expected = inc.reference.cosine_mask(patches, classes, scale=7.5)
    assert_close_rel(out.masks.flatten(2), expected, torch.float32, "masks")
    assert out.masks.abs().max() <= 7.5 + 1e-4


def test_add_classes_counts_and_token_init():
    torch.manual_seed(0)
    model = tiny(5, new_token_init="background")
    assert (model.num_classes, model.classes_per_step, model.num_old_classes) == (5, [5], 0)
    model.add_classes(3)
    model.add_classes(1)
    assert (model.num_classes, model.classes_per_step, model.num_old_classes) == (9, [5, 3, 1], 8)
    assert [t.requires_grad for t in model.class_tokens] == [False, False, True]
    background = model.class_tokens[0][0]
    assert torch.equal(model.class_tokens[1], background.expand(3, -1))
    assert model(batch()[0]).masks.shape[1] == 9
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.add_classes(0)

    model = tiny(5)  # trunc-normal(0.02) tokens
    model.add_classes(4)
    assert 0.0 < model.class_tokens[1].std() < 0.05
    assert model.class_tokens[1].abs().max() <= 0.04  # truncated at two standard deviations


def test_old_tokens_stay_bit_identical_through_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = tiny(4, SMALL_BACKBONE, dropout=0.0)
    images, labels = batch(num_classes=4)
    # Step 0 trains every token, so the optimiser holds momentum buffers for them.
    stale = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        stale.zero_grad()
        training_loss(model(images), labels).backward()
        stale.step()

    assert model.class_tokens[0].grad is not None  # the last step-0 grad is still there ...
    model.add_classes(2)
    assert model.class_tokens[0].grad is None  # ... and add_classes clears it
    model.add_classes(3)
    images, labels = batch(num_classes=9, seed=1)
    old = [t.detach().clone() for t in model.class_tokens[:2]]
    new = model.class_tokens[2].detach().clone()
    trainable = [*model.encoder_parameters(), *model.decoder_parameters()]
    assert all(p.requires_grad for p in trainable)
    assert not any(p is t for p in trainable for t in model.class_tokens[:2])
    # Even an optimiser built from ALL parameters, and the stale one with momentum, must not move them.
    careless = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        careless.zero_grad(set_to_none=False)
        stale.zero_grad(set_to_none=False)
        training_loss(model(images), labels).backward()
        assert model.class_tokens[0].grad is None and model.class_tokens[1].grad is None
        careless.step()
        stale.step()
    for before, tokens in zip(old, model.class_tokens[:2]):
        assert torch.equal(before, tokens)
    assert not torch.equal(new, model.class_tokens[2])


def test_frozen_copy_is_a_still_teacher():
    torch.manual_seed(0)
    model = tiny(4, SMALL_BACKBONE)
    model.add_classes(2)
    images, labels = batch(num_classes=6)
    teacher = model.frozen_copy()
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert model.training and any(p.requires_grad for p in model.parameters())
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = teacher(images)
    assert not before.masks.requires_grad

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        training_loss(model(images), labels).backward()
        optimizer.step()
    assert not torch.equal(model.proj_patch, teacher.proj_patch)  # the live model did move
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert torch.equal(teacher(images).masks, before.masks)


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(learnable_scale=True, new_token_init="background", attention="sdpa", img_size=64, n_layers=1),
    ],
)
def test_checkpoint_round_trip(tmp_path, options):
    torch.manual_seed(0)
    model = tiny(5, SMALL_BACKBONE, **options)
    model.add_classes(2)
    path = tmp_path / "step1.pt"
    model.save(path)
    model.save(path)  # overwriting is atomic too
    assert os.listdir(tmp_path) == ["step1.pt"]  # no temporary file left behind

    loaded = Incrementer.from_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.classes_per_step == [5, 2]
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()
    }
    images, _ = batch(48, 40)
    model.eval()
    loaded.eval()
    expected, actual = model(images), loaded(images)
    for name in ("masks", "patch_embeddings", "class_embeddings"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name

    loaded.add_classes(3)  # continue with step 2
    assert loaded.classes_per_step == [5, 2, 3] and loaded.num_old_classes == 7
    loaded.save(tmp_path / "step2.pt")
    again = Incrementer.from_checkpoint(tmp_path / "step2.pt", attention="sdpa")
    assert again.classes_per_step == [5, 2, 3]
    again.eval()
    assert torch.equal(again(images).masks, loaded(images).masks)


def test_masks_come_from_the_cosine_mask_submodule_at_least_float32():
    torch.manual_seed(0)
    model = tiny(4, SMALL_BACKBONE, scale=7.5, n_layers=1).eval()
    assert isinstance(model.cosine_mask, inc.nn.CosineMask)
    assert model.cosine_mask.initial_scale == 7.5 and model.cosine_mask.min_out_dtype == torch.float32
    calls = []
    handle = model.cosine_mask.register_forward_hook(lambda module, inputs, output: calls.append(output))
    try:
        out = model(batch(32, 48)[0])
    finally:
        handle.remove()
    assert len(calls) == 1 and torch.equal(calls[0].reshape(out.masks.shape), out.masks)
    # A float64 model keeps float64 masks: "at least float32", not a fixed float32.
    model.double()
    assert model(batch(32, 48)[0].double()).masks.dtype == torch.float64


def test_checkpoint_with_the_earlier_key_of_the_learnt_scale_loads(tmp_path):
    """Before the masks were an inc.nn.CosineMask submodule, the learnt log γ was the model's own parameter
    ``log_scale``: such checkpoints load, through from_checkpoint and load_state_dict."""
    torch.manual_seed(0)
    model = tiny(4, SMALL_BACKBONE, learnable_scale=True, n_layers=1)
    with torch.no_grad():
        model.cosine_mask.log_scale.fill_(2.0)
    model.add_classes(2)
    assert "cosine_mask.log_scale" in model.state_dict() and "log_scale" not in model.state_dict()
    assert not any("log_scale" in key for key in tiny(4, SMALL_BACKBONE, n_layers=1).state_dict())
    model.save(tmp_path / "today.pt")
    checkpoint = torch.load(tmp_path / "today.pt", weights_only=True)
    state = checkpoint["state_dict"]
    state["log_scale"] = state.pop("cosine_mask.log_scale")  # the earlier layout
    torch.save(checkpoint, tmp_path / "earlier.pt")

    loaded = Incrementer.from_checkpoint(tmp_path / "earlier.pt")
    assert loaded.gamma.detach().item() == pytest.approx(math.exp(2.0))
    images, _ = batch(48, 40)
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(images).masks, model(images).masks)
    fresh = tiny(4, SMALL_BACKBONE, learnable_scale=True, n_layers=1)
    fresh.add_classes(2)
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.cosine_mask.log_scale, model.cosine_mask.log_scale)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        Incrementer.from_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an Incrementer checkpoint"):
        Incrementer.from_checkpoint(tmp_path / "other.pt")


def test_encoder_weights_from_local_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    state = source.state_dict()
    torch.save({"model": state}, tmp_path / "vit.pth")  # wrapped, as training scripts save
    save_file(state, tmp_path / "vit.safetensors")
    for name in ("vit.pth", "vit.safetensors"):
        model = tiny(weights=tmp_path / name)
        for key, value in model.encoder.state_dict().items():
            assert torch.equal(value, state[key]), key
    resampled = tiny(weights=tmp_path / "vit.pth", img_size=64)  # 14×14 positional grid resampled to 4×4
    assert resampled.encoder.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(resampled.encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_encoder_weights_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny(weights=missing)

    other = timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict()  # width 64, 6 blocks
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*missing keys \[blocks\.6\."):
        tiny(weights=tmp_path / "other.pth")

    state = timm.create_model(BACKBONE, pretrained=False, num_classes=0).state_dict()
    del state["blocks.3.mlp.fc1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*blocks\.3\.mlp\.fc1\.weight"):
        tiny(weights=tmp_path / "partial.pth")

    state = timm.create_model(BACKBONE, pretrained=False, num_classes=0).state_dict()
    state["norm.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "shape.pth")
    message = r"shape\.pth.*shapes differ: norm\.weight: file \(7,\) vs model \(192,\)"
    with pytest.raises(ValueError, match=message):
        tiny(weights=tmp_path / "shape.pth")

    np.savez(tmp_path / "jax.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match=r"jax\.npz"):
        tiny(weights=tmp_path / "jax.npz")


def test_encoder_matches_timm_with_its_own_attention():
    torch.manual_seed(0)
    model = tiny(3).eval()
    assert all(type(block.attn) is Attention for block in model.encoder.blocks)
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    plain.load_state_dict(model.encoder.state_dict())
    for block in plain.blocks:
        assert type(block.attn) is TimmAttention
        block.attn.fused_attn = False  # timm's explicit softmax(qkᵀ)v: independent of any SDPA kernel
    images, _ = batch(48, 32)
    with torch.no_grad():
        ours, theirs = model.encoder.forward_features(images), plain.forward_features(images)
    assert_close_rel(ours, theirs, torch.float32, "encoder")


def test_compiled_forward_and_backward_match_eager():
    # The 6-block test ViT: tracing cost grows with depth. aot_eager: Dynamo (fullgraph=True
    # fails on any graph break) + AOTAutograd (forward and backward graphs, the custom ops' fake kernels)
    # without inductor's C++ build, which alone takes minutes on two shared cores. Learnable γ and a
    # padded input exercise the tensor-scale and padding paths.
    torch.manual_seed(0)
    model = Incrementer(SMALL_BACKBONE, 4, dropout=0.0, learnable_scale=True, n_layers=1)
    model.add_classes(2)
    images, labels = batch(40, 56, num_classes=6)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(forward):
        out = forward(images)
        return (out.masks, *torch.autograd.grad(training_loss(out, labels), params))

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for index, (a, b) in enumerate(zip(compiled, eager)):
        assert_close_rel(a, b, torch.float32, "masks" if index == 0 else f"grad {index}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_compiled_training_step_on_cuda(attention):
    if attention == "xformers" and not XFORMERS_INSTALLED:
        pytest.skip("xformers is not installed")
    torch.manual_seed(0)
    model = tiny(4, dropout=0.0, attention=attention).cuda()
    model.add_classes(2)
    images, labels = (t.cuda() for t in batch(64, 80, num_classes=6))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(forward):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(images)
            loss = training_loss(out, labels)
        return (out.masks.float(), *torch.autograd.grad(loss, params))

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for index, (a, b) in enumerate(zip(compiled, eager)):
        assert_close_rel(a, b, torch.bfloat16, "masks" if index == 0 else f"grad {index}")


def test_bad_images_are_value_errors():
    model = tiny(3)
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 4, 32, 32\)"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"4-D.*\(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"non-empty.*\(0, 3, 32, 32\)"):
        model(torch.randn(0, 3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="timm model name"):
        Incrementer("not_a_vit", 3)
    with pytest.raises(ValueError, match="EvaAttention"):
        Incrementer("eva02_tiny_patch14_224", 3)  # a ViT whose blocks are not timm's Attention
    with pytest.raises(ValueError, match="dynamic-size"):
        Incrementer("test_vit_relpos", 3)  # no dynamic_img_size
    with pytest.raises(ValueError, match="new_token_init"):
        tiny(new_token_init="zeros")
    with pytest.raises(ValueError, match="attention backend"):
        tiny(attention="flash")
    with pytest.raises(ValueError, match="num_classes"):
        tiny(0)
    with pytest.raises(ValueError, match="scale"):
        tiny(scale=0.0)
    with pytest.raises(ValueError, match="divisible"):
        tiny(d_model=96, n_heads=5)


def test_attention_option_and_environment(monkeypatch):
    torch.manual_seed(0)
    model = tiny(3, attention="xformers")
    images, _ = batch()
    with pytest.raises(RuntimeError, match="no CPU operator"):
        model(images)
    model.set_attention("auto")
    assert model(images).masks.shape == (2, 3, 2, 2)
    monkeypatch.setenv(ENV_VAR, "xformers")  # "auto" defers to the environment
    with pytest.raises(RuntimeError, match="no CPU operator"):
        model(images)
    model.set_attention("sdpa")  # an explicit option wins over the environment
    assert model(images).masks.shape == (2, 3, 2, 2)


def test_parameter_groups_drop_path_and_normalization():
    model = tiny(4, drop_path_rate=0.1, learnable_scale=True)
    model.add_classes(2)
    encoder = list(model.encoder_parameters())
    decoder = list(model.decoder_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(encoder) + len(decoder) == len(trainable)
    assert {id(p) for p in encoder} | {id(p) for p in decoder} == {id(p) for p in trainable}
    assert any(p is model.cosine_mask.log_scale for p in decoder) and any(p is model.class_tokens[1] for p in decoder)
    assert model.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm's linear schedule
    assert model.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert isinstance(model.gamma, torch.Tensor) and model.gamma.item() == pytest.approx(10.0)
    assert tiny(3).gamma == 10.0
