"""The emitted step graph: one llmc.PagedAttention node per layer, matching the torch model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llmc.compiler.emit_onnx import EmitOptions, emit_onnx
from llmc.compiler.importer import import_checkpoint
from tests.helpers import ort_options, profiled_op_types


def _feeds(inputs, kv):
    feeds = {k: v.numpy() for k, v in inputs.items() if k != "slot_mapping"}
    for i, (k, v) in enumerate(kv):
        feeds[f"key_pool_{i}"], feeds[f"value_pool_{i}"] = k.numpy().copy(), v.numpy().copy()
    return feeds


def test_graph_structure(tiny_checkpoint, tmp_path):
    model = import_checkpoint(tiny_checkpoint, work_dir=tmp_path).model
    entry = emit_onnx(model, tmp_path / "engine")
    proto = onnx.load(str(tmp_path / "engine" / entry["graph"]), load_external_data=False)
    attn = [n for n in proto.graph.node if n.op_type == "PagedAttention"]
    assert len(attn) == model.geo.num_layers and all(n.domain == "llmc" for n in attn)
    assert [f.name for f in proto.functions] == ["PagedAttention"]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("fused", [False, True], ids=["function-body", "fused-kernel"])
def test_onnxruntime_matches_torch_over_interleaved_blocks(tiny_checkpoint, tmp_path, fused, kv_dtype):
    """Two sequences prefill (one in two chunks) then decode, in interleaved blocks of the pool; attention
    as the op's ONNX function body and as llmc's fused CPU kernel, over float32 and float16 pools."""
    model = import_checkpoint(tiny_checkpoint, work_dir=tmp_path).model
    entry = emit_onnx(model, tmp_path / "engine", options=EmitOptions(kv_dtype=kv_dtype))
    session = ort.InferenceSession(str(tmp_path / "engine" / entry["graph"]), ort_options(fused, tmp_path / "prof"),
                                   providers=["CPUExecutionProvider"])
    block_size, num_blocks = 4, 16
    kv_torch = model.new_kv_cache(num_blocks, block_size, getattr(torch, kv_dtype))
    kv_ort = [(k.numpy().copy(), v.numpy().copy()) for k, v in kv_torch]
    tables = torch.tensor([[3, 7, 1, 12], [5, 0, 9, 0]], dtype=torch.int32)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.geo.vocab_size, (n,), generator=rng) for n in (13, 6)]
    # (tokens of seq0, tokens of seq1) per step, as (start, end) ranges; ends past the prompt are decodes.
    schedule = [((0, 9), (0, 6)), ((9, 13), (6, 7)), ((13, 14), (7, 8)), ((14, 15), (8, 9))]
    seqs = [p.tolist() for p in prompts]
    last = None  # greedy tokens of the previous step, fed back in decode steps
    for ranges in schedule:
        ids, pos, slots, starts, lens, logits_index = [], [], [], [0], [], []
        for s, (start, end) in enumerate(ranges):
            while len(seqs[s]) < end:  # decode: feed back the greedy token of the previous step
                seqs[s].append(int(last[s]))
            p = torch.arange(start, end)
            ids.append(torch.tensor(seqs[s][start:end]))
            pos.append(p)
            slots.append(tables[s, p // block_size].long() * block_size + p % block_size)
            starts.append(starts[-1] + end - start)
            lens.append(end)
            logits_index.append(starts[-1] - 1)
        inputs = {"input_ids": torch.cat(ids), "positions": torch.cat(pos), "slot_mapping": torch.cat(slots),
                  "block_tables": tables, "context_lens": torch.tensor(lens, dtype=torch.int32),
                  "query_start": torch.tensor(starts, dtype=torch.int32), "logits_index": torch.tensor(logits_index)}
        expected = model(kv_cache=kv_torch, **inputs)
        feeds = _feeds(inputs, [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv_ort])
        logits, new_keys, new_values = session.run(None, feeds)
        flat = inputs["slot_mapping"].numpy()
        for layer, (k, v) in enumerate(kv_ort):  # [NB, B, KVH, D] pools, written at flat slots
            k.reshape(-1, *k.shape[2:])[flat] = new_keys[layer]
            v.reshape(-1, *v.shape[2:])[flat] = new_values[layer]
        assert new_keys.dtype == np.dtype(kv_dtype)
        assert np.abs(logits - expected.numpy()).max() < 1e-4
        last = expected.argmax(-1)
    rtol = 2e-3 if kv_dtype == "float16" else 0.0  # float16: one rounding step apart where fp32 RoPE differs by 1e-7
    for layer, (k, _) in enumerate(kv_ort):  # the runtime-side scatter reproduces the in-place writes
        assert np.allclose(k.astype(np.float32), kv_torch[layer][0].float().numpy(), rtol=rtol, atol=1e-5)
    ran = profiled_op_types(session)
    assert ("PagedAttention" in ran) == fused and ("Attention" in ran) != fused
