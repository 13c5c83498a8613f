"""Throughput and peak memory of one PPO iteration's phases, with same-run baselines.

    python benchmarks/ppo_iteration.py [--layers 2] [--hidden 128] [--prompts 64]
        [--new-tokens 32] [--minibatch 16] [--device cpu|cuda] [--repeats 3] [--threads N]

Model: a GPT-2 of the given size on the built-in reviews task's word-level vocabulary;
the policy, the reference and the critic each hold one copy. Phases, timed with
rlhfkit's own code paths:

- rollout: sampling with the KV cache plus the rollout-time log-probs (the policy's
  ``generate_ids`` and ``rollout.policy_forward``); baseline: the same sampling with
  ``use_cache=False`` (every step re-reads the whole sequence);
- scoring: reference log-probs and critic values of the rollout (no grad);
- train: one epoch of PPO updates in minibatches (policy forward, ppo-clip loss, value
  loss on the critic, backward, AdamW); baseline: plain LM training (cross-entropy,
  forward, backward, AdamW) of the same policy on the same tokens.

Prints response tokens per second of each phase, the ratio against its baseline, the
phase's utilisation (its model FLOPs per second over the measured matmul peak of this
process: a ``[1024, 1024] x [1024, 1024]`` float32 product, best of 20, at the same thread
count) and peak memory (CUDA: max allocated; CPU: the process's peak RSS, which only
grows). Model FLOPs count ``2 x parameters`` per token through a forward (embeddings
excluded, the LM head included), ``6 x`` for forward + backward, plus the attention
scores ``4 x layers x hidden x context`` per token (``context`` the average position):
the usual accounting (Kaplan et al. 2020), without recomputation.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit import StageContext, load_plugins, ref
from rlhfkit.plugins.ppo.critic import ValueModel
from rlhfkit.plugins.ppo.functional import gae, policy_loss, value_loss
from rlhfkit.plugins.ppo.rollout import policy_forward


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(device: torch.device, fn, repeats: int) -> tuple[float, object]:
    """Best of ``repeats`` wall times of ``fn()`` (after one warm-up call)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best, out


