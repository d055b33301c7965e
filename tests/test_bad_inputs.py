"""Bad input across commands: a clear one-line error, exit 2, the input untouched and no output left.

Cases found by a sweep of the CLI with broken models, stores and option values (each once a traceback, a silent
success on a broken model, or a changed input)."""

import hashlib
import json
import os
import shutil
import sqlite3

import pytest
import torch

import prunekit
from prunekit import cli
from prunekit.errors import InputError, check_not_input

from conftest import TEXT, tiny_model


def digest(path):
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(argv, capsys, match: str) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def nan_dir(tmp_path, tok):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        model.model.layers[0].self_attn.q_proj.weight[1, 1] = float("inf")
    folder = tmp_path / "nan-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_model_refuses_nan_or_inf_weights_unless_asked_not_to_check(nan_dir):
    with pytest.raises(InputError, match=r"NaN or Inf weights in model\.layers\.0\.self_attn\.q_proj\.weight and 1 "
                                         r"other tensor; repair or re-export"):
        prunekit.load_model(nan_dir)
    model, _ = prunekit.load_model(nan_dir, check_finite=False)
    assert torch.isnan(model.model.layers[1].mlp.down_proj.weight).any()


DEVICE_COMMANDS = ["weights", "depth", "structured", "eval", "generate", "reason", "qtune"]


def device_argv(command, model, text_file, tmp_path, device):
    """A command of each family that loads a causal LM, on `device`, writing under tmp_path/out where it writes."""
    out = tmp_path / "out"
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "response": f"It is {i + 1}."}) + "\n"
                           for i in range(8)))
    calib = ["--calib", str(text_file), "--samples", "4", "--seqlen", "32", "--quiet", "--device", device]
    return {
        "weights": ["prune", str(model), "--method", "wanda", "--ratio", "0.5", *calib, "--out", str(out)],
        "depth": ["prune", str(model), "--method", "shortgpt", "--layers", "1", "--no-speed", *calib,
                  "--out", str(out)],
        "structured": ["prune", str(model), "--method", "uniform-structured", "--ratio", "0.3", "--no-speed", *calib,
                       "--out", str(out)],
        "eval": ["eval", str(model), "--text", str(text_file), "--seqlen", "32", "--quiet", "--device", device],
        "generate": ["generate", str(model), "--prompt", "hello", "--kv", "h2o", "--budget", "8",
                     "--max-new-tokens", "2", "--quiet", "--device", device],
        "reason": ["reason", "--model", str(model), "--questions", str(questions), "--samples", "2",
                   "--max-new-tokens", "2", "--quiet", "--out", str(out), "--device", device],
        "qtune": ["data", "qtune", str(model), "--data", str(sft), "--out", str(out), "--quiet", "--device", device],
    }[command]


@pytest.mark.parametrize("command", ["depth", "structured", "generate", "reason", "qtune"])
def test_every_model_command_refuses_nan_weights(command, nan_dir, text_file, tmp_path, capsys):
    before = digest(nan_dir)
    refused(device_argv(command, nan_dir, text_file, tmp_path, "cpu"), capsys,
            "has NaN or Inf weights in model.layers.0.self_attn.q_proj.weight")
    assert digest(nan_dir) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize("device, match", [
    ("gpu0", "--device must be a device such as cpu, cuda or cuda:1, got 'gpu0'"),
    ("meta", "--device meta: prunekit runs on cpu, cuda or mps, not meta"),
    pytest.param("cuda", "sees no CUDA device; use cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_every_model_command_refuses_a_device_it_cannot_run_on_before_loading(command, device, match, model_dir,
                                                                              text_file, tmp_path, monkeypatch,
                                                                              capsys):
    from prunekit.weights import io

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr(io, "_load_checked", no_load)
    before = digest(model_dir)
    refused(device_argv(command, model_dir, text_file, tmp_path, device), capsys, match)
    assert digest(model_dir) == before and not (tmp_path / "out").exists()


def test_parse_device():
    from prunekit.weights.io import parse_device

    assert parse_device(None) is None
    assert parse_device("cpu") == parse_device(torch.device("cpu")) == parse_device(" cpu ") == torch.device("cpu")
    if torch.cuda.is_available():
        assert parse_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(InputError, match=r"torch sees \d+ CUDA device\(s\), cuda:0 to"):
            parse_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(InputError, match=r"--device cuda:1: this torch \(.*\) sees no CUDA device"):
            parse_device("cuda:1", what="--device")
    with pytest.raises(InputError, match="must be a device such as"):
        parse_device(3.5)


def test_the_model_commands_run_on_the_cpu_device_and_record_it(model_dir, text_file, tmp_path):
    for command in ("weights", "depth", "structured"):
        out = tmp_path / "out"
        assert cli.main(device_argv(command, model_dir, text_file, tmp_path, "cpu")) == 0, command
        assert json.loads((out / "prunekit.json").read_text())["device"] == "cpu", command
        shutil.rmtree(out)
    assert cli.main(device_argv("qtune", model_dir, text_file, tmp_path, "cpu")) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["device"] == "cpu"
    model, _ = prunekit.load_model(model_dir, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("config, match", [('{"model_type": "llama",\n', "config.json is not valid JSON"),
                                           ("[]", "config.json has no model_type")])
def test_depth_prune_refuses_a_broken_config(config, match, model_dir, text_file, tmp_path, capsys):
    (model_dir / "config.json").write_text(config)
    out = tmp_path / "out"
    refused(["prune", str(model_dir), "--method", "shortgpt", "--layers", "1", "--calib", str(text_file),
             "--samples", "4", "--seqlen", "32", "--no-speed", "--quiet", "--out", str(out)], capsys, match)
    assert not out.exists()


@pytest.mark.parametrize("change, match", [
    # AutoTokenizer validates config.json too: these were "has no usable tokenizer ... save the tokenizer"
    ({"num_attention_heads": 3}, "config.json is not a valid config: ValueError: The hidden size"),
    ({"num_hidden_layers": "two"}, 'config.json gives "num_hidden_layers": "two"; it must be a whole number >= 1'),
    # transformers printed its LOAD REPORT table, then named ignore_mismatched_sizes, which nobody set
    ({"intermediate_size": 256}, "weights do not match its config.json: model.layers.0.mlp.down_proj.weight is "
                                 "stored as [64, 128] but the config makes it [64, 256]"),
])
def test_a_config_that_does_not_hold_is_named_as_the_config(change, match, model_dir, text_file, capsys,
                                                             no_loading_bars):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["intermediate_size"] == 128 and cfg["hidden_size"] == 64
    (model_dir / "config.json").write_text(json.dumps(dict(cfg, **change)))
    refused(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys, match)


@pytest.mark.parametrize("change, match", [
    ({"head_dim": 0}, 'gives "head_dim": 0; it must be a whole number >= 1'),  # ZeroDivisionError traceback
    ({"intermediate_size": 0}, 'gives "intermediate_size": 0'),  # torch warnings, then an error
    ({"max_position_embeddings": -1}, 'gives "max_position_embeddings": -1'),  # the window-length check was off
    ({"text_config": {"hidden_size": 2.5}}, 'gives "text_config.hidden_size": 2.5'),
])
def test_config_sizes_are_whole_numbers_of_at_least_one(change, match, model_dir, text_file, capsys):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(cfg, **change)))
    refused(["eval", str(model_dir), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys, match)


@pytest.mark.parametrize("text, match", [
    ('{"eos_token_id": 2,}', "generation_config.json is not valid JSON (JSONDecodeError: Expecting property name"),
    ("[2]", "holds a JSON list, not an object"),
    ('{"output_hidden_states": "yes"}', 'gives "output_hidden_states": "yes"; it must be true or false'),
    ('{"eos_token_id": [2, 1e40]}', 'gives "eos_token_id": [2, 1e+40]; it must be a token id'),
    ('{"bos_token_id": 1.5}', 'gives "bos_token_id": 1.5; it must be a token id (a whole number)'),
    ('{"length_penalty": NaN}', 'gives "length_penalty": NaN; it must be a finite number.'),
    ('{"max_new_tokens": -5}', 'gives "max_new_tokens": -5; it must be a whole number >= 0'),
    ('{"temperature": "hot"}', 'gives "temperature": "hot"; it must be a finite number >= 0'),
])
def test_a_broken_generation_config_is_named_not_dropped(text, match, model_dir, tmp_path, capsys):
    # transformers skips a generation_config.json it cannot parse without a word: the model lost its stop tokens
    (model_dir / "generation_config.json").write_text(text)
    before = digest(model_dir)
    out = tmp_path / "out"
    refused(["generate", str(model_dir), "--prompt", "hi", "--kv", "full", "--max-new-tokens", "2"], capsys, match)
    refused(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--out", str(out), "--quiet"],
            capsys, match)
    assert digest(model_dir) == before and not out.exists()


@pytest.mark.parametrize("shard, match", [
    (None, "maps model.norm.weight to null, which is not a shard file of"),  # a TypeError traceback before
    (3, "maps model.norm.weight to 3, which is not a shard file"),
    ("../model.safetensors", 'maps model.norm.weight to "../model.safetensors", which is not a shard file'),
    ("gone.safetensors", 'maps model.norm.weight to "gone.safetensors", which is not a shard file'),
])
def test_a_sharded_model_whose_index_names_no_shard_is_refused(shard, match, tmp_path, tok, text_file, capsys):
    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    assert len(set(data["weight_map"].values())) > 1  # really sharded
    assert cli.main(["eval", str(folder), "--text", str(text_file), "--seqlen", "32", "--tokens", "64",
                     "--quiet"]) == 0
    # Hub repos publish a .bin index beside the safetensors one; downloaded without the .bin shards it is unused
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: "pytorch_model-00001-of-00002.bin" for k in data["weight_map"]}}))
    assert cli.main(["eval", str(folder), "--text", str(text_file), "--seqlen", "32", "--tokens", "64",
                     "--quiet"]) == 0
    data["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(data))
    refused(["eval", str(folder), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys, match)


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m.content }}{% endfor", "(TemplateSyntaxError: unexpected end of template"),
    ('{{ raise_exception("no system turns") }}', "(TemplateError: no system turns)"),
    ("{{ messages[5].content }}", "(UndefinedError: list object has no element 5)"),
    (5, "(TypeError: Can't compile non template nodes)"),
])
def test_a_chat_template_that_fails_is_named(template, match, model_dir, tmp_path, capsys):
    # each of these was a jinja2 traceback (exit 1) from generate --chat, reason, memory ask and qtune
    cfg_file = model_dir / "tokenizer_config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), chat_template=template)))
    err = refused(["generate", str(model_dir), "--prompt", "hi", "--chat", "--kv", "full", "--max-new-tokens", "2",
                   "--quiet"],
                  capsys, match)
    assert err.startswith("prunekit: error: the tokenizer's chat_template fails on a 1-message conversation")
    assert err.endswith("fix chat_template in the model's tokenizer_config.json (or chat_template.jinja)")
    from prunekit.data import sft

    with pytest.raises(InputError, match="chat_template fails"):
        sft.prompt_text(prunekit.load_model(model_dir)[1], "Add 1 and 2.")


