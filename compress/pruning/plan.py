"""What to remove, given scores: per-module keep lists for --scope layer|global, and which layers --drop_layers means.

Pure functions of their inputs, so they are tested against plans worked out by hand.
"""

from __future__ import annotations

import math

import torch

from compress.infra.errors import CompressError


def _count(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounding up (Python's round() would send 0.5 * 5 to 2 and 0.5 * 7 to 4)."""
    return math.floor(ratio * n + 0.5)


def _order(scores: torch.Tensor) -> list[int]:
    """Indices from least to most important; ties go to the lower index first, so plans are reproducible."""
    return torch.sort(scores.float().cpu(), stable=True).indices.tolist()


def choose_kept(scores: list[torch.Tensor], ratio: float, scope: str, minimum: int = 1) -> list[list[int]]:
    """The indices each module keeps (ascending) when `ratio` of the units are removed.

    scores[j]: (n_j,) importance of module j's units. `scope="layer"` removes round(ratio * n_j) from every module;
    `scope="global"` removes round(ratio * sum n_j) of the lowest-ranked units wherever they are, so modules end
    up with different sizes. Either way each module keeps at least `minimum` units (its best ones), even if that
    means removing fewer than asked.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio {ratio} outside [0, 1)")
    orders = [_order(s) for s in scores]
    if scope == "layer":
        removed = [set(order[: min(_count(ratio, len(order)), max(0, len(order) - minimum))]) for order in orders]
    elif scope == "global":
        # each module's `minimum` best units are reserved; everything else competes in one ranking
        pool = [(float(scores[j][i]), j, i) for j, order in enumerate(orders)
                for i in order[: max(0, len(order) - minimum)]]
        pool.sort(key=lambda t: t[0])  # stable: ties keep module order, then index order
        removed = [set() for _ in scores]
        for _, j, i in pool[: _count(ratio, sum(len(o) for o in orders))]:
            removed[j].add(i)
    else:
        raise ValueError(f"unknown scope {scope!r}")
    return [[i for i in range(len(order)) if i not in gone] for order, gone in zip(orders, removed)]


def parse_drop_layers(value: int | list[int] | str | None, num_layers: int) -> list[int]:
    """The 0-based layers --drop_layers names, ascending.

    An int N drops the top N layers, those nearest the classifier (Sajjad et al. 2020 found that the best of the
    simple strategies); a list (or "0,3") drops exactly those layers.
    """
    if value is None or value == []:
        return []
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        except ValueError:
            raise CompressError(f"--drop_layers {value}: give a count N or a list of layer indices like 0,3") from None
    if isinstance(value, int):
        if not 0 <= value < num_layers:
            raise CompressError(f"--drop_layers {value}: the model has {num_layers} layers; drop between 0 and "
                                f"{num_layers - 1} of them")
        return list(range(num_layers - value, num_layers))
    layers = list(value)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CompressError(f"--drop_layers {layers}: layer {bad[0]} is out of range; the model's layers are "
                            f"0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise CompressError(f"--drop_layers {layers}: a layer is listed twice")
    if len(layers) >= num_layers:
        raise CompressError(f"--drop_layers {layers}: that is every layer; at least one must stay")
    return sorted(layers)
