"""Conversations -> token ids and per-token flags: chat distillation's rendering and loss mask.

A chat domain's documents are conversations: a list of {role, content} messages (roles
system, user, assistant), or a prompt + completion pair (one user turn, one assistant
turn). Each is rendered with the teacher tokenizer's own chat template
(`tokenizer.chat_template`, recorded in the cache plan by its hash) and tokenized once.

The loss mask comes from the template itself, not from token patterns: for every
assistant turn i, the template renders messages[:i] with the generation prompt (what the
model sees before it answers) and messages[:i + 1] (the answer included); the characters
between the two, trailing whitespace dropped, are the answer: its content and its
end-of-turn marker (ChatML's `<|im_end|>`), so the student learns to stop. A token is
supervised when its first character lies in an answer span (fast tokenizers give the
character offsets). A template that does not render a conversation as a prefix of its
continuation cannot be masked this way and is refused by name.

Per-token flags (uint8), the same layout for the packed rows, the cache and the loss:
  SUPERVISED     the token is a training target (the position before it gets CE and KL)
  SEGMENT_START  a conversation (or a padding run) starts here: position ids restart
                 and attention does not cross the boundary (block-diagonal causal mask)
Raw-text domains carry no flags: every position is supervised, one segment per row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .config import ConfigError

SUPERVISED = np.uint8(1)
SEGMENT_START = np.uint8(2)
ROLES = ("system", "user", "assistant")
CHAT_LOSS = ("assistant", "last-assistant")  # corpus.chat_loss: every assistant turn, or the last one only
OVERLONG = ("truncate", "skip")  # corpus.chat_overlong: drop the oldest turns until it fits, or drop the conversation

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, the format Qwen's instruct models use (their own template also adds a default
# system prompt); built into the tiny tokenizers and the qwen-vocab one.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ChatError(ConfigError):
    """A conversation that cannot be trained on; the message names its file and line."""


@dataclass
class ChatStats:
    """What rendering did to a domain's conversations (printed, and kept in the manifest)."""

    conversations: int = 0
    truncated: int = 0  # oldest turns dropped to fit seq_len + 1 tokens
    skipped: int = 0  # longer than seq_len + 1 tokens even alone (or policy "skip")
    tokens: int = 0
    supervised_tokens: int = 0

    def add(self, other: "ChatStats") -> None:
        for f in ("conversations", "truncated", "skipped", "tokens", "supervised_tokens"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


def template_sha256(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(t.encode()).hexdigest() if isinstance(t, str) else None


def messages_from_record(obj, where: str, messages_field: str = "messages", prompt_field: str = "prompt",
                         completion_field: str = "completion") -> list[dict]:
    """A record's conversation as [{role, content}], checked: known roles, string contents,
    at least one assistant turn. `where` (file:line) starts every error."""
    if isinstance(obj, dict) and messages_field in obj:
        msgs = obj[messages_field]
        if isinstance(msgs, str):  # a Parquet/CSV column holding JSON
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise ChatError(f"{where}: field '{messages_field}' is a string but not JSON ({e.msg}); store a list of "
                                f"{{\"role\": ..., \"content\": ...}} objects") from None
    elif isinstance(obj, dict) and prompt_field in obj and completion_field in obj:
        msgs = [{"role": "user", "content": obj[prompt_field]}, {"role": "assistant", "content": obj[completion_field]}]
    else:
        keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ChatError(f"{where}: no '{messages_field}' field and no '{prompt_field}' + '{completion_field}' fields "
                        f"(found {keys}); set messages_field (or prompt_field / completion_field) in the domain's config")
    if not isinstance(msgs, list) or not msgs:
        raise ChatError(f"{where}: '{messages_field}' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}: message {i} is not an object with 'role' and 'content' ({str(m)[:60]!r})")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: message {i} has the unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: message {i} ({m['role']}) has a {type(m['content']).__name__} content; it must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained; "
                        f"add the answer or drop the row")
    return out


class ChatRenderer:
    """Renders conversations with a tokenizer's chat template into (ids, flags)."""

    def __init__(self, tokenizer, max_tokens: int, loss_on: str = "assistant", overlong: str = "truncate"):
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise ConfigError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?') or 'in memory'}) has no chat_template, "
                              f"which chat domains (format = \"chat\") are rendered with; use an instruct model's tokenizer "
                              f"or set tokenizer.chat_template (ChatML: ddk.pipeline.chat.CHATML_TEMPLATE)")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("chat domains need a fast (Rust) tokenizer: the loss mask maps characters to tokens by offsets")
        if loss_on not in CHAT_LOSS:
            raise ConfigError(f"corpus.chat_loss: '{loss_on}' is not one of {', '.join(CHAT_LOSS)}")
        if overlong not in OVERLONG:
            raise ConfigError(f"corpus.chat_overlong: '{overlong}' is not one of {', '.join(OVERLONG)}")
        self.tokenizer, self.max_tokens, self.loss_on, self.overlong = tokenizer, max_tokens, loss_on, overlong
        self.stats = ChatStats()

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, messages: list[dict], where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """One conversation's ids [n] int32 and flags [n] uint8 (SEGMENT_START on its first token)."""
        text = self._render(messages)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.loss_on == "last-assistant":
            answers = answers[-1:]
        spans = []
        for i in answers:
            before = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1]).rstrip()
            if not (text.startswith(before) and text.startswith(upto) and len(upto) >= len(before)):
                raise ChatError(f"{where}: the chat template does not render the conversation up to assistant turn {i} as a "
                                f"prefix of the whole; ddk finds each answer by rendering prefixes, so this template cannot "
                                f"be masked: use a prefix-consistent template (e.g. ChatML)")
            spans.append((len(before), len(upto)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
        flags = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            flags[(starts >= a) & (starts < b)] |= SUPERVISED
        if len(flags):
            flags[0] |= SEGMENT_START
        return ids, flags

    def encode(self, messages: list[dict], where: str = "") -> tuple[np.ndarray, np.ndarray] | None:
        """The conversation rendered to fit max_tokens (truncating its oldest turns under
        policy "truncate"; a leading system message is kept), or None when it is dropped.
        Counted in self.stats either way."""
        self.stats.conversations += 1
        ids, flags = self.render(messages, where)
        if len(ids) > self.max_tokens and self.overlong == "truncate":
            system = messages[:1] if messages[0]["role"] == "system" else []
            rest = messages[len(system):]
            while len(ids) > self.max_tokens:
                # Drop the oldest turns up to the next user turn (or assistant, if no user is left).
                cut = next((j for j in range(1, len(rest)) if rest[j]["role"] == "user"), None)
                if cut is None or not any(m["role"] == "assistant" for m in rest[cut:]):
                    break
                rest = rest[cut:]
                ids, flags = self.render(system + rest, where)
            if len(ids) <= self.max_tokens:
                self.stats.truncated += 1
        if len(ids) > self.max_tokens or not (flags & SUPERVISED).any():
            self.stats.skipped += 1
            return None
        self.stats.tokens += len(ids)
        self.stats.supervised_tokens += int((flags & SUPERVISED).astype(bool).sum())
        return ids, flags


def loss_mask(flags: np.ndarray) -> np.ndarray:
    """[..., L] bool of the L predicted positions of rows of L + 1 flags: position p is
    trained when token p + 1 is supervised and does not start a segment."""
    nxt = flags[..., 1:]
    return ((nxt & SUPERVISED) != 0) & ((nxt & SEGMENT_START) == 0)


def position_ids(flags: np.ndarray) -> np.ndarray:
    """[..., L] int64 position ids of the first L tokens of rows of L + 1 flags: counting
    from 0 at every segment start (and at the row's first token)."""
    f = flags[..., :-1]
    n = f.shape[-1]
    idx = np.broadcast_to(np.arange(n, dtype=np.int64), f.shape)
    starts = np.where((f & SEGMENT_START) != 0, idx, 0)
    starts[..., 0] = 0
    return idx - np.maximum.accumulate(starts, axis=-1)


def text_flags(rows: int, width: int, ids: np.ndarray | None = None, eos: int | None = None) -> np.ndarray:
    """Flags of raw-text rows in a masked cache: every token supervised, one segment per
    row; with `ids` and `eos` (corpus.document_mask) a new segment after every EOS."""
    flags = np.full((rows, width), SUPERVISED, dtype=np.uint8)
    flags[:, 0] |= SEGMENT_START
    if eos is not None:
        flags[:, 1:][ids[:, :-1] == eos] |= SEGMENT_START
    return flags
