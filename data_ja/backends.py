"""Translation backends: an OpenAI-compatible chat API and a local transformers model.

A backend turns masked English texts into raw Japanese outputs; checking, retrying and caching
happen in `translate.py`.
"""

from __future__ import annotations

import json
import re

_RULES = ("Copy every placeholder such as ⟦0⟧ unchanged, keep the same line breaks, "
          "and keep every number in digits.")
SINGLE_PROMPT = ("Translate the user's English text into natural Japanese. "
                 f"Reply with the translation only. {_RULES}")
BATCH_PROMPT = ("The user's message is a JSON array of English texts. Translate each into natural "
                "Japanese and reply with only a JSON array of the translations, in the same "
                f"order and of the same length. {_RULES}")
_CODE_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


class OpenAIChatBackend:
    """{api_base}/chat/completions through the `openai` client; with batch_size > 1, several
    texts share a request as a JSON array, falling back to one request per text when the reply
    is not such an array. The client does not retry: `translate.py` retries a failed request and
    a rejected translation under one budget (`--retries`)."""

    def __init__(self, api_base: str, model: str, api_key: str | None = None,
                 batch_size: int = 1, timeout: float = 120.0, temperature: float = 0.0):
        import openai

        # A local server needs no key, but the library refuses to start without one.
        self.client = openai.OpenAI(base_url=api_base.rstrip("/"), api_key=api_key or "no-key",
                                    timeout=timeout, max_retries=0)
        self.model, self.batch_size, self.temperature = model, batch_size, temperature
        self.name = f"openai:{model}"

    def _chat(self, system: str, user: str, attempt: int) -> str:
        reply = self.client.chat.completions.create(
            model=self.model,
            temperature=self.temperature if attempt == 0 else max(self.temperature, 0.3),
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
        content = reply.choices[0].message.content
        if not isinstance(content, str):
            raise TypeError(f"reply content is {type(content).__name__}, not text")
        return content

    def translate(self, texts: list[str], attempt: int) -> list[str]:
        if len(texts) == 1:
            return [self._chat(SINGLE_PROMPT, texts[0], attempt)]
        reply = self._chat(BATCH_PROMPT, json.dumps(texts, ensure_ascii=False), attempt)
        try:
            items = json.loads(_CODE_FENCE.sub("", reply.strip()))
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list) and len(items) == len(texts) \
                and all(isinstance(item, str) for item in items):
            return items
        return [self._chat(SINGLE_PROMPT, text, attempt) for text in texts]


class TransformersBackend:
    """A local causal LM (prompted with the chat template when it has one) or seq2seq MT model."""

    def __init__(self, model: str, batch_size: int = 8, max_new_tokens: int = 512,
                 device: str | None = None, forced_bos_token: str | None = None):
        import torch
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                                  AutoTokenizer)

        self.torch = torch
        self.seq2seq = AutoConfig.from_pretrained(model).is_encoder_decoder
        self.tokenizer = AutoTokenizer.from_pretrained(
            model, padding_side="right" if self.seq2seq else "left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_class = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = model_class.from_pretrained(model).to(self.device).eval()
        self.forced_bos_token_id = (self.tokenizer.convert_tokens_to_ids(forced_bos_token)
                                    if forced_bos_token else None)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.name = f"transformers:{model}"

    def _prompt(self, text: str) -> str:
        if self.seq2seq:
            return text
        instruction = f"{SINGLE_PROMPT}\n\n{text}"
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False,
                add_generation_prompt=True)
        return f"{instruction}\n\nJapanese:\n"

    def translate(self, texts: list[str], attempt: int) -> list[str]:
        batch = self.tokenizer([self._prompt(t) for t in texts], return_tensors="pt",
                               padding=True).to(self.device)
        batch.pop("token_type_ids", None)  # not every model's forward takes them
        sampling = {"do_sample": True, "temperature": 0.7} if attempt else {"do_sample": False}
        if self.forced_bos_token_id is not None:
            sampling["forced_bos_token_id"] = self.forced_bos_token_id
        with self.torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling)
        if not self.seq2seq:
            out = out[:, batch["input_ids"].shape[1]:]  # the prompt is not part of the answer
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
