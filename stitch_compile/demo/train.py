"""The quick start's training: three ViT anchors, LS-init stitching, stitched fine-tuning.

Mirrors SN-Net v1 at toy scale so the real effect shows: anchors of increasing width trained with
one recipe (wider learns faster in a fixed budget, as DeiT-Ti/S/B differ in accuracy), stitched
with :func:`stitch_compile.stitch`, then trained with one random config per step and every
parameter trainable, as the public code does. Everything is seeded: same seed, same network.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..model.families.vit_anchor import HEAD_DIM
from ..model.lsinit import stitch
from ..model.network import StitchableNet
from .data import IMG_SIZE, NUM_CLASSES, PATCH_SIZE, Digits, digits


@dataclass(frozen=True)
class Recipe:
    """Sizes and schedule; ``lr`` is for width 64 and scales by sqrt(64 / width).

    Widths double (32, 64, 128) so capacity, not noise, orders the anchors; depth 6 gives 35
    configs (depth 4: 23). Fine-tuning is gentle: a larger rate trades anchor accuracy away.
    """

    widths: tuple[int, ...] = (32, 64, 128)
    depth: int = 6
    anchor_epochs: int = 12
    finetune_steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    finetune_lr: float = 1.5e-4
    weight_decay: float = 0.05
    calib_count: int = 256


RECIPES = {"normal": Recipe(), "fast": Recipe(depth=4, anchor_epochs=8, finetune_steps=120, finetune_lr=2.5e-4)}


@dataclass
class DemoRun:
    """A trained stitched network, the anchors it was stitched from, the data, and stage timings."""

    net: StitchableNet
    anchors: list[VisionTransformer]
    data: Digits
    seconds: dict[str, float] = field(default_factory=dict)

    def test_accuracy(self) -> dict[int, float]:
        """Top-1 accuracy of every config on the 450 held-out digits."""
        return evaluate(self.net, self.data.test_x, self.data.test_y)


def make_anchor(width: int, depth: int) -> VisionTransformer:
    """A DeiT-style ViT for 8x8 digits; heads = width / 64 as the checkpoint detection assumes."""
    return VisionTransformer(img_size=IMG_SIZE, patch_size=PATCH_SIZE, num_classes=NUM_CLASSES,
                             embed_dim=width, depth=depth, num_heads=max(1, width // HEAD_DIM))


def _batches(data: Digits, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled epochs of training batches."""
    while True:
        order = torch.randperm(len(data.train_y), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield data.train_x[idx], data.train_y[idx]


def _train(module: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: Digits,
           steps: int, lr: float, recipe: Recipe, gen: torch.Generator) -> None:
    """AdamW with one warm-up epoch and cosine decay to zero over ``steps``."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    warmup = min(steps, math.ceil(len(data.train_y) / recipe.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    module.train()
    for _, (x, y) in zip(range(steps), _batches(data, recipe.batch_size, gen)):
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()
        sched.step()
    module.eval()


def train_anchor(width: int, data: Digits, recipe: Recipe, seed: int) -> VisionTransformer:
    """One anchor from scratch; ``seed`` fixes its initialisation and its batches."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = make_anchor(width, recipe.depth)
    steps = recipe.anchor_epochs * math.ceil(len(data.train_y) / recipe.batch_size)
    lr = recipe.lr * math.sqrt(HEAD_DIM / width)
    _train(vit, lambda x, y: F.cross_entropy(vit(x), y), data, steps, lr, recipe, torch.Generator().manual_seed(seed))
    return vit


def finetune(net: StitchableNet, data: Digits, recipe: Recipe, seed: int) -> None:
    """Stitched training: each step trains one config drawn uniformly from all of them."""
    gen = torch.Generator().manual_seed(seed)
    ids = net.configs.ids

    def loss(x, y):
        config = ids[int(torch.randint(len(ids), (), generator=gen))]
        return F.cross_entropy(net(x, config), y)

    _train(net, loss, data, recipe.finetune_steps, recipe.finetune_lr, recipe, gen)


@torch.no_grad()
def evaluate(net: StitchableNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> dict[int, float]:
    """Top-1 accuracy per config id."""
    net.eval()
    out = {}
    for config in net.configs:
        correct = sum(int((net(images[i:i + batch_size], config).argmax(1) == labels[i:i + batch_size]).sum())
                      for i in range(0, len(labels), batch_size))
        out[config.id] = correct / len(labels)
    return out


def train_demo(fast: bool = False, seed: int = 0, threads: int | None = 1,
               progress: Callable[[str], None] | None = None) -> DemoRun:
    """Train anchors, stitch (LS init on training images), fine-tune; ``fast`` is the CI recipe.

    One thread by default: these matmuls are tiny, a second thread gains at most 1.3x and, on
    cores shared with other work, its synchronisation made training up to 10x slower.
    ``threads=None`` keeps torch's setting.
    """
    recipe = RECIPES["fast" if fast else "normal"]
    say = progress or (lambda _msg: None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = digits()
        seconds = {}
        start = time.perf_counter()
        anchors = []
        for a, width in enumerate(recipe.widths):
            say(f"training anchor {a} (width {width}, {recipe.depth} blocks)")
            anchors.append(train_anchor(width, data, recipe, seed + a))
        seconds["anchors"] = time.perf_counter() - start

        start = time.perf_counter()
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
        calib = data.train_x[order[:recipe.calib_count]]
        net = stitch(anchors, calib)
        seconds["stitch"] = time.perf_counter() - start

        start = time.perf_counter()
        say(f"stitched training of {len(net.configs)} configs ({recipe.finetune_steps} steps)")
        finetune(net, data, recipe, seed)
        seconds["finetune"] = time.perf_counter() - start
        return DemoRun(net, anchors, data, seconds)
    finally:
        torch.set_num_threads(previous_threads)
