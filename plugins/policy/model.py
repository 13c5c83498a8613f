"""The policy object: a transformers causal LM with its tokenizer.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``T`` response tokens
(right-padded), ``L`` prompt + completion tokens (right-padded). Masks are int64, 1 on
real tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit import Generation, NonFiniteError, atomic_directory, encode_pairs, encode_prompts
from rlhfkit.plugins.policy.config import TransformersPolicyConfig
from rlhfkit.plugins.policy.decode import sample_in_place


class TransformersPolicy:
    """A causal LM that samples and scores tokens (satisfies :class:`rlhfkit.Policy`).

    Attributes:
        model: the ``torch.nn.Module`` to train: a transformers model, or a peft model
            wrapping one when LoRA is on (then only the adapter weights require grad).
        tokenizer: its tokenizer; PAD is set and differs from EOS.
        config: the settings it was built from.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: TransformersPolicyConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenising

    def tokenize_prompts(self, prompts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts (text or conversations, under the chat rule of
        :func:`rlhfkit.encode_prompts`) left-padded, so every row's last token sits at the
        same column and generation continues all rows in step.

        Returns:
            ``prompt_ids [B, P]`` and ``prompt_mask [B, P]``, on the model's device.
        """
        rows = encode_prompts(self.tokenizer, prompts)
        empty = [i for i, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(f"prompts {empty} encode to no tokens; generation needs at least "
                             "one prompt token")
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        ids = [[pad] * (width - len(row)) + row for row in rows]
        mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
        return (torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device))

    def tokenize_pairs(self, prompts: Sequence[Any], completions: Sequence[str], max_length: int,
                       add_eos: bool = True) -> dict[str, torch.Tensor]:
        """:func:`rlhfkit.encode_pairs` as ``[B, L]`` tensors on the model's device."""
        encoded = encode_pairs(self.tokenizer, prompts, completions, max_length, add_eos)
        return {name: torch.tensor(rows, device=self.device) for name, rows in encoded.items()}

    # ------------------------------------------------------------------ sampling

    def generate_ids(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                     max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``response_ids, response_mask`` of :meth:`sample` (no log-probs)."""
        out = self.sample(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, logprobs=False)
        return out.response_ids, out.response_mask

    @torch.no_grad()  # not inference_mode: the ids feed later autograd forwards (PPO)
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
               do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               logprobs: bool = True, cache: str = "in-place") -> Generation:
        """Sample one response per prompt with the KV cache, in eval mode (no dropout).

        Args:
            prompt_ids, prompt_mask: ``[B, P]`` left-padded (see :meth:`tokenize_prompts`);
                positions follow the mask, so padded rows are continued exactly as alone.
            do_sample: False for greedy decoding (then top_k/top_p are unused).
            top_k: 0 keeps every token; top_p: 1.0 keeps every token.
            logprobs: also return each sampled token's log-prob on ``logits / temperature``
                (the full distribution, before top-k/top-p), from the sampling forward.
            cache: ``in-place`` (:mod:`rlhfkit.plugins.policy.decode`: the same samples as
                transformers ``generate``, without copying the cache each token), or
                ``generate`` with its ``dynamic`` or ``static`` (preallocated) cache.
        Returns:
            a :class:`rlhfkit.Generation`: ``response_ids [B, T]`` right-padded with PAD
            (``T <= max_new_tokens``: sampling stops once every row emitted EOS),
            ``response_mask [B, T]``, 1 up to and including each row's first EOS
            (everything when a row never emitted one), and ``logprobs [B, T]`` or None.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            if cache == "in-place":
                sampled = sample_in_place(
                    self.model, self.model.config, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                    do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                    logprobs=logprobs)
                response_ids, recorded = sampled.tokens, sampled.logprobs
            else:
                response_ids, recorded = self._generate(prompt_ids, prompt_mask, max_new_tokens, do_sample,
                                                        temperature, top_k, top_p, logprobs, cache)
        except RuntimeError as exc:  # torch.multinomial on NaN/Inf probabilities
            if "probability tensor contains" in str(exc):
                raise NonFiniteError("the policy's sampling probabilities",
                                     detail="its logits are NaN/Inf: overflow in the forward pass?") from None
            raise
        finally:
            self.model.train(was_training)
        response_mask = mask_after_eos(response_ids, self.tokenizer.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        token_logprobs = recorded * response_mask if recorded is not None else None
        return Generation(response_ids, response_mask, token_logprobs)

    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                  do_sample: bool, temperature: float, top_k: int, top_p: float, logprobs: bool,
                  cache: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """transformers ``generate``: response ids and the recorded log-probs (or None)."""
        sampling = ({"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample
                    else {})
        # Every sampling setting explicit: transformers fills unset ones from the model's
        # generation_config and then its global defaults (top_k=50), which would sample
        # from another distribution than the one the algorithm asked for and scores.
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            **({"cache_implementation": "static"} if cache == "static" else {}), **sampling)
        recorder = _LogprobRecorder(temperature) if logprobs else None
        sequences = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                        generation_config=generation_config,
                                        logits_processor=[recorder] if recorder else None)
        response_ids = sequences[:, prompt_ids.shape[1]:]
        return response_ids, recorder.finish(response_ids) if recorder else None

    def generate(self, prompts: Sequence[Any], *, max_new_tokens: int, do_sample: bool,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
        """Sample one response per prompt and return its text (special tokens dropped)."""
        prompt_ids, prompt_mask = self.tokenize_prompts(prompts)
        response_ids, response_mask = self.generate_ids(
            prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p)
        return self.decode_responses(response_ids, response_mask)

    def decode_responses(self, response_ids: torch.Tensor, response_mask: torch.Tensor
                         ) -> list[str]:
        """Text of ``response_ids [B, T]`` where ``response_mask [B, T]`` is 1, stripped,
        special tokens (EOS, PAD) dropped."""
        ids = response_ids.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        return [text.strip() for text in texts]

    # ------------------------------------------------------------------ export

    def export(self, directory: Path) -> None:
        """Write a plain transformers model (safetensors) and the tokenizer to ``directory``.

        LoRA adapters are merged into a copy of the base weights, so the export loads with
        ``AutoModelForCausalLM.from_pretrained`` alone while the training model keeps its
        adapters. Files are written to a temporary sibling directory that then replaces
        ``directory``: a crash never leaves a half-written export behind.
        """
        with atomic_directory(Path(directory)) as staging:
            self.plain_model().save_pretrained(staging)  # transformers 5 writes safetensors
            self.tokenizer.save_pretrained(staging)

    def plain_model(self) -> PreTrainedModel:
        """The transformers model, LoRA weights merged into a copy (memory: one more model)."""
        if hasattr(self.model, "merge_and_unload"):  # a peft model
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model


def mask_after_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B, T] -> [B, T]`` int64: 1 up to and including the first ``eos_token_id`` of each
    row, 0 after it; all ones for a row without EOS."""
    is_eos = (response_ids == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).long()


class _LogprobRecorder(LogitsProcessor):
    """Records each sampled token's log-prob on ``logits / temperature`` during
    ``generate``, one step behind: a call sees the raw logits of step ``t`` (custom
    processors run before transformers' temperature and top-k/top-p warpers) and the
    token sampled at step ``t - 1`` (the last column of ``input_ids``). Holds one
    ``[B, V]`` row of log-probs at a time, never the whole ``[B, T, V]``."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, tokens[:, None].to(self.pending.device))[:, 0])
            self.pending = None

    def finish(self, response_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` log-probs of ``response_ids`` (the last step's token gathered here)."""
        if response_ids.shape[1] > len(self.steps):
            self._take(response_ids[:, len(self.steps)])
        if not self.steps:
            return torch.zeros(response_ids.shape, device=response_ids.device)
        out = torch.stack(self.steps[: response_ids.shape[1]], dim=1)
        return out.to(response_ids.device)
