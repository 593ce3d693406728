"""Does cnncam's shipped recipe learn? Shipped CPU configs vs a seed-style CNN, same data, same split.

    python benchmarks/recipe_accuracy.py --out /tmp/recipe                 # glyphs, shapes, digits
    python benchmarks/recipe_accuracy.py --out /tmp/recipe --only glyphs --set train.epochs=8
    python benchmarks/recipe_accuracy.py --out /tmp/recipe --readme benchmarks/README.md

Datasets (nothing is downloaded):

* ``glyphs``: 10 digit classes x 300 images, 32 px, rendered by ``cnncam.data.synthetic --kind
  glyphs`` (random font, size, rotation, position, stroke, polarity, texture, noise) with boxes;
  trained with ``configs/glyphs.yaml``.
* ``shapes``: what ``make demo`` trains: 4 shapes x 150 images, 64 px, ``configs/demo.yaml``.
* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 scans of handwritten digits,
  shipped inside the sklearn wheel), exported as an image folder, trained with ``configs/demo.yaml``
  and only ``data.root`` changed -- the new user's experiment of issue 8.  Skipped when
  scikit-learn is not installed (it is not a cnncam dependency).

Per dataset, cnncam trains through the real CLI (``jobs/launch.py train --executor inline``) in a
child process; then the *seed-style* CNN -- the seeds' Keras/PyTorch notebook model (3 x Conv 3x3
valid -> ReLU -> MaxPool 2, Flatten -> Dense 128 -> ReLU -> Dense K), Adam 1e-3, batch 32,
pixels / 255, a bare loop, the final epoch's weights -- trains in another child on cnncam's split
(``splits/*.csv``), for the same number of epochs.  Reported: test accuracy (cnncam: best.pt,
as the run's final test), the first epoch with validation accuracy >= 95 %, the lowest validation
accuracy after epoch 3 (vs chance 1/K), the Grad-CAM pointing game on the test split (arg-max
within 15 px at 224 px, scaled, of the object's box), wall seconds and CPU seconds (user + system
of the child and its DataLoader workers: the machine may be shared, CPU time is the fair number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnncam.cam import compute_cams, upsample  # noqa: E402
from cnncam.cam.faithfulness import pointing_game  # noqa: E402
from cnncam.config import load_config  # noqa: E402
from cnncam.data import box_to_input, load_boxes  # noqa: E402
from cnncam.runs import read_metrics  # noqa: E402

DATASETS = {
    # name: (config, generator arguments for cnncam.data.synthetic, or None for sklearn digits)
    "glyphs": ("configs/glyphs.yaml", ["--kind", "glyphs", "--per-class", "300", "--size", "32"]),
    "shapes": ("configs/demo.yaml", ["--classes", "4", "--per-class", "150", "--size", "64"]),
    "digits": ("configs/demo.yaml", None),
}


# ----------------------------------------------------------------------------------------------
# Children and their CPU time


def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` to completion; (wall s, CPU s of it and its reaped descendants)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def make_data(name: str, out: Path) -> Path:
    data = out / "data" / name
    gen = DATASETS[name][1]
    if (data / ".done").exists():
        return data
    if gen is None:
        export_sklearn_digits(data)
    else:
        run_child(
            [sys.executable, "-m", "cnncam.data.synthetic", "--out", str(data), *gen, "--seed", "0"],
            out / f"gen-{name}.log",
        )
    (data / ".done").write_text("")
    return data


def export_sklearn_digits(data: Path) -> None:
    """load_digits' 8x8 images (grey levels 0..16) as 8x8 8-bit PNGs, one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        folder = data / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")


# ----------------------------------------------------------------------------------------------
# Scoring


def curve(run: Path) -> tuple[list[float], float | None]:
    """(validation accuracy per epoch, final test accuracy) from metrics.jsonl."""
    recs = read_metrics(run / "metrics.jsonl")
    val = {int(r["epoch"]): r["accuracy"] for r in recs if r["kind"] == "epoch" and r["split"] == "val"}
    final = [r["accuracy"] for r in recs if r["kind"] == "final"]
    return [val[e] for e in sorted(val)], (final[-1] if final else None)