def test_a_generation_config_with_ids_past_the_vocabulary_still_loads(model_dir):
    # transformers only warns about them; tiny GPT-2s built from GPT2Config keep bos/eos 50256 with any vocabulary,
    # early LLaMA conversions pad with -1, and a negative length_penalty favours short beams
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": [50256, 2],
                                                                  "do_sample": True, "temperature": 0.7,
                                                                  "top_p": 0.9, "top_k": 50, "pad_token_id": -1,
                                                                  "num_beams": 4, "length_penalty": -1.0}))
    model, _ = prunekit.load_model(model_dir)
    assert model.generation_config.bos_token_id == 50256


def test_an_output_inside_the_input_model_folder_is_refused(model_dir, text_file, capsys):
    before = digest(model_dir)
    out = model_dir / "pruned"
    refused(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--out", str(out), "--quiet"],
            capsys, "is inside the input folder")
    assert digest(model_dir) == before and not out.exists()
    check_not_input(text_file.parent / "next-to-the-text", text_file)  # beside an input file is fine


def test_kv_options_and_budgets_say_what_to_fix(model_dir, tmp_path, capsys):
    from prunekit.inference import kv

    assert kv.make_policy("delta", budget=256, delta_layers=1).delta_layers == [1]
    assert kv.make_policy("delta", budget=256, delta_layers="1, 0").delta_layers == [0, 1]
    for bad in ("a,b", "1.5,2", "", [], [1.5], True):
        with pytest.raises(InputError, match="delta_layers"):
            kv.make_policy("delta", budget=256, delta_layers=bad)
    with pytest.raises(InputError, match="budget"):
        kv.make_policy("full", budget=-3)
    base = ["generate", str(model_dir), "--max-new-tokens", "2"]
    refused([*base, "--prompt", "hi", "--kv", "delta", "--budget", "256", "--option", "delta_layers=a,b"], capsys,
            "whole layer")
    refused([*base, "--prompt", "hi", "--kv", "full", "--budget", "-3"], capsys, "too small")
    refused([*base, "--kv", "full", "--prompt-file", str(tmp_path)], capsys, "is a folder")


def test_reason_refuses_odd_paths_files_seeds_and_outputs(model_dir, tmp_path, capsys):
    good = {"answer": "1", "paths": [{"text": "1", "answer": "1", "logprobs": [-0.1]},
                                     {"text": "2", "answer": "2", "logprobs": [-0.2]}]}
    paths = tmp_path / "paths.jsonl"
    paths.write_text(json.dumps(good) + "\n")
    refused(["reason", str(paths), "--method", "pc", "--n", "1", "--seed", "-1"], capsys, "seed=-1 must be")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    refused(["reason", str(deep), "--method", "sc"], capsys, "nested too deeply")
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps(good).replace("-0.1", "-" + "9" * 400) + "\n")
    refused(["reason", str(huge), "--method", "rpc"], capsys, "NaN or infinite")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": " ", "answer": "1"}) + "\n")
    sample = ["reason", "--model", str(model_dir), "--samples", "2", "--max-new-tokens", "2", "--quiet"]
    refused([*sample, "--questions", str(questions), "--out", str(tmp_path / "s.jsonl")], capsys, "non-empty str")
    questions.write_text(json.dumps({"question": "2+3?", "answer": "5"}) + "\n")
    folder = tmp_path / "outdir"
    folder.mkdir()
    refused([*sample, "--questions", str(questions), "--out", str(folder), "--overwrite"], capsys, "is a folder")
    assert list(folder.iterdir()) == []


