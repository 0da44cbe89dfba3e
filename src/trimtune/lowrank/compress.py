"""``compress()``: replace a model's linear layers by truncated-SVD factorisations (PELA §1).

Which layers: every ``nn.Linear`` except those whose qualified name matches a skip pattern
(``norm``, ``head``, ``patch_embed``, ``downsample``) and those with fewer than 10 outputs. User
``include`` patterns replace that default selection; ``exclude`` patterns are always removed.
Both follow the one rule of every tuner (:mod:`trimtune.tuners.targets`, PEFT's
``target_modules`` / ``exclude_modules``): a string is a regex over the whole qualified name, a
list holds names or dotted name suffixes; a miss names the closest module names.

Which rank (one policy, plus per-layer ``overrides``):

- ``ratio=c``: the authors' rule ``r = floor(in * out / (c * (in + out)))``;
- ``energy=e``: the smallest r whose singular values keep a fraction e of ``||W||_F^2``;
- ``r=r``: a fixed rank (clamped to ``min(in, out)``; ``rank=``: the old spelling, deprecated).

A layer whose rank would not save parameters (``r * (in + out) >= in * out``) stays dense unless
``keep_dense_if_no_saving=False``.

Which factors (``init``):

- ``"svd"``: PELA's truncated SVD of ``W``, the best rank-r weight (Eckart-Young);
- ``"whiten"``: SVD-LLM's truncation-aware whitening: SVD of ``W S`` with ``S`` the Cholesky
  factor of the layer's calibration inputs' Gram matrix ``X^T X``, ``S^-1`` folded back into
  the first factor: the best rank-r layer for the calibration outputs, min ``||(W - W_r) X^T||_F``.
  The Gram matrix is taken per input vector (``X^T X / n``; SVD-LLM sums it): the same product
  ``W2 W1``, but the singular values split between the factors no longer grow with the
  calibration set, so the input of ``.second`` (what a tuner on a factorised layer adapts) keeps
  the original layer's scale instead of shrinking 5-20x
  (``benchmarks/results/init_fidelity_scale56_cpu.md``);
- ``"asvd"``: ASVD's activation scaling: SVD of ``W diag(mean|x|^alpha)``, the scale folded back.

The data-aware inits read a few hundred unlabeled ``calib`` images streamed through the original
model (:mod:`.calibrate`); rank policies apply to the weighted spectrum (for ``energy``: the
fraction of the calibration output energy kept).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import TrimtuneError, renamed
from ..models.probe import Probe, check_forward_path, route_through_modules
from .io import get_arch, route_save_pretrained
from .layers import (LowRankLinear, activation_scale, factorised_layers, gram_eigh_many,
                     is_compressed, svd_from_gram, truncated_svd, weighted_target,
                     whitening_factor)

DEFAULT_SKIP: tuple[str, ...] = ("norm", "head", "patch_embed", "downsample")
#: :data:`DEFAULT_SKIP` as one pattern of the tuners' rule: any name that contains one of them
_DEFAULT_SKIP_RULE = r".*(" + "|".join(DEFAULT_SKIP) + r").*"
MIN_OUT_FEATURES = 10
RANDOMIZED_MIN_DIM = 4096  # svd="auto" uses torch.svd_lowrank when min(in, out) >= this
INITS = ("svd", "whiten", "asvd")

__all__ = ["compress", "is_compressed", "factorised_layers", "select_layers", "rank_for",
           "get_arch", "DEFAULT_SKIP"]


# ----------------------------------------------------------------------------- selection
def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain ``nn.Linear`` that can be swapped (not inside ``nn.MultiheadAttention``,
    which reads ``out_proj.weight`` directly)."""
    inside_mha = {f"{n}.out_proj" for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention)}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n not in inside_mha}


def _as_recorded(patterns):
    """Patterns as trimtune.json records them: a string as is, a list as a list, else None."""
    return patterns if isinstance(patterns, str) or patterns is None else list(patterns) or None


def _check_regex(patterns, what: str) -> None:
    """A string pattern must compile (a list holds plain names / suffixes)."""
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as e:
            raise TrimtuneError(f"{what} pattern {patterns!r} is not a valid regex ({e}): fix "
                                "it") from e


