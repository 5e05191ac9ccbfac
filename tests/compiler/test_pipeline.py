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
