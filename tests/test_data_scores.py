"""Data scores on toy problems whose answer is known: hand formulas, closed-form gradients, scripted histories."""

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import prunekit.data.methods.el2n as el2n_mod
import prunekit.data.methods.forgetting as forgetting_mod
import prunekit.data.methods.grand as grand_mod
import prunekit.data.methods.prototypes as prototypes_mod
import prunekit.train as train_mod
from prunekit.data.methods.el2n import el2n
from prunekit.data.methods.forgetting import ForgettingTracker, forgetting_counts
from prunekit.data.methods.grand import grand, grand_last_layer
from prunekit.data.methods.prototypes import kmeans, prototype_distance
from prunekit.errors import InputError
from prunekit.train import accuracy, cross_val_probs, embed, mlp, score_runs, small_cnn, train


@pytest.mark.parametrize("module", [el2n_mod, grand_mod, forgetting_mod, prototypes_mod, train_mod])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, verbose=False)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------------------------------------------- EL2N


def _hand_el2n(logits, label):
    exps = [math.exp(v) for v in logits]
    p = [e / sum(exps) for e in exps]
    return math.sqrt(sum((pi - (1.0 if i == label else 0.0)) ** 2 for i, pi in enumerate(p)))


def test_el2n_matches_hand_computation_and_averages_runs():
    logits = np.array([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], [[0.5, 1.5, 0.0], [3.0, -2.0, 1.0]]])  # [R=2, N=2, K=3]
    labels = np.array([0, 2])
    expected = [np.mean([_hand_el2n(logits[r, i], labels[i]) for r in range(2)]) for i in range(2)]
    got = el2n(logits, labels)
    assert got.dtype == np.float64 and got.shape == (2,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(el2n(logits[0], labels), [_hand_el2n(logits[0, i], labels[i]) for i in range(2)])
    np.testing.assert_allclose(el2n(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)), expected,
                               rtol=1e-6)


def test_el2n_from_probabilities():
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(el2n(probs, [0, 2], from_logits=False), [math.sqrt(0.09 + 0.04 + 0.01), 0.0])
    with pytest.raises(InputError, match="sum"):
        el2n(np.array([[0.5, 0.2, 0.1]]), [0], from_logits=False)
    assert el2n(np.array([[0.5, 0.5005]]), [0], from_logits=False).shape == (1,)  # within 1e-3


@pytest.mark.parametrize("outputs,labels,match", [
    (np.array([[1.0, np.nan]]), [0], "NaN"),
    (np.array([[1.0, np.inf]]), [0], "infinite"),
    (np.zeros((2, 3)), [0, 3], "class 3"),
    (np.zeros((2, 3)), [0, -1], "negative"),
    (np.zeros((2, 3)), [0], "shape"),
    (np.zeros((2, 3)), [0.0, 1.0], "integer"),
    (np.zeros((0, 3)), [], "empty"),
    (np.zeros(3), [0], "2-D or 3-D"),
])
def test_el2n_rejects_bad_input(outputs, labels, match):
    with pytest.raises(InputError, match=match):
        el2n(outputs, np.asarray(labels))


# --------------------------------------------------------------------------------------------------- GraNd


def _toy(n=12, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def test_grand_linear_equals_closed_form():
    x, y = _toy()
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)  # [N, K]
    g = p - nn.functional.one_hot(y, 3).double()  # dL/dz
    # dL/dW = g x^T and dL/db = g, so the norm is |g| sqrt(|x|^2 + 1)
    expected = g.norm(dim=1) * (x.double().pow(2).sum(1) + 1).sqrt()
    np.testing.assert_allclose(grand(model, x, y, batch_size=5), expected.numpy(), rtol=1e-5)


def test_grand_equals_one_example_at_a_time_autograd_and_averages_models():
    x, y = _toy(n=7)
    models = []
    for s in (0, 1):
        torch.manual_seed(s)
        models.append(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))

    def loop(model):
        out = []
        for i in range(len(x)):
            loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            out.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        return np.array(out)

    np.testing.assert_allclose(grand(models[0], x, y, batch_size=3), loop(models[0]), rtol=1e-5)
    np.testing.assert_allclose(grand(models, x, y), (loop(models[0]) + loop(models[1])) / 2, rtol=1e-5)


