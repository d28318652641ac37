"""The KD loss library against NumPy formulas written out by hand on small fixed tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpmkd.distill_batch import DistillBatch, ModelTaps, TeacherOutputs
from hpmkd.features import FeatureTaps
from hpmkd.losses import LOSSES, combine_teachers, teacher_kl
from hpmkd.losses.crd import contrast_per_sample
from hpmkd.losses.dkd import dkd_terms
from hpmkd.losses.hierarchical import fused_mask, spatial_attention, top_k_mask
from hpmkd.losses.layers import layer_pairs, resolve_layer
from hpmkd.registry import ConfigError

STUDENT_TAPS = ModelTaps(feature_taps=("s1", "s2", "s3"), embedding_tap="emb", classifier_tap="fc")
TEACHER_TAPS = ModelTaps(feature_taps=("t0", "t1", "t2", "t3"), embedding_tap="temb", classifier_tap="head")

ZS = np.array([[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 2.5, 0.0], [-1.0, 0.0, 1.0, 3.0]])
ZT = np.array([[2.0, 1.0, 0.0, -2.0], [0.0, 0.5, 3.0, -0.5], [1.0, -1.0, 0.5, 2.0]])
ZT2 = np.array([[0.5, 3.0, -1.0, 0.0], [1.5, 0.0, 0.5, 1.0], [-2.0, 0.0, 2.0, 1.0]])
Y = np.array([0, 2, 3])
W2 = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])


# ---------------------------------------------------------------------------------------------- NumPy references
def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_kl(p, q):
    """Σ_c p (log p − log q), with 0 · log 0 = 0."""
    on = p > 0
    return np.where(on, p * (np.log(np.where(on, p, 1.0)) - np.log(np.where(on, q, 1.0))), 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------- helpers
def t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def make_batch(student_logits, teacher_logits, *, y=Y, weights=None, mix="logits", T=4.0, student_features=None,
               teacher_features=None, index=None, epoch=0, reference_logits=None):
    teacher_logits = teacher_logits if isinstance(teacher_logits, torch.Tensor) else t(teacher_logits)
    m, b = teacher_logits.shape[:2]
    weights = torch.full((b, m), 1.0 / m) if weights is None else t(weights)
    return DistillBatch(
        x=torch.zeros(b, 1),
        y=torch.as_tensor(y),
        index=torch.arange(b) if index is None else index,
        student_logits=student_logits,
        student_features=student_features or {},
        teachers=TeacherOutputs(teacher_logits, teacher_features or [{} for _ in range(m)]),
        teacher_weights=weights,
        mix=mix,
        temperature=T if isinstance(T, torch.Tensor) else torch.tensor(T),
        epoch=epoch,
        reference_logits=reference_logits,
    )


def build(name, num_teachers=1, num_train=100, num_classes=4, **options):
    return LOSSES.build(
        name,
        options,
        num_classes=num_classes,
        num_teachers=num_teachers,
        num_train=num_train,
        student_taps=STUDENT_TAPS,
        teacher_taps=[TEACHER_TAPS] * num_teachers,
    )


def test_registered_losses():
    assert set(LOSSES.names()) == {"kd", "dkd", "fitnet", "at", "rkd", "pkt", "crd", "hierarchical", "reference",
                                   "mtbkd_prior"}
    assert LOSSES.get("kd").uses_temperature and LOSSES.get("dkd").uses_temperature
    others = ("fitnet", "at", "rkd", "pkt", "crd", "hierarchical", "reference", "mtbkd_prior")
    assert not any(LOSSES.get(n).uses_temperature for n in others)


def test_yaml_options_are_validated_against_the_signature():
    with pytest.raises(ConfigError, match="betta.*Did you mean 'beta'"):
        LOSSES.check_options("dkd", {"betta": 8}, "distill.methods.dkd")
    with pytest.raises(ConfigError, match="Allowed: .*nce_k"):
        LOSSES.check_options("crd", {"num_train": 5}, "distill.methods.crd")
    LOSSES.check_options("crd", {"nce_k": 16384, "feat_dim": 64}, "distill.methods.crd")


# ---------------------------------------------------------------------------------------------- KD
def test_kd_matches_hinton_formula():
    T = 4.0
    expected = (T**2 * np_kl(np_softmax(ZT / T), np_softmax(ZS / T))).mean()
    out = build("kd")(make_batch(t(ZS), [ZT], T=T))
    assert set(out) == {"kd"}
    np.testing.assert_allclose(out["kd"].item(), expected, rtol=1e-5)


def test_kd_is_zero_for_equal_logits():
    out = build("kd")(make_batch(t(ZT), [ZT]))
    assert abs(out["kd"].item()) < 1e-6


def test_kd_gradient_is_temperature_times_probability_gap():
    T, B = 3.0, ZS.shape[0]
    zs = t(ZS, grad=True)
    build("kd")(make_batch(zs, [ZT], T=T))["kd"].backward()
    expected = T * (np_softmax(ZS / T) - np_softmax(ZT / T)) / B  # T² · (p_S − p_T)/T / B
    np.testing.assert_allclose(zs.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_kd_keeps_the_graph_to_a_learned_temperature():
    T = torch.tensor(2.5, requires_grad=True)
    build("kd")(make_batch(t(ZS), [ZT], T=T))["kd"].backward()

    def np_kd(temp):
        return (temp**2 * np_kl(np_softmax(ZT / temp), np_softmax(ZS / temp))).mean()

    h = 1e-4
    np.testing.assert_allclose(T.grad.item(), (np_kd(2.5 + h) - np_kd(2.5 - h)) / (2 * h), rtol=1e-3)


# ---------------------------------------------------------------------------------------------- teacher_kl mixes
@pytest.mark.parametrize("mix", ["logits", "probs", "loss"])
def test_teacher_kl_mixes_two_teachers_with_per_sample_weights(mix):
    T = 2.0
    q = np_softmax(ZS / T)
    w0, w1 = W2[:, :1], W2[:, 1:]
    if mix == "logits":
        expected = np_kl(np_softmax((w0 * ZT + w1 * ZT2) / T), q)
    elif mix == "probs":
        expected = np_kl(w0 * np_softmax(ZT / T) + w1 * np_softmax(ZT2 / T), q)
    else:
        expected = W2[:, 0] * np_kl(np_softmax(ZT / T), q) + W2[:, 1] * np_kl(np_softmax(ZT2 / T), q)
    got = teacher_kl(t(ZS), t([ZT, ZT2]), t(W2), mix, T)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), T**2 * expected, rtol=1e-5)


def test_teacher_kl_mixes_differ_and_rejects_bad_weights():
    values = [teacher_kl(t(ZS), t([ZT, ZT2]), t(W2), mix, 2.0) for mix in ("logits", "probs", "loss")]
    assert not torch.allclose(values[0], values[1]) and not torch.allclose(values[1], values[2])
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        teacher_kl(t(ZS), t([ZT, ZT2]), t(W2.T), "logits", 2.0)
    with pytest.raises(ConfigError, match="unknown teacher mix"):
        teacher_kl(t(ZS), t([ZT, ZT2]), t(W2), "prob", 2.0)


def test_kd_with_two_teachers_uses_the_batch_mix():
    T = 4.0
    loss_mix = W2[:, 0] * np_kl(np_softmax(ZT / T), np_softmax(ZS / T)) + W2[:, 1] * np_kl(
        np_softmax(ZT2 / T), np_softmax(ZS / T)
    )
    out = build("kd", num_teachers=2)(make_batch(t(ZS), [ZT, ZT2], weights=W2, mix="loss", T=T))
    np.testing.assert_allclose(out["kd"].item(), (T**2 * loss_mix).mean(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- DKD
def np_dkd_parts(zs, zt, y, T):
    """mdistiller's dkd_loss per sample, before T²: (TCKD, NCKD)."""
    gt = np.eye(zs.shape[1])[y]
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = np_kl(bt, bs)
    nckd = np_kl(np_softmax(zt / T - 1000.0 * gt), np_softmax(zs / T - 1000.0 * gt))
    return tckd, nckd


