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


_BACKEND = """
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # stands for the caller's own backend (an interactive or a notebook one)
import numpy as np
from prunekit import report
from prunekit.data.methods.qtuning import plot_eu_plane, qtuning_select

out = Path(sys.argv[1])
report.plot_blocks(out / "blocks.png", 4, [0, 2], "blocks", scores=[0.1, 0.2, 0.3, 0.4], score_name="score")
report.plot_widths(out / "widths.png", [(4, 128), (2, 64)], (4, 128), "widths")
rng = np.random.default_rng(0)
response = np.zeros((20, 8), bool)
response[:, 3:] = True
plot_eu_plane(qtuning_select(rng.random((20, 8)) * 3, rng.random((20, 8)), response, sample_ratio=0.5,
                             token_ratio=0.7), out / "eu.png")
print(matplotlib.get_backend())
"""


def test_figures_do_not_switch_the_callers_matplotlib_backend(tmp_path):
    """Each plot called matplotlib.use("Agg"): the caller's backend was Agg for the rest of the process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BACKEND, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
    for name in ("blocks.png", "widths.png", "eu.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_cli_quiet_silences_progress_bars_for_its_own_command_only(tmp_path, monkeypatch):
    """`cli.main([..., "--quiet"])` turned transformers' progress bars off for the rest of the caller's process
    (and, in the suite, for later tests: a NaN-weights test passed only after a --quiet one)."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    from prunekit import cli

    argv = ["generate", str(tmp_path / "missing"), "--prompt", "hi", "--kv", "full", "--budget", "8", "--quiet"]
    during = []
    check = cli._check_utf8
    monkeypatch.setattr(cli, "_check_utf8", lambda args: during.append(
        (hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled())) or check(args))
    had, hub_had = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    try:
        for ours, hubs_off in ((True, False), (False, True), (True, True)):
            (hf_logging.enable_progress_bar if ours else hf_logging.disable_progress_bar)()
            (hub.disable_progress_bars if hubs_off else hub.enable_progress_bars)()
            assert cli.main(argv) == 2  # the folder is missing: refused after the bars were turned off
            assert during.pop() == (False, True)  # both off while the command ran
            assert hf_logging.is_progress_bar_enabled() is ours and hub.are_progress_bars_disabled() is hubs_off
    finally:
        (hf_logging.enable_progress_bar if had else hf_logging.disable_progress_bar)()
        (hub.disable_progress_bars if hub_had else hub.enable_progress_bars)()


def test_quiet_progress_bars_gives_back_the_hubs_per_group_settings():
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    from prunekit.weights.io import quiet_progress_bars

    had, hub_had = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    try:
        hf_logging.enable_progress_bar()
        hub.disable_progress_bars("huggingface_hub.http_get")  # the caller silenced downloads only
        with quiet_progress_bars():
            assert not hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        assert hf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
        assert hub.are_progress_bars_disabled("huggingface_hub.http_get")  # was re-enabled by the global switch
    finally:
        (hf_logging.enable_progress_bar if had else hf_logging.disable_progress_bar)()
        (hub.disable_progress_bars if hub_had else hub.enable_progress_bars)()


def _examples():
    tok = char_tokenizer()
    return S.tokenize([{"instruction": f"{i}+1=", "response": str(i + 1)} for i in range(4)], tok, max_length=32), tok


def _train(model_fn):
    from prunekit.train import cross_val_probs, mlp, train

    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    model = mlp(8, 2)
    before = [p.clone() for p in model.parameters()]
    model_fn(lambda: train(model, x, y, epochs=1, progress=False))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    model_fn(lambda: cross_val_probs(lambda: mlp(8, 2), x, y, folds=3, epochs=1, progress=False))


def _depth(model_fn):
    target = depth.causal_lm_target(tiny_model("llama"), _ids(), batch_size=2)
    model_fn(lambda: depth.recover(target, steps=2))
    target = depth.causal_lm_target(tiny_model("llama"), _ids(), batch_size=2)
    model_fn(lambda: depth.tinyfusion(target, kept=1, groups="1:2", steps=2))


def _sft(model_fn):
    examples, tok = _examples()
    model = tiny_model("llama")
    report = model_fn(lambda: S.sft(model, examples, pad_id=tok.eos_token_id, progress=False))
    assert report.steps > 0


def _dpruner(model_fn):
    from prunekit.weights.methods import dpruner

    model = tiny_model("llama")
    model_fn(lambda: dpruner.prune_model(model, _ids(), ratio=0.5, domain=_ids(), progress=False))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("call", [_train, _depth, _sft, _dpruner])
def test_training_runs_inside_a_callers_no_grad_or_inference_mode(context, call):
    """Each failed with autograd's bare "element 0 of tensors does not require grad" (sft after putting LoRA
    into the model); D-Pruner worked under no_grad only."""

    def inside(fn):
        with context():
            return fn()

    call(inside)


