"""Smoke tests of the training memory / speed benchmark scripts (tiny configurations)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_train")


def test_build_kwargs_parses_compression(bench):
    kw = bench.build_kwargs("vit_base_patch16_224", "snella@c2", 8, rank=8, img_size=224,
                            sparsity=0.7, device=None)
    assert kw["method"] == "snella" and kw["compress_ratio"] == 2.0
    assert kw["pretrained"] is False and kw["batch_size"] == 8
    assert bench.build_kwargs("dinov2_small.imgfocus", "lora", 8, rank=8, img_size=224,
                              sparsity=0.7, device=None)["pretrained"] is True
    with pytest.raises(SystemExit):
        bench.build_kwargs("m", "snella@x2", 8, rank=8, img_size=None, sparsity=0.7, device=None)


def _fake(bench, peaks: dict[str, float], times: dict[str, float]) -> dict:
    mb = bench.MB
    rows = {bench.key_of("m", 8, k): {"peak_bytes": v * mb, "step_s": times[k], "device": "cpu"}
            for k, v in peaks.items()}
    static = {f"m|{k}": {"params": 10, "trainable": 4, "stored": 4, "weight_bytes": 100 * mb,
                         "adapter_bytes": mb} for k in peaks}
    return {"settings": {"models": ["m"], "batches": [8], "methods": list(peaks)},
            "rows": rows, "static": static}


def test_ratios_and_goals(bench):
    data = _fake(bench, {"full": 400, "lora": 100, "snella": 104, "masked-sparse": 300,
                         "snella@c2": 50},
                 {"full": 4.0, "lora": 2.0, "snella": 3.0, "masked-sparse": 3.0,
                  "snella@c2": 1.5})
    rows = {r["method"]: r for r in bench.table_rows(data, "m", 8)}
    assert rows["lora"]["rise_mb/lora"] == pytest.approx(1.0)
    assert rows["snella"]["rise_mb/full"] == pytest.approx(104 / 400)
    assert rows["snella"]["total_mb/lora"] == pytest.approx(204 / 200)
    assert rows["snella"]["img_s"] == pytest.approx(8 / 3.0)
    g = "\n".join(bench.goals(data, "m", 8))
    assert "snella / lora, peak rise: 1.04 (goal <= 1.05) **met**" in g
    assert "snella / lora, step time: 1.50 (goal <= 1.15) **MISSED**" in g
    assert "snella@c2 / lora (original), rise + weights: 0.75" in g


@pytest.mark.slow
def test_snella_step_runs_the_allocator():
    from trimtune.train_step import build_train_step

    model, step = build_train_step("vit_tiny_patch16_224", method="snella", batch_size=1,
                                   img_size=32, pretrained=False)
    from trimtune.tuners.snell.allocator import cubic_budget, find_units

    units = find_units(model).values()
    step()
    step()
    # after 2 of the 100 scheduled steps the allocator has shrunk the budget on the cubic
    # schedule from s_init = 0 towards the 0.7 target: the second step trained with V(1) (the
    # allocation decided after step 1, applied before step 2's forward); V(2) waits for step 3
    cap = sum(u.numel_update for u in units)
    zeroed = sum(u.sparsity * u.numel_update for u in units) / cap
    expected = 1 - cubic_budget(1, 100, cap, 0.3 * cap) / cap
    assert 0 < expected < 0.7
    assert zeroed == pytest.approx(expected, abs=1e-3)

@pytest.mark.slow
def test_tiny_run_writes_reports(bench, tmp_path):
    rc = bench.main(["--models", "vit_tiny_patch16_224", "--batches", "1", "--img-size", "32",
                     "--methods", "lora", "linear", "--steps", "1", "--warmup", "0",
                     "--repeats", "1", "--tag", "t", "--out-dir", str(tmp_path)],
                    reports=("memory", "speed"))
    assert rc == 0
    for stem in ("memory_t", "speed_t"):
        for ext in ("md", "json", "png"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "memory_t.json").read_text())
    assert set(data["rows"]) == {"vit_tiny_patch16_224|1|lora", "vit_tiny_patch16_224|1|linear"}
    st = data["static"]
    assert st["vit_tiny_patch16_224|linear"]["trainable"] < st["vit_tiny_patch16_224|lora"][
        "trainable"]
    assert all(r["peak_bytes"] > 0 and r["step_s"] > 0 for r in data["rows"].values())
    md = (tmp_path / "memory_t.md").read_text()
    assert "| lora |" in md and "command:" in md


def test_common_eval_sets_record_and_finish(tmp_path, monkeypatch):
    """The helpers bench_distill / bench_init / bench_alloc / bench_saved share: eval sets
    read with the model's transform (test set capped, stratified), one recorded evaluation
    (features cached under a name that includes the set sizes) and the report writer."""
    import argparse

    import timm

    common, distill = _load("_common"), _load("bench_distill")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    sets = common.load_eval_sets(model, {"digits": distill.EVAL_SETS["digits"]},
                                 test_images=40, seed=0)
    tr, te = sets["digits"]
    assert len(te) == 40 and len(tr) > 1000 and tuple(te[0][0].shape) == (3, 32, 32)
    results, timings = {}, {}
    a = argparse.Namespace(device="cpu", knn_k=3, seed=0)
    distill.record(results, timings, "tiny", "tiny", model, sets, a, tmp_path, note=1)
    assert results["tiny"]["note"] == 1 and "eval tiny" in timings
    assert 0 <= results["tiny"]["acc"]["digits"]["knn"] <= 1
    assert list(tmp_path.glob(f"feats_tiny_digits_{len(tr)}_40.safetensors"))
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert common.finish("x_test", ["# title"], {"cpu": "c"}, {"rows": [1]}) == 0
    assert "## Machine" in (tmp_path / "x_test.md").read_text()
    assert json.loads((tmp_path / "x_test.json").read_text())["machine"]["cpu"] == "c"


# ---- bench_quality's protocol: lr grid widened past a winning edge, test read once ----------
def test_quality_grid_widens_to_an_interior_pick_and_tests_only_selected(monkeypatch, tmp_path):
    import math

    q = _load("bench_quality")
    a = q.parse_args(["--tasks", "t:1k", "--variants", "snella-r8", "--seeds", "0,1",
                      "--lrs", '{"snella": [0.001, 0.003, 0.01]}', "--tag", "smoke",
                      "--work", str(tmp_path)])
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    monkeypatch.setattr(q, "write_results", lambda *args, **kw: None)
    study = q.Study(a, base=None, info={})
    trained, tested = [], []

    def fake_train(self, task, variant, seed, lr, key):  # val peaks at lr 0.03 (off the grid)
        trained.append((seed, lr))
        self.runs[key] = {"task": task, "variant": variant, "seed": seed, "lr": lr,
                          "best_val_acc": 1 - (math.log10(lr) - math.log10(0.03)) ** 2,
                          "val_curve": [], "train_wall_s": 1.0, "trainable_params": 1}
        self.models[key] = object()
        return self.runs[key]

    def fake_test(self, key):
        row = self.runs[key]
        if "test_top1" not in row:
            tested.append(key)
            row["test_top1"] = 0.5
        self.models.pop(key, None)
        return row

    monkeypatch.setattr(q.Study, "_train", fake_train)
    monkeypatch.setattr(q.Study, "test", fake_test)
    study.study("t:1k", "snella-r8", {"snella": (0.001, 0.003, 0.01)})
    assert study.searched[("t:1k", "snella-r8")] == [0.001, 0.003, 0.01, 0.0333, 0.111]
    assert study.selected("t:1k", "snella-r8")[0]["lr"] == 0.0333  # interior now
    assert tested == ["t:1k|snella-r8|0|0.0333", "t:1k|snella-r8|1|0.0333"]
    assert [lr for s, lr in trained if s == 1] == [0.0333]
    md = study.report(final=True)[0]
    assert "| t:1k | snella-r8 | 0.001, 0.003, 0.01, 0.0333, 0.111 | 0.0333 | interior |" in md
    assert q.widened([1e-3, 3e-3], 3e-3) == [1e-3, 3e-3, 0.009] and \
        q.widened([1e-3, 3e-3, 1e-2], 3e-3) is None


@pytest.mark.parametrize("lrs", ['{"lora": [0]}', '{"lora": []}', '{"lora": "x"}', "nope",
                                 '{"nomethod": [0.1]}'])
def test_quality_bad_grid_is_exit_2(lrs, capsys):
    q = _load("bench_quality")
    with pytest.raises(SystemExit) as e:
        q.parse_args(["--lrs", lrs])
    assert e.value.code == 2 and "--lrs" in capsys.readouterr().err


# ---- device_pack: the weights carried to a lent GPU, rounded to 24 bits -----------------------
def test_device_pack_round_trip_keeps_24_bits():
    import torch

    dp = _load("device_pack")
    g = torch.Generator().manual_seed(0)
    sd = {"b.weight": torch.randn(7, 5, generator=g) * 1e-3, "a.bias": torch.randn(5,
                                                                                    generator=g),
          "c.scalar": torch.tensor(3.14159), "d.big": torch.tensor([3.4e38, -1e-30, 0.0])}
    header, hi, mid, lo = dp.encode(sd)
    back = dp.decode(header, hi, mid, lo)
    assert sorted(back) == sorted(sd) and header["max_rel_error"] <= 2 ** -16
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == torch.float32
        rel = ((back[k] - v).abs() / v.abs().clamp_min(1e-30)).max().item()
        assert rel <= 2 ** -16, k
        assert (back[k].view(torch.int32) & 0xFF).eq(0).all()  # the dropped byte
    assert not torch.equal(back["a.bias"], sd["a.bias"])  # rounded, not copied


# ---- quality_pool: bench_quality's protocol over parallel runs -------------------------------
def test_quality_pool_chain_searches_first_seed_then_runs_the_pick():
    qp = _load("quality_pool")
    c = qp.Chain({"tag": "t"}, "lora-r8", [1e-3, 3e-3, 1e-2], [0, 1, 2])
    assert c.method == "lora"
    first = c.ready(widen=1)
    assert first == [(0, 1e-3), (0, 3e-3), (0, 1e-2)]
    assert sorted(c.speculative()) == sorted((s, lr) for s in (1, 2) for lr in c.grid)
    c.running.update(first)
    assert c.ready(widen=1) == []  # the grid is still running: nothing else may start
    for lr, val in ((1e-3, 0.5), (3e-3, 0.6), (1e-2, 0.7)):  # the top edge wins
        c.running.discard((0, lr))
        c.rows[(0, lr)] = {"best_val_acc": val}
    assert c.ready(widen=1) == [(0, 0.0333)] and c.pick is None  # widened past the edge
    c.rows[(0, 0.0333)] = {"best_val_acc": 0.65}
    assert c.ready(widen=1) == [(1, 1e-2), (2, 1e-2)] and c.pick == 1e-2
    assert c.speculative() == [] and not c.done()
    c.rows[(1, 1e-2)] = c.rows[(2, 1e-2)] = {"best_val_acc": 0.7}
    assert c.done()


def test_quality_pool_reports_only_what_val_chose(tmp_path):
    import argparse

    qp = _load("quality_pool")
    a = argparse.Namespace(plan="smoke", workers=2, threads=1, device="cpu", widen=0,
                           speculate=True, deadline_s=1.0, scratch=str(tmp_path / "s"),
                           results_dir=str(tmp_path))
    pool = qp.Pool(a)
    c = pool.chains[0]  # linear, grid [1e-3, 1e-2], seeds [0, 1]
    row = {"task": c.group["task"], "variant": c.variant, "best_val_acc": 0.5,
           "val_curve": [0.5], "train_wall_s": 1.0, "trainable_params": 1, "test_top1": 0.4,
           "test_wall_s": 1.0}
    for seed, lr, val in ((0, 1e-3, 0.4), (0, 1e-2, 0.6), (1, 1e-3, 0.9), (1, 1e-2, 0.5)):
        c.rows[(seed, lr)] = dict(row, seed=seed, lr=lr, best_val_acc=val)
    assert c.ready(widen=0) == [] and c.pick == 1e-2 and c.done()
    pool.write()
    runs = json.loads((tmp_path / "quality_pool_smoke.json").read_text())["runs"]
    t = c.group["task"]
    assert sorted(runs) == sorted([f"{t}|linear|0|0.001", f"{t}|linear|0|0.01",
                                   f"{t}|linear|1|0.01"])  # seed 1 at 1e-3: speculative, dropped
    assert "test_top1" not in runs[f"{t}|linear|0|0.001"]  # a grid lr val did not pick
    assert runs[f"{t}|linear|0|0.01"]["test_top1"] == 0.4


def test_quality_ablation_keeps_the_base_options():
    q = _load("bench_quality")
    a = q.parse_args(["--variants", "snella-r8+klr:inner-dense-zero-b"])
    cfg = q.variant_config("snella-r8+klr:inner-dense-zero-b", a)
    assert cfg["method"] == "snell" and cfg["kernel"] == "inner" and cfg["target_sparsity"] == 0
    assert cfg["method_kwargs"] == {"kernel_lr_scale": 0.01, "b_init_scale": 0.0}
    assert q.lr_grid("snella-r8+klr:inner-dense-zero-b", q.DEFAULT_LRS) == q.DEFAULT_LRS["snella"]


def test_quality_report_names_what_differs_from_the_preset():
    q = _load("bench_quality")
    assert q.preset_label(q.parse_args([])) == "Preset `reduced`"
    a = q.parse_args(["--img-size", "112", "--epochs", "10"])
    assert q.preset_label(a) == "Preset `reduced` with img_size 112, epochs 10"


def test_quality_lr_pick_skips_runs_that_never_left_chance():
    q = _load("bench_quality")
    chance = [f"{q.NEVER_LEFT_CHANCE}: val_acc 0.105 at the end (chance 0.100); ..."]
    rows = [dict(lr=3e-3, best_val_acc=0.105, warnings=chance),
            dict(lr=1e-2, best_val_acc=0.11, warnings=chance),
            dict(lr=3e-2, best_val_acc=0.10, warnings=chance)]
    assert q.pick_lr(rows) == 3e-3  # all failed: the lowest, so the grid widens below it
    assert q.widened([3e-3, 1e-2, 3e-2], q.pick_lr(rows))[0] == pytest.approx(9e-4)
    rows.append(dict(lr=1e-3, best_val_acc=0.6, warnings=[]))
    rows.append(dict(lr=3e-4, best_val_acc=0.6, warnings=["the run collapsed: ... keeps"]))
    assert q.pick_lr(rows) == 3e-4  # a kept good epoch is a candidate; ties: the lower lr


def test_quality_mask_variants_and_their_joins_to_lora():
    q = _load("bench_quality")
    a = q.parse_args(["--variants", "snell-r8+mask,snella-r8+fixed+pw+floor+epoch+mask"])
    assert q.variant_config("snell-r8+mask", a)["method_kwargs"] == {"sparsify": "mask"}
    cfg = q.variant_config("snella-r8+fixed+pw+floor+epoch+mask", a)
    assert cfg["method_kwargs"] == {"min_density": 0.1, "sparsify": "mask"}
    assert cfg["init_sparsity"] == cfg["target_sparsity"] == a.sparsity
    # a fixed budget starts where an ablation puts the target, not at --sparsity
    cfg = q.variant_config("snella-r8+fixed+inner+floor+epoch+mask:sparsity-0.5", a)
    assert cfg["init_sparsity"] == cfg["target_sparsity"] == 0.5 != a.sparsity
    # every SNELL / SNELLA row and ablation is compared with the LoRA of its rank
    assert [q._lora_of(v) for v in ("snell-r8+mask", "snella-r32", "snell-r8:dense",
                                    "snella-r8+klr:inner-dense")] == \
        ["lora-r8", "lora-r32", "lora-r8", "lora-r8"]


def _study_json(path, seeds, picks):
    """A finished study's JSON: per (variant, seed) one tested run; seeds[0] also runs a
    grid value val likes less. ``picks``: variant -> [test accuracy per seed]."""
    runs, common = {}, dict(warnings=[], trainable_params=1, train_wall_s=1.0, val_curve=[])
    for v, accs in picks.items():
        for s, acc in zip(seeds, accs):
            runs[f"t|{v}|{s}|0.001"] = dict(task="t", variant=v, seed=s, lr=1e-3,
                                             best_val_acc=0.8, test_top1=acc, **common)
        runs[f"t|{v}|{seeds[0]}|0.01"] = dict(task="t", variant=v, seed=seeds[0], lr=1e-2,
                                               best_val_acc=0.7, **common)
    args = {"seeds": ",".join(map(str, seeds)), "seed_list": seeds, "task_list": ["t"],
            "variant_list": list(picks)}  # as bench_quality records them
    path.write_text(json.dumps({"args": args, "runs": runs, "complete": True}))


def test_quality_pools_paired_differences_over_replicate_studies(monkeypatch, tmp_path):
    q = _load("bench_quality")
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    _study_json(tmp_path / "quality_one.json", [0, 1], {"lora-r8": [0.80, 0.80],
                                                        "snell-r8": [0.81, 0.79]})
    _study_json(tmp_path / "quality_two.json", [5, 6], {"lora-r8": [0.70, 0.70],
                                                        "snell-r8": [0.73, 0.72]})
    studies = [(t, json.loads((tmp_path / f"quality_{t}.json").read_text())["runs"], s)
               for t, s in (("one", 0), ("two", 5))]
    rows = q.pooled_rows(studies, ["t"], ["lora-r8", "snell-r8"])
    assert rows == [["t", "snell-r8 - lora-r8", "+0.00 (2)", "+2.50 (2)", "+1.25 ± 1.71", "4",
                     "3 of 4"]]
    # the CLI: a tag with no results, or a study of the same seeds, is refused (exit 2)
    with pytest.raises(SystemExit) as e:
        q.parse_args(["--pool-with", "three"])
    assert e.value.code == 2
    written = {}
    monkeypatch.setattr(q, "write_results", lambda name, md, *args, **kw: written.update(
        {name: md}))
    assert q.main(["--report-only", "--tag", "two", "--pool-with", "one", "--tasks", "t",
                   "--variants", "lora-r8,snell-r8"]) == 0
    assert "| t | snell-r8 - lora-r8 | +2.50 (2) | +0.00 (2) | +1.25 ± 1.71 | 4 | 3 of 4 |" \
        in written["quality_two"]
    _study_json(tmp_path / "quality_three.json", [6, 7], {"lora-r8": [0.7, 0.7]})
    assert q.main(["--report-only", "--tag", "two", "--pool-with", "three", "--tasks", "t",
                   "--variants", "lora-r8,snell-r8"]) == 2


def test_quality_val_best_picks_a_candidate_on_the_first_seeds_val_never_on_test():
    q = _load("bench_quality")

    def run(v, seed, val, test):
        return {f"t|{v}|{seed}|0.001": dict(task="t", variant=v, seed=seed, lr=1e-3,
                                            best_val_acc=val, test_top1=test, warnings=[])}
    runs = {**run("lora-r8", 0, 0.8, 0.80), **run("lora-r8", 1, 0.8, 0.80),
            **run("snell-r8", 0, 0.7, 0.99), **run("snell-r8", 1, 0.7, 0.99),  # best on test
            **run("snella-r8", 0, 0.9, 0.82), **run("snella-r8", 1, 0.5, 0.78)}
    among = ["snell-r8", "snella-r8"]
    assert q.val_best(runs, "t", among, 0) == "snella-r8"  # seed 0's val, not the test figure
    sel = q.select_runs(runs, "t", q.VAL_BEST, 0, among=among)
    assert {s: r["test_top1"] for s, r in sel.items()} == {0: 0.82, 1: 0.78}
    assert (q.VAL_BEST, "lora-r8") in q.joins_of(["lora-r8"], among)
    assert q.val_best(runs, "t", [*among, "snella-r32"], 0) is None  # a candidate not run yet
    with pytest.raises(SystemExit) as e:
        q.parse_args(["--select-among", "snell-r8"])
    assert e.value.code == 2


def test_alloc_units_off_counts_from_a_run_checkpoint(tmp_path, monkeypatch, capsys):
    import torch
    mod = _load("alloc_units_off")
    assert [mod.kind(f"blocks.0.attn.qkv.snell_units.default.{i}") for i in range(3)] == \
        ["q", "k", "v"]
    assert mod.kind("blocks.0.mlp.fc1.snell_units.default.0") == "fc1"
    names = ["blocks.0.attn.qkv.snell_units.default.0", "blocks.0.attn.qkv.snell_units.default.1",
             "blocks.0.mlp.fc1.snell_units.default.0"]
    hist = [(0, dict.fromkeys(names, 0.7)), (1, dict(zip(names, (0.995, 0.5, 0.6)))),
            (9, dict(zip(names, (0.999, 0.995, 0.2))))]
    run = tmp_path / "t" / "v" / "s0_0.01"
    (run / "checkpoint").mkdir(parents=True)
    torch.save({"callbacks": {"0": {"history": hist}}}, run / "checkpoint" / "state.pt")
    monkeypatch.setattr(mod, "write_results",
                        lambda stem, md, data: (tmp_path / f"{stem}.json").write_text(
                            json.dumps(data)))
    assert mod.main([str(run), "--tag", "t"]) == 0
    got = json.loads((tmp_path / "alloc_units_off_t.json").read_text())["runs"]["t/v/s0_0.01"]
    assert (got["units"], got["off_first"], got["off_end"]) == (3, 1, 2)
    assert got["final_mean_sparsity"]["fc1"] == pytest.approx(0.2)
    with pytest.raises(SystemExit) as e:
        mod.main([str(tmp_path / "missing")])
    assert e.value.code == 2


def test_count_step_ops_attributes_ops_to_parts(tmp_path, monkeypatch):
    """count_step_ops: LoRA has no allocator ops, SNELLA's allocator shows up under callbacks,
    every part of a SNELLA step is counted; written to step_ops_<tag>.json."""
    mod = _load("count_step_ops")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path)
    assert mod.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1",
                     "--variants", "lora,snella", "--tag", "t"]) == 0
    data = json.loads((tmp_path / "step_ops_t.json").read_text())["variants"]
    assert data["lora"]["kernel_ops"]["callbacks"] == 0 and data["lora"]["units"] == 0
    snella = data["snella"]["kernel_ops"]
    assert data["snella"]["units"] > 0 and snella["callbacks"] > 0
    assert all(snella[p] > 0 for p in ("forward", "backward", "optimizer"))
    assert sum(snella.values()) > sum(data["lora"]["kernel_ops"].values())
