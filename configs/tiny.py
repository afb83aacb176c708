"""A tiny JoyAI-architecture model: every feature of the real one, a CPU forward pass in milliseconds."""

from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.vocab_size = 4096
  m.hidden_size = 64
  m.num_layers = 3
  m.first_k_dense = 1
  m.dense_intermediate_size = 128
  m.init_std = 0.02
  m.max_position_embeddings = 1024
  m.dtype = "float32"
  m.remat = "none"
  m.attention.num_heads = 4
  m.attention.q_lora_rank = 32
  m.attention.kv_lora_rank = 32
  m.attention.qk_nope_head_dim = 16
  m.attention.qk_rope_head_dim = 8
  m.attention.v_head_dim = 16
  m.moe.num_experts = 8
  m.moe.num_experts_per_tok = 2
  m.moe.intermediate_size = 32
  m.moe.num_shared_experts = 1
  m.moe.n_group = 2
  m.moe.topk_group = 1
  m.mtp.num_layers = 1
  c.data.seq_len = 128
  c.data.tokenizer_vocab_size = 4096
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.log_every = 10
  c.data.eval_fraction = 0.02      # ~6 of the embedded corpus's documents, never trained on
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.train.output_dir = "runs/tiny"
  c.checkpoint.every = 100
  c.optim.lr = 0.02
  c.optim.adam_lr = 3e-3
  c.train.sample_temperature = 0.7  # greedy decoding of a model this small repeats one token
  return c
