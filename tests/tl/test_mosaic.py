import numpy as np
import pandas as pd
import pytest

from spatia.tl._mosaic import add_crop_mosaic


def test_mosaic_elements_link_each_crop(sdata):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, size=(5, 2, 8, 8), dtype=np.uint8)
    obs = pd.DataFrame({"source_cell": list("abcde")})
    add_crop_mosaic(sdata, crops, obs, key_added="gen", channels=["DAPI", "membrane"], pixel_size=0.5)
    img = sdata.images["gen"].values
    lab = sdata.labels["gen_labels"].values
    t = sdata.tables["gen_table"]
    assert img.shape == (2, 2 * 10 - 2, 3 * 10 - 2)
    for i, row in enumerate(t.obs.itertuples()):
        ys, xs = np.nonzero(lab == row.instance_id)
        np.testing.assert_array_equal(img[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1], crops[i])
        assert row.source_cell == "abcde"[i]
    assert t.uns["spatialdata_attrs"]["region"] == "gen_labels"
    from spatialdata.transformations import get_transformation
    assert "gen" in get_transformation(sdata.images["gen"], get_all=True)
    assert "global" not in get_transformation(sdata.images["gen"], get_all=True)
    with pytest.raises(KeyError, match="overwrite=True"):
        add_crop_mosaic(sdata, crops, obs, key_added="gen")
    with pytest.raises(ValueError, match="rows"):
        add_crop_mosaic(sdata, crops, obs.iloc[:2], key_added="gen2")
    assert "gen2" not in sdata and "gen2_table" not in sdata
