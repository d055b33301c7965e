"""prunekit on a CUDA model: the weight methods, ARMOR's kernel inside a model, perplexity, the KV policies, and
the command line's ``--device cuda`` for every family that loads a causal LM.

Skipped without a CUDA GPU. On an H200 (2026-12-04, before the device fixes in the weight engine and DELTA)
every weight method but magnitude failed with a device mismatch; after them, all 43 of these and test_armor's 8
CUDA tests passed there (the same day, after three more fixes these cases found: ShortGPT's sums, the save's
comparison with the input's tensors, UDFC's closed form), and the `cnn` commands' case with them (44 + 8). With
a GPU: ``.venv/bin/python -m pytest tests/test_cuda.py tests/test_armor.py -k cuda``.
"""

import pytest
import torch

import prunekit
from prunekit.inference.kv.policies import POLICIES

CUDA = torch.cuda.is_available()
SM80 = CUDA and torch.cuda.get_device_capability()[0] >= 8
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def cuda_model(dtype=torch.float32, layers=2):
    """A tiny Llama whose widths suit the 2:4 kernels (multiples of 64 on both sides of every Linear)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=256, intermediate_size=512,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to("cuda", dtype).eval()


def ids(n, length, seed):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


CASES = [
    ("magnitude", dict(ratio=0.5)), ("wanda", dict(ratio=0.5)), ("sparsegpt", dict(ratio=0.5)),
    ("wanda", dict(pattern="2:4")), ("sparsegpt", dict(pattern="2:4")),
    ("dsnot", dict(ratio=0.6, base="wanda")), ("dsnot", dict(pattern="2:4", base="sparsegpt")),
    ("armor", dict(pattern="2:4", iters=20)), ("dpruner", dict(ratio=0.5)), ("wanda", dict(ratio=0.5, profile="owl")),
]


@pytest.mark.parametrize("calibration_on", ["cpu", "cuda"])
@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{sorted(o.items())}" for m, o in CASES])
def test_cuda_weight_methods_prune_a_gpu_model_where_it_is(method, options, calibration_on):
    model = cuda_model()
    extra = {"domain": ids(8, 64, 2).to(calibration_on)} if method == "dpruner" else {}
    prunekit.prune(model, method=method, calibration=ids(8, 64, 1).to(calibration_on), progress=False,
                   **options, **extra)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    want = 1 - 2 / 4 if "pattern" in options else options["ratio"]
    assert prunekit.sparsity(model)["total"] == pytest.approx(want, abs=0.01)
    with torch.no_grad():
        assert torch.isfinite(model(ids(2, 32, 3).cuda()).logits).all()


@pytest.mark.skipif(not SM80, reason="needs compute capability >= 8.0 (the semi-structured kernels)")
def test_cuda_armor_model_runs_its_kernel_in_prefill_and_decode():
    from prunekit.weights.methods import armor

    model = cuda_model()
    # block size 96 pads the widths 256 and 512: the core's input is a column slice, the case that was wrong
    prunekit.prune(model, method="armor", pattern="2:4", calibration=ids(8, 64, 1), progress=False, iters=20,
                   block_size=96)
    model = model.to(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, armor.ArmorLinear)]
    assert len(layers) == 14
    prompt = ids(2, 48, 3).cuda()
    with torch.no_grad():
        kernel = model(prompt).logits.float()
        out = model.generate(prompt[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape[1] == 48 + 8
    assert not any(m._sparse_failed for m in layers) and all(m._sparse_cache is not None for m in layers)
    for m in layers:
        m.sparse_kernel = False
    with torch.no_grad():
        dense = model(prompt).logits.float()
    assert (kernel - dense).abs().max() <= 0.05 * dense.abs().max()


def test_cuda_perplexity_of_a_gpu_model():
    from prunekit.evaluate import perplexity_of_ids

    nll, tokens = perplexity_of_ids(cuda_model(), ids(4, 64, 4), progress=False)
    assert tokens == 4 * 63 and 0 < nll < 10


@pytest.mark.parametrize("name", list(POLICIES))
def test_cuda_kv_policies_generate_on_a_gpu_model(name):
    from prunekit.inference import kv

    model = cuda_model()
    prompt = ids(1, 300, 5).cuda()
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    for budget in (160, 400):
        with kv.policy(model, name, budget=budget):
            with torch.no_grad():
                got = model.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert got.shape == full.shape
        if budget >= 300 + 24:  # a budget over the whole sequence keeps everything: the full cache's tokens
            assert torch.equal(got, full)


def test_cuda_delta_layer_calibration_on_a_gpu_model():
    from prunekit.inference.kv.delta import calibrate_delta_layers

    chosen, shifts = calibrate_delta_layers(cuda_model(layers=4), ids(1, 200, 6), count=2, initial=1, window=32)
    assert len(chosen) == 2 and all(1 <= layer <= 2 for layer in chosen) and len(shifts) == 3


# The command line with --device cuda: each family that loads a causal LM, on a tiny folder (conftest's), with the
# paths the Python tests above leave out (the dense reload beside the pruned model for the speed timing, the
# teacher of --recover kd, TinyFusion's mask learning, sampling, Q-Tuning's fine-tuning).
CLI_CASES = {
    "wanda-2:4-eval": ["prune", "{model}", "--method", "wanda", "--pattern", "2:4", "--calib", "{text}",
                       "--eval", "{text}", "--eval-seqlen", "32", "--eval-tokens", "64", "--out", "{out}"],
    "tyr-timed": ["prune", "{model}", "--method", "tyr", "--ratio", "0.3", "--calib", "{text}", "--out", "{out}",
                  "--option", "generations=2"],
    "shortgpt-kd": ["prune", "{model}", "--method", "shortgpt", "--layers", "1", "--calib", "{text}", "--recover", "kd",
                    "--recover-steps", "2", "--out", "{out}"],
    "sensitivity-lora": ["prune", "{model}", "--method", "sensitivity", "--layers", "1", "--calib", "{text}",
                         "--recover", "lora", "--recover-steps", "2", "--no-speed", "--out", "{out}"],
    "wanda-layer-bf16": ["prune", "{model}", "--method", "wanda", "--ratio", "0.5", "--calib", "{text}",
                         "--sequential", "layer", "--compute-dtype", "bfloat16", "--out", "{out}"],
    "armor": ["prune", "{model}", "--method", "armor", "--pattern", "2:4", "--calib", "{text}", "--option", "iters=5",
              "--out", "{out}"],
    "tinyfusion": ["prune", "{model}", "--method", "tinyfusion", "--layers", "1", "--calib", "{text}",
                   "--learn-steps", "4", "--no-speed", "--out", "{out}"],
    "eval": ["eval", "{model}", "--text", "{text}", "--seqlen", "32", "--tokens", "64"],
    "generate-snapkv": ["generate", "{model}", "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget", "24",
                       "--max-new-tokens", "4"],
    "reason-sample": ["reason", "--model", "{model}", "--questions", "{questions}", "--samples", "2",
                      "--max-new-tokens", "4", "--out", "{out}"],
    "qtune-train": ["data", "qtune", "{model}", "--data", "{sft}", "--samples", "0.5", "--train", "--batch-size", "2",
                    "--out", "{out}"],
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cuda_cli_device_flag(case, model_dir, text_file, tmp_path):
    import json

    from prunekit import cli

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "response": f"It is {i + 1}."}) + "\n"
                           for i in range(8)))
    out = tmp_path / "out"
    values = {"{model}": str(model_dir), "{text}": str(text_file), "{out}": str(out), "{questions}": str(questions),
              "{sft}": str(sft)}
    argv = [values.get(a, a) for a in CLI_CASES[case]]
    extra = ["--samples", "4", "--seqlen", "32"] if argv[0] == "prune" else []
    assert cli.main([*argv, *extra, "--quiet", "--device", "cuda"]) == 0
    if argv[0] == "prune":
        meta = json.loads((out / "prunekit.json").read_text())
        assert meta["device"] == "cuda"
        if case == "tyr-timed":
            assert meta["speed"]["speedup"]["prefill"] > 0
        model, _ = prunekit.load_model(out, device="cuda")
        assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_cuda_cli_dit_depth_pruning(tmp_path):
    """The DiT testbed's depth pruning with --device cuda: scoring, TinyFusion's mask learning, recovery (KD with
    feature matching, and full), the forward timing and the save (Fashion-MNIST from the cache)."""
    import json

    from prunekit.cli import main
    from prunekit.depth import dit as D
    from prunekit.zoo import cache_dir

    if not (cache_dir() / "datasets" / "fashion_mnist.npz").is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    model = D.DiT(D.DiTConfig(hidden=32, depth=4, heads=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights throughout (at init the zero gates make every block trivial)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    src = tmp_path / "dit"
    D.save_dit(model.eval(), src)
    for method, extra in (("sensitivity", ["--recover", "kd", "--recover-steps", "2", "--kd-features", "0.01"]),
                          ("tinyfusion", ["--learn-steps", "4", "--recover", "full", "--recover-steps", "2",
                                          "--no-speed"])):
        out = tmp_path / method
        assert main(["prune", str(src), "--method", method, "--layers", "2", "--samples", "16", "--batch-size", "8",
                     *extra, "--out", str(out), "--quiet", "--device", "cuda"]) == 0
        meta = json.loads((out / "prunekit.json").read_text())
        assert meta["device"] == "cuda" and len(meta["kept_layers"]) == 2
        assert method == "tinyfusion" or meta["speed"]["speedup"] > 0
        small = D.load_dit(out).cuda()
        x = torch.rand(3, 1, 28, 28, device="cuda") * 2 - 1
        with torch.no_grad():
            assert torch.isfinite(small(x, torch.tensor([5, 50, 500], device="cuda"),
                                        torch.tensor([0, 1, 2], device="cuda"))).all()


def test_cuda_cnn_udfc_and_trp_on_a_gpu_resnet():
    """UDFC's data-free compression and TRP's training, decomposition and FLOP count on a ResNet on the GPU."""
    from prunekit import train as tr
    from prunekit.cnn import flops, resnet, trp, udfc

    torch.manual_seed(0)
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1).eval()
    x = torch.randn(8, 1, 28, 28)
    cpu = udfc.compress(model, ratio=0.5, bits=4).model(x)
    gpu = udfc.compress(model.cuda(), ratio=0.5, bits=4).model
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    assert (gpu(x.cuda()).cpu() - cpu).abs().max() <= 1e-3 * cpu.abs().max() + 1e-4
    net = resnet.ResNet(widths=(4, 8, 8), blocks=1).cuda()
    xs, ys = torch.randn(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    cb = trp.TRP(net, period=2, energy=0.8, nuclear=1e-3)
    tr.train(net, xs, ys, epochs=2, batch_size=8, lr=0.05, callbacks=[cb], progress=False)
    cb.on_batch_start(0)
    net.eval()
    with torch.no_grad():
        ref = net(xs[:8])
    before = flops.count_flops(net)
    assert cb.decompose()
    with torch.no_grad():
        assert (net(xs[:8]) - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-4
    assert flops.count_flops(net) < before


def test_cuda_cli_cnn_commands(tmp_path, capsys):
    """``prunekit cnn {trp,udfc,eval} --device cuda``: TRP training with the split timed on the GPU, UDFC with
    --eval, and eval's GPU timing (Fashion-MNIST from the cache)."""
    import json

    from prunekit.cli import main
    from prunekit.cnn import flops, resnet
    from prunekit.zoo import cache_dir

    if not (cache_dir() / "datasets" / "fashion_mnist.npz").is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    trained = tmp_path / "trp"
    assert main(["cnn", "trp", "--out", str(trained), "--examples", "512", "--epochs", "2", "--period", "2",
                 "--split", "faster", "--quiet", "--device", "cuda"]) == 0
    meta = json.loads((trained / "config.json").read_text())["metadata"]
    assert meta["device"] == "cuda" and meta["trp"]["split"] == "faster" and meta["trp"]["ranks"]
    small = tmp_path / "udfc"
    assert main(["cnn", "udfc", str(trained), "--ratio", "0.3", "--bits", "8", "--eval", "--out", str(small),
                 "--device", "cuda"]) == 0
    meta = json.loads((small / "config.json").read_text())["metadata"]
    assert meta["device"] == "cuda" and meta["evaluation"]["after"]["flops"] < meta["evaluation"]["before"]["flops"]
    capsys.readouterr()
    assert main(["cnn", "eval", str(small), "--json", "--device", "cuda"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["device"] == "cuda" and said["ms_per_batch_256"] > 0
    assert said["accuracy"] == pytest.approx(meta["evaluation"]["after"]["accuracy"], abs=0.01)
    model = resnet.load_model(small).cuda()  # a CPU batch is moved to the GPU model and timed to its end
    assert flops.ms_per_batch(model, torch.randn(8, 1, 28, 28), repeats=2, warmup=1) > 0


def test_cuda_cli_data_score_and_train(tmp_path, capsys):
    """``prunekit data score`` (EL2N, forgetting, GraNd, out-of-fold probabilities) and ``data train`` with
    ``--device cuda`` on a small linear task. Added 2026-12-04 after the session's GPU time was spent: checked on the
    CPU only, under a virtual CUDA device that refuses CPU/GPU mixing as CUDA does."""
    import json

    import numpy as np

    from conftest import linear_task
    from prunekit.cli import main

    linear_task(tmp_path)
    data = ["--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    for method in ("el2n", "forgetting", "grand", "probs"):
        out = tmp_path / f"{method}.npy"
        assert main(["data", "score", *data, "--method", method, "--runs", "2", "--epochs", "2", "--folds", "2",
                     "--out", str(out), "--quiet", "--device", "cuda"]) == 0, method
        scores = np.load(out)
        assert len(scores) == 240 and not np.isnan(scores).any(), method  # forgetting: inf = never learned
    capsys.readouterr()
    assert main(["data", "train", *data, "--test-data", str(tmp_path / "xt.npy"), "--test-labels",
                 str(tmp_path / "yt.npy"), "--epochs", "2", "--json", "--quiet", "--device", "cuda"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["device"] == "cuda" and 0 <= got["test_accuracy"] <= 1
