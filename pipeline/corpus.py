"""Corpus -> domains: documents per domain, from user files or the built-in corpus.

The built-in corpus is made from what every CPython installation has on disk, so the
default run needs no network and ships no data files:

  code        standard-library Python sources, docstrings blanked out (one file = one document)
  reference   the Python language reference as prose (`pydoc_data.topics`, one topic = one document)
  docstrings  API documentation: signatures + docstrings of standard-library functions/classes
  unicode     structured records: the Unicode character database as JSON lines (`unicodedata`)

Four registers with very different statistics: a student that saw mostly two of them
lags its teacher most on the other two, which is what DDK is meant to find.
"""

from __future__ import annotations

import ast
import glob
import json
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, CorpusConfig, DomainSource


@dataclass
class Document:
    doc_id: str  # stable identity (file path + index): drives the train/val split
    text: str


@dataclass
class Domain:
    name: str
    documents: list[Document]

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def load_domains(cfg: CorpusConfig, base_dir: str | Path = ".") -> list[Domain]:
    if cfg.source == "builtin":
        return builtin_domains(cfg.builtin_chars_per_domain)
    return [load_domain(src, Path(base_dir)) for src in cfg.domains]


# ---------------------------------------------------------------- user files


def load_domain(src: DomainSource, base_dir: Path) -> Domain:
    where = f"corpus.domains '{src.name}'"
    if not src.paths:
        raise ConfigError(f"{where}: no paths listed; add paths = [\"data/{src.name}/*.jsonl\"]")
    files: list[Path] = []
    for pattern in src.paths:
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        matched = sorted(glob.glob(full, recursive=True))
        if not matched:
            raise ConfigError(f"{where}: path '{pattern}' matches no file (looked for {full}); fix the path or the glob")
        files.extend(Path(m) for m in matched if Path(m).is_file())
    docs: list[Document] = []
    for f in files:
        docs.extend(_read_file(f, src.text_field))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ConfigError(f"{where}: the files {[str(f) for f in files]} contain no non-empty text; add data or drop the domain")
    return Domain(src.name, docs)


def _read_file(path: Path, text_field: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ConfigError(
                        f"{path}:{i}: no field '{text_field}' (found {keys}); set text_field in the domain's config"
                    )
                docs.append(Document(f"{path}:{i}", str(obj[text_field])))
        return docs
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise ConfigError(f"{path}: no column '{text_field}' (columns: {schema.names}); set text_field in the domain's config")
        col = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
        return [Document(f"{path}:{i}", str(t)) for i, t in enumerate(col) if t is not None]
    if suffix in (".txt", ".md", ".text"):
        return [Document(str(path), path.read_text(encoding="utf-8", errors="replace"))]
    raise ConfigError(f"{path}: unsupported file type '{suffix}'; use .jsonl (with a text field), .parquet or .txt")


# ---------------------------------------------------------------- built-in corpus


def builtin_domains(chars_per_domain: int) -> list[Domain]:
    return [
        Domain("code", _take(_stdlib_code(), chars_per_domain)),
        Domain("reference", _take(_language_reference(), chars_per_domain)),
        Domain("docstrings", _take(_stdlib_docstrings(), chars_per_domain)),
        Domain("unicode", _take(_unicode_records(), chars_per_domain)),
    ]


def _take(docs, budget: int) -> list[Document]:
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d.text)
    return out


def _stdlib_modules():
    """(path relative to the stdlib, source, AST) of every parseable standard-library module."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    files = [p for p in lib.rglob("*.py") if not (skip & set(p.relative_to(lib).parts))]
    # Interleave packages by sorting on name, so a character cap still spans many modules.
    for path in sorted(files, key=lambda p: (p.name, str(p))):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield path.relative_to(lib), src, tree


def _docstring_nodes(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    yield node, body[0]


def _stdlib_code():
    for rel, src, tree in _stdlib_modules():
        lines = src.splitlines()
        # Docstrings belong to the `docstrings` domain; blank them here (keep line count)
        # so the two domains do not overlap.
        for _, expr in _docstring_nodes(tree):
            indent = lines[expr.lineno - 1][: expr.col_offset]
            lines[expr.lineno - 1] = indent + "pass"
            for i in range(expr.lineno, expr.end_lineno):
                lines[i] = ""
        text = "\n".join(line for line in lines if line.strip() or line == "")
        yield Document(f"stdlib:{rel}", text)


def _language_reference():
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield Document(f"pydoc_data.topics:{name}", topics.topics[name])


def _stdlib_docstrings():
    for rel, _, tree in _stdlib_modules():
        module = ".".join(rel.with_suffix("").parts)
        parts = []
        for node, expr in _docstring_nodes(tree):
            doc = expr.value.value.strip()
            if len(doc) < 40:
                continue
            if isinstance(node, ast.Module):
                head = f"Module {module}"
            elif isinstance(node, ast.ClassDef):
                head = f"class {module}.{node.name}"
            else:
                head = f"{module}.{node.name}({ast.unparse(node.args)})"
            parts.append(f"{head}\n\n{doc}\n")
        if parts:
            yield Document(f"docstrings:{module}", "\n".join(parts))


def _unicode_records(per_doc: int = 48):
    records = []
    for cp in range(0x20, 0x30000):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if not name:
            continue
        rec = {"cp": f"U+{cp:04X}", "name": name, "cat": unicodedata.category(ch), "bidi": unicodedata.bidirectional(ch)}
        if unicodedata.decomposition(ch):
            rec["decomp"] = unicodedata.decomposition(ch)
        if unicodedata.numeric(ch, None) is not None:
            rec["num"] = str(unicodedata.numeric(ch))
        if ch.lower() != ch:
            rec["lower"] = f"U+{ord(ch.lower()[0]):04X}"
        records.append(json.dumps(rec, ensure_ascii=True))
    # Blocks of consecutive code points: neighbouring records share names and fields.
    for i in range(0, len(records), per_doc):
        yield Document(f"unicodedata:{i // per_doc}", "\n".join(records[i : i + per_doc]) + "\n")
