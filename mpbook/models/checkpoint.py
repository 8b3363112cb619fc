"""Reading only the slices a rank needs from a safetensors checkpoint (single or sharded).

Model parameter names are not always checkpoint names. transformers 5 keeps MoE experts fused
in the model (``mlp.experts.gate_up_proj`` of shape (E, 2*I, H), ``mlp.experts.down_proj`` of
(E, H, I)) but reads AND writes checkpoints per expert (Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``; Qwen-MoE: ``mlp.experts.{e}.gate_proj/
up_proj/down_proj.weight``): ``save_pretrained`` reverts the conversion. The mapping lives in
``transformers.conversion_mapping`` (renamings, and converters made of MergeModulelist +
Concatenate), reached through :mod:`mpbook.compat.transformers`. This reader applies
transformers' own ``rename_source_key`` to every checkpoint key, so it knows which checkpoint tensors build which parameter, and reads a slice of a fused
parameter by slicing each per-expert tensor: a rank holding experts 2..3, or the [gate_r; up_r]
rows of every expert, never reads the rest.

A slice is a list of :class:`mpbook.parallel.tensor.Piece` (dim, start, stop): pieces on one
dim are concatenated in order, pieces on different dims all apply (experts 2..3 AND each one's
tp rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..compat import transformers as hf_compat
from .source import checkpoint_files


@dataclass
class Source:
    """Where a model parameter comes from: one checkpoint key, or a converter's key lists."""

    keys: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> keys, in natural order
    patterns: list[str] = field(default_factory=list)  # the converter's source patterns, in its order
    operations: list = field(default_factory=list)  # [] for a plain (maybe renamed) tensor


class Checkpoint:
    """``model``: the whole (meta) model the checkpoint is for, before any cutting; its
    conversion mapping renames and fuses checkpoint keys."""

    def __init__(self, folder, model):
        self.folder = Path(folder)
        self.files = checkpoint_files(self.folder)
        self._open: dict[Path, object] = {}
        self.sources = self._index(model)

    def _index(self, model) -> dict[str, Source]:
        sources: dict[str, Source] = {}
        # experts 0, 1, ..., 10 in order
        for key, target, pattern, patterns, operations in hf_compat.checkpoint_targets(model, self.files):
            if pattern is None:
                sources[target] = Source(keys={key: [key]}, patterns=[key])
                continue
            source = sources.setdefault(target, Source(patterns=patterns, operations=operations))
            source.keys.setdefault(pattern, []).append(key)
        return sources

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def _slice(self, key: str):
        from safetensors import safe_open

        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt", device="cpu")
        return self._open[file].get_slice(key)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of parameter ``name`` as the model holds it."""
        source = self.sources[name]
        if not source.operations:
            return tuple(self._slice(source.keys[source.patterns[0]][0]).get_shape())
        kind = _fusion(source)
        if kind is None:
            return tuple(self.read(name).shape)
        first = [tuple(self._slice(k).get_shape()) for k in source.keys[source.patterns[0]]]
        inner = list(first[0])
        if kind > 0:  # concatenated along dim `kind` of the fused tensor = dim kind-1 of each expert's
            inner[kind - 1] = sum(self._slice(source.keys[p][0]).get_shape()[kind - 1] for p in source.patterns)
        return (len(first), *inner)

    def read(self, name: str, pieces=()):
        """Parameter ``name``, or just its ``pieces``, reading from disk only what they cover."""
        import torch

        source = self.sources[name]
        if not source.operations:
            sl = self._slice(source.keys[source.patterns[0]][0])
            tensor = _build(lambda index: sl[index], len(sl.get_shape()), pieces)
            return tensor.clone() if pieces else tensor  # a slice may be a view keeping more alive
        kind = _fusion(source)
        if kind is None:
            # Some other conversion: read everything, convert with transformers' ops, then slice.
            tensors = {p: [self._slice(k)[:] for k in source.keys[p]] for p in source.patterns}
            whole = hf_compat.convert(source.operations, tensors, source.patterns, name)
            return _build(lambda index: whole[index], whole.dim(), pieces).clone()
        # Fused experts: tensor[e] = cat([src_p[e] for p in patterns], dim=kind-1) (or src[e]).
        n_experts = len(source.keys[source.patterns[0]])
        ndim = 1 + len(self._slice(source.keys[source.patterns[0]][0]).get_shape())
        by_dim = _by_dim(pieces, ndim)
        experts = [e for a, b in by_dim.pop(0, [(0, n_experts)]) for e in range(a, b)]
        inner = [p._replace(dim=p.dim % ndim - 1) for p in pieces if p.dim % ndim != 0]
        rows = [_build(lambda index, e=e: self._expert(source, e, kind, index), ndim - 1, inner) for e in experts]
        return torch.stack(rows).clone()

    def _expert(self, source: Source, e: int, kind: int, index: tuple):
        """Expert ``e``'s fused tensor restricted to ``index`` (one slice per dim)."""
        import torch

        if kind == 0:
            return self._slice(source.keys[source.patterns[0]][e])[index]
        dim = kind - 1  # the concatenation dim, in the expert's own dims
        want = index[dim]
        parts, offset = [], 0
        for p in source.patterns:
            sl = self._slice(source.keys[p][e])
            size = sl.get_shape()[dim]
            start = 0 if want.start is None else want.start
            stop = offset + size if want.stop is None else want.stop
            a, b = max(start - offset, 0), min(stop - offset, size)
            offset += size
            if a < b:
                parts.append(sl[index[:dim] + (slice(a, b),) + index[dim + 1:]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def close(self) -> None:
        self._open.clear()


def _by_dim(pieces, ndim: int) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for p in pieces:
        out.setdefault(p.dim % ndim, []).append((p.start, p.stop))
    return out


def _build(get, ndim: int, pieces):
    """The tensor made of ``pieces`` (all of it when there are none), reading each block with
    ``get(index)``: ranges on one dim are concatenated, ranges on several dims multiply."""
    import torch

    by_dim = _by_dim(pieces, ndim)
    dims = sorted(by_dim)

    def build(i: int, index: list):
        if i == len(dims):
            return get(tuple(index))
        d = dims[i]
        parts = [build(i + 1, index[:d] + [slice(a, b)] + index[d + 1:]) for a, b in by_dim[d]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)

    return build(0, [slice(None)] * ndim)


def _fusion(source: Source) -> int | None:
    """0 for stacked experts; c for stacked experts concatenated along c; None for anything else."""
    return hf_compat.fused_experts_dim(source.operations)

