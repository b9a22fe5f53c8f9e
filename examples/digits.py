"""Shared pieces of the examples: scikit-learn's bundled digits data and small models.

The digits dataset (1,797 8x8 greyscale images, 10 classes) ships inside scikit-learn:
nothing is downloaded. Pixels (0..16) are scaled to [0, 1] and then standardised with the
training set's global mean and standard deviation.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.nn import DistillationTokenHead
from kdfast.training import DistillBatch, accuracy, distill

NUM_CLASSES = 10


@dataclass
class Digits:
    """Train/test split as float32 (N, 1, 8, 8) images and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    pixel_min: float  # standardised value of a 0 pixel
    pixel_max: float  # standardised value of a 16 pixel


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Digits:
    """The stratified split (fixed by ``seed``) used by every example."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images / 16.0,
        data.target,
        test_size=test_fraction,
        stratify=data.target,
        random_state=seed,
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def images(a):
        return ((torch.tensor(a, dtype=torch.float32) - mean) / std).unsqueeze(1)

    def labels(a):
        return torch.tensor(a, dtype=torch.int64)

    return Digits(
        images(x_tr), labels(y_tr), images(x_te), labels(y_te), -mean / std, (1 - mean) / std
    )


def class_balanced_subset(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random samples of each class (the student's small training set)."""
    picked = []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(picked)


def random_shift(x: Tensor, generator: torch.Generator | None = None, pad: int = 1) -> Tensor:
    """Translate each image (B, 1, 8, 8) by up to ``pad`` pixels (edge value padding)."""
    batch, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(batch, 1, h, w + 2 * pad)
    shifted = padded.gather(2, rows.to(x.device))
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(batch, 1, h, w)
    return shifted.gather(3, cols.to(x.device))


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU network for 8x8 digits; returns (logits (B, 10), features (B, width * 2)).

    The teacher (width 32) carries the BatchNorm layers whose running statistics SSD-KD's
    generator matches; ``batchnorm=False`` gives a student without them.
    """

    def __init__(self, width: int = 32, batchnorm: bool = True) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(cout)] if batchnorm else []
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm), *norm, nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, width),
            *block(width, width),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            *block(width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, NUM_CLASSES)
        self.feature_dim = 2 * width

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.fc(features), features


class TinyViT(nn.Module):
    """A one-block vision transformer over 2x2 patches (16 tokens) of an 8x8 digit.

    Returns (logits, features): logits as :class:`~kdfast.nn.DistillationTokenHead` gives
    them (a (cls, dist) pair in training with ``distillation_token=True``, else one tensor),
    features = the mean of the patch tokens (B, dim), VkD's student feature.
    """

    def __init__(self, dim: int = 32, depth: int = 1, distillation_token: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, kernel_size=2, stride=2)  # (B, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.tokens = DistillationTokenHead(dim, NUM_CLASSES, distillation_token)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim

    def forward(self, x: Tensor):
        patches = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, 16, dim)
        encoded = self.norm(self.encoder(self.tokens.prepend(patches)))
        return self.tokens(encoded), self.tokens.patch_tokens(encoded).mean(dim=1)


def train_teacher(
    data: Digits, seed: int = 0, epochs: int = 30, log=print, width: int = 32
) -> DigitsCNN:
    """Train the BatchNorm CNN teacher on the full training split; returns it in eval mode."""
    torch.manual_seed(seed)
    teacher = DigitsCNN(width)

    def loss_fn(batch: DistillBatch) -> Tensor:
        return F.cross_entropy(batch.student_out[0], batch.labels)

    distill(
        teacher,
        None,
        data.x_train,
        data.y_train,
        loss_fn,
        epochs=epochs,
        lr=3e-3,
        generator=torch.Generator().manual_seed(seed),
        log=log,
    )
    acc = accuracy(teacher, data.x_test, data.y_test)
    if log is not None:
        log(f"teacher test accuracy {acc:.4f}")
    return teacher.eval()


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """mean / std (sample std over seeds) of accuracy and mean seconds per method."""
    table = {}
    for name, runs in results.items():
        accs = [r["accuracy"] for r in runs]
        table[name] = {
            "accuracy_mean": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seconds_mean": statistics.fmean(r["seconds"] for r in runs),
            "seeds": len(runs),
        }
    return table