def summary(val: list[float], test: float | None, classes: int) -> dict[str, Any]:
    reach = next((i + 1 for i, a in enumerate(val) if a >= 0.95), None)
    return {
        "test_accuracy": test,
        "epochs_to_95": reach,
        "min_val_after_3": min(val[3:]) if len(val) > 3 else None,
        "chance": 1.0 / classes,
        "val_curve": [round(a, 4) for a in val],
    }


def pointing(model: nn.Module, loader: Any, boxes: list[Any], layer: str) -> float | None:
    """Fraction of test images whose Grad-CAM (predicted class) peaks on the object's box."""
    if not boxes or any(b is None for b in boxes):
        return None
    hits, seen = 0, 0
    model.eval()
    for images, _labels, index in loader:
        batch = compute_cams(model, images, ["gradcam"], layers=[layer], targets="pred")
        (cams,) = batch.maps.values()  # one method, one layer ("auto" resolves to a module name)
        maps = upsample(cams[:, 0], images.shape[-2:])
        box = torch.tensor([boxes[int(i)] for i in index], dtype=torch.float32)
        hits += int(pointing_game(maps, box).sum())
        seen += len(index)
    return hits / max(seen, 1)


def test_boxes(cfg: Any, root: Path, samples: list[tuple[str, int]]) -> list[Any]:
    from PIL import Image

    raw = load_boxes(root)
    if raw is None:
        return []
    out = []
    for rel, _ in samples:
        with Image.open(root / rel) as im:
            size = im.size
        out.append(box_to_input(raw[rel], size, cfg.data) if rel in raw else None)
    return out


# ----------------------------------------------------------------------------------------------
# cnncam


def train_cnncam(name: str, data: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    config = DATASETS[name][0]
    sets = [f"name={name}", f"runs_dir={out / 'runs'}", f"data.root={data}", *overrides]
    cmd = [sys.executable, "jobs/launch.py", "train", "--config", config, "--executor", "inline"]
    for s in sets:
        cmd += ["--set", s]
    run = out / "runs" / name
    timing = out / f"train-{name}.json"
    if timing.exists():  # trained by an earlier invocation: score it again
        wall, cpu = json.loads(timing.read_text())
    elif run.exists():
        raise SystemExit(f"{run} exists without {timing}: use a new --out folder")
    else:
        wall, cpu = run_child(cmd, out / f"train-{name}.log")
        timing.write_text(json.dumps([wall, cpu]))
    cfg = load_config(run / "config.yaml")
    classes = json.loads((run / "classes.json").read_text())
    val, test = curve(run)
    result = {"recipe": f"cnncam {config}", "wall_s": wall, "cpu_s": cpu, **summary(val, test, len(classes))}
    result["pointing_game"] = cnncam_pointing(cfg, run, data)
    result["cam_layer"] = cfg.cam.layers[0]
    return result


def cnncam_pointing(cfg: Any, run: Path, data: Path) -> float | None:
    from cnncam.models import create_model
    from cnncam.runs import RunPaths
    from cnncam.train.checkpoint import load_checkpoint
    from cnncam.train.distributed import DistInfo
    from cnncam.train.setup import build_data, eval_loader

    bundle = build_data(cfg, RunPaths(run), DistInfo())
    boxes = test_boxes(cfg, data, bundle.index.splits["test"])
    if not boxes:
        return None
    model = create_model(cfg.model, bundle.num_classes)
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "best.pt")["model"])
    loader = eval_loader(bundle.test, cfg, DistInfo(), torch.device("cpu"))
    return pointing(model, loader, boxes, cfg.cam.layers[0])  # the config's first CAM layer


# ----------------------------------------------------------------------------------------------
# The seed-style notebook CNN