def test_dkd_matches_mdistiller_with_warmup():
    T = 4.0
    tckd, nckd = np_dkd_parts(ZS, ZT, Y, T)
    ramp = 5 / 20  # 0-based epoch 4 is mdistiller's epoch 5 of a 20-epoch warm-up
    out = build("dkd", alpha=1.0, beta=8.0, warmup=20)(make_batch(t(ZS), [ZT], T=T, epoch=4))
    assert set(out) == {"tckd", "nckd"}
    np.testing.assert_allclose(out["tckd"].item(), ramp * 1.0 * T**2 * tckd.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["nckd"].item(), ramp * 8.0 * T**2 * nckd.mean(), rtol=1e-5)
    late = build("dkd", alpha=2.0, beta=3.0, warmup=20)(make_batch(t(ZS), [ZT], T=T, epoch=40))
    np.testing.assert_allclose(late["tckd"].item(), 2.0 * T**2 * tckd.mean(), rtol=1e-5)
    np.testing.assert_allclose(late["nckd"].item(), 3.0 * T**2 * nckd.mean(), rtol=1e-5)


def test_dkd_decomposition_identity_per_sample():
    T = 3.0
    terms = dkd_terms(t(ZS), torch.log_softmax(t(ZT) / T, -1), torch.as_tensor(Y), T).numpy()
    kd = np_kl(np_softmax(ZT / T), np_softmax(ZS / T))
    p_t = np_softmax(ZT / T)[np.arange(3), Y]
    np.testing.assert_allclose(kd, terms[:, 0] + (1 - p_t) * terms[:, 1], rtol=1e-5)
    np.testing.assert_allclose(terms[:, 0], np_dkd_parts(ZS, ZT, Y, T)[0], rtol=1e-4)