def select_layers(model: nn.Module, include=None, exclude=None,
                  min_out_features: int = MIN_OUT_FEATURES) -> tuple[dict[str, nn.Linear], list]:
    r"""Linear layers ``compress`` would factorise, and the skip patterns that applied.

    The one rule of every tuner (:func:`trimtune.tuners.targets.select_linears`, PEFT's): a
    string is a regex over the whole qualified name (``r".*mlp\.fc\d"``), a list holds names or
    dotted name suffixes (``["qkv", "mlp.fc1"]``), ``"all-linear"`` every linear. ``include``
    replaces the default selection (every linear but :data:`DEFAULT_SKIP` and those with fewer
    than ``min_out_features`` outputs); ``exclude`` (PEFT's ``exclude_modules``) is always
    removed, and each of its entries must match a linear.

    Returns:
        ``({name: linear}, skip_patterns)``.
    """
    from ..tuners.targets import closest_names, matches, select_linears

    linears = _linears(model)
    if not linears:
        raise TrimtuneError("the model has no nn.Linear layer to factorise: pass a Transformer "
                            "(e.g. a timm ViT) or a model built from nn.Linear layers")
    _check_regex(include, "include")
    _check_regex(exclude, "exclude")
    entries = [exclude] if isinstance(exclude, str) else list(exclude or ())
    for pat in entries:
        one = pat if isinstance(exclude, str) else [pat]
        if not any(matches(n, one) for n in linears):
            raise TrimtuneError(
                f"exclude pattern {pat!r} matches no linear layer (PEFT's rule: a string is a "
                "regex over the whole name, a list holds names or name suffixes); closest "
                f"module names: {', '.join(closest_names(one, list(linears)))}")
    if include is not None:
        picked = select_linears(model, include, warn=False, what="include")
        chosen = {n: linears[n] for n in picked if n in linears and not matches(n, exclude)}
        skip = list(entries)
    else:
        chosen = {n: m for n, m in linears.items()
                  if not matches(n, _DEFAULT_SKIP_RULE) and not matches(n, exclude)
                  and m.out_features >= min_out_features}
        skip = list(DEFAULT_SKIP) + entries
    if not chosen:
        raise TrimtuneError("no linear layer left to factorise after include/exclude and the "
                            f"default skips {DEFAULT_SKIP}: widen include or narrow exclude")
    return chosen, skip


# ----------------------------------------------------------------------------- rank policies
def rank_for(in_features: int, out_features: int, *, ratio: float | None = None,
             energy: float | None = None, rank: int | None = None,
             spectrum: torch.Tensor | None = None, total_energy: float | None = None) -> int:
    """Rank of one layer under one policy (ratio: authors' rule; energy: needs ``spectrum``)."""
    full = min(in_features, out_features)
    if rank is not None:
        return min(int(rank), full)
    if energy is not None:
        s2 = spectrum.double() ** 2
        total = float(s2.sum()) if total_energy is None else total_energy
        kept = torch.cumsum(s2, 0) / max(total, 1e-300)
        r = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1
        return max(1, min(r, full))
    assert ratio is not None
    return max(1, min(full, math.floor(in_features * out_features
                                       / (ratio * (in_features + out_features)))))


def _check_policy(ratio, energy, rank, overrides, svd) -> dict[str, Any]:
    if energy is not None and rank is not None:
        raise TrimtuneError("give one rank policy: energy=... or r=..., not both")
    if (energy is not None or rank is not None) and ratio not in (None, 2.0):
        raise TrimtuneError("give one rank policy: ratio=..., energy=... or r=..., not several")
    if energy is not None:
        if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise TrimtuneError(f"energy={energy!r} must be in (0, 1] (fraction of the squared "
                                "singular values kept): e.g. energy=0.9")
        policy: dict[str, Any] = {"type": "energy", "energy": float(energy)}
    elif rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise TrimtuneError(f"r={rank!r} must be a positive integer rank: e.g. r=64")
        policy = {"type": "rank", "rank": rank}
    else:
        ratio = 2.0 if ratio is None else ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1:
            raise TrimtuneError(f"ratio={ratio!r} must be > 1 (each layer keeps about 1/ratio of "
                                "its weights): e.g. ratio=2 (DeiT-B), 1.5 (Swin-B), 3")
        policy = {"type": "ratio", "ratio": float(ratio)}
    for pat, r in (overrides or {}).items():
        _check_regex(pat, "overrides")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise TrimtuneError(f"overrides[{pat!r}] = {r!r} must be a positive integer rank")
    if svd not in ("auto", "full", "gram", "randomized"):
        raise TrimtuneError(f"svd={svd!r}: use 'auto', 'full', 'gram' or 'randomized'")
    if svd == "randomized" and energy is not None:
        raise TrimtuneError("the energy policy needs the full spectrum: use svd='full' or 'auto'")
    policy["overrides"] = dict(overrides or {})
    return policy


