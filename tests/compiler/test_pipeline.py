"""`llmc build` as a list of stages: which ones a spec runs, in order, each timed in the manifest."""

import json

from llmc.compiler.pipeline import stages
from llmc.compiler.spec import parse_spec


def _names(tmp_path, **fields) -> list[str]:
    (tmp_path / "text.txt").write_text("words " * 100)
    spec = parse_spec({"name": "m", "source": str(tmp_path), **fields}, tmp_path)
    return [name for name, _ in stages(spec)]


def test_stages_follow_the_spec(tmp_path):
    assert _names(tmp_path) == ["import", "passes", "emit", "bundle"]
    assert _names(tmp_path, eval={"texts": ["text.txt"]}) == ["import", "passes", "evaluate", "emit", "bundle"]
    assert _names(tmp_path, speculative={"method": "draft", "draft": str(tmp_path)}, eval={"texts": ["text.txt"]}) == [
        "import", "passes", "draft", "evaluate", "emit", "bundle"]
    assert _names(tmp_path, speculative={"method": "ngram"}) == ["import", "passes", "emit", "bundle"]


def test_every_stage_before_the_bundle_is_timed(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert list(manifest["timings_s"]) == ["import", "passes", "emit"]
    assert all(seconds >= 0 for seconds in manifest["timings_s"].values())


def test_a_cuda_only_build_runs_without_the_onnx_package(tmp_path, tiny_checkpoint):
    """The GPU machines' images have no `onnx`: a build with targets [cuda] must not import it."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["onnx"] = None  # any import of onnx now raises ImportError
from llmc.compiler.pipeline import build
from llmc.compiler.spec import parse_spec
spec = parse_spec({{"name": "cuda-only", "source": {str(tiny_checkpoint)!r}, "targets": ["cuda"],
                   "output": {str(tmp_path / "out")!r}, "quantization": {{"method": "rtn", "group_size": 32}}}},
                  {str(tmp_path)!r})
print(build(spec))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "cuda-only" / "manifest.json").read_text())
    assert list(manifest["engines"]) == ["cuda"] and manifest["engines"]["cuda"]["quantized_linears"]
