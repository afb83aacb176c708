"""Supervised fine-tuning of the tiny model into a chat model: `joyjax sft --config configs/sft_tiny.py
--config.train.init_from=runs/tiny --config.data.path=chats.jsonl`.

Rows are conversations ({"messages": [...]} in the OpenAI layout, or {"prompt", "response", "reasoning"}); the
loss is on assistant tokens only (sft.train_on), averaged over the masked tokens of the whole batch; rows with
reasoning are rendered in thinking mode for an sft.thinking_ratio share and in non-thinking mode (an empty
think block) otherwise, so one model learns both. The tokenizer is the base run's (saved in its output_dir).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.train.output_dir = "runs/sft_tiny"
  c.train.steps = 300
  c.train.batch_size = 8
  c.data.seq_len = 256
  c.data.eval_fraction = 0.02        # held-out conversations: the SFT eval loss
  c.train.eval_every = 100
  c.sft.thinking_ratio = 0.5
  c.optim.name = "adamw"             # fine-tuning: AdamW at a small constant-then-decaying rate
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.0
  c.train.mtp_loss_weight = 0.0      # SFT on the main head only
  c.train.sample_prompt = "What is 12 + 7?"  # asked at the end in thinking and in non-thinking mode
  c.train.sample_temperature = 0.0
  c.checkpoint.every = 100
  return c
