"""``text:PATH``: plain UTF-8 text cut into fixed-length windows for per-position (next-token) training.

``PATH`` is a UTF-8 file or a folder of ``.txt`` files (read in sorted name order and joined as they are).
Tokens are the text's UTF-8 bytes (``tokenizer="bytes"``: 256 classes named by the byte values ``"0"`` ..
``"255"``) or ids of a byte-level BPE trained offline with Hugging Face ``tokenizers`` (``tokenizer="bpe"``,
``vocab_size`` at most; deterministic, trained on the text the model trains on, never the test part).

Each window ``i`` gives inputs ``x = tokens[i*L : i*L+L]`` (int64) and labels ``y = tokens[i*L+1 : i*L+L+1]``
(the next token at each position): windows do not overlap. Splits, so that the test text is never seen:

* test: the windows of the last 10% of the text (cut at a character, tokenised on its own);
* val: a seeded random 10% (at least one) of the windows of the first 90%;
* train: the other windows of the first 90% (the BPE is trained on this 90%, val included, test excluded).

Sample ids are window numbers within their part (train/val share one numbering, test has its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kdistill.data.dataset import DataBundle, TensorData

TEST_FRACTION = 0.1
VAL_FRACTION = 0.1
TOKENIZERS = ("bytes", "bpe")


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, or of a folder's ``.txt`` files in sorted order; clear errors otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ".txt")
        if not files:
            raise ValueError(f"text: folder {str(p)!r} holds no .txt files; put the text in NAME.txt files")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"text: no such file or folder {str(p)!r}")
    parts = []
    for f in files:
        try:
            parts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"text: {str(f)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                             f"save it as UTF-8") from None
    text = "".join(parts)
    if not text:
        raise ValueError(f"text: {str(p)!r} holds no text; give a non-empty UTF-8 file")
    return text


def train_bpe(text: str, vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` ids trained on ``text`` alone."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:
        raise ValueError("data.tokenizer: 'bpe' needs Hugging Face tokenizers; pip install tokenizers, "
                         "or use tokenizer: bytes") from exc
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def encode_text(text: str, tok: Any) -> torch.Tensor:
    """Token ids (1-D int64) of ``text`` as a run tokenises its data (``tok`` None: UTF-8 bytes)."""
    if tok is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tok.encode(text).ids, dtype=torch.long)


def windows(tokens: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: inputs ``tokens[i*L:i*L+L]`` and next-token labels one further on."""
    n = (len(tokens) - 1) // window
    x = tokens[: n * window].reshape(n, window)
    y = tokens[1: n * window + 1].reshape(n, window)
    return x.contiguous(), y.contiguous()