def test_dkd_loss_mix_weights_per_teacher_terms():
    T = 4.0
    a0, b0 = np_dkd_parts(ZS, ZT, Y, T)
    a1, b1 = np_dkd_parts(ZS, ZT2, Y, T)
    out = build("dkd", num_teachers=2, warmup=1)(make_batch(t(ZS), [ZT, ZT2], weights=W2, mix="loss", T=T))
    np.testing.assert_allclose(out["tckd"].item(), T**2 * (W2[:, 0] * a0 + W2[:, 1] * a1).mean(), rtol=1e-5)
    np.testing.assert_allclose(out["nckd"].item(), 8 * T**2 * (W2[:, 0] * b0 + W2[:, 1] * b1).mean(), rtol=1e-5)


def test_dkd_rejects_zero_warmup():
    with pytest.raises(ConfigError, match="warmup"):
        build("dkd", warmup=0)


# ---------------------------------------------------------------------------------------------- layer choice
def test_layer_resolution():
    assert resolve_layer(STUDENT_TAPS, None, "x") == "s2"  # middle of three
    assert resolve_layer(TEACHER_TAPS, None, "x") == "t2"  # len // 2 of four
    assert resolve_layer(TEACHER_TAPS, -1, "x") == "t3"
    assert resolve_layer(TEACHER_TAPS, "layer9", "x") == "layer9"
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layer(STUDENT_TAPS, 3, "student_layer")
    assert layer_pairs(STUDENT_TAPS, [TEACHER_TAPS], None, "p") == [("s1", ["t1"]), ("s2", ["t2"]), ("s3", ["t3"])]
    assert layer_pairs(STUDENT_TAPS, [TEACHER_TAPS], [[0, "t0"]], "p") == [("s1", ["t0"])]
    with pytest.raises(ConfigError, match=r"\[student_layer, teacher_layer\]"):
        layer_pairs(STUDENT_TAPS, [TEACHER_TAPS], ["s1"], "pairs")


# ---------------------------------------------------------------------------------------------- FitNet
def test_fitnet_two_teachers_matches_hand_computed_hint_loss():
    rng = np.random.default_rng(0)
    fs = rng.normal(size=(3, 2, 2, 2))
    ft0, ft1 = rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(3, 4, 2, 2))
    loss = build("fitnet", num_teachers=2, student_layer="s2", teacher_layer="t1")
    assert loss.student_tap_names() == {"s2"} and loss.teacher_tap_names() == [{"t1"}, {"t1"}]
    batch = make_batch(
        t(ZS), [ZT, ZT2], weights=W2, student_features={"s2": t(fs)}, teacher_features=[{"t1": t(ft0)}, {"t1": t(ft1)}]
    )
    loss.setup(batch)
    loss.eval()  # BN with its initial running stats: y = x / sqrt(1 + 1e-5)
    per_teacher = []
    for reg, ft in zip(loss.regressors, (ft0, ft1)):
        w = reg.conv.weight.detach().double().numpy()[:, :, 0, 0]  # equal sizes: a 1x1 conv
        b = reg.conv.bias.detach().double().numpy()
        r = np.maximum((np.einsum("oc,bchw->bohw", w, fs) + b[None, :, None, None]) / np.sqrt(1 + 1e-5), 0)
        per_teacher.append(((r - ft) ** 2).reshape(3, -1).mean(1))
    expected = (W2 * np.stack(per_teacher, 1)).sum(1).mean()
    np.testing.assert_allclose(loss(batch)["hint"].item(), expected, rtol=1e-4)


