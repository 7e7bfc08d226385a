"""Conversations as tokens: the chat template, which tokens are trained, and truncation.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}`` (an Alpaca
record's user turn may also carry ``"input"``). It is rendered by a Jinja chat template, the way
``tokenizer.apply_chat_template`` does it, with one of:

* ``model``  - the tokenizer's own chat template (used whenever the tokenizer has one);
* ``alpaca`` - the Alpaca prompt (Taori et al. 2023): ``Below is an instruction ... ### Instruction:\\n{content}
  \\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{answer}<eos>``; the default for Alpaca records;
* ``plain``  - a plain role-tagged template: ``<|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...<eos>\\n``;
  the default for messages and ShareGPT records.

Trained tokens: the conversation is rendered turn by turn. For every assistant turn i, ``render(messages[:i],
add_generation_prompt=True)`` must be a prefix of ``render(messages[:i + 1])``; what the latter adds is that
turn's response (its content and end-of-turn markup, e.g. ``<eos>``), and only those tokens are trained
(every assistant turn of a multi-turn conversation). Each piece is tokenized on its own (``add_special_tokens``
off: the template writes BOS itself), so the prompt tokens of training are exactly the tokens
:meth:`ChatFormat.prompt_ids` gives at generation time.

Truncation to ``max_length`` tokens: tokens are cut from the left of the prompt first (the BOS token stays);
if the final response alone does not fit, it is cut from its right; an example left with no trained token is
skipped. :class:`EncodeStats` counts each case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

def _refuse(fmt: str, what: str) -> str:
    """Jinja that stops rendering with a message (transformers' chat templates provide ``raise_exception``)."""
    return "{{ raise_exception('the " + fmt + " chat template renders " + what + ", not ' + message['role']) }}"


# Newlines are written as {{ '\\n' }} / {{ NL2 }}: transformers renders chat templates with trim_blocks, which
# drops a literal newline that follows a block tag.
ALPACA_TEMPLATE = (
    "{% set NL2 = '\\n\\n' %}{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}" + _refuse("alpaca", "a system message only as the first message") + "{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.index0 == 0 or (loop.index0 == 1 and messages[0]['role'] == 'system') %}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% elif message.get('input') %}Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes the request."
    "{% else %}Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.{% endif %}{{ NL2 }}{% endif %}"
    "### Instruction:{{ '\\n' }}{{ message['content'] }}{{ NL2 }}"
    "{% if message.get('input') %}### Input:{{ '\\n' }}{{ message['input'] }}{{ NL2 }}{% endif %}"
    "### Response:{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token or '' }}{{ NL2 }}"
    "{% else %}" + _refuse("alpaca", "the roles system, user and assistant") + "{% endif %}"
    "{% endfor %}"
)

PLAIN_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    + _refuse("plain", "the roles system, user and assistant") + "{% endif %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)

TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "plain": PLAIN_TEMPLATE}
DESCRIPTIONS = {
    "model": "the tokenizer's own chat template",
    "alpaca": "the Alpaca prompt (the tokenizer has no chat template)",
    "plain": "a plain role-tagged template <|role|> (the tokenizer has no chat template)",
}


class ChatFormatError(ValueError):
    """A conversation the chat template cannot render, or renders in a way that cannot be trained."""


@dataclass
class EncodeStats:
    """What truncation did to a set of examples."""

    examples: int = 0
    prompt_cut: int = 0  # prompt shortened from the left
    response_cut: int = 0  # final response shortened from the right
    skipped: int = 0  # nothing trainable left

    def describe(self) -> str:
        if not (self.prompt_cut or self.response_cut or self.skipped):
            return f"{self.examples} examples, none longer than --max-length"
        return (f"{self.examples} examples: {self.prompt_cut} prompts cut from the left, {self.response_cut} "
                f"responses cut from the right, {self.skipped} skipped (no response token fits)")


