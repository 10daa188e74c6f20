"""The real SmolLM2-135M-Instruct proxy on real Alpaca rows: the engine matches the loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gradfilter import per_example_grad_norms
from gradfilter.io.data import encode_pair, format_prompt, pad_batch
from gradfilter.norms.oracles import loop_per_example_grad_norms

DATA = Path(
    os.environ.get(
        "GRADFILTER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)


def alpaca_rows(n: int) -> list[dict]:
    path = DATA / "alpaca_9k.json"
    if not path.exists():
        pytest.skip(f"real Alpaca sample not found at {path} (set GRADFILTER_SHARED_DATA)")
    rows = json.loads(path.read_text("utf-8"))
    return [rows[i] for i in (0, 1, 2, 5, 7)][:n]


@pytest.fixture(scope="module")
def smollm2():
    try:
        from gradfilter.io.models import load_proxy, smollm2_gguf_path

        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from peft import LoraConfig, get_peft_model

    model, tok = load_proxy()
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), tok


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_smollm2_alpaca_matches_loop(smollm2, side):
    model, tok = smollm2
    rows = alpaca_rows(5)
    enc = [encode_pair(tok, format_prompt(r), r["output"], 96) for r in rows]
    ids, labels, mask = pad_batch(enc, tok.pad_token_id, side=side)
    assert mask.sum(-1).min() < mask.shape[1]  # the batch really is ragged
    got = per_example_grad_norms(model, ids, labels, mask)
    want = loop_per_example_grad_norms(model, ids, labels, mask)
    assert torch.isfinite(got).all() and (got > 0).all()
    rel = ((got.double() - want.double()).abs() / want.double()).max().item()
    assert rel <= 1e-4, (rel, got, want)


@pytest.mark.slow
def test_smollm2_pipeline_end_to_end(smollm2, tmp_path):
    """The whole pipeline on the real proxy and real Alpaca rows (small settings)."""
    from gradfilter.io.models import load_proxy
    from gradfilter.run.score import ScoreConfig, score, select

    rows = alpaca_rows(5)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows + [{"instruction": "no output"}]), encoding="utf-8")
    res = score(
        str(data),
        str(tmp_path / "out"),
        ScoreConfig(members=2, epochs=2, batch_size=2, max_length=96, lr=1e-3),
        progress=False,
        model_and_tokenizer=load_proxy(),
    )
    assert [r["status"] for r in res.records] == ["ok"] * 5 + ["missing field 'output'"]
    ok = res.records[:5]
    assert all(r["gsnr"] is not None and len(r["late_sq"]) == 2 for r in ok)
    assert all(v > 0 for r in ok for v in r["early_sq"] + r["late_sq"])
    assert sorted(r["rank"] for r in ok) == [1, 2, 3, 4, 5]
    path, chosen = select(str(tmp_path / "out"), top_k=2)
    assert json.loads(open(path, encoding="utf-8").read()) == [rows[i] for i in chosen]