def test_fitnet_on_mlp_hidden_vectors_uses_a_linear_regressor():
    rng = np.random.default_rng(8)
    fs, ft = rng.normal(size=(3, 5)), rng.normal(size=(3, 7))
    loss = build("fitnet", student_layer=0, teacher_layer=0)
    batch = make_batch(t(ZS), [ZT], student_features={"s1": t(fs)}, teacher_features=[{"t0": t(ft)}])
    loss.setup(batch)
    lin = loss.regressors[0][1]
    r = fs @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(loss(batch)["hint"].item(), ((r - ft) ** 2).mean(), rtol=1e-4)


def test_fitnet_from_a_vector_hint_to_a_teacher_map_targets_the_pooled_map():
    rng = np.random.default_rng(9)
    fs, ft = rng.normal(size=(3, 5)), rng.normal(size=(3, 4, 2, 2))
    loss = build("fitnet", student_layer=0, teacher_layer=0)
    batch = make_batch(t(ZS), [ZT], student_features={"s1": t(fs)}, teacher_features=[{"t0": t(ft)}])
    loss.setup(batch)
    lin = loss.regressors[0][1]
    r = fs @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(loss(batch)["hint"].item(), ((r - ft.mean((2, 3))) ** 2).mean(), rtol=1e-4)