def test_model_options_are_checked_before_any_work(model_dir, text_file, tmp_path, capsys):
    from prunekit.depth.tinyfusion import _temperatures

    assert _temperatures("4,0.1") == (4.0, 0.1) and _temperatures([2, 1]) == (2.0, 1.0)
    for bad in (4, "4", "x,1", (1, 0), (1, float("nan")), "1,2,3"):
        with pytest.raises(InputError, match="tau must be two positive temperatures"):
            _temperatures(bad)
    out = tmp_path / "out"
    refused(["prune", str(model_dir), "--method", "tyr", "--ratio", "0.3", "--option", "bogus=1",
             "--calib", str(text_file), "--out", str(out), "--quiet"], capsys, "tyr does not take the option(s) bogus")
    assert not out.exists()
    # the same option twice, or a flag and its --option: the last one won silently
    refused(["prune", str(model_dir), "--method", "sparsegpt", "--ratio", "0.3", "--option", "percdamp=0.01",
             "--option", "percdamp=0.1", "--out", str(out)], capsys, "--option percdamp is given twice")
    refused(["prune", str(model_dir), "--method", "dsnot", "--ratio", "0.3", "--base", "wanda", "--option",
             "base=magnitude", "--out", str(out)], capsys, "--base and --option base=... both given")
    assert not out.exists()


def _foreign(path, *, table: bool):
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=7")
    if table:
        db.execute("CREATE TABLE people (name TEXT)")
        db.execute("INSERT INTO people VALUES ('ada')")
        db.commit()
    db.close()


@pytest.mark.parametrize("kind", ["foreign-table", "foreign-empty", "zero-bytes"])
def test_memory_commands_leave_files_that_are_not_stores_untouched(kind, tmp_path, capsys):
    path = tmp_path / "x.db"
    if kind == "zero-bytes":
        path.write_bytes(b"")
    else:
        _foreign(path, table=kind == "foreign-table")
    before = digest(path)
    match = "holds no memory store yet" if kind == "zero-bytes" else "SQLite database of something else"
    for argv in (["stats"], ["ask", "where?"]):
        refused(["memory", *argv, "--store", str(path), "--embedder", "hash"], capsys, match)
        assert digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]
    if kind != "zero-bytes":  # an empty file is a new store to `add`; somebody else's database is not
        refused(["memory", "add", "--store", str(path), "--embedder", "hash", "hello"], capsys, match)
        assert digest(path) == before


def test_memory_add_names_the_bad_line_of_a_turns_file(tmp_path, capsys):
    turns = tmp_path / "turns.jsonl"
    turns.write_text('{"role": "user", "content": "hi"}\n\n{"role": "user", "content": 123}\n')
    store = tmp_path / "m.db"
    refused(["memory", "add", "--store", str(store), "--embedder", "hash", "--jsonl", str(turns)], capsys,
            f"{turns}:3: a turn's 'content' must be a string")
    assert not store.exists()


