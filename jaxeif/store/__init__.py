"""An influence matrix on disk, as a grid of (train block x eval block) tiles filled by any number of workers.

Layout of a store folder (a zarr v2 group: zarr-python 2 and 3, xarray, dask and tensorstore open it
without jaxeif; docs/scale.md shows how):

    PATH/.zgroup, PATH/.zattrs      the zarr group; .zattrs repeats the manifest
    PATH/manifest.json              shape, dtype, tile grid, fingerprint of the call that fills it
    PATH/eif/.zarray                zarr v2 array f[n_train, n_eval], one uncompressed chunk per tile,
    PATH/eif/I.J                    NaN where a tile was never written
    PATH/tiles/I.J.json             tile (I, J) is complete: its checksum, written after its data

Everything is written once, atomically: the folder itself is built under a temp name and renamed
into place (a second worker racing to create it opens the first one's), each chunk is written by
tensorstore (temp file, fsync, rename) and each tile's marker by jaxeif.io.atomic_file, only after
the chunk was read back and its checksum taken. A tile is complete when its marker exists and the
chunk still hashes to the marker's checksum; anything else (no marker, a torn or altered chunk) is
missing, recomputed by `fill` and refused by `Store.read_tile`. No file is written by two
processes except by atomic rename of identical content, so workers need no lock and no coordinator.
"""

from jaxeif.store.cost import MARKER_BYTES, Plan, plan
from jaxeif.store.filling import FillResult, fill, fill_spmd
from jaxeif.store.layout import FORMAT, Grid, Store, StoreError, StoreMismatchError, TileError, open, worker_share

__all__ = [
    "fill",
    "fill_spmd",
    "open",
    "plan",
    "Plan",
    "Store",
    "Grid",
    "FillResult",
    "StoreError",
    "StoreMismatchError",
    "TileError",
    "worker_share",
    "FORMAT",
]
