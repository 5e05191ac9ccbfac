"""llmc's torch model (the IR) against transformers' logits on tiny random checkpoints."""

import pytest
import torch

from llmc.compiler.importer import import_checkpoint
from tests.helpers import write_tiny_checkpoint


def _contiguous_step(model, ids, block_size=4):
    """Run a whole prompt in one step with an identity block table."""
    num_tokens = len(ids)
    num_blocks = -(-num_tokens // block_size)
    kv = model.new_kv_cache(num_blocks + 1, block_size)
    return model(torch.tensor(ids), torch.arange(num_tokens), torch.arange(num_tokens),
                 torch.arange(num_blocks, dtype=torch.int32)[None], torch.tensor([num_tokens], dtype=torch.int32),
                 torch.tensor([0, num_tokens], dtype=torch.int32), torch.arange(num_tokens), kv)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 4}),  # multi-head attention
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),  # MQA, tied head
    ("qwen2", {}),  # attention bias
    ("mistral", {"sliding_window": None}),
])
def test_matches_transformers(tmp_path, arch, overrides):
    import transformers

    ckpt = write_tiny_checkpoint(tmp_path / arch, arch=arch, **overrides)
    ir = import_checkpoint(ckpt, work_dir=tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ir.geometry.vocab_size, (100,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    got = _contiguous_step(ir.model, ids.tolist())
    assert expected.abs().max() > 0.1  # not a degenerate model
    assert (got - expected).abs().max() < 1e-4


def test_chunked_paged_prefill_equals_one_shot(tiny_checkpoint, tmp_path):
    """Prefill in chunks over scattered blocks, then decode: same logits as one shot."""
    model = import_checkpoint(tiny_checkpoint, work_dir=tmp_path).model
    ids = torch.randint(0, model.geo.vocab_size, (23,), generator=torch.Generator().manual_seed(2))
    expected = _contiguous_step(model, ids.tolist())
    block_size, table = 4, torch.tensor([[9, 2, 7, 0, 5, 11]], dtype=torch.int32)
    kv = model.new_kv_cache(12, block_size)
    got = []
    for start, end in ((0, 10), (10, 11), (11, 20), (20, 21), (21, 22), (22, 23)):
        pos = torch.arange(start, end)
        slots = table[0, pos // block_size].long() * block_size + pos % block_size
        logits = model(ids[start:end], pos, slots, table, torch.tensor([end], dtype=torch.int32),
                       torch.tensor([0, end - start], dtype=torch.int32), torch.arange(end - start), kv)
        got.append(logits)
    got = torch.cat(got)
    assert (got - expected).abs().max() < 1e-4
