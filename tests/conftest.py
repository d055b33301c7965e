"""Tiny models and a character tokenizer built from configs: every unit test runs offline in seconds."""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch

# The tests' own plain-transformers loads (the references prunekit is compared with) stay plain PyTorch:
# transformers >= 5.25 swaps in Hub kernels by default, and fails without the `kernels` package. prunekit's own
# loads pass use_kernels=False (test_cli.py::test_models_load_without_hub_kernels checks that without this).
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# prune --eval reuses an earlier run's dense perplexity from $PRUNEKIT_CACHE/eval: the tests score it every time
# (test_evalcache.py turns the cache on in a folder of its own), and leave the user's cache alone
os.environ["PRUNEKIT_EVAL_CACHE"] = "off"

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "LICENSE").read_text()  # ~11k characters of real English, one token per character


def char_tokenizer(bos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=128)
    configs = {
        "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
        "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }
    # layers that differ: sliding-window and full-attention masks (Gemma-2, Qwen2 from max_window_layers on), and
    # Gemma-3's local and global RoPE tables
    configs["gemma2"] = dict(configs["gemma"], model_type="gemma2", num_hidden_layers=4, sliding_window=8)
    configs["gemma3_text"] = dict(configs["gemma"], model_type="gemma3_text", num_hidden_layers=4, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    configs["mistral_swa"] = dict(configs["mistral"], sliding_window=40)  # (the KV tests stay within 40 tokens)
    configs["qwen2_swa"] = dict(configs["qwen2"], num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                max_window_layers=1)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    for name, extra in {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
                        "qwen2_moe": dict(moe, shared_expert_intermediate_size=32),
                        "qwen3_moe": dict(moe, head_dim=16),
                        "granite": dict(attention_multiplier=0.05, embedding_multiplier=2.0, residual_multiplier=0.5,
                                        logits_scaling=2.0),  # a scaling other than 1/sqrt(d)
                        "granitemoe": dict(attention_multiplier=0.05, num_local_experts=4, num_experts_per_tok=2),
                        "olmo2": dict(eos_token_id=None),  # q/k RMSNorm over all heads at once
                        "olmo": dict(eos_token_id=None, clip_qkv=0.2),  # q, k, v clamped (a bound that bites)
                        "olmoe": dict(moe, eos_token_id=None, clip_qkv=0.2),  # all-heads q/k norm, then the clamp
                        "starcoder2": dict(use_bias=True, eos_token_id=None),
                        "arcee": dict(eos_token_id=None),
                        "apertus": dict(eos_token_id=None, head_dim=16),  # per-head q/k norm, llama3 RoPE
                        "seed_oss": dict(eos_token_id=None, head_dim=16, attention_bias=True),
                        "helium": dict(head_dim=16)}.items():  # interleaved RoPE
        configs[name] = dict(configs["llama"], model_type=name, **extra)
    cfg = dict(configs[kind])
    config = AutoConfig.for_model(cfg.pop("model_type"), **common, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture
def tok():
    return char_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def model_dir(tmp_path, tok):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def ids_from_text(tok, n: int, seqlen: int, offset: int = 0) -> torch.Tensor:
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[offset + i * seqlen : offset + (i + 1) * seqlen] for i in range(n)])


def linear_task(tmp_path, n: int = 240, d: int = 6) -> None:
    """x.npy / y.npy (n examples) and xt.npy / yt.npy (120 held out) in `tmp_path`: 3 linearly separable classes of
    d features, for `data train`."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(d, 3))
    for name, m in (("", n), ("t", 120)):
        x = rng.normal(size=(m, d)).astype(np.float32)
        np.save(tmp_path / f"x{name}.npy", x)
        np.save(tmp_path / f"y{name}.npy", (x @ w).argmax(1))
