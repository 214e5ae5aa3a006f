"""Hugging Face ``transformers`` classifiers behind ``hf:`` specs, built offline and without remote code.

Spec: ``hf:TARGET[,task=TASK][,key=value...]`` where TARGET is one of

* a **model type** of transformers (``bert``, ``vit``, ``distilbert`` ... the keys of ``CONFIG_MAPPING``): a fresh
  model from ``AutoConfig.for_model(TYPE, **options)``, e.g.
  ``hf:bert,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32,vocab_size=100``;
* a **config JSON file** (``hf:cfg/bert_tiny.json``): a fresh model from that config (options override its fields);
* a **local directory** written by ``save_pretrained`` (``hf:./my_bert``, written with a slash so it is never read
  as a model type): ``from_pretrained(DIR, local_files_only=True)``, its weights included; a classification
  head of another class count is made new (``ignore_mismatched_sizes``).

``task`` picks the ``AutoModelFor...`` class: ``sequence-classification`` (token ids in, the default for
1-D inputs), ``image-classification`` (the default for C x H x W inputs), ``audio-classification``, or
``causal-lm`` (token ids (L,) in, next-token logits (L, V) out, for per-position labels (N, L) with -100 not
scored, e.g. ``hf:gpt2,task=causal-lm,n_layer=1,n_head=2,n_embd=32,n_positions=32``).
``num_labels`` is always the data's class count; a causal LM built for a model type gets ``vocab_size`` =
the data's class count unless the spec gives one (a config file's or directory's vocabulary is kept: a size
other than the data's is refused before training). Nothing is ever downloaded (Hub ids are refused, files
are read with ``local_files_only=True``) and ``trust_remote_code`` is never passed, so a config or a
directory cannot run code of its own. Models whose main input is ``input_ids`` get a forward pre-hook
rounding kdistill's float32 inputs to token ids (int64), so token data goes through the float pipeline.

A trained model is saved with its ``config.to_dict()`` in the weights' metadata (:func:`config_of`), so it
rebuilds from the file alone (:func:`build_hf` with ``config=``).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TASKS", "LM_TASKS", "build_hf", "describe_hf", "lm_vocabulary", "config_of", "is_hf_model",
           "FORBIDDEN_OPTIONS"]

TASKS = {  # task -> (Auto class, modeling_auto mapping of model type -> class name)
    "sequence-classification": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "audio-classification": ("AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
}
LM_TASKS = ("causal-lm",)  # the vocabulary is the class count; outputs (L, V) per sample
FORBIDDEN_OPTIONS = ("trust_remote_code", "revision", "code_revision", "token", "cache_dir", "force_download",
                     "local_files_only", "proxies", "auto_map", "pretrained_model_name_or_path")
_FIX = "pip install 'kdistill[hf]'"


def _transformers():
    try:
        return importlib.import_module("transformers")
    except Exception as err:  # a broken install fails variously
        raise ImportError(f"model: hf: specs need transformers, which cannot be imported ({err}); {_FIX}") from err


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return type(model).__module__.startswith("transformers.") and hasattr(getattr(model, "config", None), "to_dict")


def config_of(model: nn.Module) -> dict[str, Any] | None:
    """The JSON-able config of a transformers model (what rebuilds it offline), else None."""
    if not is_hf_model(model):
        return None
    return json.loads(model.config.to_json_string(use_diff=False))


def _task(spec: str, options: dict[str, Any], in_shape: tuple[int, ...]) -> str:
    task = options.pop("task", None) or ("image-classification" if len(in_shape) == 3 else "sequence-classification")
    if task not in TASKS:
        raise ValueError(f"model: {spec!r}: task {task!r} is not one of {sorted(TASKS)}")
    return task


def _config(tf, spec: str, target: str, options: dict[str, Any], recorded: dict[str, Any] | None):
    """The config: recorded in a weights file, from a JSON file, or for a model type; never fetched."""
    if recorded is not None or target.endswith(".json"):
        if recorded is None:
            path = Path(target).expanduser()
            if not path.is_file():
                raise ValueError(f"model: {spec!r}: no config file {path}")
            try:
                recorded = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"model: {spec!r}: {path} is not a JSON config ({err})") from None
        if not isinstance(recorded, dict) or not isinstance(recorded.get("model_type"), str):
            raise ValueError(f"model: {spec!r}: the config records no model_type (not a transformers config)")
        kind = recorded["model_type"]
        if kind not in tf.CONFIG_MAPPING:
            raise ValueError(f"model: {spec!r}: model_type {kind!r} is not built into transformers "
                             f"{tf.__version__} (remote code is never run)")
        clean = {k: v for k, v in recorded.items() if k not in ("auto_map", "model_type")}
        return tf.CONFIG_MAPPING[kind].from_dict({**clean, **options})
    if target not in tf.CONFIG_MAPPING:
        raise ValueError(f"model: {spec!r}: {target!r} is not a transformers model type (e.g. bert, vit, distilbert) "
                         "nor a local directory; kdistill never downloads from the Hub: save the model with "
                         "save_pretrained and write its directory with a slash (hf:./my_model)")
    return tf.AutoConfig.for_model(target, **options)


def _token_ids(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: float inputs (kdistill's data) rounded to the int64 token ids the model embeds."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (args[0].round().long(), *args[1:])
    return None


def _fresh_lm_config(cfg, options: dict[str, Any]) -> None:
    """A language model built for a model type scores whole windows (no key/value cache to return), and has no
    special token beyond its (the data's) vocabulary: the type's defaults (GPT-2's 50256) are dropped."""
    if "use_cache" not in options:
        cfg.use_cache = False
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, key, None)
        if key not in options and isinstance(value, int) and value >= cfg.vocab_size:
            setattr(cfg, key, None)


def build_hf(spec: str, target: str, in_shape: tuple[int, ...], num_classes: int, options: dict[str, Any],
             config: dict[str, Any] | None = None) -> nn.Module:
    """The transformers model of an ``hf:`` spec (see the module docstring); ``config``: one recorded in a file."""
    options = dict(options)
    bad = sorted(k for k in options if k in FORBIDDEN_OPTIONS)
    if bad:
        raise ValueError(f"model: {spec!r}: option {bad[0]!r} is refused: hf: models are built offline and never "
                         "run remote code")
    task = _task(spec, options, in_shape)
    tf = _transformers()
    auto = getattr(tf, TASKS[task][0])
    is_dir = config is None and not target.endswith(".json") and ("/" in target or "\\" in target)
    if is_dir:
        path = Path(target).expanduser()
        if not path.is_dir():
            raise ValueError(f"model: {spec!r}: no local directory {path} (kdistill never downloads from the Hub)")
        cfg = tf.AutoConfig.from_pretrained(str(path), local_files_only=True, **options)
        cfg.num_labels = num_classes
        model = auto.from_pretrained(str(path), config=cfg, local_files_only=True, ignore_mismatched_sizes=True)
    else:
        fresh_lm = task in LM_TASKS and config is None and not target.endswith(".json")
        if fresh_lm:
            options.setdefault("vocab_size", num_classes)  # a fresh LM's vocabulary is the data's classes
        cfg = _config(tf, spec, target, options, config)
        if fresh_lm:
            _fresh_lm_config(cfg, options)
        if cfg.num_labels != num_classes:
            cfg.num_labels = num_classes
        try:
            model = auto.from_config(cfg)
        except ValueError as err:  # no such head for this model type
            raise ValueError(f"model: {spec!r}: transformers has no {task} model for {cfg.model_type!r} ({err}); "
                             f"pick task= one of {sorted(TASKS)}") from None
    if getattr(model, "main_input_name", None) == "input_ids":
        model.register_forward_pre_hook(_token_ids)
    return model


def lm_vocabulary(model: nn.Module) -> int | None:
    """A transformers causal LM's vocabulary (its classes per position), known without running it; else None."""
    described = describe_hf(model)
    if described is None or not described.endswith(",task=causal-lm"):
        return None
    head = model.get_output_embeddings()
    n = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", None)
    return n if isinstance(n, int) else None


def describe_hf(model: nn.Module) -> str | None:
    """``hf:MODEL_TYPE,task=TASK`` when ``AutoModelFor<TASK>.from_config(model.config)`` builds ``model``'s class
    (the config itself goes into the weights' metadata), else None."""
    if not is_hf_model(model):
        return None
    kind = getattr(model.config, "model_type", None)
    try:
        mapping = importlib.import_module("transformers.models.auto.modeling_auto")
    except Exception:  # noqa: BLE001 - a model of transformers exists, so this import fails only when broken
        return None
    for task, (_, names) in TASKS.items():
        name = getattr(mapping, names, {}).get(kind)
        if type(model).__name__ in ((name,) if isinstance(name, str) else tuple(name or ())):
            return f"hf:{kind},task={task}"
    return None
