"""compress(): exactness at full rank, Eckart-Young at rank r, the authors' rank rule, policies,
selection patterns, other architectures and every bad input."""

import math

import pytest
import timm
import torch
from torch import nn

from trimtune.errors import TrimtuneError
from trimtune.lowrank import (LowRankLinear, compress, factorised_layers, is_compressed,
                              rank_for)
from trimtune.lowrank.layers import gram, gram_eigh, gram_eigh_many

FULL = dict(r=10**6, keep_dense_if_no_saving=False)  # rank clamped to min(in, out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_full_rank_reproduces_outputs(vit, images):
    vit.eval()
    lr = compress(vit, **FULL).eval()
    layers = factorised_layers(lr)
    assert len(layers) == 8  # qkv, proj, fc1, fc2 of 2 blocks
    assert all(m.rank == min(m.in_features, m.out_features) for m in layers.values())
    assert torch.allclose(lr(images), vit(images), atol=1e-5, rtol=0)
    # deep copy by default: the original is untouched
    assert not is_compressed(vit) and is_compressed(lr)


@torch.no_grad()
def test_to_dense_matches_factorised(vit, images):
    lr = compress(vit, r=7).eval()
    for m in factorised_layers(lr).values():
        x = torch.randn(3, 5, m.in_features)  # (B, N, in)
        dense = m.to_dense()
        assert isinstance(dense, nn.Linear)
        assert dense.weight.shape == (m.out_features, m.in_features)
        assert torch.allclose(dense(x), m(x), atol=1e-5)


@torch.no_grad()
def test_eckart_young_error_and_balanced_factors(vit):
    r = 11
    lr = compress(vit, r=r)
    orig = dict(vit.named_modules())
    for name, m in factorised_layers(lr).items():
        w = orig[name].weight.double()
        s = torch.linalg.svdvals(w)
        expected = float(s[r:].pow(2).sum().sqrt())
        err = float((m.weight_product.double() - w).norm())
        assert err == pytest.approx(expected, rel=1e-4)
        n1, n2 = m.first.weight.norm(), m.second.weight.norm()
        assert float(n1) == pytest.approx(float(n2), rel=1e-4)  # sqrt(S) in each factor
        assert torch.equal(m.second.bias, orig[name].bias)
        kept = float(s[:r].pow(2).sum() / s.pow(2).sum())
        assert lr.trimtune_lowrank["energy"][name] == pytest.approx(kept, rel=1e-4)


def test_from_linear_randomized_close_to_full():
    torch.manual_seed(0)
    # a matrix with a decaying spectrum, as trained weights have
    u, _ = torch.linalg.qr(torch.randn(96, 48))
    v, _ = torch.linalg.qr(torch.randn(80, 48))
    lin = nn.Linear(80, 96)
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(0.8 ** torch.arange(48.0)) @ v.T)
    full = LowRankLinear.from_linear(lin, 8, svd="full")
    rand = LowRankLinear.from_linear(lin, 8, svd="randomized")
    with torch.no_grad():
        e_full = float((full.weight_product - lin.weight).norm())
        e_rand = float((rand.weight_product - lin.weight).norm())
    assert e_rand == pytest.approx(e_full, rel=1e-3)
    for shape in [(96, 80), (40, 120)]:  # tall and wide: gram (eigh) == full SVD
        w = torch.randn(*shape, dtype=torch.float64)
        lin = nn.Linear(shape[1], shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(w)
            a = LowRankLinear.from_linear(lin, 9, svd="gram", svd_dtype=torch.float64)
            b = LowRankLinear.from_linear(lin, 9, svd="full", svd_dtype=torch.float64)
            assert torch.allclose(a.weight_product, b.weight_product, atol=1e-10)
            assert float(a.first.weight.norm()) == pytest.approx(float(b.first.weight.norm()))


def test_authors_rank_rule_deit_base_counts():
    with torch.device("meta"):  # shapes only: ranks and counts need no weights
        deit = timm.create_model("deit_base_patch16_224", pretrained=False)
    before = sum(p.numel() for p in deit.parameters())
    lr = compress(deit, ratio=2.0, inplace=True)
    after = sum(p.numel() for p in lr.parameters())
    assert before / 1e6 == pytest.approx(86.57, abs=0.01)
    assert after / 1e6 == pytest.approx(44.08, abs=0.01)
    ranks = lr.trimtune_lowrank["ranks"]
    assert len(ranks) == 48
    for i in range(12):
        assert ranks[f"blocks.{i}.attn.qkv"] == 288
        assert ranks[f"blocks.{i}.attn.proj"] == 192
        assert ranks[f"blocks.{i}.mlp.fc1"] == ranks[f"blocks.{i}.mlp.fc2"] == 307
    assert isinstance(lr.head, nn.Linear) and isinstance(lr.patch_embed.proj, nn.Conv2d)


@pytest.mark.parametrize("c", [1.5, 2.0, 3.0])
def test_ratio_rule_formula(vit, c):
    lr = compress(vit, ratio=c)
    for m in factorised_layers(lr).values():
        i, o = m.in_features, m.out_features
        assert m.rank == math.floor(i * o / (c * (i + o)))
        assert m.rank * (i + o) < i * o


def test_energy_policy_smallest_rank(vit):
    e = 0.8
    lr = compress(vit, energy=e)
    orig = dict(vit.named_modules())
    for name, m in factorised_layers(lr).items():
        s2 = torch.linalg.svdvals(orig[name].weight.double()).pow(2)
        frac = torch.cumsum(s2, 0) / s2.sum()
        assert frac[m.rank - 1] >= e - 1e-9
        if m.rank > 1:
            assert frac[m.rank - 2] < e
        assert lr.trimtune_lowrank["energy"][name] >= e - 1e-6
    assert lr.trimtune_lowrank["policy"]["type"] == "energy"


def test_default_skips_and_no_saving_layers_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(64, 64))
    model.add_module("wide", nn.Linear(64, 256))
    model.add_module("norm_proj", nn.Linear(64, 64))   # name contains "norm"
    model.add_module("small", nn.Linear(64, 8))        # out_features < 10
    model.add_module("head", nn.Linear(8, 20))
    lr = compress(model, ratio=2.0)
    assert set(factorised_layers(lr)) == {"fc", "wide"}
    # rank 40 on a 64x64 layer saves nothing (40 * 128 >= 64 * 64): stays dense, reported
    lr = compress(model, overrides={"^fc$": 40})
    assert set(factorised_layers(lr)) == {"wide"}
    assert "fc" in lr.trimtune_lowrank["kept_dense"]
    with pytest.raises(TrimtuneError, match="keep_dense_if_no_saving"):
        compress(model, r=64)
    lr = compress(model, r=64, keep_dense_if_no_saving=False)
    assert lr.trimtune_lowrank["ranks"] == {"fc": 64, "wide": 64}


