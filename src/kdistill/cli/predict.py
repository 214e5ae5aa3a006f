"""Teachers other than one saved module, from the command line.

* ``kdistill predict``: a saved model's top classes for image files (``FILE_OR_DIR...``), a language model's
  next tokens and greedy continuation for prompts (``--text``, :mod:`kdistill.cli._predict_text`), or a
  teacher's logits for a data split (``--save-logits``), saved for black-box distillation;
* ``kdistill export-onnx``: a saved model as ONNX (a teacher others can run without PyTorch);
* ``kdistill specialists``: specialists for a saved generalist, evaluated with it, and (``--save-logits``)
  the combined distribution saved for ``kdistill distill --teacher-logits``.

The split is loaded exactly as ``kdistill distill`` loads it (by default the data of the run that wrote the
model, from the ``config.yaml`` beside it, with the model's recorded normalisation), so the saved rows line up
with its transfer set by sample id.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdistill import data
from kdistill.cli import _predict as files
from kdistill.cli._predict_text import predict_text
from kdistill.cli._common import add_trust_code
from kdistill.data.folder import MAX_PIXELS
from kdistill.data.preprocess import parse_normalize
from kdistill.data.stream import labels_of
from kdistill.engine import TrainConfig
from kdistill.engine.evaluate import classification_metrics, predict_logits, predict_split
from kdistill.engine.loop import _check_outputs
from kdistill.io import load_model, read_model_meta, save_model, write_json
from kdistill.methods.kd import check_temperature, check_weight
from kdistill.outputs.results import write_results
from kdistill.teachers.logits_files import save_logits
from kdistill.teachers.onnx_model import OnnxTeacher, export_onnx
from kdistill.teachers.sparse import sparse_cache
from kdistill.teachers.specialists import SpecialistSystem, confusable_clusters, train_specialist


def _predict(args: argparse.Namespace) -> int:

    if bool(args.model) == bool(args.onnx):
        raise ValueError("predict: give exactly one of --model WEIGHTS.safetensors (or .onnx) or --onnx MODEL.onnx")
    if args.text:
        return predict_text(args)
    if args.model and args.model.lower().endswith(".onnx"):
        args.model, args.onnx = None, args.model
    if args.inputs:
        return files.classify_files(args)
    if not args.save_logits:
        raise ValueError("predict: give image files or folders to classify (kdistill predict --model M "
                         "FILE_OR_DIR...), or --save-logits FILE to save the logits of a data split")
    out = Path(args.save_logits)
    if out.suffix.lower() not in (".safetensors", ".npy"):
        raise ValueError(f"--save-logits: {out} must end in .safetensors or .npy")
    pred = files.load_predictor(args.model or args.onnx, args.trust_code)
    d = files.split_data(args, pred.preprocessing)
    norm = parse_normalize(d.pop("normalize", None))  # applied once the data is known to fit the model
    options = {k: v for k, v in d.items() if k not in ("name", "val_size", "seed") and v is not None}
    bundle = data.load(d["name"], val_size=d.get("val_size"), seed=d.get("seed") or 0, **options)
    split = {"train": bundle.train, "val": bundle.val, "test": bundle.test}[args.split]
    if split is None:
        raise ValueError("--split val: this data set was loaded without a validation split (--val-size 0)")
    split = files.fit_split(pred, split, norm)
    if getattr(split, "per_position", False):
        return _save_topk(args, pred, split, out)
    if args.topk:
        raise ValueError(f"--topk: keeps the top classes per position; {split.name} has one label per sample "
                         "(its logits file holds every class)")
    if args.model:
        import torch

        model = pred.module
        _check_outputs(model, split, next(iter(model.parameters()), torch.empty(0)).device)
        logits = predict_split(model, split)
        source = str(args.model)
    else:
        teacher = OnnxTeacher(args.onnx)
        teacher.check(split)
        logits = teacher.predict(split)
        source = str(args.onnx)
    if logits.shape[1] != split.num_classes:
        raise ValueError(f"--model: predicts {logits.shape[1]} classes, {split.name} has {split.num_classes}")
    save_logits(out, logits, split.index, data=split.name, source=source, split=split)
    report = {"file": str(out), "count": len(split), "num_classes": split.num_classes, "data": split.name}
    if not split.has_unlabelled:

        report["accuracy"] = classification_metrics(logits, labels_of(split), detailed=False)["accuracy"]
    print(json.dumps(report))
    return 0


def _save_topk(args: argparse.Namespace, pred, split, out: Path) -> int:
    """Per-position data: the model's top-k log-probabilities per (sample id, position) as a sparse cache
    (:mod:`kdistill.teachers.sparse`), which ``kdistill distill --teacher-logits FILE`` reads without the model."""
    if not args.topk:
        raise ValueError(f"--save-logits: {split.name} has one label per position; dense per-position logits "
                         "(N x L x V floats) are not written: add --topk K to save the top K classes per position "
                         "and the mass left out, or distil from the model itself (--teacher MODEL)")
    if not args.model or out.suffix.lower() != ".safetensors":
        raise ValueError("--topk: needs --model WEIGHTS.safetensors and --save-logits FILE.safetensors")
    if out.exists():
        raise ValueError(f"--save-logits: {out} exists; remove it or give another file")
    cache = sparse_cache(pred.module, split, args.topk, path=out)
    print(json.dumps({"file": str(out), "count": len(split), "k": cache.k, "num_classes": split.num_classes,
                      "bytes_per_position": cache.bytes_per_position(), "data": split.name}))
    return 0


def _export(args: argparse.Namespace) -> int:

    model = load_model(args.model, trust_code=args.trust_code)
    meta = read_model_meta(args.model)
    in_shape = meta.get("in_shape")
    if not in_shape:
        raise ValueError(f"--model: {args.model} records no input shape; save it with `kdistill train`")
    # What the file alone must say to be used (kdistill predict --model M.onnx, or any ONNX runtime).
    extra = {k: meta[k] for k in ("class_names", "preprocessing") if meta.get(k) is not None}
    export_onnx(model, args.onnx, in_shape, metadata={"input_shape": list(in_shape), **extra})
    print(json.dumps({"onnx": str(args.onnx), "in_shape": in_shape}))
    return 0


def _specialists(args: argparse.Namespace) -> int:
    import time

    import torch

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, keep_best=True,
                      checkpoint=False)
    check_temperature(args.temperature, "--temperature")  # the specialists' KD options, checked before any work
    check_weight(args.alpha, "--alpha", 1.0)
    clusters = [tuple(int(c) for c in group.split(",")) for group in args.classes or []]
    if args.save_logits and not args.save_logits.endswith((".safetensors", ".npy")):
        raise ValueError(f"--save-logits: {args.save_logits} must end in .safetensors or .npy")
    options = {"path": args.data_path} if args.data_path else {}
    t0 = time.perf_counter()
    bundle = data.load(args.data, val_size=args.val_size, seed=args.data_seed, **options)
    if bundle.val is None:
        raise ValueError("--val-size: specialists need a validation split (clusters and early stopping use it)")
    generalist = load_model(args.generalist, trust_code=args.trust_code)
    val_lp = torch.log_softmax(predict_logits(generalist, bundle.val.x), dim=1)
    if val_lp.shape[1] != bundle.train.num_classes:
        raise ValueError(f"--generalist: predicts {val_lp.shape[1]} classes, {args.data} has {bundle.train.num_classes}")
    if not clusters:
        clusters = confusable_clusters(val_lp.exp(), args.clusters, args.seed)
        if not clusters:
            raise ValueError("--clusters: every cluster has a single class; ask for fewer clusters or give --classes")
    out = Path(args.out)
    gen_train = predict_logits(generalist, bundle.train.x)
    specialists = []
    for cl in clusters:
        spec, _ = train_specialist(generalist, bundle.train, cl, cfg, temperature=args.temperature, alpha=args.alpha,
                                   generalist_logits=gen_train, val=bundle.val, progress=not args.no_progress)
        save_model(out / f"specialist-{'-'.join(map(str, cl))}.safetensors", spec.model,
                   in_shape=list(bundle.input_shape), num_classes=len(cl) + 1, classes=list(cl))
        specialists.append(spec)
    system = SpecialistSystem(generalist, specialists, top_k=args.top_k)
    test = bundle.test
    special = torch.isin(test.y, torch.tensor(sorted({c for cl in clusters for c in cl})))
    models = {}
    for role, lp in (("generalist", predict_logits(generalist, test.x)), ("generalist+specialists", system.predict(test))):
        m = classification_metrics(lp, test.y, detailed=False)
        models[role] = {"test_errors": m["errors"], "test_accuracy": m["accuracy"],
                        "test_accuracy_special": float((lp.argmax(1)[special] == test.y[special]).float().mean())}
    write_json(out / "clusters.json", {"clusters": [list(c) for c in clusters], "top_k": args.top_k})
    write_results(out, "specialists", "cli", time.perf_counter() - t0, models)
    if args.save_logits:
        save_logits(args.save_logits, system.predict(bundle.train), bundle.train.index, data=bundle.train.name,
                    source=f"specialists:{args.generalist}", split=bundle.train)
    print(json.dumps({"clusters": [list(c) for c in clusters], **models}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("predict", help="classify image files with a saved model, continue text prompts (--text), "
                       "or save a teacher's logits for a data split (black-box distillation)")
    p.add_argument("inputs", nargs="*", metavar="FILE_OR_DIR",
                   help="image files (.png/.jpg/.jpeg/.bmp) or folders of them to classify (default: none; "
                        "then --save-logits saves a data split's logits)")
    p.add_argument("--model", help="weights (.safetensors written by `kdistill train`/`distill`) or an .onnx model")
    p.add_argument("--onnx", help="or: an ONNX teacher, run with onnxruntime")
    p.add_argument("--top", type=int, default=3, help="classes shown per image (tokens per prompt with --text)")
    p.add_argument("--text", action="append", metavar="PROMPT",
                   help="a prompt for a language model trained on text: data (repeatable); tokenised as its run did")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="with --text: also continue each prompt by N tokens, greedily")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="refuse images whose header declares more pixels (decompression bombs)")
    p.add_argument("--data", help="with --save-logits: the data set (default: the data of the run that wrote --model, "
                   "from its config.yaml)")
    p.add_argument("--data-path")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--val-size", type=float, default=None, help="as in distill (default: the run's, else the data set's)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the validation split (default: the run's "
                   "data.seed, else 0)")
    p.add_argument("--save-logits", metavar="FILE", help=".safetensors (logits + sample ids) or .npy")
    p.add_argument("--topk", type=int, default=0, metavar="K",
                   help="with --save-logits on per-position data: keep the top K classes per position (a sparse cache)")
    add_trust_code(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("export-onnx", help="write a saved model as ONNX")
    p.add_argument("--model", required=True, help="weights (.safetensors written by `kdistill train`)")
    p.add_argument("--onnx", required=True, help="output file (.onnx)")
    add_trust_code(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("specialists", help="train specialists for a generalist's confusable classes and combine them")
    p.add_argument("--generalist", required=True, help="generalist weights (.safetensors written by `kdistill train`)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-path")
    p.add_argument("--val-size", type=float, default=None)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=4, help="K-means clusters of the prediction covariance")
    p.add_argument("--classes", action="append", metavar="C,C,...", help="a specialist's classes (instead of clustering)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--temperature", "-T", type=float, default=2.0, help="of the generalist's collapsed soft targets")
    p.add_argument("--alpha", type=float, default=0.5, help="soft-target weight for the specialists")
    p.add_argument("--top-k", type=int, default=2, help="generalist's top classes that activate specialists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-logits", metavar="FILE", help="save the combined distribution's log-probabilities on train")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    add_trust_code(p)
    p.set_defaults(func=_specialists)
