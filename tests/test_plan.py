"""``joyjax plan`` for the full JoyAI-LLM Flash config on 64 chips, against numbers derived by hand from the
published shapes (nothing here reads the model code's shapes)."""

from types import SimpleNamespace

import pytest

from conftest import load_repo_config, repo_config_path
from joyjax.parallel import plan as plan_lib

GIB = 1024 ** 3
F32 = 4

# Published JoyAI-LLM Flash / DeepSeek-V3-style shapes.
L, DENSE, H, V = 40, 1, 2048, 129280
MOE_L = L - DENSE                 # 39 MoE blocks
MTP = 1                           # one MTP module (an MoE block + projection + 3 norms)
Q_LORA, KV_LORA, NOPE, ROPE, VH, HEADS = 1536, 512, 128, 64, 128, 32
E, EI, SHARED, DI = 256, 768, 1, 7168

ATTN_MUON = H * Q_LORA + Q_LORA * HEADS * (NOPE + ROPE) + H * (KV_LORA + ROPE) + KV_LORA * HEADS * (NOPE + VH) \
    + HEADS * VH * H                                          # q_a, q_b, kv_a, kv_b, o
ATTN_NORMS = Q_LORA + KV_LORA + 2 * H                         # q_a_norm, kv_a_norm, attn_norm, mlp_norm
EXPERTS = 3 * E * H * EI                                      # wi_gate, wi_up, wo of one block
SHARED_MLP = 3 * H * SHARED * EI
ROUTER = H * E
BIAS = E
DENSE_MLP = 3 * H * DI
EMB = V * H                                                   # embedding table; the head is as big (untied)
N_MOE = MOE_L + MTP                                           # blocks with routed experts

MUON = (L + MTP) * ATTN_MUON + DENSE * DENSE_MLP + N_MOE * (EXPERTS + SHARED_MLP) + MTP * 2 * H * H  # + eh_proj
ADAM = 2 * EMB + N_MOE * ROUTER + (L + MTP) * ATTN_NORMS + H + MTP * 3 * H   # + final norm, MTP e/h/final norms
TOTAL = MUON + ADAM + N_MOE * BIAS


def flash(*overrides):
  return load_repo_config("joyai_flash", overrides)


def test_total_matches_published_size():
  assert 49.5e9 < TOTAL < 50.5e9            # ~48B main model + ~2B MTP block (JoyAI-LLM Flash: 48B total)
  p = plan_lib.plan(flash("--config.mesh.fsdp=64"), 64)
  assert p["param_count"] == TOTAL
  assert p["param_bytes_total"] == TOTAL * F32


@pytest.mark.parametrize("mesh, bias_shards", [
    (("--config.mesh.fsdp=16", "--config.mesh.expert=4"), 4),   # experts over expert, embed over fsdp
    (("--config.mesh.fsdp=64",), 1),                             # everything over fsdp; router bias replicated
])
def test_params_optimizer_grads_on_64_chips(mesh, bias_shards):
  p = plan_lib.plan(flash(*mesh), 64)
  # every weight has a dim (embed 2048, q_lora 1536, kv_lora 512 or expert 256 x embed) divisible by the 64
  # shards; only the [layers, 256] router bias is split just over 'expert'
  params = (TOTAL - N_MOE * BIAS) * F32 / 64 + N_MOE * BIAS * F32 / bias_shards
  assert p["param_bytes"] == params
  assert p["param_groups"]["routed experts"] == N_MOE * EXPERTS * F32 / 64   # 40 * 3*256*2048*768*4 / 64
  assert p["grad_bytes"] == params
  # Muon: one f32 momentum per Muon matrix; AdamW part: mu and nu; router bias frozen: no state. Plus a few
  # replicated scalars (step counts, Muon's Newton-Schulz coefficients): under 64 bytes
  opt = (MUON + 2 * ADAM) * F32 / 64
  assert opt <= p["opt_state_bytes"] <= opt + 64


def test_adamw_state_and_grad_accum():
  p = plan_lib.plan(flash("--config.mesh.fsdp=64", "--config.optim.name=adamw", "--config.train.grad_accum=4"), 64)
  trainable = (TOTAL - N_MOE * BIAS) * F32 / 64
  assert trainable * 2 <= p["opt_state_bytes"] <= trainable * 2 + 64
  assert p["grad_bytes"] == 2 * p["param_bytes"]            # accumulator + micro-batch gradient
  assert p["micro_batch_per_device"] == 512 / 4 / 64


