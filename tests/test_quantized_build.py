"""AWQ / GPTQ builds end to end on the tiny model: calibration, quality report, and `llmc eval` on the
int4 engine agreeing with the build's torch fake-quant evaluation."""

import json
import random

import pytest

from llmc.artifacts.bundle import load_bundle
from llmc.compiler.pipeline import build
from llmc.compiler.spec import load_spec
from tests.helpers import TEXT, write_yaml
from tests.test_cli import llmc


def _text(path, seed):
    words = TEXT.split()
    random.Random(seed).shuffle(words)
    path.write_text(" ".join(words * 3))
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    work = tmp_path_factory.mktemp("texts")
    return _text(work / "calibration.txt", 0), _text(work / "held_out.txt", 1)


@pytest.mark.parametrize("method,section", [("gptq", {"act_order": True}), ("awq", {"grid": 5})])
def test_calibrated_build_reports_quality_and_eval_matches(tmp_path, tiny_checkpoint, texts, method, section):
    calibration_text, held_out = texts
    spec = load_spec(write_yaml(
        tmp_path / "model.yaml", name=f"tiny-{method}", source=str(tiny_checkpoint), output="out",
        quantization={"method": method, "group_size": 32, "accuracy_level": 0, method: section},
        calibration={"texts": [str(calibration_text)], "n_samples": 4, "seq_len": 64},
        eval={"texts": [str(held_out)], "seq_len": 64, "max_windows": 4}))
    bundle = load_bundle(build(spec))
    manifest = bundle.manifest
    record = manifest.pass_record(f"quant_{method}")
    assert record.extra["calibration_windows"] == [4, 64] and record.num_quantized == 2 * 7 + 1
    report = json.loads((bundle.path / "report.json").read_text())
    layer_errors = report["passes"][0]["per_layer_output_error"]
    assert set(layer_errors) == {"layers.0", "layers.1"} and all(0 < e < 1 for e in layer_errors.values())
    assert len(report["passes"][0]["per_linear"]) == 15
    quality = manifest.quality.eval
    assert quality.windows == 4 and quality.kl_from_reference > 0
    assert quality.perplexity != quality.reference_perplexity

    out = llmc("eval", bundle.path, "--text", held_out, "--seq-len", 64, "--max-windows", 4,
               "--reference", tiny_checkpoint, "--json")
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert measured["perplexity"] == pytest.approx(quality.perplexity, rel=0.005)  # int4 engine = fake quant
    assert measured["reference_perplexity"] == pytest.approx(quality.reference_perplexity, rel=1e-4)
    assert measured["kl_from_reference"] == pytest.approx(quality.kl_from_reference, rel=0.05)


def test_eval_errors_are_user_errors(tiny_bundle, tmp_path, texts):
    out = llmc("eval", tiny_bundle, "--text", tmp_path / "absent.txt")
    assert out.returncode != 0 and "no such file" in out.stderr and "Traceback" not in out.stderr
    short = tmp_path / "short.txt"
    short.write_text("The capital")
    out = llmc("eval", tiny_bundle, "--text", short)
    assert out.returncode != 0 and "need" in out.stderr and "Traceback" not in out.stderr


def test_calibration_text_too_short_fails_before_writing(tmp_path, tiny_checkpoint):
    short = tmp_path / "short.txt"
    short.write_text("The capital of France is Paris.")
    out = llmc("build", write_yaml(tmp_path / "model.yaml", name="m", source=str(tiny_checkpoint),
                                   quantization={"method": "gptq", "group_size": 32},
                                   calibration={"texts": ["short.txt"], "n_samples": 8, "seq_len": 64}))
    assert out.returncode != 0 and "calibration" in out.stderr and "n_samples" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out" / "m").exists()


def test_missing_eval_text_fails_before_the_passes_run(tmp_path, tiny_checkpoint, texts):
    out = llmc("build", write_yaml(tmp_path / "model.yaml", name="m", source=str(tiny_checkpoint),
                                   quantization={"method": "gptq", "group_size": 32},
                                   calibration={"texts": [str(texts[0])], "n_samples": 2, "seq_len": 64},
                                   eval={"texts": ["nowhere.txt"]}))
    assert out.returncode != 0 and "nowhere.txt: no such file" in out.stderr and "eval section" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out" / "m").exists()


def test_inspect_shows_the_quality_report(tmp_path, tiny_checkpoint, texts):
    spec = load_spec(write_yaml(tmp_path / "model.yaml", name="q", source=str(tiny_checkpoint), output="out",
                                quantization={"method": "rtn", "group_size": 32},
                                eval={"texts": [str(texts[1])], "seq_len": 64, "max_windows": 2}))
    out = llmc("inspect", build(spec))
    assert out.returncode == 0 and "quant_rtn: 15 linears, 4-bit groups of 32" in out.stdout
    assert "quality   perplexity" in out.stdout and "KL" in out.stdout