@dataclass
class Encoded:
    """One tokenized conversation: ids, which are trained, and where the final response starts."""

    ids: list[int]
    trained: list[bool]
    response_start: int  # index of the final assistant turn's first token
    images: list = field(default_factory=list)  # the images the ids show, in order (image-chat tasks)


@dataclass
class ChatFormat:
    """A tokenizer and the chat template its conversations are rendered with."""

    tokenizer: object
    name: str  # "model", "alpaca" or "plain"
    template: str  # the Jinja source
    bos_ids: list[int] = field(default_factory=list, repr=False)  # [BOS id], or [] if the tokenizer has none

    @classmethod
    def choose(cls, tokenizer, default: str) -> "ChatFormat":
        """The tokenizer's own template if it has one, else ``default`` ("alpaca" or "plain")."""
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return cls(tokenizer, "model", own)
        return cls(tokenizer, default, TEMPLATES[default])

    def __post_init__(self) -> None:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        self.bos_ids = [bos] if bos is not None else []

    def describe(self) -> str:
        return DESCRIPTIONS[self.name]

    # ---- rendering ---------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise ChatFormatError(f"the {self.name} chat template cannot render this conversation: {exc}") from None

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, messages: list[dict], max_tokens: int | None = None) -> list[int]:
        """The tokens that ask for the next assistant turn after ``messages`` (for generation), cut from the left
        (a leading BOS stays) to at most ``max_tokens``."""
        return self.cut_left(self.tokens(self.render(messages, add_generation_prompt=True)), max_tokens)

    def cut_left(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """``ids`` without its oldest tokens beyond ``max_tokens`` (a leading BOS stays)."""
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        bos = len(self.bos_ids) if self.bos_ids and ids[: len(self.bos_ids)] == self.bos_ids else 0
        keep = max(max_tokens - bos, 1)
        return ids[:bos] + ids[len(ids) - keep:]

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is an assistant response) pieces, in order."""
        pieces, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ChatFormatError(f"the {self.name} chat template does not render this conversation turn by "
                                      "turn (a rendered turn is not a prefix of the next), so its responses cannot "
                                      "be told apart from its prompts")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        tail = self.render(messages)[len(done):]
        if tail:
            pieces.append((tail, False))
        return pieces

    # ---- training examples --------------------------------------------------------------------------------
    def encode(self, messages: list[dict], max_length: int, train_on_prompt: bool = False,
               stats: EncodeStats | None = None) -> Encoded | None:
        """Token ids and trained flags of a conversation that ends with an assistant turn, truncated to
        ``max_length`` (see the module docstring); None if no trained token fits."""
        stats = stats if stats is not None else EncodeStats()
        stats.examples += 1
        ids: list[int] = []
        trained: list[bool] = []
        response_start = 0
        for text, is_response in self.pieces(messages):
            piece = self.tokens(text)
            if is_response:
                response_start = len(ids)
            ids += piece
            trained += [is_response] * len(piece)
        prompt, response = ids[:response_start], ids[response_start:]
        flags_prompt, flags_response = trained[:response_start], trained[response_start:]
        bos = len(self.bos_ids) if self.bos_ids and prompt[: len(self.bos_ids)] == self.bos_ids else 0
        excess = len(ids) - max_length
        if excess > 0:
            cut = min(excess, len(prompt) - bos)
            prompt, flags_prompt = prompt[:bos] + prompt[bos + cut:], flags_prompt[:bos] + flags_prompt[bos + cut:]
            stats.prompt_cut += cut > 0
            over = len(prompt) + len(response) - max_length
            if over > 0:
                response, flags_response = response[: len(response) - over], flags_response[: len(response) - over]
                stats.response_cut += 1
        ids, trained = prompt + response, flags_prompt + flags_response
        if train_on_prompt and any(trained):
            trained = [True] * len(ids)
        trained[:1] = [False]  # the first token has no context to be predicted from
        if not any(trained):
            stats.skipped += 1
            return None
        return Encoded(ids, trained, len(prompt))
