"""The crop store: cell crops ``(n_cells, C, S, S)`` uint8 in memory or in a chunked zarr store, and how an
extraction writes into it (two alternating buffers, compressed in the background)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_STORE_VERSION = 1
_STORE_CHUNK_BYTES = 512 * 2**10  # zarr chunks of a crop store: small enough to read a few random cells
_BUFFER_BYTES = 16 * 2**20  # each of the two write buffers of an on-disk store


@dataclass
class CropStore:
    """Cell crops ``(n_cells, C, S, S)`` uint8, in memory or in a chunked zarr store.

    On disk, crops are stored in extraction order (image tile by tile, by row within a tile, so cells close
    in space are close on disk); :meth:`get` takes table row positions and maps them through :attr:`order`.

    Attributes
    ----------
    images
        ``(n_cells, C, S, S)`` uint8 array (:class:`numpy.ndarray` or :class:`zarr.Array`), in store order.
    order
        ``(n_cells,)`` table row of each stored crop.
    obs_names
        Table ``obs_names`` in table row order.
    channels
        Channel names.
    params
        Extraction parameters (image key, coordinate system, sizes, normalisation ranges, ...).
    path
        Where the store lives on disk, or ``None`` for an in-memory store.

    Examples
    --------
    >>> crops = sp.pp.extract_crops(sdata, size=32)
    >>> crops.get([0, 1, 2]).shape  # (3, n_channels, 32, 32), uint8
    >>> crops.save("crops.zarr")  # reuse with sp.tl.fit(sdata, crops="crops.zarr")
    """

    images: Any
    order: np.ndarray
    obs_names: np.ndarray
    channels: list[str]
    params: dict = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        self._pos = np.empty(len(self.order), dtype=np.int64)
        self._pos[self.order] = np.arange(len(self.order))

    def __len__(self) -> int:
        return len(self.order)

    @property
    def size(self) -> int:
        """Crop side in pixels."""
        return int(self.images.shape[-1])

    @property
    def n_channels(self) -> int:
        return int(self.images.shape[1])

    def get(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Crops of the given table rows, ``(len(rows), C, S, S)`` uint8, in the order asked."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = self._pos[rows]
        srt = np.argsort(pos, kind="stable")
        if isinstance(self.images, np.ndarray):
            return self.images[pos]
        out = np.asarray(self.images.get_orthogonal_selection((pos[srt], slice(None), slice(None), slice(None))))
        res = np.empty_like(out)
        res[srt] = out
        return res

    def matches(self, obs_names) -> bool:
        """Whether this store holds exactly the cells of a table with these ``obs_names`` (same order)."""
        return len(obs_names) == len(self.obs_names) and bool(np.all(np.asarray(obs_names) == self.obs_names))

    def save(self, path: str | Path) -> CropStore:
        """Write the store to ``path`` (a zarr directory) and return the on-disk store."""

        path = Path(path)
        arr = _store_array(path / "crops", self.images.shape)
        step = _store_layout(self.images.shape)[1]
        for i in range(0, len(self), step):
            arr[i : i + step] = np.asarray(self.images[i : i + step])
        _write_meta(path, self.order, self.obs_names, self.channels, self.params)
        return CropStore(arr, self.order, self.obs_names, self.channels, self.params, str(path))

    @classmethod
    def open(cls, path: str | Path) -> CropStore:
        """Open a store written by :func:`extract_crops` or :meth:`save`."""
        import zarr

        path = Path(path)
        meta_file = path / "spatia_crops.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not a spatia crop store (no spatia_crops.json).")
        meta = json.loads(meta_file.read_text())
        arr = zarr.open_array(str(path / "crops"), mode="r")
        order = np.load(path / "order.npy", allow_pickle=False)
        obs_names = np.load(path / "obs_names.npy", allow_pickle=False).astype(object)
        return cls(arr, order, obs_names, meta["channels"], meta["params"], str(path))

    def to_memory(self) -> CropStore:
        """An in-memory copy (for small stores)."""
        return CropStore(np.asarray(self.images[:]), self.order, self.obs_names, self.channels, self.params, None)

    def __repr__(self) -> str:
        where = self.path or "memory"
        return f"CropStore({len(self)} cells × {self.n_channels} channels × {self.size}² px, {where})"


def _store_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(chunk, shard)`` in cells for a crop store: ~512 KB chunks (a random batch of cells reads little),
    ~16 MB shards (few files; one write buffer fills exactly one shard)."""
    per_cell = max(int(np.prod(shape[1:])), 1)
    chunk = int(np.clip(2 ** np.round(np.log2(_STORE_CHUNK_BYTES / per_cell)), 1, 1024))
    chunk = min(chunk, max(1, shape[0]))
    shard = chunk * max(1, int(_BUFFER_BYTES // (chunk * per_cell)))
    return chunk, min(shard, chunk * int(np.ceil(max(1, shape[0]) / chunk)))


def _store_array(path: Path, shape: tuple[int, ...]):
    """A new uint8 zarr array for crops (replacing one at ``path``); sharded, zstd level 1 with zarr 3.

    zstd's fast level compresses the (noisy) crops almost as well as its default at twice the speed.
    """
    import zarr

    if path.exists():
        shutil.rmtree(path)
    chunk, shard = _store_layout(shape)
    chunks = (chunk, *shape[1:])
    if hasattr(zarr, "create_array"):  # zarr >= 3
        from zarr.codecs import ZstdCodec

        return zarr.create_array(
            str(path), shape=shape, chunks=chunks, shards=(shard, *shape[1:]), dtype="uint8",
            compressors=ZstdCodec(level=1),
        )  # fmt: skip
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype="uint8")


class _StoreWriter:
    """Appends crops to a zarr array from two alternating buffers; each full buffer is written (compressed)
    in a background thread while the next one fills."""

    def __init__(self, arr, buffer_cells: int):
        self.arr = arr
        self.bufs = [np.zeros((buffer_cells, *arr.shape[1:]), dtype=np.uint8) for _ in range(2)]
        self.cur = self.filled = self.written = 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None

    @property
    def buffer(self) -> np.ndarray:
        return self.bufs[self.cur]

    def room(self) -> int:
        return len(self.buffer) - self.filled

    def advance(self, n: int) -> None:
        """``n`` more cells were written into :attr:`buffer` from position ``filled``."""
        self.filled += n
        if self.filled == len(self.buffer):
            self.flush()

    def zeros(self, n: int) -> None:
        """Append ``n`` blank crops."""
        while n > 0:
            k = min(n, self.room())
            self.buffer[self.filled : self.filled + k] = 0
            self.advance(k)
            n -= k

    def flush(self) -> None:
        if self.filled == 0:
            return
        self._wait()
        sl = slice(self.written, self.written + self.filled)
        self.pending = self.pool.submit(self.arr.__setitem__, sl, self.buffer[: self.filled])
        self.written += self.filled
        self.filled = 0
        self.cur = 1 - self.cur

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        try:
            self.flush()
            self._wait()
        finally:
            self.pool.shutdown(wait=True)


def _write_meta(path: Path, order, obs_names, channels, params) -> None:
    """Write what :meth:`CropStore.open` reads besides the crops: store order, ``obs_names``, channels, params."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "order.npy", np.asarray(order, dtype=np.int64), allow_pickle=False)
    np.save(path / "obs_names.npy", np.asarray(obs_names).astype(str), allow_pickle=False)
    meta = {"version": _STORE_VERSION, "channels": list(channels), "params": params}
    (path / "spatia_crops.json").write_text(json.dumps(meta, indent=1, default=float))


def _append(writer: _StoreWriter, crops: np.ndarray) -> None:
    """Append ``crops`` to the store through the writer's buffers."""
    done = 0
    while done < len(crops):
        k = min(len(crops) - done, writer.room())
        writer.buffer[writer.filled:writer.filled + k] = crops[done:done + k]
        writer.advance(k)
        done += k



def _crop_output(store: str | Path | None, shape: tuple[int, int, int, int]) -> tuple[Any, _StoreWriter | None]:
    """Where an extraction writes crops of ``shape``: a zeroed in-memory array and no writer (``store=None``,
    rows written in table order), or a new zarr array at ``store/crops`` and the writer that appends to it."""
    if store is None:
        return np.zeros(shape, dtype=np.uint8), None
    out = _store_array(Path(store) / "crops", shape)
    return out, _StoreWriter(out, min(shape[0], _store_layout(shape)[1]))


def _finished_store(images, order: np.ndarray, table, channels: list[str], params: dict,
                    store: str | Path | None) -> CropStore:
    """The :class:`CropStore` of an extraction's crops ``images`` for the cells of ``table``: in table order
    in memory (``store=None``); on disk in ``order`` (the table row of each stored crop), with its metadata."""
    obs_names = table.obs_names.to_numpy().astype(object)
    if store is None:
        return CropStore(images, np.arange(table.n_obs), obs_names, channels, params)
    _write_meta(Path(store), order, obs_names, channels, params)
    return CropStore(images, order, obs_names, channels, params, str(store))
