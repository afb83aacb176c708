"""The JoyAI-LLM Flash DPO recipe (the report): 1,000 steps, learning rate 1e-6 with cosine decay to 1e-7, global
batch 256 pairs; beta is unpublished (0.1 here). Start from the SFT checkpoint:
`joyjax dpo --config configs/dpo_joyai.py --config.train.init_from=ckpt/flash-sft --config.data.path=pairs.jsonl`.
"""

from configs import joyai_flash


def get_config():
  c = joyai_flash.get_config()
  c.train.output_dir = "runs/dpo_joyai"
  c.train.steps = 1000
  c.train.batch_size = 256
  c.dpo.pairs_per_batch = 256
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.optim.name = "adamw"
  c.optim.lr = 1e-6
  c.optim.schedule = "cosine"
  c.optim.min_lr_ratio = 0.1         # 1e-6 -> 1e-7
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.train.mtp_loss_weight = 0.0
  c.train.sample_prompt = ""
  c.checkpoint.every = 100
  return c
