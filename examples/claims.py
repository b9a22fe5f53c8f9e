"""Each method in its home setting: a small test of what each paper claims, on digits.

One ``--claim`` per method (protocol: examples/README.md, section 3, fixed before the runs):

* ``rkd``: metric learning on unseen classes; an RKD student vs a triplet-loss student vs
  the teacher, recall@1 / recall@4 on digits 5-9 after training on digits 0-4.
* ``vkd``: feature distillation with an orthogonal projector (VkD) vs a plain linear one,
  both against the standardised teacher feature.
* ``dist``: KD and DIST students across teachers of growing strength.
* ``deit``: DeiT's hard vs soft distillation of a convnet teacher into a small ViT.
* ``ssd_kd``: prioritized vs uniform replay at fixed numbers of synthetic samples.

Every comparison is a mean of paired per-seed differences with its 95% t-interval.

    python examples/claims.py --claim all     # full runs (about 15 CPU-minutes)
    python examples/claims.py --claim rkd --quick

Writes ``claim_<name>_results.json`` and ``claim_<name>_results.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distill as distill_example  # noqa: E402
import ssd_kd as ssd_kd_example  # noqa: E402
from digits import (  # noqa: E402
    Digits,
    DigitsCNN,
    TinyViT,
    class_balanced_subset,
    load_digits,
    random_shift,
    train_teacher,
)

from kdfast.functional import vkd_loss  # noqa: E402
from kdfast.losses import DeiTDistillationLoss, RKDLoss, VkDLoss  # noqa: E402
from kdfast.training import DistillBatch, accuracy, distill, predict_logits  # noqa: E402

CLAIMS = ("rkd", "vkd", "dist", "deit", "ssd_kd")
#: the protocol's settings (full run) and the reduced --quick ones (seconds, for the tests)
CONFIGS = {
    "rkd": dict(seeds=5, epochs=40, lr=1e-3, margin=0.2, teacher_dim=64, student_dim=16),
    "vkd": dict(seeds=10, epochs=60, per_class=30, teacher_epochs=15),
    "dist": dict(seeds=5, epochs=80, teacher_epochs=(1, 3, 10, 30)),
    "deit": dict(seeds=5, epochs=30, teacher_epochs=15, per_class=None),  # None: all
    "ssd_kd": dict(seeds=5, rounds=300, teacher_epochs=15),
}
QUICK = {
    "rkd": dict(seeds=2, epochs=1),
    "vkd": dict(seeds=2, epochs=2, per_class=5, teacher_epochs=1),
    "dist": dict(seeds=2, epochs=2, teacher_epochs=(1, 2)),
    "deit": dict(seeds=2, epochs=1, teacher_epochs=1, per_class=10),
    "ssd_kd": dict(seeds=2, rounds=5, teacher_epochs=1),
}


# ---------------------------------------------------------------- statistics


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% t-interval (mean +- t_{0.975, n-1} s / sqrt(n)) of per-seed values."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    half = t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "half": half, "low": mean - half, "high": mean + half, "n": n}


def paired(a: list[dict], b: list[dict], key: str) -> dict:
    """mean_ci of run a[i][key] - b[i][key] over seeds (runs in seed order)."""
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    return mean_ci([x[key] - y[key] for x, y in zip(a, b, strict=True)])


def fmt(ci: dict, scale: float = 100.0) -> str:
    return f"{scale * ci['mean']:.2f} +- {scale * ci['half']:.2f}"


def _teacher(data: Digits, epochs: int, cache: dict) -> DigitsCNN:
    """Section 1's teacher (seed 0) trained for ``epochs``, shared by the claims of one run."""
    if epochs not in cache:
        cache[epochs] = train_teacher(data, seed=0, epochs=epochs, log=None).requires_grad_(False)
    return cache[epochs]


def _fit(student, teacher, x, y, loss_fn, seed, cfg, extra=(), **kw) -> float:
    """Train with section 1's recipe (AdamW, 1-pixel shifts); returns the test accuracy."""
    distill(
        student,
        teacher,
        x,
        y,
        loss_fn,
        epochs=cfg["epochs"],
        batch_size=kw.get("batch_size", 32),
        lr=3e-3,
        weight_decay=0.05,
        extra_params=[p for m in extra for p in m.parameters()],
        augment=random_shift,
        generator=torch.Generator().manual_seed(seed),
    )
    return accuracy(student, cfg["data"].x_test, cfg["data"].y_test)


# ---------------------------------------------------------------- RKD (metric learning)


