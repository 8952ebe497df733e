"""Training and evaluation of one class-incremental step.

Per step t of a task (the classes of each step, background in step 0):

* the model gets step t's class tokens (``add_classes``, earlier tokens frozen); the teacher is a frozen copy
  of step t − 1's model;
* PLOP's per-class entropy thresholds are computed once over step t's training images through the teacher,
  by an ``incrementer_fast.nn.PLOPPseudoLabeler`` (``entropy_histogram`` summed over the images and over the
  processes, then ``plop_thresholds``; PLOP's released entropy and median by default,
  ``TrainConfig.plop_entropy``; ``step_pseudo_labeler``);
* every micro-batch: the training labels hold step t's classes and 0 elsewhere; background pixels take the
  teacher's confident prediction, the rest of the background is ignored (the labeler's ``pseudo_label``), and

      L = CE(pseudo-labels; weight w_new on the new classes; ignore 255; PLOP's per-image factor;
             PLOP's mean over all pixels)
          + λ_v · fod_loss(student visual tokens, teacher's, fod_token_weights(pseudo-labels, K_old, p, β))
          + λ_c · fod_loss(student class embeddings of the K_old old classes, teacher's, unit weights)
          + λ_d · cds_dice_loss(same logits, training labels, K_old)

  (``compute_losses``; CE and dice by an ``incrementer_fast.nn.SegHeadLoss``). The dice's masks come from
  the training labels (the step's ground truth), not the pseudo-labels: M_new = new-class pixels, M_old =
  every other labelled pixel, the uncertain background the pseudo-labels ignore included (void and crop
  padding, 255, are in neither). FOD's token weights are computed on the pseudo-labels, not the training
  labels: the training labels hold no old class (old classes are background at step t), the pseudo-labels
  do, so an old-class patch gets weight 1, a background or uncertain patch β and a patch touching a new
  class 0.
  Step 0, ``finetune`` and ``joint`` train with plain CE on the training labels; ``mib`` and ``plop`` train
  as their released code does (``baselines.py``: MiB's unbiased CE and distillation; PLOP's pseudo-labels
  with its CE and its Local POD on the encoder blocks' token maps).
  ``TrainConfig.fused_head=False`` runs the plain-PyTorch references of ``seg_head_loss`` and of PLOP's
  pseudo-labels instead (the modules' ``reference=True``).

Optimisation: SGD + poly schedule per step (``torch.optim.lr_scheduler.PolynomialLR``), learning rate ``lr``
at step 0 and ``lr_incremental`` later, autocast on CUDA as ``amp`` says (bf16, or fp16 with a gradient
scaler), optional ``torch.compile``, DDP when launched by ``torchrun``. Progress goes to the ``logging``
module (logger ``incrementer_fast.continual.train``; rank 0 only) and to tqdm bars.

Determinism and world-size independence. Each optimiser update consumes one *effective batch* of
``batch_size`` images, split into micro-batches of ``micro_batch_size``; process r of W takes the r-th
contiguous share of the effective batch and accumulates its micro-batches (``EffectiveBatchSampler``). The
image order is a permutation seeded by (seed, step, epoch); each image's augmentation is seeded by (seed,
step, epoch, image) (``SeededSamples``), whatever worker loads it; dropout and drop-path are seeded by (seed,
step, global micro-batch index). So a micro-batch is the same tensor computation on any number of processes,
and the update — the mean of the micro-batch gradients, by accumulation and by DDP's all-reduce — differs only
by the order of float additions. ``torch.utils.data.DistributedSampler`` is not used for this reason: it
deals indices round-robin (and pads the last batch by repeating images), so the micro-batches would change
with the number of processes. Evaluation shards the validation images the same way without padding, so the
all-reduced confusion matrix counts each image exactly once.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from .. import fod_loss, fod_token_weights
from ..constants import IGNORE_INDEX
from ..errors import InputError, WorkError
from ..nn import PLOPPseudoLabeler, SegHeadLoss
from .baselines import BlockTokenMaps, mib_losses, plop_pod, pod_block_indices
from .config import TrainConfig
from .epoch_state import restore_rng_states, rng_states
from .inference import sliding_window_logits
from .metrics import ConfusionMatrix
from .scenarios import classes_up_to, remap_eval_labels, remap_train_labels

PLOP_NUM_BINS = 100
# Every update's loss terms are checked for NaN/inf on the device (no host synchronisation); the flag is read
# on the host every FINITE_CHECK_INTERVAL updates, at the end of each epoch and before the step is saved.
FINITE_CHECK_INTERVAL = 50

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ processes, seeds
@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_dist_env() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        import os

        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv()


def resolve_device(config: TrainConfig, env: DistEnv) -> torch.device:
    """``config.device`` → a device; under DDP each process takes the GPU of its local rank."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu, or auto (CUDA when present)")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def derive_seed(*parts) -> int:
    """A 32-bit seed from any tuple of ints and strings (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the transforms may use any of them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ data order
class SeededSamples(Dataset):
    """Wraps a dataset; item ``(tag, index)`` seeds the global generators from (seed, tag, index) before
    loading ``dataset[index]``, so the random augmentation of an image does not depend on which process or
    worker loads it, nor on what was loaded before. (It reseeds the global generators of the process that
    loads: a worker, or the main process when ``num_workers=0`` — training reseeds them per micro-batch.)"""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        tag, index = key
        seed_everything(derive_seed(self.seed, tag, index))
        return self.dataset[index]


class EffectiveBatchSampler(Sampler):
    """This process's micro-batches of ``(tag, index)`` keys for ``epochs`` epochs of ``num_images`` images.

    An epoch is ⌈num_images / batch_size⌉ updates over a permutation seeded by (seed, step, epoch), extended
    cyclically so that every update has ``batch_size`` images. Update u's images are cut into ``world_size``
    contiguous shares; process ``rank`` yields its share as ``accumulation`` micro-batches of
    ``micro_batch`` images. The micro-batch with global index u·W·A + rank·A + a is the same on any W.
    """

    def __init__(self, num_images: int, *, batch_size: int, micro_batch: int, accumulation: int, rank: int,
                 world_size: int, seed: int, step: int, epochs: int, first_epoch: int = 0):
        if num_images <= 0:
            raise ValueError("no training images for this step: check the task and the dataset")
        if micro_batch * accumulation * world_size != batch_size:
            raise ValueError(
                f"micro_batch {micro_batch} × accumulation {accumulation} × world_size {world_size} "
                f"must equal batch_size {batch_size}"
            )
        self.num_images = num_images
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.step = step
        self.epochs = epochs
        self.first_epoch = first_epoch  # epochs before it were trained already (a resumed step)
        self.updates_per_epoch = math.ceil(num_images / batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.step, epoch))
        order = torch.randperm(self.num_images, generator=generator).tolist()
        needed = self.updates_per_epoch * self.batch_size
        return (order * math.ceil(needed / self.num_images))[:needed]

    def __iter__(self):
        share = self.batch_size // self.world_size
        for epoch in range(self.first_epoch, self.epochs):
            order = self.epoch_order(epoch)
            tag = ("train", self.step, epoch)
            for update in range(self.updates_per_epoch):
                start = update * self.batch_size + self.rank * share
                mine = order[start:start + share]
                for a in range(self.accumulation):
                    yield [(tag, i) for i in mine[a * self.micro_batch:(a + 1) * self.micro_batch]]

    def __len__(self) -> int:
        return (self.epochs - self.first_epoch) * self.updates_per_epoch * self.accumulation


def shard(num_items: int, env: DistEnv) -> list[int]:
    """Indices of this process's share of ``num_items`` (rank, rank + W, ...; no padding)."""
    return list(range(env.rank, num_items, env.world_size))


