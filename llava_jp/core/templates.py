"""Prompt templates and conversation handling.

A conversation is rendered as a list of `Segment`s: text that is context (never supervised),
text that is an answer (supervised), and image slots. The processor tokenizes segment by
segment, so the supervised tokens are exactly `tokenize(answer) + [eos]` by construction; the
Jinja chat template renders the same text for tools that only know `apply_chat_template`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken

IMAGE_MARKER = "<image>"
# list content ([{"type": "image"}, {"type": "text", "text": ...}]) joins its items with this,
# so the standard transformers message format renders as LLaVA-format "<image>\n{question}"
CONTENT_ITEM_SEPARATOR = "\n"

LLM_JP_V1_SYSTEM = (
    "これは好奇心旺盛なユーザーと人工知能システムのチャットです。"
    "システムはユーザーの質問に親切、詳細、丁寧に答える。"
)

_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "ユーザー": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "システム": "assistant",
}


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation.

    kind: "text" (context), "answer" (supervised text, followed by the end token) or "image".
    """

    kind: str
    text: str = ""


@dataclass(frozen=True)
class Template:
    """A prompt format: how system text, user turns and assistant turns are laid out."""

    name: str
    system: str
    user_prefix: str
    assistant_prefix: str
    turn_separator: str
    append_end_token: bool

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """Render normalised messages (see `normalize_conversation`) into segments.

        With `add_generation_prompt`, the rendering ends with the assistant prefix so the
        model continues with an answer; the last message must then be a user turn.
        """
        if not messages or messages[0]["role"] != "user":
            raise ValueError("a conversation must start with a user turn")
        out: list[Segment] = []
        context = self.system
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"turn {i}: expected role {expected!r}, got {message['role']!r}")
            if expected == "user":
                if i > 0:
                    context += self.turn_separator
                context += self.user_prefix
                pieces = content_text(message["content"]).split(IMAGE_MARKER)
                for j, piece in enumerate(pieces):
                    if j > 0:
                        out.extend(_flush(context))
                        out.append(Segment("image"))
                        context = ""
                    context += piece
                context += self.assistant_prefix
            else:
                out.extend(_flush(context))
                context = ""
                out.append(Segment("answer", content_text(message["content"])))
        if messages[-1]["role"] == "user":
            if not add_generation_prompt:
                raise ValueError("conversation ends with a user turn; pass add_generation_prompt=True")
            out.extend(_flush(context))
        return out

    def render(self, messages: list[dict], eos_token: str, add_generation_prompt: bool = False) -> str:
        """The conversation as one string (what the Jinja chat template produces)."""
        parts = []
        for seg in self.segments(messages, add_generation_prompt):
            if seg.kind == "image":
                parts.append(IMAGE_MARKER)
            elif seg.kind == "answer":
                parts.append(seg.text + (eos_token if self.append_end_token else ""))
            else:
                parts.append(seg.text)
        return "".join(parts)

    def jinja(self) -> str:
        """A Jinja chat template equivalent to `render`: string content, or list content whose
        image items render as `<image>` and whose items are joined by a newline (`content_text`)."""
        sys_text = _jinja_escape(self.system)
        sep = _jinja_escape(CONTENT_ITEM_SEPARATOR)
        content = (
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for item in m['content'] %}{% if not loop.first %}{{ '" + sep + "' }}{% endif %}"
            "{% if item['type'] == 'image' %}{{ '" + IMAGE_MARKER + "' }}{% else %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}"
        )
        return (
            "{{ '" + sys_text + "' }}"
            "{% for m in messages %}"
            "{% if m['role'] == 'user' %}"
            "{% if not loop.first %}{{ '" + _jinja_escape(self.turn_separator) + "' }}{% endif %}"
            "{{ '" + _jinja_escape(self.user_prefix) + "' }}" + content + "{{ '" + _jinja_escape(self.assistant_prefix) + "' }}"
            "{% else %}"
            + content + ("{{ eos_token }}" if self.append_end_token else "") +
            "{% endif %}"
            "{% endfor %}"
        )

    @property
    def prompt_prefix(self) -> str:
        """How every rendered conversation starts (empty for templates without system text or prefixes)."""
        return self.system + self.user_prefix

    def parse(self, text: str, eos_token: str) -> tuple[list[dict], bool]:
        """Inverse of `render`: a rendered conversation -> (messages, ends with the generation prompt).

        Raises ValueError when `text` does not follow this template (re-rendering the parsed
        messages must give `text` back exactly).
        """
        prefix = self.prompt_prefix
        if not prefix or not text.startswith(self.system):
            raise ValueError(f"text does not start with the {self.name!r} template's system text")
        end = eos_token if self.append_end_token else ""
        rest, messages, generation_prompt = text[len(self.system):], [], False
        while True:
            if messages:
                if not rest.startswith(self.turn_separator):
                    break
                rest = rest[len(self.turn_separator):]
            if not rest.startswith(self.user_prefix):
                break
            rest = rest[len(self.user_prefix):]
            cut = rest.find(self.assistant_prefix) if self.assistant_prefix else len(rest)
            if cut < 0:
                break
            messages.append({"role": "user", "content": rest[:cut]})
            rest = rest[cut + len(self.assistant_prefix):]
            if not rest:
                generation_prompt = True
                break
            cut = rest.find(end) if end else -1
            if cut < 0:
                break
            messages.append({"role": "assistant", "content": rest[:cut]})
            rest = rest[cut + len(end):]
            if not rest:
                break
        if not messages or self.render(messages, eos_token, add_generation_prompt=generation_prompt) != text:
            raise ValueError(f"text starts like a {self.name!r} prompt but does not follow the template; pass "
                             "a prompt rendered by apply_chat_template, or just the question")
        return messages, generation_prompt


