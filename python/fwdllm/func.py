"""``fwdllm.func``: forward-mode derivatives of any function through the dual engine.

- :func:`jvp`: ``torch.func.jvp``'s contract (``(func(*primals), J(primals)·tangents)``), computed by
  one pass of ``func`` on Duals: fused kernels for linear / attention (SDPA included, which has no
  forward-mode AD on CPU in torch) / norms / activations / losses, exact generic rules elsewhere.
  ``torch.func.vmap`` over it works (a vmap over the tangents becomes K streams of one pass).
- :func:`batched_jvp`: K tangents per primal (a leading dim K), one dual pass: ``(out, jvps)`` with
  jvps (K, *out.shape).
- :func:`seeded_jvp`: the tangents are perturbations regenerated from seeds (never materialised for
  LoRA layers: the kernels regenerate them), over the primals flattened in order.
- :func:`functional_loss`: a patched model's loss as a function of its trainable parameters, to pass to
  any of the above.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .dual import DualModel, _as_seeds, patch
from .engine import Seeded, Session, make_dual
from .engine.core import P, is_dual, tan

__all__ = ["batched_jvp", "functional_loss", "jvp", "seeded_jvp", "FunctionalLoss"]


class FunctionalLoss:
    """f(*trainable_params) -> loss of a DualModel on one batch; params in ``dm.layout.params`` order.

    Called with plain tensors it is the model's loss at those values; inside fwdllm.func it binds the
    Duals it is given (the model's module rules and prefix handling apply)."""

    def __init__(self, dm: DualModel, batch):
        self.dm = dm
        self.batch = batch

    @property
    def params(self):
        return tuple(p for _, p in self.dm.layout.params)

    def __call__(self, *values):
        params = self.params
        if len(values) != len(params):
            raise ValueError(f"fwdllm.func: {len(values)} primals for {len(params)} trainable parameters")
        for p, v in zip(params, values):
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"fwdllm.func: primal of shape {tuple(v.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
        bindings = {id(p): v for p, v in zip(params, values) if v is not p}
        dm = self.dm
        dm._validate_batch(self.batch)
        with Session(dm.model, dm._slots, bindings, dm.rules):
            out = dm.model(**dm._kwargs(self.batch))
        loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out.loss
        if loss is None:
            raise ValueError("fwdllm: the model returned no loss: give the batch 'labels'")
        return loss


def functional_loss(model, batch) -> FunctionalLoss:
    """The loss of ``model`` (a DualModel, or a model to patch) on ``batch`` as a function of its
    trainable parameters, in ``DualModel.layout.params`` order."""
    dm = model if isinstance(model, DualModel) else patch(model)
    return FunctionalLoss(dm, batch)


def _check_tuple(name, x):
    if isinstance(x, torch.Tensor):
        return (x,)
    if not isinstance(x, (tuple, list)):
        raise TypeError(f"jvp: Expected {name} to be a tuple of tensors, got {type(x).__name__}")
    for i, t in enumerate(x):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"jvp: {name}[{i}] is a {type(t).__name__}, not a tensor")
    return tuple(x)


def _run(func, duals, K, has_aux):
    """func on Duals inside a session; (out pytree of plain tensors, jvps pytree (K, ...), aux)."""
    with Session():
        res = func(*duals)
    aux = None
    if has_aux:
        if not isinstance(res, (tuple, list)) or len(res) != 2:
            raise TypeError("jvp(has_aux=True): func must return a pair (output, aux)")
        res, aux = res
        aux = tree_unflatten([P(a).detach() if isinstance(a, torch.Tensor) else a for a in tree_flatten(aux)[0]],
                             tree_flatten(aux)[1])
    leaves, spec = tree_flatten(res)
    outs, jvs = [], []
    for o in leaves:
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"jvp: func must return tensors, got a {type(o).__name__}")
        t = tan(o)
        p = P(o).detach()
        outs.append(p)
        jvs.append(torch.zeros((K, *p.shape), dtype=p.dtype, device=p.device) if t is None else t.to(p.dtype))
    return tree_unflatten(outs, spec), tree_unflatten(jvs, spec), aux


