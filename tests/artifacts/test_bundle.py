"""The bundle contract: complete manifest, verified checksums, atomic writes, clear refusals."""

import json
import shutil

import pytest

from llmc.artifacts.bundle import MANIFEST, MANIFEST_CHECKSUM, load_bundle
from llmc.artifacts.manifest import MIN_SCHEMA_VERSION, SCHEMA_VERSION
from llmc.errors import BundleError
from tests.helpers import edit_manifest, write_yaml


def _copy(bundle, tmp_path, name="copy"):
    return shutil.copytree(bundle, tmp_path / name)


def test_manifest_contents(tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    assert m.schema_version == SCHEMA_VERSION and m.llmc_version
    assert m.source.kind == "hf" and all(len(f.sha256) == 64 for f in m.source.files)
    assert m.model.num_layers == 2 and m.model.num_kv_heads == 2
    assert m.kv_cache.block_size == 4
    assert m.kv_cache.bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert "engines/onnxruntime/model.onnx" in m.files and "tokenizer/tokenizer.json" in m.files
    assert set(m.timings_s) >= {"import", "passes", "emit"}
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST, MANIFEST_CHECKSUM} == set(m.files)


def test_the_manifest_file_is_the_typed_manifest_written_out(tiny_bundle):
    """What the build wrote is exactly the typed manifest's JSON: no key outside the schema, none lost."""
    raw = json.loads((tiny_bundle / MANIFEST).read_text())
    assert load_bundle(tiny_bundle).manifest.to_dict() == raw


def _all_files(bundle):
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


def test_every_file_tamper_detected_and_named(tiny_bundle, tmp_path):
    for rel in _all_files(tiny_bundle):
        copy = _copy(tiny_bundle, tmp_path, rel.replace("/", "_"))
        path = copy / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # flip one bit of one byte
        path.write_bytes(bytes(data))
        with pytest.raises(BundleError) as err:
            load_bundle(copy)
        named = MANIFEST if rel == MANIFEST_CHECKSUM else rel
        assert named in str(err.value), (rel, str(err.value))


def test_truncated_and_missing_files(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    data_file = copy / "engines/onnxruntime/model.onnx.data"
    data_file.write_bytes(data_file.read_bytes()[:-10])
    with pytest.raises(BundleError, match="model.onnx.data is truncated"):
        load_bundle(copy)
    data_file.unlink()
    with pytest.raises(BundleError, match="model.onnx.data is missing"):
        load_bundle(copy)


def test_newer_schema_refused(tiny_bundle, tmp_path):
    copy = edit_manifest(tiny_bundle, tmp_path / "newer", lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match=f"schema version {SCHEMA_VERSION + 1}.*Upgrade llmc"):
        load_bundle(copy)


def test_older_schema_refused_with_a_rebuild_hint(tiny_bundle, tmp_path):
    copy = edit_manifest(tiny_bundle, tmp_path / "older", lambda m: m.update(schema_version=MIN_SCHEMA_VERSION - 1))
    with pytest.raises(BundleError, match=f"schema version {MIN_SCHEMA_VERSION - 1}.*rebuild it with this llmc"):
        load_bundle(copy)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["engines"]["onnxruntime"].pop("graph"), r"engines\.onnxruntime\.graph: Field required"),
    (lambda m: m["kv_cache"].update(block_size="sixteen"), r"kv_cache\.block_size: Input should be a valid integer"),
    (lambda m: m["model"].update(num_heads_typo=9), r"model\.num_heads_typo: Unexpected keyword argument"),
    (lambda m: m.update(speculative={"method": "medusa", "num_tokens": 4, "adaptive": True}),
     r"speculative\.method: Input should be 'draft' or 'ngram'"),
])
def test_a_manifest_this_llmc_cannot_read_names_the_field_and_asks_for_a_rebuild(tiny_bundle, tmp_path, edit, field):
    """A manifest of the current schema version whose sections another llmc (or a hand edit) changed: refused
    at load, naming the field, never a KeyError later in the runtime."""
    copy = edit_manifest(tiny_bundle, tmp_path / "edited", edit)
    with pytest.raises(BundleError, match=field + r".*rebuild the bundle with this llmc"):
        load_bundle(copy)


def test_other_kv_layout_refused_with_a_rebuild_hint(tiny_bundle, tmp_path):
    """A bundle from before the token-major KV pools (its engine reads [KVH, NB, B, D]) is refused."""
    from llmc.runtime.engine_ort import OrtEngine

    copy = edit_manifest(tiny_bundle, tmp_path / "head-major", lambda m: m["kv_cache"].update(
        layout="[num_kv_heads, num_blocks, block_size, head_dim] per layer"))
    with pytest.raises(BundleError, match=r"built for KV pools laid out as \[num_kv_heads.*rebuild it"):
        OrtEngine(load_bundle(copy))


def test_a_bundle_whose_attention_plan_passed_a_mask_is_refused_with_a_rebuild_hint(tiny_bundle, tmp_path):
    """Bundles from before the plan's lengths (a padded mask per layer) carry no attention_plan."""
    from llmc.runtime.engine_ort import OrtEngine

    assert load_bundle(tiny_bundle).manifest.engines["onnxruntime"].attention_plan == "lengths"
    copy = edit_manifest(tiny_bundle, tmp_path / "masked", lambda m: m["engines"]["onnxruntime"].pop("attention_plan"))
    with pytest.raises(BundleError, match=r"earlier llmc whose attention plan passed a padded mask.*rebuild it"):
        OrtEngine(load_bundle(copy))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path / "empty")


def test_crashed_build_leaves_no_bundle_and_keeps_the_old_one(tiny_checkpoint, tmp_path, monkeypatch):
    from llmc.compiler import pipeline
    from llmc.compiler.spec import load_spec

    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="b", source=str(tiny_checkpoint), output="out"))
    good = pipeline.build(spec)
    before = (good / MANIFEST).read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while emitting")

    from llmc.compiler import emit_onnx

    monkeypatch.setattr(emit_onnx, "emit_onnx", crash)  # the emit stage imports it when it runs
    with pytest.raises(RuntimeError):
        pipeline.build(spec)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]  # no staging leftovers
    assert (good / MANIFEST).read_bytes() == before
    load_bundle(good)
