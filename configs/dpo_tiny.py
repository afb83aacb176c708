"""Direct preference optimisation of the tiny chat model: `joyjax dpo --config configs/dpo_tiny.py
--config.train.init_from=runs/sft_tiny --config.data.path=pairs.jsonl`.

Rows {"prompt" | "messages", "chosen", "rejected"}: chosen and rejected are rendered after the prompt in the chat
format and scored in one forward pass; the reference is a frozen copy of the starting params (dpo.reference;
"precomputed" computes its log-probs once before training and saves them in train.output_dir).
"""

from configs import sft_tiny


def get_config():
  c = sft_tiny.get_config()
  c.train.output_dir = "runs/dpo_tiny"
  c.train.steps = 100
  c.train.batch_size = 8             # rows per step; dpo.pairs_per_batch pairs (0 = one pair slot per row)
  c.data.eval_fraction = 0.05        # held-out pairs: preference accuracy and margin
  c.train.eval_every = 50
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.dpo.sft_weight = 1.0             # RPO: without it the chosen responses' likelihood falls with the rejected
  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 5
  c.checkpoint.every = 50
  return c