class SeedCNN(nn.Module):
    """The seeds' model (000: Keras Sequential; 001: PyTorch) without BatchNorm: valid convs."""

    def __init__(self, classes: int, size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 3, size, size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def seed_child(run: Path, data: Path, result_file: Path) -> None:
    """Train SeedCNN on run's split (a child process, so its CPU time is measured alone)."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from cnncam.data import load_index, load_rgb
    from cnncam.runs import RunPaths

    cfg = load_config(run / "config.yaml")
    index = load_index(RunPaths(run), data)
    size = cfg.data.image_size
    tf = v2.Compose(
        [v2.ToImage(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    )

    class Plain(Dataset):
        def __init__(self, samples: list[tuple[str, int]]) -> None:
            self.samples = samples

        def __len__(self) -> int:
            return len(self.samples)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
            rel, label = self.samples[i]
            image: Image.Image = load_rgb(data / rel, 10**8)
            return tf(image), label, i

    torch.manual_seed(0)
    model = SeedCNN(len(index.classes), size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(Plain(index.splits["train"]), batch_size=32, shuffle=True, num_workers=2)
    evals = {s: DataLoader(Plain(index.splits[s]), batch_size=128, num_workers=2) for s in ("val", "test")}

    def accuracy(split: str) -> float:
        model.eval()
        right = total = 0
        with torch.no_grad():
            for x, y, _ in evals[split]:
                right += int((model(x).argmax(1) == y).sum())
                total += len(y)
        model.train()
        return right / max(total, 1)

    val = []
    for _ in range(cfg.train.epochs):
        for x, y, _ in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val.append(accuracy("val"))
    boxes = test_boxes(cfg, data, index.splits["test"])
    pg = pointing(model, evals["test"], boxes, "features.7") if boxes else None  # the last conv's ReLU
    out = {**summary(val, accuracy("test"), len(index.classes)), "pointing_game": pg}
    out["cam_layer"] = "features.7"
    result_file.write_text(json.dumps(out))


def train_seed(name: str, data: Path, out: Path) -> dict[str, Any]:
    result_file = out / f"seed-{name}.json"
    cmd = [sys.executable, __file__, "--seed-child", str(out / "runs" / name), str(data), str(result_file)]
    wall, cpu = run_child(cmd, out / f"seed-{name}.log")
    return {
        "recipe": "seed-style CNN (Flatten->Dense, bare loop)",
        "wall_s": wall,
        "cpu_s": cpu,
    } | json.loads(result_file.read_text())


# ----------------------------------------------------------------------------------------------
# Report


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    def f(v: Any, fmt: Callable[[Any], str]) -> str:
        return "–" if v is None else fmt(v)

    rows = [
        "| data | recipe | test acc | epochs to 95 % val | min val acc after epoch 3 (chance) | "
        "pointing game (layer) | wall s | CPU s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, recs in results.items():
        for r in recs:
            rows.append(
                f"| {name} | {r['recipe']} | {f(r['test_accuracy'], lambda v: f'{v:.3f}')} "
                f"| {f(r['epochs_to_95'], str)} "
                f"| {f(r['min_val_after_3'], lambda v: f'{v:.3f}')} ({r['chance']:.2f}) "
                f"| {f(r['pointing_game'], lambda v: f'{v:.3f}')} ({r['cam_layer']}) "
                f"| {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
            )
    return "\n".join(rows)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, no GPU used"
    )


def write_readme(readme: Path, text: str) -> None:
    begin, end = "<!-- recipe_accuracy:begin -->", "<!-- recipe_accuracy:end -->"
    old = readme.read_text()
    if begin in old and end in old:
        new = old[: old.index(begin)] + begin + "\n" + text + "\n" + end + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + f"\n\n{begin}\n{text}\n{end}\n"
    readme.write_text(new)


def main() -> int:
    if sys.argv[1:2] == ["--seed-child"]:
        seed_child(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (data, runs, logs, results.json)")
    ap.add_argument("--only", action="append", choices=list(DATASETS), help="datasets to run (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="extra cnncam override, e.g. train.epochs=8")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed-style CNN")
    ap.add_argument("--readme", type=Path, default=None, help="write the table between markers in this file")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(DATASETS)
    if "digits" in names:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("scikit-learn is not installed: skipping the digits dataset")
            names.remove("digits")
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        data = make_data(name, args.out)
        results[name] = [train_cnncam(name, data, args.out, args.set)]
        print(json.dumps({name: results[name][-1]}), flush=True)
        if not args.no_seed:
            results[name].append(train_seed(name, data, args.out))
            print(json.dumps({name: results[name][-1]}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = f"Machine: {machine()}.\n\n{table(results)}"
    print(text)
    if args.readme:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