@pytest.fixture
def no_loading_bars():
    """transformers' "Loading weights" bar shares stderr with the one-line error (--quiet turns it off for the
    process, so a test run alone saw it where the whole suite did not)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def test_token_ids_the_model_cannot_take_are_refused_before_any_forward(model_dir, text_file, tmp_path, tok, capsys,
                                                                         no_loading_bars):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = tmp_path / "small-vocab"  # the tokenizer's ids run past this model's 64 embeddings
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256)).save_pretrained(small)
    tok.save_pretrained(small)
    refused(["eval", str(small), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys,
            "outside the model's vocabulary of 64")
    out = tmp_path / "out"
    refused(["prune", str(small), "--method", "wanda", "--ratio", "0.5", "--calib", str(text_file), "--samples", "2",
             "--seqlen", "32", "--out", str(out), "--quiet"], capsys, "outside the model's vocabulary of 64")
    # generate, reason's sampling and memory ask's answer ended in an IndexError traceback
    refused(["generate", str(small), "--prompt", "the river crossed the old stone bridge", "--kv", "h2o", "--budget",
             "8", "--max-new-tokens", "2", "--quiet"], capsys, "the prompt has token id")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "the river crossed the old stone bridge", "answer": "1"}\n')
    refused(["reason", "--model", str(small), "--questions", str(questions), "--out", str(tmp_path / "r.jsonl"),
             "--samples", "1", "--max-new-tokens", "2", "--quiet"], capsys, "outside the model's vocabulary of 64")
    assert cli.main(["memory", "add", "--store", str(tmp_path / "m.db"), "--embedder", "hash", "the cat sleeps"]) == 0
    refused(["memory", "ask", "--store", str(tmp_path / "m.db"), "--embedder", "hash", "--model", str(small),
             "--max-new-tokens", "2",
             "the river crossed the old stone bridge"], capsys, "outside the model's vocabulary of 64")
    assert not (tmp_path / "r.jsonl").exists()
    refused(["prune", str(model_dir), "--method", "wanda", "--ratio", "0.5", "--calib", str(text_file),
             "--samples", "2", "--seqlen", "512", "--out", str(out), "--quiet"], capsys,
            "longer than the model's 256 positions")
    refused(["prune", str(model_dir), "--method", "shortgpt", "--layers", "1", "--calib", str(text_file),
             "--samples", "2", "--seqlen", "512", "--no-speed", "--out", str(out), "--quiet"], capsys, "256 positions")
    # prune --eval's windows: it said "use a --seqlen", the calibration flag
    refused(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--eval", str(text_file),
             "--eval-tokens", "512", "--out", str(out), "--quiet"], capsys,
            "evaluation text: windows of 512 tokens are longer than the model's 256 positions; make them at most 256 "
            "tokens (eval --seqlen, prune --eval-seqlen, seqlen=)")
    assert not out.exists()
    model = tiny_model("llama")
    for bad in (torch.full((2, 8), 500), torch.full((2, 8), -1)):
        with pytest.raises(InputError, match="outside the model's vocabulary of 128"):
            prunekit.prune(model, method="magnitude", ratio=0.5, calibration=bad, progress=False)


def test_prune_and_perplexity_api_refuse_bad_arguments_with_input_errors(tok):
    model = tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    for kwargs, match in ((dict(pattern=prunekit.NM(0, 4)), "1 <= N < M"), (dict(pattern=prunekit.NM(5, 4)), "N < M"),
                          (dict(ratio=0.5, skip=None), "skip must be"), (dict(ratio=0.5, skip=["nothing*"]),
                                                                         "matches no layer"),
                          (dict(ratio=0.5, seed=-1), "seed must be"), (dict(ratio=0.5, mask="foo"),
                                                                       "takes no option")):
        with pytest.raises(InputError, match=match):
            prunekit.prune(model, method="sparsegpt" if "mask" in kwargs else "magnitude", calibration=None,
                           progress=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(InputError, match="prune needs a loaded torch model"):
        prunekit.prune("tiny", method="magnitude", ratio=0.5)
    res = prunekit.prune(model, method="magnitude", ratio=0.5, skip="*down_proj", calibration=None, progress=False)
    assert not any(r.name.endswith("down_proj") for r in res.layers)
    import numpy as np

    res = prunekit.prune(tiny_model("llama"), method="magnitude", ratio=np.float32(0.25), calibration=None,
                         progress=False)  # a numpy scalar is a number too
    assert res.ratio == 0.25 and abs(res.total_sparsity - 0.25) < 1e-6
    with pytest.raises(InputError, match="ratio must be a number"):
        prunekit.prune(tiny_model("llama"), method="magnitude", ratio=np.bool_(True), calibration=None)
    from prunekit.text import Text

    text = Text("t", "some words " * 200, "test text")
    for kwargs, match in ((dict(text=text, batch_size=0), "batch_size"), (dict(text=text, tokens=64.5), "tokens"),
                          (dict(text=None), "text must be"), (dict(text=""), "text source is empty"),
                          (dict(text="   "), "text source is empty")):
        with pytest.raises(InputError, match=match):
            prunekit.perplexity(model, tok, seqlen=32, progress=False, **kwargs)
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        prunekit.perplexity(model, None, text, seqlen=32, progress=False)
    with pytest.raises(InputError, match="purpose must be"):
        prunekit.load_text("wiki", purpose="foo")


def test_a_pickled_bin_checkpoint_is_refused_without_running_it(model_dir, text_file, tmp_path, capsys):
    import pickle

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            (folder / name).write_bytes((model_dir / name).read_bytes())
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, folder / "pytorch_model.bin", pickle_module=pickle)
    refused(["eval", str(folder), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys,
            "convert the weights to safetensors")
    assert not marker.exists()


def test_a_folder_whose_model_or_tokenizer_is_its_own_code_never_runs_it(model_dir, text_file, tmp_path, capsys,
                                                                          monkeypatch):
    import shutil
    import sys

    import prunekit

    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()\n"
    monkeypatch.setattr(sys, "stdin", None)  # transformers' [y/N] question would fail here, not wait
    unknown = tmp_path / "unknown-type"
    shutil.copytree(model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (unknown / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (unknown / name).write_text(code)
    refused(["eval", str(unknown), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys,
            "never runs a model folder's code")
    with pytest.raises(prunekit.InputError, match="trust_remote_code"):
        prunekit.load_model(unknown)
    # a known model type with an auto_map, and a tokenizer mapped to the folder's code: the built-in classes load
    known = tmp_path / "known-type"
    shutil.copytree(model_dir, known)
    config = json.loads((known / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (known / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((known / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (known / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in ("modeling_evil.py", "tokenization_evil.py"):
        (known / name).write_text(code)
    try:
        model, _ = prunekit.load_model(known)
        assert type(model).__name__ == "LlamaForCausalLM"
    except prunekit.InputError as e:  # or the tokenizer is refused, naming what does not load
        assert "tokenizer" in str(e)
    assert not marker.exists()


def _tiny_arch(kind: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if kind == "gpt2":
        sizes = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **sizes, **extra)).eval()


def test_architectures_the_methods_cannot_serve_are_refused_before_any_change(tok):
    import prunekit
    from prunekit import depth

    text = prunekit.Text("t", TEXT, "license")
    # a fused 3-D weight that is not MoE experts in the standard layout (those are pruned: test_experts.py) is no
    # Linear: 50% would be reported while it stayed dense
    odd = _tiny_arch("llama")
    odd.model.layers[1].mlp.mixer = torch.nn.Parameter(torch.randn(2, 8, 64))
    before = {k: v.clone() for k, v in odd.state_dict().items()}
    with pytest.raises(prunekit.InputError, match="3-D weight .*not recognise as mixture-of-experts"):
        prunekit.prune(odd, method="wanda", ratio=0.5, calibration=text, tokenizer=tok, samples=2, seqlen=32,
                       progress=False)
    assert all(torch.equal(v, odd.state_dict()[k]) for k, v in before.items())
    hybrid = tiny_model("llama")  # a convolution's kernel in a block (Mamba, LFM2) is not fused experts
    hybrid.model.layers[0].conv = torch.nn.Conv1d(64, 64, 3, groups=64)
    result = prunekit.prune(hybrid, method="magnitude", ratio=0.5, progress=False)
    assert result.total_sparsity == 0.5
    # OLMo2's q_norm spans all heads; StableLM sizes heads from hidden_size / heads; Helium's o_proj is hidden x
    # hidden: the saved folder did not load
    for kind, match, extra in (("olmo2", "normalises all heads together", {}),
                               ("stablelm", "sizes its heads from hidden_size", {}),
                               ("helium", "builds o_proj with 64 inputs", {"head_dim": 16})):
        model = _tiny_arch(kind, **extra)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(prunekit.InputError, match=match):
            prunekit.prune_structured(model, method="uniform-structured", ratio=0.25, structure="both",
                                      tokenizer=tok, calibration=text, samples=4, seqlen=32, progress=False)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        result = prunekit.prune_structured(model, method="uniform-structured", ratio=0.25, structure="neurons",
                                           tokenizer=tok, calibration=text, samples=4, seqlen=32, progress=False)
        assert result.params_after < result.params_before
    # GPT-2's blocks hold Conv1D, not Linear: LoRA found "no nn.Linear ... targets=None"
    gpt2 = _tiny_arch("gpt2")
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    target = depth.causal_lm_target(gpt2, ids, batch_size=2)
    with pytest.raises(prunekit.InputError, match="recoverability=frozen"):
        depth.tinyfusion(target, kept=1, steps=2)
    assert depth.tinyfusion(target, kept=1, steps=2, recoverability="frozen").keep.count(True) == 1
    with pytest.raises(prunekit.InputError, match="--recover full"):
        depth.recover(target, steps=1, trainable="lora")


def test_prune_refuses_flags_that_would_be_ignored(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--out", str(out), "--quiet"]
    refused([*base, "--eval-tokens", "64"], capsys, "--eval-tokens sets how much of the --eval texts")
    refused([*base, "--samples", "0"], capsys, "--samples must be an integer >= 1")
    assert not out.exists()


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path, model_dir, text_file):
    # outputs kept mkdtemp/mkstemp's private 0700/0600 after the rename: other users could not read them
    import os
    import stat

    import numpy as np

    from prunekit import cli
    from prunekit.data.io import write_table

    old = os.umask(0o022)
    try:
        out = tmp_path / "pruned"
        assert cli.main(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--out", str(out),
                         "--quiet"]) == 0
        table = write_table(tmp_path / "t.csv", {"index": np.arange(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE(table.stat().st_mode) == 0o644


def test_argparse_errors_are_one_line(capsys):
    # argparse printed its usage block before the message
    from prunekit import cli

    for argv in (["cnn", "udfc", "base", "--bits", "nan", "--out", "o"], ["prune"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err and "--help" in err, err


# ---- Python API bad input found by a QA sweep: an InputError before anything changes -----------------------

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.allclose(v, state[k], rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


def test_prune_refuses_a_nan_embedding_before_pruning_any_block(tok):
    # the Linears were checked, not the embedding: block 0 was pruned, then "non-finite activations" (RuntimeError)
    from conftest import ids_from_text

    model = tiny_model("llama")
    ids = ids_from_text(tok, 4, 32)
    model.model.embed_tokens.weight.data[int(ids[0, 3]), 0] = float("nan")
    before = _state(model)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(InputError, match="NaN or Inf weights in model.embed_tokens.weight"):
            prunekit.prune(model, method=method, ratio=0.5, calibration=ids)
        assert _same(model, before)


def test_prune_structured_checks_weights_and_ids_first(tok):
    from conftest import ids_from_text

    ids = ids_from_text(tok, 4, 32)
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")  # an SVD error after changes, or accepted
    before = _state(model)
    for method in ("uniform-structured", "magnitude-structured", "wanda-structured"):
        with pytest.raises(InputError, match="NaN or Inf weights"):
            prunekit.prune_structured(model, method=method, ratio=0.3, calibration=ids, progress=False)
        assert _same(model, before)
    model = tiny_model("llama")
    vocab = model.get_input_embeddings().weight.shape[0]
    for bad, match in ((ids + vocab, "calibration tensor"), (ids[:0], "empty")):  # IndexError / AttributeError
        with pytest.raises(InputError, match=match):
            prunekit.prune_structured(model, method="uniform-structured", ratio=0.3, calibration=bad, progress=False)


def test_depth_target_and_keep_mask_are_checked(tok):
    from conftest import ids_from_text

    from prunekit import depth

    model = tiny_model("llama")
    ids = ids_from_text(tok, 4, 32)
    vocab = model.get_input_embeddings().weight.shape[0]
    for bad in (ids.float(), ids + vocab, ids[:, :1]):  # torch / transformers errors inside shortgpt
        with pytest.raises(InputError, match="calibration ids"):
            depth.causal_lm_target(model, bad)
    depth_ = len(model.model.layers)
    with pytest.raises(InputError, match="one True/False per block"):  # indices were read as a mask
        depth.check_keep([0, 2, 3, 5][:depth_], depth_)
    assert depth.check_keep([1, 0] * (depth_ // 2), depth_) == [True, False] * (depth_ // 2)


def test_cnn_compress_perplexity_check_pattern_and_ece_refuse_bad_input(tok):
    from prunekit.cnn import resnet
    from prunekit.cnn.udfc import compress
    from prunekit.inference import reasoning as R

    net = resnet.ResNet(widths=(4, 8, 8), blocks=1).eval()
    net.blocks[0].conv1.weight.data[0, 0, 0, 0] = float("nan")  # an MKL error / internal assert
    with pytest.raises(InputError, match="NaN or Inf"):
        compress(net, ratio=0.3, bits=6)
    with pytest.raises(InputError, match="perplexity needs a loaded torch model"):  # AttributeError: 'str' ...
        prunekit.perplexity("smollm2-135m", tok, "wiki", seqlen=32, tokens=64)
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=128))
    with pytest.raises(InputError, match="needs a causal LM"):  # a masked LM's "perplexity" was a number
        prunekit.perplexity(bert, tok, "wiki", seqlen=32, tokens=64)
    assert prunekit.check_pattern(tiny_model("llama"), None) == []  # AttributeError on NM None
    with pytest.raises(InputError, match="correct must hold values in"):  # an "ECE" of 2.65
        R.expected_calibration_error([0.5, 0.2], [1, 5])
    with pytest.raises(InputError, match="weights must be finite"):
        R.expected_calibration_error([0.5, 0.2], [1, 0], weights=[1, -1])
    with pytest.raises(InputError, match="logprobs must hold"):  # TypeError: NoneType has no len()
        R.rpc(["1", "2"], None)
    recs = [{"answer": "1", "paths": [{"text": "a", "answer": "1", "logprobs": [-0.1]},
                                      {"text": "b", "answer": "2", "logprobs": [-1.0]}]}]
    with pytest.raises(InputError, match="resamples"):
        R.evaluate(recs, method="rpc", n=1, resamples=True)


def test_api_calls_given_a_name_a_nan_model_or_int32_ids_say_what_to_fix(tok, tmp_path):
    """Found by a sweep of the Python API: raw AttributeErrors for a model name, NaN weights scored or trained
    on, int32 ids refused by one pruning entry point and taken by the other, a closed Memory's sqlite error."""
    import prunekit.inference.kv as kv
    from prunekit.data import sft
    from prunekit.inference.memory import Memory
    from prunekit.inference.memory_embed import HashEmbedder

    from conftest import ids_from_text

    for call, what in ((lambda: kv.policy("smollm2-135m", "h2o", budget=32).__enter__(), "kv.policy"),
                       (lambda: prunekit.sparsity("smollm2-135m"), "sparsity"),
                       (lambda: prunekit.prune("smollm2-135m", method="magnitude", ratio=0.5), "prune")):
        with pytest.raises(InputError, match=f"{what} needs a loaded torch model .*got str"):
            call()
    nan = tiny_model("llama")
    with torch.no_grad():
        nan.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    example = sft.Example(ids=[5, 6, 7, 8], prompt_len=2)
    for call in (lambda: prunekit.perplexity(nan, tok, TEXT, seqlen=16),
                 lambda: sft.score_examples(nan, [example], pad_id=0),
                 lambda: sft.sft(nan, [example], pad_id=0, progress=False)):
        with pytest.raises(InputError, match=r"the model has NaN or Inf weights in model\.layers\.1\.mlp\.down_proj"):
            call()
    assert not any("lora" in n for n, _ in nan.named_modules())  # refused before LoRA went in
    ids = ids_from_text(tok, 2, 16)
    results = []
    for dtype in (torch.long, torch.int32):
        model = tiny_model("llama")
        prunekit.prune_structured(model, method="wanda-structured", ratio=0.3, calibration=ids.to(dtype),
                                  progress=False)
        results.append(model.state_dict())
    assert results[0].keys() == results[1].keys() and all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    with pytest.raises(InputError, match="calibration ids must be integer token ids"):
        prunekit.prune_structured(tiny_model("llama"), method="wanda-structured", ratio=0.3, calibration=ids.float())
    memory = Memory(tmp_path / "m.db", embedder=HashEmbedder(dim=64))
    memory.add("I parked the car in the blue garage")
    with pytest.raises(InputError, match="query must be a string .*got list"):
        memory.retrieve(["garage"])
    memory.close()
    memory.close()  # twice is fine
    for call in (lambda: memory.add("hello"), lambda: memory.retrieve("garage"), lambda: memory.prompt("garage", 100)):
        with pytest.raises(InputError, match=r"this Memory is closed; open the store again with Memory\(path\)"):
            call()