# ----------------------------------------------------------------------------- compress
@renamed(rank="r")
def compress(
    model: nn.Module,
    ratio: float | None = 2.0,
    *,
    energy: float | None = None,
    r: int | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    overrides: Mapping[str, int] | None = None,
    svd: str = "auto",
    svd_dtype: torch.dtype = torch.float32,
    init: str = "svd",
    calib=None,
    calib_images: int = 256,
    calib_batch_size: int = 32,
    damp: float = 1e-6,
    asvd_alpha: float = 0.5,
    keep_dense_if_no_saving: bool = True,
    min_out_features: int = MIN_OUT_FEATURES,
    inplace: bool = False,
    return_spectra: bool = False,
    probe: Probe = True,
):
    """Factorise the linear layers of ``model`` by truncated SVD (PELA).

    Args:
        model: any ``nn.Module`` (typically a timm ViT / DeiT / Swin / DINOv2).
        ratio: compression ratio c of the authors' rule ``r = floor(in*out / (c*(in+out)))``.
        energy: instead of ``ratio``: keep the smallest r with ``sum(S[:r]^2) >= energy *
            ||W||_F^2``; in (0, 1].
        r: instead of ``ratio``: a fixed rank, clamped to ``min(in, out)`` (``rank=``: the
            old spelling, a DeprecationWarning, for one release).
        include: which linears are candidates, by the tuners' rule (PEFT's ``target_modules``:
            a string is a regex over the whole name, a list names or name suffixes); when
            given, no default skips (:func:`select_layers`).
        exclude: linears to keep dense, by the same rule (PEFT's ``exclude_modules``), added
            to the default skips.
        overrides: ``{regex: rank}``; the first pattern matching a layer sets its rank.
        svd: ``"full"`` (``torch.linalg.svd``), ``"gram"`` (float64 ``eigh`` of the smaller Gram
            matrix, 2-3x faster on CPU), ``"randomized"`` (``torch.svd_lowrank``) or ``"auto"``
            (randomized when ``min(in, out) >= 4096`` and the policy does not need the whole
            spectrum, else gram).
        svd_dtype: dtype the SVD runs in (``torch.float64`` for bit-exact work).
        init: ``"svd"`` (PELA, the default), ``"whiten"`` (SVD-LLM) or ``"asvd"`` (see the
            module docstring); the data-aware two need ``calib``.
        calib: unlabeled calibration images: a dataset spec (``"fashion-mnist"``, read with the
            model's evaluation transform), a ``Dataset``, a ``DataLoader`` or an image tensor.
        calib_images: how many calibration images to stream through the model (default 256).
        calib_batch_size: images per forward pass while calibrating.
        damp: whitening: ``lam / mean(diag(X^T X))`` added to the Gram matrix's diagonal; raised
            tenfold (with a warning) while the Gram matrix is too ill-conditioned to factorise.
        asvd_alpha: ASVD: exponent of the channel scale ``mean|x|^alpha``.
        keep_dense_if_no_saving: leave a layer dense when ``r*(in+out) >= in*out``.
        min_out_features: linears with fewer outputs stay dense (default skip rule only).
        inplace: modify ``model`` instead of a deep copy.
        return_spectra: also return ``{layer name: singular values (float32 CPU)}``.
        probe: prove with one probe forward / backward that every factorised layer is called
            and reached by the gradient (:func:`trimtune.models.probe.check_forward_path`):
            True builds a random batch from the model, an example input is used as given,
            False skips the check.

    Returns:
        the compressed model (``model.trimtune_lowrank`` records ``ranks``, ``policy``,
        ``skip``, ``energy`` (kept fraction per layer), ``kept_dense`` and ``init`` (method and
        calibration); ``model.trimtune_arch`` is kept;
        ``model.trimtune_spectra`` holds the singular values for :func:`plot_spectra`), or
        ``(model, spectra)`` when ``return_spectra``.
    """
    rank = r
    policy = _check_policy(ratio, energy, rank, overrides, svd)
    if is_compressed(model):
        raise TrimtuneError("this model is already compressed: compress the original model, or "
                            "pass r/overrides to compress again from a dense model")
    chosen, skip = select_layers(model, include, exclude, min_out_features)
    if energy is not None and any(m.weight.is_meta for m in chosen.values()):
        raise TrimtuneError("the energy policy needs real weights, not a meta-device model: "
                            "use ratio= or r= to plan ranks on the meta device")
    override_pats = list((overrides or {}).items())
    for pat, _ in override_pats:
        if not any(re.search(pat, n) for n in chosen):
            raise TrimtuneError(f"overrides pattern {pat!r} matches no layer being factorised: "
                                f"check the names (e.g. {next(iter(chosen))!r})")
    try:
        arch = get_arch(model)
    except TrimtuneError:
        arch = None  # compress works on any model; save_compressed will ask for the arch
    stats, init_record = _calibrate(model, chosen, init, calib, calib_images, calib_batch_size,
                                    damp, asvd_alpha)

    # 1. what each layer factorises (W, or W S for the data-aware inits), how, and the rank
    #    when the policy needs no spectrum
    sdtype = torch.float64 if stats is not None else svd_dtype
    plan: dict[str, dict[str, Any]] = {}
    kept_dense: dict[str, str] = {}
    for name, lin in chosen.items():
        n_in, n_out = lin.in_features, lin.out_features
        r_over = next((r for pat, r in override_pats if re.search(pat, name)), None)
        need_spectrum = r_over is None and energy is not None
        method = svd
        if svd == "auto":
            method = ("randomized" if min(n_in, n_out) >= RANDOMIZED_MIN_DIM
                      and not need_spectrum else "gram")
        r = None if need_spectrum else (
            min(r_over, n_in, n_out) if r_over is not None else
            rank_for(n_in, n_out, ratio=policy.get("ratio"), rank=rank))
        if r is not None and keep_dense_if_no_saving and r * (n_in + n_out) >= n_in * n_out:
            kept_dense[name] = f"rank {r} saves no parameters"
            continue
        if method == "randomized" and r is not None and r >= min(n_in, n_out):
            method = "gram"
        if need_spectrum and method == "randomized":
            method = "gram"
        target = lin.weight
        if stats is not None:  # the data-aware inits factorise W S (S invertible)
            if init == "whiten":
                # per-row Gram: the product W2 W1 is the same for any scale of S, but the
                # split of the spectrum between the factors is not: with the summed Gram, S and
                # the singular values grow as sqrt(calibration tokens), and .second's input
                # (what an adapter on .second sees) shrinks as n^(1/4) (DINOv2-S, 4,352 tokens:
                # 5-20x below the original layer's input; per row: on the original's scale)
                right, used = whitening_factor(stats[name].second_moment, damp)
                if used > damp:
                    init_record["damped"][name] = used
            else:
                right = activation_scale(stats[name].abs_mean, asvd_alpha)
            target = weighted_target(lin.weight, right)
        plan[name] = {"rank": r, "method": method, "target": target}

    # 2. the eigen-decompositions of the gram-method layers, side by side (gram_eigh_many)
    todo = [n for n, p in plan.items() if p["method"] == "gram" and not p["target"].is_meta]
    eig: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(
        zip(todo, gram_eigh_many([plan[n]["target"] for n in todo], sdtype)))

    # 3. per layer: the rank (from the spectrum for the energy policy) and the factors
    ranks: dict[str, int] = {}
    kept_energy: dict[str, float] = {}
    spectra: dict[str, torch.Tensor] = {}
    new_layers: dict[str, nn.Module] = {}
    for name, p in plan.items():
        lin, target, r = chosen[name], p["target"], p["rank"]
        n_in, n_out = lin.in_features, lin.out_features
        full = min(n_in, n_out)
        if target.is_meta:  # planning on the meta device: ranks and sizes, no values
            ranks[name] = r
            new_layers[name] = LowRankLinear(n_in, n_out, r, bias=lin.bias is not None,
                                             device="meta", dtype=lin.weight.dtype)
            continue
        usv = None
        if name in eig:
            s_full, vec = eig[name]
        else:
            usv = truncated_svd(target, full if r is None else r, svd=p["method"], dtype=sdtype)
            s_full = usv[1]
        total = (float(s_full.double().pow(2).sum()) if len(s_full) == full
                 else float(target.detach().double().pow(2).sum()))  # = ||W S||_F^2
        if r is None:  # energy policy
            r = rank_for(n_in, n_out, energy=energy, spectrum=s_full, total_energy=total)
            if keep_dense_if_no_saving and r * (n_in + n_out) >= n_in * n_out:
                kept_dense[name] = f"rank {r} saves no parameters"
                continue
        if name in eig:
            usv = svd_from_gram(target, s_full, vec, r)
            s_full = usv[1]
        ranks[name] = r
        new_layers[name] = (LowRankLinear.from_svd(lin, *usv, rank=r) if stats is None else
                            LowRankLinear.from_weighted_svd(lin, usv[0], usv[1], rank=r))
        s = s_full.detach().float().cpu()
        kept_energy[name] = min(1.0, float((s[:r].double() ** 2).sum()) / max(total, 1e-300))
        spectra[name] = s
    ranks = {n: ranks[n] for n in chosen if n in ranks}  # module order

    # 4. the factorised layers take the dense ones' places (a deep copy that never copies the
    #    weights it replaces, unless inplace)
    if inplace:
        out = model
        modules = dict(out.named_modules())
        for name, layer in new_layers.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else out, attr, layer)
    else:
        out = copy.deepcopy(model, {id(chosen[n]): layer for n, layer in new_layers.items()})
    route_through_modules(out)  # e.g. EVA's F.linear(x, qkv.weight) -> qkv(x) + bias
    if not ranks:
        raise TrimtuneError("no layer would save parameters at this policy (every rank >= "
                            "in*out/(in+out)): use a larger ratio / smaller rank or energy, or "
                            "keep_dense_if_no_saving=False")
    policy.update(svd=svd, keep_dense_if_no_saving=keep_dense_if_no_saving,
                  include=_as_recorded(include), exclude=_as_recorded(exclude),
                  min_out_features=min_out_features)
    if init_record.get("damped"):
        worst = max(init_record["damped"].items(), key=lambda kv: kv[1])
        warnings.warn(
            f"whitening: the calibration Gram matrix of {len(init_record['damped'])} layer(s) "
            f"was too ill-conditioned to factorise and was damped more (up to {worst[1]:.0e} x "
            f"its mean diagonal, {worst[0]!r}): pass more calibration images "
            f"(calib_images > {init_record['calib_images']})", stacklevel=2)
    out.trimtune_lowrank = {"ranks": ranks, "policy": policy, "skip": skip,
                            "energy": kept_energy, "kept_dense": kept_dense,
                            "init": init_record}
    out.trimtune_spectra = spectra
    if arch is not None:
        out.trimtune_arch = arch
    check_forward_path(out, list(ranks), probe, what="compress")
    route_save_pretrained(out)  # transformers: save_pretrained writes trimtune's format
    return (out, spectra) if return_spectra else out


