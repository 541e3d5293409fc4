"""Geodesic (minimum traversing) distances on the 8-connected pixel graph.

Every pixel is a vertex joined to its 8 neighbours. The edge from pixel ``k``
to its neighbour ``l`` has a non-negative length ``c(k, l)``; the geodesic
distance from a source pixel ``s`` to pixel ``p`` is the smallest sum of edge
lengths over all paths from ``s`` to ``p`` (Point2Mask Eq. 3)::

    D(s, p) = min_{path P from s to p}  sum_{(k, l) in P} c(k, l)

computed with Dijkstra's algorithm. This is the *one* shortest-path code in
pointseg: PSPS (each pixel takes the label of the point with the minimum
traversing distance), the Point2Mask transport costs and P2Seg (through its PSPS semantic source) all use it.

Edge lengths are stored as a dense ``(8, H, W)`` array ``cost`` where
``cost[d, y, x]`` is the length of the edge from ``(y, x)`` to
``(y + dy_d, x + dx_d)``, with ``(dy_d, dx_d) = NEIGHBOURS_8[d]``. Edges may be
directed (``cost[d, y, x]`` need not equal the cost of the reverse edge). ``inf``
blocks an edge; entries pointing outside the image are ignored.

Functions
---------
edge_costs        Point2Mask Eq. 2 edge lengths from a feature map and a boundary map.
add_entry_costs   the same edges, each also paying a per-pixel cost of the pixel it enters.
restrict_to       the same edges with every edge into or out of a pixel outside a mask blocked.
split_within      a labelling run with its paths inside a mask, the open run where they cannot reach.
redraw_boundary   a mask's boundary moved, within a band around it, to where the geodesic cost puts it.
geodesic_distance one distance map per source, ``(N, H, W)``.
nearest_source    one multi-source Dijkstra: min distance and the label of the
                  nearest source per pixel (PSPS assignment), ``(H, W)``.
nearest_two_sources  the nearest and the second-nearest *distinct label* per
                  pixel, ``(2, H, W)``: how close a pixel came to another
                  segment (:mod:`pointseg.uncertainty`); about 2x nearest_source.
to_csgraph        the same graph as a ``scipy.sparse`` CSR matrix (for checks).

The kernels are numba-compiled (``cache=True``): the first call in a fresh
environment compiles them (a few seconds, see ``benchmarks/geodesic.py``), later
processes load the cached machine code.

References
----------
Li et al., "Point2Mask: Point-supervised Panoptic Segmentation via Optimal
Transport", ICCV 2023, Sec. 3.3.2, Eq. 2-3.
Fan et al., "Pointly-supervised Panoptic Segmentation" (PSPS), ECCV 2022.
"""

from __future__ import annotations

import cv2
import numpy as np
from numba import njit, prange

__all__ = [
    "NEIGHBOURS_8",
    "OPPOSITE_8",
    "add_entry_costs",
    "edge_costs",
    "geodesic_distance",
    "nearest_source",
    "nearest_two_sources",
    "redraw_boundary",
    "restrict_to",
    "split_within",
    "to_csgraph",
]

#: The 8 neighbour offsets ``(dy, dx)`` in row-major order: index ``d`` of the
#: first axis of every ``(8, H, W)`` cost array. Diagonals are ``d in {0, 2, 5, 7}``.
NEIGHBOURS_8: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1),           (0, 1),
    (1, -1),  (1, 0),  (1, 1),
)
#: ``OPPOSITE_8[d]`` is the direction of the reverse edge: ``NEIGHBOURS_8[7 - d]``.
OPPOSITE_8: tuple[int, ...] = tuple(range(7, -1, -1))

_DY = np.array([o[0] for o in NEIGHBOURS_8], dtype=np.int64)
_DX = np.array([o[1] for o in NEIGHBOURS_8], dtype=np.int64)
_DIAGONAL = np.array([dy != 0 and dx != 0 for dy, dx in NEIGHBOURS_8])


def _edge_slices(d: int, height: int, width: int):
    """Slices ``(src, dst)`` of an ``(H, W)`` array over the pixels whose
    neighbour in direction ``d`` is inside the image, and those neighbours."""
    dy, dx = NEIGHBOURS_8[d]
    ys = slice(max(0, -dy), height - max(0, dy))
    xs = slice(max(0, -dx), width - max(0, dx))
    yt = slice(ys.start + dy, ys.stop + dy)
    xt = slice(xs.start + dx, xs.stop + dx)
    return (ys, xs), (yt, xt)


