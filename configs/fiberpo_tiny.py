"""FiberPO on the tiny chat model, on a verifiable task: `joyjax rl --config configs/fiberpo_tiny.py
--config.train.init_from=runs/sft_arith` (a run that taught the task's answer format; see README "RL").

Each step: 8 training prompts of the arithmetic task (a + b, a and b in 0..9), 8 samples each at temperature 1,
rewards 1 for the exact answer, group-normalised advantages, 2 minibatch updates with the FiberPO gate. A fifth of
the task's prompts is held out (data.eval_fraction) and answered greedily every train.eval_every steps:
eval/reward is the number to watch. rl.loss=grpo or gspo runs the baselines on the same rollouts.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.train.output_dir = "runs/fiberpo_tiny"
  c.train.steps = 60
  c.rl.env = "arithmetic"
  c.rl.env_args = "max_operand=9,ops=+"
  c.rl.prompts_per_step = 8
  c.rl.num_generations = 8
  c.rl.max_prompt_len = 32
  c.rl.max_new_tokens = 8
  c.rl.temperature = 1.0
  c.rl.num_minibatches = 2
  c.rl.loss = "fiberpo"
  c.data.eval_fraction = 0.2         # held-out prompts: eval/reward, never trained on
  c.train.eval_every = 10
  c.train.log_every = 1
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.train.mtp_loss_weight = 0.0
  c.train.sample_prompt = "What is 3 + 4?"
  c.train.sample_temperature = 0.0
  c.checkpoint.every = 20
  return c
