"""Reading and writing a saved :class:`~spatia.SpatiaModel`: validated loads and atomic saves."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .._fs import OLD_TAG, fsync_folder, swap_in
from .._utils import resolve_device
from .._version import __version__
from ..module import DecoderConfig, SpatiaConfig

logger = logging.getLogger(__name__)

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_META = "spatia_model.json"
_DECODER_WEIGHTS = "decoder.safetensors"
_FLOW_WEIGHTS = "flow.safetensors"
_FLOW_META = "flow.json"
_READOUT_WEIGHTS = "readout.safetensors"
_FILES = frozenset({_WEIGHTS, _CONFIG, _META, _DECODER_WEIGHTS, _FLOW_WEIGHTS, _FLOW_META, _READOUT_WEIGHTS})
_TMP_PREFIX = ".spatia_save_"  # a save in progress: .spatia_save_<name>_<random>, beside the target
_OLD_TAG = OLD_TAG  # the previous model during the swap: <name>.old-<id>, deleted once the new one is in


def write_model(model, path: str | Path, overwrite: bool = False) -> None:
    """What :meth:`SpatiaModel.save` does: write ``model`` to a temporary folder beside ``path``, then swap it in."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{path.name}_", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
        save_file(state, str(tmp / _WEIGHTS))
        (tmp / _CONFIG).write_text(model.config.to_json())
        meta = {
            "spatia_version": __version__, "genes": model.genes, "channels": model.channels,
            "label_categories": model.label_categories, "crop_params": model.crop_params,
            "history": model.history, "is_trained": model.is_trained,
            "train_info": {k: v for k, v in model.train_info.items() if isinstance(v, int | float | str)},
        }
        if model.decoder is not None:
            dstate = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
            save_file(dstate, str(tmp / _DECODER_WEIGHTS))
            meta["decoder"] = {
                "config": model.decoder.config.to_dict(), "channels": model.decoder.channels,
                "history": model.decoder_history,
                "info": {k: v for k, v in model.decoder_info.items()
                         if isinstance(v, int | float | str | list | dict)},
            }
        if model.readout is not None:
            save_file(model.readout.tensors(), str(tmp / _READOUT_WEIGHTS))
            meta["readout"] = model.readout.info
        if model.flow is not None:
            fstate = {k: v.detach().cpu().contiguous() for k, v in model.flow.state_dict().items()}
            save_file(fstate, str(tmp / _FLOW_WEIGHTS))
            (tmp / _FLOW_META).write_text(json.dumps(model.flow_info, indent=1, default=float))
        # the metadata last: a folder is a complete model once spatia_model.json is in it
        (tmp / _META).write_text(json.dumps(meta, indent=1, default=float))
        fsync_folder(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(path)


def read_model(cls, path: str | Path, map_location: str = "cpu"):
    """What :meth:`SpatiaModel.load` does: check everything in the folder, then build ``cls`` and load its weights."""
    path = Path(path)
    _recover(path)
    for f in (_WEIGHTS, _CONFIG, _META):
        if not (path / f).exists():
            raise FileNotFoundError(f"{path} is not a saved SpatiaModel: {f} is missing.")
    device = resolve_device(map_location)
    # 1. everything read from the folder is checked before any weight is allocated
    config = _read_config(path / _CONFIG)
    meta = _read_json(path / _META, _META)
    _check_meta(meta, path / _META)
    decoder_config = flow_info = None
    if "decoder" in meta:
        if not (path / _DECODER_WEIGHTS).exists():
            raise FileNotFoundError(f"{path} describes a decoder but {_DECODER_WEIGHTS} is missing.")
        d = meta["decoder"]
        decoder_config = _in_file(path / _META, lambda: DecoderConfig.from_dict(d["config"], complete=True))
    if "readout" in meta and not (path / _READOUT_WEIGHTS).exists():
        raise FileNotFoundError(f"{path} describes an image readout but {_READOUT_WEIGHTS} is missing.")
    if (path / _FLOW_META).exists() and (path / _FLOW_WEIGHTS).exists():  # a model without a flow has neither
        flow_info = _read_json(path / _FLOW_META, _FLOW_META)
        _check_flow_info(flow_info, path / _FLOW_META)
    # 2. the modules, then their weights (finite, and of the shapes the config gives)
    model = cls(config, meta["genes"], meta["channels"], meta["label_categories"], meta["crop_params"])
    _load_state(model.module, _read_weights(path / _WEIGHTS, device), path / _WEIGHTS)
    model.module.to(device)
    model.history = meta.get("history", [])
    model.is_trained = bool(meta.get("is_trained", True))
    model.train_info = meta.get("train_info", {})
    if decoder_config is not None:
        from ..module import DiffusionDecoder

        d = meta["decoder"]
        decoder = DiffusionDecoder(decoder_config, int(d["channels"]), config.width, len(model.genes))
        _load_state(decoder, _read_weights(path / _DECODER_WEIGHTS, "cpu"), path / _DECODER_WEIGHTS)
        model.decoder = decoder.eval()
        model.decoder_history = d.get("history", [])
        model.decoder_info = d.get("info", {})
    if "readout" in meta:  # models saved before spatia had one have none: predict_expression decodes
        from ._readout import ImageReadout

        file = path / _READOUT_WEIGHTS
        model.readout = _in_file(file, lambda: ImageReadout.from_tensors(_read_weights(file, "cpu"), meta["readout"]))
        if model.readout.n_genes != len(model.genes):
            raise ValueError(f"{file}: the readout predicts {model.readout.n_genes} genes, the model has "
                             f"{len(model.genes)}.")
    if flow_info is not None:
        from ..module._flow import build_flow

        model.flow_info = flow_info
        model.flow = _in_file(path / _FLOW_META, lambda: build_flow(flow_info))
        _load_state(model.flow, _read_weights(path / _FLOW_WEIGHTS, device), path / _FLOW_WEIGHTS)
        model.flow.to(device)
    return model


# validated loads ---------------------------------------------------------------------------------
def _in_file(file: Path, build):
    """``build()``, its configuration errors prefixed with the file they come from."""
    try:
        return build()
    except (TypeError, ValueError, KeyError) as e:
        msg = e.args[0] if e.args else str(e)
        raise type(e)(f"{file}: {msg}") from e


def _read_json(file: Path, what: str) -> dict:
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the model folder is damaged.") from e
    if not isinstance(d, dict):
        raise TypeError(f"{file}: {what} must hold a JSON object, got {type(d).__name__}.")
    return d


def _read_config(file: Path) -> SpatiaConfig:
    d = _read_json(file, _CONFIG)
    return _in_file(file, lambda: SpatiaConfig.from_dict(d, complete=True))


def _check_list_of_str(file: Path, meta: dict, key: str, *, empty: bool = True) -> None:
    v = meta[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"{file}: {key!r} must be a list of strings, got {v!r:.80}.")
    if not empty and not v:
        raise ValueError(f"{file}: {key!r} is empty.")
    if len(set(v)) != len(v):
        raise ValueError(f"{file}: {key!r} has duplicated entries.")


def _check_meta(meta: dict, file: Path) -> None:
    """Keys and types of ``spatia_model.json``."""
    missing = [k for k in ("genes", "channels", "label_categories", "crop_params") if k not in meta]
    if missing:
        raise KeyError(f"{file} has no {missing}: the model folder is damaged.")
    _check_list_of_str(file, meta, "genes", empty=False)
    _check_list_of_str(file, meta, "channels")
    _check_list_of_str(file, meta, "label_categories")
    if len(meta["label_categories"]) == 1:
        raise ValueError(f"{file}: 'label_categories' has one class; a supervised head has none or 2 and more.")
    kinds = {"crop_params": dict, "history": list, "train_info": dict, "is_trained": bool, "decoder": dict,
             "readout": dict}
    for key, kind in kinds.items():
        if key in meta and not isinstance(meta[key], kind):
            raise TypeError(f"{file}: {key!r} must be a {kind.__name__}, got {meta[key]!r:.80}.")
    if "history" in meta and not all(isinstance(row, dict) for row in meta["history"]):
        raise TypeError(f"{file}: 'history' must be a list of objects (one per epoch).")
    d = meta.get("decoder")
    if d is not None:
        if not isinstance(d.get("config"), dict):
            raise TypeError(f"{file}: 'decoder.config' must be an object, got {d.get('config')!r:.80}.")
        ch = d.get("channels")
        if isinstance(ch, bool) or not isinstance(ch, int) or not 1 <= ch <= 1024:
            raise ValueError(f"{file}: 'decoder.channels' must be an integer in [1, 1024], got {ch!r}.")


def _check_flow_info(info: dict, file: Path) -> None:
    """Keys and types of ``flow.json`` that shape the flow's modules."""
    missing = [k for k in ("config", "channels", "size", "emb_dim", "n_genes", "n_features", "transitions")
               if k not in info]
    if missing:
        raise KeyError(f"{file} has no {missing}: the model folder is damaged.")
    if not isinstance(info["config"], dict):
        raise TypeError(f"{file}: 'config' must be an object, got {info['config']!r:.80}.")
    limits = {"channels": 1024, "size": 1024, "emb_dim": 8192, "n_genes": 1_000_000, "n_features": 10_000}
    for key, hi in limits.items():
        v = info[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise ValueError(f"{file}: {key!r} must be an integer in [0, {hi}], got {v!r}.")
    if not isinstance(info["transitions"], list) or not info["transitions"]:
        raise ValueError(f"{file}: 'transitions' must be a non-empty list, got {info['transitions']!r:.80}.")


def _read_weights(file: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device=device)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a valid safetensors file ({e}): the model folder is damaged.") from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{file} holds non-finite weights (NaN or inf) in {bad[:5]}"
                         f"{' and more' if len(bad) > 5 else ''}: refusing to load a model that would give NaN "
                         "results. Load an earlier save, or train again.")
    return state


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file} does not match the configuration saved beside it: {e}") from e