class _Keyed(Dataset):
    """Items ``(tag, index)`` of a fixed tag, so ``SeededSamples`` can be read by a plain ``DataLoader``."""

    def __init__(self, samples: SeededSamples, tag):
        self.samples = samples
        self.tag = tag

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[(self.tag, index)]


def _loader(dataset, config: TrainConfig, device: torch.device, **kwargs) -> DataLoader:
    return DataLoader(
        dataset,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        # A private generator: creating an iterator must not consume the global RNG.
        generator=torch.Generator(),
        **kwargs,
    )


# ------------------------------------------------------------------------------------ losses
@dataclass
class LossTerms:
    """The loss of one micro-batch and its terms (0-dim float32; the unused terms are 0). ``kd``: MiB's
    unbiased distillation (before λ_kd); ``pod``: PLOP's Local POD (weighted, as PLOP adds it)."""

    total: torch.Tensor
    ce: torch.Tensor
    dice: torch.Tensor
    fod_visual: torch.Tensor
    fod_class: torch.Tensor
    kd: Optional[torch.Tensor] = None
    pod: Optional[torch.Tensor] = None

    NAMES = ("total", "ce", "dice", "fod_visual", "fod_class", "kd", "pod")

    def __post_init__(self) -> None:
        for name in ("kd", "pod"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros((), device=self.total.device))

    def stacked(self) -> torch.Tensor:
        return torch.stack([getattr(self, n).detach().float() for n in self.NAMES])