def test_fitnet_from_a_student_map_to_a_teacher_vector_pools_the_map():
    rng = np.random.default_rng(10)
    fs, ft = rng.normal(size=(3, 4, 2, 2)), rng.normal(size=(3, 6))
    loss = build("fitnet", student_layer=0, teacher_layer=0)
    batch = make_batch(t(ZS), [ZT], student_features={"s1": t(fs)}, teacher_features=[{"t0": t(ft)}])
    loss.setup(batch)
    lin = loss.regressors[0][1]
    r = fs.mean((2, 3)) @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(loss(batch)["hint"].item(), ((r - ft) ** 2).mean(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- AT
def np_at(f):
    a = (f**2).mean(1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_at_matches_repdistiller_with_pooling():
    rng = np.random.default_rng(1)
    s1, s2 = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 2, 2, 2))
    t1, t2 = rng.normal(size=(3, 5, 2, 2)), rng.normal(size=(3, 5, 2, 2))
    loss = build("at", layers=[["s1", "t1"], ["s2", "t2"]])
    batch = make_batch(
        t(ZS), [ZT], student_features={"s1": t(s1), "s2": t(s2)}, teacher_features=[{"t1": t(t1), "t2": t(t2)}]
    )
    s1_pooled = s1.reshape(3, 2, 2, 2, 2, 2).mean((3, 5))  # adaptive avg pool 4x4 -> 2x2
    expected = ((np_at(s1_pooled) - np_at(t1)) ** 2).mean() + ((np_at(s2) - np_at(t2)) ** 2).mean()
    np.testing.assert_allclose(loss(batch)["at"].item(), expected, rtol=1e-5)
    assert loss.student_tap_names() == {"s1", "s2"}


def test_at_default_pairs_the_deepest_stages():
    loss = build("at")
    assert loss.student_tap_names() == {"s1", "s2", "s3"} and loss.teacher_tap_names() == [{"t1", "t2", "t3"}]


# ---------------------------------------------------------------------------------------------- RKD
def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def np_rkd(s, te):
    def dist(e):
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[d > 0].mean()

    def angle(e):
        diff = e[None, :, :] - e[:, None, :]  # [i, j] = e_j − e_i
        norm = np.linalg.norm(diff, axis=2, keepdims=True)
        diff = diff / np.maximum(norm, 1e-12)
        return np.einsum("ijd,ikd->ijk", diff, diff)

    return np_smooth_l1(dist(s), dist(te)), np_smooth_l1(angle(s), angle(te))


def test_rkd_matches_distance_and_angle_formulas():
    rng = np.random.default_rng(2)
    s, te = rng.normal(size=(4, 3)), rng.normal(size=(4, 2, 3))  # teacher embedding flattened to 6
    batch = make_batch(t(ZS[[0, 1, 2, 0]]), [ZT[[0, 1, 2, 0]]], y=Y[[0, 1, 2, 0]], student_features={"emb": t(s)},
                       teacher_features=[{"temb": t(te)}])
    out = build("rkd")(batch)
    d, a = np_rkd(s, te.reshape(4, 6))
    np.testing.assert_allclose(out["distance"].item(), 25 * d, rtol=1e-4)
    np.testing.assert_allclose(out["angle"].item(), 50 * a, rtol=1e-4)
    scaled = make_batch(t(ZS), [ZT], student_features={"emb": t(2 * s[:3])}, teacher_features=[{"temb": t(s[:3])}])
    same = build("rkd")(scaled)
    assert same["distance"].item() < 1e-6 and same["angle"].item() < 1e-6  # scale-invariant relations


# ---------------------------------------------------------------------------------------------- PKT
def test_pkt_matches_repdistiller():
    rng = np.random.default_rng(3)
    s, te = rng.normal(size=(3, 4)), rng.normal(size=(3, 6))
    eps = 1e-7

    def cond(f):
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = cond(s), cond(te)
    expected = np.mean(pt * np.log((pt + eps) / (ps + eps)))
    out = build("pkt")(make_batch(t(ZS), [ZT], student_features={"emb": t(s)}, teacher_features=[{"temb": t(te)}]))
    np.testing.assert_allclose(out["pkt"].item(), expected, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- CRD
def test_contrast_loss_matches_nce_formula():
    scores = np.array([[0.5, 0.01, 0.2], [0.05, 0.3, 0.02]])
    n, k, eps = 10, 2, 1e-7
    pn = 1 / n
    log_d1 = np.log(scores[:, 0] / (scores[:, 0] + k * pn + eps))
    log_d0 = np.log(k * pn / (scores[:, 1:] + k * pn + eps))
    expected = -(log_d1 + log_d0.sum(1))
    np.testing.assert_allclose(contrast_per_sample(t(scores), n).numpy(), expected, rtol=1e-5)


def crd_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centres = torch.randn(4, 8, generator=g) * 3
    x = centres[y] + 0.3 * torch.randn(n, 8, generator=g)
    teacher_emb = torch.nn.functional.one_hot(y, 4).float() * 2 + 0.1 * torch.randn(n, 4, generator=g)
    return x, y, teacher_emb


def test_crd_loss_is_finite_and_decreases_when_optimised():
    torch.manual_seed(0)
    x, y, teacher_emb = crd_data()
    n = len(x)
    student = nn.Linear(8, 6)
    loss = build("crd", num_train=n, feat_dim=8, nce_k=16)

    def batch():
        return make_batch(torch.zeros(n, 4), torch.zeros(1, n, 4), y=y, index=torch.arange(n),
                          student_features={"emb": student(x)}, teacher_features=[{"temb": teacher_emb}])

    with torch.no_grad():
        loss.setup(batch())
    memory = loss.memories[0]
    assert (memory.z > 0).all() and memory.memory_s.shape == (n, 8)
    opt = torch.optim.Adam(list(student.parameters()) + list(loss.parameters()), lr=0.02)
    values = []
    for _ in range(40):
        value = loss(batch())["crd"]
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert np.isfinite(values).all()
    assert np.mean(values[-5:]) < 0.8 * np.mean(values[:5])
    np.testing.assert_allclose(memory.memory_t.norm(dim=1).numpy(), np.ones(n), rtol=1e-5)  # rows renormalised


def test_crd_needs_indices_inside_the_training_split():
    loss = build("crd", num_train=10, feat_dim=4, nce_k=3)
    with pytest.raises(ValueError, match="batch.index"):
        loss.sample_indices(torch.tensor([0, 10]))
    idx = loss.sample_indices(torch.tensor([7, 2]))
    assert idx.shape == (2, 4) and idx[:, 0].tolist() == [7, 2] and int(idx.max()) < 10


# ---------------------------------------------------------------------------------------------- hierarchical
def hier_batch(fs, ft, weights=None, teachers=1):
    return make_batch(
        t(ZS), [ZT] * teachers, weights=weights, student_features={"s3": fs},
        teacher_features=[{"t3": f} for f in ft],
    )


def test_hierarchical_mask_is_in_unit_interval():
    rng = np.random.default_rng(4)
    maps = [[t(rng.normal(size=(3, 5, 4, 4))), t(rng.normal(size=(3, 2, 2, 2)))], [t(rng.normal(size=(3, 6, 8, 8)))]]
    m = fused_mask(maps, t(W2), (4, 4), "bilinear")
    assert m.shape == (3, 4, 4) and float(m.min()) >= 0 and float(m.max()) <= 1
    f = rng.normal(size=(3, 5, 4, 4))
    a = (f**2).mean(1)
    np.testing.assert_allclose(spatial_attention(t(f)).numpy(), a / a.reshape(3, -1).max(1)[:, None, None], rtol=1e-5)
    binary = top_k_mask(m, 0.25)
    assert set(binary.unique().tolist()) <= {0.0, 1.0} and (binary.flatten(1).sum(1) >= 4).all()


def test_hierarchical_is_zero_when_the_adapted_student_equals_the_teacher():
    rng = np.random.default_rng(5)
    f = t(rng.normal(size=(3, 4, 2, 2)))
    loss = build("hierarchical", pairs=[["s3", "t3"]], mask=True)
    batch = hier_batch(f, [f])
    loss.setup(batch)
    with torch.no_grad():
        adapter = loss.adapters[0][0]
        adapter.weight.copy_(torch.eye(4)[:, :, None, None])
        adapter.bias.zero_()
    assert abs(loss(batch)["hierarchical"].item()) < 1e-10


@pytest.mark.parametrize("use_mask", [True, False])
def test_hierarchical_matches_masked_formula(use_mask):
    rng = np.random.default_rng(6)
    fs, ft0, ft1 = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(3, 3, 2, 2))
    loss = build("hierarchical", num_teachers=2, pairs=[["s3", "t3"]], mask=use_mask, eps=1e-6)
    batch = hier_batch(t(fs), [t(ft0), t(ft1)], weights=W2, teachers=2)
    loss.setup(batch)

    def att(f):
        a = (f**2).mean(1)
        return a / a.reshape(3, -1).max(1)[:, None, None]

    mask = W2[:, 0, None, None] * att(ft0) + W2[:, 1, None, None] * att(ft1) if use_mask else np.ones((3, 2, 2))
    per_teacher = []
    for adapter, ft in zip(loss.adapters[0], (ft0, ft1)):
        w = adapter.weight.detach().double().numpy()[:, :, 0, 0]
        b = adapter.bias.detach().double().numpy()
        diff = np.einsum("oc,bchw->bohw", w, fs) + b[None, :, None, None] - ft
        per_teacher.append(((mask[:, None] * diff) ** 2).reshape(3, -1).sum(1) / (mask.reshape(3, -1).sum(1) + 1e-6))
    expected = (W2 * np.stack(per_teacher, 1)).sum(1).mean()
    np.testing.assert_allclose(loss(batch)["hierarchical"].item(), expected, rtol=1e-4)


def test_hierarchical_resizes_teacher_maps_and_takes_tokens():
    rng = np.random.default_rng(7)
    fs = t(rng.normal(size=(3, 2, 4, 4)), grad=True)
    tokens = t(rng.normal(size=(3, 1 + 2 * 2, 5)))  # ViT-style: class token + 2x2 grid, width 5
    loss = build("hierarchical", pairs=[["s3", "t3"]], top_k=0.5)
    batch = hier_batch(fs, [tokens])
    loss.setup(batch)
    assert loss.adapters[0][0].out_channels == 5
    value = loss(batch)["hierarchical"]
    value.backward()
    assert torch.isfinite(value) and fs.grad is not None and float(fs.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- real teacher taps
def test_feature_losses_accept_teacher_features_captured_under_inference_mode():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    x = torch.randn(3, 1, 4, 4)
    with torch.inference_mode(), FeatureTaps(teacher, ["1"]) as feats:
        z_t = teacher(x)
    assert feats["1"].is_inference()
    fs = torch.randn(3, 2, 4, 4, requires_grad=True)
    for name in ("fitnet", "hierarchical"):
        options = {"student_layer": "s3", "teacher_layer": "1"} if name == "fitnet" else {"pairs": [["s3", "1"]]}
        loss = build(name, **options)
        batch = make_batch(t(ZS), z_t[None].clone(), student_features={"s3": fs}, teacher_features=[dict(feats)])
        loss.setup(batch)
        next(iter(loss(batch).values())).backward()
    assert fs.grad is not None


def test_missing_feature_names_are_reported():
    loss = build("pkt")
    with pytest.raises(KeyError, match="'emb' was not captured"):
        loss(make_batch(t(ZS), [ZT]))


def test_combine_teachers_is_the_weighted_batch_mean():
    per = np.array([[1.0, 3.0], [2.0, 0.0], [4.0, 4.0]])
    np.testing.assert_allclose(combine_teachers(t(per), t(W2)).item(), (W2 * per).sum(1).mean(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- SMSKD reference
ZR = np.array([[0.5, 1.0, 0.0, 0.0], [1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 1.0, 1.0]])
ZT_CONF = np.array([[6.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 4.0]])  # sure, unsure, sure


def test_reference_weight_modes():
    tcp = np_softmax(ZT_CONF)[np.arange(3), Y]
    weights = {}
    for mode in ("one_minus_tcp", "tcp", "uniform"):
        loss = build("reference", mode=mode)
        weights[mode] = loss.sample_weights(make_batch(t(ZS), [ZT_CONF], reference_logits=t(ZR))).numpy()
    np.testing.assert_allclose(weights["one_minus_tcp"], 1 - tcp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights["tcp"], tcp, rtol=1e-5)
    np.testing.assert_allclose(weights["uniform"], np.ones(3))
    assert weights["one_minus_tcp"].argmax() == 1  # the sample the teacher is unsure of is anchored most


def test_reference_loss_matches_formula_with_mixed_teachers_and_normalisation():
    tau = 4.0
    tcp = (W2[:, 0] * np_softmax(ZT_CONF)[np.arange(3), Y] + W2[:, 1] * np_softmax(ZT2)[np.arange(3), Y])
    w = (1 - tcp) / (1 - tcp).mean()
    per = tau**2 * np_kl(np_softmax(ZR / tau), np_softmax(ZS / tau))
    loss = build("reference", num_teachers=2, normalize=True, tau_ref=tau)
    out = loss(make_batch(t(ZS), [ZT_CONF, ZT2], weights=W2, mix="probs", reference_logits=t(ZR)))
    np.testing.assert_allclose(out["reference"].item(), (w * per).mean(), rtol=1e-5)


def test_reference_is_zero_when_the_student_equals_the_reference_and_needs_one():
    loss = build("reference")
    out = loss(make_batch(t(ZR), [ZT_CONF], reference_logits=t(ZR)))
    assert abs(out["reference"].item()) < 1e-6
    with pytest.raises(ValueError, match="reference_logits is None"):
        loss(make_batch(t(ZS), [ZT_CONF]))
    with pytest.raises(ConfigError, match="unknown reference weighting 'one_minus_tpc'"):
        build("reference", mode="one_minus_tpc")


# ---------------------------------------------------------------------------------------------- MT-BKD prior
def np_entropy_weights(teacher_logits):
    """MT-BKD's reference weights, in bits as ``loss_fn_kd_mix_weighted``: ``w̃_m = 1 − H_m / Σ_j H_j``, normalised."""
    q = np_softmax(teacher_logits)
    h = -(q * np.log2(q)).sum(-1)  # [M, B]
    raw = 1.0 - h / h.sum(0, keepdims=True)
    return (raw / raw.sum(0, keepdims=True)).T  # [B, M]


def scipy_log_dirichlet(student_logits, teacher_logits, lam, T):
    """``log Dir(σ(z_S/T); 1 + λ σ(z_m/T))`` per teacher and sample, ``[M, B]``, by scipy.stats.dirichlet."""
    from scipy.stats import dirichlet

    p = np_softmax(np.asarray(student_logits, dtype=np.float64) / T)
    return np.array([[dirichlet.logpdf(p[i], 1.0 + lam * np_softmax(np.asarray(z[i], dtype=np.float64) / T))
                      for i in range(len(p))] for z in teacher_logits])


def test_mtbkd_prior_is_the_entropy_weighted_dirichlet_mixture():
    lam, T = 5.0, 2.0
    teachers = np.stack([ZT, ZT2])
    log_dir = scipy_log_dirichlet(ZS, teachers, lam, T)  # the Dirichlet log-densities, one scipy call each
    w = np_entropy_weights(teachers)
    by_hand = []  # log Σ_m w_m exp(log Dir_m), as a log-sum-exp written out
    for i in range(len(ZS)):
        terms = np.log(w[i]) + log_dir[:, i]
        top = terms.max()
        by_hand.append(top + np.log(np.exp(terms - top).sum()))
    loss = build("mtbkd_prior", num_teachers=2, lam=lam, T=T)(make_batch(t(ZS), teachers))
    assert loss.keys() == {"prior"}
    np.testing.assert_allclose(loss["prior"].item(), -np.mean(by_hand), rtol=1e-5)


def test_mtbkd_entropy_weights_sum_to_one_and_favour_the_confident_teacher():
    from hpmkd.ensemble import entropy_weights

    confident, unsure = np.array([[6.0, 0.0, 0.0, 0.0]] * 3), np.array([[0.5, 0.4, 0.3, 0.2]] * 3)
    w = entropy_weights(t(np.stack([unsure, confident])))
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert (w[:, 1] > w[:, 0]).all() and (w[:, 1] > 0.8).all()
    np.testing.assert_allclose(w.numpy(), np_entropy_weights(np.stack([unsure, confident])), rtol=1e-5)
    assert not w.requires_grad


def test_mtbkd_prior_with_one_teacher_is_single_teacher_bkd():
    lam, T = 5.0, 2.0
    loss = build("mtbkd_prior", num_teachers=1, lam=lam, T=T)(make_batch(t(ZS), np.stack([ZT])))
    bkd = -scipy_log_dirichlet(ZS, np.stack([ZT]), lam, T)[0].mean()  # −log Dir(p_S; 1 + λ q_T)
    np.testing.assert_allclose(loss["prior"].item(), bkd, rtol=1e-5)


def test_mtbkd_prior_stays_finite_for_large_lambda():
    """λ = 200 with a student far from the teachers: for the first sample every teacher's Dirichlet density
    underflows to 0 in float32 (the reference code's ``log Σ_m w_m exp(log Dir_m)`` would be log 0), while the
    log-space mixture and its gradient stay finite."""
    zs = t(np.array([[8.0, -8.0, 0.0, 0.0], [-8.0, 8.0, 0.0, 0.0], [0.0, 0.0, 8.0, -8.0]]), grad=True)
    teachers = np.stack([-np.asarray(ZS) * 6, np.asarray(ZT2) * 6])
    log_dir = scipy_log_dirichlet(zs.detach().numpy(), teachers, 200.0, 2.0)
    assert (np.exp(log_dir.astype(np.float32))[:, 0] == 0).all()  # what exponentiating first would sum
    loss = build("mtbkd_prior", num_teachers=2, lam=200.0)(make_batch(zs, teachers))["prior"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    w = np_entropy_weights(teachers)
    np.testing.assert_allclose(loss.item(), -np.mean([np.logaddexp(*(np.log(w[i]) + log_dir[:, i]))
                                                      for i in range(3)]), rtol=1e-5)


def test_mtbkd_prior_can_use_the_aggregator_weights_and_checks_its_options():
    teachers = np.stack([ZT, ZT2])
    loss = build("mtbkd_prior", num_teachers=2, weights="aggregator")(make_batch(t(ZS), teachers, weights=W2))
    log_dir = scipy_log_dirichlet(ZS, teachers, 5.0, 2.0)
    expected = -np.mean([np.logaddexp(*(np.log(W2[i]) + log_dir[:, i])) for i in range(3)])
    np.testing.assert_allclose(loss["prior"].item(), expected, rtol=1e-5)
    with pytest.raises(ConfigError, match="lam and T must be > 0"):
        build("mtbkd_prior", num_teachers=2, lam=0.0)
    with pytest.raises(ConfigError, match="lamda.*Did you mean 'lam'"):
        LOSSES.check_options("mtbkd_prior", {"lamda": 5}, "distill.methods.mtbkd_prior")