def _inside_mask(height: int, width: int) -> np.ndarray:
    """``(8, H, W) bool``: True where the edge's far end is inside the image."""
    inside = np.zeros((8, height, width), dtype=bool)
    for d in range(8):
        src, _ = _edge_slices(d, height, width)
        inside[(d, *src)] = True
    return inside


def edge_costs(
    node_features: np.ndarray,
    boundary: np.ndarray | None = None,
    beta: float = 0.0,
    directed_from_source: bool = False,
    diagonal_weight: float = 1.0,
) -> np.ndarray:
    """Edge lengths of the 8-connected pixel graph (Point2Mask Eq. 2-3, PSPS).

    For a pixel ``k`` and its neighbour ``l`` in direction ``d``::

        cost[d, k] = w_d * ( ||f(k) - f(l)||_2 + beta * max(b(k), b(l)) )

    ``||.||_2`` is the Euclidean norm over channels (the absolute difference
    for a single-channel map): Point2Mask's ``d^s_{k,l}`` on the semantic map
    ``P^s``; ``max(b(k), b(l))`` is its ``d^b_{k,l}`` on the boundary map
    ``P^b`` (Eq. 2); summing along a path gives Eq. 3.

    Parameters
    ----------
    node_features : (H, W) or (C, H, W) array of real numbers
        Per-pixel values ``f`` (a semantic score map, LAB colour, embeddings).
        Channels come first.
    boundary : (H, W) array of non-negative numbers, optional
        Boundary map ``b`` (``P^b``). Required when ``beta != 0``.
    beta : float, default 0
        Weight of the boundary term (Point2Mask uses 0.1).
    directed_from_source : bool, default False
        If True the boundary term is ``beta * b(l)``, the boundary value of the
        pixel being *entered* when walking away from a source, instead of the
        symmetric ``max(b(k), b(l))``. The graph is then directed: a path
        pays for every boundary pixel it steps onto, but not for leaving the
        source pixel itself (useful when a point lies on a boundary).
    diagonal_weight : float, default 1
        ``w_d`` for the four diagonal edges (1 for the axis-aligned ones). The
        papers use plain 8-neighbour differences, so the default is 1: the
        length is a feature difference, not a spatial length, and a diagonal
        step already spans a larger feature change on a smooth gradient.
        Pass ``sqrt(2)`` for a metric closer to Euclidean length in flat
        regions.

    Returns
    -------
    cost : (8, H, W) float64
        ``cost[d, y, x]`` is the length of the edge from ``(y, x)`` to
        ``(y + dy, x + dx)``, ``(dy, dx) = NEIGHBOURS_8[d]``; ``inf`` where that
        neighbour is outside the image. All finite entries are ``>= 0``.
    """
    feats = np.asarray(node_features, dtype=np.float64)
    if feats.ndim == 2:
        feats = feats[None]
    if feats.ndim != 3 or feats.shape[1] == 0 or feats.shape[2] == 0:
        raise ValueError(
            f"node_features must have shape (H, W) or (C, H, W) with H, W >= 1, "
            f"got {np.shape(node_features)}"
        )
    if not np.isfinite(feats).all():
        raise ValueError("node_features contains NaN or inf")
    _, height, width = feats.shape
    beta = float(beta)
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    diagonal_weight = float(diagonal_weight)
    if not np.isfinite(diagonal_weight) or diagonal_weight < 0:
        raise ValueError(f"diagonal_weight must be a finite number >= 0, got {diagonal_weight}")
    if boundary is not None:
        bmap = np.asarray(boundary, dtype=np.float64)
        if bmap.shape != (height, width):
            raise ValueError(
                f"boundary must have shape (H, W) = {(height, width)} like node_features, "
                f"got {bmap.shape}"
            )
        if not np.isfinite(bmap).all():
            raise ValueError("boundary contains NaN or inf")
        if (bmap < 0).any():
            raise ValueError("boundary has negative values; edge costs must be >= 0")
    elif beta != 0:
        raise ValueError(f"beta={beta} needs a boundary map, but boundary is None")

    cost = np.full((8, height, width), np.inf, dtype=np.float64)
    for d in range(8):
        (ys, xs), (yt, xt) = _edge_slices(d, height, width)
        diff = feats[:, ys, xs] - feats[:, yt, xt]
        # Point2Mask Eq. 2: d^s_{k,l} = |P^s(k) - P^s(l)|
        length = np.sqrt(np.einsum("chw,chw->hw", diff, diff))
        if boundary is not None and beta != 0:
            # Point2Mask Eq. 2: d^b_{k,l} = max(P^b(k), P^b(l))
            b_edge = bmap[yt, xt] if directed_from_source else np.maximum(bmap[ys, xs], bmap[yt, xt])
            length = length + beta * b_edge
        if _DIAGONAL[d] and diagonal_weight != 1.0:
            length = length * diagonal_weight
        cost[d, ys, xs] = length
    return cost


