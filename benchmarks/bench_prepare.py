"""Tokenizing a corpus into shards: `python -m flax_gpt.prepare` against build-nanogpt's fineweb.py approach.

    python benchmarks/bench_prepare.py --gb 1 --repeats 3 --growth-gb 2 --json prepare.json
    python benchmarks/bench_prepare.py --gb 0.05 --repeats 1 --shard-tokens 5000000      # a quick look

Generates a corpus of --gb GB from the default Shakespeare texts (documents of web-page length, a lognormal
around 2.5 KB), written twice: one big .txt (documents separated by two blank lines) and many JSON Lines
files. Then, --repeats times, in alternating order, it runs on each:

    prepare    python -m flax_gpt.prepare SOURCE --out DIR (defaults: 100M-token shards, a process per core)
    fineweb    fineweb.py's way: a multiprocessing Pool, imap(tokenize, documents, chunksize=16), each document
               [<|endoftext|>] + encode_ordinary(text) -> np.array -> uint16, copied into a 100M-token shard
               buffer saved with np.save (--shard-tokens for both); the parent reads the documents (json.loads per line for JSON Lines,
               split at the blank lines of the .txt) as a datasets iterator would hand them out

each in its own process tree, with the same number of tokenizer processes (--procs, default: one per core;
fineweb.py itself uses half the cores). Reported per run: input MB/s, tokens/s, and the peak RSS (VmHWM) of the
parent and of the largest tokenizer process. The JSON Lines runs of both must give the same tokens (checked).
--growth-gb runs prepare once more on a single .txt of that size, for the RSS growth with corpus size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC_SEP = "\n\n\n"  # between documents of the .txt corpus; never inside one
JSONL_FILE_MB = 32  # size of each JSON Lines file

BASELINE = r'''
import json, multiprocessing as mp, os, sys
import numpy as np
from flax_gpt.tokenizer import get_encoding  # tiktoken's gpt2 encoding, built offline

enc = get_encoding()
eot = enc._special_tokens["<|endoftext|>"]
shard_size = int(sys.argv[4])


def tokenize(doc):  # fineweb.py's
    tokens = [eot]
    tokens.extend(enc.encode_ordinary(doc))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def documents(path):
    if path.endswith(".txt"):
        rest = ""
        with open(path, encoding="utf-8") as f:
            while block := f.read(1 << 20):
                *docs, rest = (rest + block).split("\n\n\n")
                yield from docs
        if rest:
            yield rest
    else:
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]


if __name__ == "__main__":
    source, out, nprocs = sys.argv[1], sys.argv[2], int(sys.argv[3])  # argv[4]: shard_size
    os.makedirs(out, exist_ok=True)
    with mp.Pool(nprocs) as pool:  # fineweb.py's loop, as written there
        shard_index = 0
        all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
        token_count = 0
        for tokens in pool.imap(tokenize, documents(source), chunksize=16):
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count+len(tokens)] = tokens
                token_count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                filename = os.path.join(out, f"edufineweb_{split}_{shard_index:06d}")
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count+remainder] = tokens[:remainder]
                np.save(filename, all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens)-remainder] = tokens[remainder:]
                token_count = len(tokens)-remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            filename = os.path.join(out, f"edufineweb_{split}_{shard_index:06d}")
            np.save(filename, all_tokens_np[:token_count])
'''


# ----------------------------------------------------------------------------- the corpus


def make_documents(text: str, total_bytes: int, seed: int):
    """Documents cut from text at line starts, lognormal lengths around 2.5 KB, until total_bytes of UTF-8."""
    lines = text.replace("\r\n", "\n").split("\n")
    starts = np.cumsum([0] + [len(line) + 1 for line in lines])  # (n_lines + 1,) char offset of each line
    rng, made = np.random.default_rng(seed), 0
    while made < total_bytes:
        first = int(rng.integers(0, len(lines) - 1))
        want = int(np.clip(rng.lognormal(np.log(2500), 0.8), 200, 100_000))
        last = min(len(lines), int(np.searchsorted(starts, starts[first] + want)))
        doc = "\n".join(lines[first : max(last, first + 1)]).strip()
        while "\n\n\n" in doc:
            doc = doc.replace("\n\n\n", "\n\n")
        if doc:
            made += len(doc.encode()) + len(DOC_SEP)
            yield doc


def write_corpus(work: Path, gb: float, seed: int = 0) -> dict:
    """work/txt/corpus.txt and work/jsonl/part_NNNN.jsonl of the same documents; returns their sizes."""
    from flax_gpt.data import default_corpus

    txt_dir, jsonl_dir = work / "txt", work / "jsonl"
    shutil.rmtree(work, ignore_errors=True)
    for d in (txt_dir, jsonl_dir):
        d.mkdir(parents=True)
    text = default_corpus().read_text(encoding="utf-8")
    n_docs, part, part_bytes, jf = 0, 0, 0, None
    with open(txt_dir / "corpus.txt", "w", encoding="utf-8") as tf:
        for doc in make_documents(text, int(gb * 1e9), seed):
            tf.write((DOC_SEP if n_docs else "") + doc)
            if jf is None or part_bytes >= JSONL_FILE_MB << 20:
                if jf:
                    jf.close()
                jf, part_bytes, part = open(jsonl_dir / f"part_{part:04d}.jsonl", "w", encoding="utf-8"), 0, part + 1
            line = json.dumps({"text": doc, "id": n_docs}) + "\n"
            jf.write(line)
            part_bytes += len(line)
            n_docs += 1
    jf.close()
    return {"documents": n_docs, "txt_bytes": (txt_dir / "corpus.txt").stat().st_size,
            "jsonl_bytes": sum(p.stat().st_size for p in jsonl_dir.iterdir()), "jsonl_files": part}


# ----------------------------------------------------------------------------- running and watching


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def run_watched(cmd: list[str], env: dict) -> dict:
    """Run cmd; wall and CPU seconds, and the peak RSS of the parent and of each other process of its tree."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    try:
        while proc.poll() is None:
            for pid in process_tree(proc.pid):
                mb = peak_rss_mb(pid)
                if mb is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), mb)
            time.sleep(0.1)
    except BaseException:  # interrupted: take the run's processes down with us
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        raise
    seconds = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run and every process it waited for
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    workers = [mb for pid, mb in peaks.items() if pid != proc.pid]
    return {"seconds": seconds, "cpu_seconds": cpu, "parent_rss_mb": peaks.get(proc.pid, 0.0), "worker_rss_mb": max(workers, default=0.0),
            "processes": len(peaks)}


