"""inc.use_backend: every op follows the chosen backend, eager and compiled, forward and backward.

Run in every pass: without TRITON_INTERPRET choosing "triton" for CPU tensors is a clear error; with
TRITON_INTERPRET=1 "triton" runs the kernels through the interpreter and "reference" the plain-PyTorch path.
The launch plan (``use_backend(plan=...)``, ``INCREMENTER_FAST_PLAN``) is read each time a launch is planned.
Which path ran is read off a counter wrapped around each op's kernel launchers (a spy: it calls through).
"""
import importlib

import pytest
import torch

import incrementer_fast as inc
from conftest import INTERPRET
from helpers import assert_close_rel

# op -> (kernels module, launchers of its forward and backward)
LAUNCHERS = {
    "cosine_mask": ("cosine_mask", ("cosine_mask_forward", "cosine_mask_backward")),
    "fod_loss": ("fod_loss", ("fod_loss_forward", "fod_loss_backward")),
    "cds_dice_loss": ("cds_dice_loss", ("cds_dice_loss_forward", "cds_dice_loss_backward")),
    "seg_head_loss": ("seg_head", ("seg_head_loss_forward", "seg_head_loss_backward")),
    "pseudo_label": ("seg_head", ("pseudo_label_forward",)),
    "entropy_histogram": ("seg_head", ("entropy_histogram_forward",)),
}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(2, 16, 8, generator=g, requires_grad=True)
    classes = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)
    labels[0, 0] = 255
    teacher = torch.randn(2, 3, 4, 4, generator=g)
    return patches, classes, labels, teacher


