"""The Fashion-MNIST DiT testbed of depth pruning (prunekit.depth.dit) and its classifier FID (prunekit.depth.fid)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from prunekit.depth import dit as D
from prunekit.depth import fid as F
from prunekit.errors import InputError
from prunekit.train import small_cnn

TINY = D.DiTConfig(hidden=32, depth=4, heads=2)


def _random_model(config: D.DiTConfig = TINY, seed: int = 0) -> D.DiT:
    """A DiT whose weights are all random (at init the zero gates make every block, and the output, trivial)."""
    model = D.DiT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [n, 1, 28, 28]


def test_shapes_and_token_count():
    model = _random_model()
    x, t, y = _images(3), torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10])  # 10 = the null class
    assert model(x, t, y).shape == (3, 1, 28, 28)
    assert model.embed(x).shape == (3, TINY.tokens, 32) and TINY.tokens == 49
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 4
    assert D.DiT(D.DiTConfig(hidden=32, depth=2, heads=2, patch=2)).embed(x).shape == (3, 196, 32)
    # unpatchify inverts patchify's token layout: a patch-identity embedding round-trips the image
    p = TINY.patch
    patches = x.unfold(2, p, p).unfold(3, p, p).reshape(3, 7 * 7, p * p)  # [3, 49, 16] row-major patches
    assert torch.equal(model.unpatchify(patches), x)


def test_adaln_zero_blocks_are_identity_at_init():
    model = D.DiT(TINY)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 49, 32, generator=g), torch.randn(2, 32, generator=g)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.count_nonzero(model(_images(2), torch.tensor([3, 4]), torch.tensor([1, 2]))) == 0  # zero final layer
    # and once the gates are not zero, a block changes its input
    assert not torch.allclose(_random_model().blocks[0](x, c), x)


def test_diffusion_loss_is_deterministic_under_the_generator():
    model = _random_model()
    x, y = _images(8), torch.arange(8)
    losses = [float(D.diffusion_loss(model, x, y, generator=torch.Generator().manual_seed(s)).detach())
              for s in (0, 0, 1)]
    assert losses[0] == losses[1] and losses[0] != losses[2] and math.isfinite(losses[0])
    loss = D.diffusion_loss(model, x, y, generator=torch.Generator().manual_seed(0), class_dropout=0.0)
    loss.backward()
    assert model.blocks[0].fc1.weight.grad is not None


def test_ddim_sampling_is_deterministic_under_a_seed():
    model = _random_model()
    labels = torch.tensor([0, 3, 7])
    a = D.sample(model, labels, steps=4, seed=5)
    b = D.sample(model, labels, steps=4, generator=torch.Generator().manual_seed(5))
    c = D.sample(model, labels, steps=4, seed=6)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    guided = D.sample(model, labels, steps=4, seed=5, guidance=3.0)
    assert not torch.equal(a, guided) and torch.equal(guided, D.sample(model, labels, steps=4, seed=5, guidance=3.0))
    assert D._ddim_timesteps(50)[:3] == [0, 20, 40] and D._ddim_timesteps(50)[-1] == 980


def test_removing_blocks_still_runs_and_matches_the_block_by_block_computation():
    model = _random_model()
    x, t, y = _images(2), torch.tensor([10, 900]), torch.tensor([4, 5])
    full = model(x, t, y)
    model.blocks = nn.ModuleList([model.blocks[0], model.blocks[2]])
    short = model(x, t, y)
    assert short.shape == full.shape and not torch.allclose(short, full)
    c, h = model.condition(t, y), model.embed(x)
    for block in model.blocks:
        h = block(h, c)
    assert torch.allclose(short, model.unpatchify(model.final_layer(h, c)))
    assert D.sample(model, y, steps=2, seed=0).shape == (2, 1, 28, 28)


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    assert F.frechet_distance(a, a) < 1e-9
    dists = [F.frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert dists == sorted(dists) and abs(dists[1] - 6.0) < 1e-6  # a mean shift of 1 in 6 dims: 6
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) * 2  # variance 4: (2 - 1)^2 per dim, ~6
    assert 4.0 < F.frechet_distance(a, b) < 8.0


def test_image_fid_and_class_accuracy_with_a_given_classifier():
    torch.manual_seed(0)
    clf = small_cnn().eval()
    real = _images(200)
    assert F.fid(real, real, model=clf) < 1e-6
    near, far = F.fid(real, (real + 0.2).clamp(-1, 1), model=clf), F.fid(real, (real + 0.8).clamp(-1, 1), model=clf)
    assert 0 < near < far
    assert F.features(real, model=clf).shape == (200, 128)
    labels = torch.arange(10).repeat_interleave(20)
    acc = F.class_accuracy(real, labels, model=clf)
    pred = clf(real).argmax(1)
    assert acc["accuracy"] == pytest.approx(float((pred == labels).double().mean()))
    assert acc["per_class"][3] == pytest.approx(float((pred[60:80] == 3).double().mean()))
    assert len(acc["per_class"]) == 10


def test_save_load_and_shortened_model_round_trip(tmp_path):
    model = _random_model()
    x, t, y = _images(2), torch.tensor([1, 2]), torch.tensor([3, 4])
    D.save_dit(model, tmp_path / "full")
    assert torch.equal(D.load_dit(tmp_path / "full")(x, t, y), model(x, t, y))
    model.blocks = nn.ModuleList([model.blocks[1], model.blocks[3]])
    D.save_dit(model, tmp_path / "short")
    again = D.load_dit(tmp_path / "short")
    assert len(again.blocks) == 2 and torch.equal(again(x, t, y), model(x, t, y))
    with pytest.raises(InputError, match="already exists"):
        D.save_dit(model, tmp_path / "short")


def test_weights_fingerprint_follows_the_weights_not_the_config(tmp_path):
    model = _random_model()
    D.save_dit(model, tmp_path / "m")
    assert D.weights_fingerprint(D.load_dit(tmp_path / "m")) == D.weights_fingerprint(model)
    other = _random_model(seed=1)  # same config and cache key, other weights
    assert D.weights_fingerprint(other) != D.weights_fingerprint(model)
    with torch.no_grad():
        model.blocks[2].fc1.weight[0, 0] += 1e-4  # a single float moved
    assert D.weights_fingerprint(model) != D.weights_fingerprint(D.load_dit(tmp_path / "m"))


def test_pretrained_cache_reloads_identical_outputs_without_retraining(tmp_path, monkeypatch):
    from prunekit.zoo import cache_dir

    data = cache_dir() / "datasets" / "fashion_mnist.npz"
    if not data.is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    (tmp_path / "datasets").mkdir()
    shutil.copy(data, tmp_path / "datasets")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    tc = D.TrainConfig(steps=3, batch_size=8, warmup=1)
    cfg = D.DiTConfig(hidden=32, depth=2, heads=2)
    with pytest.raises(InputError, match="train_if_missing"):
        D.pretrained_dit(cfg, tc, train_if_missing=False)
    first = D.pretrained_dit(cfg, tc, seed=3, progress=False)
    assert (tmp_path / "dit" / D.dit_cache_key(cfg, tc, 3) / "model.safetensors").is_file()
    assert first.train_info["seed"] == 3 and len(first.train_info["losses"]) == 1
    monkeypatch.setattr(D, "train_dit", lambda *a, **k: pytest.fail("retrained a cached model"))
    second = D.pretrained_dit(cfg, tc, seed=3)
    x, t, y = _images(2), torch.tensor([5, 6]), torch.tensor([7, 8])
    assert torch.equal(first(x, t, y), second(x, t, y))
    assert D.dit_cache_key(cfg, tc, 3) != D.dit_cache_key(cfg, tc, 4)


def test_bad_inputs_raise_input_error():
    model = _random_model()
    x, t = _images(2), torch.tensor([1, 2])
    with pytest.raises(InputError, match=r"0\.\.10"):
        model(x, t, torch.tensor([0, 11]))
    with pytest.raises(InputError, match=r"\[B, 1, 28, 28\]"):
        model(torch.zeros(2, 3, 28, 28), t, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="one per image"):
        model(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match=r"classes 0\.\.9"):
        D.sample(model, torch.tensor([10]), steps=2)
    with pytest.raises(InputError, match=r"classes 0\.\.9"):
        D.diffusion_loss(model, x, torch.tensor([-1, 0]), generator=torch.Generator())
    with pytest.raises(InputError, match="NaN"):
        D.diffusion_loss(model, torch.full((2, 1, 28, 28), float("nan")), torch.tensor([0, 1]),
                         generator=torch.Generator())
    with pytest.raises(InputError, match=r"\[N, 1, 28, 28\]"):
        D.diffusion_loss(model, torch.zeros(2, 28, 28), torch.tensor([0, 1]), generator=torch.Generator())
    with pytest.raises(InputError, match="generator"):
        D.diffusion_loss(model, x, torch.tensor([0, 1]), generator=0)
    with pytest.raises(InputError, match="null class"):
        D.sample(_random_model(D.DiTConfig(hidden=32, depth=2, heads=2, class_dropout=0.0)), torch.tensor([1]),
                 steps=2, guidance=2.0)
    for bad in (0.0, float("nan"), "1"):
        with pytest.raises(InputError, match="label_init_std"):
            D.DiTConfig(label_init_std=bad)
    rows = D.DiT(D.DiTConfig(hidden=64, depth=1, heads=2)).y_embedder.weight.detach().norm(dim=1)  # std 1: ~sqrt(64)
    assert 6 < float(rows.mean()) < 10
    with pytest.raises(InputError, match="steps"):
        D.sample(model, torch.tensor([1]), steps=0)
    with pytest.raises(InputError, match="NaN"):
        F.fid(x, torch.full((2, 1, 28, 28), float("nan")), model=small_cnn())
    with pytest.raises(InputError, match="heads"):
        D.DiTConfig(hidden=30, heads=4)
    with pytest.raises(InputError, match="patch"):
        D.DiTConfig(patch=3)


class _Oracle(D.DiT):
    """The exact noise predictor of a data set holding one image per class: DDIM must land on that image."""

    def __init__(self, targets: torch.Tensor):
        super().__init__(D.DiTConfig(hidden=8, depth=1, heads=1))
        self.targets = targets  # [K, 1, 28, 28]

    def forward(self, x_t, t, y):
        abar = D._SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        return (x_t - abar.sqrt() * self.targets[y]) / (1 - abar).sqrt()  # [B, 1, 28, 28]


def test_ddim_and_the_loss_agree_with_the_exact_noise_predictor():
    targets = _images(10, seed=3) * 0.9  # [10, 1, 28, 28]
    oracle = _Oracle(targets)
    labels = torch.tensor([2, 7, 7, 0])
    for steps in (1, 10, 50):
        assert torch.allclose(D.sample(oracle, labels, steps=steps, seed=0), targets[labels], atol=1e-3)  # float32 rounding at t = 0
    loss = D.diffusion_loss(oracle, targets[labels], labels, generator=torch.Generator().manual_seed(0),
                            class_dropout=0.0)
    assert float(loss) < 1e-8


def test_cli_prunes_a_dit_folder(tmp_path, capsys):
    """`prunekit prune DIT_FOLDER`: blocks chosen on Fashion-MNIST, recovered, saved as a DiT with its report; the
    input folder is untouched, and bad requests leave nothing behind."""
    import hashlib
    import json

    from prunekit.cli import main
    from prunekit.zoo import cache_dir

    if not (cache_dir() / "datasets" / "fashion_mnist.npz").is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    src = tmp_path / "dit"
    D.save_dit(_random_model(D.DiTConfig(hidden=32, depth=4, heads=2)), src)
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()}
    out = tmp_path / "out"
    for bad in (["--layers", "4"], ["--ratio", "0.5"], ["--eval", "wiki"], ["--calib", "wiki"], [],
                ["--layers", "2", "--eval", "fid", "--no-dense-cache"],  # the flag was accepted and ignored
                ["--layers", "2", "--compute-dtype", "bfloat16"]):  # (a Hugging Face model's scoring runs in it)
        assert main(["prune", str(src), "--method", "shortgpt", *bad, "--out", str(out), "--quiet"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()
    assert main(["prune", str(src), "--method", "sensitivity", "--layers", "2", "--samples", "16", "--batch-size",
                 "8", "--recover", "kd", "--recover-steps", "2", "--kd-features", "0.01", "--out", str(out),
                 "--quiet"]) == 0
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()} == digest
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["kind"] == "dit" and len(meta["kept_layers"]) == 2 and meta["recovery"]["steps"] == 2
    assert meta["recovery"]["distilled"] and meta["recovery"]["features"] == 0.01
    assert 0 < meta["seconds"] + meta["recovery"]["seconds"] < meta["wall_seconds"]  # the selection's time
    assert meta["speed"]["speedup"] > 0 and "speedup" in (out / "report.md").read_text()
    assert len(meta["method_info"]["loss_without_block"]) == meta["dense_layers"]
    assert (out / "blocks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    small = D.load_dit(out)
    assert len(small.blocks) == 2
    x, t, y = _images(3), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])
    assert torch.isfinite(small(x, t, y)).all()
    assert main(["prune", str(src), "--method", "every-other", "--layers", "2", "--out", str(out), "--quiet"]) == 2
    assert main(["prune", str(src), "--method", "every-other", "--layers", "2", "--no-speed", "--overwrite",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "prunekit.json").read_text())["kept_layers"] == [0, 3]
    broken = tmp_path / "broken"  # NaN weights, then a truncated weights file: one-line errors, nothing written
    nan_model = _random_model(D.DiTConfig(hidden=32, depth=4, heads=2))
    with torch.no_grad():
        nan_model.blocks[1].fc1.weight[0, 0] = float("nan")
    D.save_dit(nan_model, broken)
    out2 = tmp_path / "out2"
    capsys.readouterr()
    assert main(["prune", str(broken), "--method", "shortgpt", "--layers", "2", "--out", str(out2), "--quiet"]) == 2
    assert "NaN" in capsys.readouterr().err and not out2.exists()
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["prune", str(broken), "--method", "shortgpt", "--layers", "2", "--out", str(out2), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "save_dit" in err and len(err.splitlines()) == 1 and not out2.exists()


@pytest.mark.parametrize("ratio", [math.inf, math.nan, 0, -1.0])
def test_dit_config_refuses_a_non_finite_mlp_ratio(ratio):
    # an infinite mlp_ratio (a hand-edited config.json) was an OverflowError in int(hidden * mlp_ratio)
    with pytest.raises(InputError, match="mlp_ratio must be a positive number"):
        D.DiTConfig(hidden=32, depth=2, heads=2, mlp_ratio=ratio)


def test_an_interrupt_inside_distillation_leaves_no_hook_on_either_model():
    from prunekit.depth import recover
    from prunekit.depth.core import drop_blocks

    cfg = D.DiTConfig(hidden=32, depth=4, heads=2, patch=7)
    torch.manual_seed(0)
    teacher, student = D.DiT(cfg), D.DiT(cfg)
    keep = [True, False, True, True]
    drop_blocks(student.blocks, keep)
    target = D.depth_target(student, torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8) % 10, batch_size=4)
    for model in (student, teacher):
        calls = []

        def stop(_m, _a):
            calls.append(1)
            if len(calls) == 3:  # inside a later step's distillation forward of that model
                raise KeyboardInterrupt

        handle = model.blocks[0].register_forward_pre_hook(stop)
        with pytest.raises(KeyboardInterrupt):
            recover(target, steps=3, trainable="full", teacher=(teacher, teacher.blocks))
        handle.remove()
        assert not student._forward_hooks and not teacher._forward_hooks


def test_cli_dit_refuses_to_overwrite_a_foreign_folder_before_loading(tmp_path, capsys, monkeypatch):
    from prunekit.cli import main

    src = tmp_path / "dit"
    D.save_dit(_random_model(D.DiTConfig(hidden=32, depth=4, heads=2)), src)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    monkeypatch.setattr(D, "load_dit", lambda *a, **k: pytest.fail("the DiT was loaded before --out was checked"))
    assert main(["prune", str(src), "--method", "shortgpt", "--layers", "2", "--overwrite", "--out", str(mine),
                 "--quiet"]) == 2
    assert "that no prunekit command wrote" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_evaluate_dit_hands_its_progress_switch_to_the_classifier(monkeypatch):
    # `prune DIT --eval fid --quiet` trained the FID classifier on first use with its bar on: 1,740 redraws in a log
    asked = []
    judge = small_cnn(num_classes=10)

    def classifier(*, train_if_missing=True, progress=True):
        asked.append(progress)
        return judge.eval()

    monkeypatch.setattr(F, "classifier", classifier)
    out = D.evaluate_dit(_random_model(), n_per_class=1, steps=2, real=_images(4), progress=False)
    assert asked == [False] and out["n"] == 10 and math.isfinite(out["fid"])
