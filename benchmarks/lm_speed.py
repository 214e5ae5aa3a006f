"""Tokens per second of per-token distillation: kdistill ``fit`` against the Hugging Face ``Trainer`` loop users write.

Same tiny GPT-2 models built from configs (teacher 4 x 256, student 2 x 128, vocabulary of a byte-level BPE
trained on the text), same windows of Debian's licence texts, same batch, AdamW, steps and threads, all in one
process (ratios, not absolute numbers, are what carries over to other machines):

* ``hf_trainer_live``: ``transformers.Trainer`` with the usual ``compute_loss`` override: the teacher's logits
  under ``no_grad``, ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (batchmean over tokens) mixed with the
  cross-entropy on the (already shifted) next-token labels;
* ``kdistill_live``: ``fit(student, train, teacher=teacher, cache_teacher=False, method=kd)``;
* ``kdistill_topk``: ``fit`` with a sparse cached teacher (top-32, built once before the timing; its build time
  is printed apart);
* ``bound``: the student's forward + backward + AdamW step alone on the same batches (cross-entropy), the
  arithmetic bound of any cached-teacher path;
* ``live_bound``: the teacher's forward (``no_grad``) then that student step, batch by batch: the arithmetic
  bound of any live-teacher loop (the KD term's own cost left out). ``hf_trainer_live / live_bound`` is the most
  any live loop can gain over the Trainer on this machine and size.

Every loop runs ``--rounds`` times in turn (the first round also warms the allocator and caches); the table
gives each loop's best round, and the ratios are taken between best rounds.

    /work/eco/bin/python benchmarks/lm_speed.py            # writes benchmarks/results/lm-speed/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.data.text import load_text
from kdistill.teachers.sparse import sparse_cache

OUT = Path(__file__).parent / "results" / "lm-speed"
T, ALPHA, LR = 2.0, 0.5, 1e-3


def gpt2(vocab: int, width: int, layers: int, window: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=window, n_embd=width, n_layer=layers, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def hf_trainer(student, teacher, x, y, batch: int, steps: int) -> float:
    """Seconds for ``steps`` steps of the Trainer loop a user writes (a compute_loss override, live teacher)."""
    from transformers import Trainer, TrainingArguments

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The labels are already the next tokens (load_text shifts them): cross-entropy on them directly,
            # not model(labels=...), which would shift them a second time.
            out = model(input_ids=inputs["input_ids"])
            with torch.no_grad():
                t_logits = teacher(input_ids=inputs["input_ids"]).logits
            labels = inputs["labels"]
            valid = labels != -100
            ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            s, t = out.logits[valid] / T, t_logits[valid] / T
            kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True) * T * T
            loss = ALPHA * kd + (1 - ALPHA) * ce
            return (loss, out) if return_outputs else loss

    rows = [{"input_ids": a, "labels": b} for a, b in zip(x, y)]
    folder = tempfile.mkdtemp(prefix="kdistill-hf-")
    args = TrainingArguments(output_dir=folder, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                             optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                             logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    teacher.eval()
    trainer = KDTrainer(model=student, args=args, train_dataset=rows)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return wall


def kdistill_fit(student, teacher, train, batch: int, epochs: int) -> float:
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=LR, optimizer="adamw", weight_decay=0.0, seed=0,
                      cache_teacher=False, checkpoint=False)
    t0 = time.perf_counter()
    fit(student, train, cfg, teacher=teacher, method={"name": "kd", "temperature": T, "alpha": ALPHA}, progress=False)
    return time.perf_counter() - t0


def bound(student, x, y, batch: int, steps: int, teacher=None) -> float:
    """The student's forward + backward + AdamW step alone: what a cached teacher cannot beat; with ``teacher``,
    its forward first (``no_grad``, output unused): what a live teacher cannot beat."""
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    student.train()
    t0 = time.perf_counter()
    for i in range(steps):
        rows = slice((i * batch) % len(x), (i * batch) % len(x) + batch)
        if teacher is not None:
            with torch.no_grad():
                teacher(input_ids=x[rows]).logits
        logits = student(input_ids=x[rows]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[rows].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="times each loop runs, in turn; its best round is kept")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="kdistill-corpus-"))
    for i, p in enumerate(sorted(Path("/usr/share/common-licenses").iterdir())):
        if p.is_file():
            shutil.copyfile(p, folder / f"{i:03d}-{p.name}.txt")
    bundle, _ = load_text(folder, window=args.window, tokenizer="bpe", vocab_size=args.vocab)
    train = bundle.train.subset(torch.arange(len(bundle.train) // args.batch * args.batch), "train")  # whole batches
    vocab = train.num_classes
    steps = len(train) // args.batch * args.epochs
    tokens = steps * args.batch * args.window
    teacher = gpt2(vocab, 256, 4, args.window, seed=1)
    make_student = lambda: gpt2(vocab, 128, 2, args.window, seed=2)  # noqa: E731
    x, y = train.x, train.y
    load_before = os.getloadavg()  # the machine is shared: its load says how far to trust the absolute numbers
    walls, cpus = {}, {}  # CPU seconds of this process too: less sensitive than wall time to other users' load

    t0 = time.perf_counter()
    cache = sparse_cache(teacher, train, args.k)
    build = time.perf_counter() - t0
    teacher.eval()
    loops = {"bound": lambda: bound(make_student(), x, y, args.batch, steps),
             "live_bound": lambda: bound(make_student(), x, y, args.batch, steps, teacher),
             "hf_trainer_live": lambda: hf_trainer(make_student(), teacher, x, y, args.batch, steps),
             "kdistill_live": lambda: kdistill_fit(make_student(), teacher, train, args.batch, args.epochs),
             "kdistill_topk": lambda: kdistill_fit(make_student(), cache, train, args.batch, args.epochs)}
    rounds = {name: [] for name in loops}
    for _ in range(args.rounds):  # in turn, so that a slow spell of the machine hits every loop alike
        for name, fn in loops.items():
            c0 = time.process_time()
            wall = fn()
            rounds[name].append((wall, time.process_time() - c0))
    for name, runs in rounds.items():
        walls[name], cpus[name] = min(runs)
    tps = {k: tokens / v for k, v in walls.items()}
    result = {"tokens_per_s": tps, "wall_s": walls, "cpu_s": cpus, "rounds_wall_s": {k: [w for w, _ in v] for k, v in rounds.items()},
              "kdistill_live_over_hf_trainer_cpu": cpus["hf_trainer_live"] / cpus["kdistill_live"], "steps": steps, "tokens": tokens, "vocab": vocab,
              "window": args.window, "batch": args.batch, "k": args.k, "topk_cache_build_s": build,
              "topk_bytes_per_token": cache.bytes_per_position(),
              "kdistill_live_over_hf_trainer": tps["kdistill_live"] / tps["hf_trainer_live"],
              "live_bound_over_hf_trainer": tps["live_bound"] / tps["hf_trainer_live"],
              "kdistill_live_over_live_bound": tps["kdistill_live"] / tps["live_bound"],
              "kdistill_topk_over_bound": tps["kdistill_topk"] / tps["bound"],
              "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg(),
              "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    import transformers

    result["transformers"] = transformers.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M")
    (out / f"lm-speed-{stamp}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Per-token distillation speed, {steps} steps of {args.batch} x {args.window} tokens (V = {vocab}), "
             f"{args.threads} threads, best of {args.rounds} rounds", "",
             "| loop | tokens/s | wall s (best) | CPU s | every round's wall s |", "|---|---:|---:|---:|---|"]
    lines += [f"| {k} | {tps[k]:.0f} | {walls[k]:.2f} | {cpus[k]:.1f} | "
              f"{', '.join(f'{w:.2f}' for w, _ in rounds[k])} |" for k in walls]
    lines += ["", f"kdistill live / HF Trainer live: {result['kdistill_live_over_hf_trainer']:.2f}x "
              f"(by CPU seconds: {result['kdistill_live_over_hf_trainer_cpu']:.2f}x); the live bound (teacher forward + "
              f"student step, no KD term) / HF Trainer: {result['live_bound_over_hf_trainer']:.2f}x; kdistill live at "
              f"{result['kdistill_live_over_live_bound']:.0%} of the live bound",
              f"kdistill top-{args.k} cached / bound (student forward+backward+step alone): "
              f"{result['kdistill_topk_over_bound']:.0%} (cache built once in {build:.1f} s, "
              f"{cache.bytes_per_position()} B/token)",
              f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
              f"after {result['load_average_1_5_15_after'][0]:.1f} {result['load_average_1_5_15_after'][1]:.1f} "
              f"{result['load_average_1_5_15_after'][2]:.1f} on {os.cpu_count()} cores"]
    (out / f"lm-speed-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
