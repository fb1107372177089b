"""A long fit killed mid-epoch and resumed from its checkpoint ends where an uninterrupted fit ends.

On the ``scale.py`` slide of ``--cells`` cells (``simulate(n, lazy=True, random_state=0)`` in zarr; written
first if missing), three fits run in fresh processes with the same seed:

1. ``fit(checkpoint_dir=...)``, killed (SIGKILL) ``--kill-after`` seconds after its first ``last.ckpt`` appears,
   i.e. in the middle of a later epoch;
2. the same call with ``ckpt_path=<checkpoint_dir>/last.ckpt``: it resumes at the epoch after the checkpoint;
3. the same call, uninterrupted.

It prints the epochs done before the kill, each process's wall time, and the largest difference between the
embeddings of (2) and (3) (``X_spatia_cell``, ``X_spatia_niche``, ``X_spatia_tissue``) and between their loss
histories.

    OMP_NUM_THREADS=1 python benchmarks/resume.py --cells 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from scale import IMAGE, slide_path  # noqa: E402

_FIT = """
import json, sys, numpy as np, spatialdata, spatia as sp
path, store, ckdir, resume, out, n_cells, epochs, image = sys.argv[1:9]
sdata = spatialdata.read_zarr(path)
cfg = sp.SpatiaConfig.default()
kw = dict(ckpt_path=resume) if resume != "-" else {}
res = sp.tl.fit(sdata, image_key=image, config=cfg, crops=store, n_cells=int(n_cells), max_epochs=int(epochs),
                random_state=0, checkpoint_dir=None if ckdir == "-" else ckdir, inplace=False, **kw)
model = res.pop("model")
np.savez(out, **{k.split("/")[-1]: v for k, v in res.items() if k.startswith("obsm/")})
json.dump(model.history, open(out + ".json", "w"))
"""


def _run(args: list[str], kill_when: Path | None = None, kill_after: float = 0.0) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _FIT, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if kill_when is not None:
        while not kill_when.exists() and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--train-cells", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=30.0, help="seconds after the first checkpoint")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spatia_scale"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path, _ = slide_path(args.workdir, args.cells)
    import spatialdata

    import spatia as sp

    work = args.workdir / f"resume_{args.cells}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    store = work / "crops.zarr"
    cfg = sp.SpatiaConfig.default()
    sp.pp.extract_crops(spatialdata.read_zarr(path), image_key=IMAGE, size=cfg.image.size, crop_um=cfg.image.crop_um,
                        store=store)
    ck = work / "ckpt"
    common = [str(path), str(store)]
    tail = [str(args.train_cells), str(args.epochs), IMAGE]
    t_kill, rc = _run([*common, str(ck), "-", str(work / "killed"), *tail], kill_when=ck / "last.ckpt",
                      kill_after=args.kill_after)
    import torch

    done = torch.load(ck / "last.ckpt", weights_only=True)["epoch"] + 1
    print(f"killed fit: {t_kill:.0f} s, return code {rc}, {done} epoch(s) checkpointed before the kill", flush=True)
    t_res, rc_res = _run([*common, str(work / "ckpt2"), str(ck / "last.ckpt"), str(work / "resumed"), *tail])
    print(f"resumed fit: {t_res:.0f} s (return code {rc_res})", flush=True)
    t_full, rc_full = _run([*common, "-", "-", str(work / "full"), *tail])
    print(f"uninterrupted fit: {t_full:.0f} s (return code {rc_full})", flush=True)
    a, b = np.load(work / "resumed.npz"), np.load(work / "full.npz")
    for k in sorted(b.files):
        print(f"  {k}: max |resumed - uninterrupted| = {np.abs(a[k] - b[k]).max():.2e} "
              f"(embedding scale {np.abs(b[k]).max():.2f})")
    ha, hb = (json.load(open(work / f"{x}.json")) for x in ("resumed", "full"))
    print(f"  loss histories equal: {[h['train_loss'] for h in ha] == [h['train_loss'] for h in hb]} "
          f"(epochs {[h['epoch'] for h in ha]})")


if __name__ == "__main__":
    main()
