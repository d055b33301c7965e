"""Q-Tuning (`prunekit.data.methods.qtuning`), the SFT loop (`prunekit.data.sft`), the task builder and
`prunekit data qtune`: quadrants on planted points, exact budgets, scripted token scores, the loss mask, bad input."""

from __future__ import annotations

import csv
import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch

from prunekit import registry
from prunekit.cli import main
from prunekit.data import sft as S
from prunekit.data import sft_tasks
from prunekit.data.methods import qtuning as Q
from prunekit.errors import InputError

from conftest import char_tokenizer, tiny_model


def test_doctests():
    for mod in (Q, S, sft_tasks):
        assert doctest.testmod(mod).failed == 0


def test_registered():
    spec = registry.get("qtuning", "data")
    assert spec.fn is Q.qtuning_select and "2509.23873" in spec.url


# ------------------------------------------------------------------------------------------- quadrants
PLANTED = {  # (ppl, entropy) -> quadrant
    1: [(30.0, 4.0), (28.0, 3.9)],  # harmful noise: high error, high uncertainty
    2: [(25.0, 0.5), (27.0, 0.6)],  # misconception: high error, low uncertainty
    3: [(1.5, 0.4), (1.6, 0.5)],  # redundant: low error, low uncertainty
    4: [(1.4, 4.2), (1.7, 3.8)],  # calibration: low error, high uncertainty
}


def planted():
    pts = [(p, e, q) for q, v in PLANTED.items() for p, e in v]
    ppl, ent, quad = (np.array(x) for x in zip(*pts))
    return ppl, ent, quad


def test_quadrants_on_planted_points():
    ppl, ent, quad = planted()
    q = Q.quadrants(ppl, ent, sample_ratio=0.5)
    assert q.keep.tolist() == [quad_i in (2, 4) for quad_i in quad]
    assert q.misconception.tolist() == (quad == 2).tolist()
    assert q.quadrant.tolist() == quad.tolist()
    assert q.topped_up == 0
    assert q.placed_by.tolist() == ["thresholds" if quad_i in (2, 4) else "midlines" for quad_i in quad]


def test_quadrants_budget_exact_and_top_up():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50, 333):
        ppl, ent = np.exp(rng.normal(1, 1, n)), rng.random(n) * 3
        for r in (0.05, 0.125, 0.2, 0.25, 0.5, 0.9, 1.0):
            q = Q.quadrants(ppl, ent, sample_ratio=r)
            assert q.keep.sum() == max(1, round(n * r)), (n, r)
            assert not (q.misconception & ~q.keep).any()
    # error and uncertainty rise together: no sample is Q2 or Q4 at any quantile, so all come from the top-up,
    # the most extreme by max(p - e, e - p) on min-max-normalised values
    ppl = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    ent = np.array([0.0, 1.0, 2.5, 3.0, 4.0, 5.0])  # normalised: p = e except index 2 (p=.4, e=.5), 3 (p=.6, e=.6)
    q = Q.quadrants(ppl, ent, sample_ratio=1 / 6)
    assert q.topped_up == 1 and np.flatnonzero(q.keep).tolist() == [2] and not q.misconception[2]
    assert q.placed_by.tolist() == ["midlines"] * 2 + ["top-up"] + ["midlines"] * 3  # Q4 by its lean, not thresholds
    # p - e == e - p (index 0: p = e = 0) counts as a misconception, as the reference's s2 >= s4
    q = Q.quadrants(ppl, ent, sample_ratio=2 / 6)
    assert np.flatnonzero(q.keep).tolist() == [0, 2] and q.misconception[0] and not q.misconception[2]


def test_quadrants_follow_their_thresholds_strictly_on_tied_values():
    """Q2 is PPL > Q_{1-a} and Ent <= Q_a, Q4 PPL <= Q_a and Ent > Q_{1-a}: with tied values a threshold lands
    on samples, and which side they fall on is the rule's (no planted point sat on a threshold)."""
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(200):
        n = int(rng.integers(6, 16))
        ppl, ent = rng.integers(1, 5, n).astype(float), rng.integers(0, 4, n).astype(float)
        q = Q.quadrants(ppl, ent, sample_ratio=float(rng.choice([0.34, 0.5])))  # K >= 2: nothing to trim
        q2, q4 = (ppl > q.ppl_hi) & (ent <= q.ent_lo), (ppl <= q.ppl_lo) & (ent > q.ent_hi)
        if q.topped_up:
            continue
        checked += bool(np.isin(ppl, [q.ppl_hi, q.ppl_lo]).any() or np.isin(ent, [q.ent_lo, q.ent_hi]).any())
        assert q.misconception.tolist() == q2.tolist() and (q.keep & ~q.misconception).tolist() == q4.tolist()
    assert checked > 20


def test_samples_that_qualify_at_the_same_step_are_not_picked_by_rounding():
    """No alpha qualifies exactly K = 1 here: samples 1 and 2 enter together at alpha = 1/4. The tighter side
    (none) is topped up with the most extreme sample, 4; bisecting alpha down to 1e-16 had found a sliver where
    the two quantiles rounded apart and kept sample 2, the least extreme of all, and a change of units could
    flip that choice."""
    ppl = np.array([1.409, 2.758, 2.43, 2.728, 3.438])
    ent = np.array([0.318, 0.445, 0.939, 1.279, 0.537])
    q = Q.quadrants(ppl, ent, sample_ratio=0.2)
    assert np.flatnonzero(q.keep).tolist() == [4] and q.topped_up == 1
    rng = np.random.default_rng(1)
    for _ in range(150):  # the choice depends on the ranks only, not on the units of either axis
        n = int(rng.integers(4, 13))
        ppl, ent, r = np.exp(rng.normal(1, 0.5, n)), rng.random(n) * 2, float(rng.choice([0.125, 0.25, 0.5]))
        keep = Q.quadrants(ppl, ent, sample_ratio=r).keep
        for scale in (1.1, 3.0, 7.0):
            assert Q.quadrants(ppl * scale, ent * scale, sample_ratio=r).keep.tolist() == keep.tolist()


