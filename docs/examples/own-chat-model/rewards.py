"""Reward functions for recipe.yaml, written as for TRL's GRPOTrainer: keyword arguments
``prompts`` and ``completions`` (conversational data: lists of messages) and every other
column of the prompt rows (here ``thing`` and ``answer``), one float per completion back."""


def colour_match(prompts, completions, thing, answer, **kwargs):
    """1.0 when the reply names the row's thing and its colour, else 0.0."""
    replies = [completion[0]["content"].lower() for completion in completions]
    return [float(t in reply and colour in reply) for reply, t, colour in zip(replies, thing, answer)]
