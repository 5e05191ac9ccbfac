"""Tokenizer facts for the manifest: files, special token ids, chat template presence."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from llmc.artifacts.manifest import TokenizerInfo
from llmc.errors import ModelImportError


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_manifest(tok_dir: Path, rel_dir: str) -> TokenizerInfo:
    """Describe the tokenizer directory: eos/bos ids and whether a chat template exists."""
    try:
        tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception as err:
        raise ModelImportError(f"{tok_dir / 'tokenizer.json'}: cannot load the tokenizer ({err})") from None
    config = _read_json(tok_dir / "tokenizer_config.json")
    generation = _read_json(tok_dir / "generation_config.json")
    eos_ids = generation.get("eos_token_id")
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    eos_text = _token_text(config.get("eos_token"))
    if eos_text and tokenizer.token_to_id(eos_text) is not None and tokenizer.token_to_id(eos_text) not in eos_ids:
        eos_ids.append(tokenizer.token_to_id(eos_text))
    bos_text = _token_text(config.get("bos_token"))
    template = config.get("chat_template")
    if (tok_dir / "chat_template.jinja").is_file():
        template = (tok_dir / "chat_template.jinja").read_text()
    return TokenizerInfo(dir=rel_dir, files=sorted(p.name for p in tok_dir.iterdir() if p.is_file()),
                         eos_token_ids=eos_ids, eos_token=eos_text, bos_token=bos_text,
                         bos_token_id=tokenizer.token_to_id(bos_text) if bos_text else None,
                         chat_template=template, vocab_size=tokenizer.get_vocab_size())
