"""The bad-input table: every mistake of issue 13 run through the ``trimtune`` command line on
tiny random models, with its exit code and the one line it prints.

    python benchmarks/bad_input_table.py            # writes benchmarks/results/bad_input.md

The same cases are the parametrised test ``tests/test_bad_input.py`` (which also checks that
nothing already saved changed). Each case runs ``trimtune.cli.main(argv)`` in this process;
fixtures (tiny model folders, image folders, finished and interrupted runs) are built once in
a temporary folder, and paths in the table are shown relative to it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
DATA = "synthetic:classes=4,n=32,size=32"
FAST = ["--batch-size", "8", "--no-progress"]


@dataclass
class Case:
    """One bad input: ``argv`` may name fixtures as ``{name}``; ``expect`` is a substring of
    the one line; ``keep`` names a fixture folder that must be byte-identical afterwards;
    ``patch`` wraps the call (e.g. a simulated full disk)."""

    name: str
    argv: list[str]
    expect: str
    code: int = 2
    keep: str | None = None
    patch: Callable[[], contextlib.AbstractContextManager] | None = None
    stream: str = "stderr"
    fmt: dict = field(default_factory=dict)


@contextlib.contextmanager
def _full_disk():
    """Every atomic rename fails as on a full disk (ENOSPC)."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    os.replace = replace
    try:
        yield
    finally:
        os.replace = real


@contextlib.contextmanager
def _small_disk():
    """The file system reports 1 KiB free (trimtune checks before a large write)."""
    real = shutil.disk_usage
    shutil.disk_usage = lambda path: real(path)._replace(free=1024)
    try:
        yield
    finally:
        shutil.disk_usage = real


