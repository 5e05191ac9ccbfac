"""Import refuses what it cannot run, with messages that say what and why."""

import json
import shutil

import pytest

from llmc.compiler.importer import import_checkpoint
from llmc.errors import ModelImportError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_named(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "gpt2")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelImportError, match="unsupported architecture GPT2LMHeadModel"):
        import_checkpoint(ckpt)


def test_pickle_refused_by_default(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "pickled")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelImportError, match="does not unpickle"):
        import_checkpoint(ckpt)


def test_corrupt_weights(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "corrupt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelImportError, match="corrupt or truncated"):
        import_checkpoint(ckpt)


def test_missing_weights_and_config(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "noweights")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelImportError, match="no weights found"):
        import_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelImportError, match="no config.json"):
        import_checkpoint(ckpt)


def test_shape_mismatch(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "shapes")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelImportError, match="has shape"):
        import_checkpoint(ckpt)