def _calibrate(model: nn.Module, chosen: dict[str, nn.Linear], init: str, calib, images: int,
               batch_size: int, damp: float, alpha: float) -> tuple[dict | None, dict]:
    """Check the init arguments; for the data-aware inits, the calibration statistics of the
    ``chosen`` layers of the original ``model`` and the record kept in ``trimtune.json``."""
    if init not in INITS:
        raise TrimtuneError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    if init == "svd":
        if calib is not None:
            raise TrimtuneError("calib is only read by init='whiten' or 'asvd': pass one of them, "
                                "or drop calib for plain SVD")
        return None, {"method": "svd"}
    if calib is None:
        raise TrimtuneError(f"init={init!r} needs calibration images: pass calib= (e.g. "
                            "'fashion-mnist', a Dataset or a DataLoader)")
    if not (isinstance(damp, (int, float)) and 0 < damp < 1):
        raise TrimtuneError(f"damp={damp!r} must be in (0, 1): e.g. 1e-6")
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise TrimtuneError(f"asvd_alpha={alpha!r} must be in (0, 1]: e.g. 0.5")
    if any(m.weight.is_meta for m in chosen.values()):
        raise TrimtuneError(f"init={init!r} needs real weights, not a meta-device model")
    from .calibrate import collect_stats
    stats, info = collect_stats(model, chosen, calib, images=images, batch_size=batch_size,
                                gram=init == "whiten")
    record = {"method": init, "calib": info["calib"], "calib_images": info["images"],
              "calib_tokens": info["tokens"]}
    if init == "whiten":
        record.update(damp=float(damp), damped={})
        short = {n: m.in_features for n, m in chosen.items() if stats[n].rows < m.in_features}
        if short:
            warnings.warn(
                f"whitening: {info['images']} calibration image(s) give {info['tokens']} "
                f"input vectors, fewer than the {max(short.values())} inputs of "
                f"{len(short)} layer(s): their Gram matrices are rank-deficient and were damped "
                "(the factorisation stays finite but fits those images closely): pass more "
                "calibration images", stacklevel=3)
    else:
        record["alpha"] = float(alpha)
    return stats, record
