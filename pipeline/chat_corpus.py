"""The built-in chat corpus (`corpus.source = "builtin-chat"`): instruction conversations
made from what every CPython installation has on disk, no network, no data files.

  api        "What does `json.dumps` do?" answered by the docstring's opening paragraphs;
             a follow-up turn asks for the signature
  language   a system prompt, then "Explain `for` in Python." answered by a part of the
             language reference's topic text (`pydoc_data.topics`), one part per conversation
  unicode    1 to 4 turns "Describe U+00E9." answered with the character's name,
             category, bidirectional class, decomposition and case mapping (`unicodedata`)
  code       "Show the source of `textwrap.dedent`." answered by the function's code,
             docstring removed

Four tasks with different answers (prose, reference text, structured records, code), so a
student pre-trained mostly on two lags on the others: the task gaps DDK reweights.
"""

from __future__ import annotations

import ast
import itertools
import unicodedata

from .builtin_corpus import docstring_nodes, language_reference, stdlib_modules, take
from .corpus import Domain, chat_document

_CATEGORIES = {
    "Lu": "an uppercase letter", "Ll": "a lowercase letter", "Lt": "a titlecase letter", "Lm": "a modifier letter",
    "Lo": "a letter", "Mn": "a non-spacing mark", "Mc": "a spacing mark", "Me": "an enclosing mark",
    "Nd": "a decimal digit", "Nl": "a letter number", "No": "a number", "Pc": "a connector punctuation",
    "Pd": "a dash", "Ps": "an opening punctuation", "Pe": "a closing punctuation", "Pi": "an initial quote",
    "Pf": "a final quote", "Po": "a punctuation mark", "Sm": "a math symbol", "Sc": "a currency symbol",
    "Sk": "a modifier symbol", "So": "a symbol", "Zs": "a space separator",
}


def builtin_chat_domains(chars_per_domain: int) -> list[Domain]:
    return [
        Domain("api", take(_api_questions(), chars_per_domain), chat=True),
        Domain("language", take(_language_questions(), chars_per_domain), chat=True),
        Domain("unicode", take(_unicode_questions(), chars_per_domain), chat=True),
        Domain("code", take(_code_questions(), chars_per_domain), chat=True),
    ]


def _paragraphs(text: str, limit: int) -> str:
    """The opening paragraphs of `text`, whole, up to about `limit` characters."""
    out = []
    for para in text.strip().split("\n\n"):
        if out and sum(len(p) + 2 for p in out) + len(para) > limit:
            break
        out.append(para.strip())
    return "\n\n".join(out)[: limit * 2]


def _api_questions():
    for rel, _, tree in stdlib_modules():
        module = ".".join(rel.with_suffix("").parts)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        for node, expr in docstring_nodes(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = expr.value.value.strip()
            if len(doc) < 60:
                continue
            name = f"{module}.{node.name}"
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            messages = [{"role": "user", "content": f"What does `{name}` do?"},
                        {"role": "assistant", "content": _paragraphs(doc, 500)}]
            if isinstance(node, ast.FunctionDef):
                messages += [{"role": "user", "content": "What is its signature?"},
                             {"role": "assistant", "content": f"`{name}({ast.unparse(node.args)})`"}]
            yield chat_document(f"chat-api:{name}:{kind}:{node.lineno}", messages)


def _chunks(text: str, size: int) -> list[str]:
    """`text` cut at paragraph boundaries into pieces of about `size` characters."""
    out, cur = [], []
    for para in text.strip().split("\n\n"):
        cur.append(para.strip())
        if sum(len(p) + 2 for p in cur) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def _language_questions():
    system = {"role": "system", "content": "You answer questions about the Python language from its reference manual."}
    for t, doc in enumerate(language_reference()):
        topic = doc.doc_id.split(":", 1)[1]
        for part, answer in enumerate(_chunks(doc.text, 150 + 100 * (t % 4))):  # parts of mixed lengths
            if len(answer) < 80:
                continue
            ask = f"Explain `{topic}` in Python." if part == 0 else f"Go on about `{topic}` in Python (part {part + 1})."
            yield chat_document(f"chat-language:{topic}:{part}", [system, {"role": "user", "content": ask},
                                                                   {"role": "assistant", "content": answer[:700]}])


def _describe(cp: int) -> str | None:
    ch = chr(cp)
    name = unicodedata.name(ch, "")
    if not name:
        return None
    cat = unicodedata.category(ch)
    parts = [f"U+{cp:04X} is {name}, {_CATEGORIES.get(cat, 'a character')} ({cat}), "
             f"bidirectional class {unicodedata.bidirectional(ch)}."]
    if unicodedata.decomposition(ch):
        parts.append(f"It decomposes to {unicodedata.decomposition(ch)}.")
    if unicodedata.numeric(ch, None) is not None:
        parts.append(f"Its numeric value is {unicodedata.numeric(ch)}.")
    if ch.upper() != ch and len(ch.upper()) == 1:
        parts.append(f"Its uppercase is U+{ord(ch.upper()):04X}.")
    if ch.lower() != ch and len(ch.lower()) == 1:
        parts.append(f"Its lowercase is U+{ord(ch.lower()):04X}.")
    return " ".join(parts)


def _unicode_questions():
    described = ((cp, d) for cp in range(0xA0, 0x30000) if (d := _describe(cp)) is not None)
    for i in itertools.count():
        block = [x for _, x in zip(range(1 + i % 4), described)]  # 1 to 4 turns: conversations of mixed lengths
        if not block:
            return
        messages = []
        for cp, answer in block:
            messages += [{"role": "user", "content": f"Describe the character U+{cp:04X}."},
                         {"role": "assistant", "content": answer}]
        yield chat_document(f"chat-unicode:{block[0][0]:X}", messages)


def _code_questions():
    for rel, src, tree in stdlib_modules():
        module = ".".join(rel.with_suffix("").parts)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        lines = src.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            body = lines[node.lineno - 1 : node.end_lineno]
            # Drop the docstring: the api task answers from it.
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant):
                a, b = node.body[0].lineno - node.lineno, node.body[0].end_lineno - node.lineno + 1
                body = body[:a] + body[b:]
            code = "\n".join(body)
            if not 80 <= len(code) <= 700:
                continue
            yield chat_document(f"chat-code:{module}.{node.name}", [
                {"role": "user", "content": f"Show the source of `{module}.{node.name}`."},
                {"role": "assistant", "content": f"```python\n{code}\n```"}])