def add_entry_costs(cost: np.ndarray, node_cost: np.ndarray) -> np.ndarray:
    """``cost[d, y, x] + node_cost[y + dy_d, x + dx_d]``: every step also pays for the pixel it enters.

    cost : (8, H, W) edge lengths (the module's layout); node_cost : (H, W)
    finite, ``>= 0``. Returns a new (directed) cost array; edges leaving the
    image stay ``inf``.
    """
    node = np.asarray(node_cost, dtype=np.float64)
    _, height, width = cost.shape
    if node.shape != (height, width):
        raise ValueError(f"node_cost must have shape {(height, width)} like cost, got {node.shape}")
    if not np.isfinite(node).all() or (node < 0).any():
        raise ValueError("node_cost must be finite and >= 0")
    out = np.array(cost, dtype=np.float64, copy=True)
    for d in range(8):
        (ys, xs), (yt, xt) = _edge_slices(d, height, width)
        out[d, ys, xs] += node[yt, xt]
    return out


def restrict_to(cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The graph of ``cost`` cut down to the pixels of ``mask``: every edge that enters or leaves a pixel
    outside ``mask`` is blocked (``inf``).

    cost : (8, H, W) edge lengths (the module's layout); mask : (H, W) bool.
    Returns a new array. Paths then stay inside ``mask``: a source outside it
    reaches no other pixel, and a pixel outside it (or in a part of ``mask``
    holding no source) is unreached (distance ``inf``, label ``-1``).
    """
    keep = np.asarray(mask, dtype=bool)
    _, height, width = cost.shape
    if keep.shape != (height, width):
        raise ValueError(f"mask must have shape {(height, width)} like cost, got {keep.shape}")
    out = np.array(cost, dtype=np.float64, copy=True)
    out[:, ~keep] = np.inf  # edges leaving an outside pixel
    for d in range(8):
        (ys, xs), (yt, xt) = _edge_slices(d, height, width)
        out[d, ys, xs][~keep[yt, xt]] = np.inf  # edges entering one
    return out


def split_within(split, cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``split(edges) -> (H, W) labels (-1 unreached)`` run with its paths kept inside ``mask``.

    ``split`` runs on :func:`restrict_to` ``(cost, mask)``; a pixel of ``mask``
    that no path reaches from inside (a part of ``mask`` holding no source)
    takes ``split(cost)``, the open run (only computed when needed). Pixels
    outside ``mask`` keep the restricted run's label: ``-1``, except a source's
    own pixel. The one "restricted split, open split for the
    rest" of EPLD's ``split_within: foreground``, P2Seg's ``split_within:
    component`` and ``benchmarks/foreground_ceiling.py``.
    """
    keep = np.asarray(mask, dtype=bool)
    label = split(restrict_to(cost, keep))
    hole = keep & (label < 0)
    if hole.any():
        label = np.where(hole, split(cost), label)
    return label


def redraw_boundary(cost: np.ndarray, mask: np.ndarray, band: int, inside=None, outside=None,
                    step: float = 0.0) -> np.ndarray | None:
    """``mask``'s boundary redrawn inside a band of ``band`` pixels on either side of it: ``(H, W) bool``.

    ``mask`` (H, W) bool is eroded and dilated by ``band`` pixels (a square
    window of side ``2 band + 1``, the border replicated): the eroded mask and
    the ``inside`` pixels ``(K, 2)`` (row, col) seed the inside, everything
    outside the dilated mask and the ``outside`` pixels seed the outside (a
    pixel given as both seeds the outside), and
    every pixel of the band in between goes to the side whose seeds are nearest
    in ``cost`` plus ``step`` per step (``sqrt 2 step`` diagonally), one
    multi-source Dijkstra (:func:`nearest_source`). A band of uniform cost is
    split in its middle, where ``mask`` put the boundary; an edge of the cost
    inside the band draws it. None when one side has no seed (nothing to redraw
    against). The one boundary redraw of EPLD's and P2Seg's ``foreground_band``.
    """
    mask = np.asarray(mask, bool)
    if mask.shape != cost.shape[1:]:
        raise ValueError(f"mask must have shape {cost.shape[1:]} like cost, got {mask.shape}")
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    inner = cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    outer = ~cv2.dilate(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    for seeds, side, other in ((inside, inner, outer), (outside, outer, inner)):
        if seeds is not None and len(seeds):
            seeds = np.asarray(seeds, np.int64).reshape(-1, 2)
            side[seeds[:, 0], seeds[:, 1]] = True
            other[seeds[:, 0], seeds[:, 1]] = False  # a click seeds its own side, even deep inside the other
    if not inner.any() or not outer.any():
        return None
    seeds = np.argwhere(inner | outer)
    if step > 0:
        cost = cost + step * np.where(_DIAGONAL, np.sqrt(2.0), 1.0)[:, None, None]
    side = nearest_source(cost, seeds, labels=inner[seeds[:, 0], seeds[:, 1]].astype(np.int64))[1] == 1
    return np.where(inner | outer, inner, side)


def to_csgraph(cost: np.ndarray):
    """The graph of an ``(8, H, W)`` cost array as a ``scipy.sparse`` CSR matrix.

    Node ``y * W + x`` is pixel ``(y, x)``; entry ``[p, q]`` is the length of
    the edge ``p -> q``. Blocked (``inf``) and out-of-image edges are left out;
    zero-length edges are kept as explicit zeros, which
    ``scipy.sparse.csgraph`` treats as edges. Use with ``directed=True``.
    """
    from scipy import sparse

    cost = _check_cost(cost)
    _, height, width = cost.shape
    index = np.arange(height * width, dtype=np.int64).reshape(height, width)
    rows, cols, vals = [], [], []
    for d in range(8):
        src, dst = _edge_slices(d, height, width)
        c = cost[(d, *src)]
        keep = np.isfinite(c)
        rows.append(index[src][keep])
        cols.append(index[dst][keep])
        vals.append(c[keep])
    rows, cols, vals = (np.concatenate(a) for a in (rows, cols, vals))
    n = height * width
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))


# ---------------------------------------------------------------------------
# input checks


def _check_cost(cost: np.ndarray) -> np.ndarray:
    """``cost`` as a C-contiguous ``(8, H, W) float64`` array, validated."""
    arr = np.asarray(cost)
    if arr.ndim != 3 or arr.shape[0] != 8 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"cost must have shape (8, H, W) with H, W >= 1, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"cost must be a real-valued array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    # Out-of-image entries are ignored, so only in-image edges are checked.
    bad = ~(arr >= 0)  # NaN and negative values (including -inf)
    if bad.any():
        bad &= _inside_mask(arr.shape[1], arr.shape[2])
        if bad.any():
            d, y, x = (int(v) for v in np.argwhere(bad)[0])
            kind = "NaN" if np.isnan(arr[d, y, x]) else f"negative value {arr[d, y, x]}"
            raise ValueError(
                f"cost has {kind} at cost[{d}, {y}, {x}] (edge from pixel ({y}, {x}) "
                f"towards {NEIGHBOURS_8[d]}); Dijkstra needs edge costs >= 0 "
                f"({int(bad.sum())} bad in-image entries)"
            )
    return arr


def _check_sources(sources, height: int, width: int) -> np.ndarray:
    """``sources`` ``(N, 2)`` (row, col) as flat int64 pixel indices ``(N,)``."""
    src = np.asarray(sources)
    if src.size == 0:
        return np.zeros(0, dtype=np.int64)
    if src.ndim != 2 or src.shape[1] != 2:
        raise ValueError(f"sources must have shape (N, 2) as (row, col), got {src.shape}")
    if not np.issubdtype(src.dtype, np.integer):
        if not np.issubdtype(src.dtype, np.floating) or not (
            np.isfinite(src).all() and (src == np.round(src)).all()
        ):
            raise ValueError(f"sources must be integer (row, col) pixel indices, got dtype {src.dtype}")
    src = src.astype(np.int64)
    outside = (src[:, 0] < 0) | (src[:, 0] >= height) | (src[:, 1] < 0) | (src[:, 1] >= width)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"sources[{i}] = ({src[i, 0]}, {src[i, 1]}) is outside the image of "
            f"shape (H, W) = ({height}, {width}) ({int(outside.sum())} sources outside)"
        )
    return src[:, 0] * width + src[:, 1]