def test_include_exclude_overrides(vit):
    lr = compress(vit, include=r".*mlp\.fc\d", exclude=r"blocks\.1\..*", overrides={"fc2": 3})
    ranks = lr.trimtune_lowrank["ranks"]
    assert set(ranks) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    assert ranks["blocks.0.mlp.fc2"] == 3 and ranks["blocks.0.mlp.fc1"] == rank_for(64, 256,
                                                                                     ratio=2.0)
    # Swin recipe: keep attn.proj on top of the default skips
    lr = compress(vit, exclude=["attn.proj"])
    assert not any("proj" in n for n in factorised_layers(lr))
    assert "head" in lr.trimtune_lowrank["skip"] and "attn.proj" in lr.trimtune_lowrank["skip"]


def test_selection_is_the_tuners_rule(vit):
    """compress selects layers by trimtune.tuners.targets (PEFT's rule), with its error."""
    from trimtune.tuners.targets import select_linears

    for pats in (["fc1"], ["attn.qkv", "mlp.fc2"], r".*blocks\.1\.mlp\.fc\d"):
        lr = compress(vit, include=pats, r=4)
        assert list(lr.trimtune_lowrank["ranks"]) == select_linears(vit, pats, warn=False)
    with pytest.raises(TrimtuneError, match=r"include='fc1' matches no linear layer.*closest "
                                            r"module names: .*fc1"):
        compress(vit, include="fc1")  # a string is a regex over the WHOLE name
    with pytest.raises(TrimtuneError, match=r"exclude pattern 'fc3' .*closest module names"):
        compress(vit, exclude=["fc3"])


def test_inplace_keeps_arch_and_grad_flags(vit):
    vit.blocks[0].attn.qkv.weight.requires_grad_(False)
    out = compress(vit, inplace=True)
    assert out is vit and is_compressed(vit)
    assert vit.trimtune_arch["arch"] == "vit_tiny_patch16_224"
    assert vit.blocks[0].attn.qkv.first.weight.requires_grad is False
    assert vit.blocks[0].mlp.fc1.first.weight.requires_grad is True


def test_return_spectra(vit):
    lr, spectra = compress(vit, return_spectra=True)
    assert set(spectra) == set(factorised_layers(lr))
    s = spectra["blocks.0.attn.qkv"]
    assert s.shape == (64,) and torch.all(s[:-1] >= s[1:])
    assert lr.trimtune_spectra is not None


@torch.no_grad()
def test_swin_tiny_config():
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32,
                             depths=(1, 1), num_heads=(1, 2), window_size=4, img_size=32,
                             patch_size=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    names = set(factorised_layers(compress(swin)))
    assert "layers.0.blocks.0.attn.qkv" in names
    assert not any("downsample" in n or "head" in n for n in names)
    full = compress(swin, **FULL).eval()
    assert _rel(full(x), swin(x)) < 1e-5
    assert torch.allclose(full.forward_features(x), swin.forward_features(x), atol=1e-5)