def make_seg_head_loss(config: TrainConfig, num_old: int, new_class_weight: float) -> SegHeadLoss:
    """CE + CDS dice of the patch-resolution masks: the dispatching op, or its reference when
    ``config.fused_head`` is off."""
    return SegHeadLoss(num_old, new_class_weight, IGNORE_INDEX, reference=not config.fused_head)


def make_pseudo_labeler(config: TrainConfig, num_classes: int,
                        thresholds: torch.Tensor | None = None) -> PLOPPseudoLabeler:
    """PLOP's pseudo-labeler of a step whose K_total is ``num_classes`` (old and new classes), as ``config``
    says: the dispatching ops, or their references when ``config.fused_head`` is off. ``thresholds``
    (K_old,): per-class thresholds computed elsewhere (a benchmark's fixed values), set on the labeler;
    otherwise ``update`` and ``compute_thresholds`` make them (``step_pseudo_labeler``)."""
    labeler = PLOPPseudoLabeler(num_classes, num_bins=PLOP_NUM_BINS, floor=config.plop_min_threshold,
                                ignore_index=IGNORE_INDEX, entropy=config.plop_entropy,
                                reference=not config.fused_head)
    labeler.thresholds = thresholds
    return labeler


def compute_losses(config: TrainConfig, student, labels: torch.Tensor, *, num_old: int, patch_size: int,
                   teacher=None, pseudo_labeler: PLOPPseudoLabeler | None = None,
                   block_maps: tuple[list, list] | None = None) -> LossTerms:
    """The loss of a micro-batch (see the module docstring).

    ``student``/``teacher``: model outputs (``masks``, ``patch_embeddings``, ``class_embeddings``);
    ``labels`` (B, H, W): the training labels of the step (its classes, 0 elsewhere, 255 ignored).
    Without a teacher (step 0, ``finetune``, ``joint``): plain CE on ``labels``. With one: PLOP
    pseudo-labels from the teacher by ``pseudo_labeler``, the step's labeler with its thresholds set
    (``step_pseudo_labeler``), then CE + λ_d·dice + λ_v·FOD_v + λ_c·FOD_c (terms switched off by
    ``use_cds`` / ``use_fod`` are reported but not added). ``config.fused_head`` picks the dispatching
    seg-head op or its reference (``make_seg_head_loss``), as ``make_pseudo_labeler`` does for the labeler.
    ``config.method`` ``mib``: MiB's CE + λ_kd·KD instead (no pseudo-labels); ``plop``: CE on the pseudo-labels
    (no class weight, no dice) + POD, whose encoder token maps ``block_maps`` holds (the student's, the
    teacher's; ``BlockTokenMaps.maps``).
    """
    labels = labels.long()
    if teacher is None:
        # Plain CE: class weights all 1, so num_old only selects which dice is computed (and dropped).
        ce, _ = make_seg_head_loss(config, num_old=1, new_class_weight=1.0)(student.masks, labels)
        zero = torch.zeros((), device=ce.device)
        return LossTerms(total=ce, ce=ce, dice=zero, fod_visual=zero, fod_class=zero)
    zero = torch.zeros((), device=student.masks.device)
    if config.method == "mib":
        ce, kd = mib_losses(config, student.masks, labels, teacher.masks, num_old)
        return LossTerms(total=ce + config.mib_lambda_kd * kd, ce=ce, dice=zero, fod_visual=zero, fod_class=zero,
                         kd=kd)
    if pseudo_labeler is None:
        raise ValueError("compute_losses with a teacher needs the step's PLOP pseudo-labeler")
    with torch.no_grad():
        pseudo, image_factor = pseudo_labeler(teacher.masks.float(), labels)
    image_weight = image_factor.float() if config.plop_image_factor else None
    if config.method == "plop":
        if block_maps is None:
            raise ValueError("compute_losses for plop needs the encoder blocks' token maps (block_maps)")
        ce, _ = make_seg_head_loss(config, num_old, new_class_weight=1.0)(student.masks, pseudo, image_weight)
        pod = plop_pod(config, student, teacher, *block_maps, num_old)
        return LossTerms(total=ce + pod, ce=ce, dice=zero, fod_visual=zero, fod_class=zero, pod=pod)
    # CE on the pseudo-labels; the dice's M_new / M_old on the step's ground truth (see the module docstring).
    seg_head_loss = make_seg_head_loss(config, num_old, config.new_class_weight)
    ce, dice = seg_head_loss(student.masks, pseudo, image_weight, dice_labels=labels)
    total = ce
    if config.use_cds:
        total = total + config.lambda_dice * dice
    token_weights = fod_token_weights(pseudo, num_old, patch_size, config.fod_bg_weight, IGNORE_INDEX)
    fod_visual = fod_loss(student.patch_embeddings.float(), teacher.patch_embeddings.float(), token_weights)
    student_old = student.class_embeddings[:, :num_old].float()
    fod_class = fod_loss(student_old, teacher.class_embeddings.float(),
                         torch.ones(student_old.shape[:2], device=student_old.device))
    if config.use_fod:
        total = total + config.lambda_visual * fod_visual + config.lambda_class * fod_class
    return LossTerms(total=total, ce=ce, dice=dice, fod_visual=fod_visual, fod_class=fod_class)


