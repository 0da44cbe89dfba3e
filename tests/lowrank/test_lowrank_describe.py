"""describe(): parameter and FLOP counts before/after; compare(); plot_spectra()."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trimtune.errors import TrimtuneError
from trimtune.lowrank import compare, compress, describe, plot_spectra


def _flops(model, x):
    with FlopCounterMode(display=False) as c, torch.no_grad():
        model(x)
    return c.get_total_flops()


def test_describe_counts_match_models(vit):
    vit.eval()
    lr = compress(vit, ratio=2.0)
    d = describe(lr)
    x = torch.zeros(1, 3, 32, 32)
    assert d.input_size == (3, 32, 32)
    assert d.params_before == sum(p.numel() for p in vit.parameters())
    assert d.params_after == sum(p.numel() for p in lr.parameters())
    assert d.flops_before == _flops(vit, x)  # dense cost reconstructed from the hooks
    assert d.flops_after == _flops(lr, x)
    assert 0.4 < d.param_ratio < 0.7 and d.flop_ratio < 1
    assert len(d.layers) == 8
    lay = d.layers[0]
    assert lay.params_lowrank == lay.rank * (lay.in_features + lay.out_features)
    assert 0 < lay.energy <= 1
    text = str(d)
    assert "blocks.0.attn.qkv" in text and "parameters" in text and "FLOPs" in text
    json.dumps(d.to_dict())  # JSON-ready


def test_describe_dense_model_and_bad_input_size(vit):
    d = describe(vit)
    assert d.params_before == d.params_after and d.layers == []
    with pytest.raises(TrimtuneError, match="input_size"):
        describe(vit, input_size=(3, 48, 40))


@torch.no_grad()
def test_compare_reports_error_and_ratios(vit, images):
    c = compare(vit, compress(vit, ratio=1.5), images)
    assert 0 < c["param_ratio"] < 1 and 0 < c["flop_ratio"] < 1
    assert 0 < c["rel_error"] < 1 and -1 <= c["cosine"] <= 1
    full = compare(vit, compress(vit, r=10**6, keep_dense_if_no_saving=False), images)
    assert full["rel_error"] < 1e-5 and full["param_ratio"] > 1


def test_plot_spectra_from_compressed_original_and_dict(vit, tmp_path):
    lr, spectra = compress(vit, ratio=2.0, return_spectra=True)
    ranks = lr.trimtune_lowrank["ranks"]
    for i, (src, rk) in enumerate([(lr, None), (vit, ranks), (spectra, lr)]):
        out = plot_spectra(src, rk, tmp_path / f"s{i}.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CLI form: path in second place
    assert plot_spectra(lr, tmp_path / "cli.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp left behind
    with pytest.raises(TrimtuneError, match="ranks"):
        plot_spectra(vit, path=tmp_path / "bad.png")
