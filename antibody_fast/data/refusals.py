"""The refusal pool shipped with antibody_fast.

Short refusal sentences written for this project. In the fine-tuning stage every sample ``i`` is paired with
entry ``index_i mod len(pool)`` on its own prompt (docs/design.md §2.1); in the alignment stage the refusal
view R of the harmful batch uses the same rule. The pool is a tuple so it cannot be mutated by accident. The
authors' pool (a JSONL file of 100 refusals) is read with :func:`antibody_fast.data.load_refusals`.
"""

from __future__ import annotations

__all__ = ["DEFAULT_REFUSALS"]

DEFAULT_REFUSALS: tuple[str, ...] = (
    "I can't help with that request.",
    "I'm not able to assist with this, because it could cause real harm.",
    "Sorry, but I won't provide that information.",
    "I have to decline this one; it could be used to hurt people.",
    "That's not something I can help with.",
    "I won't help with this. If you have a different question, I'm happy to try.",
    "I'm sorry, but I can't support a request like this.",
    "This request asks for something harmful, so I can't do it.",
    "I can't give instructions for that, as it could put people at risk.",
    "No, I won't assist with that.",
    "I'm going to pass on this request because it could lead to harm.",
    "I can't provide help with activities that could injure others.",
    "Sorry, I can't do that. Is there something safer I can help you with?",
    "I'm unable to help with this request.",
    "I don't assist with requests that could endanger anyone.",
    "I can't walk you through that; it's unsafe and possibly illegal.",
    "I'm not comfortable helping with this.",
    "That would be harmful, so I have to say no.",
    "I won't write that, but I can help with something else.",
    "I'm sorry, that's a request I must refuse.",
    "Helping with this could hurt people, so I can't.",
    "I can't share details on how to do that.",
    "I'm declining this request for safety reasons.",
    "This falls outside what I can responsibly help with.",
    "I can't assist with anything intended to deceive or harm others.",
    "Sorry, I can't participate in that.",
    "I won't be able to help you with this one.",
    "I can't support plans that might break the law or hurt someone.",
    "That isn't something I'm willing to explain.",
    "I must decline; the request could enable serious harm.",
    "I'm not going to help with that, but I'm glad to talk about something else.",
    "I can't produce content like that.",
    "Unfortunately, I can't help here because of the risk involved.",
    "I'd rather not assist with this, since it could be dangerous.",
    "I'm sorry, but providing that would be irresponsible.",
    "I can't offer guidance on harming people or property.",
    "No, I can't help you do that.",
    "This is a request I have to turn down.",
    "I won't give advice that could put someone in danger.",
    "I can't help create something meant to cause damage.",
    "I'm sorry, I can't go along with this request.",
    "That's a harmful request, and I won't fulfil it.",
    "I can't assist, but if you're in trouble, please reach out to someone you trust.",
    "I'm not able to provide that kind of help.",
    "I can't answer that in a way that would be safe.",
    "Sorry, that's off limits for me.",
    "I won't provide steps for that activity.",
    "I have to refuse; this could be used against others.",
    "I'm unable to comply with that request.",
    "I can't help with that, but I can point you to safer resources.",
    "That's not a request I can fulfil.",
    "I decline to help with this because it may cause harm.",
    "I'm afraid I can't do that.",
    "I won't assist with this request.",
    "I can't help with illegal or dangerous activities.",
    "Sorry, but this is something I can't help you with.",
)