def test_a_model_made_inside_inference_mode_is_refused_for_training_before_it_is_changed():
    from prunekit.errors import InputError

    examples, tok = _examples()
    with torch.inference_mode():
        model = tiny_model("llama")
    with pytest.raises(InputError, match="made inside torch.inference_mode"):
        S.sft(model, examples, pad_id=tok.eos_token_id, progress=False)
    assert not any("lora" in name for name, _ in model.named_modules())


def _prune(model):
    import prunekit

    prunekit.prune(model, method="wanda", ratio=0.5, calibration=_ids(), progress=False)


def _prune_structured(model):
    import prunekit

    prunekit.prune_structured(model, method="uniform-structured", ratio=0.25, calibration=_ids(), progress=False)


def _shortgpt(model):
    depth.shortgpt(depth.causal_lm_target(model, _ids(), batch_size=2), kept=1)


@pytest.mark.parametrize("call", [_perplexity, _sensitivity, _score_examples, _prune, _prune_structured, _shortgpt])
def test_a_callers_frozen_submodule_stays_in_eval_mode(call):
    """Each saved model.training and gave it back with model.train(was), which sets every submodule: a block the
    caller had put in eval() inside a model in train mode came back in train mode."""
    model = tiny_model("llama").train()
    model.model.layers[0].eval()
    call(model)
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training and not any(m.training for m in model.model.layers[0].modules())


def test_float32_data_trains_a_model_built_under_a_float64_default_dtype():
    """cross_val_probs / score_runs build their models with the caller's default dtype: float32 data into them
    was PyTorch's bare "mat1 and mat2 must have the same dtype"."""
    from prunekit.train import cross_val_probs, mlp, score_runs

    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))  # float32
    y = (x[:, 0] > 0).long()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        probs = cross_val_probs(lambda: mlp(8, 2), x, y, folds=2, epochs=1, progress=False)
        scores = score_runs(lambda: mlp(8, 2), x, y, runs=1, epochs=1, progress=False)
    finally:
        torch.set_default_dtype(before)
    assert probs.shape == (40, 2) and abs(probs.sum(1) - 1).max() < 1e-5 and len(scores.el2n) == 40


def test_d_pruner_refuses_a_model_made_inside_inference_mode_before_its_general_stage():
    from prunekit.errors import InputError
    from prunekit.weights.methods import dpruner

    with torch.inference_mode():
        model = tiny_model("llama")
    with pytest.raises(InputError, match="prune_model: the model's weights were made inside torch.inference_mode"):
        dpruner.prune_model(model, _ids(), ratio=0.5, domain=_ids(), progress=False)


def test_modes_come_back_to_each_module_after_a_layer_is_deleted():
    """Restoring by name alone gave the blocks after a deleted one their predecessors' flags (found in review)."""
    from torch import nn

    from prunekit.errors import module_modes, restore_modes

    import gc
    import weakref

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), nn.Dropout())
    model.train()
    model[0].eval()
    model[3].eval()
    modes = module_modes(model)
    model.eval()
    del model[0]  # what was [1] is now [0]; the frozen Dropout now [2]
    model.append(nn.Linear(2, 2))  # new, under "3", which the Dropout held: its parent's flag, not the Dropout's
    restore_modes(modes)
    assert model.training and model[0].training and model[1].training and model[1][0].training
    assert not model[2].training and model[3].training
    # the records hold no module: a replaced one is freed at once (ARMOR's dense Linears were kept to the end)
    gone = weakref.ref(model[0])
    model[0] = nn.Linear(2, 2)
    gc.collect()
    assert gone() is None


def test_cli_quiet_disables_every_progress_bar_even_one_that_asks_for_itself(tmp_path, monkeypatch):
    """`--quiet` only switched off transformers' and the hub's bars; one of prunekit's own that was not handed the
    command's switch (the FID classifier's first training) printed anyway."""
    import io

    from tqdm import std

    from prunekit import cli

    argv = ["generate", str(tmp_path / "missing"), "--prompt", "hi", "--kv", "full", "--budget", "8"]
    during = []
    check = cli._check_utf8
    monkeypatch.setattr(cli, "_check_utf8", lambda args: during.append(
        std.tqdm(range(1), disable=False, file=io.StringIO()).disable) or check(args))
    original = vars(std.tqdm)["__init__"]
    assert cli.main(argv + ["--quiet"]) == 2 and during.pop() is True
    assert vars(std.tqdm)["__init__"] is original
    assert cli.main(argv) == 2 and during.pop() is False  # without --quiet the bar is its caller's to switch


def test_quiet_silences_only_its_own_threads_bars():
    # a command run with --quiet in one thread disabled the bars another thread of the caller made meanwhile
    import io
    import threading

    from tqdm import std

    from prunekit.weights.io import silent_progress_bars

    entered, release, seen = threading.Event(), threading.Event(), {}

    def quiet_command():
        with silent_progress_bars():
            seen["own"] = std.tqdm(range(1), disable=False, file=io.StringIO()).disable
            entered.set()
            release.wait(10)

    t = threading.Thread(target=quiet_command)
    t.start()
    entered.wait(10)
    try:
        seen["other"] = std.tqdm(range(1), disable=False, file=io.StringIO()).disable
    finally:
        release.set()
        t.join(10)
    assert seen == {"own": True, "other": False}