def _check_labels(labels, n: int) -> np.ndarray:
    """``labels`` of ``n`` sources as ``(N,) int64 >= 0``; ``arange(N)`` when None."""
    if labels is None:
        return np.arange(n, dtype=np.int64)
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},) like sources, got {lab.shape}")
    if n and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if (lab < 0).any():
        raise ValueError("labels must be >= 0 (-1 marks unreachable pixels)")
    return lab


# ---------------------------------------------------------------------------
# numba kernels: Dijkstra with an indexed 8-ary min-heap (decrease-key, keys
# stored inline). 8 children share a cache line and the tree is shallow (5
# levels for 256x256), measured ~1.5x faster than a binary heap here.
#
# Two kernels: `_single_source` orders the heap by distance only;
# `_nearest_source` orders it by (distance, source index) so that ties go to the
# lowest source index whatever the heap order. The tie comparisons cost ~1.5x
# in the heap's inner loop, so the per-source kernel does without them.
#
# A settled node q is never relaxed again, without a "settled" check: its key is
# <= the key (k, op) being expanded and k + c >= k for c >= 0 (also in floating
# point), so the relaxation test below fails for it.

_ARITY = 8
_NOT_QUEUED = -1


@njit(cache=True, nogil=True, inline="always")
def _sift_up(heap_key, heap_node, pos, i, key, node):
    """Put (key, node) at slot i or above; heap ordered by key."""
    while i > 0:
        parent = (i - 1) // _ARITY
        pk = heap_key[parent]
        if pk <= key:
            break
        pn = heap_node[parent]
        heap_key[i] = pk
        heap_node[i] = pn
        pos[pn] = i
        i = parent
    heap_key[i] = key
    heap_node[i] = node
    pos[node] = i


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_key, heap_node, pos, n, key, node):
    """Put (key, node) at the root or below, heap of size n ordered by key."""
    i = 0
    while True:
        first = _ARITY * i + 1
        if first >= n:
            break
        best = first
        bk = heap_key[first]
        for j in range(first + 1, min(first + _ARITY, n)):
            kj = heap_key[j]
            if kj < bk:
                best = j
                bk = kj
        if bk >= key:
            break
        bn = heap_node[best]
        heap_key[i] = bk
        heap_node[i] = bn
        pos[bn] = i
        i = best
    heap_key[i] = key
    heap_node[i] = node
    pos[node] = i