CASES = [
    Case("unreadable image (not an image)",
         ["finetune", "--model", "{base}", "--data", "{img_bad}", "--epochs", "1", *FAST,
          "--out", "{out}"], "zz_bad.png"),
    Case("truncated image",
         ["finetune", "--model", "{base}", "--data", "{img_trunc}", "--epochs", "1", *FAST,
          "--out", "{out}"], "zz_bad.png"),
    Case("--img-size 0", ["compress", "--model", "vit_tiny_patch16_224", "--img-size", "0",
                          "--out", "{out}"], "img_size=0"),
    Case("--img-size negative", ["compress", "--model", "vit_tiny_patch16_224", "--img-size",
                                 "-32", "--out", "{out}"], "img_size=-32"),
    Case("--out is an existing file",
         ["finetune", "--model", "{base}", "--data", DATA, *FAST, "--out", "{a_file}"],
         "is an existing file"),
    Case("--out is a read-only folder",
         ["finetune", "--model", "{base}", "--data", DATA, *FAST, "--out", "{read_only}/run"],
         "is not writable"),
    Case("full disk (simulated: every rename fails with ENOSPC)",
         ["finetune", "--model", "{base}", "--data", DATA, "--epochs", "1", *FAST,
          "--out", "{out}"], "no space left on the device", patch=_full_disk),
    Case("--out holds a finished run (no --resume / --overwrite)",
         ["finetune", "--model", "{base}", "--data", DATA, *FAST, "--out", "{run_done}"],
         "already holds a run", keep="run_done"),
    Case("--resume with no checkpoint in --out",
         ["finetune", "--model", "{base}", "--data", DATA, *FAST, "--resume", "--out",
          "{out}"], "no training checkpoint"),
    Case("--resume with another --lr",
         ["finetune", "--model", "{base}", "--data", DATA, "--method", "snella", "--r", "4",
          "--epochs", "2", "--lr", "0.01", *FAST, "--resume", "--out", "{run_part}"],
         "lr=0.01 differs", keep="run_part"),
    Case("--resume with another --r",
         ["finetune", "--model", "{base}", "--data", DATA, "--method", "snella", "--r", "2",
          "--epochs", "2", *FAST, "--resume", "--out", "{run_part}"], "r=2 differs",
         keep="run_part"),
    Case("--resume with another --method",
         ["finetune", "--model", "{base}", "--data", DATA, "--method", "lora", "--r", "4",
          "--epochs", "2", *FAST, "--resume", "--out", "{run_part}"], "method='lora' differs",
         keep="run_part"),
    Case("--r 100000 (snella)",
         ["finetune", "--model", "{base}", "--data", DATA, "--r", "100000", *FAST,
          "--out", "{out}"], "is above min(d_in, d_out)"),
    Case("--r 1000 (lora, 64-wide layers)",
         ["finetune", "--model", "{base}", "--data", DATA, "--method", "lora", "--r", "1000",
          *FAST, "--out", "{out}"], "is above min(d_in, d_out)"),
    Case("single-class dataset",
         ["finetune", "--model", "{base}", "--data", "{one_class}", *FAST, "--out", "{out}"],
         "has 1 class"),
    Case("merge a LoRA run whose base folder now holds another width",
         ["merge", "{run_lora_wide}", "--out", "{out}"], "changed since",
         keep="run_lora_wide"),
    Case("merge a run whose base folder was replaced (same shapes)",
         ["merge", "{run_lora_same}", "--out", "{out}"], "changed since",
         keep="run_lora_same"),
    Case("distillation teacher of another width",
         ["distill", "--student", "{student}", "--teacher", "{base_wide}", "--data", DATA,
          "--epochs", "1", *FAST, "--out", "{out}"], "teacher width 128 != student width 64"),
    Case("--lr 1e30 (loss becomes NaN)",
         ["finetune", "--model", "{base}", "--data", DATA, "--method", "full", "--lr", "1e30",
          "--epochs", "3", *FAST, "--out", "{out}"], "non-finite loss"),
    Case("compress --out holds a model (no --overwrite)",
         ["compress", "--model", "{base}", "--out", "{student}"], "already holds a model",
         keep="student"),
    Case("compress --out holds the user's own files",
         ["compress", "--model", "{base}", "--out", "{my_files}"], "is not empty",
         keep="my_files"),
    Case("merge --out onto an existing model folder",
         ["merge", "{run_done}", "--out", "{base_wide}"], "already holds a model",
         keep="base_wide"),
    Case("export --out into a non-empty folder",
         ["export", "{base}", "--out", "{my_files}"], "is not empty", keep="my_files"),
    Case("distill --out holds the user's own files",
         ["distill", "--student", "{student}", "--teacher", "{base}", "--data", DATA,
          "--epochs", "1", *FAST, "--out", "{my_files}"], "is not empty", keep="my_files"),
    Case("finetune --out holds the user's own files",
         ["finetune", "--model", "{base}", "--data", DATA, *FAST, "--out", "{my_files}"],
         "is not empty", keep="my_files"),
    Case("--overwrite --resume with no interrupted --overwrite run",
         ["finetune", "--model", "{base}", "--data", DATA, "--epochs", "1", *FAST,
          "--overwrite", "--resume", "--out", "{run_done}"], "there is none", keep="run_done"),
    Case("not enough free space (simulated: 1 KiB free)",
         ["compress", "--model", "{base}", "--out", "{out}"], "not enough free space",
         patch=_small_disk),
    Case("--val-data held out of --data (not an error: a note, exit 0)",
         ["finetune", "--model", "{base}", "--data", "synthetic:20", "--val-data",
          "synthetic:20@val", "--method", "linear", "--epochs", "1", *FAST, "--out", "{out}"],
         "training on synthetic:20@train800", code=0, stream="stdout"),
]


def _tiny(width: int = 64, classes: int = 4, seed: int = 0):
    import trimtune as tt
    return tt.create_backbone("vit_tiny_patch16_224", pretrained=False, num_classes=classes,
                              seed=seed, **{**TINY, "embed_dim": width})


