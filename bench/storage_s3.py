"""Object-storage throughput of recforge.storage against a local SeaweedFS (`weed mini` on 127.0.0.1).

What a registry publish or a checkpoint mirror costs: `put_dir` (verified single-PUT files, commit marker
written last) and `get_dir` (download, sha256 of every file, rename into place), for a bundle-shaped
directory (one large model file, a larger multipart file, a few vocabularies) and for many small files.
The server is the one the tests use (tests/_seaweed.py); it shares the machine's cores with the client,
so read the numbers as what one box does end to end, not as network throughput.

    .venv/bin/python bench/storage_s3.py [--model-mb 48] [--big-mb 80] [--small 200] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _seaweed import BUCKET, SeaweedServer  # noqa: E402

from recforge import storage  # noqa: E402


def _bundle_like(root: Path, model_mb: int, big_mb: int, rng_seed: int = 0) -> int:
    """A directory shaped like a large bundle; returns its size in bytes."""
    root.mkdir(parents=True)
    rnd = random.Random(rng_seed)
    (root / "model.pt").write_bytes(rnd.randbytes(model_mb << 20))
    (root / "item_features.npy").write_bytes(rnd.randbytes(big_mb << 20))
    (root / "vocab").mkdir()
    for i in range(6):
        (root / "vocab" / f"field{i}.json").write_bytes(rnd.randbytes(1 << 20))
    for name in ("features.json", "config.json", "metrics.json", "data.json", "env.json"):
        (root / name).write_text(json.dumps({"name": name}))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _small_files(root: Path, count: int) -> int:
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"part-{i:04d}.bin").write_bytes(os.urandom(4096))
    return count * 4096


def _time_roundtrip(src: Path, prefix: str, work: Path, repeats: int) -> tuple[list[float], list[float]]:
    ups, downs = [], []
    for r in range(repeats):
        uri = f"{prefix}/{src.name}-{r}"
        start = time.perf_counter()
        storage.put_dir(src, uri)
        ups.append(time.perf_counter() - start)
        dst = work / f"down-{src.name}-{r}"
        start = time.perf_counter()
        storage.get_dir(uri, dst)
        downs.append(time.perf_counter() - start)
        shutil.rmtree(dst)
    return ups, downs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-mb", type=int, default=48)
    parser.add_argument("--big-mb", type=int, default=80)
    parser.add_argument("--small", type=int, default=200, help="number of 4 KiB files in the small-file case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="recforge-s3-bench-") as tmp:
        work = Path(tmp)
        server = SeaweedServer(work / "server")
        server.start()
        os.environ.update(server.env)
        try:
            bundle_bytes = _bundle_like(work / "bundle", args.model_mb, args.big_mb)
            small_bytes = _small_files(work / "small", args.small)
            prefix = f"s3://{BUCKET}/bench-{os.getpid()}"
            results = {}
            for name, src, size, files in (("bundle", work / "bundle", bundle_bytes, 13),
                                           ("small_files", work / "small", small_bytes, args.small)):
                ups, downs = _time_roundtrip(src, prefix, work, args.repeats)
                up, down = statistics.median(ups), statistics.median(downs)
                results[name] = {"bytes": size, "files": files, "put_dir_s": round(up, 3),
                                 "get_dir_s": round(down, 3), "put_mib_s": round(size / up / 2**20, 1),
                                 "get_mib_s": round(size / down / 2**20, 1), "put_files_s": round(files / up, 1),
                                 "get_files_s": round(files / down, 1)}
        finally:
            server.stop()
    meta = {"repeats": args.repeats, "load_avg": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({**results, "meta": meta}))
        return
    print(f"{'case':<12} {'MiB':>8} {'files':>6} {'put_dir s':>10} {'MiB/s':>7} {'get_dir s':>10} {'MiB/s':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['bytes'] / 2**20:>8.1f} {r['files']:>6} {r['put_dir_s']:>10.3f} {r['put_mib_s']:>7.1f} "
              f"{r['get_dir_s']:>10.3f} {r['get_mib_s']:>7.1f}   "
              f"({r['put_files_s']:.0f} / {r['get_files_s']:.0f} files/s)")
    print(f"medians of {args.repeats}; load average {meta['load_avg']:.2f}, {meta['cpus']} CPUs")


if __name__ == "__main__":
    main()