def test_quadrants_ties_trimmed_to_budget():
    ppl = np.array([9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 5.0, 5.0])
    ent = np.array([0.1, 0.1, 0.1, 4.0, 4.0, 4.0, 2.0, 2.0])
    for r in (0.25, 0.5, 0.75):
        assert Q.quadrants(ppl, ent, sample_ratio=r).keep.sum() == round(8 * r)


# ------------------------------------------------------------------------------------------ token scores
def test_token_scores_scripted():
    ppl = np.array([[99.0, 99.0, 2.0, 4.0, 8.0, 16.0, 99.0]])  # positions 2..5 are the response
    resp = np.array([[0, 0, 1, 1, 1, 1, 0]], bool)
    s = Q.token_scores(np.log(ppl), resp, lam=0.5)
    want = [0, 0, 0.5 * 2 + 0.25 * (0 + 4), 0.5 * 4 + 0.25 * (2 + 8), 0.5 * 8 + 0.25 * (4 + 16), 0.5 * 16 + 0.25 * (8 + 0), 0]
    np.testing.assert_allclose(s[0], want)
    np.testing.assert_allclose(Q.token_scores(np.log(ppl), resp, lam=0.0)[0], np.where(resp[0], ppl[0], 0))


def test_qtuning_select_tokens_only_from_misconceptions():
    ppl, ent, quad = planted()
    n, t = len(ppl), 10
    resp = np.zeros((n, t), bool)
    resp[:, 4:] = True  # 6 response tokens each
    nll = np.tile(np.log(ppl)[:, None], (1, t)) * resp
    nll[:, 6] += 3.0  # one very surprising token per sample
    ent_tok = np.tile(ent[:, None], (1, t)) * resp
    sel = Q.qtuning_select(nll, ent_tok, resp, sample_ratio=0.5, token_ratio=0.75)
    assert sel.samples == 4
    kept_resp = 4 * 6
    assert sel.tokens == kept_resp - round(0.25 * kept_resp)  # 6 dropped, all from the two misconception samples
    for i in range(n):
        if quad[i] == 4:
            assert sel.keep_tokens[i].tolist() == resp[i].tolist()  # calibration kept whole
        elif quad[i] == 2:
            assert not sel.keep_tokens[i, 6] and sel.keep_tokens[i].sum() == 3  # the surprising token goes first
        else:
            assert not sel.keep_tokens[i].any()
    # a token budget larger than the misconception samples' tokens drops all of them and no more
    sel = Q.qtuning_select(nll, ent_tok, resp, sample_ratio=0.5, token_ratio=0.1)
    assert sel.tokens == 2 * 6 and sel.info["token_drop_done"] == 12 < sel.info["token_drop_wanted"]


@pytest.mark.parametrize("pruner", [S.RandomPruner, S.PerplexityPruner, S.RandomTokensPruner])
def test_baseline_budgets_exact(pruner):
    rng = np.random.default_rng(1)
    n, t = 40, 12
    resp = np.zeros((n, t), bool)
    for i in range(n):
        resp[i, 3: 3 + rng.integers(2, 9)] = True
    nll, ent = rng.random((n, t)) * resp, rng.random((n, t)) * resp
    sel = pruner(sample_ratio=0.25, token_ratio=0.7, seed=0).select(nll=nll, entropy=ent, response=resp)
    assert not (sel.keep_tokens & ~resp).any() and not (sel.keep_tokens & ~sel.keep_samples[:, None]).any()
    if pruner is S.RandomTokensPruner:
        assert sel.samples == n and sel.tokens == resp.sum() - round((1 - 0.25 * 0.7) * resp.sum())
    else:
        assert sel.samples == 10
        kept = (resp & sel.keep_samples[:, None]).sum()
        assert sel.tokens == kept - round(0.3 * kept)
    if pruner is S.PerplexityPruner:
        ppl, _ = S.response_stats(nll, ent, resp)
        assert ppl[sel.keep_samples].min() >= ppl[~sel.keep_samples].max()


def test_a_perplexity_past_float64_blames_the_model_not_the_examples():
    nll, resp = np.full((3, 4), 2.0), np.ones((3, 4), bool)
    nll[1] = 800.0  # a mean loss of 800 nats: exp overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was a RuntimeWarning, then "ppl has 1 infinite values; fix those examples"
        with pytest.raises(InputError, match=r"response of sample 1 is 800 nats .*check the model"):
            S.response_stats(nll, nll, resp)
        with pytest.raises(InputError, match="check the model"):
            Q.qtuning_select(nll, nll, resp)