@njit(cache=True, nogil=True)
def _single_source(cost, height, width, source, dist, heap_key, heap_node, pos):
    """Dijkstra from one flat pixel index, in place.

    cost (8, H*W) float64 >= 0; dist (H*W,) float64 filled with inf;
    heap_key (H*W,) float64, heap_node (H*W,) int64 scratch; pos (H*W,) int64
    filled with -1 (slot of each queued node).
    """
    dist[source] = 0.0
    heap_key[0] = 0.0
    heap_node[0] = source
    pos[source] = 0
    n = 1
    flat_offset = _DY * width + _DX
    last_row = height - 1
    last_col = width - 1
    while n > 0:
        k = heap_key[0]
        p = heap_node[0]
        n -= 1
        if n > 0:
            _sift_down(heap_key, heap_node, pos, n, heap_key[n], heap_node[n])
        y = p // width
        x = p - y * width
        if 0 < y < last_row and 0 < x < last_col:  # interior: no bounds checks
            for d in range(8):
                q = p + flat_offset[d]
                nd = k + cost[d, p]
                if nd < dist[q]:
                    dist[q] = nd
                    i = pos[q]
                    if i == _NOT_QUEUED:
                        i = n
                        n += 1
                    _sift_up(heap_key, heap_node, pos, i, nd, q)
        else:
            for d in range(8):
                yy = y + _DY[d]
                xx = x + _DX[d]
                if yy < 0 or yy > last_row or xx < 0 or xx > last_col:
                    continue
                q = yy * width + xx
                nd = k + cost[d, p]
                if nd < dist[q]:
                    dist[q] = nd
                    i = pos[q]
                    if i == _NOT_QUEUED:
                        i = n
                        n += 1
                    _sift_up(heap_key, heap_node, pos, i, nd, q)


@njit(cache=True, nogil=True, inline="always")
def _sift_up_lex(heap_key, heap_tie, heap_node, pos, i, key, tie, node):
    """Put (key, tie, node) at slot i or above; heap ordered by (key, tie)."""
    while i > 0:
        parent = (i - 1) // _ARITY
        pk = heap_key[parent]
        if pk < key:
            break
        pt = heap_tie[parent]
        if pk == key and pt <= tie:
            break
        pn = heap_node[parent]
        heap_key[i] = pk
        heap_tie[i] = pt
        heap_node[i] = pn
        pos[pn] = i
        i = parent
    heap_key[i] = key
    heap_tie[i] = tie
    heap_node[i] = node
    pos[node] = i