def _earlier_output(folder, tag):
    folder.mkdir(parents=True)
    (folder / "prunekit.json").write_text(json.dumps({"tag": tag}))


def _writer(tag):
    return lambda tmp: (tmp / "prunekit.json").write_text(json.dumps({"tag": tag}))


def test_atomic_writes_survive_races_links_long_names_and_a_late_ctrl_c(tmp_path, monkeypatch):
    """Found by a sweep of interrupted and concurrent runs: each case left a hidden .old folder or link."""
    import shutil

    from prunekit.weights import io

    def tag(folder):
        return json.loads((folder / "prunekit.json").read_text())["tag"]

    def hidden():
        return sorted(p.name for p in tmp_path.rglob(".*"))

    out = tmp_path / "out"
    _earlier_output(out, "old")
    real_replace, calls = os.replace, []

    def racing_replace(src, dst):  # another process installs its output between our two renames
        calls.append(dst)
        if len(calls) == 2:
            _earlier_output(out, "theirs")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", racing_replace)
    with pytest.raises(InputError, match="was written by another process while this one saved it; theirs stays"):
        io.write_atomically(out, _writer("ours"), overwrite=True)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert tag(out) == "theirs" and hidden() == []
    calls.clear()

    def moved_first(src, dst):  # another --overwrite run moves the earlier output aside just before we do
        calls.append(dst)
        if len(calls) == 1:
            shutil.rmtree(out)
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", moved_first)
    io.write_atomically(out, _writer("ours"), overwrite=True)  # was a FileNotFoundError (exit 1)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert tag(out) == "ours" and hidden() == []
    # Ctrl-C while the replaced output is deleted: the new output is in place and no hidden copy is left
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):
        if not k.get("ignore_errors"):
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(io.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        io.write_atomically(out, _writer("new"), overwrite=True)
    monkeypatch.setattr(io.shutil, "rmtree", real_rmtree)
    assert tag(out) == "new" and hidden() == []
    # --out a link to an earlier output: written where it points; the link stays
    real = tmp_path / "real"
    _earlier_output(real, "old")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert io.write_atomically(link, _writer("new"), overwrite=True) == real
    assert link.is_symlink() and tag(link) == tag(real) == "new" and hidden() == []
    # a name near the 255-byte limit: the temporary names fit too
    long = tmp_path / ("a" * 250)
    assert tag(io.write_atomically(long, _writer("long"), overwrite=False).parent / long.name) == "long"
    assert hidden() == []


def test_leftovers_of_a_killed_run_are_reported_once_and_kept(model_dir, tmp_path, capsys):
    """A run killed by SIGKILL or the OOM killer left a hidden half-written folder the size of a model (never
    reclaimed, never mentioned) or, killed between its two renames, the previous output hidden under a temporary
    name and no output at all. The next run names them; it deletes nothing (a tmp folder may be another run's)."""
    out = tmp_path / "pruned"
    half = tmp_path / ".pruned.tmp-kill9"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 2**20)
    moved = tmp_path / ".pruned.old-kill9"
    _earlier_output(moved, "before")
    (tmp_path / ".other.tmp-x").mkdir()  # another output's: not ours to mention
    assert cli.main(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--out", str(out),
                     "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 2, notes  # once each, though the CLI checks --out first and again at the save
    assert f"{half} (1.0 MiB) is a half-written output of a killed run" in notes[1]
    assert f"{moved} (0.0 MiB) holds the output pruned had before a run was killed" in notes[0]
    assert half.is_dir() and moved.is_dir() and (tmp_path / ".other.tmp-x").is_dir()
    assert (out / "prunekit.json").is_file()


def test_cnn_save_leaves_no_parent_folders_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    from prunekit.cnn import resnet

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        resnet.save_model(resnet.ResNet(widths=(4, 8), blocks=1), tmp_path / "a" / "b" / "m")
    assert list(tmp_path.iterdir()) == []


def test_empty_and_too_long_output_names_are_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "b" * 256
    base = ["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5"]
    for argv, said in ((base + ["--out", ""], "--out is empty; give a path"),
                       (base + ["--out", long], "its last part is 256 bytes, longer than a file name may be"),
                       (["data", "select", "--scores", "s.npy", "--keep", "0.5", "--out", ""], "--out is empty")):
        refused(argv, capsys, said)
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]


