"""The three core ops in one training-like function: compiled with fullgraph=True, it matches eager.

This is the way the model and the trainer use them: masks from cosine_mask feed the CDS dice loss, and the
same embeddings are distilled by fod_loss against a detached teacher. Runs on the reference path and, with
TRITON_INTERPRET=1, on the kernels through the interpreter.
"""
import pytest
import torch

import incrementer_fast as inc
from helpers import ZeroFills, assert_close_rel


def _step(patches, classes, scale, teacher_patches, teacher_classes, labels, num_old, patch_size):
    b, n, _ = patches.shape
    side = int(n**0.5)
    masks = inc.cosine_mask(patches, classes, scale=scale).view(b, classes.shape[1], side, side)
    dice = inc.cds_dice_loss(masks, labels, num_old=num_old)
    token_weights = inc.fod_token_weights(labels.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2),
                                          num_old=num_old, patch_size=patch_size, bg_weight=0.5)
    visual = inc.fod_loss(patches, teacher_patches, token_weights)
    old_classes = inc.fod_loss(classes[:, :num_old], teacher_classes[:, :num_old], torch.ones_like(classes[:, :num_old, 0]))
    return dice + visual + 0.5 * old_classes


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    b, side, k, d, num_old = 2, 5, 7, 24, 4
    patches = torch.randn(b, side * side, d, generator=g, requires_grad=True)
    classes = torch.randn(b, k, d, generator=g, requires_grad=True)
    scale = torch.tensor(4.0, requires_grad=True)
    teacher_patches = torch.randn(b, side * side, d, generator=g)
    teacher_classes = torch.randn(b, k, d, generator=g)
    labels = torch.randint(0, k, (b, side, side), generator=g)
    labels[0, 0, :3] = 255
    return (patches, classes, scale, teacher_patches, teacher_classes, labels, num_old, 2)


@pytest.mark.plan_independent
def test_all_ops_compile_fullgraph_and_match_eager():
    torch._dynamo.reset()
    eager_inputs, compiled_inputs = _inputs(0), _inputs(0)
    eager_loss = _step(*eager_inputs)
    eager_loss.backward()
    compiled_loss = torch.compile(_step, fullgraph=True)(*compiled_inputs)
    compiled_loss.backward()
    assert_close_rel(compiled_loss, eager_loss, torch.float32, "loss")
    for i, name in enumerate(("patches", "classes", "scale")):
        assert_close_rel(compiled_inputs[i].grad, eager_inputs[i].grad, torch.float32, f"grad {name}")


def test_backwards_fill_no_zero_gradients_for_outputs_without_one():
    """The ops' auxiliary outputs (cosine_mask's norms, fod_loss's W, cds_dice_loss's stats) never get a
    gradient, and their custom ops set materialize_grads=False: autograd issues no zero fill (one launch
    each on a GPU) for them in the backward."""
    patches, classes, scale, teacher_patches, _, labels, num_old, _ = _inputs(0)
    b, n, _ = patches.shape
    weight = torch.rand(b, n, generator=torch.Generator().manual_seed(1))
    logits = patches[..., : classes.shape[1]].transpose(1, 2).reshape(b, -1, *labels.shape[1:])
    losses = {
        "cosine_mask": inc.cosine_mask(patches, classes, scale=scale).square().sum(),
        "fod_loss": inc.fod_loss(patches, teacher_patches, weight),
        "cds_dice_loss": inc.cds_dice_loss(logits, labels, num_old=num_old),
    }
    for name, loss in losses.items():
        with ZeroFills() as fills:
            torch.autograd.grad(loss, patches, torch.ones(()))
        assert not fills.ops, f"{name}'s backward filled zero gradients: {fills.ops}"