@njit(cache=True, nogil=True, inline="always")
def _sift_down_lex(heap_key, heap_tie, heap_node, pos, n, key, tie, node):
    """Put (key, tie, node) at the root or below; heap ordered by (key, tie)."""
    i = 0
    while True:
        first = _ARITY * i + 1
        if first >= n:
            break
        end = min(first + _ARITY, n)
        best = first
        bk = heap_key[first]
        for j in range(first + 1, end):  # smallest key, first child on ties ...
            kj = heap_key[j]
            if kj < bk:
                best = j
                bk = kj
        bt = heap_tie[best]
        for j in range(best + 1, end):  # ... then smallest tie among equal keys
            if heap_key[j] == bk and heap_tie[j] < bt:
                best = j
                bt = heap_tie[j]
        if bk > key or (bk == key and bt >= tie):
            break
        bn = heap_node[best]
        heap_key[i] = bk
        heap_tie[i] = bt
        heap_node[i] = bn
        pos[bn] = i
        i = best
    heap_key[i] = key
    heap_tie[i] = tie
    heap_node[i] = node
    pos[node] = i


@njit(cache=True, nogil=True)
def _nearest_source(cost, height, width, src_flat, dist, owner, heap_key, heap_tie, heap_node, pos):
    """Multi-source Dijkstra in (distance, source index) order, in place.

    cost (8, H*W) float64 >= 0; src_flat (N,) int64 flat pixel indices;
    dist (H*W,) float64 filled with inf; owner (H*W,) int64 filled with -1, on
    return the index of the nearest source (lowest index on equal distance);
    heap_key (H*W,) float64, heap_tie and heap_node (H*W,) int64 scratch;
    pos (H*W,) int64 filled with -1.
    """
    n = 0
    for i in range(src_flat.shape[0]):
        q = src_flat[i]
        if owner[q] == -1:  # a pixel given twice keeps its lower index
            dist[q] = 0.0
            owner[q] = i
            _sift_up_lex(heap_key, heap_tie, heap_node, pos, n, 0.0, i, q)
            n += 1
    flat_offset = _DY * width + _DX
    last_row = height - 1
    last_col = width - 1
    while n > 0:
        k = heap_key[0]
        op = heap_tie[0]
        p = heap_node[0]
        n -= 1
        if n > 0:
            _sift_down_lex(heap_key, heap_tie, heap_node, pos, n, heap_key[n], heap_tie[n], heap_node[n])
        y = p // width
        x = p - y * width
        if 0 < y < last_row and 0 < x < last_col:  # interior: no bounds checks
            for d in range(8):
                q = p + flat_offset[d]
                nd = k + cost[d, p]
                dq = dist[q]
                if nd < dq or (nd == dq and op < owner[q]):
                    dist[q] = nd
                    owner[q] = op
                    i = pos[q]
                    if i == _NOT_QUEUED:
                        i = n
                        n += 1
                    _sift_up_lex(heap_key, heap_tie, heap_node, pos, i, nd, op, q)
        else:
            for d in range(8):
                yy = y + _DY[d]
                xx = x + _DX[d]
                if yy < 0 or yy > last_row or xx < 0 or xx > last_col:
                    continue
                q = yy * width + xx
                nd = k + cost[d, p]
                dq = dist[q]
                if nd < dq or (nd == dq and op < owner[q]):
                    dist[q] = nd
                    owner[q] = op
                    i = pos[q]
                    if i == _NOT_QUEUED:
                        i = n
                        n += 1
                    _sift_up_lex(heap_key, heap_tie, heap_node, pos, i, nd, op, q)


@njit(cache=True, nogil=True, inline="always")
def _neighbour(p, d, width, last_row, last_col, flat_offset):
    """Flat index of pixel p's neighbour in direction d, or -1 outside the image."""
    y = p // width
    x = p - y * width
    if 0 < y < last_row and 0 < x < last_col:
        return p + flat_offset[d]
    yy = y + _DY[d]
    xx = x + _DX[d]
    if yy < 0 or yy > last_row or xx < 0 or xx > last_col:
        return -1
    return yy * width + xx


