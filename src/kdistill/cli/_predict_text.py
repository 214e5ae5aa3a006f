"""``kdistill predict --text``: a language model trained by kdistill on ``text:`` data, run on a prompt.

The prompt is tokenised exactly as the run that trained the model tokenised its data: the model file records
its tokenizer (UTF-8 bytes, or the byte-level BPE itself, :func:`kdistill.data.text.tokenizer_record`), so no
other file is needed. For each prompt it prints the ``--top`` most likely next tokens with their
probabilities and, with ``--generate N``, N more tokens chosen greedily (the most likely each time; the last
``window`` tokens are the context, the window the model was trained on).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from kdistill.data.text import decode_ids, encode_text, recorded_tokenizer, token_text, tokenizer_of
from kdistill.io import load_model, read_model_meta
from kdistill.models.outputs import forward_logits


def _next_logits(model: nn.Module, ids: list[int], window: int) -> torch.Tensor:
    """The model's logits for the token after ``ids`` (its last ``window`` tokens as context)."""
    x = torch.tensor([ids[-window:]], dtype=torch.long)
    with torch.no_grad():
        logits = forward_logits(model, x)
    if logits.dim() != 3:
        raise ValueError(f"--model: gives logits of shape {tuple(logits.shape)} for a (1, L) prompt; --text needs a "
                         "language model (one distribution per position, (1, L, V))")
    return logits[0, -1].float()


def complete(model: nn.Module, tok: Any, prompt: str, window: int, top: int, generate: int) -> dict[str, Any]:
    """The ``top`` next tokens after ``prompt`` (text, id, probability) and ``generate`` greedy tokens."""
    ids = encode_text(prompt, tok).tolist()
    if not ids:
        raise ValueError("--text: an empty prompt; give at least one character")
    probs = torch.softmax(_next_logits(model, ids, window), dim=-1)
    best = probs.topk(min(top, probs.numel()))
    row: dict[str, Any] = {"text": prompt, "tokens": len(ids), "top": [
        {"token": token_text(int(i), tok), "id": int(i), "p": float(p)} for p, i in zip(best.values, best.indices)]}
    if generate:
        out = list(ids)
        for _ in range(generate):
            out.append(int(_next_logits(model, out, window).argmax()))
        row["continuation"] = decode_ids(out[len(ids):], tok)
    return row


def _format(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(f"{row['text']!r} ({row['tokens']} tokens)")
        lines += [f"  {t['p']:7.2%}  {t['token']!r}" for t in row["top"]]
        if "continuation" in row:
            lines.append(f"  -> {row['text'] + row['continuation']!r}")
    return "\n".join(lines)


def predict_text(args: argparse.Namespace) -> int:
    """Run a saved text model on each ``--text`` prompt (see the module doc)."""
    if not args.model or args.model.lower().endswith(".onnx"):
        raise ValueError("--text: give --model WEIGHTS.safetensors of a model trained on text: data")
    if args.inputs or args.save_logits:
        raise ValueError("--text: prompts are given alone, without image files or --save-logits")
    if args.top < 1 or args.generate < 0:
        raise ValueError(f"--top must be >= 1 and --generate >= 0, got {args.top} and {args.generate}")
    record = recorded_tokenizer(args.model)
    if record is None:
        raise ValueError(f"--model: {args.model} records no tokenizer (it was not trained on text: data); "
                         "--text needs a language model trained by kdistill")
    tok = tokenizer_of(record)
    vocab = 256 if tok is None else tok.get_vocab_size()
    meta = read_model_meta(args.model)
    window = int((meta.get("in_shape") or [0])[0])
    if window < 1:
        raise ValueError(f"--model: {args.model} records no input window; save it with `kdistill train`")
    if meta.get("num_classes") not in (None, vocab):
        raise ValueError(f"--model: predicts {meta['num_classes']} classes, its tokenizer has {vocab} tokens")
    model = load_model(args.model, trust_code=args.trust_code).eval()
    rows = [complete(model, tok, prompt, window, args.top, args.generate) for prompt in args.text]
    print(json.dumps(rows, ensure_ascii=False) if args.json else _format(rows))
    return 0