def _check_options(window: int, tokenizer: str, vocab_size: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"data.window: a whole number of tokens >= 1, got {window!r}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"data.tokenizer: one of {list(TOKENIZERS)}, got {tokenizer!r}")
    if tokenizer == "bpe" and (not isinstance(vocab_size, int) or vocab_size < 256):
        raise ValueError(f"data.vocab_size: a byte-level BPE needs at least 256 ids (the bytes), got {vocab_size!r}")


def load_text(path: str | os.PathLike, window: int = 64, tokenizer: str = "bytes", vocab_size: int = 512,
              seed: int = 0, tokenizer_file: str | None = None) -> tuple[DataBundle, Any]:
    """``(bundle, tok)``: the text at ``path`` as train/val/test windows (see the module doc); ``tok`` is the
    trained ``tokenizers.Tokenizer`` for ``bpe`` (save it with :func:`save_tokenizer`), None for bytes.

    ``tokenizer_file``: a saved BPE (``tokenizer.json``, or a run's ``model.safetensors``, which records
    its tokenizer) used as it is instead of training one: how a trained model is evaluated on the ids it
    learnt. Every split records its tokenizer (:func:`tokenizer_record`) in ``preprocessing``."""
    _check_options(window, tokenizer, vocab_size)
    given = None
    if tokenizer_file is not None:
        if tokenizer != "bpe":
            raise ValueError(f"data.tokenizer_file: a saved tokenizer is a byte-level BPE; set data.tokenizer: bpe "
                             f"(got {tokenizer!r}) or drop tokenizer_file")
        given = load_tokenizer(tokenizer_file)
    return text_bundle(read_text(path), f"text:{path}", window, tokenizer, vocab_size, seed, given)


def text_bundle(text: str, name: str, window: int = 64, tokenizer: str = "bytes", vocab_size: int = 512,
                seed: int = 0, given: Any = None) -> tuple[DataBundle, Any]:
    """:func:`load_text` on a text already in memory (``name`` names it in messages and split names);
    ``given``: a ``tokenizers.Tokenizer`` to use instead of training a BPE."""
    _check_options(window, tokenizer, vocab_size)
    path = name.removeprefix("text:")  # as messages name it
    if len(text.encode("utf-8")) < window + 1:
        raise ValueError(f"text: {str(path)!r} is shorter than one window ({window} + 1 tokens); "
                         f"give more text or lower data.window")
    cut = int(len(text) * (1 - TEST_FRACTION))
    head, tail = text[:cut], text[cut:]
    tok = given if given is not None else train_bpe(head, vocab_size) if tokenizer == "bpe" else None
    hx, hy = windows(encode_text(head, tok), window)
    tx, ty = windows(encode_text(tail, tok), window)
    if len(hx) < 2 or len(tx) < 1:
        raise ValueError(f"text: {str(path)!r} gives {len(hx)} window(s) of {window} tokens in its first 90% and "
                         f"{len(tx)} in its last 10%; train, val and test need at least 2 and 1: give more text "
                         f"or lower data.window")
    classes = tuple(str(i) for i in range(256)) if tok is None else \
        tuple(tok.id_to_token(i) for i in range(tok.get_vocab_size()))
    n_val = max(1, round(len(hx) * VAL_FRACTION))
    perm = torch.randperm(len(hx), generator=torch.Generator().manual_seed(seed))
    val_rows, train_rows = perm[:n_val].sort().values, perm[n_val:].sort().values
    record = {"tokenizer": tokenizer_record(tok)}
    head_data = TensorData(hx, hy, classes, name=name, preprocessing=record)
    bundle = DataBundle(train=head_data.subset(train_rows, f"{name} train"),
                        val=head_data.subset(val_rows, f"{name} val"),
                        test=TensorData(tx, ty, classes, name=f"{name} test", preprocessing=record))
    return bundle, tok


def load_text_source(path: str | os.PathLike, window: int = 64, tokenizer: str = "bytes", vocab_size: int = 512,
                     seed: int = 0, tokenizer_file: str | None = None) -> DataBundle:
    """The ``text:PATH`` source of :func:`kdistill.data.load` (options ``window``, ``tokenizer``,
    ``vocab_size``, ``tokenizer_file``); the splits record the tokenizer, which a run saves beside its model
    (:func:`save_run_tokenizer`)."""
    return load_text(path, window=window, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed,
                     tokenizer_file=tokenizer_file)[0]


def tokenizer_record(tok: Any) -> dict[str, Any]:
    """What a split (and so ``model.safetensors``) records of its tokenizer: ``kind`` bytes, or bpe with its
    ``vocab_size``, ``sha256`` and the whole tokenizer as ``json`` (so the model file alone can rebuild it)."""
    if tok is None:
        return {"kind": "bytes", "vocab_size": 256}
    text = tok.to_str()
    return {"kind": "bpe", "vocab_size": tok.get_vocab_size(), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "json": text}


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A saved BPE: a ``tokenizer.json``, or the tokenizer a ``model.safetensors`` of a text run records."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ValueError("data.tokenizer_file: a saved BPE needs Hugging Face tokenizers; pip install tokenizers") \
            from exc
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.tokenizer_file: no such file {str(p)!r}")
    if p.suffix == ".safetensors":
        record = recorded_tokenizer(p)
        if record is None or record.get("kind") != "bpe":
            raise ValueError(f"data.tokenizer_file: {str(p)!r} records no BPE tokenizer; give its run's "
                             f"tokenizer.json, or a model trained on text: data with tokenizer: bpe")
        return Tokenizer.from_str(record["json"])
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises its own exception type for bad JSON
        raise ValueError(f"data.tokenizer_file: {str(p)!r} is not a tokenizers JSON file ({exc})") from None


def recorded_tokenizer(model_file: str | os.PathLike) -> dict[str, Any] | None:
    """The tokenizer record of a kdistill ``model.safetensors`` (None if it records none)."""
    with safe_open(str(model_file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("kdistill") or "{}")
    record = (meta.get("preprocessing") or {}).get("tokenizer")
    return record if isinstance(record, dict) else None


def tokenizer_of(record: dict[str, Any]) -> Any:
    """The tokenizer a record describes (:func:`tokenizer_record`): None for bytes, the BPE rebuilt from its JSON."""
    if record.get("kind") != "bpe":
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ValueError("this model's tokenizer is a byte-level BPE, which needs Hugging Face tokenizers; "
                         "pip install tokenizers") from exc
    return Tokenizer.from_str(record["json"])


def token_text(token: int, tok: Any) -> str:
    """What one token id stands for, as text (a byte that is not a whole UTF-8 character shows as ``\\xNN``)."""
    if tok is None:
        raw = bytes([token])
        return raw.decode("utf-8") if token < 128 else f"\\x{token:02x}"
    return tok.decode([token])


def decode_ids(ids: list[int], tok: Any) -> str:
    """The text of a sequence of token ids (bytes that do not form UTF-8 characters replaced by U+FFFD)."""
    if tok is None:
        return bytes(ids).decode("utf-8", errors="replace")
    return tok.decode(ids)


def evaluate_options(name: str, options: dict[str, Any], model_file: str | os.PathLike) -> dict[str, Any]:
    """``options`` for loading ``text:`` data to evaluate ``model_file``: a model trained on a BPE gets that
    same BPE (``tokenizer: bpe``, ``tokenizer_file`` = the model file) unless the options name a file."""
    if not name.startswith("text:") or options.get("tokenizer_file"):
        return options
    record = recorded_tokenizer(model_file)
    if record is None or record.get("kind") != "bpe":
        return options
    return {**options, "tokenizer": "bpe", "tokenizer_file": str(model_file)}


def save_run_tokenizer(folder: str | os.PathLike, split: Any) -> Path | None:
    """Beside a run's model: ``tokenizer.json`` for a BPE, ``tokenizer.txt`` saying so for bytes; nothing
    for data that is not text. Written through a temp file and a rename."""
    record = (getattr(split, "preprocessing", None) or {}).get("tokenizer")
    if not isinstance(record, dict):
        return None
    if record.get("kind") == "bpe":
        return _write(Path(folder) / "tokenizer.json", record["json"])
    return _write(Path(folder) / "tokenizer.txt", "bytes: token ids are the UTF-8 bytes of the text (0..255), "
                  "labels the next byte; no tokenizer file is needed.\n")


def _write(out: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def save_tokenizer(tok: Any, folder: str | os.PathLike) -> Path:
    """Write ``tok`` as ``folder/tokenizer.json`` (a temp file, then renamed: never half written)."""
    out = Path(folder) / "tokenizer.json"
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tokenizer.", suffix=".json")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
