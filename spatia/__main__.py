"""The ``spatia`` command line.

``spatia fit`` trains on a slide and writes the results: a SpatialData ``.zarr`` store, or an instrument's
output folder read through spatialdata-io (``--xenium``, ``--merscope``, ``--cosmx``).
``spatia demo`` runs the same pipeline on the built-in demo slide.

Nothing heavy is imported until a command runs: ``spatia --help`` answers without torch, spatialdata or scanpy.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from . import _cli_figures, _cli_steps
from ._settings import settings
from ._version import __version__

# instrument flag -> (reader name in spatialdata_io, instrument name, files its reader cannot do without)
_INSTRUMENTS = {
    "xenium": ("10x Xenium", "experiment.xenium"),
    "merscope": ("Vizgen MERSCOPE", None),
    "cosmx": ("NanoString CosMx", "*_exprMat_file.csv"),
}
_IO_INSTALL = 'pip install "spatia[io]"'
_ZARR_ROUTE = ("or read the data in Python (e.g. with spatialdata-io's readers), write it with "
               "`sdata.write('slide.zarr')` and run `spatia fit slide.zarr`")
# keyword arguments that library messages name, and the flag that sets each on the command line
_FLAG_OF = {
    "outside": "--outside", "image_key": "--image-key", "labels_key": "--labels-key", "shapes_key": "--shapes-key",
    "table_key": "--table-key", "layer": "--layer", "coordinate_system": "--coordinate-system",
    "um_per_unit": "--um-per-unit", "cell_type_key": "--cell-type-key",
}


class CLIError(Exception):
    """A problem with the command's input: printed as ``spatia: error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------------- arguments
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _devices(text: str) -> int | str:
    """``"2"`` → 2 (that many devices); ``"auto"`` or ``"0,1"`` (device ids) are passed to Lightning as given."""
    return int(text) if text.isdigit() else text


def _add_run_flags(p: argparse.ArgumentParser, epochs: int | None = None, decoder_epochs: int = 0) -> None:
    """Training flags shared by ``fit`` and ``demo``."""
    p.add_argument("--epochs", type=int, default=epochs,
                   help="training epochs (default: " + (str(epochs) if epochs is not None else
                                                         "the configuration's, with early stopping") + ")")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same results on CPU "
                   "(default: %(default)s)")
    p.add_argument("--accelerator", default="auto",
                   help="Lightning accelerator: auto, cpu, gpu/cuda or mps (default: %(default)s)")
    p.add_argument("--devices", type=_devices, default="auto",
                   help="Lightning devices: a count (e.g. 4), device ids (e.g. 0,1) or auto (default: %(default)s)")
    p.add_argument("--precision",
                   help="Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed (default: bf16-mixed on CUDA, "
                        "else 32-true)")
    p.add_argument("--decoder-epochs", type=int, default=decoder_epochs,
                   help="also train the diffusion decoder for this many epochs and generate crops (0: no; "
                        "default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings and the paths written")
    p.add_argument("--debug", action="store_true", help="show the full traceback when something fails")