def shard_tokens(out: Path) -> tuple[int, str]:
    """Token count and sha256 of the val shards then the train shards of out, in name order."""
    files = sorted(out.glob("*_val_*.npy")) + sorted(out.glob("*_train_*.npy"))
    digest, n = hashlib.sha256(), 0
    for f in files:
        tokens = np.load(f, mmap_mode="r")
        for i in range(0, len(tokens), 1 << 24):
            digest.update(np.ascontiguousarray(tokens[i : i + (1 << 24)]).data)
        n += len(tokens)
    return n, digest.hexdigest()


def run_one(who: str, source: Path, out: Path, procs: int, shard: int, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if who == "prepare":
        cmd = [sys.executable, "-m", "flax_gpt.prepare", str(source), "--out", str(out), "--workers", str(procs),
               "--shard-tokens", str(shard), "--no-progress"]
    else:
        cmd = [sys.executable, "-c", BASELINE, str(source), str(out), str(procs), str(shard)]
    result = run_watched(cmd, env)
    result["tokens"], result["sha256"] = shard_tokens(out)
    shutil.rmtree(out)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="corpus size (each of the .txt and the JSON Lines copy)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer processes, both")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="both; the first shard is the val split")
    ap.add_argument("--growth-gb", type=float, default=0.0, help="also run prepare on one .txt of this many GB")
    ap.add_argument("--work", default="/tmp/bench_prepare", help="where corpora and shards go (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` cleans up like Ctrl-C

    work = Path(args.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    corpus = write_corpus(work / "corpus", args.gb)
    print(f"corpus: {corpus['documents']:,} documents; {corpus['txt_bytes'] / 1e9:.2f} GB .txt, "
          f"{corpus['jsonl_bytes'] / 1e9:.2f} GB in {corpus['jsonl_files']} .jsonl files "
          f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
    sources = {"txt": (work / "corpus" / "txt" / "corpus.txt", corpus["txt_bytes"]),
               "jsonl": (work / "corpus" / "jsonl", corpus["jsonl_bytes"])}
    runs = []
    try:
        for rep in range(args.repeats):
            order = ("prepare", "fineweb") if rep % 2 == 0 else ("fineweb", "prepare")
            for variant, (source, size) in sources.items():
                for who in order:
                    r = run_one(who, source, work / "out", args.procs, args.shard_tokens, env)
                    r.update(rep=rep, variant=variant, who=who, mb_per_s=size / 1e6 / r["seconds"],
                             tokens_per_s=r["tokens"] / r["seconds"], mb_per_cpu_s=size / 1e6 / r["cpu_seconds"])
                    runs.append(r)
                    print(f"rep {rep} {variant:5s} {who:8s} {r['seconds']:6.1f} s {r['mb_per_s']:6.2f} MB/s "
                          f"(CPU {r['cpu_seconds']:5.0f} s, {r['mb_per_cpu_s']:5.2f} MB per CPU s) "
                          f"{r['tokens_per_s']:10,.0f} tok/s  peak RSS parent {r['parent_rss_mb']:6.0f} MB, "
                          f"largest worker {r['worker_rss_mb']:6.0f} MB ({r['processes']} processes)", flush=True)
        growth = None
        if args.growth_gb:
            big = write_corpus(work / "big", args.growth_gb, seed=1)
            shutil.rmtree(work / "big" / "jsonl")
            r = run_one("prepare", work / "big" / "txt" / "corpus.txt", work / "out", args.procs, args.shard_tokens, env)
            growth = {**r, "gb": big["txt_bytes"] / 1e9, "mb_per_s": big["txt_bytes"] / 1e6 / r["seconds"]}
            print(f"growth: prepare on {growth['gb']:.2f} GB .txt: {r['seconds']:.1f} s, peak RSS parent "
                  f"{r['parent_rss_mb']:.0f} MB, largest worker {r['worker_rss_mb']:.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "procs": args.procs, "corpus": corpus, "runs": runs, "growth": growth, "ratios": {}}
    print("\n| variant | prepare MB/s | fineweb MB/s | prepare / fineweb (min-max over repeats) | "
          "CPU time fineweb / prepare (min-max) | peak RSS prepare parent / worker MB | fineweb parent / worker MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant in sources:
        ours = [r for r in runs if r["variant"] == variant and r["who"] == "prepare"]
        theirs = [r for r in runs if r["variant"] == variant and r["who"] == "fineweb"]
        ratios = [a["mb_per_s"] / b["mb_per_s"] for a, b in zip(ours, theirs)]
        cpu = [b["cpu_seconds"] / a["cpu_seconds"] for a, b in zip(ours, theirs)]
        summary["ratios"][variant] = {"throughput": ratios, "cpu": cpu}
        med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
        print(f"| {variant} | {med(ours, 'mb_per_s'):.2f} | {med(theirs, 'mb_per_s'):.2f} | "
              f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{np.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) | "
              f"{max(r['parent_rss_mb'] for r in ours):.0f} / {max(r['worker_rss_mb'] for r in ours):.0f} | "
              f"{max(r['parent_rss_mb'] for r in theirs):.0f} / {max(r['worker_rss_mb'] for r in theirs):.0f} |")
    same = {r["sha256"] for r in runs if r["variant"] == "jsonl"}
    summary["jsonl_tokens_identical"] = len(same) == 1
    print(f"\nJSON Lines: prepare and fineweb wrote {'the same' if len(same) == 1 else 'DIFFERENT'} tokens "
          f"({next(r['tokens'] for r in runs if r['variant'] == 'jsonl'):,})")
    if growth:
        ours_1 = [r for r in runs if r["variant"] == "txt" and r["who"] == "prepare"]
        for key in ("parent_rss_mb", "worker_rss_mb"):
            base = max(r[key] for r in ours_1)
            summary[f"growth_{key}"] = growth[key] / base - 1
            print(f"RSS growth {args.gb:g} GB -> {growth['gb']:.2f} GB .txt, {key}: {base:.0f} -> {growth[key]:.0f} MB "
                  f"({growth[key] / base - 1:+.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
