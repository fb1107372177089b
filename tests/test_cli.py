"""The command line: ``spatia fit STORE.zarr --out DIR`` runs the pipeline on a user's store."""

from __future__ import annotations

import spatialdata as sd

import spatia as sp
from spatia.__main__ import main


def test_cli_fit_on_a_zarr_store(tmp_path):
    sdata = sp.datasets.simulate(300, random_state=1)
    sdata.write(tmp_path / "in.zarr")
    out = tmp_path / "out"
    rc = main(["fit", str(tmp_path / "in.zarr"), "--out", str(out), "--preset", "tiny", "--epochs", "2",
               "--cell-type-key", "cell_type", "--decoder-epochs", "1", "-q"])
    assert rc == 0
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"niches.png", "umap_cell.png", "umap_niche.png", "history.png", "imputation.png", "generated.png",
            "umap_cell_type.png"} <= figs
    res = sd.read_zarr(out / "spatia.zarr")
    t = res["table"]
    assert {"X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"} <= set(t.obsm)
    assert {"spatia_niche", "spatia_cluster", "spatia_cell_type"} <= set(t.obs)
    assert "spatia_imputed" in t.layers and "spatia_generated" in res.images
    loaded = sp.SpatiaModel.load(out / "model")
    assert loaded.decoder is not None
    assert main(["fit", str(tmp_path / "nope.zarr"), "--out", str(out), "-q"]) == 2
