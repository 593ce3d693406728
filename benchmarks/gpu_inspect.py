"""Summaries printed by ``gpu_check.sh``: what a CAM file holds (not just that it was written).

python benchmarks/gpu_inspect.py part PATH.h5        # items, predictions, share of non-zero maps
python benchmarks/gpu_inspect.py run RUN_DIR          # final test accuracy, pointing game
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np


def part(path: Path) -> dict[str, object]:
    with h5py.File(path, "r") as f:
        pred = np.asarray(f["samples/pred"])
        label = np.asarray(f["samples/label"])
        out: dict[str, object] = {
            "items": int(pred.shape[0]),
            "pred_counts": np.bincount(pred.astype(np.int64).ravel()).tolist(),
            "accuracy": float((pred == label).mean()) if pred.ndim == 1 else None,
        }
        for method in f["cams"]:
            for layer in f["cams"][method]:
                maps = np.asarray(f["cams"][method][layer][:4096], dtype=np.float32)
                flat = maps.reshape(maps.shape[0], -1)
                out[f"{method}/{layer}"] = {
                    "shape": list(f["cams"][method][layer].shape),
                    "nonzero_maps_first4096": float((np.abs(flat).max(axis=1) > 0).mean()),
                }
        if "metrics" in f:  # metrics/<method>/<layer>/<name>: the mean over items that have a value
            for method in f["metrics"]:
                for layer in f["metrics"][method]:
                    for key in f["metrics"][method][layer]:
                        v = np.asarray(f["metrics"][method][layer][key], dtype=np.float64)
                        ok = v[v >= 0]
                        mean = round(float(ok.mean()), 4) if ok.size else None
                        out[f"metrics/{method}/{layer}/{key}"] = mean
    return out


def run(root: Path) -> dict[str, object]:
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line]
    final = [r for r in rows if r.get("kind") == "final"]
    epochs = [r for r in rows if r.get("kind") == "epoch" and r.get("split") == "val"]
    out: dict[str, object] = {
        "final_test_accuracy": final[-1]["accuracy"] if final else None,
        "val_accuracy_per_epoch": [round(r["accuracy"], 3) for r in epochs],
    }
    rates = [r["images_per_s"] for r in rows if r.get("kind") == "iter" and r.get("images_per_s")]
    out["train_images_per_s_median"] = float(np.median(rates)) if rates else None
    cams = root / "cams" / "cams.h5"
    if cams.is_file():
        out["cams"] = part(cams)
    return out


if __name__ == "__main__":
    kind, target = sys.argv[1], Path(sys.argv[2])
    print(json.dumps(part(target) if kind == "part" else run(target), indent=1))