@njit(cache=True, nogil=True)
def _second_source(cost, height, width, dist1, label1, src_flat, src_label, dist2, label2, heap_key, heap_node, pos):
    """Distance to, and label of, the nearest source whose label differs from ``label1``, in place.

    dist1, label1 (H*W,): the nearest-source result; dist2 (H*W,) filled with
    inf, label2 (H*W,) with -1; heap_key, heap_node (H*W,) scratch; pos (H*W,)
    filled with -1.

    Exact because the predecessor ``q`` of pixel ``p`` on the shortest path of
    p's second label ``L_2(p)`` has that label among its own two nearest (were
    two other labels nearer to ``q``, they would be nearer to ``p`` too). So
    either ``L_2(p) = L_1(q) != L_1(p)``: a candidate ``dist1[q] + c(q, p)``
    across a boundary of the nearest-source partition, the starting keys; or
    ``L_2(p) = L_2(q)``: a Dijkstra step of this search, allowed when
    ``L_2(q) != L_1(p)``. Sources whose pixel another label owns start at 0.
    """
    npix = height * width
    flat_offset = _DY * width + _DX
    last_row = height - 1
    last_col = width - 1
    for i in range(src_flat.shape[0]):
        q = src_flat[i]
        if src_label[i] != label1[q] and dist2[q] > 0.0:
            dist2[q] = 0.0
            label2[q] = src_label[i]
    for q in range(npix):
        lq = label1[q]
        if lq < 0:
            continue
        for d in range(8):
            p = _neighbour(q, d, width, last_row, last_col, flat_offset)
            if p >= 0 and label1[p] != lq:
                nd = dist1[q] + cost[d, q]
                if nd < dist2[p]:
                    dist2[p] = nd
                    label2[p] = lq
    n = 0
    for p in range(npix):
        if dist2[p] < np.inf:
            _sift_up(heap_key, heap_node, pos, n, dist2[p], p)
            n += 1
    while n > 0:
        k = heap_key[0]
        p = heap_node[0]
        n -= 1
        if n > 0:
            _sift_down(heap_key, heap_node, pos, n, heap_key[n], heap_node[n])
        lp = label2[p]
        for d in range(8):
            q = _neighbour(p, d, width, last_row, last_col, flat_offset)
            if q < 0:
                continue
            nd = k + cost[d, p]
            if nd < dist2[q] and label1[q] != lp:
                dist2[q] = nd
                label2[q] = lp
                i = pos[q]
                if i == _NOT_QUEUED:
                    i = n
                    n += 1
                _sift_up(heap_key, heap_node, pos, i, nd, q)


@njit(cache=True, nogil=True)
def _per_source(cost, height, width, src_flat, out):
    """out (N, H*W): one single-source Dijkstra per source, scratch reused."""
    npix = height * width
    heap_key = np.empty(npix, dtype=np.float64)
    heap_node = np.empty(npix, dtype=np.int64)
    pos = np.empty(npix, dtype=np.int64)
    for i in range(src_flat.shape[0]):
        out[i, :] = np.inf
        pos[:] = _NOT_QUEUED
        _single_source(cost, height, width, src_flat[i], out[i], heap_key, heap_node, pos)


@njit(cache=True, nogil=True, parallel=True)
def _per_source_parallel(cost, height, width, src_flat, out):
    """Like ``_per_source`` with the sources spread over numba threads."""
    npix = height * width
    for i in prange(src_flat.shape[0]):
        out[i, :] = np.inf
        heap_key = np.empty(npix, dtype=np.float64)
        heap_node = np.empty(npix, dtype=np.int64)
        pos = np.full(npix, _NOT_QUEUED, dtype=np.int64)
        _single_source(cost, height, width, src_flat[i], out[i], heap_key, heap_node, pos)


# ---------------------------------------------------------------------------
# public API


def geodesic_distance(cost: np.ndarray, sources, parallel: bool = False) -> np.ndarray:
    """Geodesic distance maps from each source (Point2Mask Eq. 3).

    ``D[i, p] = min over paths P from sources[i] to p of sum_{(k,l) in P} cost(k, l)``,
    one Dijkstra per source on the 8-connected graph.

    Parameters
    ----------
    cost : (8, H, W) float array
        Edge lengths as produced by :func:`edge_costs` (see the module
        docstring for the layout); ``>= 0``, ``inf`` blocks an edge, may be
        directed. NaN or negative in-image entries raise ``ValueError``.
    sources : (N, 2) int array
        Source pixels as ``(row, col)``. Outside the image raises ``ValueError``.
    parallel : bool, default False
        Spread the sources over numba threads (``NUMBA_NUM_THREADS``). Off by
        default: pointseg runs one generator per CPU under Ray.

    Returns
    -------
    distance : (N, H, W) float64
        ``inf`` where a pixel cannot be reached from the source.
        Memory is ``8 * N * H * W`` bytes: for many sources and a per-pixel
        assignment, use :func:`nearest_source`.
    """
    cost = _check_cost(cost)
    _, height, width = cost.shape
    src_flat = _check_sources(sources, height, width)
    out = np.empty((src_flat.shape[0], height * width), dtype=np.float64)
    if src_flat.shape[0]:
        kernel = _per_source_parallel if parallel else _per_source
        kernel(cost.reshape(8, height * width), height, width, src_flat, out)
    return out.reshape(src_flat.shape[0], height, width)