def batched_jvp(func, primals, tangents, *, has_aux=False):
    """Jacobian-vector products of ``func`` at ``primals`` along K tangents each, in one dual pass.

    Args:
        func: any callable of tensors returning a tensor or a pytree of tensors (with has_aux, a pair
            (output, aux)).
        primals: tuple of tensors.
        tangents: tuple of tensors, tangents[i] of shape (K, *primals[i].shape), one K for all.
    Returns:
        (func(*primals), jvps[, aux]): jvps has func's output structure, each leaf (K, *leaf.shape).
    """
    primals, tangents = _check_tuple("primals", primals), _check_tuple("tangents", tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    K = None
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if t.dim() != p.dim() + 1 or tuple(t.shape[1:]) != tuple(p.shape):
            raise ValueError(f"batched_jvp: tangents[{i}] must have shape (K, {', '.join(map(str, p.shape))}), "
                             f"got {tuple(t.shape)}")
        if K is None:
            K = t.shape[0]
        elif t.shape[0] != K:
            raise ValueError(f"batched_jvp: tangents[{i}] has K={t.shape[0]} but tangents[0] has K={K}")
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(f"jvp: tangents[{i}] has dtype {t.dtype} on {t.device}, primals[{i}] {p.dtype} on "
                             f"{p.device}: they must match")
    if not K:
        raise ValueError("batched_jvp: K = 0 tangents")
    duals = tuple(make_dual(p, t) for p, t in zip(primals, tangents))
    out, jv, aux = _run(func, duals, K, has_aux)
    return (out, jv, aux) if has_aux else (out, jv)


def seeded_jvp(func, primals, seeds, dist: str = "rademacher", *, has_aux=False):
    """Directional derivatives of ``func`` along K seeded perturbations of its primals.

    Perturbation k over the primals flattened in order (row-major, concatenated) is
    ``fwdkernels.perturb(seeds[k], total, 0, dist)``: primal i takes the slice at its offset. Nothing
    is materialised where a fused kernel regenerates the slice (LoRA A/B, biases).
    Returns (func(*primals), jvps[, aux]) with jvps leaves (K, *out.shape)."""
    primals = _check_tuple("primals", primals)
    s = _as_seeds(seeds)
    duals, off = [], 0
    for p in primals:
        duals.append(make_dual(p, Seeded(s, off, dist)))
        off += p.numel()
    out, jv, aux = _run(func, tuple(duals), s.numel(), has_aux)
    return (out, jv, aux) if has_aux else (out, jv)


# ---------------------------------------------------------------------------------------------
# jvp, vmap-able: an autograd.Function whose vmap rule folds the vmapped dim into K

class _Spec:
    def __init__(self, func, has_aux):
        self.func, self.has_aux = func, has_aux
        self.out_spec = None
        self.n_out = 0


class _BatchedJvp(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(spec, n, *flat):
        res = batched_jvp(spec.func, flat[:n], flat[n:], has_aux=spec.has_aux)
        out, jv = res[0], res[1]
        aux = res[2] if spec.has_aux else None
        ol, spec.out_spec = tree_flatten(out)
        jl, _ = tree_flatten(jv)
        al, spec.aux_spec = tree_flatten(aux) if spec.has_aux else ([], None)
        spec.n_out, spec.n_aux = len(ol), len(al)
        if not all(isinstance(a, torch.Tensor) for a in al):
            raise TypeError("jvp(has_aux=True): aux must be tensors")
        return tuple(ol) + tuple(jl) + tuple(al)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, spec, n, *flat):
        dims = in_dims[2:]
        B = info.batch_size
        primals, tangents = flat[:n], flat[n:]
        pd, td = dims[:n], dims[n:]
        if all(d is None for d in pd):
            # vmap over the tangents only: one dual pass with B*K streams
            ts = []
            for t, d in zip(tangents, td):
                t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(B, *t.shape)
                ts.append(t.reshape(B * t.shape[1], *t.shape[2:]))
            sub = _Spec(spec.func, spec.has_aux)
            outs = _BatchedJvp.apply(sub, n, *primals, *ts)
            spec.out_spec, spec.n_out, spec.aux_spec, spec.n_aux = sub.out_spec, sub.n_out, sub.aux_spec, sub.n_aux
            no = sub.n_out
            ol, jl, al = outs[:no], outs[no:2 * no], outs[2 * no:]
            jl = tuple(j.reshape(B, j.shape[0] // B, *j.shape[1:]) for j in jl)
            return tuple(ol) + jl + tuple(al), (None,) * no + (0,) * no + (None,) * len(al)
        # primals batched too: one pass per vmapped element
        per = []
        for b in range(B):
            args = [x.select(d, b) if d is not None else x for x, d in zip(flat, dims)]
            sub = _Spec(spec.func, spec.has_aux)
            per.append(_BatchedJvp.apply(sub, n, *args))
        spec.out_spec, spec.n_out, spec.aux_spec, spec.n_aux = sub.out_spec, sub.n_out, sub.aux_spec, sub.n_aux
        stacked = tuple(torch.stack([p[i] for p in per]) for i in range(len(per[0])))
        return stacked, (0,) * len(stacked)


def jvp(func, primals, tangents, *, strict=False, has_aux=False):
    """Same contract as ``torch.func.jvp``: returns (func(*primals), J·tangents) (and aux with has_aux),
    by one dual pass through the engine. ``torch.func.vmap`` over it batches the tangents into one pass."""
    primals, tangents = _check_tuple("primals", primals), _check_tuple("tangents", tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: Expected primals and tangents to have the same length, got {len(primals)} and "
                         f"{len(tangents)}")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"jvp: tangents[{i}] has shape {tuple(t.shape)} but primals[{i}] has {tuple(p.shape)}")
    spec = _Spec(func, has_aux)
    leaves = _BatchedJvp.apply(spec, len(primals), *primals, *[t.unsqueeze(0) for t in tangents])
    no = spec.n_out
    out = tree_unflatten(list(leaves[:no]), spec.out_spec)
    jv = tree_unflatten([j.squeeze(0) for j in leaves[no:2 * no]], spec.out_spec)
    if has_aux:
        return out, jv, tree_unflatten(list(leaves[2 * no:]), spec.aux_spec)
    return out, jv