class EmbeddingNet(nn.Module):
    """DigitsCNN body + a linear embedding (B, dim)."""

    def __init__(self, width: int, dim: int, batchnorm: bool) -> None:
        super().__init__()
        self.cnn = DigitsCNN(width, batchnorm)
        self.embed = nn.Linear(self.cnn.feature_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.cnn(x)[1])


def batch_hard_triplet(emb: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Triplet loss on L2-normalised embeddings, hardest positive and negative per anchor."""
    e = F.normalize(emb, dim=1)
    d = (2 - 2 * e @ e.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos = d.masked_fill(~same | eye, 0.0).amax(dim=1)
    neg = d.masked_fill(same, math.inf).amin(dim=1)
    return F.relu(pos - neg + margin).mean()


def recall_at_k(emb: Tensor, labels: Tensor, ks=(1, 4)) -> dict[str, float]:
    """Fraction of queries with a same-class image among their k nearest others."""
    d = torch.cdist(emb.double(), emb.double())
    d.fill_diagonal_(math.inf)
    hits = labels[d.topk(max(ks), largest=False).indices] == labels[:, None]
    return {f"recall@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def claim_rkd(data: Digits, cfg: dict, cache: dict) -> dict:
    seen, unseen = data.y_train < 5, data.y_train >= 5
    x, y = data.x_train[seen], data.y_train[seen]
    x_q = torch.cat([data.x_train[unseen], data.x_test[data.y_test >= 5]])
    y_q = torch.cat([data.y_train[unseen], data.y_test[data.y_test >= 5]])
    rkd = RKDLoss(distance_weight=1.0, angle_weight=2.0)  # the metric-learning weights

    def triplet(b: DistillBatch) -> Tensor:
        return batch_hard_triplet(b.student_out, b.labels, cfg["margin"])

    def relational(b: DistillBatch) -> Tensor:
        return rkd(b.student_out, F.normalize(b.teacher_out, dim=1))

    runs: dict[str, list[dict]] = {"teacher": [], "triplet": [], "rkd": []}
    for seed in range(cfg["seeds"]):
        models = {}
        for arm, width, dim, loss_fn in (
            ("teacher", 32, cfg["teacher_dim"], triplet),
            ("triplet", 8, cfg["student_dim"], triplet),
            ("rkd", 8, cfg["student_dim"], relational),
        ):
            torch.manual_seed(seed)
            model = EmbeddingNet(width, dim, batchnorm=arm == "teacher")
            start = time.perf_counter()
            distill(
                model,
                models["teacher"] if arm == "rkd" else None,
                x,
                y,
                loss_fn,
                epochs=cfg["epochs"],
                lr=cfg["lr"],
                generator=torch.Generator().manual_seed(seed),
            )
            emb = predict_logits(model, x_q)
            if arm != "rkd":  # trained on the unit sphere; the RKD student is not normalised
                emb = F.normalize(emb, dim=1)
            row = {"seed": seed, **recall_at_k(emb, y_q), "seconds": time.perf_counter() - start}
            models[arm] = model.eval()
            runs[arm].append(row)
            print(f"rkd seed {seed} {arm:8s} R@1 {row['recall@1']:.4f} R@4 {row['recall@4']:.4f}")
    params = {
        a: sum(p.numel() for p in EmbeddingNet(w, d, a == "teacher").parameters())
        for a, w, d in (("teacher", 32, cfg["teacher_dim"]), ("rkd", 8, cfg["student_dim"]))
    }
    comparisons = {}
    for key in ("recall@1", "recall@4"):
        comparisons[f"rkd - triplet, {key}"] = paired(runs["rkd"], runs["triplet"], key)
        comparisons[f"rkd - teacher, {key}"] = paired(runs["rkd"], runs["teacher"], key)
    main = comparisons["rkd - triplet, recall@1"]
    to_teacher = comparisons["rkd - teacher, recall@1"]["mean"]
    verdict = (
        ("reproduced at small scale" if main["low"] > 0 else "not reproduced")
        + f": RKD - triplet R@1 {fmt(main)} points; RKD - teacher {100 * to_teacher:+.2f} "
        + ("(approaches or beats it)" if to_teacher >= -0.02 else "(does not approach it)")
    )
    pixels = recall_at_k(x_q.flatten(1), y_q)  # reference only: raw-pixel retrieval
    print(f"rkd raw pixels R@1 {pixels['recall@1']:.4f} R@4 {pixels['recall@4']:.4f}")
    return {
        "pixels": pixels,
        "runs": runs,
        "metrics": ["recall@1", "recall@4"],
        "comparisons": comparisons,
        "verdict": verdict,
        "parameters": params,
        "queries": len(y_q),
        "train": len(y),
    }


# ---------------------------------------------------------------- VkD (projector)


def claim_vkd(data: Digits, cfg: dict, cache: dict) -> dict:
    teacher = _teacher(data, cfg["teacher_epochs"], cache)
    runs: dict[str, list[dict]] = {"ce": [], "linear": [], "orthogonal": []}
    for seed in range(cfg["seeds"]):
        subset = class_balanced_subset(
            data.y_train, cfg["per_class"], torch.Generator().manual_seed(1000 + seed)
        )
        for arm in runs:
            torch.manual_seed(seed)
            student = TinyViT(dim=32)
            proj, feature = None, None
            if arm == "linear":
                proj = nn.Linear(student.feature_dim, teacher.feature_dim, bias=False)

                def feature(s, t, proj=proj):
                    return vkd_loss(proj(s), t, "standardize")
            elif arm == "orthogonal":
                proj = feature = VkDLoss(student.feature_dim, teacher.feature_dim, "standardize")

            def loss_fn(b: DistillBatch, feature=feature) -> Tensor:
                ce = F.cross_entropy(b.student_out[0], b.labels)
                return ce if feature is None else ce + feature(b.student_out[1], b.teacher_out[1])

            start = time.perf_counter()
            acc = _fit(
                student,
                teacher,
                data.x_train[subset],
                data.y_train[subset],
                loss_fn,
                seed,
                cfg,
                extra=[proj] if proj is not None else (),
            )
            runs[arm].append(
                {"seed": seed, "accuracy": acc, "seconds": time.perf_counter() - start}
            )
            print(f"vkd seed {seed} {arm:10s} accuracy {acc:.4f}", flush=True)
    comparisons = {
        "orthogonal - linear": paired(runs["orthogonal"], runs["linear"], "accuracy"),
        "orthogonal - ce": paired(runs["orthogonal"], runs["ce"], "accuracy"),
        "linear - ce": paired(runs["linear"], runs["ce"], "accuracy"),
    }
    return _accuracy_claim(
        runs, comparisons, "orthogonal - linear", teacher, data, "; whitening: not testable here"
    )


def _accuracy_claim(runs, comparisons, main_key, teacher, data: Digits, note="") -> dict:
    """The result of a claim judged on one paired accuracy comparison: reproduced when its
    95% interval lies above 0 (the pre-declared rule, examples/README.md section 3)."""
    main = comparisons[main_key]
    verdict = ("reproduced at small scale" if main["low"] > 0 else "not reproduced") + (
        f": {main_key} {fmt(main)} points{note}"
    )
    return {
        "runs": runs,
        "metrics": ["accuracy"],
        "comparisons": comparisons,
        "verdict": verdict,
        "teacher_accuracy": accuracy(teacher, data.x_test, data.y_test),
    }


# ---------------------------------------------------------------- DIST (stronger teachers)


def claim_dist(data: Digits, cfg: dict, cache: dict) -> dict:
    args = distill_example.parse_args([])
    args.epochs = cfg["epochs"]
    teachers = {}
    for e in cfg["teacher_epochs"]:
        t = _teacher(data, e, cache)
        probs = predict_logits(t, data.x_test).softmax(dim=1)
        teachers[e] = {
            "accuracy": accuracy(t, data.x_test, data.y_test),
            "confidence": probs.amax(dim=1).mean().item(),
        }
        print(
            f"dist teacher {e:3d} epochs: accuracy {teachers[e]['accuracy']:.4f}, "
            f"mean max-probability {teachers[e]['confidence']:.4f}"
        )
    runs: dict[str, list[dict]] = {"no_kd": []}
    runs.update({f"{m}@{e}": [] for e in cfg["teacher_epochs"] for m in ("kd", "dist")})
    for seed in range(cfg["seeds"]):
        subset = class_balanced_subset(
            data.y_train, args.per_class, torch.Generator().manual_seed(1000 + seed)
        )
        for arm in runs:
            method, _, e = arm.partition("@")
            teacher = _teacher(data, int(e or cfg["teacher_epochs"][0]), cache)
            acc, seconds, _ = distill_example.run_method(
                method, data, teacher, subset, seed, args, None
            )
            runs[arm].append({"seed": seed, "accuracy": acc, "seconds": seconds})
            print(f"dist seed {seed} {arm:8s} accuracy {acc:.4f}", flush=True)
    es = cfg["teacher_epochs"]
    comparisons = {
        f"dist - kd @{e}": paired(runs[f"dist@{e}"], runs[f"kd@{e}"], "accuracy") for e in es
    }
    for m in ("kd", "dist"):
        comparisons[f"{m}: @{es[-1]} - @{es[-2]}"] = paired(
            runs[f"{m}@{es[-1]}"], runs[f"{m}@{es[-2]}"], "accuracy"
        )
    kd_drop, dist_drop = (
        comparisons[f"kd: @{es[-1]} - @{es[-2]}"],
        comparisons[f"dist: @{es[-1]} - @{es[-2]}"],
    )
    weak, strong = comparisons[f"dist - kd @{es[0]}"], comparisons[f"dist - kd @{es[-1]}"]
    rule_a = kd_drop["high"] < 0 and not dist_drop["high"] < 0
    rule_b = strong["low"] > 0 and not weak["low"] > 0 and strong["mean"] > weak["mean"]
    verdict = ("reproduced at small scale" if rule_a or rule_b else "not reproduced") + (
        f": KD strongest - second {fmt(kd_drop)}, DIST {fmt(dist_drop)}; DIST - KD "
        f"{fmt(weak)} (weakest teacher) -> {fmt(strong)} (strongest)"
    )
    return {
        "runs": runs,
        "metrics": ["accuracy"],
        "comparisons": comparisons,
        "verdict": verdict,
        "teachers": teachers,
    }


# ---------------------------------------------------------------- DeiT (hard vs soft)


def claim_deit(data: Digits, cfg: dict, cache: dict) -> dict:
    teacher = _teacher(data, cfg["teacher_epochs"], cache)
    arms = {"none": None, "soft": ("soft", 0.1), "hard": ("hard", 0.5), "soft_a05": ("soft", 0.5)}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    x, y = data.x_train, data.y_train
    for seed in range(cfg["seeds"]):
        if cfg["per_class"] is not None:  # the quick runs only: a few images per class
            g = torch.Generator().manual_seed(1000 + seed)
            subset = class_balanced_subset(data.y_train, cfg["per_class"], g)
            x, y = data.x_train[subset], data.y_train[subset]
        for arm, spec in arms.items():
            torch.manual_seed(seed)
            student = TinyViT(dim=32, distillation_token=spec is not None)
            if spec is None:

                def loss_fn(b: DistillBatch) -> Tensor:
                    return F.cross_entropy(b.student_out[0], b.labels)
            else:
                deit = DeiTDistillationLoss(
                    F.cross_entropy, None, spec[0], alpha=spec[1], temperature=3.0
                )

                def loss_fn(b: DistillBatch, deit=deit) -> Tensor:
                    return deit(b.inputs, b.student_out[0], b.labels, b.teacher_out[0])

            start = time.perf_counter()
            acc = _fit(student, teacher, x, y, loss_fn, seed, cfg, batch_size=min(64, len(y)))
            runs[arm].append(
                {"seed": seed, "accuracy": acc, "seconds": time.perf_counter() - start}
            )
            print(f"deit seed {seed} {arm:8s} accuracy {acc:.4f}", flush=True)
    comparisons = {
        "hard - soft": paired(runs["hard"], runs["soft"], "accuracy"),
        "hard - soft_a05": paired(runs["hard"], runs["soft_a05"], "accuracy"),
        **{f"{a} - none": paired(runs[a], runs["none"], "accuracy") for a in arms if a != "none"},
    }
    return _accuracy_claim(runs, comparisons, "hard - soft", teacher, data)


# ---------------------------------------------------------------- SSD-KD (replay)


def claim_ssd_kd(data: Digits, cfg: dict, cache: dict) -> dict:
    args = ssd_kd_example.parse_args([])
    args.rounds = cfg["rounds"]
    teacher = _teacher(data, cfg["teacher_epochs"], cache)
    args.bn_layers = sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    runs: dict[str, list[dict]] = {"prioritized": [], "uniform": []}
    for seed in range(cfg["seeds"]):
        for arm, alpha in (("prioritized", 0.6), ("uniform", 0.0)):
            run = ssd_kd_example.run_datafree(data, teacher, alpha, seed, args, None)
            row = {"seed": seed, "accuracy": run["accuracy"], "seconds": run["seconds"]}
            row.update({f"accuracy@{r}": acc for r, acc in run["evals"]})
            runs[arm].append(row)
            print(
                f"ssd_kd seed {seed} {arm:11s} "
                + " ".join(f"{r}:{acc:.3f}" for r, acc in run["evals"]),
                flush=True,
            )
    checkpoints = [r for r, _ in run["evals"]]
    comparisons = {
        f"prioritized - uniform @{r} rounds ({r * args.batch_size} samples)": paired(
            runs["prioritized"], runs["uniform"], f"accuracy@{r}"
        )
        for r in checkpoints
    }
    above = sum(c["low"] > 0 for c in comparisons.values())
    below = sum(c["high"] < 0 for c in comparisons.values())
    verdict = ("reproduced at small scale" if above >= 3 and below == 0 else "not reproduced") + (
        f": prioritized above uniform at {above} of {len(checkpoints)} checkpoints, below at "
        f"{below}"
    )
    return {
        "runs": runs,
        "metrics": [f"accuracy@{r}" for r in checkpoints],
        "comparisons": comparisons,
        "verdict": verdict,
        "checkpoints": checkpoints,
        "samples_per_round": args.batch_size,
        "teacher_accuracy": accuracy(teacher, data.x_test, data.y_test),
    }


# ---------------------------------------------------------------- report


def plot(name: str, report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    table = report["table"]
    if name == "dist":
        es = report["config"]["teacher_epochs"]
        xs = [100 * report["teachers"][e]["accuracy"] for e in es]
        for m, color in (("kd", "tab:orange"), ("dist", "tab:blue")):
            cis = [table[f"{m}@{e}"]["accuracy"] for e in es]
            ax.errorbar(
                xs,
                [100 * c["mean"] for c in cis],
                [100 * c["half"] for c in cis],
                marker="o",
                capsize=3,
                label=m,
                color=color,
            )
        base = table["no_kd"]["accuracy"]
        ax.axhspan(100 * base["low"], 100 * base["high"], color="grey", alpha=0.3, label="no_kd")
        ax.set_xlabel("teacher test accuracy (%) (1, 3, 10, 30 epochs)")
    elif name == "ssd_kd":
        samples = [r * report["samples_per_round"] for r in report["checkpoints"]]
        for arm in report["runs"]:
            cis = [table[arm][f"accuracy@{r}"] for r in report["checkpoints"]]
            mean = [100 * c["mean"] for c in cis]
            ax.plot(samples, mean, marker="o", label=arm)
            ax.fill_between(
                samples, [100 * c["low"] for c in cis], [100 * c["high"] for c in cis], alpha=0.25
            )
        ax.set_xlabel("synthetic samples generated")
    else:
        arms, metrics = list(table), report["metrics"]
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            cis = [table[a][metric] for a in arms]
            ax.bar(
                [i + j * width for i in range(len(arms))],
                [100 * c["mean"] for c in cis],
                width,
                yerr=[100 * c["half"] for c in cis],
                capsize=3,
                label=metric,
            )
        ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(arms))], arms)
        low = min(100 * table[a][m]["low"] for a in arms for m in metrics)
        ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("%  (mean, 95% t-interval)")
    ax.set_title(f"{name}: {report['verdict'].split(':')[0]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_claim(name: str, data: Digits, cfg: dict, cache: dict, out_dir: str) -> dict:
    start = time.perf_counter()
    report = globals()[f"claim_{name}"](data, {**cfg, "data": data}, cache)
    report["config"] = cfg
    report["seconds"] = time.perf_counter() - start
    report["table"] = {
        arm: {m: mean_ci([r[m] for r in rows]) for m in report["metrics"]}
        for arm, rows in report["runs"].items()
    }
    report["torch"] = torch.__version__
    print(f"\n{name}: {report['seconds']:.0f} s")
    print("| arm | " + " | ".join(report["metrics"]) + " |")
    for arm, row in report["table"].items():
        print(f"| {arm} | " + " | ".join(fmt(row[m]) for m in report["metrics"]) + " |")
    for label, ci in report["comparisons"].items():
        print(f"| {label} | {fmt(ci)} |")
    print(f"verdict: {report['verdict']}\n", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"claim_{name}_results.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(name, report, os.path.join(out_dir, f"claim_{name}_results.png"))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claim", choices=(*CLAIMS, "all"), default="all")
    parser.add_argument("--seeds", type=int, help="override the protocol's number of seeds")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2 seeds, a few epochs (CI smoke)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits()
    cache: dict = {}
    reports = {}
    for name in CLAIMS if args.claim == "all" else (args.claim,):
        cfg = {**CONFIGS[name], **(QUICK[name] if args.quick else {})}
        if args.seeds is not None:
            cfg["seeds"] = args.seeds
        reports[name] = run_claim(name, data, cfg, cache, args.out_dir)
    return reports


if __name__ == "__main__":
    main()