def test_grand_restores_mode_and_leaves_weights():
    x, y = _toy()
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    before = [p.clone() for p in model.parameters()]
    a = grand(model, x, y)
    assert model.training
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    np.testing.assert_array_equal(a, grand(model, x, y))  # eval mode: dropout off, so repeatable


def test_last_layer_grand_equals_exact_for_a_single_linear_layer():
    x, y = _toy(n=20, d=5, k=4)
    model = nn.Linear(5, 4)
    with torch.no_grad():
        logits = model(x)
    np.testing.assert_allclose(grand_last_layer(logits, x, y), grand(model, x, y), rtol=1e-5)
    no_bias = nn.Linear(5, 4, bias=False)
    with torch.no_grad():
        logits = no_bias(x)
    np.testing.assert_allclose(grand_last_layer(logits, x, y, bias=False), grand(no_bias, x, y), rtol=1e-5)
    stacked = grand_last_layer(torch.stack([logits, logits]), torch.stack([x, x]), y, bias=False)  # [R=2, ...]
    np.testing.assert_allclose(stacked, grand(no_bias, x, y), rtol=1e-5)


def test_grand_rejects_bad_input():
    x, y = _toy()
    model = nn.Linear(4, 3)
    with pytest.raises(InputError, match="K=3"):
        grand(model, x, torch.full((12,), 3))
    with pytest.raises(InputError, match="floating"):
        grand(model, x.long(), y)
    with pytest.raises(InputError, match="Module"):
        grand([], x, y)
    with pytest.raises(InputError, match="batch_size"):
        grand(model, x, y, batch_size=0)
    with pytest.raises(InputError, match="NaN"):
        grand(model, x.clone().fill_(float("nan")), y)
    with pytest.raises(InputError, match="agree"):
        grand_last_layer(torch.zeros(3, 2), torch.zeros(4, 5), [0, 1, 0])


# ---------------------------------------------------------------------------------------------- forgetting


