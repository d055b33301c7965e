"""On the real SmolLM2-135M with real Wikipedia text (marked: minutes, needs `make assets`)."""

import math

import pytest

import prunekit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return prunekit.load_model("smollm2-135m")


def test_wanda_and_sparsegpt_on_smollm2(smol):
    model, tok = smol
    dense = prunekit.perplexity(model, tok, "wiki", seqlen=256, tokens=4096, progress=False)
    assert 5 < dense.ppl < 40  # ~15 on these leads
    calib = prunekit.load_text("wiki", purpose="calibration")
    ids = prunekit.calibration_ids(tok, calib, samples=32, seqlen=256)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = prunekit.prune(model, method="wanda", ratio=0.5, calibration=ids, progress=False)
    assert len(result.layers) == 30 * 7 and result.total_sparsity == pytest.approx(0.5)
    wanda_ppl = prunekit.perplexity(model, tok, "wiki", seqlen=256, tokens=4096, progress=False).ppl
    assert dense.ppl < wanda_ppl < 4 * dense.ppl
    model.load_state_dict(state)
    magnitude = prunekit.prune(model, method="magnitude", ratio=0.5, calibration=None, progress=False)
    assert magnitude.total_sparsity == pytest.approx(0.5)
    magnitude_ppl = prunekit.perplexity(model, tok, "wiki", seqlen=256, tokens=4096, progress=False).ppl
    assert wanda_ppl < magnitude_ppl or not math.isfinite(magnitude_ppl)
    model.load_state_dict(state)
    prunekit.prune(model, method="sparsegpt", pattern="2:4", calibration=ids, progress=False)
    assert prunekit.check_pattern(model, "2:4") == []
    sgpt_ppl = prunekit.perplexity(model, tok, "wiki", seqlen=256, tokens=4096, progress=False).ppl
    assert dense.ppl < sgpt_ppl < 10 * dense.ppl
    model.load_state_dict(state)
