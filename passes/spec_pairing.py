"""The spec_pairing pass: checks that a draft model can draft for the target, and records the pairing.

Speculative decoding compares the two models' distributions token id by token id, so the
draft must speak the target's vocabulary exactly: the same token -> id map, the same special
tokens (EOS, BOS, added tokens), and embedding tables that cover it. A mismatch is refused
with the first differing tokens named.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer

from llmc.artifacts.tokenizer_meta import tokenizer_manifest
from llmc.errors import PassError

log = logging.getLogger(__name__)

MAX_LISTED = 5


def _vocabulary(tokenizer_dir) -> dict[int, str]:
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return {i: token for token, i in vocab.items()}


def _special_tokens(tokenizer_dir) -> dict:
    meta = tokenizer_manifest(tokenizer_dir, "tokenizer")
    specials = {t.content for t in Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
                .get_added_tokens_decoder().values() if t.special}
    return {"eos_token_ids": sorted(meta.eos_token_ids), "bos_token_id": meta.bos_token_id,
            "special_tokens": sorted(specials)}


def compare_vocabularies(target_dir, draft_dir, target_rows: int, draft_rows: int) -> dict:
    """Raise PassError naming the first differences; return the pairing record when they match.

    target_rows / draft_rows are the models' embedding (and LM head) rows.
    """
    target, draft = _vocabulary(target_dir), _vocabulary(draft_dir)
    differing = [i for i in sorted(set(target) | set(draft)) if target.get(i) != draft.get(i)]
    if differing:
        shown = ", ".join(f"id {i}: target {target.get(i)!r} vs draft {draft.get(i)!r}"
                          for i in differing[:MAX_LISTED])
        raise PassError(f"speculative: the draft's tokenizer does not match the target's ({len(differing)} of "
                        f"{max(len(target), len(draft))} ids differ; first: {shown}). A draft must share the "
                        "target's vocabulary: pick a model of the same family (same tokenizer), or use "
                        "method: ngram")
    target_special, draft_special = _special_tokens(target_dir), _special_tokens(draft_dir)
    for key, value in target_special.items():
        if draft_special[key] != value:
            raise PassError(f"speculative: the draft's {key} is {draft_special[key]!r} but the target's is "
                            f"{value!r}; the two tokenizers must agree on special tokens")
    for name, rows in (("target", target_rows), ("draft", draft_rows)):
        if rows < len(target):
            raise PassError(f"speculative: the {name} model has {rows} embedding rows for a vocabulary of "
                            f"{len(target)} tokens; the checkpoint does not fit its tokenizer")
    return {"tokens_compared": len(target), "target_vocab_rows": target_rows, "draft_vocab_rows": draft_rows,
            **target_special}


class SpecPairing:
    """Pairs the target IR with an already compiled draft IR (its own import and passes)."""

    name = "spec_pairing"

    def __init__(self, draft_ir, draft_name: str, num_tokens: int):
        self.draft_ir = draft_ir
        self.draft_name = draft_name
        self.num_tokens = num_tokens

    def check(self, ir) -> None:
        if self.draft_ir is None:
            raise PassError("spec_pairing needs a compiled draft model")

    def run(self, ir) -> dict:
        record = compare_vocabularies(ir.tokenizer_dir, self.draft_ir.tokenizer_dir, ir.geometry.vocab_size,
                                      self.draft_ir.geometry.vocab_size)
        log.info("    spec_pairing: draft %s matches the target's %d-token vocabulary; k = %d",
                 self.draft_name, record["tokens_compared"], self.num_tokens)
        return {"draft": self.draft_name, "num_tokens": self.num_tokens, **record}
