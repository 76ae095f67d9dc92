"""How many token ids a tokenizer folder can produce, read from its files without loading transformers.

The text encoder looks every id up in its embedding table, which has ``vocab_size`` rows
(``text_encoder/config.json``). An id beyond them is an ``IndexError`` on the CPU and a device-side assert on a
GPU, which ends the process's use of CUDA; so the folder check compares the two before anything is loaded.

The ids are those of the vocabulary (``tokenizer.json``'s model, or ``vocab.json`` where there is no
``tokenizer.json``: transformers prefers the former), its added tokens, and ``added_tokens_decoder`` in
``tokenizer_config.json``. Special tokens that the config names but the vocabulary lacks are added by
transformers when it loads the tokenizer, each with a new id, so they count too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .folder_files import Problems, file_problem, read_json

__all__ = ["check_vocabulary", "token_count"]

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def check_vocabulary(folder: Path, tokenizer_config: Mapping[str, Any], vocab_size: int, problems: Problems) -> None:
    """Add a problem if the tokenizer in ``folder`` can produce an id of ``vocab_size`` or more."""
    counted = token_count(folder, tokenizer_config, problems)
    if counted is None:
        return
    count, label = counted
    if count > vocab_size:
        problems.append(
            (
                label,
                f"the tokenizer has {count} token ids (0 to {count - 1}), but text_encoder/config.json's vocab_size "
                f"is {vocab_size}: the text encoder has no embedding for ids {vocab_size} and up (a prompt that "
                "produces one is an IndexError, or a device-side assert on a GPU); the tokenizer and the text "
                "encoder do not belong together",
            )
        )


def token_count(folder: Path, tokenizer_config: Mapping[str, Any], problems: Problems) -> tuple[int, str] | None:
    """(one more than the largest id the tokenizer can produce, the file its vocabulary was read from), or None
    where no vocabulary can be read (a problem is added, unless its files were already reported missing)."""
    read = _vocabulary(folder, problems)
    if read is None:
        return None
    ids, label = read
    decoder = tokenizer_config.get("added_tokens_decoder") or {}  # types checked with the rest of the config
    ids += [(entry["content"], int(key)) for key, entry in decoder.items()]
    named: list[object] = [tokenizer_config.get(key) for key in _SPECIAL_TOKEN_KEYS]
    named += tokenizer_config.get("additional_special_tokens") or []
    extra = tokenizer_config.get("extra_special_tokens") or []
    named += list(extra.values()) if isinstance(extra, dict) else extra
    contents = {token["content"] if isinstance(token, dict) else token for token in named if token is not None}
    new = contents - {token for token, _ in ids}
    return max((index for _, index in ids), default=-1) + 1 + len(new), label


def _vocabulary(folder: Path, problems: Problems) -> tuple[list[tuple[str, int]], str] | None:
    """(token, id) pairs from tokenizer.json (its model's vocabulary and its added tokens) or else vocab.json."""
    if file_problem(folder / "tokenizer.json") is None:
        label = "tokenizer/tokenizer.json"
        data = read_json(folder / "tokenizer.json", problems, label)
        if data is None:
            return None
        model = data.get("model")
        vocab, added = (model.get("vocab") if isinstance(model, dict) else None), data.get("added_tokens", [])
    elif file_problem(folder / "vocab.json") is None:
        label = "tokenizer/vocab.json"
        vocab, added = read_json(folder / "vocab.json", problems, label), []
        if vocab is None:
            return None
    else:
        return None  # the folder check has reported the tokenizer's files
    ids: list[tuple[str, int]]
    if isinstance(vocab, dict) and all(_is_id(value) for value in vocab.values()):
        ids = list(vocab.items())
    elif isinstance(vocab, list) and all(isinstance(entry, list) and entry for entry in vocab):
        ids = [(str(entry[0]), index) for index, entry in enumerate(vocab)]  # Unigram: [token, score] by id
    else:
        problems.append((label, "has no vocabulary of tokens and their ids"))
        return None
    if not (isinstance(added, list) and all(_is_added_token(token) for token in added)):
        problems.append((label, "added_tokens is not a list of tokens with their ids"))
        return None
    ids += [(token["content"], token["id"]) for token in added]
    return ids, label


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_added_token(token: object) -> bool:
    return isinstance(token, dict) and isinstance(token.get("content"), str) and _is_id(token.get("id"))