def build_parser() -> argparse.ArgumentParser:
    """The ``spatia`` argument parser (imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="spatia", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="spatia fit: train on a SpatialData .zarr store or an instrument output folder (--xenium,\n"
                    "--merscope, --cosmx; read with spatialdata-io) and write embeddings, niches, the model and\n"
                    "figures. spatia demo: the same pipeline on the built-in demo slide.\n"
                    "`spatia fit --help` lists every option.")
    parser.add_argument("--version", action="version", version=f"spatia {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,demo}")

    f = sub.add_parser(
        "fit", help="fit on a SpatialData .zarr or an instrument output folder and write the results",
        description="Train SPATIA on one slide, cluster cells and niches, impute, and write the results: "
                    "OUT/spatia.zarr (the slide with embeddings, niches and imputed expression), OUT/model/, "
                    "OUT/figures/ and OUT/imputation_scores.csv. Give exactly one input: a .zarr store or one "
                    "of --xenium / --merscope / --cosmx.",
    )
    f.add_argument("path", type=Path, nargs="?", help="SpatialData .zarr store")
    inst = f.add_argument_group("instrument output folders (read with spatialdata-io: " + _IO_INSTALL + ")")
    for flag, (name, _) in _INSTRUMENTS.items():
        inst.add_argument(f"--{flag}", type=Path, metavar="DIR",
                          help=f"{name} output folder, read with spatialdata_io.{flag}()")
    f.add_argument("--out", type=Path, metavar="DIR",
                   help="folder for the results (default: INPUT_spatia next to the input, e.g. slide_spatia/ for "
                        "slide.zarr)")
    elements = f.add_argument_group("elements (default: what the slide holds, when it holds only one)")
    elements.add_argument("--image-key", action="append", metavar="KEY",
                          help="morphology image; repeat it for several (e.g. one per CosMx FOV): each cell is "
                               "cropped from the image that holds it (default: the only image; morphology_focus "
                               "for Xenium; every FOV image for CosMx)")
    elements.add_argument("--table-key", default="table", help="table of raw counts (default: %(default)s)")
    elements.add_argument("--labels-key", help="segmentation labels of the cells (default: what the table annotates)")
    elements.add_argument("--shapes-key", help="cell shapes (default: what the table annotates)")
    elements.add_argument("--layer", help="table layer with raw counts (default: X)")
    elements.add_argument("--cell-type-key",
                          help="obs column of known cell types (NaN = unknown) to transfer to the other cells")
    geo = f.add_argument_group("geometry")
    geo.add_argument("--coordinate-system",
                     help="coordinate system to match cells and image in (default: the shared one, global if "
                          "present)")
    geo.add_argument("--um-per-unit", type=_positive_float, metavar="FLOAT",
                     help="µm per unit of the coordinate system (1 for µm, the pixel size for pixels; default: "
                          "read from the elements' transformations, else estimated from the cells' spacing "
                          "with a warning)")
    geo.add_argument("--outside", choices=["error", "pad"], default="error",
                     help="cells whose centre lies outside the image: stop with an error, or pad them with blank "
                          "crops (default: %(default)s)")
    model = f.add_argument_group("model")
    cfg = model.add_mutually_exclusive_group()
    cfg.add_argument("--preset", choices=["tiny", "default", "large"],
                     help="model size: tiny (tests, seconds), default (CPU-friendly) or large (GPU) "
                          "(default: default)")
    cfg.add_argument("--config", type=Path, metavar="FILE",
                     help="JSON configuration as SpatiaConfig.to_dict() writes it (a saved model's config.json "
                          "works)")
    model.add_argument("--resolution", type=float, default=None,
                       help="Leiden resolution of the cell and niche clusters (default: sp.tl.cluster's, i.e. 0.5 "
                            "for cells and the most stable one for niches)")
    _add_run_flags(f)

    d = sub.add_parser("demo", help="fit, cluster niches and plot on the built-in demo slide",
                       description="The whole pipeline on the built-in demo slide (simulated, offline).")
    d.add_argument("--out", type=Path, default=Path("spatia_demo_out"), metavar="DIR",
                   help="folder for the results (default: %(default)s)")
    _add_run_flags(d, epochs=30, decoder_epochs=3)
    return parser


# ------------------------------------------------------------------------------------------- input
def _the_input(args) -> tuple[str, Path]:
    """``(kind, path)`` of the one input given: kind ``"zarr"`` or an instrument name."""
    given = [("zarr", args.path)] if args.path is not None else []
    given += [(k, getattr(args, k)) for k in _INSTRUMENTS if getattr(args, k) is not None]
    if len(given) != 1:
        what = ", ".join(str(p) if k == "zarr" else f"--{k} {p}" for k, p in given) or "none"
        raise CLIError(f"give exactly one input: a SpatialData .zarr store, or one of --xenium / --merscope / "
                       f"--cosmx DIR (got {what}).")
    kind, path = given[0]
    if not path.exists():
        raise CLIError(f"{path} does not exist.")
    if kind == "zarr":
        found = _instrument_of(path)
        if found is not None:
            raise CLIError(f"{path} looks like a {_INSTRUMENTS[found][0]} output folder, not a SpatialData store: "
                           f"pass it as --{found} {path}.")
        if not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
            raise CLIError(f"{path} is not a SpatialData .zarr store (no zarr.json or .zgroup in it): pass a store "
                           "written by `sdata.write(...)`, or an instrument folder with --xenium / --merscope / "
                           "--cosmx.")
    elif not path.is_dir():
        raise CLIError(f"--{kind} {path} is not a folder: pass the {_INSTRUMENTS[kind][0]} output folder.")
    return kind, path


def _instrument_of(path: Path) -> str | None:
    if not path.is_dir():
        return None
    if (path / "experiment.xenium").exists():
        return "xenium"
    if any(path.glob("*_exprMat_file.csv*")):
        return "cosmx"
    return None


def _default_out(path: Path) -> Path:
    name = path.resolve().name
    return path.resolve().parent / f"{name[:-5] if name.endswith('.zarr') else name}_spatia"


def _check_instrument_folder(kind: str, path: Path) -> None:
    """Fail early, naming the file, when a folder lacks what its spatialdata-io reader cannot do without."""
    name, needed = _INSTRUMENTS[kind]
    if needed is None or any(path.glob(needed)):
        return
    raise CLIError(
        f"--{kind} {path}: no {needed} in the folder, so spatialdata_io.{kind} cannot read it. Pass the folder "
        f"the {name} instrument wrote (the one holding {needed}), {_ZARR_ROUTE}."
    )


def _read(kind: str, path: Path, table_key: str, debug: bool):
    """The SpatialData of the input."""
    if kind == "zarr":
        import spatialdata as sd

        return sd.read_zarr(path)
    _check_instrument_folder(kind, path)
    try:
        import spatialdata_io
    except ImportError:
        raise CLIError(f"--{kind} reads the folder with spatialdata-io, which is not installed: {_IO_INSTALL} "
                       f"(or `pip install spatialdata-io`), {_ZARR_ROUTE}.") from None
    reader = getattr(spatialdata_io, kind)
    try:
        sdata = reader(path)
    except Exception as e:
        if debug:
            raise
        raise CLIError(f"spatialdata_io.{kind} could not read {path} ({type(e).__name__}: {e}). Check that it is "
                       f"a complete {_INSTRUMENTS[kind][0]} output folder, {_ZARR_ROUTE}.") from None
    if table_key not in sdata.tables:
        raise CLIError(f"spatialdata_io.{kind} read {path} but found no counts table {table_key!r} (tables: "
                       f"{sorted(sdata.tables)}): the folder lacks the cell-by-gene counts or they are named "
                       f"differently; pass --table-key, {_ZARR_ROUTE}.")
    return sdata


def _default_image_key(kind: str, sdata) -> str | list[str] | None:
    """The image(s) spatialdata-io's reader writes for the instrument's morphology stain."""
    images = list(sdata.images)
    if kind == "xenium" and "morphology_focus" in images:
        return "morphology_focus"
    if kind == "cosmx":
        fovs = sorted(k for k in images if k.endswith("_image"))
        return fovs if len(fovs) > 1 else (fovs[0] if fovs else None)
    return None


def _config(args):
    import json

    import spatia as sp

    if args.config is None:
        return getattr(sp.SpatiaConfig, args.preset or "default")()
    if not args.config.is_file():
        raise CLIError(f"--config {args.config} does not exist.")
    try:
        d = json.loads(args.config.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"--config {args.config} is not valid JSON ({e}).") from None
    if not isinstance(d, dict):
        raise CLIError(f"--config {args.config} holds a {type(d).__name__}, expected a JSON object as "
                       "SpatiaConfig.to_dict() writes it.")
    try:
        return sp.SpatiaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--config {args.config} is not a SpatiaConfig ({e}); write one with "
                       "`json.dump(sp.SpatiaConfig.tiny().to_dict(), f)` and edit its fields.") from None


def _flag_hints(message: str) -> str:
    """The flags for the keyword arguments a library message names (``outside='pad'`` → ``--outside pad``)."""
    hints = []
    for m in re.finditer(r"\b(" + "|".join(_FLAG_OF) + r")=('([^']*)'|\"([^\"]*)\"|[\w.\-]+)?", message):
        value = m.group(3) if m.group(3) is not None else m.group(4) if m.group(4) is not None else m.group(2)
        hint = f"{_FLAG_OF[m.group(1)]} {value}" if value else _FLAG_OF[m.group(1)]
        if hint not in hints:
            hints.append(hint)
    return f" (on the command line: {', '.join(hints)})" if hints else ""


# ------------------------------------------------------------------------------------------- running
def _setup_logging() -> None:
    import warnings

    logging.getLogger("ome_zarr").setLevel(logging.ERROR)  # "no parent found" for every labels element read
    # notices meant for library developers, not for someone running the pipeline
    warnings.filterwarnings("ignore", category=SyntaxWarning)  # docrep docstrings (via squidpy)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*zarr v3 autosharding.*")


def _takes(func, name: str) -> bool:
    import inspect

    return name in inspect.signature(func).parameters


def _pipeline(sdata, out: Path, *, elements: dict, config, max_epochs, random_state, resolution, trainer: dict,
              outside: str = "error", um_per_unit: float | None = None, cell_type_key=None, decoder_epochs=0,
              groupby=None) -> None:
    """Fit, cluster, annotate, impute (and generate), then write the zarr, the model and the figures to ``out``.

    ``elements``: ``image_key``, ``table_key``, ``labels_key``, ``shapes_key``, ``layer``, ``coordinate_system``;
    ``trainer``: ``accelerator``, ``devices``, ``precision``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import spatia as sp

    table_key, image_key = elements["table_key"], elements["image_key"]
    one_image = image_key[0] if isinstance(image_key, list) else image_key  # figures show one image
    # inference (impute, generate) on the training accelerator: "auto" picks CUDA when there is one
    device = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(str(trainer["accelerator"]).lower())
    if um_per_unit is not None and not _takes(sp.tl.fit, "um_per_unit"):
        raise CLIError("--um-per-unit needs a spatia whose sp.tl.fit takes um_per_unit=; this one does not.")
    out.mkdir(parents=True, exist_ok=True)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    t0 = time.time()
    model = _cli_steps.fit_and_cluster(sdata, out, elements=elements, config=config, max_epochs=max_epochs,
                                       random_state=random_state, resolution=resolution, trainer=trainer,
                                       outside=outside, um_per_unit=um_per_unit)
    written = []
    if cell_type_key is not None:
        written.append(_cli_steps.annotate_cells(sdata, model, cell_type_key, table_key=table_key,
                                                 random_state=random_state, figs=figs))
    best, fig = _cli_steps.impute_genes(sdata, model, out, elements=elements, random_state=random_state,
                                        device=device, figs=figs)
    written.append(fig)
    if decoder_epochs > 0:
        written.append(_cli_steps.generate_crops(sdata, model, out, elements=elements, decoder_epochs=decoder_epochs,
                                                 random_state=random_state, trainer=trainer, device=device,
                                                 image_key=one_image, groupby=groupby, figs=figs))
    written += _cli_figures.summary_figures(
        sdata, model, figs, image_key=one_image, table_key=table_key, coordinate_system=elements["coordinate_system"],
        gene=best[0], counts_layer=elements["layer"],
        color="spatia_cell_type" if cell_type_key is not None else "spatia_cluster",
        generated=decoder_epochs > 0, groupby=groupby)
    _cli_figures.close(written)
    _cli_steps.write_results(sdata, out, figs, t0)


