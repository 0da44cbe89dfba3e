"""Data-aware factor init (compress(init="whiten" | "asvd")): whitening minimises the layer's
output error on the calibration inputs, exactness at full rank, the S^-1 fold-back, the damping
path, calibration data forms, the trimtune.json record and every bad input."""

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trimtune.errors import TrimtuneError
from trimtune.lowrank import (LowRankLinear, compress, factorised_layers, load_compressed,
                              save_compressed)
from trimtune.lowrank.calibrate import collect_stats
from trimtune.lowrank.layers import (activation_scale, truncated_svd, weighted_target,
                                     whitening_factor)

pytestmark = pytest.mark.usefixtures("one_thread")
FULL = dict(r=10**6, keep_dense_if_no_saving=False)


def calib_images(n: int = 48, size: int = 32, seed: int = 1) -> torch.Tensor:
    """Random images with a strong per-channel bias, so the layers' inputs are anisotropic."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return x * torch.tensor([2.0, 0.5, 1.0])[:, None, None] + 0.3


def layer_inputs(model: nn.Module, names, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every input row (tokens) of each named linear on ``images``, float64 (N, in)."""
    mods = dict(model.named_modules())
    got: dict[str, list] = {n: [] for n in names}
    hs = [mods[n].register_forward_hook(
        lambda m, a, o, n=n: got[n].append(a[0].reshape(-1, m.in_features).double()))
        for n in names]
    with torch.no_grad():
        model.eval()(images)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def out_error(layer: LowRankLinear, w: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W_r) X^T||_F."""
    return float(((w.double() - layer.weight_product.double()) @ x.mT).norm())


@torch.no_grad()
def test_whitening_minimises_output_error(vit):
    r, calib = 6, calib_images()
    svd = compress(vit, r=r)
    white = compress(vit, r=r, init="whiten", calib=calib, damp=1e-12)
    orig = dict(vit.named_modules())
    xs = layer_inputs(vit, factorised_layers(white), calib)
    for name, m in factorised_layers(white).items():
        w, x = orig[name].weight.double(), xs[name]
        e_white, e_svd = out_error(m, w, x), out_error(factorised_layers(svd)[name], w, x)
        assert e_white < e_svd
        # the optimum: the tail of the spectrum of W S, S S^T = X^T X (SVD-LLM, Theorem 1)
        s = torch.linalg.svdvals(w @ torch.linalg.cholesky(x.mT @ x))
        assert e_white == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-5)
        # any other rank-r weight does worse: e.g. the projection on random output directions
        q, _ = torch.linalg.qr(torch.randn(w.shape[0], r, dtype=torch.float64))
        assert e_white <= float(((w - q @ q.mT @ w) @ x.mT).norm())
    # whole-model output error on the calibration images is lower too
    y = vit.eval()(calib)
    err = {k: float((c.eval()(calib) - y).norm()) for k, c in (("svd", svd), ("white", white))}
    assert err["white"] < err["svd"]


@torch.no_grad()
def test_whitened_factors_do_not_grow_with_the_calibration_set(vit):
    """The same images twice (twice the tokens, twice the summed Gram matrix) give the same
    factors, and .second's input keeps the scale of the original layer's input (the summed
    Gram matrix made it shrink with the square root of the number of tokens)."""
    calib = calib_images()
    once = compress(vit, r=6, init="whiten", calib=calib)
    twice = compress(vit, r=6, init="whiten", calib=torch.cat([calib, calib]))
    layers = factorised_layers(once)
    xs = layer_inputs(vit, layers, calib)
    for name, m in layers.items():
        t = factorised_layers(twice)[name]
        torch.testing.assert_close(m.first.weight, t.first.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.second.weight, t.second.weight, rtol=1e-4, atol=1e-6)
        h = m.first(xs[name].float())  # what .second sees
        ratio = float(h.pow(2).mean().sqrt() / xs[name].pow(2).mean().sqrt())
        assert 0.2 < ratio < 5, (name, ratio)


@pytest.mark.parametrize("init", ["whiten", "asvd"])
@torch.no_grad()
def test_full_rank_reproduces_outputs(vit, images, init):
    c = compress(vit, init=init, calib=calib_images(16), **FULL).eval()
    assert all(m.rank == min(m.in_features, m.out_features)
               for m in factorised_layers(c).values())
    assert torch.allclose(c(images), vit.eval()(images), atol=1e-5, rtol=0)


@torch.no_grad()
def test_fold_back_equals_explicit_inverse():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40).double()
    x = torch.randn(500, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    chol, used = whitening_factor(x.mT @ x, damp=1e-12)
    assert used == 1e-12 and torch.allclose(chol @ chol.mT, x.mT @ x, rtol=1e-9, atol=1e-8)
    u, s, vh = truncated_svd(weighted_target(lin.weight, chol), 7, svd="full",
                             dtype=torch.float64)
    layer = LowRankLinear.from_weighted_svd(lin, u, s, 7)
    explicit = torch.linalg.solve_triangular(chol, s[:7].sqrt()[:, None] * vh, upper=False,
                                             left=False)  # sqrt(S) V^T S^-1
    assert torch.allclose(layer.first.weight, explicit, rtol=1e-7, atol=1e-9)
    assert torch.allclose(layer.second.weight, u * s[:7].sqrt(), atol=1e-12)
    assert torch.equal(layer.second.bias, lin.bias)
    # ASVD: a diagonal scale folds back the same way
    scale = activation_scale(x.abs().mean(0), 0.5)
    u, s, vh = truncated_svd(weighted_target(lin.weight, scale), 7, svd="full",
                             dtype=torch.float64)
    layer = LowRankLinear.from_weighted_svd(lin, u, s, 7)
    assert torch.allclose(layer.first.weight, s[:7].sqrt()[:, None] * vh / scale, rtol=1e-7,
                          atol=1e-9)


def test_damping_path_is_finite():
    # rank-1 Gram matrix: the undamped Cholesky fails, damping grows until it succeeds
    v = torch.randn(30, 1, dtype=torch.float64)
    g = v @ v.mT
    chol, used = whitening_factor(g, damp=1e-30)
    assert used > 1e-30 and torch.isfinite(chol).all()
    lam = used * float(g.diagonal().mean())
    assert torch.allclose(chol @ chol.mT, g + lam * torch.eye(30, dtype=torch.float64),
                          atol=1e-9 * float(g.abs().max()))
    # nothing seen (all-zero) or non-finite statistics: identity, i.e. plain SVD
    for bad in (torch.zeros(5, 5), torch.full((5, 5), float("nan"))):
        chol, used = whitening_factor(bad)
        assert torch.equal(chol, torch.eye(5, dtype=torch.float64)) and used == 0.0
    # a dead input channel: ASVD's scale stays positive, factors finite
    s = activation_scale(torch.tensor([0.0, 1.0, 4.0]))
    assert (s > 0).all() and s[2] == 2.0


@torch.no_grad()
def test_too_few_images_damped_with_a_warning(vit, images):
    with pytest.warns(UserWarning, match="rank-deficient.*more calibration images"):
        c = compress(vit, r=6, init="whiten", calib=calib_images(1))
    assert torch.isfinite(c.eval()(images)).all()
    rec = c.trimtune_lowrank["init"]
    assert rec["calib_images"] == 1 and rec["calib_tokens"] == 17  # 16 patches + cls
    # a Gram matrix the first damping cannot factorise: more damping, said once, still finite
    with pytest.warns(UserWarning) as got:
        c = compress(vit, r=6, init="whiten", calib=torch.zeros(2, 3, 32, 32), damp=1e-300)
    assert any("damped more" in str(w.message) for w in got)
    assert c.trimtune_lowrank["init"]["damped"]
    assert torch.isfinite(c.eval()(images)).all()
    with warnings.catch_warnings():  # enough images: no warning
        warnings.simplefilter("error")
        compress(vit, r=6, init="whiten", calib=calib_images(24))


@torch.no_grad()
def test_calibration_forms_and_streaming(vit):
    imgs = calib_images(40)
    layers = {n: m for n, m in vit.named_modules() if n.endswith("fc2")}
    ref, info = collect_stats(vit, layers, imgs, images=40, batch_size=40)
    assert info == {"calib": "tensor(3, 32, 32)", "images": 40, "tokens": 40 * 17}
    # batch size does not change the sums; a DataLoader, a Dataset and a cap all work
    for data, n in ((imgs, 40), (DataLoader(TensorDataset(imgs, torch.zeros(40)),
                                            batch_size=7), 40),
                    (TensorDataset(imgs[:30], torch.zeros(30)), 30)):
        st, info = collect_stats(vit, layers, data, images=n, batch_size=6)
        assert info["images"] == n
        if n == 40:
            for k in layers:
                assert torch.allclose(st[k].gram, ref[k].gram, rtol=1e-10)
                assert torch.allclose(st[k].abs_mean, ref[k].abs_mean, rtol=1e-10)
    st, info = collect_stats(vit, layers, imgs, images=9, batch_size=4)
    assert info["images"] == 9 and st[next(iter(layers))].rows == 9 * 17
    # a dataset spec, read with the model's transform; the model is left as it was
    vit.train()
    c = compress(vit, r=6, init="asvd", calib="synthetic:classes=4,n=32,size=32",
                 calib_images=12)
    assert vit.training
    assert c.trimtune_lowrank["init"] == {"method": "asvd", "calib": "synthetic:classes=4,n=32,"
                                          "size=32", "calib_images": 12,
                                          "calib_tokens": 12 * 17, "alpha": 0.5}


@torch.no_grad()
def test_energy_policy_on_the_weighted_spectrum(vit):
    c = compress(vit, energy=0.9, init="whiten", calib=calib_images(32))
    for name, m in factorised_layers(c).items():
        assert 0.9 <= c.trimtune_lowrank["energy"][name] <= 1.0
        assert m.rank <= min(m.in_features, m.out_features)


def test_record_saved_and_old_files_load(vit, images, tmp_path):
    c = compress(vit, ratio=2.0, init="whiten", calib=calib_images(16)).eval()
    save_compressed(c, tmp_path / "w")
    cfg = json.loads((tmp_path / "w" / "trimtune.json").read_text())
    assert cfg["init"]["method"] == "whiten" and cfg["init"]["calib_images"] == 16
    back = load_compressed(tmp_path / "w")
    assert back.trimtune_lowrank["init"] == cfg["init"]
    with torch.no_grad():
        assert torch.allclose(back(images), c(images), atol=1e-6)
    del cfg["init"]  # a file written before the init record existed
    (tmp_path / "w" / "trimtune.json").write_text(json.dumps(cfg))
    assert load_compressed(tmp_path / "w").trimtune_lowrank["init"] == {"method": "svd"}


@pytest.mark.parametrize("kwargs, words", [
    (dict(init="pca"), "unknown init 'pca'"),
    (dict(init="whiten"), "needs calibration images"),
    (dict(init="svd", calib="digits"), "calib is only read"),
    (dict(init="whiten", calib=calib_images(4, size=16)), "16x16 but the model takes 32x32"),
    (dict(init="asvd", calib=calib_images(4), calib_images=0), "calib_images=0"),
    (dict(init="whiten", calib=calib_images(4), damp=0), "damp=0"),
    (dict(init="asvd", calib=calib_images(4), asvd_alpha=2), "asvd_alpha=2"),
    (dict(init="whiten", calib="no-such-data"), "unknown dataset"),
    (dict(init="whiten", calib=torch.zeros(0, 3, 32, 32)), "holds no image"),
    (dict(init="whiten", calib=[("not", "images")]), "image tensors"),
])
def test_bad_inputs_leave_the_model_untouched(vit, kwargs, words):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(TrimtuneError, match=words) as e:
        compress(vit, r=6, inplace=True, **kwargs)
    assert "\n" not in str(e.value)
    assert not factorised_layers(vit)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
