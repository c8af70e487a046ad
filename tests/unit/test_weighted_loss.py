"""The weighted completion loss against hand-built logits and plain cross-entropy."""

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from stillhouse.tasks.training.loss import IGNORE_INDEX, sample_mean_nll, weighted_completion_loss  # noqa: E402

pytestmark = pytest.mark.unit

B, T, V = 3, 7, 11


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).float()
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    # Prompts of different lengths, right padding on the last sample.
    labels[0, :2] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    labels[2, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    return logits, labels


def _manual_sample_means(logits, labels):
    out = []
    for i in range(labels.shape[0]):
        lg, lb = logits[i, :-1], labels[i, 1:]
        keep = lb != IGNORE_INDEX
        out.append(F.cross_entropy(lg[keep], lb[keep]))
    return torch.stack(out)


def test_unit_weights_is_mean_of_per_sample_means():
    logits, labels = _batch()
    loss = weighted_completion_loss(logits, labels, torch.ones(B))
    expected = _manual_sample_means(logits, labels).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert sample_mean_nll(logits, labels) == pytest.approx(_manual_sample_means(logits, labels), rel=1e-6)


def test_single_sample_equals_cross_entropy_times_its_weight():
    logits, labels = _batch()
    one_l, one_y = logits[:1], labels[:1]
    expected = F.cross_entropy(one_l[0, :-1], one_y[0, 1:], ignore_index=IGNORE_INDEX)
    for w in (1.0, 0.3, 5.0, -0.378):
        # A weight's size must reach the loss: the old normaliser (the step's own sum |w|) made a
        # lone sample train the same whatever its weight.
        assert weighted_completion_loss(one_l, one_y, [w]).item() == pytest.approx(w * expected.item(), rel=1e-6)


def test_a_weights_size_scales_the_gradient():
    logits, labels = _batch()
    grads = []
    for w in (-0.378, -1.0, 0.5, 2.0):
        x = logits.clone().requires_grad_(True)
        weighted_completion_loss(x, labels, [w, w, w]).backward()
        grads.append((w, x.grad.clone()))
    (w0, g0) = grads[1]
    for w, g in grads:
        assert torch.allclose(g, g0 * (w / w0), rtol=1e-5, atol=1e-8), w
    # Negative-only steps: -0.378 and -1.0 no longer push equally hard.
    assert grads[0][1].abs().sum() < 0.5 * grads[1][1].abs().sum()


def test_token_reduction_with_unit_weights_is_plain_cross_entropy():
    logits, labels = _batch()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    loss = weighted_completion_loss(logits, labels, torch.ones(B), reduction="tokens")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unshifted_labels():
    logits, labels = _batch()
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    a = weighted_completion_loss(logits, labels, [1.0, 2.0, -0.5])
    b = weighted_completion_loss(logits, shifted, [1.0, 2.0, -0.5], shift=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_weighted_formula_and_zero_weight_contributes_nothing():
    logits, labels = _batch()
    w = torch.tensor([2.0, 0.0, -1.0])
    per = _manual_sample_means(logits, labels)
    expected = (2.0 * per[0] - 1.0 * per[2]) / 3.0
    assert weighted_completion_loss(logits, labels, w).item() == pytest.approx(expected.item(), rel=1e-6)

    # Whatever sample 1's logits are, the loss and the other samples' gradients do not move.
    logits2 = logits.clone()
    logits2[1] = torch.randn(T, V) * 10
    assert weighted_completion_loss(logits2, labels, w).item() == pytest.approx(expected.item(), rel=1e-6)
    x = logits.clone().requires_grad_(True)
    weighted_completion_loss(x, labels, w).backward()
    assert torch.count_nonzero(x.grad[1]) == 0


@pytest.mark.parametrize("reduction", ["samples", "tokens"])
def test_normalizer_makes_accumulation_equal_one_big_batch(reduction):
    logits, labels = _batch()
    w = torch.tensor([1.0, 0.5, -2.0])
    full = weighted_completion_loss(logits, labels, w, reduction=reduction)
    # The step's samples, or its labelled tokens: never its weights.
    total = B if reduction == "samples" else int((labels[:, 1:] != IGNORE_INDEX).sum())
    parts = sum(
        weighted_completion_loss(logits[sl], labels[sl], w[sl], normalizer=total, reduction=reduction)
        for sl in (slice(0, 2), slice(2, 3))
    )
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("case", ["all_masked", "zero_weights"])
def test_degenerate_batch_is_zero_not_nan_with_zero_grad(case):
    logits, labels = _batch()
    w = torch.ones(B)
    if case == "all_masked":
        labels = torch.full_like(labels, IGNORE_INDEX)
    else:
        w = torch.zeros(B)
    x = logits.clone().requires_grad_(True)
    loss = weighted_completion_loss(x, labels, w)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_sample_without_completion_tokens_is_ignored():
    logits, labels = _batch()
    labels[1] = IGNORE_INDEX
    per = _manual_sample_means(logits[[0, 2]], labels[[0, 2]])
    loss = weighted_completion_loss(logits, labels, [1.0, 5.0, 1.0])
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-6)


@pytest.mark.parametrize("negative", ["nll", "unlikelihood"])
def test_negative_weight_gradient_lowers_likelihood(negative):
    logits, labels = _batch()
    lb = labels[:1]
    target_pos = (lb[0, 1:] != IGNORE_INDEX).nonzero()[0, 0].item()
    target = lb[0, target_pos + 1].item()

    def grad_at_target(weight):
        x = logits[:1].clone().requires_grad_(True)
        weighted_completion_loss(x, lb, [weight], negative=negative).backward()
        return x.grad[0, target_pos, target].item()

    # Gradient descent moves logits along -grad: a positive weight raises the target's logit
    # (negative gradient), a negative weight lowers it (positive gradient).
    assert grad_at_target(1.0) < 0
    assert grad_at_target(-1.0) > 0

    # And one descent step on a negative-weight sample raises its NLL.
    x = logits[:1].clone().requires_grad_(True)
    weighted_completion_loss(x, lb, [-1.0], negative=negative).backward()
    before = sample_mean_nll(logits[:1], lb)[0]
    after = sample_mean_nll(logits[:1] - 1.0 * x.grad, lb)[0]
    assert after > before


def test_unlikelihood_is_bounded_and_finite():
    logits, labels = _batch()
    # A sample the model is certain of: p -> 1, -log(1 - p) must stay finite.
    sure = torch.full((1, T, V), -1e4)
    lb = labels[:1].clone()
    for t in range(T - 1):
        if lb[0, t + 1] != IGNORE_INDEX:
            sure[0, t, lb[0, t + 1]] = 1e4
    loss = weighted_completion_loss(sure, lb, [-1.0], negative="unlikelihood")
    assert torch.isfinite(loss) and loss.item() > 0


def test_bad_shapes_and_weights():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="weights"):
        weighted_completion_loss(logits, labels, [1.0, 2.0])
    with pytest.raises(ValueError, match="expected logits"):
        weighted_completion_loss(logits[0], labels, [1.0] * B)
    with pytest.raises(ValueError, match="negative"):
        weighted_completion_loss(logits, labels, [1.0] * B, negative="bogus")


def test_bf16_logits_computed_in_float32():
    logits, labels = _batch()
    a = weighted_completion_loss(logits.bfloat16(), labels, torch.ones(B))
    assert a.dtype == torch.float32
    assert a.item() == pytest.approx(weighted_completion_loss(logits, labels, torch.ones(B)).item(), rel=2e-2)


def test_a_micro_batch_budget_cycles_fresh_epochs():
    from stillhouse.tasks.training.data import plan_micro_batches

    lengths = [5, 9, 3, 7, 2, 8, 6]
    plan = plan_micro_batches(lengths, batch_size=3, epochs=1.0, seed=1, micro_batches=8)
    assert len(plan) == 8
    # Epoch by epoch (3 micro-batches each): every sample exactly once per epoch.
    for e in range(2):
        assert sorted(i for b in plan[3 * e: 3 * e + 3] for i in b) == list(range(7))
    assert plan[:3] == plan_micro_batches(lengths, 3, 1.0, 1)  # the budget's first epoch is epoch 1
    assert plan[:3] != plan[3:6]  # each epoch in its own order
    assert plan == plan_micro_batches(lengths, 3, 5.0, 1, micro_batches=8)  # epochs ignored