def matmul_peak(device: torch.device, n: int = 1024) -> float:
    """FLOP/s of the best of 20 ``[n, n] @ [n, n]`` float32 products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds, _ = timed(device, lambda: a @ b, 20)
    return 2 * n**3 / seconds


def flops_per_token(model: torch.nn.Module, context: float) -> float:
    """Forward FLOPs per token: 2 x (parameters less the input embeddings, the head counted
    once even when tied) + the attention scores and mix, 4 x layers x hidden x context."""
    config = model.config
    embeddings = sum(p.numel() for name, p in model.named_parameters() if "wte" in name or "wpe" in name
                     or "embed" in name)
    head = config.vocab_size * config.hidden_size
    dense = sum(p.numel() for p in model.parameters()) - embeddings + head
    return 2 * dense + 4 * config.num_hidden_layers * config.hidden_size * context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    context = StageContext(registry=load_plugins().registry)
    policy = context.build(ref("policy")(
        name="transformers", tokenizer={"task": "reviews"}, dropout=0.0,
        architecture={"layers": args.layers, "hidden": args.hidden, "heads": 4, "max_positions": 128}))
    policy.model.to(device).eval()
    reference = copy.deepcopy(policy.model).requires_grad_(False)
    critic = ValueModel(copy.deepcopy(policy.model), None).to(device)
    rows = context.build(ref("dataset")(name="builtin", task="reviews", split="prompts")).rows()
    prompts = [r.prompt for r in rows[: args.prompts]]
    prompt_ids, prompt_mask = policy.tokenize_prompts(prompts)
    # never stop early, so every variant generates the same number of tokens
    sampling = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": True,
                "top_k": 0, "top_p": 1.0, "pad_token_id": policy.tokenizer.pad_token_id}

    from rlhfkit import Rollout

    def rollout(use_cache: bool = True) -> Rollout:
        with torch.no_grad():
            sequences = policy.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                              use_cache=use_cache, **sampling)
            response_ids = sequences[:, prompt_ids.shape[1]:]
            mask = torch.ones_like(response_ids)
            r = Rollout(prompt_ids, prompt_mask, response_ids, mask, torch.zeros(mask.shape, device=device),
                        prompts, [""] * len(prompts), torch.arange(len(prompts)), torch.zeros(len(prompts)))
            r.logprobs, _ = policy_forward(policy.model, r, 1.0, False)
        return r

    t_rollout, r = timed(device, rollout, args.repeats)
    t_nocache, _ = timed(device, lambda: rollout(use_cache=False), args.repeats)

    def scoring() -> None:
        with torch.no_grad():
            r.ref_logprobs, _ = policy_forward(reference, r, 1.0, False)
            r.values = critic(r)

    t_score, _ = timed(device, scoring, args.repeats)
    mask = r.response_mask.float()
    rewards = torch.zeros_like(mask)
    rewards[:, -1] = torch.randn(len(prompts), device=device)
    r.advantages, r.returns = gae(rewards, r.values, mask, 1.0, 0.95)
    optimizer = torch.optim.AdamW([*policy.model.parameters(), *critic.parameters()], lr=1e-5)
    lm_optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-5)

    def ppo_epoch() -> None:
        for start in range(0, len(r), args.minibatch):
            piece = r.select(torch.arange(start, min(start + args.minibatch, len(r))))
            logprobs, _ = policy_forward(policy.model, piece, 1.0, False)
            loss, _ = policy_loss(logprobs, piece.logprobs, piece.advantages, piece.response_mask.float())
            v_loss, _ = value_loss(critic(piece), piece.values, piece.returns, piece.response_mask.float())
            (loss + v_loss).backward()
            torch.nn.utils.clip_grad_norm_([*policy.model.parameters(), *critic.parameters()], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def lm_epoch() -> None:
        ids = torch.cat([r.prompt_ids, r.response_ids], 1)
        attention = torch.cat([r.prompt_mask, r.response_mask], 1)
        for start in range(0, len(r), args.minibatch):
            chunk = slice(start, start + args.minibatch)
            out = policy.model(input_ids=ids[chunk], attention_mask=attention[chunk], labels=ids[chunk])
            out.loss.backward()
            lm_optimizer.step()
            lm_optimizer.zero_grad(set_to_none=True)

    t_train, _ = timed(device, ppo_epoch, args.repeats)
    t_lm, _ = timed(device, lm_epoch, args.repeats)

    tokens = int(r.response_mask.sum())
    peak = matmul_peak(device)
    sequence = r.prompt_ids.shape[1] + r.response_ids.shape[1]
    forward = flops_per_token(policy.model, sequence / 2) * len(r) * sequence  # one forward over every token
    phases = {"rollout": 2 * forward, "scoring": 2 * forward, "train": 2 * 3 * forward, "nocache": None,
              "lm": 3 * forward}
    # generate without the cache re-reads the whole sequence at each new token
    phases["nocache"] = forward / sequence * sum(r.prompt_ids.shape[1] + t for t in range(1, args.new_tokens + 1)) \
        + forward

    def use(flops: float, seconds: float) -> str:
        return f"{100 * flops / seconds / peak:.0f} %"

    table = Table(title=f"one PPO iteration: GPT-2 {args.layers} layers x {args.hidden}, {args.prompts} prompts x "
                        f"{args.new_tokens} new tokens, minibatch {args.minibatch}, {device}; matmul peak "
                        f"{peak / 1e9:.1f} GFLOP/s")
    for column in ("phase", "response tokens/s", "utilisation", "baseline", "baseline tokens/s",
                   "baseline utilisation", "ratio"):
        table.add_column(column, justify="left" if column in ("phase", "baseline") else "right")
    table.add_row("rollout (KV cache + log-probs)", f"{tokens / t_rollout:,.0f}", use(phases["rollout"], t_rollout),
                  "generate without KV cache", f"{tokens / t_nocache:,.0f}", use(phases["nocache"], t_nocache),
                  f"{t_nocache / t_rollout:.2f}x")
    table.add_row("scoring (reference + critic)", f"{tokens / t_score:,.0f}", use(phases["scoring"], t_score),
                  "-", "-", "-", "-")
    table.add_row("train (PPO epoch, policy + critic)", f"{tokens / t_train:,.0f}", use(phases["train"], t_train),
                  "plain LM epoch (policy only)", f"{tokens / t_lm:,.0f}", use(phases["lm"], t_lm),
                  f"{t_lm / t_train:.2f}x")
    console = Console(width=150)
    console.print(table)
    console.print(f"peak memory: {peak_memory_mb(device):,.0f} MiB "
                  f"({'max allocated on the GPU' if device.type == 'cuda' else 'peak RSS of the process'}); "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