def _images(root: Path, classes: list[str], bad: str | None = None) -> str:
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(8):
            Image.fromarray(np.full((32, 32, 3), 20 * i + j, np.uint8)).save(root / c / f"{j}.png")
    if bad:
        good = (root / classes[-1] / "0.png").read_bytes()
        (root / classes[-1] / "zz_bad.png").write_bytes(
            good[: len(good) // 2] if bad == "truncated" else b"this is not an image")
    return str(root)


def build_fixtures(tmp: Path) -> dict[str, str]:
    """Model folders, image folders and runs the cases refer to (a few seconds of training)."""
    import trimtune as tt
    from trimtune.cli import main
    from trimtune.runs import save_model
    f = {"tmp": str(tmp)}
    f["base"] = str(save_model(_tiny(), tmp / "base"))
    f["base_wide"] = str(save_model(_tiny(width=128), tmp / "base_wide"))
    f["student"] = str(tt.save_compressed(tt.compress(_tiny(), ratio=2.0), tmp / "student"))
    f["img_bad"] = _images(tmp / "img_bad", ["a", "b"], bad="junk")
    f["img_trunc"] = _images(tmp / "img_trunc", ["a", "b"], bad="truncated")
    f["one_class"] = _images(tmp / "one_class", ["only"])
    (tmp / "a_file").write_text("not a folder")
    (tmp / "my_files").mkdir()
    (tmp / "my_files" / "notes.txt").write_text("the user's own file, not trimtune's")
    f["my_files"] = str(tmp / "my_files")
    f["a_file"] = str(tmp / "a_file")
    if os.geteuid() == 0:  # root writes into any folder: use one the kernel refuses
        f["read_only"] = "/sys/trimtune-bad-input"
    else:
        (tmp / "read_only").mkdir()
        (tmp / "read_only").chmod(0o500)
        f["read_only"] = str(tmp / "read_only")

    def run(argv: list[str]) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
        assert code == 0, argv

    run(["finetune", "--model", f["base"], "--data", DATA, "--epochs", "1", *FAST,
         "--out", tmp / "run_done"])
    run(["finetune", "--model", f["base"], "--data", DATA, "--method", "snella", "--r", "4",
         "--epochs", "2", "--max-steps", "3", *FAST, "--out", tmp / "run_part"])
    for name, replacement in (("wide", _tiny(width=128)), ("same", _tiny(seed=1))):
        base = save_model(_tiny(), tmp / f"base_{name}_run")
        run(["finetune", "--model", base, "--data", DATA, "--method", "lora", "--r", "2",
             "--epochs", "1", *FAST, "--out", tmp / f"run_lora_{name}"])
        shutil.rmtree(base)
        save_model(replacement, base)  # the base folder now holds another model
    f.update({k: str(tmp / k) for k in ("run_done", "run_part", "run_lora_wide",
                                        "run_lora_same")})
    return f


def snapshot(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_case(case: Case, fixtures: dict[str, str], out: Path) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of the case through ``trimtune.cli.main``."""
    from trimtune.cli import main
    argv = [a.format(**fixtures, out=out) for a in case.argv]
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se), \
            (case.patch() if case.patch else contextlib.nullcontext()):
        code = main(argv)
    return code, so.getvalue(), se.getvalue()


def shown(argv: list[str], fixtures: dict[str, str], out: Path) -> str:
    text = " ".join(a.format(**fixtures, out=out) for a in argv)
    return text.replace(fixtures["tmp"] + "/", "").replace(str(out), "out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bad_input.md"),
                    help="markdown file to write")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fixtures = build_fixtures(tmp)
        for i, case in enumerate(CASES):
            out = tmp / f"out{i}"
            before = snapshot(fixtures[case.keep]) if case.keep else None
            code, so, se = run_case(case, fixtures, out)
            text = (se if case.stream == "stderr" else so).strip()
            line = next((ln for ln in text.splitlines() if case.expect in ln), text[-300:])
            kept = "" if before is None else (
                "yes" if snapshot(fixtures[case.keep]) == before else "**NO**")
            ok = code == case.code and case.expect in line and (
                case.stream == "stdout" or len(se.strip().splitlines()) == 1)
            rows.append((case.name, shown(case.argv, fixtures, out), code, line.replace(
                fixtures["tmp"] + "/", "").replace("|", "\\|"), kept, ok))
            print(f"{'ok ' if ok else 'BAD'} {code} {case.name}", file=sys.stderr)
    lines = ["# Bad input: one line, exit code 2, nothing saved is touched", "",
             f"Written by `python benchmarks/bad_input_table.py` ({time.strftime('%Y-%m-%d')}, "
             f"{time.time() - t0:.0f} s on a shared 2-core CPU machine); the same cases are "
             "the test `tests/test_bad_input.py`. Tiny random ViTs (width 64, 2 blocks, 32 px); "
             "paths relative to the temporary fixture folder; `out` is a new folder. "
             "*Kept* = the run folder the command pointed at is byte-identical afterwards.", "",
             "| case | command | exit | the one line (stderr) | kept | as expected |",
             "|---|---|---|---|---|---|"]
    for name, cmd, code, line, kept, ok in rows:
        lines.append(f"| {name} | `{cmd}` | {code} | {line} | {kept} | "
                     f"{'yes' if ok else '**NO**'} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
