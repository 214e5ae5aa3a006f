"""Peak memory of the soft term on (B, L, V) logits: unchunked versus chunked over positions.

Each variant runs in its own subprocess (``ru_maxrss`` is a process's high-water mark, and torch's
allocations are invisible to tracemalloc): the subprocess allocates the student and teacher logits,
records its resident-set peak, runs forward + backward, and reports the growth of the peak, i.e. the
memory the loss itself needed on top of its inputs (the student's gradient, B*L*V*4 bytes, included).

    OMP_NUM_THREADS=1 python3 benchmarks/loss_memory.py --rows 2048 --vocab 32000

Variants: ``legacy`` (kdistill's (B, C) formula on the flattened logits), ``unchunked`` (the positions
path with ``chunk_bytes=None``) and ``chunked`` (the default 64 MiB chunks); ``legacy`` only for the
kinds that had it (kl, soft_ce, logit_mse, prob_mse).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("legacy", "unchunked", "chunked")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(variant: str, rows: int, vocab: int, kind: str) -> dict:
    """Run one variant in this process; return its peak growth (bytes), seconds and loss value."""
    import torch

    from kdistill.losses import DEFAULT_CHUNK_BYTES, soft_loss

    torch.manual_seed(0)
    batch = 8
    # Warm up (lazy library initialisation, autograd threads) on a small input, outside the measurement.
    warm = torch.randn(batch, 8, vocab).requires_grad_()
    for chunk in (None, vocab * 8 * 8 * 4):
        soft_loss(warm, warm.detach() + 1, temperature=2.0, kind=kind, mask=torch.ones(batch, 8),
                  chunk_bytes=chunk).backward()
    del warm
    s = torch.randn(batch, rows // batch, vocab).requires_grad_()
    t = torch.randn(batch, rows // batch, vocab)
    mask = torch.ones(batch, rows // batch, dtype=torch.bool)
    before = _peak_bytes()
    start = time.perf_counter()
    if variant == "legacy":
        loss = soft_loss(s.view(rows, vocab), t.view(rows, vocab), temperature=2.0, kind=kind)
    else:
        chunk = None if variant == "unchunked" else DEFAULT_CHUNK_BYTES
        loss = soft_loss(s, t, temperature=2.0, kind=kind, mask=mask, chunk_bytes=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "peak_growth": _peak_bytes() - before, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="B*L positions (a multiple of 8)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kind", default="kl")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the subprocess's job
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.rows, args.vocab, args.kind)))
        return
    fp32 = args.rows * args.vocab * 4
    print(f"soft term '{args.kind}' on ({args.rows} positions, {args.vocab} classes); "
          f"one float32 copy = {fp32 / 2**20:.0f} MiB")
    results = {}
    legacy_kinds = ("kl", "soft_ce", "logit_mse", "prob_mse")  # the kinds with an original (B, C) path
    for variant in VARIANTS if args.kind in legacy_kinds else VARIANTS[1:]:
        cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(args.rows),
               "--vocab", str(args.vocab), "--kind", args.kind]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r = results[variant]
        print(f"{variant:>9}: peak +{r['peak_growth'] / 2**20:7.0f} MiB "
              f"({r['peak_growth'] / fp32:4.1f} float32 copies), {r['seconds']:6.2f} s, loss {r['loss']:.6f}")
    for naive in (v for v in ("legacy", "unchunked") if v in results):
        ratio = results[naive]["peak_growth"] / max(results["chunked"]["peak_growth"], 1)
        print(f"{naive} / chunked peak: {ratio:.1f}x")


if __name__ == "__main__":
    main()