def nearest_source(cost: np.ndarray, sources, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and label of, the nearest source per pixel (PSPS assignment).

    One multi-source Dijkstra (all sources start at distance 0)::

        distance[p] = min_i D[i, p]
        label[p]    = labels[i*],  i* = min { i : D[i, p] = distance[p] }

    with ``D`` as in :func:`geodesic_distance`. Ties go to the source with the
    lowest index in ``sources`` (not the lowest label): the search orders
    pixels by ``(distance, source index)``, so the result does not depend on
    heap order. Ties are equal floating-point path sums; with exactly
    representable sums (e.g. integer costs) ``i*`` is exactly the rule above,
    otherwise two sources whose sums differ by rounding are not a tie.

    Costs about one single-source run (1-2x one run of
    :func:`geodesic_distance`, for the tie-aware heap), not ``N``.

    Parameters
    ----------
    cost : (8, H, W) float array
        Edge lengths, see :func:`geodesic_distance`.
    sources : (N, 2) int array
        Source pixels as ``(row, col)``. A pixel given twice belongs to the
        lower index.
    labels : (N,) int array of values ``>= 0``, optional
        Label of each source; several sources may share one (e.g. the points of
        one segment). Defaults to the source index ``arange(N)``.

    Returns
    -------
    distance : (H, W) float64
        ``inf`` where no source reaches the pixel.
    label : (H, W) int64
        ``labels`` of the nearest source, ``-1`` where no source reaches it.
    """
    cost = _check_cost(cost)
    _, height, width = cost.shape
    src_flat = _check_sources(sources, height, width)
    return _nearest(cost, src_flat, _check_labels(labels, src_flat.shape[0]))


def _nearest(cost: np.ndarray, src_flat: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_source` on checked inputs."""
    _, height, width = cost.shape
    n = src_flat.shape[0]
    npix = height * width
    dist = np.full(npix, np.inf, dtype=np.float64)
    owner = np.full(npix, -1, dtype=np.int64)
    if n:
        heap_key = np.empty(npix, dtype=np.float64)
        heap_tie = np.empty(npix, dtype=np.int64)
        heap_node = np.empty(npix, dtype=np.int64)
        pos = np.full(npix, _NOT_QUEUED, dtype=np.int64)
        _nearest_source(
            cost.reshape(8, npix), height, width, src_flat, dist, owner, heap_key, heap_tie, heap_node, pos
        )
    label = np.where(owner >= 0, lab[np.maximum(owner, 0)] if n else -1, -1)
    return dist.reshape(height, width), label.astype(np.int64).reshape(height, width)


def nearest_two_sources(cost: np.ndarray, sources, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Distances to, and labels of, the two nearest sources *of distinct labels* per pixel.

    With ``D_L(p) = min { D[i, p] : labels[i] = L }`` (``D`` as in
    :func:`geodesic_distance`: a label is as near as its nearest source)::

        L_1(p) = argmin_L D_L(p),            distance[0, p] = D_{L_1}(p)
        L_2(p) = argmin_{L != L_1} D_L(p),   distance[1, p] = D_{L_2}(p)

    ``distance[0]`` and ``label[0]`` are exactly :func:`nearest_source`'s
    output (its tie rule included); on a tie for the second place ``label[1]``
    is one of the tied labels. ``distance[0] / distance[1]`` is the
    uncertainty of :func:`pointseg.uncertainty.distance_ratio`.

    Two searches: :func:`nearest_source`, then one single-label Dijkstra
    started from the boundaries of its partition (``_second_source``): about
    2x :func:`nearest_source` (``benchmarks/geodesic.py``).

    Parameters
    ----------
    cost, sources, labels : as :func:`nearest_source`.

    Returns
    -------
    distance : (2, H, W) float64
        ``distance[0] <= distance[1]``; ``inf`` where no / only one label reaches the pixel.
    label : (2, H, W) int64
        The nearest and the second-nearest label, ``-1`` where not reached.
    """
    cost = _check_cost(cost)
    _, height, width = cost.shape
    src_flat = _check_sources(sources, height, width)
    lab = _check_labels(labels, src_flat.shape[0])
    dist1, label1 = _nearest(cost, src_flat, lab)
    npix = height * width
    dist2 = np.full(npix, np.inf, dtype=np.float64)
    label2 = np.full(npix, -1, dtype=np.int64)
    if src_flat.shape[0]:
        _second_source(cost.reshape(8, npix), height, width, dist1.reshape(npix), label1.reshape(npix), src_flat,
                       lab, dist2, label2, np.empty(npix, dtype=np.float64), np.empty(npix, dtype=np.int64),
                       np.full(npix, _NOT_QUEUED, dtype=np.int64))
    return (np.stack([dist1, dist2.reshape(height, width)]), np.stack([label1, label2.reshape(height, width)]))
