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
* ``trl_gkd_live`` (when TRL is installed): TRL's ``GKDTrainer`` as supervised distillation (``lmbda=0``: no
  on-policy generation; ``beta=0``: forward KL), live teacher, the same windows pre-tokenised; its tokens/s counts
  the same tokens as every row (each window's 128 input tokens, all of which go through the forward and backward
  passes), while its loss covers 127 of the 128 next-token positions (the first token is its prompt);
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
import dataclasses
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


def gkd_classes() -> tuple[type, type] | None:
    """TRL's ``(GKDConfig, GKDTrainer)``: in ``trl.experimental.gkd`` since TRL 1.x, at the top level before;
    None when TRL is not installed (the row is then skipped)."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        try:
            from trl import GKDConfig, GKDTrainer
        except ImportError:
            return None
    return GKDConfig, GKDTrainer


def hf_tokenizer(tok):
    """The benchmark's byte-level BPE (a ``tokenizers.Tokenizer``) as the ``processing_class`` TRL asks for,
    built offline; pad/eos are an existing id (0), so the vocabulary (and the models) stay as they are: the windows
    are all full length, nothing is padded or generated."""
    from transformers import PreTrainedTokenizerFast

    first = tok.id_to_token(0)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=first, eos_token=first, model_max_length=1 << 20)


def trl_gkd(student, teacher, x, tok, batch: int, steps: int) -> float:
    """Seconds for ``steps`` steps of TRL's ``GKDTrainer`` as supervised distillation: ``lmbda=0`` (no on-policy
    generation), ``beta=0`` (its forward ``KL(teacher || student)``), live teacher, the same windows as the other
    loops given pre-tokenised to its own ``DataCollatorForChatML`` (``input_ids`` and a ``completion_mask``):
    the first token is the prompt, so its loss covers 127 of the 128 next-token positions of each window (the
    forward and backward passes cover all 128, as in the other loops). Its loss has no cross-entropy term and,
    in TRL 1.16, applies no temperature (``temperature`` only samples generations): cost is the same to a few
    elementwise ops per position."""
    from datasets import Dataset

    config_cls, trainer_cls = gkd_classes()
    processing = hf_tokenizer(tok)
    head = 1  # prompt tokens per window
    rows = Dataset.from_list([{"prompt": tok.decode(a[:head].tolist()), "input_ids": a.tolist(),
                               "completion_mask": [0] * head + [1] * (len(a) - head)} for a in x])
    # TRL defaults to activation (gradient) checkpointing, which recomputes the forward: off, like the other loops
    names = {f.name for f in dataclasses.fields(config_cls)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    folder = tempfile.mkdtemp(prefix="kdistill-gkd-")
    args = config_cls(output_dir=folder, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                      optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                      logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False, max_length=x.shape[1],
                      lmbda=0.0, beta=0.0, temperature=T, seq_kd=False, **{checkpointing: False})
    teacher.eval()
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                          processing_class=processing)
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


def report_lines(r: dict, args: argparse.Namespace) -> list[str]:
    """The Markdown record of a run: a table row per loop (its best round), then the ratios and the load."""
    tps, walls, cpus, rounds = r["tokens_per_s"], r["wall_s"], r["cpu_s"], r["rounds_wall_s"]
    before, after = r["load_average_1_5_15_before"], r["load_average_1_5_15_after"]
    lines = [f"# Per-token distillation speed, {r['steps']} steps of {args.batch} x {args.window} tokens "
             f"(V = {r['vocab']}), {args.threads} threads, best of {args.rounds} rounds", "",
             "| loop | tokens/s | wall s (best) | CPU s | every round's wall s |", "|---|---:|---:|---:|---|"]
    lines += [f"| {k} | {tps[k]:.0f} | {walls[k]:.2f} | {cpus[k]:.1f} | "
              f"{', '.join(f'{w:.2f}' for w in rounds[k])} |" for k in walls]
    lines += ["", f"kdistill live / HF Trainer live: {r['kdistill_live_over_hf_trainer']:.2f}x "
              f"(by CPU seconds: {r['kdistill_live_over_hf_trainer_cpu']:.2f}x); the live bound (teacher forward + "
              f"student step, no KD term) / HF Trainer: {r['live_bound_over_hf_trainer']:.2f}x; kdistill live at "
              f"{r['kdistill_live_over_live_bound']:.0%} of the live bound",
              f"kdistill top-{args.k} cached / bound (student forward+backward+step alone): "
              f"{r['kdistill_topk_over_bound']:.0%} (cache built once in {r['topk_cache_build_s']:.1f} s, "
              f"{r['topk_bytes_per_token']} B/token)",
              *([f"TRL {r['trl']} GKDTrainer live (lmbda=0, beta=0: forward KL; tokens/s over all "
                 f"{args.window} input tokens of a window, loss on {args.window - 1} of them) / HF Trainer live: "
                 f"{r['trl_gkd_over_hf_trainer']:.2f}x; kdistill live / TRL GKDTrainer live: "
                 f"{r['kdistill_live_over_trl_gkd']:.2f}x"] if 'trl' in r else []),
              f"load average (1, 5, 15 min) before {before[0]:.1f} {before[1]:.1f} {before[2]:.1f}, "
              f"after {after[0]:.1f} {after[1]:.1f} {after[2]:.1f} on {os.cpu_count()} cores"]
    return lines


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
    bundle, tok = load_text(folder, window=args.window, tokenizer="bpe", vocab_size=args.vocab)
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
    gkd = gkd_classes() is not None
    if gkd:
        loops["trl_gkd_live"] = lambda: trl_gkd(make_student(), teacher, x, tok, args.batch, steps)
    else:
        print("trl_gkd_live skipped: TRL (GKDTrainer) is not importable here; pip install trl to add the row")
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
    if gkd:
        import trl

        result.update(trl=trl.__version__, trl_gkd_over_hf_trainer=tps["trl_gkd_live"] / tps["hf_trainer_live"],
                      kdistill_live_over_trl_gkd=tps["kdistill_live"] / tps["trl_gkd_live"],
                      trl_gkd_loss_positions_per_window=args.window - 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M")
    (out / f"lm-speed-{stamp}.json").write_text(json.dumps(result, indent=2))
    lines = report_lines(result, args)
    (out / f"lm-speed-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