def test_a_full_disk_in_the_tokenizer_save_and_a_closed_pipe_are_one_line_or_quiet(monkeypatch, capsys):
    """tokenizers reports ENOSPC as a bare Exception (a 24-line traceback); `... | head` printed "error: Broken
    pipe"."""
    def full_disk(args):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(cli, "_cmd_methods", full_disk)
    assert cli.main(["methods"]) == 1
    assert capsys.readouterr().err == "prunekit: error: No space left on device (os error 28)\n"

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_methods", reader_left)
    assert cli.main(["methods"]) == 141  # quiet, and not 1 (the code of a system refusal)
    assert capsys.readouterr().err == ""

    def other(args):
        raise Exception("something else")

    monkeypatch.setattr(cli, "_cmd_methods", other)
    with pytest.raises(Exception, match="something else"):  # anything else is still a bug to see whole
        cli.main(["methods"])


def test_overwrite_refuses_a_model_folder_no_prunekit_command_wrote(model_dir, text_file, tmp_path, capsys):
    """`--out tiny --overwrite` (a typo) replaced the user's own model folder: its config.json passed as the marker
    of an earlier output."""
    import shutil

    own = tmp_path / "own-model"
    shutil.copytree(model_dir, own)
    before = digest(own)
    argv = ["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--out", str(own), "--overwrite"]
    refused(argv, capsys, "is a Hugging Face model folder (no prunekit.json) (config.json")
    assert digest(own) == before
    out = tmp_path / "out"  # an earlier prunekit output is still replaced
    argv[-2] = str(out)
    assert cli.main(argv[:-1]) == 0 and cli.main(argv) == 0