def test_forgetting_counts_scripted_history():
    correct = np.array([  # [T=5, N=5]
        [1, 0, 0, 1, 0],
        [0, 0, 1, 1, 0],
        [1, 0, 0, 1, 0],
        [0, 0, 1, 0, 0],
        [1, 0, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(forgetting_counts(correct), [2, np.inf, 1, 1, 0])
    np.testing.assert_array_equal(forgetting_counts(correct.astype(int)), [2, np.inf, 1, 1, 0])


def test_tracker_equals_function_on_shuffled_minibatches():
    rng = np.random.default_rng(0)
    t, n = 9, 50
    correct = rng.random((t, n)) < np.linspace(0.0, 0.9, n)  # example 0 is never learned
    tracker = ForgettingTracker(n)
    for row in correct:
        order = rng.permutation(n)
        for batch in np.array_split(order, 7):
            tracker.update(torch.from_numpy(batch), torch.from_numpy(row[batch]))
    expected = forgetting_counts(correct)
    np.testing.assert_array_equal(tracker.scores(), expected)
    assert expected[0] == np.inf


def test_forgetting_rejects_bad_input():
    with pytest.raises(InputError, match="booleans"):
        forgetting_counts(np.array([[0, 2]]))
    with pytest.raises(InputError, match="2-D"):
        forgetting_counts(np.array([True, False]))
    with pytest.raises(InputError, match="empty"):
        forgetting_counts(np.zeros((0, 3), dtype=bool))
    tracker = ForgettingTracker(3)
    with pytest.raises(InputError, match="repeat"):
        tracker.update([0, 0], [True, False])
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        tracker.update([3], [True])
    with pytest.raises(InputError, match="equal in size"):
        tracker.update([0, 1], [True])
    with pytest.raises(InputError, match="positive"):
        ForgettingTracker(0)


# ---------------------------------------------------------------------------------------------- prototypes


def _clusters(seed=0, per=30, outliers=3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(4) * 3  # four directions in 4-D
    tight = torch.cat([c + 0.1 * torch.randn(per, 4, generator=g) for c in centres])  # [4*per, 4]
    odd = torch.ones(outliers, 4) + 0.05 * torch.randn(outliers, 4, generator=g)  # halfway between all of them
    return torch.cat([tight, odd]), torch.arange(4).repeat_interleave(per)


def test_kmeans_finds_planted_clusters():
    emb, labels = _clusters(outliers=0)
    for cosine in (True, False):
        centroids, assign = kmeans(emb, 4, seed=0, cosine=cosine)
        assert centroids.shape == (4, 4) and assign.dtype == np.int64
        for c in range(4):  # every planted cluster maps to one k-means cluster, and they differ
            assert len(set(assign[labels.numpy() == c])) == 1
        assert len(set(assign)) == 4
    a = kmeans(emb, 4, seed=3)
    b = kmeans(emb, 4, seed=3)
    np.testing.assert_array_equal(a[1], b[1])


def test_prototype_distance_ranks_planted_outliers_last():
    emb, _ = _clusters()
    n = len(emb)
    for kwargs in ({}, {"cosine": False}):
        d = prototype_distance(emb, k=4, **kwargs)
        assert d.dtype == np.float64 and d.shape == (n,)
        assert set(np.argsort(d)[-3:]) == {n - 3, n - 2, n - 1}
    cos = prototype_distance(emb, k=4)
    assert cos.min() >= 0 and cos.max() <= 2


def test_supervised_prototypes_measure_against_own_class():
    emb, labels = _clusters(outliers=0)
    mislabeled = labels.clone()
    mislabeled[0] = 1  # a class-0 point labelled 1 lies far from class 1's centroid
    d = prototype_distance(emb, k=1, labels=mislabeled)
    assert int(np.argmax(d)) == 0
    assert prototype_distance(emb, k=1, labels=labels).max() < 0.05


def test_prototypes_reject_bad_input():
    emb, _ = _clusters(outliers=0)
    with pytest.raises(InputError, match="k=500"):
        prototype_distance(emb, k=500)
    with pytest.raises(InputError, match="all zeros"):
        prototype_distance(torch.zeros(5, 3), k=2)
    with pytest.raises(InputError, match="NaN"):
        kmeans(np.array([[np.nan, 1.0], [0.0, 1.0]]), 1)
    with pytest.raises(InputError, match="empty"):
        prototype_distance(np.zeros((0, 3)), k=1)
    with pytest.raises(InputError, match="labels"):
        prototype_distance(emb, k=2, labels=np.zeros(3, dtype=int))
    with pytest.raises(InputError, match="k must"):
        kmeans(emb, 0)


def test_prototypes_take_read_only_memory_maps_without_warning(tmp_path):
    # a float64 .npy mapped read-only gave torch's "The given NumPy array is not writable" UserWarning
    emb = np.random.default_rng(0).normal(size=(12, 3))
    np.save(tmp_path / "emb.npy", emb)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = prototype_distance(mapped, k=2)
        kmeans(mapped, 2)
    assert np.array_equal(got, prototype_distance(emb, k=2))
    assert not mapped.flags.writeable and np.array_equal(np.asarray(mapped), emb)


# ----------------------------------------------------------------------------------------------- training


def _blobs(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])[y]
    return x, y


def test_train_is_deterministic_and_counts_steps():
    x, y = _blobs()
    steps = []
    torch.manual_seed(0)
    a = train(mlp(2, 3), x, y, epochs=2, batch_size=16, lr=0.1, seed=5, progress=False,
              on_step=lambda info: steps.append((info.epoch, info.step, len(info.indices))))
    assert [s[1] for s in steps] == list(range(8)) and [s[0] for s in steps] == [0] * 4 + [1] * 4
    assert [s[2] for s in steps[:4]] == [16, 16, 16, 12]
    torch.manual_seed(0)
    b = train(mlp(2, 3), x, y, epochs=2, batch_size=16, lr=0.1, seed=5, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    epochs = []
    train(mlp(2, 3), x, y, steps=10, batch_size=16, lr=0.1, progress=False, on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [1, 2]  # 10 steps = two full passes of 4 and a partial third
    with pytest.raises(InputError, match="exactly one"):
        train(mlp(2, 3), x, y, epochs=1, steps=3)
    with pytest.raises(InputError, match="integer class"):  # whole-number floats (2.0) are class indices
        train(mlp(2, 3), x, y.float() + 0.5, epochs=1)


def test_training_refuses_nan_inputs_labels_past_the_outputs_and_a_model_for_a_factory_before_training():
    """A NaN pixel trained NaN weights (train) or gave NaN probabilities (cross_val_probs) silently; a label
    past the model's outputs was a raw IndexError from cross-entropy; a model passed as model_fn a TypeError."""
    x, y = _blobs(n=24)
    nan_x = x.clone()
    nan_x[3, 1] = float("nan")
    high = y.clone()
    high[0] = 3  # a 3-class model
    calls = {
        "train": lambda xs, ys: train(mlp(2, 3), xs, ys, epochs=1, progress=False),
        "cross_val_probs": lambda xs, ys: cross_val_probs(lambda: mlp(2, 3), xs, ys, folds=2, epochs=1, progress=False),
        "score_runs": lambda xs, ys: score_runs(lambda: mlp(2, 3), xs, ys, runs=1, epochs=1, progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(InputError, match=r"x holds NaN or Inf values in 1 example\(s\)"):
            call(nan_x, y)
        with pytest.raises(InputError, match=r"y has class 3 but the model has only K=3 outputs"):
            call(x, high)
    model = mlp(2, 3)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(InputError, match="y has class 3"):
        train(model, x, high, epochs=1, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters())) and model.training
    for call in (lambda: cross_val_probs(mlp(2, 3), x, y, folds=2, epochs=1, progress=False),
                 lambda: score_runs(mlp(2, 3), x, y, runs=1, epochs=1, progress=False)):
        with pytest.raises(InputError, match="model_fn must be a function that builds a fresh model.*got a model"):
            call()


def test_small_cnn_shapes_and_embed_checks_last_linear():
    model = small_cnn(num_classes=7, channels=3)
    logits, emb = embed(model, torch.zeros(5, 3, 28, 28), batch_size=2)
    assert logits.shape == (5, 7) and emb.shape == (5, 128)
    with pytest.raises(InputError, match="last nn.Linear"):
        embed(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid()), torch.zeros(4, 2))


def test_score_runs_agree_with_the_score_functions():
    x, y = _blobs(n=48)
    s = score_runs(lambda: nn.Linear(2, 3), x, y, runs=2, epochs=3, score_epoch=3, batch_size=16, lr=0.1,
                   exact_grand=True, progress=False)
    assert s.logits.shape == (2, 48, 3) and len(s.models) == 2
    np.testing.assert_allclose(s.el2n, el2n(s.logits, y), rtol=1e-6)
    np.testing.assert_allclose(s.grand, grand(s.models, x, y), rtol=1e-6)  # scored after the last epoch
    np.testing.assert_allclose(s.grand_last_layer, s.grand, rtol=1e-4)  # one Linear: the two agree
    again = score_runs(lambda: nn.Linear(2, 3), x, y, runs=2, epochs=3, score_epoch=3, batch_size=16, lr=0.1,
                       progress=False)
    np.testing.assert_array_equal(again.el2n, s.el2n)
    assert again.grand is None


def test_score_runs_forgetting_equals_the_recorded_history():
    x, y = _blobs(n=40)
    y = y.clone()
    y[:8] = (y[:8] + 1) % 3  # noisy labels get forgotten and relearned
    model_fn = lambda: mlp(2, 3, hidden=4)  # noqa: E731
    s = score_runs(model_fn, x, y, runs=1, epochs=6, score_epoch=1, seed=3, batch_size=8, lr=0.2, progress=False)
    history = np.zeros((6, 40), dtype=bool)  # replay run 0: same init seed, same shuffle seed

    def record(info):
        history[info.epoch, info.indices.numpy()] = (info.logits.argmax(1) == info.labels).numpy()

    torch.manual_seed(3)
    train(model_fn(), x, y, epochs=6, batch_size=8, lr=0.2, seed=3, on_step=record, progress=False)
    np.testing.assert_array_equal(s.forgetting, forgetting_counts(history))


def test_cross_val_probs_are_out_of_fold():
    # One-hot inputs into a zero-initialized Linear: a weight row moves only if its example is trained on, so an
    # example's prediction stays exactly uniform unless its own model saw it.
    n, k = 30, 3
    x, y = torch.eye(n), torch.arange(n) % k

    def model_fn():
        m = nn.Linear(n, k, bias=False)
        nn.init.zeros_(m.weight)
        return m

    probs = cross_val_probs(model_fn, x, y, folds=3, epochs=5, lr=0.5, batch_size=4, progress=False)
    assert probs.dtype == np.float32 and probs.shape == (n, k)
    np.testing.assert_allclose(probs, 1.0 / k, atol=1e-7)
    seen = torch.softmax(train(model_fn(), x, y, epochs=5, lr=0.5, batch_size=4, progress=False)(x), 1)
    assert (seen.detach().max(1).values > 0.5).all()  # in-sample predictions would not be uniform


def test_cross_val_probs_predict_held_out_examples():
    x, y = _blobs(n=60)
    probs = cross_val_probs(lambda: mlp(2, 3), x, y, folds=4, epochs=8, lr=0.1, batch_size=8, progress=False)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs.argmax(1) == y.numpy()).mean() > 0.9
    with pytest.raises(InputError, match="folds"):
        cross_val_probs(lambda: mlp(2, 3), x, y, folds=1, epochs=1)


def test_softmax_takes_lists_and_refuses_text():
    assert np.allclose(el2n_mod.softmax([[1.0, 2.0]]), el2n_mod.softmax(np.array([[1.0, 2.0]])))
    with pytest.raises(InputError, match="logits"):
        el2n_mod.softmax([["a", "b"]])
    # a masked class (-inf) has probability 0; the check was backwards: -inf refused, +inf gave [nan, nan]
    assert el2n_mod.softmax([[0.0, -np.inf, 0.0]]).tolist() == [[0.5, 0.0, 0.5]]
    with pytest.raises(InputError, match=r"logits has 1 \+inf values"):
        el2n_mod.softmax([[np.inf, 0.0]])
    with pytest.raises(InputError, match="every value is -inf"):
        el2n_mod.softmax([[0.0, 1.0], [-np.inf, -np.inf]])


@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_prototypes_handle_values_whose_squares_overflow_or_underflow(factor):
    emb = np.array([[1.0, 0.0], [1.1, 0.1], [0.0, 5.0], [0.1, 5.2]])
    want = prototype_distance(emb, k=2, cosine=False)
    got = prototype_distance(emb * factor, k=2, cosine=False)
    assert np.all(np.isfinite(got)) and np.allclose(got, want * factor, rtol=1e-9)
    assert np.allclose(prototype_distance(emb * factor, k=2), prototype_distance(emb, k=2), atol=1e-12)
    centroids, assign = kmeans(emb * factor, 2, cosine=False)
    assert np.array_equal(assign, kmeans(emb, 2, cosine=False)[1]) and np.allclose(centroids / factor,
                                                                                     kmeans(emb, 2, cosine=False)[0])


def test_prototype_seed_must_fit_the_generator():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for f in (lambda s: prototype_distance(emb, k=2, seed=s), lambda s: kmeans(emb, 2, seed=s)):
        with pytest.raises(InputError, match="seed"):
            f(2**64)


def _manual_sgd(params, grads_fn, *, lrs, momentum, wd, nesterov):
    params, bufs = list(params), [None] * len(params)
    for step, lr in enumerate(lrs):
        grads = grads_fn(params)
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + wd * p
            if momentum:
                bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
                g = g + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = p - lr * g
    return params


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_train_is_sgd_with_nesterov_momentum_and_cosine_decay(momentum):
    """train(): "SGD with Nesterov momentum; the learning rate decays from lr to 0 on a cosine over all steps"
    (momentum 0: plain SGD). Full-batch steps, so the shuffle order does not matter."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    start = [p.detach().clone() for p in model.parameters()]
    steps, lr, wd = 3, 0.5, 0.01
    train(model, x, y, steps=steps, batch_size=16, lr=lr, momentum=momentum, weight_decay=wd, progress=False)

    def grads_fn(params):
        wt, bias = [p.detach().clone().requires_grad_(True) for p in params]
        loss = nn.functional.cross_entropy(x @ wt.T + bias, y)
        return torch.autograd.grad(loss, [wt, bias])

    lrs = [lr * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    want = _manual_sgd(start, grads_fn, lrs=lrs, momentum=momentum, wd=wd, nesterov=momentum > 0)
    for got, w in zip(model.parameters(), want):
        assert torch.allclose(got.detach(), w, atol=1e-6)
    if momentum:  # the case tells Nesterov from heavy-ball momentum
        heavy = _manual_sgd(start, grads_fn, lrs=lrs, momentum=momentum, wd=wd, nesterov=False)
        assert not torch.allclose(heavy[0], want[0], atol=1e-4)


def test_el2n_alone_stops_training_at_its_epoch_with_the_same_scores():
    """`data score --method el2n` trained all --epochs (10 by default) for a score taken after the first."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    forwards = []

    def model_fn():
        model = mlp(4, 2)
        model.register_forward_hook(lambda *_: forwards.append(1))
        return model

    full = score_runs(model_fn, x, y, runs=2, epochs=6, score_epoch=2, batch_size=16, progress=False)
    n_full = len(forwards)
    forwards.clear()
    early = score_runs(model_fn, x, y, runs=2, epochs=6, score_epoch=2, batch_size=16, forgetting=False,
                       progress=False)
    assert np.array_equal(early.el2n, full.el2n) and np.array_equal(early.logits, full.logits)
    assert np.array_equal(early.grand_last_layer, full.grand_last_layer) and early.forgetting is None
    assert len(forwards) < n_full / 2  # 2 of the 6 epochs' steps (and the same scoring passes)


def test_el2n_refuses_probabilities_taken_for_logits():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    with pytest.raises(InputError, match="look like probabilities.*from_logits=False"):
        el2n(probs, [0, 2])
    np.testing.assert_allclose(el2n(probs, [0, 2], from_logits=False), [math.sqrt(0.09 + 0.04 + 0.01), math.sqrt(0.06)])
    assert el2n(probs, [0, 2], from_logits=True).shape == (2,)  # said explicitly: softmaxed as logits
    assert el2n(np.log(probs), [0, 2]).shape == (2,)  # logits: no question


def test_training_takes_numpy_inputs_and_whole_number_float_labels():
    """x from numpy and labels such as 2.0 (as the label-issue functions take them) were refused."""
    x, y = _blobs(n=60)
    want = cross_val_probs(lambda: mlp(2, 3), x, y, folds=3, epochs=2, lr=0.1, batch_size=8, progress=False)
    got = cross_val_probs(lambda: mlp(2, 3), x.numpy(), y.numpy().astype(np.float64), folds=3, epochs=2, lr=0.1,
                          batch_size=8, progress=False)
    np.testing.assert_array_equal(got, want)
    model = train(mlp(2, 3), x.numpy()[::-1], y.numpy()[::-1], epochs=1, progress=False)  # a reversed view
    assert accuracy(model, x.numpy(), y.numpy()) == accuracy(model, x, y)  # predict / accuracy / embed too
    assert torch.equal(embed(model, x.numpy())[1], embed(model, x)[1])
    for bad_x, bad_y, match in ((x.numpy().astype(np.uint8), y, "divide by 255"), (x, y + 0.5, "integer class")):
        with pytest.raises(InputError, match=match):
            cross_val_probs(lambda: mlp(2, 3), bad_x, bad_y, folds=3, epochs=1, progress=False)