# ------------------------------------------------------------------------------------ PLOP pseudo-labeler
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def _autocast(config: TrainConfig, device: torch.device):
    """``config.amp``'s autocast on CUDA; none on the CPU (training there runs in float32)."""
    dtype = AMP_DTYPES[config.amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None and device.type == "cuda")


@torch.no_grad()
def step_pseudo_labeler(teacher, train_set, *, config: TrainConfig, task, step: int, device: torch.device,
                        env: DistEnv, progress: bool = False) -> PLOPPseudoLabeler:
    """PLOP's pseudo-labeler of step ``step`` (``make_pseudo_labeler``), its per-class entropy thresholds
    computed over the step's training images (augmented as in training, with their own seeds) through
    ``teacher``, the histograms summed over the processes (by ``compute_thresholds``; PLOP computes the
    thresholds of each process on its shard alone)."""
    samples = _Keyed(SeededSamples(train_set, config.seed), ("plop", step))
    loader = _loader(Subset(samples, shard(len(train_set), env)), config, device,
                     batch_size=config.eval_batch_size, shuffle=False)
    # K_total: PLOP divides its entropy by log(K_total).
    pseudo_labeler = make_pseudo_labeler(config, num_classes=len(classes_up_to(task, step)))
    for images, labels in tqdm(loader, desc=f"step {step} PLOP thresholds", leave=False,
                               disable=not (progress and env.is_main), dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        labels = remap_train_labels(labels, task, step).to(device, non_blocking=True).long()
        with _autocast(config, device):
            masks = teacher(images).masks
        pseudo_labeler.update(masks.float(), labels)
    if pseudo_labeler.histogram is None:
        # More processes than images: this one has none, and still takes part in the histograms' sum.
        pseudo_labeler.histogram = torch.zeros(teacher.num_classes, PLOP_NUM_BINS, dtype=torch.int64,
                                               device=device)
    pseudo_labeler.compute_thresholds()
    return pseudo_labeler


# ------------------------------------------------------------------------------------ one step
def step_learning_rate(config: TrainConfig, step: int) -> float:
    return config.lr if step == 0 else config.lr_incremental


def step_epochs(config: TrainConfig, step: int) -> int:
    return config.epochs if step == 0 else config.epochs_incremental


def num_old_classes(task, step: int) -> int:
    return 0 if step == 0 else len(classes_up_to(task, step - 1))


def compile_enabled(config: TrainConfig, device: torch.device) -> bool:
    """Whether ``config.compile`` compiles the training model on ``device`` (``auto``: on CUDA only)."""
    return config.compile == "on" or (config.compile == "auto" and device.type == "cuda")


def make_optimizer(config: TrainConfig, parameters, lr: float) -> torch.optim.Optimizer:
    """A fresh optimiser per step over the trainable parameters (frozen tokens are not among them)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_step(model, teacher, train_set, *, config: TrainConfig, task, step: int, device: torch.device,
               env: DistEnv, progress: bool = True,
               on_epoch: Optional[Callable[[dict], None]] = None,
               on_epoch_state: Optional[Callable[[dict], None]] = None,
               resume_state: Optional[dict] = None) -> list[dict]:
    """Train ``model`` (already holding step ``step``'s classes) on ``train_set`` (step ``step``'s images);
    ``teacher`` is the frozen previous model (``None`` at step 0 and for ``finetune``/``joint``).

    The learning rate follows ``torch.optim.lr_scheduler.PolynomialLR`` over the step's updates: update u of
    U uses lr·(1 − u/U)^poly_power. (PolynomialLR computes it recursively, as a product of per-update
    factors; it differs from that closed form by float rounding, ≤ 3e-14 relative over 60,000 updates.)
    With ``amp="fp16"`` on CUDA the loss goes through a gradient scaler.

    Returns one summary per epoch — ``LossTerms.NAMES`` (each the mean over the epoch's micro-batches of
    every process), ``epoch``, ``lr`` (of the epoch's last update) and ``seconds`` — and passes each to
    ``on_epoch`` as soon as the epoch ends (on every process).

    ``on_epoch_state`` (if given) then receives the training state after that epoch (``epoch`` finished,
    ``model``, ``optimizer``, ``scheduler`` and ``scaler`` state dicts, the PLOP ``thresholds``, the
    ``rng`` states and the ``SHAPE_KEYS`` of ``epoch_state``); ``resume_state``, such a state, continues the
    step after its epoch: the finished epochs are not trained again.
    """
    distill = teacher is not None
    num_old = num_old_classes(task, step)
    micro = config.micro_batch(env.world_size)
    accumulation = config.accumulation_steps(env.world_size)
    epochs = step_epochs(config, step)
    sampler = EffectiveBatchSampler(len(train_set), batch_size=config.batch_size, micro_batch=micro,
                                    accumulation=accumulation, rank=env.rank, world_size=env.world_size,
                                    seed=config.seed, step=step, epochs=epochs,
                                    first_epoch=0 if resume_state is None else resume_state["epoch"])
    loader = _loader(SeededSamples(train_set, config.seed), config, device, batch_sampler=sampler)
    pseudo_labeler = None
    if distill:
        teacher.eval()
    pseudo_labels = distill and config.method != "mib"  # MiB learns from the labels alone
    if pseudo_labels and resume_state is not None:
        pseudo_labeler = make_pseudo_labeler(config, num_classes=len(classes_up_to(task, step)),
                                             thresholds=resume_state["thresholds"].to(device))
    elif pseudo_labels:
        pseudo_labeler = step_pseudo_labeler(teacher, train_set, config=config, task=task, step=step,
                                             device=device, env=env, progress=progress)

    block_hooks = None
    if distill and config.method == "plop":
        # After the thresholds' pass, so the hooks see only training forwards; removed after the loop.
        indices = pod_block_indices(len(model.encoder.blocks), config.plop_pod_blocks)
        block_hooks = (BlockTokenMaps(model.encoder, indices), BlockTokenMaps(teacher.encoder, indices))

    parameters = [p for p in model.parameters() if p.requires_grad]
    base_lr = step_learning_rate(config, step)
    optimizer = make_optimizer(config, parameters, base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16" and device.type == "cuda")
    network = model
    if env.distributed:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp = network
    if compile_enabled(config, device):
        network = torch.compile(network)

    updates_per_epoch = sampler.updates_per_epoch
    total_updates = epochs * updates_per_epoch
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_updates, power=config.poly_power)
    micro_per_epoch = updates_per_epoch * accumulation
    shape = dict(step=step, epochs=epochs, updates_per_epoch=updates_per_epoch, num_classes=model.num_classes,
                 train_images=len(train_set))
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        restore_rng_states(resume_state["rng"])
    model.train()
    summaries: list[dict] = []
    sums = torch.zeros(len(LossTerms.NAMES), device=device)
    guard = _FiniteGuard(step, base_lr, updates_per_epoch, device, env)
    bar = None
    epoch_start = time.perf_counter()
    for micro_index, (images, labels) in enumerate(loader, start=sampler.first_epoch * micro_per_epoch):
        epoch, in_epoch = divmod(micro_index, micro_per_epoch)
        update = micro_index // accumulation
        a = micro_index % accumulation
        if in_epoch == 0:
            bar = tqdm(total=updates_per_epoch, desc=f"step {step} epoch {epoch + 1}/{epochs}", leave=False,
                       disable=not (progress and env.is_main), dynamic_ncols=True)
            epoch_start = time.perf_counter()
        if a == 0:
            lr = optimizer.param_groups[0]["lr"]  # this update's, set by the scheduler
        images = images.to(device, non_blocking=True)
        labels = remap_train_labels(labels, task, step).to(device, non_blocking=True).long()
        teacher_out = None
        if distill:
            with torch.no_grad(), _autocast(config, device):
                teacher_out = teacher(images)
        global_micro = update * env.world_size * accumulation + env.rank * accumulation + a
        torch.manual_seed(derive_seed(config.seed, "dropout", step, global_micro))
        last = a == accumulation - 1
        sync = contextlib.nullcontext() if (last or not env.distributed) else ddp.no_sync()
        with sync:
            with _autocast(config, device):
                student_out = network(images)
            block_maps = None
            if block_hooks is not None:
                grid = student_out.masks.shape[-2:]
                block_maps = (block_hooks[0].maps(*grid), block_hooks[1].maps(*grid))
            terms = compute_losses(config, student_out, labels, num_old=num_old, patch_size=model.patch_size,
                                   teacher=teacher_out, pseudo_labeler=pseudo_labeler, block_maps=block_maps)
            scaler.scale(terms.total / accumulation).backward()
        stacked = terms.stacked()
        sums += stacked
        guard.record(stacked, update)
        if last:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update(1)
            if (update + 1) % FINITE_CHECK_INTERVAL == 0:
                guard.check()
        if in_epoch == micro_per_epoch - 1:
            bar.close()
            guard.check()
            if env.distributed:  # every process has micro_per_epoch micro-batches: the mean of the means
                dist.all_reduce(sums)
                sums /= env.world_size
            means = (sums / micro_per_epoch).tolist()
            sums.zero_()
            summary = dict(zip(LossTerms.NAMES, means))
            summary.update(epoch=epoch + 1, lr=lr, seconds=time.perf_counter() - epoch_start)
            summaries.append(summary)
            if on_epoch is not None:
                on_epoch(summary)
            if on_epoch_state is not None:
                on_epoch_state(dict(shape, epoch=epoch + 1, model=model.state_dict(),
                                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                    scaler=scaler.state_dict(), rng=rng_states(),
                                    thresholds=None if pseudo_labeler is None else pseudo_labeler.thresholds))
            if env.is_main:  # after the epoch's state is saved: a logged epoch is one a resume continues after
                terms_text = " ".join(f"{n} {summary[n]:.4f}" for n in LossTerms.NAMES if n == "total" or
                                      (distill or n == "ce"))
                logger.info("step %d epoch %d/%d: %s lr %.2e (%.1f s)", step, epoch + 1, epochs, terms_text, lr,
                            summary["seconds"])
    if block_hooks is not None:
        for hooks in block_hooks:
            hooks.remove()
    guard.check_weights(model, total_updates)
    return summaries


class _FiniteGuard:
    """Finds the first update whose loss is not finite without a host synchronisation per update: the
    check on the device is recorded in a tensor (the first such update, and which terms), read by
    ``check`` (every FINITE_CHECK_INTERVAL updates and at each epoch's end). ``check_weights`` then makes
    sure the trained weights are finite before the step can be saved (the loss of the last update is
    computed before that update, so an update that breaks the weights shows only there)."""

    NONE = 2**62

    def __init__(self, step: int, lr: float, updates_per_epoch: int, device: torch.device, env: DistEnv):
        self.step, self.lr, self.updates_per_epoch, self.env = step, lr, updates_per_epoch, env
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.terms = torch.zeros(len(LossTerms.NAMES), dtype=torch.int64, device=device)

    def record(self, stacked: torch.Tensor, update: int) -> None:
        finite = torch.isfinite(stacked)
        self.terms |= (~finite).long()
        self.first = torch.where(finite.all(), self.first, self.first.clamp(max=update))

    def check(self) -> None:
        first, terms = self.first.clone(), self.terms.clone()
        if self.env.distributed:  # every process must stop together (a lone raise would hang the others)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            dist.all_reduce(terms, op=dist.ReduceOp.MAX)
        first = int(first)
        if first != self.NONE:
            names = ", ".join(n for n, bad in zip(LossTerms.NAMES, terms.tolist()) if bad)
            raise WorkError(f"{self._where(first)}: the loss is not finite ({names}); {self._advice()}")

    def check_weights(self, model: torch.nn.Module, total_updates: int) -> None:
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        if not bool(finite):
            raise WorkError(f"{self._where(total_updates - 1)}: the weights are not finite after this update; "
                            f"{self._advice()}")

    def _where(self, update: int) -> str:
        epoch, iteration = divmod(update, self.updates_per_epoch)
        return f"step {self.step}, epoch {epoch + 1}, iteration {iteration + 1} of {self.updates_per_epoch}"

    def _advice(self) -> str:
        option = "--lr" if self.step == 0 else "--lr-incremental"
        return (f"step {self.step} is not saved. Lower the learning rate ({option}, now {self.lr:g}) and "
                f"continue with --resume {option} {self.lr / 10:g}")


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(model, images: torch.Tensor, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """(B, H, W) int64 predictions: argmax of the full-resolution logits, in one pass (``eval_mode``
    ``resize``) or by Segmenter's sliding window (``slide``, inference.py)."""
    model.eval()
    images = images.to(device, non_blocking=True)
    with _autocast(config, device):
        if config.eval_mode == "slide":
            window, stride = config.sliding_window()
            logits = sliding_window_logits(model, images, window, stride, config.eval_batch_size)
        else:
            logits = model.logits(images)
    return logits.argmax(1)


@torch.no_grad()
def evaluate(model, val_set, *, config: TrainConfig, task, step: int, device: torch.device, env: DistEnv,
             progress: bool = True) -> ConfusionMatrix:
    """Dataset-level confusion matrix over the classes seen up to ``step`` (labels by ``remap_eval_labels``),
    summed over the processes (each validation image is counted once)."""
    num_classes = len(classes_up_to(task, step))
    matrix = ConfusionMatrix(num_classes)
    indices = shard(len(val_set), env)
    # Sliding windows score full-size images, whose sizes differ: one image per batch (Segmenter's too).
    batch_size = 1 if config.eval_mode == "slide" else config.eval_batch_size
    loader = _loader(Subset(val_set, indices), config, device, batch_size=batch_size, shuffle=False)
    for images, labels in tqdm(loader, desc=f"step {step} eval", leave=False,
                               disable=not (progress and env.is_main), dynamic_ncols=True):
        prediction = predict(model, images, config, device)
        matrix.update(prediction.cpu(), remap_eval_labels(labels, task, step))
    matrix.all_reduce()
    model.train()
    return matrix