def test_hostile_folders_leak_nothing_lose_nothing_and_hang_nothing(model_dir, text_file, tmp_path, capsys):
    """Found by a security sweep: a LICENSE linked to a secret was copied into the output; --overwrite deleted any
    folder holding a config.json or summary.json; a pipe named model.safetensors hung the load for good; deeply
    nested or damaged JSON and factor files were tracebacks."""
    import os
    import shutil

    from prunekit.weights.io import carry_licence

    secret = tmp_path / "id_rsa"
    secret.write_text("pretend private key")
    (model_dir / "LICENSE").symlink_to(secret)
    (model_dir / "NOTICE").write_text("a notice")
    out = tmp_path / "out"
    out.mkdir()
    assert carry_licence(model_dir, out) == ["NOTICE"] and not (out / "LICENSE").exists()
    hub = tmp_path / "hub" / "models--x" / "snapshots" / "abc"  # the hub cache links files into ../../blobs
    shutil.copytree(model_dir, hub, symlinks=True)
    (hub / "LICENSE").unlink()
    (hub.parent.parent / "blobs").mkdir()
    (hub.parent.parent / "blobs" / "f00d").write_text("Apache-2.0")
    (hub / "LICENSE").symlink_to("../../blobs/f00d")
    out2 = tmp_path / "out2"
    out2.mkdir()
    assert carry_licence(hub, out2) == ["LICENSE", "NOTICE"] and (out2 / "LICENSE").read_text() == "Apache-2.0"

    base = ["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.5", "--overwrite", "--out"]
    for name, files in (("app", {"config.json": '{"port": 80}', "NOTES.md": "mine"}),
                        ("results", {"summary.json": '{"accuracy": 0.9}', "run1.csv": "a,b"})):
        folder = tmp_path / name
        folder.mkdir()
        for f, text in files.items():
            (folder / f).write_text(text)
        before = digest(folder)
        refused(base + [str(folder)], capsys, "that no prunekit command wrote")
        assert digest(folder) == before

    piped = tmp_path / "piped"
    piped.mkdir()
    shutil.copy(model_dir / "config.json", piped / "config.json")
    os.mkfifo(piped / "model.safetensors")
    refused(["eval", str(piped)], capsys, "model.safetensors is not a regular file (a folder, pipe or device)")

    nested = tmp_path / "nested"
    shutil.copytree(model_dir, nested, symlinks=True)
    (nested / "prunekit.json").write_text("[" * 100000 + "]" * 100000)
    refused(["eval", str(nested), "--text", str(text_file), "--seqlen", "32", "--tokens", "64"], capsys,
            "prunekit.json is not valid JSON")
    (nested / "prunekit.json").unlink()
    (nested / "armor.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # truncated
    refused(["eval", str(nested), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--quiet"], capsys,
            "armor.safetensors is not a readable safetensors file")


def test_a_custom_code_tokenizer_is_named_as_such(model_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(model_dir, folder)
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tok.EvilTokenizer", None]}}))
    (folder / "tok.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    refused(["eval", str(folder)], capsys, "tokenizer is custom code (auto_map in tokenizer_config.json)")
    assert not (tmp_path / "ran").exists()


def test_an_input_whose_files_link_into_the_output_is_not_replaced(model_dir, tmp_path, capsys):
    """`prune inB --out runA --overwrite`, inB's files linking into runA: inB silently read as the new model."""
    run_a = tmp_path / "runA"
    assert cli.main(["prune", str(model_dir), "--method", "magnitude", "--ratio", "0.3", "--out", str(run_a),
                     "--quiet"]) == 0
    in_b = tmp_path / "inB"
    in_b.mkdir()
    for f in run_a.iterdir():
        (in_b / f.name).symlink_to(f)
    before = digest(run_a)
    refused(["prune", str(in_b), "--method", "magnitude", "--ratio", "0.5", "--out", str(run_a), "--overwrite"],
            capsys, "holds the file")
    assert digest(run_a) == before


def test_a_pipe_is_read_as_a_prompt_file_and_named_as_a_pipe_where_a_text_file_goes(model_dir, tmp_path, capsys,
                                                                                     no_loading_bars):
    """`--prompt-file <(...)` and `--text <(...)` were said not to exist (they exist; they are pipes)."""
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(["eval", str(model_dir), "--text", str(fifo), "--seqlen", "16", "--tokens", "32"], capsys,
            "is not a regular file (a pipe or device; save the text to a file)")

    def feed():
        with open(fifo, "w") as f:
            f.write("the river crossed the old stone bridge")

    writer = threading.Thread(target=feed)
    writer.start()
    assert cli.main(["generate", str(model_dir), "--prompt-file", str(fifo), "--kv", "full", "--max-new-tokens", "2",
                     "--quiet"]) == 0
    writer.join()


def test_cli_messages_name_the_flag_the_user_typed_not_the_python_parameter(model_dir, tmp_path, capsys,
                                                                            no_loading_bars):
    """The API's `batch_size must be ...` reached the command line as is; the user typed --batch-size."""
    import numpy as np

    out = tmp_path / "out"
    err = refused(["prune", str(model_dir), "--method", "wanda", "--ratio", "0.5", "--samples", "2", "--seqlen", "16",
                   "--batch-size", "0", "--out", str(out)], capsys, "--batch-size must be a positive integer, got 0")
    assert err == "prunekit: error: --batch-size must be a positive integer, got 0" and not out.exists()
    labels, probs = tmp_path / "y.npy", tmp_path / "p.npy"
    np.save(labels, np.array([0, 1, 2, 1]))
    np.save(probs, np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.3, 0.7]]))
    refused(["data", "label-issues", "--labels", str(labels), "--probs", str(probs), "--out", str(tmp_path / "i.csv")],
            capsys, "--labels must lie in [0, 2) (--probs has 2 columns); example 2 has label 2")
    refused(["data", "label-issues", "--labels", str(labels), "--probs", str(probs), "--frac-noise", "0",
             "--out", str(tmp_path / "i.csv")], capsys, "--frac-noise must be a number in (0, 1], got 0.0")
    refused(["memory", "add", "--store", str(tmp_path / "m.db"), "--embedder", "hash", "--forget-fraction", "2",
             "hello"], capsys, "--forget-fraction must be a finite number")
    refused(["reason", "--model", str(model_dir), "--questions", str(labels), "--out", str(tmp_path / "r.jsonl"),
             "--temperature", "0"], capsys, "--temperature=0.0 must be a finite number > 0")
    # --option batch_size=0 is the method's option, not prune's --batch-size
    err = refused(["prune", str(model_dir), "--method", "wanda-structured", "--ratio", "0.3", "--option",
                   "batch_size=0", "--no-speed", "--out", str(out)], capsys, "batch_size must be")
    assert "--batch-size" not in err


def test_flag_names_replace_only_whole_python_names():
    from prunekit.cli import _in_flags

    flags = {"batch_size": "--batch-size", "max_new_tokens": "--max-new-tokens", "probs": "--probs",
             "tokens": "--tokens"}
    assert _in_flags("tokens=0 must be >= 1", flags) == "--tokens=0 must be >= 1"
    assert _in_flags("tokens must be >= 1", flags) == "--tokens must be >= 1"
    assert _in_flags("lower the tokens or give more text", flags) == "lower the tokens or give more text"
    assert (_in_flags("0 new tokens (--max-new-tokens, max_new_tokens=): it must be", flags)
            == "0 new tokens (--max-new-tokens, max_new_tokens=): it must be")
    kept = "a max_new_tokens_cap and my_batch_size stay"
    assert _in_flags(kept, flags) == kept
    path = "/data/batch_size/calib.txt does not exist; runs/max_new_tokens.txt neither"  # a path the user typed
    assert _in_flags(path, flags) == path
    assert _in_flags("lower batch_size, then", flags) == "lower --batch-size, then"
    assert _in_flags("pred_probs has 3 rows", flags) == "--probs has 3 rows"
    assert _in_flags("pred_probs has 3 rows", {}) == "pred_probs has 3 rows"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stderr_does_not_fail_the_run(model_dir, tmp_path):
    """`2>/dev/full` without --quiet: the first loading bar's write failed the run (exit 1, nothing said, nothing
    saved); diagnostics that cannot be written are dropped."""
    import subprocess
    import sys

    out = tmp_path / "pruned"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", str(model_dir), "--method", "magnitude",
                               "--ratio", "0.5", "--out", str(out)], stdout=subprocess.PIPE, stderr=full, text=True,
                              timeout=300)
    assert done.returncode == 0 and "saved" in done.stdout.lower() and (out / "prunekit.json").is_file(), done.stdout


def test_leftovers_are_looked_for_where_a_link_points_and_a_vanishing_one_is_skipped(tmp_path, capsys, monkeypatch):
    """Found in review: a linked --out's leftovers were named only at the save, and a leftover deleted while it was
    measured (another run writing the same --out finishing) stopped the run with FileNotFoundError."""
    from pathlib import Path

    from prunekit.weights import io

    real = tmp_path / "elsewhere" / "real"
    real.parent.mkdir()
    (real.parent / ".real.tmp-kill9").mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    io.check_output(link, overwrite=True)
    assert ".real.tmp-kill9 (0.0 MiB) is a half-written output" in capsys.readouterr().err

    def vanished(self, pattern):
        raise FileNotFoundError(2, "No such file or directory")

    (tmp_path / ".gone.tmp-x").mkdir()
    monkeypatch.setattr(Path, "rglob", vanished)
    io.check_output(tmp_path / "gone", overwrite=False)  # raised FileNotFoundError
    assert "gone" not in capsys.readouterr().err


