"""``--compile``: ``auto`` compiles on CUDA only; a compiled training step is the eager one.

The parity test runs the trainer's own ``train_step`` (teacher, PLOP pseudo-labels, CE + dice + both FOD
terms, dropout and drop-path on) for one update with ``compile="on"`` and ``"off"`` from the same weights,
and compares the losses and every trainable parameter's gradient (read by a hook as the update applies it)
by the relative-norm error within the float32 bound. On the CPU it compiles with the ``aot_eager`` backend:
Dynamo's capture and AOTAutograd's forward and backward graphs (custom ops through their fake kernels), all
of ``torch.compile`` except inductor's code generation, whose C++ build takes 50-100 s of a test here.
Measured by hand with inductor on the CPU, this test's update: dropout's masks come from inductor's own
generator, so the step differs (loss by 1.1%, gradients up to 2.2 relative) unless
``torch._inductor.config.fallback_random`` is set, and then it agrees (total loss 1.4e-7, gradients 1.5e-6):
the difference is the dropout masks, not the computation (docs/datasets.md#compiled-training).
"""
import dataclasses
import functools

import torch

from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.train import DistEnv, compile_enabled, train_step
from incrementer_fast.model import Incrementer
from incrementer_fast.testing import REL_ERR_BOUND, rel_err

TASK = [[0, 1, 2], [3]]


def test_compile_auto_is_on_for_cuda_and_off_for_the_cpu():
    config = TrainConfig.demo()
    assert config.compile == "auto"
    assert compile_enabled(config, torch.device("cuda", 0)) and not compile_enabled(config, torch.device("cpu"))
    assert compile_enabled(TrainConfig.demo(compile="on"), torch.device("cpu"))
    assert not compile_enabled(TrainConfig.demo(compile="off"), torch.device("cuda", 0))
    assert TrainConfig.from_dict({**TrainConfig.demo().to_dict(), "compile": True}).compile == "on"  # old runs


def one_update(config: TrainConfig) -> tuple[dict, dict]:
    """Step 1 of TASK for one update of 2 images from fixed weights: (the epoch's loss terms, the gradient of
    every trainable parameter as the optimiser applied it)."""
    torch.manual_seed(0)
    model = Incrementer("test_vit", len(TASK[0]), d_model=32, n_layers=1, img_size=32, dropout=config.dropout,
                        drop_path_rate=config.drop_path_rate)
    teacher = model.frozen_copy()
    model.add_classes(len(TASK[1]))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    labels = torch.zeros(2, 32, 32, dtype=torch.int64)  # the background, then one 16² patch of the new class
    labels[0, :16, :16] = labels[1, 16:, 16:] = 3  # (FOD weighs the patches free of new classes)
    labels[:, -2:] = 255  # a void band
    gradients = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(
                lambda p, name=name: gradients.__setitem__(name, p.grad.detach().clone()))
    [summary] = train_step(model, teacher, list(zip(images, labels)), config=config, task=TASK, step=1,
                           device=torch.device("cpu"), env=DistEnv(), progress=False)
    return summary, gradients


def test_compiled_training_step_equals_eager(monkeypatch):
    config = TrainConfig.demo(img_size=32, crop_size=32, batch_size=2, epochs_incremental=1, dropout=0.1,
                              drop_path_rate=0.1, num_workers=0)
    eager_terms, eager_grads = one_update(dataclasses.replace(config, compile="off"))
    compiled_with = []

    def compile_on_cpu(model, **options):
        compiled_with.append(type(model).__name__)
        return compile_aot_eager(model, **options)

    compile_aot_eager = functools.partial(torch.compile, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_on_cpu)
    try:
        compiled_terms, compiled_grads = one_update(dataclasses.replace(config, compile="on"))
    finally:
        torch._dynamo.reset()
    assert compiled_with == ["Incrementer"]
    bound = REL_ERR_BOUND[torch.float32]
    for name in ("total", "ce", "dice", "fod_visual", "fod_class"):
        assert eager_terms[name] > 0, name  # every term of the loss is exercised
        assert rel_err(torch.tensor(compiled_terms[name]), torch.tensor(eager_terms[name])) <= bound, name
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 20
    for name, gradient in eager_grads.items():
        assert gradient.abs().sum() > 0, name  # every trainable parameter takes part (a zero would pass rel_err)
        assert rel_err(compiled_grads[name], gradient) <= bound, name
