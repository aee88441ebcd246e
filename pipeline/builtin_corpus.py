"""The built-in corpus: four domains made from what every CPython installation has on
disk, so the default run needs no network and ships no data files:

  code        standard-library Python sources, docstrings blanked out (one file = one document)
  reference   the Python language reference as prose (`pydoc_data.topics`, one topic = one document)
  docstrings  API documentation: signatures + docstrings of standard-library functions/classes
  unicode     structured records: the Unicode character database as JSON lines (`unicodedata`)

Four registers with very different statistics: a student that saw mostly two of them
lags its teacher most on the other two, which is what DDK is meant to find. The chat
default (pipeline/chat_corpus.py) is made from the same sources.
"""

from __future__ import annotations

import ast
import json
import sysconfig
import unicodedata
from pathlib import Path

from .corpus import Document, Domain


def builtin_domains(chars_per_domain: int) -> list[Domain]:
    return [
        Domain("code", take(_stdlib_code(), chars_per_domain)),
        Domain("reference", take(language_reference(), chars_per_domain)),
        Domain("docstrings", take(_stdlib_docstrings(), chars_per_domain)),
        Domain("unicode", take(_unicode_records(), chars_per_domain)),
    ]


def take(docs, budget: int) -> list[Document]:
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d.text)
    return out


def stdlib_modules():
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


def docstring_nodes(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    yield node, body[0]


def _stdlib_code():
    for rel, src, tree in stdlib_modules():
        lines = src.splitlines()
        # Docstrings belong to the `docstrings` domain; blank them here (keep line count)
        # so the two domains do not overlap.
        for _, expr in docstring_nodes(tree):
            indent = lines[expr.lineno - 1][: expr.col_offset]
            lines[expr.lineno - 1] = indent + "pass"
            for i in range(expr.lineno, expr.end_lineno):
                lines[i] = ""
        text = "\n".join(line for line in lines if line.strip() or line == "")
        yield Document(f"stdlib:{rel}", text)


def language_reference():
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield Document(f"pydoc_data.topics:{name}", topics.topics[name])


def _stdlib_docstrings():
    for rel, _, tree in stdlib_modules():
        module = ".".join(rel.with_suffix("").parts)
        parts = []
        for node, expr in docstring_nodes(tree):
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
