"""Checks that a faster way of computing something gives what the plain forward gives.

The offline steps rewrite their forwards (a shared prompt, packed rows, the LM head and the
last layer's MLP only where read); each rewrite is exact for the models it was written for,
and checked on the first rows before training for the model at hand, which may build its
own masks or ignore custom ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def disagreement(model: torch.nn.Module, candidate: Callable[[], torch.Tensor],
                 reference: Callable[[], torch.Tensor], what: str) -> str | None:
    """Why ``candidate()`` differs from ``reference()`` for ``model`` (an error it raised,
    or the largest difference), or ``None`` when they agree to float rounding: 1e-4
    relative and 1e-3 absolute in float32, 2e-2 and 0.25 in lower precision. Both run in
    eval mode (no dropout); the model's mode is restored."""
    mode = model.training
    model.eval()
    try:
        a, b = candidate().float(), reference().float()
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        model.train(mode)
    wide = next(model.parameters()).dtype == torch.float32
    if torch.allclose(a, b, rtol=1e-4 if wide else 2e-2, atol=1e-3 if wide else 0.25):
        return None
    return f"{what} differ by up to {float((a - b).abs().max()):.3g}"
