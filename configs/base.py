"""The one documented joyjax config: every key, its meaning and its default.

Model and recipe files (``configs/tiny.py``, ``configs/joyai_flash.py``) start from ``get_config()`` and
override values; the command line overrides last (``--config.train.lr=3e-4``). The returned ConfigDict is
locked, so assigning a key that is not documented here raises an error naming it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 129280            # token embedding rows and head columns
  m.hidden_size = 2048             # residual stream width
  m.num_layers = 40                # decoder blocks (not counting MTP modules)
  m.first_k_dense = 1              # the first k blocks use a dense MLP instead of MoE
  m.dense_intermediate_size = 7168  # width of the dense MLP in those blocks
  m.rms_norm_eps = 1e-6
  m.tie_embeddings = False         # share embedding and output head
  m.init_std = 0.006               # normal init std for every weight matrix
  m.max_position_embeddings = 131072
  m.dtype = "bfloat16"             # compute dtype of activations and matmuls
  m.param_dtype = "float32"        # storage dtype of parameters (master weights)
  m.scan_layers = True             # stack blocks and lax.scan them: compile time independent of depth
  m.remat = "full"                 # rematerialisation per block: none | full | dots | dots_no_batch
  # Training attention: xla (einsum softmax; materialises [heads, seq, seq] f32 scores) | blockwise (flash-style
  # online softmax over attention_block-sized blocks with a recomputing backward: O(seq x block) memory) |
  # cudnn (cuDNN flash attention via jax.nn.dot_product_attention, NVIDIA GPUs, bf16/fp16; documents as a mask) |
  # auto (cudnn where it can run, blockwise elsewhere).
  m.attention_impl = "xla"
  m.attention_block = 512          # blockwise: query and key block length
  # cudnn on Hopper+: pass each row's documents in cuDNN's packed layout (no [seq, seq] mask or bias) when no row
  # holds more than this many documents (a padding tail counts as one); other batches use the mask. 0 = always
  # the mask.
  m.attention_max_segments = 0

  a = m.attention = ml_collections.ConfigDict()
  a.num_heads = 32
  a.q_lora_rank = 1536             # 0: a full-rank q projection instead of the low-rank pair
  a.kv_lora_rank = 512             # compressed latent width (what the KV cache stores)
  a.qk_nope_head_dim = 128         # per-head q/k width without rotary embedding
  a.qk_rope_head_dim = 64          # per-head q/k width with rotary (k's rope part is shared by heads)
  a.v_head_dim = 128

  r = m.rope = ml_collections.ConfigDict()
  r.theta = 10000.0
  r.interleave = True              # DeepSeek-V3 weights expect interleaved (pairwise) rotary dims
  r.scaling = "none"               # none | yarn
  r.factor = 1.0                   # yarn: context extension factor
  r.original_max_position = 4096   # yarn: pre-extension context length
  r.beta_fast = 32.0               # yarn: high-frequency boundary (rotations)
  r.beta_slow = 1.0                # yarn: low-frequency boundary (rotations)
  r.mscale = 1.0                   # yarn: cos/sin magnitude scale numerator
  r.mscale_all_dim = 0.0           # yarn: denominator, and softmax scale correction when non-zero

  e = m.moe = ml_collections.ConfigDict()
  e.num_experts = 256              # routed experts
  e.num_experts_per_tok = 8        # top-k
  e.intermediate_size = 768        # width of each routed (and each shared) expert
  e.num_shared_experts = 1         # shared experts, fused into one MLP of width n * intermediate_size
  e.n_group = 1                    # expert groups for group-limited routing
  e.topk_group = 1                 # groups a token may route into
  e.routed_scaling_factor = 2.5
  e.norm_topk_prob = True          # renormalise the chosen weights to sum 1
  e.scoring_func = "sigmoid"       # sigmoid | softmax
  e.impl = "auto"                  # grouped-matmul backend: auto | reference | ragged_dot | pallas | pallas_interpret
  e.capacity_factor = 0.0          # expert parallelism: 0 = dropless, > 0 = drop tokens past capacity
  # Pallas impls: gate and up projections and the SwiGLU in one kernel (x read once, no [rows, 2 x width]
  # pre-activations stored; the backward recomputes them). `benchmarks/moe_kernels.py` rows pallas vs
  # pallas_fused say which is faster on a given accelerator. Other impls ignore it.
  e.fuse_swiglu = False

  t = m.mtp = ml_collections.ConfigDict()
  t.num_layers = 1                 # multi-token prediction modules (0 disables)

  lo = m.lora = ml_collections.ConfigDict()
  lo.rank = 0                      # LoRA rank r (0 = off); on: only the adapters train, every base weight is frozen
  lo.alpha = 16.0                  # adapter output scale alpha / r: y = x W + (alpha / r) (x A) B
  lo.targets = "attention,dense,shared"  # adapted weights, comma separated: attention, dense, shared, routed
  lo.base_dtype = "bfloat16"       # storage dtype of the frozen base weights when rank > 0 (adapters: param_dtype)

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.path = ""                      # "" = the embedded corpus; else file path(s) / glob(s), comma separated
  d.format = "auto"                # auto (by extension) | jsonl | parquet | text | arrayrecord
  d.text_key = "text"              # field holding the document in jsonl / parquet / arrayrecord rows
  d.tokenizer = ""                 # path to a HF tokenizer.json; "" = train a byte-level BPE on the corpus
  d.tokenizer_vocab_size = 4096    # vocabulary of the tokenizer trained on first run
  d.cache_dir = ".cache/joyjax"    # where the trained tokenizer and embedded corpus are cached
  d.seq_len = 256                  # packed sequence length
  d.shuffle = True
  d.seed = 0
  d.skip_malformed = False         # True: skip and count malformed rows; False: error naming file and row
  d.add_bos = True
  d.add_eos = True
  d.num_epochs = 0                 # 0 = repeat forever
  d.worker_count = 0               # grain worker processes (0 = in-process)
  d.eval_path = ""                 # evaluation documents: file path(s) / glob(s) as data.path ("" = none)
  # Fraction of the training corpus's documents held out for evaluation and never trained on (0 = none): the
  # same documents in every run (chosen by a hash of the document index). Not together with data.eval_path.
  d.eval_fraction = 0.0
  # Chat template (SFT / DPO): "" = the tokenizer directory's chat_template (tokenizer_config.json or
  # chat_template.jinja) if it ships one, else the built-in DeepSeek-V3-shaped one; "builtin"; or a path to either.
  d.chat_template = ""

  # ---------------------------------------------------------------- preference optimization (joyjax dpo)
  # Rows {"prompt" | "messages", "chosen", "rejected"} in data.path (JSON lines); see joyjax/data/dpo.py.
  po = c.dpo = ml_collections.ConfigDict()
  po.beta = 0.1                    # strength of the KL penalty: rewards are beta * (log pi - log pi_ref)
  po.loss_type = "sigmoid"         # sigmoid (DPO; cDPO with label_smoothing > 0) | ipo (length-normalised)
  po.label_smoothing = 0.0         # sigmoid only: assumed probability that a pair's labels are flipped, [0, 0.5)
  # Weight of the chosen responses' per-token negative log-likelihood added to the DPO loss (RPO, TRL's
  # rpo_alpha): keeps DPO from lowering the chosen responses' likelihood along with the rejected ones'. 0 = off.
  po.sft_weight = 0.0
  po.reference = "frozen"          # frozen (a copy of the starting params in the state) | precomputed (one pass)
  po.pairs_per_batch = 0           # pair slots per global batch (0 = train.batch_size); rows: train.batch_size
  po.overlong = "truncate"         # a pair longer than data.seq_len: truncate (prompt tail, response head) | skip
  po.thinking = True               # thinking mode for rows without a "thinking" field

  # ---------------------------------------------------------------- reinforcement learning (joyjax rl)
  # Per step: rl.prompts_per_step prompts -> rl.num_generations samples each -> rewards -> group-normalised
  # advantages -> old log-probs -> rl.num_minibatches x rl.epochs optimizer updates. train.steps counts rollout
  # batches; data.eval_fraction holds out that share of the task's prompts for eval/reward. See joyjax/rl/.
  rl = c.rl = ml_collections.ConfigDict()
  rl.env = "arithmetic"            # arithmetic | string | "package.module:factory" (a user task; see rl/envs.py)
  rl.env_args = ""                 # the task's options, "key=value,key=value" (e.g. "max_operand=9,num_prompts=512")
  rl.reward_fn = ""                # "package.module:function" (prompt, response) -> float replaces the task's check
  rl.format_weight = 0.0           # weight of the format reward (answer in the expected form) added to the reward
  rl.length_weight = 0.0           # length-aware shaping: correct answers lose this much per unit of length share
  rl.thinking = False              # prompts rendered in thinking mode (the response opens with reasoning)
  rl.prompts_per_step = 8          # prompts per rollout batch (global)
  rl.num_generations = 8           # G samples per prompt (the group of the advantage)
  rl.max_prompt_len = 64           # prompt tokens (left-padded; longer prompts are an error naming the prompt)
  rl.max_new_tokens = 32           # response tokens at most
  rl.temperature = 1.0             # rollout sampling temperature
  rl.top_p = 1.0                   # nucleus sampling (1 = off)
  rl.top_k = 0                     # top-k sampling (0 = off)
  rl.eval_temperature = 0.0        # held-out evaluation sampling (0 = greedy)
  rl.draft_tokens = 0              # rollouts with MTP speculative decoding (as train.sample_draft_tokens; 0 = off):
  #                                  same distribution, the log-probs stay the model's
  rl.num_minibatches = 2           # optimizer updates per pass over a rollout batch
  rl.epochs = 1                    # passes over each rollout batch
  rl.loss = "fiberpo"              # fiberpo | fiberpo_domain | grpo (PPO clip per token) | gspo (sequence ratio)
  rl.advantage = "group"           # group (reward - group mean) / group std | group_mean (no std) | none (raw reward)
  rl.kl_coef = 0.0                 # KL penalty (k3) to the starting policy; > 0 keeps a frozen reference copy
  rl.clip_low = 0.2                # grpo: ratio clip 1 - clip_low .. 1 + clip_high; gspo: on the sequence ratio
  rl.clip_high = 0.28
  rl.curriculum = False            # pass-rate curriculum: prompts weighted by a Gaussian over their pass rate
  rl.curriculum_start = 0.8        # the Gaussian's mean at the first step ...
  rl.curriculum_end = 0.2          # ... moving linearly to this at the last step
  rl.curriculum_width = 0.2        # the Gaussian's standard deviation
  fp = rl.fiberpo = ml_collections.ConfigDict()
  fp.c_plus = 0.2                  # trajectory budget of the positive log-ratio channel (C+)
  fp.c_minus = 0.1                 # ... and of the negative one (C-); delta = C+ + C-, C- < C+ offsets the KL bias
  fp.eps = 0.025                   # token (fiber) budget, eps << delta: the token gate engages first
  fp.steepness = 0.0               # rollback slope T (0 = each level's own count: T_tau tokens, T_g, T_D)
  fp.group_c_plus = -1.0           # fiberpo_domain: the prompt-group level's budgets (-1 = C+ / C-)
  fp.group_c_minus = -1.0
  fp.domain_c_plus = -1.0          # fiberpo_domain: the domain level's budgets (-1 = C+ / C-)
  fp.domain_c_minus = -1.0

  # ---------------------------------------------------------------- supervised fine-tuning (joyjax sft)
  # Rows {"messages": [...]} or {"prompt", "response"[, "reasoning"]} in data.path; see joyjax/data/sft.py.
  s = c.sft = ml_collections.ConfigDict()
  s.thinking_ratio = 0.5           # share of conversations with reasoning rendered thinking (a row's "thinking" wins)
  s.train_on = "assistant"         # tokens with loss: assistant (every assistant turn) | last (final one) | all
  s.overlong = "truncate"          # conversation over data.seq_len + 1 tokens: truncate (keep the first ones) | skip

  # ---------------------------------------------------------------- optimizer
  o = c.optim = ml_collections.ConfigDict()
  o.name = "muon"                  # muon (2-D matrices; AdamW for the rest) | adamw
  o.lr = 3e-3                      # peak learning rate (Muon matrices)
  o.adam_lr = 1e-3                 # peak learning rate of the AdamW part under muon; adamw: uses lr
  o.schedule = "wsd"               # constant | cosine | wsd (warmup-stable-decay)
  o.warmup_steps = 10
  o.decay_fraction = 0.2           # wsd: last fraction of steps that decay linearly
  o.min_lr_ratio = 0.1             # final lr as a fraction of peak
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1             # decoupled; masked off for norms, biases and embeddings
  o.muon_momentum = 0.95
  o.muon_ns_steps = 5
  o.muon_ns_dtype = "bfloat16"     # Newton-Schulz compute dtype: bfloat16 (Moonlight / Keller Jordan) | float32
  o.grad_clip = 1.0                # global-norm clipping (0 disables)

  # ---------------------------------------------------------------- training
  tr = c.train = ml_collections.ConfigDict()
  tr.steps = 200
  tr.batch_size = 8                # global sequences per optimizer step
  tr.grad_accum = 1                # micro-batches per step (batch_size must divide)
  tr.seed = 0
  tr.z_loss = 0.0                  # weight of log(Z)^2
  # Weight of the MTP cross-entropy (mean over MTP depths). Set per recipe stage: 0 turns MTP off for the stage
  # (not run; its weights frozen, so they pass to the next stage unchanged: no weight decay); the JoyAI report
  # turns it on from mid-training at 0.1. DPO and RL never train it (frozen whatever this says).
  tr.mtp_loss_weight = 0.3
  tr.balance_loss_alpha = 0.0      # sequence-wise balance loss weight (0 disables)
  tr.router_bias_rate = 1e-3       # aux-loss-free bias update rate gamma (0 disables)
  tr.loss_chunk = 1024             # tokens per device per chunk of the vocabulary head's losses (each chunk holds
                                   # every row: full logits never materialise)
  tr.max_nonfinite = 10            # stop after this many consecutive skipped (non-finite) steps
  tr.log_every = 10
  tr.eval_every = 0                # evaluate every N steps and at the end (0 = never; needs data.eval_*)
  tr.eval_batches = 4              # batches per evaluation: the same batches every time
  tr.output_dir = "runs/default"   # checkpoints, metrics.jsonl and TensorBoard events
  tr.init_from = ""                # params-only checkpoint (e.g. from `joyjax convert`) to start from
  tr.sample_prompt = "def "        # prompt sampled at the end of training ("" skips)
  tr.sample_tokens = 48
  tr.sample_temperature = 0.0      # 0 = greedy
  # MTP speculative decoding (rl/speculative.py): the first MTP module drafts this many tokens per step, the model
  # verifies them in one pass; greedy output and the sampling distribution are unchanged (0 = off; needs
  # model.mtp.num_layers > 0). Used by the end-of-run sample and `joyjax sample`.
  tr.sample_draft_tokens = 0
  tr.peak_tflops = 0.0             # per-device peak for MFU; 0 = guess from the device kind

  # ---------------------------------------------------------------- quantization-aware training (joyjax/quant.py)
  # The loss sees fake-quantized weights (straight-through gradient); float32 master weights stay in the state;
  # held-out evaluation measures the quantized model. Pretraining and SFT (the shared train step).
  qt = c.quant = ml_collections.ConfigDict()
  qt.format = "none"               # none (off) | int4 (symmetric, group-wise along the input dim) | fp8 (e4m3,
                                   # one scale per 128x128 block, as DeepSeek-V3 ships)
  qt.group_size = 128              # int4: input elements per scale; must divide every quantized weight's input dim
  # Quantized weight groups, comma separated: attention (MLA projections), dense (dense layers' MLP), shared
  # (shared expert), routed (routed experts). Embeddings, LM head, router, norms, MTP eh_proj stay float.
  qt.targets = "attention,dense,shared,routed"
  qt.start_step = 0                # QAT from this step on (a late phase); earlier steps train the float weights

  ck = c.checkpoint = ml_collections.ConfigDict()
  ck.every = 50                    # save every N steps (0 = only at the end)
  ck.keep = 3                      # keep the last K
  ck.async_save = True

  # ---------------------------------------------------------------- parallelism
  p = c.mesh = ml_collections.ConfigDict()
  p.dcn_data = 1                   # data parallelism across slices / nodes (outermost)
  p.data = 1
  p.fsdp = -1                      # -1 takes the remaining devices
  p.expert = 1
  p.tensor = 1
  p.coordinator = ""               # multi-host: host:port ("" = from the environment)
  p.num_processes = 0
  p.process_id = -1
  p.rules = ""                     # logical->mesh axis rules merged over the defaults (joyjax/parallel/rules.py),
                                   # e.g. "embed=fsdp,vocab=" ('name=axis+axis', comma separated; "" = defaults)

  c.lock()
  return c
