"""The cache's two index files: `plan.json` (what will be written) and `manifest.json` (what was).

`plan.json` is written first and pins everything the bytes depend on (teacher weights,
tokenizer, k, sequence length, the packed corpus, the codec). A later run on the same
directory either matches it and resumes, or is refused with the field that differs.
`manifest.json` appears only when every planned shard exists; it adds byte sizes,
checksums (a sha256 per shard file, a CRC-32 per Parquet column chunk and footer: see
integrity.py), per-domain teacher validation loss and the codec's measured fidelity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..atomic import write_json_atomic
from .integrity import ALGORITHM, file_digests
from .schema import READABLE_VERSIONS, SPLITS, shard_name
from ..teachers.support import NO_FOLDS, add_folds
from .writer import read_shard_info

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"


class CacheError(ValueError):
    """A cache problem the user can fix; the message names the file and the fix."""


@dataclass
class ShardSpec:
    file: str  # relative to the cache directory
    domain: str
    split: str
    index: int
    row_start: int
    row_end: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


@dataclass
class CachePlan:
    format_version: int
    teacher: dict  # path, weights_sha256, backend, dtype
    tokenizer: dict  # sha256, vocab_size
    k: int
    seq_len: int
    codec: dict  # TopKCodec parameters
    domains: dict  # name -> {"train_rows", "val_rows", "test_rows", "tokens_sha256"}
    shards: list[ShardSpec]
    # Masked caches (chat domains): the chat template's sha256, corpus.chat_loss and
    # corpus.chat_overlong; None for raw text.
    chat: dict | None = None

    def fingerprint(self) -> dict:
        """Everything the shard bytes depend on; two plans with equal fingerprints write equal shards."""
        d = dataclasses.asdict(self)
        d["teacher"] = {k: v for k, v in self.teacher.items() if k != "path"}
        return d

    def save(self, cache_dir: Path) -> None:
        write_json_atomic(cache_dir / PLAN_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, cache_dir: Path) -> "CachePlan":
        d = json.loads((cache_dir / PLAN_FILE).read_text())
        d["shards"] = [ShardSpec(**s) for s in d["shards"]]
        # Plans from before cache.rows_per_row_group wrote each shard as one row group.
        d["codec"].setdefault("rows_per_row_group", None)
        # Plans from before the quantizer was selectable: the fixed step (the same bytes).
        d["codec"].setdefault("logprob_quantizer", "fixed")
        d["codec"].setdefault("sqrt_prob_levels", 255)
        # Plans from before ragged supports: the full top-k.
        d["codec"].setdefault("support", "topk")
        d["codec"].setdefault("top_p", 0.0)
        d["codec"].setdefault("sample_seed", 0)
        return cls(**d)


def plan_shards(domain_rows: dict[str, dict[str, int]], rows_per_shard: int) -> list[ShardSpec]:
    shards = []
    for domain, splits in domain_rows.items():
        for split in ("val", "test", "train"):  # held-out splits first: the teacher's numbers come from them
            n = splits[split]
            for index, start in enumerate(range(0, n, rows_per_shard)):
                shards.append(ShardSpec(shard_name(domain, split, index), domain, split, index, start, min(n, start + rows_per_shard)))
    return shards


def check_compatible(existing: CachePlan, new: CachePlan, cache_dir: Path, skip: tuple[str, ...] = ()) -> None:
    """Refuse to mix two configs in one directory; name the first field that differs.
    `skip`: fields not compared (stage one checks the rest before ingesting the corpus)."""
    if existing.tokenizer["sha256"] != new.tokenizer["sha256"]:
        raise CacheError(
            f"{cache_dir}: the cache was started with another tokenizer (sha256 {existing.tokenizer['sha256'][:12]}, "
            f"this teacher's is {new.tokenizer['sha256'][:12]}); use the same teacher or write to a new cache.out_dir"
        )
    a, b = existing.fingerprint(), new.fingerprint()
    if a["codec"]["rows_per_row_group"] is None:
        # Started before row groups were configurable: the workers write with the plan on
        # disk, so a resumed cache keeps its one-row-group-per-shard layout (and its bytes),
        # and the reader reads it; refusing would only force a rebuild.
        b["codec"] = {**b["codec"], "rows_per_row_group": None}
    if "vocab_rows" not in a["teacher"] and "vocab_rows" in b["teacher"]:
        # Begun before padded ids were folded: its id space was the teacher's rows (the
        # plan on disk, which the workers capture with, keeps it so).
        rows = b["teacher"].pop("vocab_rows", None)
        b["codec"] = {k: v for k, v in b["codec"].items() if k != "fold_padded"} | {"vocab_size": rows}
        b["format_version"] = a["format_version"]
        b["tokenizer"] = {**b["tokenizer"], "vocab_size": rows}
    if a["codec"].get("support") == "sampled" and a["codec"].get("sampler") != b["codec"].get("sampler"):
        # Sampled with another draw procedure (none recorded: one multinomial per row; or
        # an earlier inverse CDF): a complete cache stays usable as it is, and resuming an
        # incomplete one is refused by the capture worker, which names the procedures.
        b["codec"] = {k: v for k, v in b["codec"].items() if k != "sampler"} | (
            {"sampler": a["codec"]["sampler"]} if "sampler" in a["codec"] else {})
    for key in a:
        if key not in skip and a[key] != b.get(key):
            detail = _first_difference(a[key], b.get(key), key)
            raise CacheError(
                f"{cache_dir}: the existing cache was made with a different config ({detail}); "
                f"re-run with the original config to resume, or set cache.out_dir to a new directory"
            )


def _first_difference(a, b, path: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
        return f"{path}: {len(a)} entries vs {len(b)}"
    sa, sb = json.dumps(a)[:60], json.dumps(b)[:60]
    return f"{path}: {sa} vs {sb}"


def shard_done(cache_dir: Path, spec: ShardSpec) -> bool:
    """A shard with its final name is complete (atomic rename); check its footer agrees."""
    path = cache_dir / spec.file
    if not path.exists():
        return False
    try:
        info = read_shard_info(path)
    except Exception as e:  # noqa: BLE001 - any unreadable footer means the same thing here
        raise CacheError(f"{path}: unreadable shard ({e}); delete the file and re-run to rewrite it") from None
    if (info["domain"], info["split"], info["row_start"], info["rows"]) != (spec.domain, spec.split, spec.row_start, spec.rows):
        raise CacheError(f"{path}: holds rows of another plan ({info}); delete the file and re-run to rewrite it")
    return True


def build_manifest(cache_dir: Path, plan: CachePlan, stats: dict | None = None) -> dict:
    """Index the finished shards: sizes, checksums, teacher validation and test loss, fidelity."""
    domains: dict[str, dict] = {
        name: {**{f"{split}_rows": d[f"{split}_rows"] for split in SPLITS}, **({"chat": d["chat"]} if "chat" in d else {}), "shards": []}
        for name, d in plan.domains.items()
    }
    max_err, clamped, total_bytes = 0.0, 0, 0
    distortion, positions = 0.0, 0  # None once a shard predates the measure (or for a sampled support)
    entries = 0  # stored support entries; None once a shard predates the count
    fold = NO_FOLDS
    # (domain, held-out split) -> [summed teacher NLL, predicted tokens]
    nll: dict[tuple[str, str], list[float]] = {(name, split): [0.0, 0] for name in plan.domains for split in ("val", "test")}
    supervised: dict[str, int] = {}  # masked caches: positions with a teacher distribution, per domain
    for spec in plan.shards:
        path = cache_dir / spec.file
        info = read_shard_info(path)
        size = path.stat().st_size
        total_bytes += size
        max_err = max(max_err, info["max_abs_logprob_error"])
        clamped += info["clamped_logprobs"]
        if distortion is not None and info.get("kl_distortion_sum") is not None:
            distortion += info["kl_distortion_sum"]
            positions += info.get("supervised_positions", info["rows"] * info["positions"])
        else:
            distortion = None
        entries = None if entries is None or "support_entries" not in info else entries + info["support_entries"]
        if info.get("vocab_fold"):
            fold = add_folds(fold, info["vocab_fold"])
        domains[spec.domain]["shards"].append({"file": spec.file, "split": spec.split, "rows": spec.rows, "bytes": size, **file_digests(path)})
        if "supervised_positions" in info:
            supervised[spec.domain] = supervised.get(spec.domain, 0) + info["supervised_positions"]
        if spec.split != "train":
            col = pq.read_table(path, columns=["target_logprob"]).column("target_logprob").combine_chunks()
            lp = col.values.to_numpy(zero_copy_only=False).astype(np.float64)
            nll[spec.domain, spec.split][0] += -lp.sum()  # masked caches store 0 where nothing is supervised
            nll[spec.domain, spec.split][1] += info.get("supervised_positions", lp.size)
    tokens = 0
    for name, d in domains.items():
        for split in ("val", "test"):
            loss = nll[name, split][0] / max(nll[name, split][1], 1)
            d[f"teacher_{split}_loss"] = loss
            d[f"teacher_{split}_ppl"] = math.exp(loss)
        d["tokens"] = sum(d[f"{split}_rows"] for split in SPLITS) * plan.seq_len
        tokens += d["tokens"]
        if name in supervised:
            d["supervised_tokens"] = supervised[name]
    manifest = {
        "format_version": plan.format_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": plan.teacher,
        "tokenizer": plan.tokenizer,
        "k": plan.k,
        "seq_len": plan.seq_len,
        "codec": plan.codec,
        # mean_kl_distortion: KL(teacher's exact top-k + tail || what is stored), nats per
        # position (pipeline/cache/fidelity.py); None for shards written before it was measured.
        "fidelity": {"max_abs_logprob_error": max_err, "clamped_logprobs": clamped,
                     "mean_kl_distortion": distortion / positions if distortion is not None and positions else None,
                     # per position holding a distribution (masked caches: the supervised ones)
                     "mean_support_size": entries / max(sum(supervised.values()) if supervised else tokens, 1) if entries is not None else None,
                     **({"unbiased": True, "note": "sampled support: the expected target is the teacher's full distribution "
                                                   "(KL distortion 0); its cost is variance, (1 - sum p^2) / k per position"}
                        if plan.codec.get("support") == "sampled" else {})},
        "integrity": f"sha256 of each shard file; {ALGORITHM} of each Parquet column chunk and of the footer",
        "bytes": total_bytes,
        "tokens": tokens,
        "bytes_per_token": total_bytes / max(tokens, 1),
        **({"supervised_tokens": sum(supervised.values()), "bytes_per_supervised_token": total_bytes / max(sum(supervised.values()), 1),
            "chat": plan.chat} if plan.chat else {}),
        "domains": domains,
    }
    rows = plan.teacher.get("vocab_rows", plan.codec["vocab_size"])
    if rows > plan.codec["vocab_size"]:
        # The teacher's padded ids (rows the tokenizer never emits), folded into the tail.
        manifest["vocab_fold"] = {"teacher_rows": rows, "id_bound": plan.codec["vocab_size"], "positions": fold["positions"],
                                  "folded_positions": fold["folded_positions"], "in_top_k": fold["in_support"],
                                  "mean_mass": fold["mass_sum"] / max(fold["positions"], 1), "max_mass": fold["mass_max"]}
    if stats:
        manifest["capture"] = stats
    write_json_atomic(cache_dir / MANIFEST_FILE, manifest)
    return manifest


def load_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.exists():
        hint = "it is incomplete: re-run `ddk teacher-cache` with its config to finish it" if (Path(cache_dir) / PLAN_FILE).exists() else "run `ddk teacher-cache` first"
        raise CacheError(f"{path} not found; {hint}")
    m = json.loads(path.read_text())
    if m.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(f"{path}: cache format version {m.get('format_version')}, this ddk reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))} (version 2 added the held-out test split, 3 ragged supports, 4 masked rows for chat); "
                         f"rebuild the cache with `ddk teacher-cache` into a new cache.out_dir")
    return m
