"""The CLI as a user meets it: exit codes, one-paragraph errors, no tracebacks."""

import shutil
import subprocess
import sys

import pytest

from tests.helpers import write_yaml


def llmc(*args, cwd=None):
    """Run the real console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-c", "from llmc.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_kv_size_llama2_70b_gqa_vs_mha():
    gqa = llmc("kv-size", "--layers", 80, "--heads", 64, "--kv-heads", 8, "--head-dim", 128, "--dtype", "fp16")
    mha = llmc("kv-size", "--layers", 80, "--heads", 64, "--kv-heads", 64, "--head-dim", 128, "--dtype", "fp16")
    assert gqa.returncode == 0 and mha.returncode == 0
    assert "327,680 bytes/token" in gqa.stdout and "2,621,440 bytes/token" in mha.stdout
    assert "2 x 80 x 8 x 128 x 2" in gqa.stdout and "grouped-query" in gqa.stdout


def test_kv_size_of_bundle_and_config(tiny_bundle, tiny_checkpoint):
    out = llmc("kv-size", tiny_bundle, "--context", 10, "--batch", 3)
    assert out.returncode == 0, out.stderr
    assert "512 bytes/token" in out.stdout and "12 slots in blocks of 4" in out.stdout
    assert f"{512 * 12 * 3:,} bytes" in out.stdout
    cfg = llmc("kv-size", tiny_checkpoint / "config.json", "--dtype", "fp32")
    assert "512 bytes/token" in cfg.stdout


def test_kv_size_needs_geometry():
    out = llmc("kv-size", "--layers", 2)
    assert out.returncode != 0 and "missing --kv-heads, --head-dim" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("fields,expected", [
    ({"name": "m", "source": "x", "colour": "red"}, "colour: unknown key"),
    ({"name": "m", "source": "x", "kv_cache": {"block_size": "big"}}, "kv_cache.block_size"),
    ({"name": "m"}, "source: required field is missing"),
    ({"name": "m", "source": "missing-dir"}, "does not exist"),
])
def test_bad_model_yaml(tmp_path, fields, expected):
    out = llmc("build", write_yaml(tmp_path / "model.yaml", **fields))
    assert out.returncode != 0 and expected in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.startswith("error:")


def test_unsupported_architecture_via_cli(tmp_path, tiny_checkpoint):
    import json

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = llmc("build", write_yaml(tmp_path / "model.yaml", name="m", source="ckpt"))
    assert out.returncode != 0 and "unsupported architecture FalconForCausalLM" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out" / "m").exists()


def test_inspect_verifies_and_names_tampered_file(tiny_bundle, tmp_path):
    ok = llmc("inspect", tiny_bundle)
    assert ok.returncode == 0 and "all sha256 checksums match" in ok.stdout
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    path = copy / "tokenizer" / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x20
    path.write_bytes(bytes(data))
    bad = llmc("inspect", copy)
    assert bad.returncode != 0 and "tokenizer/tokenizer.json" in bad.stderr and "Traceback" not in bad.stderr


def test_run_streams_and_reports_bad_prompt(tiny_bundle):
    out = llmc("run", tiny_bundle, "-p", "The capital", "--max-tokens", "5")
    assert out.returncode == 0, out.stderr
    long = llmc("run", tiny_bundle, "-p", "The capital " * 400, "--max-tokens", "5")
    assert long.returncode != 0 and "context is 512" in long.stderr and "Traceback" not in long.stderr


def test_build_output_overrides_the_yaml_and_versions_agree(tmp_path, tiny_checkpoint):
    """`llmc build --output DIR` writes DIR/<name> (not the yaml's `output:`), relative to the current
    directory; `llmc --version`, the installed package and the manifest name one version."""
    import importlib.metadata
    import json

    import llmc as package

    yaml_dir = tmp_path / "config"
    yaml_dir.mkdir()
    spec = write_yaml(yaml_dir / "model.yaml", name="tiny-out", source=str(tiny_checkpoint), output="from-yaml")
    out = llmc("build", spec, "--output", "dist", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    bundle = tmp_path / "dist" / "tiny-out"
    assert out.stdout.strip() == str(bundle) and not (yaml_dir / "from-yaml").exists()
    manifest = json.loads((bundle / "manifest.json").read_text())
    version = llmc("--version")
    assert version.stdout.strip() == f"llmc, version {package.__version__}"
    assert manifest["llmc_version"] == package.__version__ == importlib.metadata.version("llmc")


def test_top_level_api_generates(tiny_bundle):
    """`from llmc import LLM, SamplingParams`, as users of vLLM write it."""
    from llmc import LLM, SamplingParams
    from llmc.runtime.llm import LLM as RuntimeLLM

    assert LLM is RuntimeLLM
    out = LLM(tiny_bundle).generate(["The capital of"], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        import llmc

        llmc.Engine  # noqa: B018
