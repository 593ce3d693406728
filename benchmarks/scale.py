"""Scale benchmark: export, merge, open, read and report at 10^3-10^5 images and 1-1000 shards.

Run by hand (not a test), preferably niced on a shared machine::

    nice python benchmarks/scale.py --work /tmp/cnncam-scale                  # everything (hours on 2 cores)
    nice python benchmarks/scale.py --work /tmp/cnncam-scale --sizes 10000 --shards 1 100
    python benchmarks/scale.py --work /tmp/s --sizes 100000 --shards 1 --export-only --set cam.num_workers=8
    python benchmarks/scale.py --work /tmp/cnncam-scale --table               # print the results table

Synthetic 32 px shapes (4 classes) and a tiny ``simple_cnn`` (channels 8, 16; 1 epoch on 200
images), so the model costs little and the storage path shows.  The data is drawn once (10^4
distinct test images; every size copies them under as many distinct file names as it needs: not hard
links, which data discovery lists once per real file)
and every step is cached in ``--work/results.json``: a rerun skips what is done (``--redo``
forgets it).

Every measured step runs in a child process, timed by the parent (wall time) and by
``wait4`` (CPU time and peak RSS of that child):

- export: ``export_shard`` for shard 0..S-1 one after another in one process (what
  ``cam --executor inline --shards S`` does), timed from the first shard (imports excluded);
- merge: the ``merge`` command (``jobs/launch.py merge --executor inline``), imports included,
  once building virtual datasets and once consolidating; plus ``merge_parts`` alone;
- open: ``open_cams`` of the merged file; read: every per-item dataset, in windows of 4096 rows,
  through cnncam's reader and through plain h5py, from the virtual and the consolidated file;
- report: the ``report`` command (imports included), wall, CPU and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "triangle", "cross")
TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 50, 10, 32
UNIQUE = 2500  # distinct test images per class; larger sizes repeat them under other names
SIZES = (1000, 10_000, 100_000)
SHARDS = (1, 10, 100, 1000)
CAM = ["cam.methods=[gradcam]", "cam.metrics=false", "cam.activations=[]", "cam.upsampled=false"]


# ----------------------------------------------------------------------------------------------
# Children: one measured step each, JSON on stdout


def child_data(work: Path) -> dict[str, Any]:
    """Data roots ``data-<N>``: :data:`UNIQUE` test images per class drawn once (and the train and
    val images), copied under N distinct test file names (each decoded like any file; hard links
    would be one real file to data discovery, which lists each real file once)."""
    from cnncam.data.synthetic import image_rng, render_sample

    t0 = time.perf_counter()
    unique = work / "data-unique"
    plan = [("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS), ("test", UNIQUE)]
    offset = 0
    for split, per_class in plan:
        for shape in CLASSES:
            folder = unique / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"{shape}_{i:06d}.png"
                if not path.exists():
                    render_sample(shape, SIZE, image_rng(7, shape, offset + i)).image.save(path)
        offset += per_class
    drawn = time.perf_counter() - t0
    for n in SIZES:
        root = work / f"data-{n}"
        if root.exists():
            continue
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for split, per_class in plan:
            keep = per_class if split != "test" else n // len(CLASSES)
            for shape in CLASSES:
                (tmp / split / shape).mkdir(parents=True)
                for i in range(keep):
                    src = unique / split / shape / f"{shape}_{i % per_class:06d}.png"
                    shutil.copyfile(src, tmp / split / shape / f"{shape}_{i:06d}.png")
        tmp.rename(root)
    return {"seconds": time.perf_counter() - t0, "draw_s": drawn}


def _cfg(work: Path, n: int, *extra: str) -> Any:
    from cnncam.config import load_config

    overrides = [
        f"name=scale{n}",
        f"runs_dir={work / 'runs'}",
        f"data.root={work / f'data-{n}'}",
        "data.layout=presplit",
        f"data.image_size={SIZE}",
        f"data.resize={SIZE}",
        "data.num_workers=0",
        "model.channels=[8,16]",
        "train.epochs=1",
        *CAM,
        # --set of the parent (e.g. cam.num_workers=8 on a GPU node, where decoding feeds the device)
        *json.loads(os.environ.get("CNNCAM_SCALE_SET", "[]")),
        *extra,
    ]
    return load_config(None, overrides)


def child_train(work: Path, n: int) -> dict[str, Any]:
    from cnncam.train import run_training

    run_training(_cfg(work, n))
    return {}


def child_export(work: Path, n: int, shards: int) -> dict[str, Any]:
    from cnncam.cam.export import export_shard

    cfg = _cfg(work, n, f"cam.out={cams_dir(work, n, shards)}")
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for s in range(shards):
        export_shard(cfg, s, shards)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu(r1) - _cpu(r0)}


def child_merge_parts(folder: Path, shards: int, consolidate: bool) -> dict[str, Any]:
    from cnncam.storage import merge_parts, part_filename

    t0, c0 = time.perf_counter(), time.process_time()
    parts = [folder / part_filename(i, shards) for i in range(shards)]
    out = folder / ("consolidated.h5" if consolidate else "virtual.h5")
    merge_parts(parts, out, consolidate=consolidate)
    cpu = time.process_time() - c0
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu, "bytes": out.stat().st_size}


def child_read(path: Path) -> dict[str, Any]:
    """Open time, then every per-item dataset read through cnncam's reader and through plain h5py."""
    import h5py
    import numpy as np

    from cnncam.storage import open_cams

    t0, c0 = time.perf_counter(), time.process_time()
    cams = open_cams(path)
    opened, opened_cpu = time.perf_counter() - t0, time.process_time() - c0
    names = cams.datasets()
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = sum(v.nbytes for chunk in cams.iter_rows(names, chunk=4096) for v in chunk.values())
    cnncam_s, cnncam_cpu = time.perf_counter() - t0, time.process_time() - c0
    cams.close()
    t0, c0 = time.perf_counter(), time.process_time()
    with h5py.File(path, "r", locking=False) as f:
        first = time.perf_counter() - t0
        fills = 0
        for name in names:
            d = f[name]
            for a in range(0, d.shape[0], 4096):
                block = d[a : a + 4096]
                if name == "samples/index":
                    fills += int((block == -1).sum())
        h5py_s, h5py_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = int(np.int64(cams.n_items))
    return {
        "open_s": opened,
        "open_cpu_s": opened_cpu,
        "h5py_open_s": first,
        "rows": rows,
        "bytes": nbytes,
        "cnncam_read_s": cnncam_s,
        "cnncam_read_cpu_s": cnncam_cpu,
        "h5py_read_s": h5py_s,
        "h5py_read_cpu_s": h5py_cpu,
        "h5py_fill_rows": fills,
    }


