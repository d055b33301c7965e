import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.errors import InputError
from prunekit.lora import LoRALinear, add_lora, lora_parameters, merge_lora, remove_lora


def _tiny_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_starts_equal_trains_only_adapters_and_merges_exactly():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    before = model(ids).logits
    names = add_lora(model, rank=4, alpha=8, seed=0)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    torch.testing.assert_close(model(ids).logits, before)  # B = 0 at init
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapted = model(ids).logits.detach()
    assert not torch.allclose(adapted, before, atol=1e-4)
    state = torch.random.get_rng_state()
    merge_lora(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the merged Linears drew an unused default init
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_remove_restores_the_original_weights_and_seed_fixes_init():
    model = _tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    add_lora(model, rank=2, targets=("*mlp.*",), seed=3)
    a1 = model.model.layers[0].mlp.down_proj.lora_a.detach().clone()
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(1.0)
    remove_lora(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, w)
    other = _tiny_llama()
    add_lora(other, rank=2, targets=("*mlp.*",), seed=3)
    torch.testing.assert_close(other.model.layers[0].mlp.down_proj.lora_a, a1)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"targets": ("nothing*",)}, "matching targets"), ({"rank": 40}, "smaller rank"),
])
def test_bad_requests(kwargs, match):
    with pytest.raises(InputError, match=match):
        add_lora(_tiny_llama(), **kwargs)


def test_a_linear_narrower_than_the_rank_gets_its_smaller_side_and_nothing_changes_on_a_refusal():
    # a 1-output gate (Qwen2-MoE's shared_expert_gate) refused the whole recovery: "give a smaller rank"
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    add_lora(net, rank=8)
    assert net[0].rank == 8 and net[2].rank == 1
    merge_lora(net)
    named = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(InputError, match="smaller side of 2"):
        add_lora(named, rank=8, targets=("0", "2"))
    assert not any(isinstance(m, LoRALinear) for m in named.modules())  # the first Linear was wrapped already
    assert all(p.requires_grad for p in named.parameters())
    with pytest.raises(InputError, match="not GPT-2's Conv1D"):
        add_lora(nn.Sequential(nn.ReLU()), rank=2)


def test_refuses_double_adapters():
    model = _tiny_llama()
    add_lora(model, rank=2)
    with pytest.raises(InputError, match="already"):
        add_lora(model, rank=2)


def test_doctest():
    import doctest

    from prunekit import lora

    result = doctest.testmod(lora)
    assert result.attempted > 0 and result.failed == 0


def test_merging_into_a_weight_another_module_shares_leaves_that_module_alone():
    """In-place merging into a tied lm_head also moved the embedding that shares its weight (logits off by 15.9)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    add_lora(model, rank=4, exclude=(), seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.05)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(x).logits
        merge_lora(model)
        merged = model(x).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    linear = model.model.layers[0].mlp.down_proj  # not shared: merged in place, the caller's module
    assert type(linear) is nn.Linear


def test_the_update_is_scaled_by_alpha_over_rank_and_merging_gives_the_original_linear_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    original, w = net[0], net[0].weight.detach().clone()
    add_lora(net, rank=4, alpha=16.0)
    adapter = net[0]
    with torch.no_grad():
        adapter.lora_b.fill_(0.5)
    delta = 4.0 * adapter.lora_b.detach() @ adapter.lora_a.detach()  # alpha / rank = 4
    x = torch.randn(3, 6)
    torch.testing.assert_close(net(x), x @ (w + delta).T + original.bias.detach())
    merge_lora(net)
    assert net[0] is original  # its hooks and references stay valid
    torch.testing.assert_close(original.weight.detach(), w + delta)
