"""A small byte-level BPE tokenizer, trained in milliseconds, for random-weight checkpoints.

It behaves like the real Qwen tokenizer where the pipeline cares: byte-level BPE (any text encodes),
``<|endoftext|>`` as padding, and a chat template that wraps a prompt as a user turn and opens the
assistant turn, honouring ``enable_thinking`` as diffusers passes it. Its vocabulary is much smaller, so
a prompt takes more tokens than with the real tokenizer; the text encoder's embedding table keeps its
real size for the ``full`` preset regardless.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["CHAT_TEMPLATE", "build_toy_tokenizer"]

PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Our own minimal template: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the opened
# assistant turn; an empty think block when thinking is switched off explicitly (as Qwen3 templates do).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

# Training text: prompts of the kind people give a text-to-image model. Written for this file.
_CORPUS = """
a red fox sitting in fresh snow at dawn, soft light, shallow depth of field
portrait of an old fisherman with a grey beard, oil painting, warm colours
a quiet mountain lake surrounded by pine trees, mist over the water
a futuristic city street at night with neon signs reflected in puddles
a bowl of ramen on a wooden table, steam rising, close-up photograph
an ink painting of mountains and a river, traditional Chinese style
a cute robot watering flowers on a balcony, cartoon illustration
a golden retriever puppy running through a field of sunflowers
the interior of a cosy library with tall shelves and a reading lamp
a sailing ship on a stormy sea, dramatic clouds, cinematic lighting
a poster with the words hello world in bold letters on a blue background
a woman in a red dress walking through an autumn park, film photo
a cup of coffee and a croissant on a marble counter, morning sunlight
an astronaut floating above the earth, highly detailed, 8k
a watercolour of a small village by the sea with white houses
a dragon made of paper flying over a temple, intricate details
a macro photograph of a dew drop on a green leaf
a snowy train station at night with warm yellow windows
a bowl of fruit painted in the style of a still life, apples, pears and grapes
a black and white photograph of a jazz musician playing the saxophone
"""


def build_toy_tokenizer(vocab_size: int = 1024) -> Any:
    """Train the tokenizer and return it as a transformers ``Qwen2Tokenizer`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    backend.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()], trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Qwen2Tokenizer rebuilds the BPE with Qwen's own pre-tokenizer around our vocabulary and merges, and is
    # the class the real checkpoint names in model_index.json.
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token=PAD_TOKEN, unk_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