def test_a_broken_config_is_named_before_the_missing_weights(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    refused(["eval", str(folder), "--text", "wiki"], capsys, "config.json is not valid JSON")  # said "has no weights"


def test_save_pruned_refuses_a_model_with_nan_weights(tmp_path, tok):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"the model to save .* has NaN or Inf weights in model.layers.1.mlp.up_proj"):
        prunekit.save_pruned(model, tok, tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_an_existing_output_is_refused_with_the_flag_that_would_replace_it(tmp_path):
    """From a new user's walk-through: the message said "pass overwrite=True (--overwrite)" to a CLI user, and
    offered --overwrite for a file or a folder of other files, which --overwrite then refused."""
    from prunekit.weights import io

    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "prunekit.json").write_text("{}")
    for name, overwrite, said in (
            ("file.txt", False, r"exists and is not a folder; choose another output \(--out\)$"),
            ("file.txt", True, r"exists and is not a folder; choose another output \(--out\)$"),
            ("mine", False, "is a folder of other files that no prunekit command wrote; choose another output "
                            r"\(--out\)$"),
            ("earlier", False, r"already exists; choose another output \(--out\) or pass --overwrite to replace it "
                               r"\(in Python: overwrite=True\)$")):
        with pytest.raises(InputError, match=said):
            io.check_output(tmp_path / name, overwrite=overwrite)
    assert (tmp_path / "file.txt").read_text() == (tmp_path / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [
    ["reason", "-", "--answers", "x.jsonl"],
    ["reason", "paths.jsonl", "--answers", "-"],  # wrote a file named "-"
    ["generate", "m", "--prompt-file", "-", "--kv", "h2o", "--budget", "8"],
    ["eval", "m", "--text", "-"],
    ["prune", "m", "--method", "wanda", "--ratio", "0.5", "--out", "-"],
    ["prune", "m", "--method", "wanda", "--ratio", "0.5", "--eval", "wiki, -", "--out", "o"],
    ["compare", "runs/a", "-"],
])
def test_a_dash_for_a_file_is_refused_not_taken_as_a_name(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert "prunekit reads and writes files, not standard input or output" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()


def test_a_dash_as_memory_text_is_a_turn(tmp_path, capsys):
    store = tmp_path / "m.db"
    assert cli.main(["memory", "add", "--store", str(store), "--embedder", "hash", "-"]) == 0


def test_an_interrupt_says_which_output_a_folder_holds(monkeypatch, capsys):
    """Ctrl-C after the new output was renamed into place said "one saved before this moment stays", which read as
    the earlier output."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_methods", interrupted)
    assert cli.main(["methods"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("prunekit: interrupted; no output was left half-written") and "or this run's" in err
    assert "output file holds" in err and "prunekit.json" not in err  # no folder: it named one and its record
    monkeypatch.setattr(cli, "_cmd_prune", interrupted)
    assert cli.main(["prune", "m", "--method", "wanda", "--out", "o"]) == 130
    assert "an output folder holds what was whole" in (err := capsys.readouterr().err) and "prunekit.json" in err


def test_api_errors_name_the_python_argument_beside_the_flag(tmp_path, tok):
    """Python callers were told to use --pattern, --option and --out, which they never type."""
    import prunekit

    with pytest.raises(InputError, match=r"use e.g. '2:4' \(--pattern 2:4"):
        prunekit.parse_pattern("2-4")
    with pytest.raises(InputError, match=r"fix blocksize= \(--option blocksize=\.\.\. on the command line"):
        prunekit.prune_options("sparsegpt", {"blocksize": "big"})
    out = tmp_path / "m"
    out.mkdir()
    (out / "prunekit.json").write_text("{}")
    with pytest.raises(InputError, match=r"pass --overwrite to replace it \(in Python: overwrite=True\)"):
        prunekit.save_pruned(tiny_model("llama"), tok, out)


@pytest.mark.parametrize("command", ["weights", "structured", "depth"])
def test_a_float16_save_that_would_overflow_is_refused(command, tok, tmp_path, capsys, text_file):
    # `--dtype float16` of a float32 model holding 1e5 wrote inf weights and exited 0; every later command refused
    # the result as holding NaN or Inf
    from safetensors.torch import load_file

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    folder = tmp_path / "big"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    before, out = digest(folder), tmp_path / "out"
    method = {"weights": ["--method", "magnitude", "--ratio", "0.5"],
              "structured": ["--method", "magnitude-structured", "--ratio", "0.5", "--no-speed"],
              "depth": ["--method", "every-other", "--layers", "1", "--no-speed"]}[command]
    if command == "depth":  # every-other keeps block 1 of 2: the outlier goes with block 0, and float16 holds the rest
        assert cli.main(["prune", str(folder), *method, "--dtype", "float16", "--out", str(out), "--quiet"]) == 0
        saved = load_file(out / "model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in saved.values()) and digest(folder) == before
        return
    # with --eval the weights are rounded to the saved dtype first: that wrote inf and blamed the input's weights
    for extra in ([], ["--eval", str(text_file), "--eval-tokens", "128", "--eval-seqlen", "64"]):
        refused(["prune", str(folder), *method, "--dtype", "float16", *extra, "--out", str(out), "--quiet"],
                capsys, "model.layers.0.mlp.up_proj.weight holds values up to 1e+05, past float16's largest (6.55e+04)")
        assert not out.exists() and digest(folder) == before
    assert cli.main(["prune", str(folder), *method, "--dtype", "bfloat16", "--out", str(out), "--quiet"]) == 0


def test_save_pruned_refuses_a_dtype_that_cannot_hold_the_weights(tok, tmp_path):
    from prunekit.weights.io import save_pruned

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 3] = -7e4
    with pytest.raises(InputError, match="o_proj.weight holds values up to 7e\\+04, past float16's largest"):
        save_pruned(model, tok, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    assert model.model.layers[1].self_attn.o_proj.weight.dtype == torch.float32


def test_sequences_past_a_learned_position_table_are_refused_in_one_line(tmp_path, capsys):
    # GPT-2 / OPT embed positions from a table: qtune, reason --model and memory ask went on to an IndexError
    # traceback mid-forward
    import json

    from conftest import char_tokenizer

    from prunekit.data import sft as S
    from prunekit.inference.memory_summary import chat_generate

    model, tok = tiny_model("gpt2"), char_tokenizer()  # 256 positions
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i} " * 30, "response": "ok " * 60}) + "\n"
                            for i in range(4)))
    refused(["data", "qtune", str(folder), "--data", str(data), "--max-length", "1024", "--out", str(tmp_path / "q"),
             "--quiet"], capsys, "prompt and response come to")
    assert not (tmp_path / "q").exists()
    examples = S.tokenize([{"instruction": "a " * 200, "response": "b " * 100}], tok, max_length=1024)
    with pytest.raises(InputError, match="past the model's 256 learned positions; lower --max-length"):
        S.score_examples(model, examples, pad_id=0)
    with pytest.raises(InputError, match="past the model's 256 learned positions; lower the budget"):
        chat_generate(model, tok, "hello " * 30, max_new_tokens=200)
    assert isinstance(chat_generate(model, tok, "hello", max_new_tokens=2), str)
