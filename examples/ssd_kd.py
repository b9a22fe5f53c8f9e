"""Data-free distillation on digits in the SSD-KD style: no real image reaches the student.

A class-conditional generator synthesises 8x8 inputs against the frozen BatchNorm CNN
teacher (L_G = L_BN + phi * L_task - lambda_adv * L_KD); a prioritized replay buffer holding
about 10% of the training-set size feeds the student (L_S = sum w KL / sum w, priorities
w * KL). The student is then scored on the real test set, against

* the same pipeline with uniform replay (buffer alpha = 0: uniform sampling, weights 1), and
* the same student architecture trained on the real training split (cross-entropy).

The real training images are used only to train the teacher (and the real-data baseline).

    python examples/ssd_kd.py            # full run (a few minutes on 2 CPU cores)
    python examples/ssd_kd.py --quick    # a seconds-long smoke run (CI)

Writes ``ssd_kd_results.json`` and ``ssd_kd_results.png`` to ``--out-dir``.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import (  # noqa: E402
    NUM_CLASSES,
    Digits,
    DigitsCNN,
    load_digits,
    summarise,
    train_teacher,
)

from kdfast.datafree import Generator, SSDKDSynthesizer  # noqa: E402
from kdfast.sampling import PrioritizedReplayBuffer  # noqa: E402
from kdfast.training import accuracy, distill  # noqa: E402

VARIANTS = ("ssd_kd", "uniform_replay", "real_data")


def make_student(args: argparse.Namespace) -> DigitsCNN:
    return DigitsCNN(width=args.student_width, batchnorm=False)


def run_datafree(
    data: Digits,
    teacher: DigitsCNN,
    alpha: float,
    seed: int,
    args: argparse.Namespace,
    log: Callable[[str], None] | None,
) -> dict:
    """One data-free student; returns its accuracy, time and loss curves."""
    torch.manual_seed(seed)
    student = make_student(args)
    generator = Generator(
        data.x_train.shape[1:], NUM_CLASSES, low=data.pixel_min, high=data.pixel_max
    )
    capacity = max(args.batch_size, round(args.buffer_fraction * len(data.y_train)))
    buffer = PrioritizedReplayBuffer(capacity, alpha=alpha, beta=0.4)
    synth = SSDKDSynthesizer(
        teacher,
        student,
        generator,
        buffer,
        torch.optim.Adam(student.parameters(), lr=args.lr),
        generator_lr=args.generator_lr,
        lambda_adv=args.lambda_adv,
        temperature=args.temperature,
        bn_layer_weights=[args.first_bn_weight] + [1.0] * (args.bn_layers - 1),
        seed=seed,
    )
    start = time.perf_counter()
    history = synth.run(
        args.rounds,
        batch_size=args.batch_size,
        student_steps=args.student_steps,
        # progress lines report test accuracy (monitoring only: nothing is selected on it)
        evaluate=lambda: accuracy(student, data.x_test, data.y_test),
        log=log,
        log_every=max(1, args.rounds // 5),
    )
    seconds = time.perf_counter() - start
    return {
        "seed": seed,
        "accuracy": accuracy(student, data.x_test, data.y_test),
        "seconds": seconds,
        "buffer_capacity": capacity,
        "l_g": history.l_g,
        "l_bn": history.l_bn,
        "l_task": history.l_task,
        "l_kd": history.l_kd,
        "l_s": history.l_s,
        "evals": history.evals,  # (round, test accuracy) at each progress line
    }


def run_real(
    data: Digits, seed: int, args: argparse.Namespace, log: Callable[[str], None] | None
) -> dict:
    """The student architecture trained on the real training split with cross-entropy."""
    torch.manual_seed(seed)
    student = make_student(args)
    history = distill(
        student,
        None,
        data.x_train,
        data.y_train,
        lambda b: F.cross_entropy(b.student_out[0], b.labels),
        epochs=args.real_epochs,
        lr=args.lr,
        generator=torch.Generator().manual_seed(seed),
        log=log,
    )
    return {
        "seed": seed,
        "accuracy": accuracy(student, data.x_test, data.y_test),
        "seconds": history.seconds,
        "epoch_losses": history.epoch_losses,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=400, help="synthesis rounds")
    parser.add_argument("--student-steps", type=int, default=5, help="replay steps per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--buffer-fraction", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3, help="student learning rate")
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    parser.add_argument("--lambda-adv", type=float, default=5.0, help="adversarial KL weight")
    parser.add_argument("--temperature", type=float, default=4.0, help="KL temperature")
    parser.add_argument(
        "--first-bn-weight", type=float, default=10.0, help="L_BN weight of the first layer"
    )
    parser.add_argument("--student-width", type=int, default=16)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--real-epochs", type=int, default=15)
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, a few rounds (CI smoke)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.teacher_epochs, args.real_epochs = 1, 10, 2, 2
    return args


def plot(results: dict[str, list[dict]], table: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(table)
    left.bar(
        names,
        [100 * table[n]["accuracy_mean"] for n in names],
        yerr=[100 * table[n]["accuracy_std"] for n in names],
        capsize=4,
        color=["tab:blue", "tab:orange", "grey"],
    )
    left.axhline(10, color="k", lw=0.8, ls=":", label="chance")
    left.set_ylabel("real test accuracy (%)")
    left.legend(fontsize=8)
    for name in ("ssd_kd", "uniform_replay"):
        right.plot(results[name][0]["l_s"], label=f"L_S {name} (seed 0)", lw=0.8)
    right.set_xlabel("round")
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits()
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images")
    teacher = train_teacher(data, seed=0, epochs=args.teacher_epochs)
    teacher.requires_grad_(False)
    args.bn_layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    teacher_accuracy = accuracy(teacher, data.x_test, data.y_test)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, alpha in (("ssd_kd", 0.6), ("uniform_replay", 0.0)):
            print(f"seed {seed} {name} (alpha = {alpha}):", flush=True)
            results[name].append(run_datafree(data, teacher, alpha, seed, args, print))
        results["real_data"].append(run_real(data, seed, args, None))
        for name in VARIANTS:
            run = results[name][-1]
            print(
                f"seed {seed} {name:15s} accuracy {run['accuracy']:.4f}  ({run['seconds']:.1f} s)"
            )
    table = summarise(results)
    print(f"\nteacher: {100 * teacher_accuracy:.2f}% on the real test set")
    print("| student | real test accuracy (mean +- std) | wall time per run (s) |")
    print("|---|---|---|")
    for name, row in table.items():
        print(
            f"| {name} | {100 * row['accuracy_mean']:.2f} +- {100 * row['accuracy_std']:.2f} "
            f"| {row['seconds_mean']:.1f} |"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "teacher_accuracy": teacher_accuracy,
        "table": table,
        "runs": results,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out_dir, "ssd_kd_results.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(results, table, os.path.join(args.out_dir, "ssd_kd_results.png"))
    return report


if __name__ == "__main__":
    main()
