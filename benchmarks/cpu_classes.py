"""CPU kernel time per element against the class count C, label targets (the README's Limits table).

About 16M logits per C, labels with 1% positive and 10% ignored anchors, reduction "sum"; prints the
median forward (no grad) and forward+backward time divided by the element count, with torch's current
thread count.

    python benchmarks/cpu_classes.py
"""

from __future__ import annotations

import statistics
import time

import torch

import focal_cuda


def main() -> None:
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, CPU kernel {focal_cuda.build_info()['cpu_kernel']}")
    for C in (1, 3, 8, 16, 80, 91, 264):
        A = 16_000_000 // C
        x = (torch.randn(A, C) * 3 - 4).requires_grad_()
        u = torch.rand(A)
        cls = torch.randint(0, C, (A,))
        lab = torch.where(u < 0.01, cls, torch.full_like(cls, C))
        lab = torch.where((u >= 0.01) & (u < 0.11), torch.full_like(cls, -1), lab)

        def fwd():
            with torch.no_grad():
                focal_cuda.sigmoid_focal_loss(x, lab, reduction="sum")

        def fwdbwd():
            focal_cuda.sigmoid_focal_loss(x, lab, reduction="sum").backward()
            x.grad = None

        out = []
        for fn in (fwd, fwdbwd):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(9):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            out.append(statistics.median(ts) * 1e9 / (A * C))
        print(f"C={C}: forward {out[0]:.2f} ns/element, forward+backward {out[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
