"""What the Python API leaves in the caller's world when a call stops on the way (an error or Ctrl-C): the model's
train/eval mode comes back as the caller had it."""

from __future__ import annotations

import pytest
import torch

from prunekit import depth
from prunekit.data import sft as S
from prunekit.evaluate import perplexity_of_ids

from conftest import char_tokenizer, tiny_model


def _ids(n=4, seqlen=16):
    return torch.randint(3, 60, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _perplexity(model):
    perplexity_of_ids(model, _ids(), batch_size=2, progress=False)


def _sensitivity(model):
    depth.sensitivity(depth.causal_lm_target(model, _ids(), batch_size=2), kept=1)


def _score_examples(model):
    tok = char_tokenizer()
    examples = S.tokenize([{"instruction": f"{i}+1=", "response": str(i + 1)} for i in range(4)], tok, max_length=32)
    S.score_examples(model, examples, pad_id=tok.eos_token_id, batch_size=2)


@pytest.mark.parametrize("call", [_perplexity, _sensitivity, _score_examples])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_call_stopped_on_the_way_gives_the_model_back_in_the_callers_mode(call, stop):
    """These set eval mode and put the caller's mode back only when they returned (a model in train mode came
    back in eval mode after Ctrl-C or an error)."""
    model = tiny_model("llama").train()
    calls = []

    def hook(_module, _args):
        calls.append(1)
        if len(calls) == 2:
            raise stop("stopped")

    handle = model.model.layers[0].register_forward_pre_hook(hook)
    with pytest.raises(stop):
        call(model)
    handle.remove()
    assert len(calls) == 2 and model.training and all(m.training for m in model.modules())
    call(model)  # and a call that finishes restores it too
    assert model.training
