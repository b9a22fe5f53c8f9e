"""``python -m tools.gpu.sanitize_calls [--device cuda]``: one small call, forward and
backward, of every GPU kernel implementation (backends ``cuda`` and ``triton``) on its
first declared sample, for ``compute-sanitizer --tool memcheck / racecheck``.

On a CPU machine (``tools/gpu_check.sh --dry-run``) it runs the Triton kernels under
``TRITON_INTERPRET=1`` on CPU tensors, so the script itself is tested where no GPU exists.
Exits 1 when any call raises.
"""

from __future__ import annotations

import argparse
import sys

import torch

import kdfast
from kdfast import _dispatch
from kdfast.ops._samples import CONTRACTS, build

GPU_BACKENDS = ("cuda", "triton")


def calls(device: str) -> list[tuple[str, str]]:
    """(op, backend) pairs with a GPU kernel that can run on ``device`` here."""
    found = []
    for op in _dispatch.ops():
        for backend, impl in _dispatch.implementations(op).items():
            declared = _dispatch.BACKENDS[backend]
            devices = impl.devices or declared.devices or ()
            if backend in GPU_BACKENDS and declared.unavailable is None and device in devices:
                found.append((op, backend))
    return found


def call_once(op: str, backend: str, device: str) -> None:
    """Forward and backward of ``op`` on ``backend`` with its first sample in float32."""
    contract = CONTRACTS[op]
    args, kwargs = build(contract.samples[0], device, torch.float32)
    args = [a.requires_grad_(True) if i in contract.grad_args else a for i, a in enumerate(args)]
    with kdfast.use_backend(backend):
        out = contract.function()(*args, **kwargs)
        outputs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outputs).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.sanitize_calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    failed = 0
    todo = calls(args.device)
    if not todo:
        print(f"no GPU kernel implementation can run on {args.device} here")
        return 1
    for op, backend in todo:
        try:
            call_once(op, backend, args.device)
            print(f"  {op}/{backend}: ok", flush=True)
        except Exception as exc:  # report every failure, then exit non-zero
            failed += 1
            print(f"  {op}/{backend}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{len(todo) - failed} of {len(todo)} kernel calls ran on {args.device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