def _jinja_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def content_text(content) -> str:
    """Message content as text: a string as is; list content (transformers' message format) with
    each image item as `<image>` and text items' text, joined by `CONTENT_ITEM_SEPARATOR`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    parts = []
    for i, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            parts.append(IMAGE_MARKER)
        elif kind == "text" and isinstance(item.get("text"), str):
            parts.append(item["text"])
        else:
            raise ValueError(f"content item {i}: expected {{'type': 'image'}} or {{'type': 'text', 'text': str}}, "
                             f"got {item!r}"[:200])
    return CONTENT_ITEM_SEPARATOR.join(parts)


def _flush(context: str) -> list[Segment]:
    return [Segment("text", context)] if context else []


TEMPLATES: dict[str, Template] = {
    # stage 2: "{system} ユーザー: <image>\n{question} システム: {answer}<EOD|LLM-jp>", turns joined by " "
    "llm-jp-v1": Template(
        name="llm-jp-v1",
        system=LLM_JP_V1_SYSTEM + " ",
        user_prefix="ユーザー: ",
        assistant_prefix=" システム: ",
        turn_separator=" ",
        append_end_token=True,
    ),
    # stage 1: "<image>{caption}\n", only the caption (and its newline) is supervised
    "plain": Template(
        name="plain",
        system="",
        user_prefix="",
        assistant_prefix="",
        turn_separator="",
        append_end_token=False,
    ),
}


def get_template(name: str) -> Template:
    """Look up a template by name, with an error that lists the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}") from None


def normalize_conversation(raw: list[dict], sample_id: object = None) -> list[dict]:
    """LLaVA-format turns (`from`/`value`, either role spelling) -> `role`/`content` messages.

    Already-normalised messages (`role`/`content`) pass through. Raises ValueError naming the
    sample and turn for unknown roles or missing text.
    """
    where = f"sample {sample_id!r}: " if sample_id is not None else ""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}conversations must be a non-empty list")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in _ROLE_ALIASES:
            raise ValueError(f"{where}turn {i}: unknown role {role!r} (known: {sorted(_ROLE_ALIASES)})")
        if isinstance(content, (list, tuple)):
            try:
                content = content_text(content)
            except ValueError as err:
                raise ValueError(f"{where}turn {i}: {err}") from None
        if not isinstance(content, str):
            raise ValueError(f"{where}turn {i}: text must be a string, got {type(content).__name__}")
        messages.append({"role": _ROLE_ALIASES[role], "content": content})
    return messages


def plain_caption_messages(messages: list[dict]) -> list[dict]:
    """Stage-1 ("plain") form of a captioning sample: image only, caption + newline as answer.

    LLaVA's pretraining data puts an instruction next to `<image>` in the user turn; the
    plain template drops it and keeps only the image, as the reference recipe does.
    """
    if len(messages) < 2:
        raise ValueError("a plain (stage-1) sample needs a user turn and a caption")
    return [
        {"role": "user", "content": IMAGE_MARKER},
        {"role": "assistant", "content": messages[1]["content"] + "\n"},
    ]


# why a LLaVA-format conversation cannot train (`conversation_issues`), as counted by the trainer
CONVERSATION_FAULTS = ("malformed_sample", "empty_turn", "bad_role", "bad_turn_order", "image_tag_mismatch")


def conversation_issues(raw, n_images: int) -> list[tuple[str, str]]:
    """Every reason the trainer rejects a LLaVA-format conversation, as `(code, detail)` pairs
    (codes: `CONVERSATION_FAULTS`). `n_images` is how many images the sample has (0 or 1).

    Turns must alternate user/assistant starting with the user, hold non-empty text (a user
    turn may be just `<image>`), and have one `<image>` per image, in user turns only. A
    trailing user turn is allowed (the trainer drops it). `data_ja` shares this definition.
    """
    if not isinstance(raw, list) or not raw:
        return [("malformed_sample", "missing or empty 'conversations'")]
    texts = [t.get("value", t.get("content")) if isinstance(t, dict) else None for t in raw]
    if not all(isinstance(t, str) for t in texts):
        return [("malformed_sample", "every turn needs a string 'value'")]
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return [("malformed_sample", f"turn {i} is not valid Unicode (a lone surrogate)")]
    issues = [("empty_turn", f"turn {i} is empty") for i, text in enumerate(texts) if not text.strip()]
    try:
        roles = [m["role"] for m in normalize_conversation(raw)]
    except ValueError as err:
        return issues + [("bad_role", str(err))]
    alternating = ["user", "assistant"] * (len(roles) // 2 + 1)
    if roles != alternating[:len(roles)] or "assistant" not in roles:
        issues.append(("bad_turn_order", "roles must alternate user/assistant, starting with "
                       f"user, with at least one answer: {roles}"))
    user_tags = sum(t.count(IMAGE_MARKER) for t, r in zip(texts, roles) if r == "user")
    answer_tags = sum(t.count(IMAGE_MARKER) for t, r in zip(texts, roles) if r != "user")
    if user_tags != n_images or answer_tags:
        issues.append(("image_tag_mismatch", f"{n_images} image(s) but {user_tags} {IMAGE_MARKER} "
                       f"in user turns and {answer_tags} in answers"))
    return issues


def add_image_token(tokenizer) -> int:
    """Make `<image>` a special token of `tokenizer` (if it is not one yet); returns its id.

    A new token takes the next free id (`len(tokenizer)`): for llm-jp-1.3b that is 50570, one of
    the spare rows of its 50688-row embedding. `model.set_image_token` grows the embedding when
    the LM has no spare row.
    """
    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_MARKER, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