def test_tensor_parallel_leaves_some_weights_replicated():
  p = plan_lib.plan(flash("--config.mesh.fsdp=8", "--config.mesh.expert=4", "--config.mesh.tensor=2"), 64)
  # with heads / mlp / vocab dims: q_b, kv_b, o, dense + shared MLP, experts, embedding, head -> 64 ways
  split64 = ((L + MTP) * (Q_LORA * HEADS * (NOPE + ROPE) + KV_LORA * HEADS * (NOPE + VH) + HEADS * VH * H)
             + DENSE * DENSE_MLP + N_MOE * (EXPERTS + SHARED_MLP) + 2 * EMB)
  # no tensor-shardable dim: q_a, kv_a, all norms, routers ([L, embed, expert]), eh_proj -> fsdp*expert = 32
  split32 = ((L + MTP) * (H * Q_LORA + H * (KV_LORA + ROPE) + ATTN_NORMS) + H + MTP * 3 * H + N_MOE * ROUTER
             + MTP * 2 * H * H)
  assert split64 + split32 + N_MOE * BIAS == TOTAL
  assert p["param_bytes"] == split64 * F32 / 64 + split32 * F32 / 32 + N_MOE * BIAS * F32 / 4
  assert p["data_parallel"] == 32 and p["tokens_per_device"] == 512 * 4096 / 32


def test_activation_estimate_and_gathered_weights():
  p = plan_lib.plan(flash("--config.mesh.fsdp=16", "--config.mesh.expert=4"), 64)
  seqs = 512 / 64                                  # batch 512 over 64 data-parallel shards, grad_accum 1
  tokens = seqs * 4096
  assert p["tokens_per_device"] == tokens == 32768
  act = p["activations"]
  assert act["residual"] == (L + MTP) * tokens * H * 2                 # bf16 block inputs, remat full
  assert act["scores"] == 2 * seqs * HEADS * 4096 * 4096 * 4           # f32 scores + probabilities
  # one loss chunk (train.loss_chunk) of f32 logits + grad, and per head (main + MTP) its f32 gradient and the
  # hidden's bf16 gradient, kept from the forward for the backward
  assert act["loss"] == 2 * 4096 * V * 4 + (1 + MTP) * (H * V * 4 + tokens * H * 2)
  assert p["activation_bytes"] == act["residual"] + act["layer"] + act["loss"]
  assert act["layer"] > act["scores"]
  # largest gathered block: the MTP module (MoE block + eh_proj + norms), experts still split 4 ways, bf16
  mtp_block = ATTN_MUON + ATTN_NORMS + EXPERTS / 4 + SHARED_MLP + ROUTER + 2 * H * H + 3 * H
  assert p["gathered_weights_bytes"] == pytest.approx(2 * 2 * mtp_block)
  total = p["param_bytes"] + p["opt_state_bytes"] + p["grad_bytes"] + p["gathered_weights_bytes"] \
      + p["activation_bytes"]
  assert p["total_bytes"] == total
  # Blockwise attention holds one 512 x 512 block pair of f32 scores + probabilities and the saved lse.
  blockwise = plan_lib.plan(flash("--config.mesh.fsdp=16", "--config.mesh.expert=4",
                                  "--config.model.attention_impl=blockwise"), 64)
  assert blockwise["activations"]["scores"] == seqs * HEADS * (2 * 512 * 512 + 4096) * 4
  assert blockwise["activations"]["layer"] == act["layer"] - act["scores"] + blockwise["activations"]["scores"]
  remat_none = plan_lib.plan(flash("--config.mesh.fsdp=64", "--config.model.remat=none"), 64)
  assert remat_none["activations"]["residual"] == (L + MTP) * remat_none["activations"]["layer"]


def test_printed_table_and_fit(capsys):
  cfg = flash("--config.mesh.fsdp=16", "--config.mesh.expert=4")
  p = plan_lib.main(cfg, SimpleNamespace(devices=64, device_memory_gib=80.0, config="configs/joyai_flash.py"))
  out = capsys.readouterr().out
  params = ((TOTAL - N_MOE * BIAS) * F32 / 64 + N_MOE * BIAS * F32 / 4) / GIB
  assert "dcn_data=1 data=1 fsdp=16 expert=4 tensor=1" in out
  assert f"{params:10.3f}" in out.split("\nparams", 1)[1].splitlines()[0]
  assert f"{N_MOE * EXPERTS * F32 / 64 / GIB:10.3f}" in out
  assert "optimizer state (muon)" in out and "fits" in out and "does NOT fit" not in out
  assert p["fits"] is True
  small = plan_lib.plan(cfg, 64, device_memory_gib=16)
  assert small["fits"] is False
  assert "does NOT fit" in plan_lib.format_plan(small, cfg)


def test_cli_plan(capsys):
  from joyjax import cli
  cli.main(["plan", "--config", repo_config_path("joyai_flash"), "--devices", "64",
            "--config.mesh.fsdp=64", "--device-memory-gib", "95", "--config.train.batch_size=96"])
  out = capsys.readouterr().out
  assert "fsdp=64" in out and "device memory" in out
  assert "warning: train.batch_size / train.grad_accum = 96 sequences is not a multiple" in out
  with pytest.raises(SystemExit, match=r"mesh\.fsdp=16.*16 but there are 64 devices"):
    cli.main(["plan", "--config", repo_config_path("joyai_flash"), "--devices", "64",
              "--config.mesh.fsdp=16"])
