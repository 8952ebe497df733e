"""incrementer_fast.nn: each module computes exactly its functional op, with its state where it has one."""
import math

import pytest
import torch

import incrementer_fast as inc
from incrementer_fast.nn import CDSDiceLoss, CosineMask, FODLoss, PLOPPseudoLabeler, SegHeadLoss

from helpers import REL_ERR_BOUND, rel_err


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cosine_mask_fixed_scale_is_the_op():
    g = _g()
    patches, classes = torch.randn(2, 12, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    module = CosineMask(scale=7.0, eps=1e-6)
    assert list(module.parameters()) == []
    assert torch.equal(module(patches, classes), inc.cosine_mask(patches, classes, scale=7.0, eps=1e-6))
    assert repr(module) == "CosineMask(scale=7.0, eps=1e-06)"
    bf16 = CosineMask(scale=7.0, out_dtype=torch.float32)
    expected = inc.cosine_mask(patches.bfloat16(), classes.bfloat16(), scale=7.0, out_dtype=torch.float32)
    assert torch.equal(bf16(patches.bfloat16(), classes.bfloat16()), expected) and expected.dtype == torch.float32
    assert repr(bf16) == "CosineMask(scale=7.0, eps=1e-08, out_dtype=torch.float32)"


def test_cosine_mask_learnable_scale_learns_log_gamma():
    g = _g(1)
    patches, classes = torch.randn(2, 12, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    module = CosineMask(scale=10.0, learnable_scale=True)
    assert [name for name, _ in module.named_parameters()] == ["log_scale"]
    assert module.log_scale.item() == pytest.approx(math.log(10.0))
    masks = module(patches, classes)
    assert torch.allclose(masks, inc.cosine_mask(patches, classes, scale=10.0), rtol=1e-6, atol=1e-6)
    masks.sum().backward()
    # d/d log γ of Σ γ·cos = γ·Σ cos = Σ masks.
    assert module.log_scale.grad.item() == pytest.approx(masks.sum().item(), rel=1e-5)
    assert "learnable_scale=True" in repr(module)


def test_cosine_mask_scale_is_required_and_min_out_dtype_promotes():
    """No default γ (the functional op's 1 and Incrementer's 10 are both right somewhere); ``min_out_dtype``
    is "at least": float32 masks from bf16 and fp32 inputs, float64 from float64 ones."""
    with pytest.raises(TypeError, match="scale"):
        CosineMask()
    g = _g(6)
    patches, classes = torch.randn(2, 12, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    module = CosineMask(scale=10.0, min_out_dtype=torch.float32)
    assert repr(module) == "CosineMask(scale=10.0, eps=1e-08, min_out_dtype=torch.float32)"
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                            (torch.float64, torch.float64)):
        p, c = patches.to(dtype), classes.to(dtype)
        masks = module(p, c)
        assert masks.dtype == expected
        assert torch.equal(masks, inc.cosine_mask(p, c, scale=10.0, out_dtype=expected))
    with pytest.raises(ValueError, match="not both"):
        CosineMask(scale=10.0, out_dtype=torch.float32, min_out_dtype=torch.float32)
    with pytest.raises(TypeError, match="min_out_dtype"):
        CosineMask(scale=10.0, min_out_dtype=torch.int32)
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a positive finite float"):
            CosineMask(scale=bad)
        with pytest.raises(ValueError, match="eps must be a positive finite float"):
            CosineMask(scale=10.0, eps=bad)


def _spy(monkeypatch, namespace, name):
    """Wrap ``namespace.name`` so that its calls are counted in the returned list."""
    calls = []
    real = getattr(namespace, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(namespace, name, counted)
    return calls


def _as_tuple(output):
    return output if isinstance(output, tuple) else (output,)


def _module_calls(g):
    """For every module: (a builder from keyword arguments, a call of the built module, the functions it runs)."""
    patches, classes = torch.randn(2, 12, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    student, teacher = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    weight = torch.rand(2, 6, generator=g)
    logits, labels = torch.randn(2, 5, 8, 8, generator=g), torch.randint(0, 5, (2, 8, 8), generator=g)
    masks, image_weight = torch.randn(2, 5, 4, 4, generator=g), torch.rand(2, generator=g)
    teacher_masks = torch.randn(2, 3, 4, 4, generator=g)

    def labeler(module):
        module.update(teacher_masks, labels)
        module.compute_thresholds()
        return module(teacher_masks, labels)

    return [
        (lambda **kw: CosineMask(scale=10.0, **kw), lambda m: m(patches, classes), ["cosine_mask"]),
        (lambda **kw: FODLoss(**kw), lambda m: m(student, teacher, weight), ["fod_loss"]),
        (lambda **kw: CDSDiceLoss(num_old=3, **kw), lambda m: m(logits, labels), ["cds_dice_loss"]),
        (lambda **kw: SegHeadLoss(num_old=3, new_class_weight=0.5, **kw),
         lambda m: m(masks, labels, image_weight), ["seg_head_loss"]),
        (lambda **kw: PLOPPseudoLabeler(5, **kw), labeler, ["entropy_histogram", "plop_thresholds", "pseudo_label"]),
    ]


@pytest.mark.parametrize("index", range(5), ids=["CosineMask", "FODLoss", "CDSDiceLoss", "SegHeadLoss",
                                                 "PLOPPseudoLabeler"])
def test_reference_flag_runs_the_plain_pytorch_reference(monkeypatch, index):
    """``reference=True`` calls ``incrementer_fast.reference``'s function, the default the dispatching op's;
    the two agree within float32 rounding."""
    make, call, names = _module_calls(_g(7))[index]
    reference_calls = [_spy(monkeypatch, inc.reference, name) for name in names]
    dispatching_calls = [_spy(monkeypatch, inc.ops, name) for name in names]
    reference = make(reference=True)
    assert "reference=True" in repr(reference)
    expected = call(reference)
    assert [len(c) for c in reference_calls] == [1] * len(names) and not any(dispatching_calls)
    default = make()
    assert "reference" not in repr(default)
    got = call(default)
    assert [len(c) for c in dispatching_calls] == [len(c) for c in reference_calls] == [1] * len(names)
    for a, b in zip(_as_tuple(got), _as_tuple(expected)):
        if a.is_floating_point():
            assert rel_err(a, b) <= REL_ERR_BOUND[torch.float32], names
        else:
            assert torch.equal(a, b), names
    with pytest.raises(TypeError, match="reference must be True or False"):
        make(reference=1)


def test_segmenter_decoder_swap_gives_the_segmenter_masks_normalised():
    """The README's swap: Segmenter computes masks = p̂ ĉᵀ (B, N, K) (then a LayerNorm over classes);
    CosineMask(scale=1) gives the same cosines as (B, K, N), so .transpose(1, 2) puts them in its layout."""
    g = _g(2)
    patches, cls_seg_feat = torch.randn(2, 12, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    segmenter = (patches / patches.norm(dim=-1, keepdim=True)) @ (
        cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)).transpose(1, 2)
    swapped = CosineMask(scale=1.0)(patches, cls_seg_feat).transpose(1, 2)
    assert swapped.shape == segmenter.shape == (2, 12, 5)
    assert torch.allclose(swapped, segmenter, atol=1e-6)


def test_fod_loss_module_and_unit_weights():
    g = _g(3)
    student = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    teacher, weight = torch.randn(2, 6, 8, generator=g), torch.rand(2, 6, generator=g)
    module = FODLoss(eps=1e-6)
    assert torch.equal(module(student, teacher, weight), inc.fod_loss(student, teacher, weight, eps=1e-6))
    assert torch.equal(module(student, teacher), inc.fod_loss(student, teacher, torch.ones(2, 6), eps=1e-6))
    assert repr(module) == "FODLoss(eps=1e-06)"


def test_cds_dice_and_seg_head_modules_are_the_ops():
    g = _g(4)
    logits = torch.randn(2, 5, 8, 8, generator=g)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)
    labels[0, 0] = 7  # an ignore_index other than 255
    dice = CDSDiceLoss(num_old=3, ignore_index=7, smooth=0.5)
    assert torch.equal(dice(logits, labels), inc.cds_dice_loss(logits, labels, 3, ignore_index=7, smooth=0.5))
    assert repr(dice) == "CDSDiceLoss(num_old=3, ignore_index=7, smooth=0.5)"
    masks = torch.randn(2, 5, 4, 4, generator=g)
    image_weight = torch.rand(2, generator=g)
    head = SegHeadLoss(num_old=3, new_class_weight=0.5, ignore_index=7)
    expected = inc.seg_head_loss(masks, labels, 3, new_class_weight=0.5, ignore_index=7, image_weight=image_weight)
    for got, want in zip(head(masks, labels, image_weight), expected):
        assert torch.equal(got, want)
    assert repr(head) == "SegHeadLoss(num_old=3, new_class_weight=0.5, ignore_index=7, smooth=1.0)"


def test_plop_pseudo_labeler_holds_the_step_histogram():
    g = _g(5)
    batches = [(torch.randn(2, 4, 4, 4, generator=g), torch.randint(0, 6, (2, 16, 16), generator=g)) for _ in range(3)]
    labeler = PLOPPseudoLabeler(7, num_bins=50, floor=0.01)
    with pytest.raises(RuntimeError, match="compute_thresholds"):
        labeler(*batches[0])
    for masks, labels in batches:
        labeler.update(masks, labels)
    histogram = sum(inc.entropy_histogram(m, lab, 50, num_classes=7) for m, lab in batches)
    assert torch.equal(labeler.histogram, histogram)
    thresholds = labeler.compute_thresholds()
    assert torch.equal(thresholds, inc.plop_thresholds(histogram, 0.01))
    pseudo, factor = labeler(*batches[1])
    expected = inc.pseudo_label(*batches[1], thresholds, num_classes=7)
    assert torch.equal(pseudo, expected[0]) and torch.equal(factor, expected[1])
    assert "histogram (4, 50), thresholds set" in repr(labeler)
    assert labeler.state_dict() == {}  # step state, not weights
    with pytest.raises(ValueError, match="call reset"):
        labeler.update(torch.randn(2, 5, 4, 4), batches[0][1])
    # The DDP sum goes to a copy: a second call gives the same thresholds (single process here).
    assert torch.equal(labeler.compute_thresholds(), thresholds) and torch.equal(labeler.histogram, histogram)
    labeler.reset(num_classes=8)
    labeler.update(torch.randn(2, 5, 4, 4), batches[0][1])
    assert labeler.histogram.shape == (5, 50) and labeler.thresholds is None and labeler.num_classes == 8


def test_docstring_examples_run():
    import doctest

    import incrementer_fast._dispatch
    import incrementer_fast.nn

    for module in (incrementer_fast.nn, incrementer_fast._dispatch):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
