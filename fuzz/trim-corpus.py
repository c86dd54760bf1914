#!/usr/bin/env python3
"""Adds a fuzz run's finds to fuzz/corpus/TARGET within the size budget.

`cargo fuzz cmin` keeps every input that adds a libFuzzer feature (edge hit
counts included), which after a minute leaves hundreds of files for `config`
and the credential targets: too many for `tests/fuzz_corpus.rs`, which
replays them all in every `cargo test`. This keeps the hand-written seeds
(`seed-*`, `known-bug-*`) and adds, greedily, the finds that cover the most
edges the corpus does not cover yet, until 50 files or 190 KiB.

    cd fuzz && cargo +nightly fuzz build
    cargo +nightly fuzz run TARGET /tmp/work/TARGET -- -max_total_time=60 -fork=1 -ignore_crashes=1
    ./trim-corpus.py TARGET /tmp/work/TARGET
"""

import os
import shutil
import subprocess
import sys
import tempfile

MAX_FILES = 50
MAX_BYTES = 190 * 1024


def main(target, found):
    here = os.path.dirname(os.path.abspath(__file__))
    corpus = os.path.join(here, "corpus", target)
    binary = os.path.join(here, "target", "x86_64-unknown-linux-gnu", "release", target)
    with tempfile.TemporaryDirectory() as tmp:
        control, merged = os.path.join(tmp, "control"), os.path.join(tmp, "merged")
        shutil.copytree(corpus, merged)
        # The merge only records coverage here (the control file); crashes of
        # known-bug inputs are survived by libFuzzer's restarts.
        subprocess.run([binary, "-merge=1", "-use_counters=0", "-max_len=8192", "-timeout=10",
                        f"-merge_control_file={control}", f"-artifact_prefix={tmp}/", merged, found],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        lines = open(control).read().split("\n")
        count, initial = int(lines[0]), int(lines[1])
        files = lines[2:2 + count]
        cov = {}
        for line in lines[2 + count:]:
            parts = line.split()
            if parts and parts[0] == "COV":
                cov[int(parts[1])] = set(parts[2:])
        covered = set().union(*(cov.get(i, set()) for i in range(initial)))
        names = os.listdir(corpus)
        size = sum(os.path.getsize(os.path.join(corpus, n)) for n in names)
        candidates = {i: cov.get(i, set()) for i in range(initial, count) if os.path.exists(files[i])}
        added = 0
        while len(names) + added < MAX_FILES and candidates:
            best = max(candidates, key=lambda i: (len(candidates[i] - covered), -os.path.getsize(files[i])))
            if not candidates[best] - covered:
                break
            edges = candidates.pop(best)
            if size + os.path.getsize(files[best]) > MAX_BYTES:
                continue
            shutil.copy(files[best], os.path.join(corpus, os.path.basename(files[best])))
            covered |= edges
            size += os.path.getsize(files[best])
            added += 1
        print(f"{target}: {added} finds added; {len(names) + added} files, {size} bytes, {len(covered)} edges")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
