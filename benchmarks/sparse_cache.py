"""Sparse cached teachers on real text: bytes per position and the error against the dense teacher, k = 1 .. 128.

A tiny causal transformer teacher is trained briefly (``fit``, cross-entropy) on English text (default: the
recipe ``lm-ensemble``'s corpus, the King James Bible from Debian's ``bible-kjv-text``, its first ``--chars``
characters; ``--text FILE ...`` for others), a smaller student likewise; on the validation windows the dense teacher's distribution p is compared with what the sparse
cache stores (:mod:`kdistill.losses.sparse`):

* ``recon_kl``: KL(p || p_hat) in nats per token, p_hat = the stored top-k (renormalised with the stored tail)
  and the tail spread evenly over the left-out classes: how much of the teacher the file keeps;
* ``loss_err``: |sparse KD loss - dense KD loss| / dense loss for the student's logits (whole-batch mean);
* ``grad_err_T1`` / ``grad_err_T2``: ||g_sparse - g_dense|| / ||g_dense|| of that loss's gradient w.r.t. the
  student's logits at T = 1 and T = 2 (T = 2 also measures the tail's temperature approximation).

Rows ``distillkit-like``: DistillKit's offline top-128 (arcee-ai/DistillKit, distillkit/lossfuncs/kl.py and
common.py) with the top-128 log-probabilities kept *exactly* (float32; DistillKit's recommended config stores 16
exactly and fits the other 112 with a polynomial, so its real error is at least this) and its two missing-mass
modes: ``zero`` (top-k renormalised, tail dropped) and ``symmetric_uniform`` (tail = 1 - sum of the stored
probabilities, raised to 1/T). Its bytes follow its own formula (distillkit/compression/config.py total_bits) for
this vocabulary: 16 x 2 B exact + 6 x 4 B polynomial terms + 128 x ceil(log2 V) bits of packed indices; its README
quotes ~300 bytes per token for vocabularies of 128k-152k (18-bit indices).

Bytes per token are what the cache stores (:class:`kdistill.teachers.sparse.SparseCachedTeacher`): k 16-bit
values, the kept classes in the smaller of the two index layouts (:mod:`kdistill.teachers.index_codec`: packed
``ceil(log2 V)``-bit ids or a V-bit map), a 16-bit tail.

    python3 benchmarks/sparse_cache.py                                   # bytes tokenizer (256 classes)
    /work/eco/bin/python benchmarks/sparse_cache.py --tokenizer bpe --vocab 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.data.corpus import kjv_text_path
from kdistill.data.text import load_text
from kdistill.losses import soft_loss
from kdistill.losses.sparse import sparse_soft_loss, sparsify
from kdistill.teachers.sparse import SparseCachedTeacher

KS = (1, 8, 32, 128)
OUT = Path(__file__).parent / "results" / "sparse-cache"


class TinyLM(nn.Module):
    """A causal transformer language model: token ids (B, L) -> next-token logits (B, L, V)."""

    def __init__(self, vocab: int, width: int, layers: int, window: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(window, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(window), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(n, device=x.device))
        h = self.body(h, mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def corpus(paths: list[str], chars: int) -> Path:
    """A temporary folder of the given text files as .txt (what ``text:PATH`` reads), the first ``chars``
    characters of their concatenation (0: all)."""
    folder = Path(tempfile.mkdtemp(prefix="kdistill-corpus-"))
    text = "".join(Path(p).read_text(encoding="utf-8") for p in sorted(paths))
    (folder / "corpus.txt").write_text(text[:chars] if chars else text, encoding="utf-8")
    return folder


def distillkit_like(s: torch.Tensor, t: torch.Tensor, k: int, T: float, missing: str) -> torch.Tensor:
    """DistillKit's sparse KL (get_target_logprobs + sparse_kl_div_inner) per token, T^2-scaled, float64, from
    the exact top-k teacher log-probabilities."""
    log_p_full = torch.log_softmax(t, -1)
    vals, idx = log_p_full.topk(k, -1)
    alpha = 1.0 / T
    a = alpha * vals
    lse_a = torch.logsumexp(a, -1, keepdim=True)
    if missing == "zero":
        log_p = a - lse_a
    else:
        leftover = (1 - vals.exp().sum(-1, keepdim=True)).clamp(0, 1)
        log_p = a - (lse_a.exp() + leftover.pow(alpha)).log()
    log_q = torch.log_softmax(s / T, -1).gather(-1, idx)
    inner = (log_p.exp() * (log_p - log_q)).sum(-1)
    if missing != "zero":
        lt = torch.log1p(-log_p.exp().sum(-1).clamp(max=1 - 1e-12))
        ls = torch.log1p(-log_q.exp().sum(-1).clamp(max=1 - 1e-12))
        inner = inner + torch.where(lt.exp() > 1e-6, lt.exp() * (lt - ls), torch.zeros_like(lt))
    return inner * T * T


def recon_kl(t: torch.Tensor, targets) -> float:
    """KL(p || p_hat) per token, p_hat from the stored values (renormalised with the tail), tail spread evenly."""
    log_p = torch.log_softmax(t, -1)
    v, k = t.shape[-1], targets.k
    vals, tail = targets.values.double(), targets.tail.double()
    if k < v:
        z = torch.logsumexp(torch.cat([vals, tail[:, None]], -1), -1, keepdim=True)
        fill = (tail[:, None] - z - math.log(v - k)).expand(-1, v).clone()
    else:
        z = torch.logsumexp(vals, -1, keepdim=True)
        fill = torch.full_like(log_p, -math.inf)
    log_hat = fill.scatter(-1, targets.indices.long(), vals - z)
    return float(F.kl_div(log_hat, log_p, reduction="sum", log_target=True) / len(t))


def grad_of(fn, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    z = s.clone().requires_grad_(True)
    loss = fn(z)
    loss.backward()
    return float(loss.detach()), z.grad


def measure(s: torch.Tensor, t: torch.Tensor, vocab: int) -> list[dict]:
    """One row per storage: bytes per position and the errors of the module doc; s, t (tokens, V) float64."""
    dense = {T: grad_of(lambda z, T=T: soft_loss(z, t, temperature=T, chunk_bytes=None), s) for T in (1.0, 2.0)}

    def errors(fn) -> dict:
        out = {}
        for T in (1.0, 2.0):
            loss, g = grad_of(lambda z, T=T: fn(z, T), s)
            ref_loss, ref_g = dense[T]
            if T == 1.0:
                out["loss_err"] = abs(loss - ref_loss) / ref_loss
            out[f"grad_err_T{T:g}"] = float((g - ref_g).norm() / ref_g.norm())
        return out

    rows = []
    for k in [k for k in KS if k <= vocab]:
        for dtype in ([torch.float16, torch.bfloat16] if k == 32 else [torch.float16]):
            tg = sparsify(t, k, dtype)
            stored = SparseCachedTeacher.from_targets(torch.arange(len(t)), tg)
            tg = stored.targets  # what the loss reads back from the cache
            row = {"storage": f"kdistill top-{k} ({str(dtype)[6:]}, {stored.layout} ids)", "k": k,
                   "bytes": stored.bytes_per_position(), "recon_kl": recon_kl(t, tg)}
            row.update(errors(lambda z, T, tg=tg: sparse_soft_loss(z, tg, temperature=T, chunk_bytes=None)))
            rows.append(row)
    k = min(128, vocab)
    dk_bytes = 16 * 2 + 6 * 4 + (k * math.ceil(math.log2(vocab)) + 7) // 8
    for missing in ("zero", "symmetric_uniform"):
        row = {"storage": f"distillkit-like top-{k} ({missing}, exact values: a lower bound on its error)", "k": k,
               "bytes": dk_bytes, "recon_kl": None}
        row.update(errors(lambda z, T, m=missing: distillkit_like(z, t, k, T, m).mean()))
        rows.append(row)
    return rows


def train_lm(model, bundle, epochs: int, lr: float) -> float:
    r = fit(model, bundle.train, TrainConfig(epochs=epochs, batch_size=32, lr=lr, optimizer="adamw", seed=0),
            method="ce", val=bundle.val, progress=False)
    return r.val["perplexity"] if "perplexity" in r.val else math.exp(r.val["nll"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", nargs="*", default=None, help="text files (default: the King James Bible)")
    ap.add_argument("--chars", type=int, default=300_000, help="first characters of the text used (0: all)")
    ap.add_argument("--tokenizer", default="bytes", choices=("bytes", "bpe"))
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=1200, help="train windows used (the first N)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    args.text = args.text or [str(kjv_text_path())]
    folder = corpus(args.text, args.chars)
    bundle, tok = load_text(folder, window=args.window, tokenizer=args.tokenizer, vocab_size=args.vocab)
    vocab = bundle.train.num_classes
    bundle = dataclasses.replace(bundle, train=bundle.train.subset(torch.arange(min(args.max_windows, len(bundle.train))), "train"))
    teacher = TinyLM(vocab, 128, 2, args.window, seed=1)
    student = TinyLM(vocab, 64, 1, args.window, seed=2)
    t_ppl = train_lm(teacher, bundle, args.epochs, 3e-3)
    s_ppl = train_lm(student, bundle, 1, 3e-3)
    with torch.no_grad():
        teacher.eval(), student.eval()
        t = teacher(bundle.val.x).reshape(-1, vocab).double()
        s = student(bundle.val.x).reshape(-1, vocab).double()
    rows = measure(s, t, vocab)
    meta = {"text": args.text, "chars": args.chars, "tokenizer": args.tokenizer, "vocab": vocab, "window": args.window,
            "train_windows": len(bundle.train), "epochs": args.epochs, "val_tokens": len(t), "teacher_val_ppl": t_ppl,
            "student_val_ppl": s_ppl, "dense_kl_T1": float(soft_loss(s, t, temperature=1.0)),
            "dense_bytes_float32": 4 * vocab, "wall_s": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.tokenizer}-{vocab}"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Sparse teacher cache on {', '.join(Path(p).name for p in args.text)} (first {args.chars} characters), "
             f"{args.tokenizer} tokens (V = {vocab})",
             "", f"teacher val perplexity {t_ppl:.2f}, student {s_ppl:.2f}, dense KL(teacher || student) "
             f"{meta['dense_kl_T1']:.3f} nats/token over {len(t)} val tokens; dense float32 = {4 * vocab} B/token",
             "", "| storage | bytes/token | recon KL (nats) | loss err | grad err T=1 | grad err T=2 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rk = "-" if r["recon_kl"] is None else f"{r['recon_kl']:.2e}"
        lines.append(f"| {r['storage']} | {r['bytes']} | {rk} | {r['loss_err']:.2e} | {r['grad_err_T1']:.2e} | "
                     f"{r['grad_err_T2']:.2e} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