# ----------------------------------------------------------------------------------------------
# Parent: run the children, time them, keep the results


def cams_dir(work: Path, n: int, shards: int) -> Path:
    return work / "cams" / f"n{n}-s{shards}"


def _cpu(r: resource.struct_rusage) -> float:
    return r.ru_utime + r.ru_stime


def run_child(argv: list[str], log: Path) -> dict[str, Any]:
    """Run ``argv`` (stdout: one JSON line or nothing); add its wall, CPU and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    with open(log, "a") as err, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env) as p:
        t0 = time.perf_counter()
        out = p.stdout.read() if p.stdout else b""
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {p.returncode}); see {log}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    return {**result, "wall_s": wall, "child_cpu_s": _cpu(usage), "peak_rss_mb": usage.ru_maxrss / 1024}


def _me(*args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_child", *map(str, args)]


def _launch(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "launch.py"), *args]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--shards", type=int, nargs="+", default=list(SHARDS))
    p.add_argument("--redo", nargs="*", default=[], help="forget cached results whose key starts with these")
    p.add_argument("--table", action="store_true", help="only print the results table")
    p.add_argument("--set", nargs="*", default=[], help="config overrides of the train and export steps")
    p.add_argument("--export-only", action="store_true", help="measure the export; skip merge, read, report")
    args = p.parse_args()
    os.environ["CNNCAM_SCALE_SET"] = json.dumps(args.set)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    res: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    res = {k: v for k, v in res.items() if not any(k.startswith(r) for r in args.redo)}
    if args.table:
        print(table(res))
        return 0
    log = work / "children.log"

    def step(key: str, argv: list[str]) -> dict[str, Any]:
        if key not in res:
            print(f"[scale] {key} ...", flush=True)
            res[key] = run_child(argv, log)
            res["machine"] = machine()
            store.write_text(json.dumps(res, indent=1, sort_keys=True))
            print(f"[scale] {key}: {json.dumps(res[key])}", flush=True)
        return dict(res[key])

    step("data", _me("data", work))
    for n in args.sizes:
        step(f"train/{n}", _me("train", work, n))
        run = work / "runs" / f"scale{n}"
        for s in args.shards:
            folder = cams_dir(work, n, s)
            if f"export/{n}/{s}" not in res:  # parts left on disk would make the export a no-op
                shutil.rmtree(folder, ignore_errors=True)
            step(f"export/{n}/{s}", _me("export", work, n, s))
            size = sum(f.stat().st_size for f in folder.glob("part-*.h5"))
            res[f"export/{n}/{s}"]["part_bytes"] = size
            if args.export_only:
                continue
            common = ["--run", str(run), "--shards", str(s), "--executor", "inline"]
            common += ["--set", f"cam.out={folder}"]
            step(f"merge/{n}/{s}/virtual", _launch("merge", *common, "--set", "cam.consolidate=never"))
            step(f"read/{n}/{s}/virtual", _me("read", folder / "cams.h5"))
            report = ["report", "--run", str(run), "--executor", "inline", "--cams", str(folder / "cams.h5")]
            step(f"report/{n}/{s}/virtual", _launch(*report, "--out", str(work / "reports" / f"{n}-{s}-v")))
            step(f"merge_parts/{n}/{s}/virtual", _me("merge_parts", folder, s, 0))
            step(f"merge_parts/{n}/{s}/consolidated", _me("merge_parts", folder, s, 1))
            step(f"merge/{n}/{s}/consolidated", _launch("merge", *common, "--consolidate"))
            step(f"read/{n}/{s}/consolidated", _me("read", folder / "cams.h5"))
            out = str(work / "reports" / f"{n}-{s}-c")
            step(f"report/{n}/{s}/consolidated", _launch(*report, "--out", out))
            shutil.rmtree(work / "reports", ignore_errors=True)
    print(table(res))
    return 0


def machine() -> dict[str, Any]:
    """The machine and versions (read without importing torch or h5py: this parent process must stay
    small, since a child's peak RSS as reported by ``wait4`` includes its parent's before ``exec``)."""
    from importlib.metadata import version

    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch": version("torch"),
        "h5py": version("h5py"),
        "python": platform.python_version(),
    }


def table(res: dict[str, Any]) -> str:
    """Markdown tables of the cached results; "w / c" = wall / CPU seconds, "–" = not measured."""

    def wc(key: str, wall: str, cpu: str) -> str:
        d = res.get(key)
        if not d or wall not in d:
            return "–"
        return f"{d[wall]:.2f} / {d[cpu]:.2f}" if cpu in d else f"{d[wall]:.2f}"

    def rate(key: str, cpu: str) -> str:  # rows per CPU second (wall is distorted by the load)
        d = res.get(key, {})
        return f"{d['rows'] / d[cpu]:,.0f}" if d.get(cpu) else "–"

    cases = sorted((int(k.split("/")[1]), int(k.split("/")[2])) for k in res if k.startswith("export/"))
    export, merge, read, report = [], [], [], []
    for n, s in cases:
        e, at = res[f"export/{n}/{s}"], f"{n}/{s}"
        v, c = f"read/{at}/virtual", f"read/{at}/consolidated"
        export.append(
            f"| {n:,} | {s:,} | {e['seconds']:.1f} / {e['cpu_s']:.1f} | {n / e['cpu_s']:,.0f} "
            f"| {1e3 * e['cpu_s'] / n:.2f} | {e.get('part_bytes', 0) / n:,.0f} |"
        )
        merge.append(
            f"| {n:,} | {s:,} | {wc(f'merge/{at}/virtual', 'wall_s', 'child_cpu_s')} "
            f"| {wc(f'merge_parts/{at}/virtual', 'seconds', 'cpu_s')} "
            f"| {wc(f'merge/{at}/consolidated', 'wall_s', 'child_cpu_s')} "
            f"| {wc(f'merge_parts/{at}/consolidated', 'seconds', 'cpu_s')} "
            f"| {res.get(f'merge_parts/{at}/consolidated', {}).get('bytes', 0) / n:,.0f} |"
        )
        read.append(
            f"| {n:,} | {s:,} | {wc(v, 'open_s', 'open_cpu_s')} | {wc(c, 'open_s', 'open_cpu_s')} "
            f"| {rate(v, 'cnncam_read_cpu_s')} | {rate(v, 'h5py_read_cpu_s')} "
            f"| {rate(c, 'cnncam_read_cpu_s')} | {rate(c, 'h5py_read_cpu_s')} |"
        )
        rv, rc = res.get(f"report/{at}/virtual", {}), res.get(f"report/{at}/consolidated", {})
        report.append(
            f"| {n:,} | {s:,} | {wc(f'report/{at}/virtual', 'wall_s', 'child_cpu_s')} "
            f"| {rv.get('peak_rss_mb', 0):.0f} | {wc(f'report/{at}/consolidated', 'wall_s', 'child_cpu_s')} "
            f"| {rc.get('peak_rss_mb', 0):.0f} |"
        )
    heads = [
        "| images | shards | export s (wall / CPU) | images per CPU s | CPU ms/image | part bytes/image |\n"
        "|---:|---:|---:|---:|---:|---:|",
        "| images | parts | merge command, virtual | merge_parts, virtual | merge command, consolidated "
        "| merge_parts, consolidated | consolidated bytes/image |\n|---:|---:|---:|---:|---:|---:|---:|",
        "| images | parts | open_cams, virtual | open_cams, consolidated | rows/CPU s cnncam, virtual "
        "| rows/CPU s h5py, virtual | rows/CPU s cnncam, consolidated | rows/CPU s h5py, consolidated |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| images | parts | report, virtual (s) | peak RSS MB | report, consolidated (s) | peak RSS MB |\n"
        "|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n\n".join(h + "\n" + "\n".join(rows) for h, rows in zip(heads, (export, merge, read, report)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        op, rest = sys.argv[2], sys.argv[3:]
        work_or_path = Path(rest[0])
        if op == "data":
            out = child_data(work_or_path)
        elif op == "train":
            out = child_train(work_or_path, int(rest[1]))
        elif op == "export":
            out = child_export(work_or_path, int(rest[1]), int(rest[2]))
        elif op == "merge_parts":
            out = child_merge_parts(work_or_path, int(rest[1]), rest[2] == "1")
        else:
            out = child_read(work_or_path)
        print(json.dumps(out), flush=True)
        raise SystemExit(0)
    raise SystemExit(main())