# --------------------------------------------------------------------------------------------- the loop
def records(n=12):
    return [{"instruction": f"add {i} and {i + 1}", "response": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(n)]


def test_tokenize_masks_prompt_and_truncates():
    tok = char_tokenizer()
    ex = S.tokenize(records(3), tok, max_length=64)
    e = ex[1]
    assert tok.decode(e.ids[e.prompt_len:-1]) .replace(" ", "") == "1+2=3"
    assert e.ids[-1] == tok.eos_token_id
    short = S.tokenize([{"instruction": "x" * 100, "response": "yz"}], tok, max_length=20)[0]
    assert len(short.ids) == 20 and short.response_len == 3  # the prompt lost its left end, the response is whole
    assert short.cut == "prompt"
    long = S.tokenize([{"instruction": "x" * 100, "response": "y" * 100}], tok, max_length=20)[0]
    assert len(long.ids) == 20 and long.prompt_len == 10 and long.cut == "both"  # it said "response" alone
    whole = S.tokenize([{"instruction": "x", "response": "y"}], tok, max_length=80)[0]
    cut = S.tokenize([{"instruction": "x", "response": "y" * 100}], tok, max_length=80)[0]
    assert cut.cut == "response" and whole.cut is None and 6 < whole.prompt_len < 40
    # a prompt under half of max_length stays whole (it lost all but its last max_length // 2 - len tokens)
    assert cut.ids[:cut.prompt_len] == whole.ids[:whole.prompt_len] and len(cut.ids) == 80


def test_padding_scores_zero_and_position_0_is_never_a_target():
    model = tiny_model("llama")
    ex = [S.Example(ids=[5, 6, 7, 8, 9, 10], prompt_len=2), S.Example(ids=[5, 6, 7], prompt_len=1)]
    nll, ent, _ = S.score_examples(model, ex, pad_id=0)
    assert nll.shape == (2, 6) and (nll[:, 0] == 0).all()  # per target token; nothing predicts token 0
    assert (nll[1, 3:] == 0).all() and (ent[1, 3:] == 0).all()  # the short example's padding
    assert (nll[1, 1:3] > 0).all() and (nll[0, 1:] > 0).all()
    report = S.sft(tiny_model("llama"), [S.Example(ids=[5, 6, 7, 8], prompt_len=0)], pad_id=0, lora_rank=None,
                   progress=False)
    assert report.tokens_trained == 3  # targets 1..3: nothing predicts position 0, even with no prompt


def test_token_stats_asks_for_no_kv_cache_only_of_a_forward_that_takes_it():
    """The scoring forward builds no KV cache (use_cache=False); a model whose forward has no such argument (a
    wrapper) is scored as before, with the same numbers."""
    from torch import nn

    model = tiny_model("llama").eval()
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    direct = S.token_stats(model, ids, attn)
    assert seen == [False]
    wrapped = S.token_stats(Wrapper(model), ids, attn)
    assert seen == [False, None] and all(torch.equal(a, b) for a, b in zip(direct, wrapped))


def test_loss_mask_is_exactly_the_kept_tokens():
    tok = char_tokenizer()
    model = tiny_model("llama")
    ex = S.tokenize(records(6), tok, max_length=64)
    pad_id = tok.eos_token_id
    nll, ent, resp = S.score_examples(model, ex, pad_id=pad_id)
    rng = np.random.default_rng(0)
    keep_samples = np.array([1, 0, 1, 1, 0, 1], bool)
    keep = resp & keep_samples[:, None] & (rng.random(resp.shape) < 0.6)
    sel = S.Selection(keep_samples, keep)
    want = nll[keep].mean()  # mean token NLL over exactly the kept positions, under the starting model
    wrong = nll[resp & keep_samples[:, None]].mean()
    rep = S.sft(model, ex, pad_id=pad_id, pruner=S.FixedSelection(sel), batch_size=8, lr=1e-3, lora_rank=4, progress=False)
    assert rep.steps == 1 and rep.tokens_trained == keep.sum() and rep.samples_trained == 4
    assert math.isclose(rep.losses[0], want, rel_tol=1e-4) and not math.isclose(want, wrong, rel_tol=1e-4)
    last = max(np.flatnonzero(keep[i]).max() for i in range(6) if keep[i].any()) + 1
    assert rep.tokens_forward == sum(min(len(ex[i].ids), last) for i in range(6) if keep_samples[i])


def test_sft_dynamic_per_batch_and_learning():
    tok = char_tokenizer()
    model = tiny_model("llama")
    ex = S.tokenize(records(16), tok, max_length=64)
    pad_id = tok.eos_token_id
    before = S.response_perplexity(model, ex, pad_id=pad_id)
    p = Q.QTuning(sample_ratio=0.5, token_ratio=0.7, every="batch")
    rep = S.sft(model, ex, pad_id=pad_id, pruner=p, batch_size=4, lr=1e-2, epochs=2, lora_rank=4, progress=False)
    assert rep.steps == 2 * 2 and rep.samples_trained == 2 * 8  # loads of 8, 4 kept each
    assert rep.tokens_scored == 2 * sum(len(e.ids) for e in ex)
    total_resp = sum(e.response_len for e in ex)
    assert rep.tokens_trained < 2 * 0.5 * total_resp
    rep2 = S.sft(model, ex, pad_id=pad_id, batch_size=4, lr=1e-2, epochs=2, progress=False)  # full data
    assert rep2.tokens_trained == 2 * sum(e.response_len for e in ex)
    assert S.response_perplexity(model, ex, pad_id=pad_id) < before
    out = S.generate(model, tok, ["add 1 and 2"], max_new_tokens=5)
    assert isinstance(out[0], str)


class OwnPruner:
    """A user's pruner as the module docstring describes it: `every`, `select` and nothing else."""

    def __init__(self, every="once", tokens=None, samples=None, **attrs):
        self.every, self.tokens, self.samples = every, tokens, samples
        self.__dict__.update(attrs)

    def select(self, *, nll, entropy, response):
        assert nll is None and entropy is None  # no needs_model attribute: not scored
        keep = np.ones(len(response), bool) if self.samples is None else self.samples(response)
        return S.Selection(keep, response & keep[:, None] if self.tokens is None else self.tokens(response))


def test_own_pruner_needs_only_every_and_select():
    tok = char_tokenizer()
    ex = S.tokenize(records(4), tok, max_length=64)
    halves = OwnPruner(samples=lambda r: np.arange(len(r)) % 2 == 0)
    rep = S.sft(tiny_model("llama"), ex, pad_id=tok.eos_token_id, pruner=halves, lora_rank=4, progress=False)
    assert rep.samples_trained == 2 and rep.tokens_trained == ex[0].response_len + ex[2].response_len
    per_batch = OwnPruner(every="batch", sample_ratio=0.5, samples=lambda r: np.arange(len(r)) < len(r) // 2)
    rep = S.sft(tiny_model("llama"), ex, pad_id=tok.eos_token_id, pruner=per_batch, batch_size=2, lora_rank=4,
                progress=False)
    assert rep.steps == 1 and rep.samples_trained == 2  # one load of round(2 / 0.5) = 4 rows, 2 kept


@pytest.mark.parametrize("pruner,msg", [
    (OwnPruner(tokens=lambda r: np.ones_like(r)), r"not response tokens.*sample 0, position 0, a prompt"),
    (OwnPruner(samples=lambda r: np.arange(len(r)) == 0, tokens=lambda r: r),
     r"sample 1, position \d+, a dropped sample"),
    (OwnPruner(tokens=lambda r: r[:, :-1]), r"keep_tokens \[4, \d+\]"),
    (OwnPruner(tokens=lambda r: r.astype(int)), "boolean"),
    (OwnPruner(samples=lambda r: np.ones(len(r) + 1, bool), tokens=lambda r: r), "keep_samples"),
    (OwnPruner(every="batch"), "needs a sample_ratio attribute"),
    (OwnPruner(every="batch", sample_ratio=0.0), "sample_ratio"),
])
def test_own_pruner_selection_is_checked_before_it_trains(pruner, msg):
    tok = char_tokenizer()
    ex = S.tokenize(records(4), tok, max_length=64)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=msg):
        S.sft(model, ex, pad_id=tok.eos_token_id, pruner=pruner, lora_rank=None, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no step was taken


def test_own_pruner_returning_something_else_is_named():
    tok = char_tokenizer()
    pruner = OwnPruner()
    pruner.select = lambda **_: {"keep": [True] * 4}
    with pytest.raises(InputError, match="pruner OwnPruner: select\\(\\) must return a Selection, got dict"):
        S.sft(tiny_model("llama"), S.tokenize(records(4), tok, max_length=64), pad_id=tok.eos_token_id,
              pruner=pruner, lora_rank=None, progress=False)


# ------------------------------------------------------------------------------------------ tasks
def test_add_noise_misaligns_a_fraction_of_responses():
    recs = [{"task": "arith", "instruction": f"q{i}", "response": f"r{i}", "answer": str(i)} for i in range(20)]
    before = [dict(r) for r in recs]
    noisy = sft_tasks.add_noise(recs, 0.25, seed=1)
    assert recs == before  # the input is not modified
    assert noisy == sft_tasks.add_noise(recs, 0.25, seed=1)  # deterministic
    flagged = [i for i, r in enumerate(noisy) if r.get("noisy")]
    assert len(flagged) == 5
    assert all(noisy[i]["response"] != recs[i]["response"] for i in flagged)  # each answers another instruction
    assert sorted(noisy[i]["response"] for i in flagged) == sorted(recs[i]["response"] for i in flagged)
    assert all(noisy[i] == recs[i] for i in range(20) if i not in flagged)
    assert sft_tasks.add_noise(recs, 0.0) == recs
    with pytest.raises(InputError, match="noise"):
        sft_tasks.add_noise(recs, 1.0)


def test_tasks_deterministic_and_checkable():
    docs = [{"title": f"T{i}", "text": f"The town of T{i} grew. A bridge was built in {1800 + i} by the river. It is old."}
            for i in range(40)]
    a = sft_tasks.build_tasks(train=20, test=10, seed=3, documents=docs)
    b = sft_tasks.build_tasks(train=20, test=10, seed=3, documents=docs)
    assert a == b
    train, test = a
    assert {r["title"] for r in train if r["task"] == "year"}.isdisjoint({r["title"] for r in test if r["task"] == "year"})
    for r in train + test:
        assert sft_tasks.exact_match(r["response"], r["answer"])
        if r["task"] == "year":
            assert r["answer"] in r["instruction"] and "____" in r["instruction"]
        else:  # every step of the worked answer is right
            for lhs, rhs in (s.split(" = ") for s in r["response"].split(". ")[:-1]):
                assert eval(lhs.replace("/", "//")) == int(rhs)
    assert sft_tasks.exact_match("It is 1,200 then. The answer is 1,200.", "1200")
    assert not sft_tasks.exact_match("The answer is 12.", "1200")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_refused():
    ppl, ent, _ = planted()
    for r in (0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(InputError, match="sample_ratio"):
            Q.quadrants(ppl, ent, sample_ratio=r)
    with pytest.raises(InputError, match="token_ratio"):
        Q.QTuning(token_ratio=0.0)
    with pytest.raises(InputError, match="NaN"):
        Q.quadrants(np.array([1.0, np.nan]), np.array([1.0, 2.0]), sample_ratio=0.5)
    with pytest.raises(InputError, match="empty"):
        Q.quadrants(np.array([]), np.array([]), sample_ratio=0.5)
    with pytest.raises(InputError, match="every"):
        S.RandomPruner(every="step")
    with pytest.raises(InputError, match="no examples"):
        S.tokenize([], char_tokenizer())
    with pytest.raises(InputError, match="response"):
        S.tokenize([{"instruction": "x"}], char_tokenizer())



@pytest.mark.parametrize("kw,msg", [
    (dict(weight_decay="a"), "weight_decay"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=True), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(lr=0.0), "lr"), (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"), (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
    (dict(lora_rank=0), "lora_rank"), (dict(lora_rank=2.5), "lora_rank"), (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(seed=-1), "seed"), (dict(pad_id=-1), "pad_id"), (dict(pad_id=10**6), "pad_id"), (dict(pad_id=True), "pad_id"),
])
def test_sft_refuses_bad_arguments_before_touching_the_model(kw, msg):
    tok = char_tokenizer()
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = S.tokenize(records(2), tok, max_length=64)
    with pytest.raises(InputError, match=msg):
        S.sft(model, ex, **{"pad_id": tok.eos_token_id, "progress": False, **kw})
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # no LoRA, no step


def test_scoring_and_generation_refuse_bad_input():
    tok = char_tokenizer()
    model = tiny_model("llama")
    ex = S.tokenize(records(2), tok, max_length=64)
    for examples, pad_id, msg in (([], 0, "no examples"), (ex, -1, "pad_id"), (ex, 10**6, "pad_id"),
                                  ([S.Example(ids=[1, 10**7], prompt_len=1)], 0, "outside the model's vocabulary"),
                                  ([S.Example(ids=[1, 2], prompt_len=5)], 0, "prompt_len")):
        with pytest.raises(InputError, match=msg):
            S.score_examples(model, examples, pad_id=pad_id)
        with pytest.raises(InputError, match=msg):
            S.response_perplexity(model, examples, pad_id=pad_id)
    with pytest.raises(InputError, match="no examples"):
        S.pad([], 0)
    for instructions, kw in (("hello", {}), ([1, 2], {}), (["hello"], {"batch_size": 0})):
        with pytest.raises(InputError, match="list of strings" if kw == {} else "batch_size"):
            S.generate(model, tok, instructions, max_new_tokens=2, **kw)


def test_ratios_take_numpy_scalars_but_not_bools():
    assert S.check_ratio(np.float32(0.5), "sample_ratio") == 0.5 and S.check_ratio(np.int64(1), "x") == 1.0
    for bad in (True, np.bool_(True), "0.5", float("nan")):
        with pytest.raises(InputError, match="sample_ratio"):
            S.check_ratio(bad, "sample_ratio")



DOCS = [{"title": "X", "text": "X was founded in 1901 by Y. It grew."}]
PAIRS = [{"instruction": q, "response": r} for q, r in (("a", "1"), ("b", "2"), ("c", "3"))]


@pytest.mark.parametrize("call,match", [
    (lambda: Q.token_scores(np.zeros((1, 3)), np.ones((1, 3), bool), lam=True), "lam"),
    (lambda: Q.QTuning(lam=True), "lam"), (lambda: Q.QTuning(lam=float("nan")), "lam"),
    (lambda: Q.QTuning(seed="a"), "seed"), (lambda: Q.QTuning(seed=1.5), "seed"),
    (lambda: S.RandomPruner(sample_ratio=0.5, seed=-1), "seed"),
    (lambda: sft_tasks.arithmetic_problems(-1, seed=0), "n must be"),
    (lambda: sft_tasks.arithmetic_problems(2.5, seed=0), "n must be"),
    (lambda: sft_tasks.arithmetic_problems(True, seed=0), "n must be"),
    (lambda: sft_tasks.year_questions(DOCS, window=0), "window"),
    (lambda: sft_tasks.year_questions([{"text": "X was founded in 1901 by Y."}]), "'title' and 'text'"),
    (lambda: sft_tasks.build_tasks(train=2, test=1, documents=[{"title": "X"}]), "'title' and 'text'"),
    (lambda: sft_tasks.build_tasks(train=2, test=1, documents="abc"), "documents must be a list"),
    (lambda: sft_tasks.build_tasks(train=2, test=1, arith_share=True, documents=DOCS), "arith_share"),
    (lambda: sft_tasks.build_tasks(train=2, test=1, arith_share="0.5", documents=DOCS), "arith_share"),
    (lambda: sft_tasks.build_tasks(train=2, test=1, seed=None, documents=DOCS), "seed"),
    (lambda: sft_tasks.build_tasks(train=2, test=1, seed="x", documents=DOCS), "seed"),
    (lambda: sft_tasks.add_noise([{"instruction": "a"}, {"instruction": "b"}], 0.99), "'response'"),
    (lambda: sft_tasks.add_noise("abc", 0.9), "records must be a list"),
    (lambda: sft_tasks.add_noise(PAIRS, 0.9, seed="x"), "seed"),
])
def test_task_and_pruner_options_refused(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_task_and_pruner_options_take_numpy_scalars():
    assert Q.QTuning(lam=np.float32(0.5), seed=np.int64(3)).lam == 0.5
    assert Q.token_scores(np.zeros((1, 3)), np.ones((1, 3), bool), lam=np.float64(0.5)).tolist() == [[0.75, 1, 0.75]]
    assert sft_tasks.add_noise(PAIRS, np.float32(0.9), seed=0) == sft_tasks.add_noise(PAIRS, 0.9, seed=0)
    a = sft_tasks.build_tasks(train=2, test=1, arith_share=np.float32(0.5), seed=np.int64(1), documents=DOCS)
    assert a == sft_tasks.build_tasks(train=2, test=1, arith_share=0.5, seed=1, documents=DOCS)
    assert len(sft_tasks.arithmetic_problems(np.int64(2), seed=0)) == 2


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(10)))
    return path


def test_cli_qtune(tmp_path, model_dir, sft_file, capsys):
    out = tmp_path / "out"
    (model_dir / "LICENSE").write_text("Apache License 2.0\n")  # goes with the fine-tuned model
    assert main(["data", "qtune", str(model_dir), "--data", str(sft_file), "--samples", "0.5", "--tokens", "0.7",
                 "--out", str(out), "--train", "--mode", "batch", "--lr", "1e-3", "--quiet"]) == 0
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 5 and {k["quadrant"] for k in kept} <= {"misconception", "calibration"}
    total = sum(len(k["token_keep"]) for k in kept)
    assert sum(map(sum, (k["token_keep"] for k in kept))) == total - round(0.3 * total) or any(
        k["quadrant"] == "calibration" for k in kept)
    for k in kept:
        assert len(k["token_keep"]) == len(k["response_tokens"])
        if k["quadrant"] == "calibration":
            assert all(k["token_keep"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept_samples"] == 5 and summary["training"]["mode"] == "batch"
    assert summary["training"]["saved_dtype"] == "float32"  # as the input stores its weights
    # what a rerun needs (the seed changes the trained model): none of it was recorded
    import hashlib

    assert summary["data_sha256"] == hashlib.sha256(sft_file.read_bytes()).hexdigest()
    assert summary["seed"] == 0 and summary["batch_size"] > 0 and summary["training"]["lr"] == 1e-3
    assert summary["torch_threads"] >= 1 and "transformers" in summary["versions"]
    assert (out / "eu_plane.png").stat().st_size > 1000 and (out / "model" / "config.json").is_file()
    assert (out / "model" / "LICENSE").read_text() == "Apache License 2.0\n"
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert len(rows) == 10  # the quadrant's code and the name kept.jsonl and summary.json use
    assert all(Q.NAMES[int(r["quadrant"])] == r["quadrant_name"] for r in rows)
    assert {r["quadrant_name"] for r in rows if r["kept"] == "1"} <= {"misconception", "calibration"}
    # how each got its quadrant (a topped-up sample's label contradicted the thresholds beside it, unsaid)
    th = summary["thresholds"]
    for r in rows:
        p, e, quad = float(r["ppl"]), float(r["entropy"]), int(r["quadrant"])
        if r["placed_by"] == "thresholds":
            assert (p > th["ppl_hi"] and e <= th["ent_lo"]) if quad == 2 else (p <= th["ppl_lo"] and e > th["ent_hi"])
        elif r["placed_by"] == "midlines":
            side = (1 if e > th["ent_mid"] else 2) if p > th["ppl_mid"] else (4 if e > th["ent_mid"] else 3)
            assert r["kept"] == "0" and quad == side
        else:
            assert r["placed_by"] == "top-up" and r["kept"] == "1"
    assert sum(r["placed_by"] == "top-up" for r in rows) == th["topped_up"]
    assert "note" not in capsys.readouterr().err
    # training options without --train were taken silently
    assert main(["data", "qtune", str(model_dir), "--data", str(sft_file), "--out", str(tmp_path / "o2"), "--mode",
                 "batch", "--lr", "5", "--seed", "9", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "--mode, --lr, --seed are used with --train only; ignored" in captured.err
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["seed"] is None  # it recorded 9
    kept = [json.loads(line) for line in (tmp_path / "o2" / "kept.jsonl").read_text().splitlines()]
    by = {q: sum(k["quadrant"] == q for k in kept) for q in ("misconception", "calibration")}
    said = ", ".join(f"{n} {q}" for q, n in by.items() if n)  # the group sizes were printed as the kept counts
    assert f"kept {len(kept)} of 10 samples ({said})" in captured.out
    assert not (tmp_path / "o2" / "model").exists()
    # an fp16 model: trained in float32, saved in float16 (it was saved as float32, twice the size)
    from transformers import AutoModelForCausalLM

    half = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.float16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            (half / name).write_bytes((model_dir / name).read_bytes())
    assert main(["data", "qtune", str(half), "--data", str(sft_file), "--samples", "0.5", "--tokens", "0.7",
                 "--out", str(tmp_path / "o3"), "--train", "--quiet"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "o3" / "model")
    assert {p.dtype for p in trained.parameters()} == {torch.float16}


def test_cli_qtune_says_what_a_half_precision_save_loses_of_the_update_and_records_the_model(tmp_path, model_dir,
                                                                                               sft_file, capsys):
    """A bfloat16 model's fine-tuned weights were the float32 result rounded to bfloat16, which dropped most of a
    small update without a word, and OUT/model had no prunekit.json (a command run on it recorded no history)."""
    from transformers import AutoModelForCausalLM

    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            (half / name).write_bytes((model_dir / name).read_bytes())
    args = ["data", "qtune", str(half), "--data", str(sft_file), "--samples", "0.5", "--train", "--lr", "1e-4",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert "--dtype float32 saves them as trained" not in capsys.readouterr().err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "auto" / "model").dtype == torch.bfloat16
    lost = _saved_off_trained(half, tmp_path / "auto" / "model", tmp_path / "f32" / "model")
    assert lost > 0.1
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("auto", "f32")]
    assert summaries[0]["training"]["saved_update_error"] == pytest.approx(lost, abs=1e-3)
    assert summaries[1]["training"]["saved_update_error"] is None
    assert summaries[1]["training"]["saved_dtype"] == "float32"
    assert f"saved in bfloat16, as the input, the fine-tuned weights are off their trained values by {lost:.0%}" in err
    assert "--dtype float32 saves them as trained" in err
    record = json.loads((tmp_path / "auto" / "model" / "prunekit.json").read_text())
    assert record["method"] == "qtune" and record["input"]["folder"] == str(half.resolve())
    assert record["training"]["lr"] == 1e-4 and record["saved_dtype"] == "bfloat16"
    # the next command records where its input came from
    assert main(["prune", str(tmp_path / "auto" / "model"), "--method", "magnitude", "--ratio", "0.5",
                 "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "pruned" / "prunekit.json").read_text())
    assert meta["input"]["prunekit"]["method"] == "qtune"
    # --dtype without --train is said to be ignored; a float16 save of weights it cannot hold fails before the work
    assert main(["data", "qtune", str(half), "--data", str(sft_file), "--out", str(tmp_path / "o4"), "--dtype",
                 "float16", "--quiet"]) == 0
    assert "--dtype is used with --train only" in capsys.readouterr().err
    # full fine-tuning (a copy of each weight to compare with), also of a folder keeping its norms and embeddings
    # in float32 (their copies were the live weights: their updates went uncounted), and a float32 input saved in
    # bfloat16: the figure is how far the saved weights are from the trained ones
    import shutil

    from safetensors.torch import load_file, save_file

    mixed = tmp_path / "mixed"
    shutil.copytree(half, mixed)
    state = load_file(mixed / "model.safetensors")
    save_file({k: v.float() if "norm" in k or "embed" in k else v for k, v in state.items()},
              mixed / "model.safetensors", metadata={"format": "pt"})
    for name, folder, train, save in (("full", half, ["--lora-rank", "0"], []),
                                      ("mixed_full", mixed, ["--lora-rank", "0"], []),
                                      ("f32in", model_dir, [], ["--dtype", "bfloat16"])):
        common = ["data", "qtune", str(folder), "--data", str(sft_file), "--samples", "0.5", "--train", "--lr",
                  "1e-4", "--quiet", *train]
        assert main([*common, "--out", str(tmp_path / name), *save]) == 0
        assert main([*common, "--out", str(tmp_path / f"{name}32"), "--dtype", "float32"]) == 0
        capsys.readouterr()
        lost = _saved_off_trained(folder, tmp_path / name / "model", tmp_path / f"{name}32" / "model")
        said = json.loads((tmp_path / name / "summary.json").read_text())["training"]["saved_update_error"]
        assert said == pytest.approx(lost, abs=1e-3), name
        assert 0 < said < 1.0


def _saved_off_trained(original, saved, trained) -> float:
    """|saved - trained| / |trained - original| over the tensors that changed, from three saved models."""
    from transformers import AutoModelForCausalLM

    base, rounded, exact = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict()
                            for p in (original, saved, trained))
    changed = [k for k in base if not torch.equal(exact[k], base[k])]
    num = sum(float((rounded[k] - exact[k]).double().square().sum()) for k in changed)
    den = sum(float((exact[k] - base[k]).double().square().sum()) for k in changed)
    return (num / den) ** 0.5


def test_alpaca_dolly_and_completion_fields_are_read_not_dropped(tmp_path):
    """Alpaca's input and Dolly's context were silently ignored: pairs were scored (and trained) without them."""
    tok = char_tokenizer()
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    dolly = {"instruction": "Add the numbers.", "context": "2 and 3", "response": "5"}
    ours = {"instruction": "Add the numbers.\n\n2 and 3", "response": "5"}
    plain = {"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"}
    chat = {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                         {"role": "assistant", "content": "5"}]}
    ids = [e.ids for e in S.tokenize([alpaca, dolly, ours, plain, chat], tok)]
    assert ids[0] == ids[1] == ids[2] == ids[3] == ids[4]
    assert S.tokenize([{"instruction": "Add the numbers.", "input": "", "output": "5"}], tok)[0].ids != ids[0]
    for bad, match in (({"instruction": "a", "response": "1", "output": "2"}, "'response' and 'output' both"),
                       ({"instruction": "a", "input": "x", "context": "y", "response": "1"}, "'input' and 'context'"),
                       ({"instruction": "a", "input": 5, "response": "1"},
                        r"'input' .* must be a non-blank string, or \"\" / null for none"),
                       ({"question": "a", "response": "1"}, "no instruction field"),
                       ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "1"}]}, "one user turn then one assistant"),
                       ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
                        "assistant turn's 'content' must be a non-empty string"),
                       ({"messages": [], "response": "1"}, "either 'messages' or 'response'")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=match):
            S.read_sft(path)


def test_cli_qtune_says_when_the_misconceptions_hold_fewer_tokens_than_the_budget_drops(tmp_path, model_dir,
                                                                                         sft_file, capsys):
    """--tokens 0.7 can end above 70%: only misconception samples lose tokens; the run said nothing of it."""
    out = tmp_path / "out"
    assert main(["data", "qtune", str(model_dir), "--data", str(sft_file), "--samples", "1", "--tokens", "0.01",
                 "--out", str(out), "--quiet"]) == 0
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    calibration = [k for k in kept if k["quadrant"] == "calibration"]
    assert calibration and len(calibration) < len(kept)  # the case the note is about: some tokens cannot go
    total = sum(len(k["token_keep"]) for k in kept)
    left = sum(len(k["token_keep"]) for k in calibration)
    assert sum(sum(k["token_keep"]) for k in kept) == left
    drop = round(0.99 * total)
    err = capsys.readouterr().err
    assert (f"--tokens 0.01 asked to drop {drop} of the kept samples' {total} response tokens, but Q-Tuning drops "
            f"only the misconception samples' tokens and those held {total - left}, all dropped: "
            f"{left / total:.0%} of the tokens are kept") in err
    # the misconceptions, counted as kept, train on nothing: that was said nowhere
    emptied = len(kept) - len(calibration)
    assert f"{emptied} of the {len(kept)} kept samples lost every response token to --tokens" in err
    assert json.loads((out / "summary.json").read_text())["kept_samples_without_tokens"] == emptied
    # a budget the misconceptions can meet: no note
    assert main(["data", "qtune", str(model_dir), "--data", str(sft_file), "--samples", "1", "--tokens", "0.99",
                 "--out", str(tmp_path / "o2"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "asked to drop" not in err and "lost every response token" not in err
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["kept_samples_without_tokens"] == 0
    # from a new user's walk-through: 1 of 1 pairs kept at --samples 0.25, said nowhere
    one = tmp_path / "one.jsonl"
    one.write_text(sft_file.read_text().splitlines()[0] + "\n")
    assert main(["data", "qtune", str(model_dir), "--data", str(one), "--samples", "0.25", "--out",
                 str(tmp_path / "o3"), "--quiet"]) == 0
    assert "--samples 0.25 of 1 samples rounds to none; kept one" in capsys.readouterr().err


def test_cli_qtune_says_what_it_cut_and_keeps_user_fields(tmp_path, model_dir, capsys):
    data = tmp_path / "long.jsonl"
    rows = records(6)
    rows[0] = dict(rows[0], response="w" * 300)  # far past --max-length 64
    rows[2] = dict(rows[2], response="one\u2028two\x85three\u2029")  # line breaks to str.splitlines()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["data", "qtune", str(model_dir), "--data", str(data), "--samples", "1", "--max-length", "64",
                 "--out", str(out), "--quiet"]) == 0
    # the note said the response was "longer than --max-length allows"; one that fits alone is cut too when the prompt
    # keeps its half
    assert ("1 of 6 responses were cut (their end token too) to fit --max-length 64, of which a prompt keeps at "
            "least half") in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cut_responses"] == 1 and summary["max_length"] == 64
    # which rows were cut: only the totals said so, and a cut row's token_keep is shorter than its response
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(kept) == 6 and kept[2]["response"] == rows[2]["response"]  # one object per line for splitlines
    assert summary["cut_prompts"] == 1  # the prompt gave way down to its share too
    assert [r["cut_to_max_length"] for r in kept] == ["both"] + [None] * 5
    with open(out / "scores.csv", newline="") as f:
        assert [r["cut_to_max_length"] for r in csv.DictReader(f)] == ["both"] + [""] * 5
    # a user field qtune would overwrite in kept.jsonl ('ppl' was replaced by its own, silently)
    rows[1] = dict(rows[1], ppl="from the source")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "qtune", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o2")]) == 2
    assert f"{data}:2: example 1 (from 0) has the field 'ppl', which qtune writes" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # qtune's own kept.jsonl as the next run's data (it was refused: "rename it"), also one written before
    # cut_to_max_length was (its rows lack it)
    lines = (out / "kept.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [json.loads(line) for line in lines]
    old = json.loads(lines[3])
    del old["cut_to_max_length"]
    (out / "kept.jsonl").write_text("\n".join(lines[:3] + [json.dumps(old)] + lines[4:]) + "\n", encoding="utf-8")
    assert main(["data", "qtune", str(model_dir), "--data", str(out / "kept.jsonl"), "--samples", "1",
                 "--max-length", "64", "--out", str(tmp_path / "o3"), "--quiet"]) == 0
    assert f"{len(kept)} example(s) of {out / 'kept.jsonl'} come from an earlier qtune" in capsys.readouterr().err
    again = [json.loads(line) for line in (tmp_path / "o3" / "kept.jsonl").read_text().splitlines()]
    assert [r["index"] for r in again] == list(range(len(kept)))  # this run's indices, not the first run's
    assert [r["instruction"] for r in again] == [r["instruction"] for r in kept]


@pytest.mark.parametrize("bad", [["--samples", "1.5"], ["--tokens", "0"], ["--samples", "nan"], ["--epochs", "0"],
                                 ["--max-length", "1"],
                                 ["--data-fields"], ["--empty"], ["--surrogate"], ["--huge-int"]])
def test_cli_qtune_bad_input(tmp_path, model_dir, sft_file, bad, capsys):
    out = tmp_path / "out"
    data = sft_file
    if bad == ["--data-fields"]:
        data = tmp_path / "bad.jsonl"
        data.write_text('{"instruction": "x", "answer": "y"}\n')
        bad = []
    elif bad == ["--empty"]:
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
        bad = []
    elif bad == ["--surrogate"]:  # half an emoji: a traceback from the tokenizer, exit 1
        data = tmp_path / "half.jsonl"
        data.write_text('{"instruction": "x \\ud83d\\ude00", "response": "y"}\n'
                        '{"instruction": "x", "response": "y \\ud800"}\n')
        bad = []
    elif bad == ["--huge-int"]:  # past Python's 4300-digit limit: a ValueError traceback
        data = tmp_path / "big.jsonl"
        data.write_text('{"instruction": "x", "response": "y", "n": ' + "9" * 5000 + "}\n")
        bad = []
    assert main(["data", "qtune", str(model_dir), "--data", str(data), "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1
    assert "half.jsonl:2: holds a lone UTF-16 surrogate escape (\\ud800)" in err or data.name != "half.jsonl"
    assert "--max-length" in err or "--max-length" not in bad  # it named the API's max_length
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.integration
def test_cli_qtune_on_smollm2(tmp_path):
    """`prunekit data qtune` end to end on the real model and the offline task set: a 25% selection with 70% of
    its response tokens, LoRA-trained on them, saved; the input file is left as it was."""
    import hashlib

    from prunekit.weights.io import load_model

    data = tmp_path / "sft.jsonl"
    train, _ = sft_tasks.build_tasks(train=24, test=4, seed=0)
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "response": r["response"]}) + "\n"
                            for r in train))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert main(["data", "qtune", "smollm2-135m", "--data", str(data), "--samples", "0.25", "--tokens", "0.7",
                 "--train", "--out", str(out), "--quiet"]) == 0
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 6
    masked = [k for k in kept if k["quadrant"] == "misconception"]
    for k in kept:
        assert len(k["token_keep"]) == len(k["response_tokens"]) > 0
        if k["quadrant"] == "calibration":
            assert all(k["token_keep"])
    # 30% of the kept response tokens leave the loss, taken from misconception samples only (all of theirs at most)
    total = sum(len(k["token_keep"]) for k in kept)
    dropped = total - sum(sum(k["token_keep"]) for k in kept)
    assert dropped == min(round(0.3 * total), sum(len(k["token_keep"]) for k in masked)) > 0
    scores = (out / "scores.csv").read_text().splitlines()
    assert len(scores) == 25
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept_samples"] == 6 and summary["training"]["mode"] == "static"
    model, _ = load_model(out / "model")
    dense, _ = load_model("smollm2-135m")
    moved = [n for n, p in model.state_dict().items() if not torch.equal(p, dense.state_dict()[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["static", "batch"])
def test_cli_qtune_training_that_diverges_says_lower_the_learning_rate(tmp_path, model_dir, capsys, mode):
    """The batch mode's re-scoring said "nll has N NaN values; fix or drop those examples" (the data was fine)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(8)))
    out = tmp_path / "out"
    assert main(["data", "qtune", str(model_dir), "--data", str(data), "--samples", "0.5", "--train", "--lr", "1e30",
                 "--epochs", "2", "--mode", mode, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fine-tuning diverged" in err and "lower the learning rate (--lr)" in err and not out.exists()


def test_cli_qtune_records_the_sha256_of_a_data_path_given_with_a_tilde(tmp_path, model_dir, monkeypatch):
    """`--data=~/sft.jsonl` (the shell leaves ~ after '=') was read, then failed at the summary's hash: work lost."""
    import hashlib

    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(6)))
    out = tmp_path / "out"
    assert main(["data", "qtune", str(model_dir), "--data=~/sft.jsonl", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_sft_overflow_before_any_step_is_not_blamed_on_the_learning_rate():
    from prunekit.errors import InputError

    tok = char_tokenizer()
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(1e38)  # finite weights, infinite logits
    ex = S.tokenize(records(4), tok, max_length=64)
    with pytest.raises(InputError, match="before any optimizer step: the model's activations overflow"):
        S.sft(model, ex, pad_id=tok.eos_token_id, batch_size=2, lora_rank=None, progress=False)


@pytest.mark.parametrize("lora_rank", [4, None])
def test_sft_trains_a_float16_model_on_float32_copies(lora_rank):
    # AdamW in float16: its second moment and eps round to 0, every step was inf and the error said to lower the
    # learning rate, which no learning rate fixed
    tok = char_tokenizer()
    ex = S.tokenize(records(8), tok, max_length=64)
    pad_id = tok.eos_token_id
    model = tiny_model("llama").half()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = S.response_perplexity(model.float(), ex, pad_id=pad_id)
    model.half()
    S.sft(model, ex, pad_id=pad_id, batch_size=4, lr=1e-2, epochs=2, lora_rank=lora_rank, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # new LoRA adapters too
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    now = {n.replace(".base.", "."): p for n, p in model.named_parameters()}  # LoRA wraps each Linear as `base`
    trained = [n for n, p in now.items() if n not in before or not torch.equal(p, before[n])]
    assert trained and (lora_rank is None or all("lora_" in n for n in trained))
    assert S.response_perplexity(model.float(), ex, pad_id=pad_id) < ref