def _demo(args) -> None:
    import numpy as np

    import spatia as sp

    sdata = sp.datasets.demo()
    # pretend a pathologist labelled a third of the cells: spatia transfers the labels to the rest
    t = sdata["table"]
    known = t.obs["cell_type"].astype(object).copy()
    known[np.random.default_rng(args.seed).random(t.n_obs) > 1 / 3] = np.nan
    t.obs["cell_type_known"] = known
    elements = {"image_key": "morphology", "table_key": "table", "labels_key": None, "shapes_key": None,
                "layer": None, "coordinate_system": None}
    _pipeline(sdata, args.out, elements=elements, config=sp.SpatiaConfig.default(), max_epochs=args.epochs,
              random_state=args.seed, resolution=None, trainer=_trainer(args), cell_type_key="cell_type_known",
              decoder_epochs=args.decoder_epochs, groupby="cell_type")


def _trainer(args) -> dict:
    return {"accelerator": args.accelerator, "devices": args.devices, "precision": args.precision}


def _fit(args) -> None:
    kind, path = _the_input(args)
    out = args.out if args.out is not None else _default_out(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file: pass a folder.")
    config = _config(args)  # before reading the slide: a bad config fails fast
    sdata = _read(kind, path, args.table_key, args.debug)
    image_key = args.image_key
    if image_key is None:
        image_key = _default_image_key(kind, sdata)
    elif len(image_key) == 1:
        image_key = image_key[0]
    elements = {"image_key": image_key, "table_key": args.table_key, "labels_key": args.labels_key,
                "shapes_key": args.shapes_key, "layer": args.layer, "coordinate_system": args.coordinate_system}
    _pipeline(sdata, out, elements=elements, config=config, max_epochs=args.epochs, random_state=args.seed,
              resolution=args.resolution, trainer=_trainer(args), outside=args.outside,
              um_per_unit=args.um_per_unit, cell_type_key=args.cell_type_key, decoder_epochs=args.decoder_epochs,
              groupby=args.cell_type_key)


def main(argv: list[str] | None = None) -> int:
    """Run the ``spatia`` command; returns the exit status (2: a problem with the input, printed)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            _the_input(args)  # input errors before the slow imports
        _setup_logging()
        # spatia's lines as in a notebook (Lightning's banner is hidden inside spatia's calls already); the
        # setting is restored on return, for callers of main() in the same process
        with settings.override(verbosity=1 if args.quiet else 2):
            (_fit if args.command == "fit" else _demo)(args)
    except CLIError as e:
        print(f"spatia {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
        print(f"spatia {args.command}: error: {msg}{_flag_hints(msg)}\n(run with --debug for the traceback)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