@torch.no_grad()
def test_dinov2_small_fused_qkv_layer_scale():
    torch.manual_seed(0)
    # DINOv2 ViT-S/14 layout (dim 384, fused qkv, layer-scale) cut to 2 blocks for speed
    dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2,
                             num_classes=4).eval()
    x = torch.randn(1, 3, 56, 56)
    lr = compress(dino, ratio=2.0).eval()
    ranks = lr.trimtune_lowrank["ranks"]
    assert ranks["blocks.0.attn.qkv"] == rank_for(384, 1152, ratio=2.0) == 144
    assert ranks["blocks.1.mlp.fc1"] == 153 and len(ranks) == 8  # 384*1536/(2*1920)
    assert float(lr.blocks[0].ls1.gamma.abs().sum()) > 0
    full = compress(dino, **FULL).eval()
    assert torch.allclose(full.forward_features(x), dino.forward_features(x), atol=1e-4)
    assert _rel(full(x), dino(x)) < 1e-5


@pytest.mark.parametrize("kwargs, words", [
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=0.5), "ratio"),
    (dict(energy=0.0), "energy"),
    (dict(energy=1.5), "energy"),
    (dict(r=0), "rank"),
    (dict(r=-3), "rank"),
    (dict(r=2.5), "rank"),
    (dict(energy=0.9, r=4), "one rank policy"),
    (dict(include="nothing_like_this"), "matches no linear"),
    (dict(exclude=["qkv", "nope$"]), "matches no linear"),
    (dict(include=["qkv"], exclude=["qkv"]), "no linear layer left"),
    (dict(overrides={"head": 3}), "overrides"),
    (dict(overrides={"qkv": 0}), "overrides"),
    (dict(include="[unclosed"), "regex"),
    (dict(svd="magic"), "svd"),
    (dict(energy=0.9, svd="randomized"), "full spectrum"),
])
def test_bad_inputs_raise_clear_errors(vit, kwargs, words):
    with pytest.raises(TrimtuneError, match=words):
        compress(vit, **kwargs)


def test_model_without_linear_and_double_compress(vit):
    with pytest.raises(TrimtuneError, match="no nn.Linear"):
        compress(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(TrimtuneError, match="already compressed"):
        compress(compress(vit))
    with pytest.raises(TrimtuneError, match="does not fit"):
        LowRankLinear(8, 4, rank=5)


def _decaying(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight whose singular values fall from 1 to 1e-4, as trained weights do."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
    return (u * torch.logspace(0, -4, k, dtype=torch.float64) @ v.T).float()


@pytest.mark.parametrize("shape", [(192, 64), (64, 256), (96, 96)])
@torch.no_grad()
def test_float32_gram_within_eckart_young_bound(shape):
    """The default float32 eigen-decomposition: the rank-r error is Eckart-Young's within
    1e-4 (relative), and the product differs from the float64 one by < 1e-4 ||W||."""
    w = _decaying(*shape)
    lin = nn.Linear(shape[1], shape[0])
    lin.weight.copy_(w)
    s64 = torch.linalg.svdvals(w.double())
    for r in (4, 16, min(shape) // 2, min(shape)):
        fast = LowRankLinear.from_linear(lin, r, svd="gram")  # float32
        exact = LowRankLinear.from_linear(lin, r, svd="gram", svd_dtype=torch.float64)
        err = float((fast.weight_product.double() - w.double()).norm())
        best = float(s64[r:].pow(2).sum().sqrt())
        assert err <= best * (1 + 1e-4) + 1e-5 * float(w.double().norm())  # + float32 rounding
        diff = (fast.weight_product.double() - exact.weight_product.double()).norm()
        assert float(diff) < 1e-4 * float(w.double().norm())


@torch.no_grad()
def test_parallel_decompositions_equal_per_layer_and_share_no_storage(vit):
    """compress() decomposes the layers side by side on worker threads: the factors are those
    of a per-layer decomposition; the copy holds new tensors only (the original is
    untouched); the caller's torch thread count is restored."""
    threads = torch.get_num_threads()
    lr = compress(vit, r=9)
    orig = dict(vit.named_modules())
    for name, m in factorised_layers(lr).items():
        ref = LowRankLinear.from_linear(orig[name], 9, svd="gram")
        torch.testing.assert_close(m.weight_product, ref.weight_product, atol=1e-5, rtol=0)
    ptrs = {p.data_ptr() for p in vit.parameters()}
    assert not any(p.data_ptr() in ptrs for p in lr.parameters())
    assert not is_compressed(vit) and isinstance(vit.blocks[0].attn.qkv, nn.Linear)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_gram_lower_triangle_and_workers_agree(dtype):
    """The CPU Gram matrix (BLAS syrk: lower triangle only) matches the full product there,
    for tall and wide weights; 1, 2 and 3 workers give the same decompositions, in order."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*shape, generator=g, dtype=dtype) for shape in
          ((48, 16), (16, 40), (24, 24), (48, 16), (40, 16))]
    for w in ws:
        full = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
        torch.testing.assert_close(gram(w, dtype).tril(), full.tril())
    ref = [gram_eigh(w, dtype) for w in ws]
    for workers in (1, 2, 3):
        got = gram_eigh_many(ws, dtype, workers=workers)
        for (s, v), (s_ref, v_ref) in zip(got, ref):
            torch.testing.assert_close(s, s_ref)
            torch.testing.assert_close(v.abs(), v_ref.abs())  # eigenvector signs are free
