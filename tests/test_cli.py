"""The command line: ``spatia fit`` on a SpatialData store or an instrument folder, its flags and its errors."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import spatialdata as sd

import spatia as sp
from spatia.__main__ import _default_image_key, _default_out, _flag_hints, build_parser, main

_DATA = Path(sp.__file__).parent / "datasets" / "_data"
_HEAVY = ("torch", "lightning", "spatialdata", "scanpy", "anndata", "spatialdata_io")


@pytest.fixture(scope="module")
def xenium_zarr(tmp_path_factory) -> Path:
    """The shipped Xenium toy as spatialdata-io lays it out, written to a store."""
    path = tmp_path_factory.mktemp("xenium") / "xen.zarr"
    sp.datasets.xenium_toy().write(path)
    return path


class _Stop(Exception):
    """Raised by the stand-in for ``sp.tl.fit`` once it has recorded its arguments."""


@pytest.fixture
def fit_calls(monkeypatch) -> list:
    """Replace ``sp.tl.fit`` by a recorder (same signature) that stops the command before training."""
    calls = []

    @functools.wraps(sp.tl.fit)
    def record(data, **kwargs):
        calls.append((data, kwargs))
        raise _Stop

    monkeypatch.setattr(sp.tl, "fit", record)
    return calls


def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------- fast paths
def test_help_and_version_import_nothing_heavy():
    code = (
        "import sys\n"
        "from spatia.__main__ import main\n"
        f"for argv in (['--help'], ['fit', '--help'], ['demo', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        f"print('HEAVY', sorted(m for m in {_HEAVY!r} if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, f"--help / --version imported heavy modules: {res.stdout.splitlines()[-1]}"
    for flag in ("--xenium", "--merscope", "--cosmx", "--out", "--outside", "--coordinate-system", "--um-per-unit",
                 "--accelerator", "--devices", "--precision", "--preset", "--config", "--epochs", "--seed"):
        assert flag in res.stdout, f"{flag} missing from `spatia fit --help`"


def test_version():
    res = subprocess.run([sys.executable, "-m", "spatia", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"spatia {sp.__version__}"


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, p in [("spatia", parser), *subparsers.items()]:
        for action in p._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help"


def test_default_out_is_next_to_the_input(tmp_path):
    assert _default_out(tmp_path / "slide.zarr") == tmp_path.resolve() / "slide_spatia"
    assert _default_out(tmp_path / "output-XETG001") == tmp_path.resolve() / "output-XETG001_spatia"


def test_default_images_of_instrument_folders():
    # the toys carry spatialdata-io's element names: Xenium's focus stain, one image per CosMx FOV
    assert _default_image_key("xenium", sp.datasets.xenium_toy(transcripts=False)) == "morphology_focus"
    assert _default_image_key("cosmx", sp.datasets.cosmx_lung_mini(transcripts=False)) == ["F002_image", "F003_image"]
    assert _default_image_key("merscope", sp.datasets.merscope_toy()) is None  # its one mosaic: fit's default
    assert _default_image_key("zarr", sp.datasets.xenium_toy(transcripts=False)) is None


def test_library_messages_name_the_flag():
    assert _flag_hints("or pass outside='pad' to give them blank crops.") == " (on the command line: --outside pad)"
    assert _flag_hints("pass image_key= (one image, or a list)") == " (on the command line: --image-key)"
    msg = "pass um_per_unit= or set it once with `sp.pp.set_um_per_unit(data, value, coordinate_system='fov')`"
    assert _flag_hints(msg) == " (on the command line: --um-per-unit, --coordinate-system fov)"
    assert _flag_hints("The table has no cells.") == ""


# ------------------------------------------------------------------------------------- bad input
def test_input_errors(tmp_path, xenium_zarr, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (tmp_path / "file.txt").write_text("")
    xen = tmp_path / "xenium_out"
    xen.mkdir()
    (xen / "experiment.xenium").write_text("{}")
    cases = [
        (["fit", xenium_zarr, "--xenium", folder], "give exactly one input"),
        (["fit", "--xenium", folder, "--cosmx", folder], "give exactly one input"),
        (["fit"], "give exactly one input"),
        (["fit", "--xenium", tmp_path / "nope"], "does not exist"),
        (["fit", tmp_path / "nope.zarr"], "does not exist"),
        (["fit", "--cosmx", tmp_path / "file.txt"], "is not a folder"),
        (["fit", folder], "is not a SpatialData .zarr store"),
        (["fit", xen], f"pass it as --xenium {xen}"),
        (["fit", "--xenium", folder], "no experiment.xenium"),
        (["fit", "--cosmx", folder], "no *_exprMat_file.csv"),
    ]
    for argv, expected in cases:
        rc, err = _run(argv, capsys)
        assert rc == 2 and expected in err, (argv, rc, err)


@pytest.mark.parametrize("flags", [["--preset", "tiny", "--config", "c.json"], ["--um-per-unit", "0"],
                                   ["--outside", "crop"]])
def test_argument_errors_exit_2(flags, xenium_zarr):
    with pytest.raises(SystemExit) as e:
        main(["fit", str(xenium_zarr), *flags])
    assert e.value.code == 2


@pytest.mark.parametrize("kind", ["xenium", "merscope", "cosmx"])
def test_missing_spatialdata_io_names_the_extra(kind, tmp_path, monkeypatch, capsys):
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "experiment.xenium").write_text("{}")  # what the reader needs first, so that the import is reached
    (folder / "x_exprMat_file.csv").write_text("")
    monkeypatch.setitem(sys.modules, "spatialdata_io", None)  # `import spatialdata_io` raises ImportError
    rc, err = _run(["fit", f"--{kind}", folder, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert 'pip install "spatia[io]"' in err and f"--{kind}" in err, err


def test_config_errors(tmp_path, xenium_zarr, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{width: 3")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**sp.SpatiaConfig.tiny().to_dict(), "widht": 3}))
    for path, expected in [(tmp_path / "none.json", "does not exist"), (bad_json, "is not valid JSON"),
                           (unknown, "widht")]:
        rc, err = _run(["fit", xenium_zarr, "--config", path, "--out", tmp_path / "out"], capsys)
        assert rc == 2 and expected in err, (path, err)


# ------------------------------------------------------------------------------------- flags reach sp.tl.fit
def test_flags_reach_fit(tmp_path, xenium_zarr, fit_calls):
    config = sp.SpatiaConfig.tiny().replace(niche={"k": 7})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    argv = ["fit", xenium_zarr, "--out", tmp_path / "out", "--config", tmp_path / "config.json", "--epochs", "3",
            "--seed", "7", "--outside", "pad", "--coordinate-system", "global", "--accelerator", "cpu",
            "--devices", "1", "--precision", "32-true", "--image-key", "morphology_focus", "--um-per-unit", "1.7",
            "-q"]
    with pytest.raises(_Stop):
        main([str(a) for a in argv])
    data, kw = fit_calls[-1]
    assert data["table"].n_obs == 526
    assert kw["config"] == config
    expected = {"max_epochs": 3, "random_state": 7, "outside": "pad", "coordinate_system": "global",
                "accelerator": "cpu", "devices": 1, "precision": "32-true", "image_key": "morphology_focus",
                "um_per_unit": 1.7, "table_key": "table", "checkpoint_dir": tmp_path / "out" / "checkpoints"}
    assert {k: kw.get(k) for k in expected} == expected

    # defaults: the default preset, no um_per_unit (units come from the slide), several images as a list
    with pytest.raises(_Stop):
        main([str(a) for a in ["fit", xenium_zarr, "--out", tmp_path / "out", "--image-key", "a",
                               "--image-key", "b", "-q"]])
    _, kw = fit_calls[-1]
    assert kw["config"] == sp.SpatiaConfig.default() and "um_per_unit" not in kw
    assert kw["image_key"] == ["a", "b"] and kw["outside"] == "error" and kw["devices"] == "auto"


# ------------------------------------------------------------------------------------- shipped instrument folders
def test_shipped_xenium_and_cosmx_folders_are_refused_with_the_missing_file(tmp_path, capsys):
    # spatialdata_io.xenium needs experiment.xenium (and cells.zarr.zip), spatialdata_io.cosmx the
    # *_exprMat_file.csv / *_metadata_file.csv tables: the shipped raw files (trimmed by their sources) lack them
    for kind, folder, missing in [("xenium", "xenium_toy", "experiment.xenium"),
                                  ("cosmx", "cosmx_lung12_mini", "*_exprMat_file.csv")]:
        rc, err = _run(["fit", f"--{kind}", _DATA / folder, "--out", tmp_path / "out"], capsys)
        assert rc == 2 and f"no {missing}" in err and "spatia fit slide.zarr" in err, err


def _merscope_copy(dest: Path, *, tables: bool) -> Path:
    """The shipped MERSCOPE folder as spatialdata-io's reader expects it: polygons at z-plane 0 as
    MultiPolygons, uncompressed csv tables (with ``tables=False``: no cell-by-gene table at all)."""
    import geopandas as gpd
    import shapely

    shutil.copytree(_DATA / "merscope_toy", dest)
    bounds = gpd.read_parquet(dest / "cell_boundaries.parquet")
    bounds["ZIndex"] = 0
    bounds[bounds.geometry.name] = bounds.geometry.map(lambda p: shapely.MultiPolygon([p]))
    bounds.to_parquet(dest / "cell_boundaries.parquet")
    if tables:
        for name in ("cell_by_gene.csv", "cell_metadata.csv"):
            (dest / name).write_bytes(gzip.decompress((dest / f"{name}.gz").read_bytes()))
    return dest


def test_merscope_folder_through_spatialdata_io(tmp_path, fit_calls, capsys):
    # the shipped folder itself: the reader keeps z-plane 0 polygons only, and ours are at z-plane 3
    rc, err = _run(["fit", "--merscope", _DATA / "merscope_toy", "--out", tmp_path / "o1", "-q"], capsys)
    assert rc == 2 and "spatialdata_io.merscope could not read" in err, (
        "spatialdata-io now reads the shipped MERSCOPE folder: test --merscope on it and update the docs", err)

    folder = _merscope_copy(tmp_path / "region_0", tables=True)
    with pytest.raises(_Stop):
        main([str(a) for a in ["fit", "--merscope", folder, "--outside", "pad", "-q"]])
    data, kw = fit_calls[-1]
    assert data["table"].n_obs == 1058 and len(data.images) == 1 and kw["outside"] == "pad"
    assert (tmp_path / "region_0_spatia").is_dir()  # results go next to the input folder

    # without the cell-by-gene csv the reader only warns and returns no table: the command says so
    folder = _merscope_copy(tmp_path / "region_1", tables=False)
    rc, err = _run(["fit", "--merscope", folder, "-q"], capsys)
    assert rc == 2 and "found no counts table 'table'" in err, err


# ------------------------------------------------------------------------------------- end to end
def test_fit_on_the_shipped_xenium_slide(xenium_zarr, capsys):
    # cells at the edge of the image stop the run with the flag that fixes it
    rc, err = _run(["fit", xenium_zarr, "--preset", "tiny", "--epochs", "1", "-q"], capsys)
    assert rc == 2 and "--outside pad" in err, err

    rc = main(["fit", str(xenium_zarr), "--preset", "tiny", "--epochs", "1", "--outside", "pad", "--um-per-unit",
               "1.7", "-q"])
    assert rc == 0
    out = xenium_zarr.parent / "xen_spatia"
    assert {p.name for p in (out / "figures").glob("*.png")} >= {"niches.png", "umap_cell.png", "umap_niche.png",
                                                                  "history.png", "imputation.png", "at_a_glance.png"}
    res = sd.read_zarr(out / "spatia.zarr")
    t = res["table"]
    assert t.n_obs == 526
    assert {"X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"} <= set(t.obsm)
    assert {"spatia_niche", "spatia_cluster"} <= set(t.obs) and "spatia_imputed" in t.layers
    units = t.uns["spatia"]["fit"]["units"]
    assert units["um_per_unit"] == 1.7 and units["source"] == "argument"
    assert res.attrs["spatia_um_per_unit"]["global"] == 1.7  # recorded on the slide for the later steps
    model = sp.SpatiaModel.load(out / "model")
    assert model.config == sp.SpatiaConfig.tiny() and model.crop_params["outside"] == "pad"
    assert (out / "imputation_scores.csv").stat().st_size > 0


def test_fit_with_annotation_and_generation(tmp_path):
    sdata = sp.datasets.simulate(300, random_state=1)
    sdata.write(tmp_path / "in.zarr")
    out = tmp_path / "out"
    rc = main(["fit", str(tmp_path / "in.zarr"), "--out", str(out), "--preset", "tiny", "--epochs", "2",
               "--cell-type-key", "cell_type", "--decoder-epochs", "1", "--accelerator", "cpu", "-q"])
    assert rc == 0
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"niches.png", "umap_cell.png", "umap_niche.png", "history.png", "imputation.png", "generated.png",
            "umap_cell_type.png", "at_a_glance.png"} <= figs
    res = sd.read_zarr(out / "spatia.zarr")
    t = res["table"]
    assert {"X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"} <= set(t.obsm)
    assert {"spatia_niche", "spatia_cluster", "spatia_cell_type"} <= set(t.obs)
    assert "spatia_imputed" in t.layers and "spatia_generated" in res.images
    loaded = sp.SpatiaModel.load(out / "model")
    assert loaded.decoder is not None


def test_results_store_replaced_whole_or_not_at_all(tmp_path, capsys):
    from spatia._cli_steps import write_results

    first = sp.datasets.simulate(60, random_state=0)
    out = tmp_path / "out"
    out.mkdir()
    write_results(first, out, out, 0.0)
    assert sd.read_zarr(out / "spatia.zarr")["table"].n_obs == 60

    second = sp.datasets.simulate(80, random_state=1)
    write = second.write

    def dies_half_way(path, **kw):
        write(path, **kw)  # everything on disk, then the process "dies" before the swap
        raise KeyboardInterrupt

    second.write = dies_half_way
    with pytest.raises(KeyboardInterrupt):
        write_results(second, out, out, 0.0)
    assert [p.name for p in out.iterdir()] == ["spatia.zarr"]  # no half-written store left beside it
    assert sd.read_zarr(out / "spatia.zarr")["table"].n_obs == 60  # the earlier results, untouched

    del second.write
    write_results(second, out, out, 0.0)
    assert sd.read_zarr(out / "spatia.zarr")["table"].n_obs == 80
    assert [p.name for p in out.iterdir()] == ["spatia.zarr"]
