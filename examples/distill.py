"""Distil a BatchNorm CNN teacher into a tiny ViT student on scikit-learn's digits.

Every kdfast method against the same student trained without a teacher, over several seeds:
no KD, Hinton KD, DeiT soft and hard (class + distillation-token heads), DIST, RKD and VkD
(orthogonal projector + standardised teacher). The teacher sees the whole training split;
each student sees only ``--per-class`` labelled images per class (a fresh random subset
per seed, shared by every method of that seed), the small-data regime where a teacher helps.

    python examples/distill.py              # full run (a few minutes on 2 CPU cores)
    python examples/distill.py --quick      # a seconds-long smoke run (CI)

Prints a table of test accuracy (mean +- std over seeds) and wall time per method and writes
``distill_results.json`` and ``distill_results.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import (  # noqa: E402
    Digits,
    DigitsCNN,
    TinyViT,
    class_balanced_subset,
    load_digits,
    random_shift,
    summarise,
    train_teacher,
)

from kdfast.losses import DeiTDistillationLoss, DISTLoss, KDLoss, RKDLoss, VkDLoss  # noqa: E402
from kdfast.training import DistillBatch, accuracy, distill  # noqa: E402

METHODS = ("no_kd", "kd", "deit_soft", "deit_hard", "dist", "rkd", "vkd")


def make_method(
    name: str, student_dim: int, teacher_dim: int
) -> tuple[bool, Callable[[DistillBatch], Tensor], list[torch.nn.Module]]:
    """(distillation_token, loss_fn, extra trainable modules) of one method.

    Student and teacher outputs are (logits, features); the DeiT student's logits are a
    (cls, dist) pair in training mode. Every method keeps the label cross-entropy.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    ce = F.cross_entropy
    if name in ("deit_soft", "deit_hard"):
        deit = DeiTDistillationLoss(ce, None, name.split("_")[1], alpha=0.5, temperature=3.0)
        return True, lambda b: deit(b.inputs, b.student_out[0], b.labels, b.teacher_out[0]), []
    extra: list[torch.nn.Module] = []
    if name == "no_kd":

        def term(b: DistillBatch) -> Tensor:
            return torch.zeros((), device=b.labels.device)
    elif name == "kd":
        kd = KDLoss(temperature=4.0)

        def term(b: DistillBatch) -> Tensor:
            return kd(b.student_out[0], b.teacher_out[0])
    elif name == "dist":
        # CIFAR recipe: CE + DIST(beta 2, gamma 2, T 4)
        dist = DISTLoss(beta=2.0, gamma=2.0, temperature=4.0)

        def term(b: DistillBatch) -> Tensor:
            return dist(b.student_out[0], b.teacher_out[0])
    elif name == "rkd":
        rkd = RKDLoss(distance_weight=25.0, angle_weight=50.0)  # classification recipe

        def term(b: DistillBatch) -> Tensor:
            return rkd(b.student_out[1], b.teacher_out[1])
    else:  # vkd: orthogonal projection of the student feature, standardised teacher feature
        vkd = VkDLoss(student_dim, teacher_dim, normalize="standardize")
        extra.append(vkd)

        def term(b: DistillBatch) -> Tensor:
            return vkd(b.student_out[1], b.teacher_out[1])

    return False, lambda b: ce(b.student_out[0], b.labels) + term(b), extra


def run_method(
    name: str,
    data: Digits,
    teacher: DigitsCNN,
    subset: Tensor,
    seed: int,
    args: argparse.Namespace,
    log: Callable[[str], None] | None,
) -> tuple[float, float, list[float]]:
    """Train one student on ``data.x_train[subset]``; (test accuracy, seconds, epoch losses)."""
    token, loss_fn, extra = make_method(name, args.dim, teacher.feature_dim)
    torch.manual_seed(seed)
    student = TinyViT(dim=args.dim, distillation_token=token)
    x, y = data.x_train[subset], data.y_train[subset]
    start = time.perf_counter()
    history = distill(
        student,
        teacher,
        x,
        y,
        loss_fn,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.05,
        extra_params=[p for m in extra for p in m.parameters()],
        augment=random_shift if args.augment else None,
        generator=torch.Generator().manual_seed(seed),
        log=log,
        log_every=max(1, args.epochs // 2),
    )
    seconds = time.perf_counter() - start
    return accuracy(student, data.x_test, data.y_test), seconds, history.epoch_losses


def format_table(table: dict[str, dict]) -> str:
    lines = ["| method | test accuracy (mean +- std) | wall time per run (s) |", "|---|---|---|"]
    for name, row in table.items():
        lines.append(
            f"| {name} | {100 * row['accuracy_mean']:.2f} +- {100 * row['accuracy_std']:.2f} "
            f"| {row['seconds_mean']:.2f} |"
        )
    return "\n".join(lines)


def plot(table: dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    means = [100 * table[n]["accuracy_mean"] for n in names]
    stds = [100 * table[n]["accuracy_std"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color=["grey"] + ["tab:blue"] * (len(names) - 1))
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10, help="student images per class")
    parser.add_argument("--epochs", type=int, default=80, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dim", type=int, default=32, help="student token width")
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random 1-pixel shifts of the student's (and teacher's) training images",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2 seeds, few epochs (CI smoke)")
    parser.add_argument("--verbose", action="store_true", help="per-epoch progress")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = 2, 3, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits()
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images")
    teacher = train_teacher(data, seed=0, epochs=args.teacher_epochs)
    teacher_accuracy = accuracy(teacher, data.x_test, data.y_test)
    results: dict[str, list[dict]] = {name: [] for name in args.methods}
    for seed in range(args.seeds):
        subset = class_balanced_subset(
            data.y_train, args.per_class, torch.Generator().manual_seed(1000 + seed)
        )
        for name in args.methods:
            acc, seconds, losses = run_method(
                name, data, teacher, subset, seed, args, print if args.verbose else None
            )
            results[name].append(
                {"seed": seed, "accuracy": acc, "seconds": seconds, "epoch_losses": losses}
            )
            print(f"seed {seed} {name:10s} accuracy {acc:.4f}  ({seconds:.1f} s)", flush=True)
    table = summarise(results)
    print(f"\nteacher (DigitsCNN, full training split): {100 * teacher_accuracy:.2f}%")
    print(
        f"students (TinyViT, {args.per_class} images per class, {args.epochs} epochs, "
        f"{args.seeds} seeds):"
    )
    print(format_table(table))
    os.makedirs(args.out_dir, exist_ok=True)
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "teacher_accuracy": teacher_accuracy,
        "table": table,
        "runs": results,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out_dir, "distill_results.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(
        table,
        os.path.join(args.out_dir, "distill_results.png"),
        f"digits: TinyViT student, {args.per_class}/class, {args.seeds} seeds; "
        f"teacher {100 * teacher_accuracy:.1f}%",
    )
    return report


if __name__ == "__main__":
    main()
