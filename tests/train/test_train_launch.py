"""Launchers and precision: bf16 autocast on the CPU, a lost multi-process launch reported,
FSDP on the CPU refused in one line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import tiny_data, tiny_mlp  # noqa: E402

from trimtune.errors import TrimtuneError  # noqa: E402
from trimtune.train import TrainConfig, fit  # noqa: E402


def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, batch_size=8, lr=1e-2, warmup_steps=0,
                                 out_dir=tmp_path, progress=False, resume=False), **kw})


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_bf16_autocast_on_the_cpu(tmp_path, clean_env):
    seen = []
    data, model = tiny_data(), tiny_mlp()
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "needs a GPU" fallback
        fit(model, data, _ce, cfg(tmp_path, mixed_precision="bf16"))
    assert seen and set(seen) == {torch.bfloat16}  # the linears ran under CPU autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights fp32


def test_snella_trains_under_cpu_bf16(tmp_path, clean_env, vit, images):
    from trimtune.tuners import SnellaConfig, attach

    attach(vit, SnellaConfig(r=4, init_sparsity=0.5))
    a0 = vit.blocks[0].attn.qkv.snell_units["default"][0].snell_A.detach().clone()
    data = torch.utils.data.TensorDataset(images.repeat(4, 1, 1, 1), torch.arange(16) % 5)

    def objective(model, batch):
        loss = F.cross_entropy(model(batch[0]).float(), batch[1])
        return loss, {"ce": loss.detach()}

    res = fit(vit, data, objective, cfg(tmp_path, epochs=1, mixed_precision="bf16"))
    assert res.step == 2
    assert not torch.equal(vit.blocks[0].attn.qkv.snell_units["default"][0].snell_A, a0)
    assert all(torch.isfinite(p).all() for p in vit.parameters())


def test_lost_multi_process_launch_says_so(tmp_path, clean_env):
    # what `accelerate launch --num_processes 2` (simple launcher, any CPU run) leaves behind
    clean_env.setenv("ACCELERATE_USE_CPU", "False")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match=r"started ONE process.*torchrun --nproc_per_node N"):
        fit(tiny_mlp(), tiny_data(), _ce, cfg(tmp_path, epochs=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_fsdp_on_the_cpu_is_refused_in_one_line(tmp_path, clean_env):
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(TrimtuneError, match=r"FSDP needs CUDA GPUs.*torchrun") as e:
        fit(tiny_mlp(), tiny_data(), _ce, cfg(tmp_path, epochs=1))
    assert "\n" not in str(e.value)


def _ce(model, batch):
    loss = F.cross_entropy(model(batch[0]), batch[1])
    return loss, {"ce": loss.detach()}
