"""Published numbers a GPT-2 reproduction is compared with, and where each one comes from.

Every value is measured with the same method gpt2lab uses for the matching task, so a model evaluated
here can be put next to it directly (`gpt2lab plot` draws them as reference lines).
"""

from __future__ import annotations

# HellaSwag validation set (10,042 items), completion style, acc_norm: the yardstick of build-nanogpt
# and llm.c. GPT-2 124M: llm.c dev/data/hellaswag.py (docstring: "acc: 0.2859 acc_norm: 0.2955");
# GPT-3 125M: the GPT-3 paper (Brown et al. 2020), appendix H, HellaSwag zero-shot, GPT-3 Small: 33.7.
HELLASWAG_REFERENCES: dict[str, float] = {
    "gpt2-124M": 0.2955,
    "gpt3-125M": 0.337,
}

# Completion-style HellaSwag of OpenAI's released checkpoints, as the tools above print them.
# "acc_norm"/"acc" for gpt2 and gpt2-xl: llm.c dev/data/hellaswag.py; gpt2-medium and gpt2-large
# (acc_norm only): build-nanogpt play.ipynb `hella2_baseline` (which lists 0.2945 for 124M, from an
# earlier run of the same script; llm.c's 0.2955 is the figure quoted here).
HELLASWAG_GPT2_CHECKPOINTS: dict[str, dict[str, float]] = {
    "gpt2": {"acc_norm": 0.2955, "acc": 0.2859},
    "gpt2-medium": {"acc_norm": 0.3752},
    "gpt2-large": {"acc_norm": 0.4320},
    "gpt2-xl": {"acc_norm": 0.4893, "acc": 0.3842},
}

# Validation loss of the OpenAI GPT-2 124M checkpoint on FineWeb-Edu (sample-10BT) validation
# tokens, the first shard llm.c / build-nanogpt write (edu_fineweb_val_000000.bin); build-nanogpt
# play.ipynb `loss_baseline`. Measured over windows of 1024 tokens from the start of the split.
VAL_LOSS_REFERENCES: dict[str, float] = {
    "gpt2-124M": 3.2924,
}

# WikiText-2 test perplexity, GPT-2 paper (Radford et al. 2019), Table 3, zero-shot. The paper ran
# its own detokenizers and normalised by the original WikiText tokens, so the raw-text sliding
# window figure of `gpt2lab eval --task perplexity` is close to, not equal to, these numbers.
WIKITEXT2_PAPER_PERPLEXITY: dict[str, float] = {
    "gpt2": 29.41,
    "gpt2-medium": 22.76,
    "gpt2-large": 19.93,
    "gpt2-xl": 18.34,
}

# Hugging Face's "Perplexity of fixed-length models" guide: gpt2-large on wikitext-2-raw-v1 test, the
# raw rows joined with "\n\n", context 1024. Stride 1024 (no overlap) gives 19.44, stride 512 gives
# 16.45 (16.44 in later versions of the page).
WIKITEXT2_HF_GUIDE_GPT2_LARGE: dict[int, float] = {
    1024: 19.44,
    512: 16.45,
}

# DCLM CORE over nanochat's eval_bundle (22 tasks), computed by nanochat's core_eval.py: OpenAI's
# GPT-2 1.6B (`gpt2-xl`) scores 0.256525, the "time to GPT-2" threshold of nanochat dev/LEADERBOARD.md.
CORE_REFERENCES: dict[str, float] = {
    "gpt2-xl": 0.256525,
}
