"""The serving path (load a bundle, generate through onnxruntime) never imports the build side."""

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from llmc.runtime.llm import LLM
from llmc.runtime.sequence import SamplingParams
out = LLM(sys.argv[1]).generate(["The capital of"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
heavy = sorted(m for m in ("torch", "transformers", "onnx", "safetensors", "llmc.compiler", "llmc.passes")
               if m in sys.modules)
print(json.dumps({"tokens": len(out.token_ids), "heavy": heavy}))
"""


def test_generation_does_not_import_torch(tiny_bundle):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle)], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tokens": 4, "heavy": []}


def test_cli_run_does_not_import_torch(tiny_bundle):
    code = ("import sys; sys.argv = ['llmc', 'run', sys.argv[1], '-p', 'The', '--max-tokens', '3'];"
            "from llmc.cli import main\ntry:\n    main()\n"
            "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO_TORCH")
