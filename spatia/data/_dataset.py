"""Torch datasets over the crop store and the table: batches of centre cells with their niche members."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp_sparse
import torch
from torch.utils.data import Dataset


@dataclass
class CellArrays:
    """Everything the model reads, aligned with the table's rows.

    Attributes
    ----------
    counts
        ``(n, G)`` CSR raw counts (model gene order).
    crops
        :class:`~spatia.pp.CropStore` or ``None`` (no image branch).
    xy
        ``(n, 2)`` centroids in µm (coordinate-system units).
    nbr
        ``(n, K)`` niche members of each cell (row indices, -1 = none).
    tile
        ``(n,)`` tissue tile of each cell.
    labels
        ``(n,)`` class index, -1 = unknown; or ``None``.
    drop_expression
        ``(n,)`` bool: cells whose expression must not be shown to the model (image-only prediction).
    centres
        Sorted rows that may be centre cells of a batch (a training sample, see :meth:`sample`); ``None``:
        every cell. Niche members and tiles still come from all cells.
    """

    counts: sp_sparse.csr_matrix
    crops: object | None
    xy: np.ndarray
    nbr: np.ndarray
    tile: np.ndarray
    labels: np.ndarray | None = None
    drop_expression: np.ndarray | None = None
    centres: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.counts.shape[0]

    def sample(self, n_cells: int, rng: np.random.Generator) -> CellArrays:
        """A view whose batches are centred on ``n_cells`` cells drawn at random (without replacement).

        Only the centre cells are sampled: each still reads its niche members and tissue tile from the whole
        slide, so a model trained on the sample sees the same context as on all cells. Arrays are shared,
        not copied.
        """
        if n_cells >= self.n:
            return self
        centres = np.sort(rng.choice(self.n, size=int(n_cells), replace=False))
        return dataclasses.replace(self, centres=centres)

    def plan(self, batch_size: int, rng: np.random.Generator | None = None, cells: np.ndarray | None = None) -> list[np.ndarray]:
        """Split ``cells`` (default all) into batches of ≤ ``batch_size`` centre cells, tile by tile.

        Whole tiles are packed together (so the tissue transformer sees complete tiles); tiles larger than
        ``batch_size`` are cut into spatially sorted chunks. ``rng`` shuffles the tile order. With
        :attr:`centres` set, only those cells are kept.
        """
        cells = np.arange(self.n) if cells is None else np.asarray(cells)
        if self.centres is not None:
            cells = cells[np.isin(cells, self.centres, assume_unique=True)]
        if cells.size == 0:
            return []
        uniq, inv = np.unique(self.tile[cells], return_inverse=True)
        rank = np.arange(len(uniq))  # position of each tile in the visiting order
        if rng is not None:
            rank[np.searchsorted(uniq, rng.permutation(uniq))] = np.arange(len(uniq))
        tile_rank = rank[inv.ravel()]
        # tile after tile (in visiting order), by row then column within a tile: each batch is a slice
        cells = cells[np.lexsort((self.xy[cells, 0], self.xy[cells, 1], tile_rank))].astype(np.int64, copy=False)
        sizes = np.bincount(tile_rank, minlength=len(uniq))
        bounds, start, filled, pos = [], 0, 0, 0
        for size in sizes.tolist():
            for s in range(0, size, batch_size):
                k = min(batch_size, size - s)
                if filled + k > batch_size and filled:
                    bounds.append((start, pos))
                    start, filled = pos, 0
                filled += k
                pos += k
        if filled:
            bounds.append((start, pos))
        return [cells[a:b] for a, b in bounds]

    def collate(self, core: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors of one batch (see :meth:`spatia.module.SpatiaModule.forward`)."""
        core = np.asarray(core, dtype=np.int64)
        nb = self.nbr[core]
        members = np.unique(np.concatenate([core, nb[nb >= 0]]))
        loc = np.searchsorted(members, core)
        nb_loc = np.where(nb >= 0, np.searchsorted(members, np.where(nb >= 0, nb, 0)), -1)
        _, tile_loc = np.unique(self.tile[core], return_inverse=True)
        batch = {
            "counts": torch.from_numpy(np.asarray(self.counts[members].toarray(), dtype=np.float32)),
            "xy": torch.from_numpy(self.xy[members].astype(np.float32)),
            "core": torch.from_numpy(loc),
            "nbr": torch.from_numpy(nb_loc.astype(np.int64)),
            "tile": torch.from_numpy(tile_loc.astype(np.int64)),
            "index": torch.from_numpy(core),
        }
        if self.crops is not None:
            batch["images"] = torch.from_numpy(self.crops.get(members)).float().div_(255.0)
        if self.labels is not None:
            batch["labels"] = torch.from_numpy(self.labels[core].astype(np.int64))
        if self.drop_expression is not None:
            batch["drop_expression"] = torch.from_numpy(self.drop_expression[members])
        return batch


class BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, arrays: CellArrays, batches: list[np.ndarray]) -> None:
        self.arrays, self.batches = arrays, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.arrays.collate(self.batches[i])


def neighbours_from_graph(conn: sp_sparse.spmatrix, k: int) -> np.ndarray:
    """``(n, k)`` neighbour rows from a connectivity matrix (nearest first by stored order, -1 padded)."""
    conn = sp_sparse.csr_matrix(conn)
    n = conn.shape[0]
    rows = np.repeat(np.arange(n), np.diff(conn.indptr))
    keep = conn.indices != rows  # no self-loops
    rows, cols = rows[keep], conn.indices[keep]
    # position of each entry within its row (entries stay in stored order)
    starts = np.searchsorted(rows, np.arange(n))
    pos = np.arange(len(rows)) - starts[rows]
    sel = pos < k
    out = np.full((n, k), -1, dtype=np.int64)
    out[rows[sel], pos[sel]] = cols[sel]
    return out
