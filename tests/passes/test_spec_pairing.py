"""The spec_pairing pass: matching pairs build into one bundle with two engines; mismatches are refused."""

import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.compiler.pipeline import build
from llmc.compiler.spec import load_spec
from llmc.errors import PassError
from tests.helpers import write_tiny_checkpoint, write_yaml


def test_draft_pair_bundle_records_pairing_and_both_engines(tmp_path, tiny_checkpoint):
    write_yaml(tmp_path / "draft.yaml", name="tiny-int4", source=str(tiny_checkpoint),
               quantization={"method": "rtn", "bits": 4, "group_size": 32, "lm_head": False})
    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="pair", source=str(tiny_checkpoint), output="out",
                                kv_cache={"block_size": 4},
                                speculative={"method": "draft", "draft": "draft.yaml", "num_tokens": 3}))
    bundle = load_bundle(build(spec))  # verifies every file, the draft engine's included
    section = bundle.manifest.speculative
    assert section.method == "draft" and section.num_tokens == 3
    assert section.pairing.name == "spec_pairing" and section.pairing.extra["tokens_compared"] > 300
    assert section.draft.name == "tiny-int4"
    assert [p.name for p in section.draft.passes] == ["quant_rtn"]  # compiled with its own passes
    engine = section.draft.engine
    assert engine.quantized_linears and f"{engine.dir}/{engine.graph}" in bundle.manifest.files
    assert not any(name.startswith("draft-work") for name in bundle.manifest.files)


def test_mismatched_tokenizers_are_refused_naming_the_tokens(tmp_path, tiny_checkpoint):
    other = write_tiny_checkpoint(tmp_path / "other", tokenizer_vocab=300)  # a different BPE vocabulary
    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="pair", source=str(tiny_checkpoint), output="out",
                                speculative={"method": "draft", "draft": str(other)}))
    with pytest.raises(PassError) as err:
        build(spec)
    message = str(err.value)
    assert "does not match the target's" in message and "first: id " in message and "target '" in message
    assert not (tmp_path / "out" / "pair").exists()  # nothing half-built is left behind


def test_missing_draft_fails_before_the_build(tmp_path, tiny_checkpoint):
    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="pair", source=str(tiny_checkpoint), output="out",
                                speculative={"method": "draft", "draft": "nowhere"}))
    with pytest.raises(Exception, match="does not exist"):
        build(spec)


def test_ngram_bundle_needs_no_draft_engine(tmp_path, tiny_checkpoint):
    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="ng", source=str(tiny_checkpoint), output="out",
                                speculative={"method": "ngram", "num_tokens": 5, "ngram": {"max_n": 4}}))
    section = load_bundle(build(spec)).manifest.speculative
    assert section.model_dump(exclude_none=True) == {"method": "ngram", "num_tokens": 5, "adaptive": True,
                                                     "ngram": {"min_n": 1, "max_n": 4}}