def _every_op(patches, classes, labels, teacher):
    """One call of every op, differentiable through masks, patches and classes."""
    masks = inc.cosine_mask(patches, classes, scale=4.0).view(2, 5, 4, 4)
    ce, dice = inc.seg_head_loss(masks, labels, num_old=3)
    cds = inc.cds_dice_loss(masks, labels[:, ::2, ::2], num_old=3)
    fod = inc.fod_loss(patches, patches.detach() + 1, torch.ones(2, 16))
    histogram = inc.entropy_histogram(teacher, labels, num_classes=5)
    thresholds = inc.plop_thresholds(histogram)
    pseudo, factor = inc.pseudo_label(teacher, labels, thresholds, num_classes=5)
    return ce + dice + cds + fod + factor.sum() + pseudo.float().mean()


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of every kernel launcher (each call goes through to the real launcher)."""
    counts = {}
    for module_name, names in LAUNCHERS.values():
        module = importlib.import_module(f"incrementer_fast.kernels.{module_name}")
        for name in names:
            original = getattr(module, name)

            def spy(*args, _original=original, _name=name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)
    return counts


def _run(backend_name):
    patches, classes, labels, teacher = _inputs()
    with inc.use_backend(backend_name):
        loss = _every_op(patches, classes, labels, teacher)
        loss.backward()
    return loss, patches.grad, classes.grad


def test_reference_backend_never_launches_a_kernel(launches):
    with inc.use_backend("reference"):
        assert inc.backend("cpu") == "reference"
    _run("reference")
    assert launches == {}


@pytest.mark.skipif(not INTERPRET, reason="the kernels run on CPU tensors only through the interpreter")
def test_triton_backend_launches_every_kernel_and_agrees_with_the_reference(launches):
    loss, grad_patches, grad_classes = _run("triton")
    expected = {name for _, names in LAUNCHERS.values() for name in names}
    assert set(launches) == expected
    counts = dict(launches)
    reference = _run("reference")
    assert launches == counts  # the reference run launched nothing
    assert_close_rel(loss, reference[0], torch.float32, "loss")
    assert_close_rel(grad_patches, reference[1], torch.float32, "grad patches")
    assert_close_rel(grad_classes, reference[2], torch.float32, "grad classes")


@pytest.mark.skipif(INTERPRET, reason="with the interpreter the kernels can run on CPU tensors")
def test_triton_for_cpu_tensors_without_the_interpreter_is_a_clear_error():
    patches, classes, _, _ = _inputs()
    with inc.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            inc.backend("cpu")
        with pytest.raises(RuntimeError, match=r'use_backend\("triton"\).*cpu tensors'):
            inc.cosine_mask(patches, classes)
    assert inc.backend("cpu") == "reference"  # restored on exit, error or not


def test_use_backend_restores_the_previous_choice_and_nests():
    before = inc.backend("cpu")
    with inc.use_backend("reference"):
        with inc.use_backend("auto"):
            assert inc.backend("cpu") == before
        assert inc.backend("cpu") == "reference"
        with pytest.raises(KeyError):
            with inc.use_backend("reference"):
                raise KeyError("an error inside the block")
        assert inc.backend("cpu") == "reference"
    assert inc.backend("cpu") == before


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="'auto', 'reference', 'triton'"):
        with inc.use_backend("cuda"):
            pass


@pytest.mark.plan_independent
def test_compiled_graph_follows_the_switch_at_call_time(launches):
    """The choice is made before the autograd boundary and torch.compile guards on it: a compiled function
    runs whichever backend is in effect at each call (forward and backward), recompiling on a change."""
    torch._dynamo.reset()
    compiled = torch.compile(_every_op, fullgraph=True, backend="aot_eager")
    patches, classes, labels, teacher = _inputs()
    with inc.use_backend("reference"):
        compiled(patches, classes, labels, teacher).backward()
    assert launches == {}
    if INTERPRET:
        with inc.use_backend("triton"):
            compiled(patches, classes, labels, teacher).backward()
        assert launches["cosine_mask_forward"] == 1 and launches["cosine_mask_backward"] == 1
        assert launches["seg_head_loss_backward"] == 1 and launches["fod_loss_backward"] == 1
    else:
        with inc.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            compiled(patches, classes, labels, teacher)


def test_plan_is_chosen_per_call_and_restored():
    from incrementer_fast import _dispatch

    cpu = torch.device("cpu")
    before = _dispatch.launch_target(cpu)
    with inc.use_backend("auto", plan="h100"):
        assert _dispatch.launch_target(cpu) == _dispatch.PLANS["h100"]
        with inc.use_backend("reference"):  # no plan given: the plan in effect stays
            assert _dispatch.launch_target(cpu).name == "h100"
        with inc.use_backend("auto", plan="interpreter"):
            assert not _dispatch.launch_target(cpu).gpu
    assert _dispatch.launch_target(cpu) == before
    assert _dispatch.PLANS["h100"].multiprocessors == _dispatch.PLANS["h200"].multiprocessors == 132


def test_plan_environment_variable_is_read_when_an_op_plans(monkeypatch):
    from incrementer_fast import _dispatch

    cpu = torch.device("cpu")
    monkeypatch.setenv(_dispatch.PLAN_ENV_VAR, "h200")
    assert _dispatch.launch_target(cpu).name == "h200"
    with inc.use_backend("auto", plan="interpreter"):  # a block's choice beats the process's
        assert _dispatch.launch_target(cpu).name == "interpreter"
    monkeypatch.setenv(_dispatch.PLAN_ENV_VAR, "a100")
    with pytest.raises(ValueError, match="INCREMENTER_FAST_PLAN must be one of 'interpreter', 'h100', 'h200', got 'a100'"):
        _dispatch.launch_target(cpu)


def test_unknown_plan_names_the_choices():
    with pytest.raises(ValueError, match=r"use_backend\(plan\) must be one of 'interpreter', 'h100', 'h200'"):
        with inc.use_backend("triton", plan="a100"):
            pass


@pytest.mark.plan_independent
@pytest.mark.skipif(not INTERPRET, reason="the kernels run on CPU tensors only through the interpreter")
def test_the_backward_follows_the_forward_choice(launches):
    """The dispatch happens before the autograd boundary: a backward run after the block (or under another
    choice) still takes the path its forward took."""
    patches, classes, labels, teacher = _inputs()
    with inc.use_backend("triton"):
        loss = _every_op(patches, classes, labels, teacher)
    with inc.use_backend("reference"):
        loss.backward()
    assert launches["cosine_mask_backward"] == 1 and launches["seg_head_loss_backward"] == 1
    reference_loss, reference_patches, reference_classes = _run("reference")
    assert launches["cosine_mask_backward"] == 1  # the reference run launched nothing
    assert_close_rel(patches.grad, reference_patches, torch.float32, "grad patches")
    assert_close_rel(classes.grad, reference_classes, torch.float32, "grad classes")