# atomic saves ------------------------------------------------------------------------------------
def _is_model_folder(path: Path) -> bool:
    """A folder :meth:`SpatiaModel.save` wrote: its metadata, config and weights, and nothing else."""
    if not path.is_dir() or not (path / _META).is_file():
        return False
    names = {p.name for p in path.iterdir()}
    return {_META, _CONFIG, _WEIGHTS} <= names and names <= _FILES


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a model folder: choose another path.")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty: pass overwrite=True to replace the model in it.")
    if not _is_model_folder(path):
        other = sorted(p.name for p in path.iterdir() if p.name not in _FILES)
        raise FileExistsError(
            f"{path} is not a saved SpatiaModel (it holds {other[:5] or 'no ' + _META}): overwrite=True replaces "
            "a saved model only and never deletes other files. Choose another path, or empty the folder yourself."
        )


def _swap_in(tmp: Path, path: Path) -> None:
    """Move the complete model ``tmp`` to ``path`` (:func:`spatia._fs.swap_in`): at every instant one complete
    model is at ``path`` or at ``<path>.old-<id>``, where :meth:`SpatiaModel.load` finds it when ``path`` is
    missing."""
    swap_in(tmp, path, what="model")


def _stale_old(path: Path) -> list[Path]:
    """Previous models left by saves to ``path`` that were interrupted, oldest first."""
    import glob

    olds = [p for p in path.parent.glob(glob.escape(path.name) + _OLD_TAG + "*") if _is_model_folder(p)]
    return sorted(olds, key=lambda p: p.stat().st_mtime)


def _remove_stale(path: Path) -> None:
    try:
        for old in _stale_old(path):
            shutil.rmtree(old, ignore_errors=True)
    except OSError:  # the save is done; a leftover old copy is removed by the next one
        pass


def _recover(path: Path) -> None:
    """``path`` missing after a save was killed between its renames: move the previous model back."""
    if path.exists():
        return
    olds = _stale_old(path)
    if olds:
        logger.warning("%s is missing, but an interrupted save left the previous model in %s: restoring it.",
                       path, olds[-1])
        os.replace(olds[-1], path)
