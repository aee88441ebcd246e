"""Stage two's training step at matmul speed: activation checkpointing, the optimizer's
parameter groups, FSDP2 mixed precision, evaluation under training's autocast, the
sampled support without its tail, and the step's host synchronisations.

Most checks run on a tiny random Qwen2 (2 layers, q/k/v biases, tied embeddings) and
synthetic teacher batches shaped like the cache's; the end-to-end ones on the session's
tiny cache (tests/conftest.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import ddk.pipeline.distributed as distributed
import ddk.stages.distill as distill_mod
from ddk.pipeline.config import load_config
from ddk.pipeline.distributed import DistEnv
from ddk.pipeline.objective import Objective
from ddk.pipeline.student import StudentLM, autocast_context, build_optimizer, param_groups, set_activation_checkpointing
from ddk.benchmarks.student_step import synthetic_batch
from ddk.stages.distill import Trainer, distill, read_metrics

QUIET = lambda *_: None  # noqa: E731
VOCAB, SEQ, K = 300, 16, 8


def _qwen2(layers=2, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, tie_word_embeddings=True, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).float().train()


def _batch(rows=2, seed=0):
    return synthetic_batch(rows, SEQ, VOCAB, K, torch.Generator().manual_seed(seed))


def _loss_and_grads(lm, batch, objective, calls=None):
    student = StudentLM(lm, objective)  # (its head check runs a forward: not counted)
    student.train()
    lm.zero_grad(set_to_none=True)
    if calls is not None:
        calls.clear()
    parts = student(batch.input_ids[:, :-1], batch)
    parts.loss.backward()
    return parts, {n: p.grad.clone() for n, p in lm.named_parameters()}


def _cfg(tiny_cache, out, *extra):
    cfg, _ = tiny_cache
    base = [f"distill.out_dir={json.dumps(str(out))}", "distill.steps=4", "distill.batch_rows=4", "distill.interval=2",
            "distill.checkpoint_every=2", "distill.warmup_steps=1", "distill.lr=3e-3", "distill.mode=kd"]
    return load_config(cfg.source_path, base + list(extra))


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("loss_impl", ["fused", "unfused"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(loss_impl):
    lm, batch = _qwen2(), _batch()
    objective = Objective(0.2, loss_impl=loss_impl)
    names = [n for n, _ in lm.named_parameters()]
    plain, grads = _loss_and_grads(lm, batch, objective)

    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in lm.model.layers]
    set_activation_checkpointing(lm, True)
    set_activation_checkpointing(lm, True)  # idempotent: no second embedding hook
    checkpointed, grads_ac = _loss_and_grads(lm, batch, objective, calls)
    # each layer started twice: its forward, and again in the backward (the recompute;
    # a pre-hook: the recompute stops as soon as it has what the backward needs)
    assert len(calls) == 2 * len(lm.model.layers)
    assert [n for n, _ in lm.named_parameters()] == names  # state dicts and checkpoints unchanged
    torch.testing.assert_close(checkpointed.loss, plain.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(checkpointed.ce, plain.ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(checkpointed.kl, plain.kl, rtol=1e-6, atol=0)
    for n in names:
        torch.testing.assert_close(grads_ac[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)

    # evaluation does not checkpoint (eval mode, no grad), and off is off again
    student = StudentLM(lm, objective).eval()
    calls.clear()
    student(batch.input_ids)
    assert len(calls) == len(lm.model.layers)
    set_activation_checkpointing(lm, False)
    assert not lm.is_gradient_checkpointing and not lm.model.embed_tokens._forward_hooks
    _loss_and_grads(lm, batch, objective, calls)
    assert len(calls) == len(lm.model.layers)
    for h in hooks:
        h.remove()


def test_distill_with_activation_checkpointing_trains_the_same_run(tiny_cache, tmp_path):
    # CPU: fp32, the same arithmetic. CUDA: fp32 too (bf16 would round the two differently),
    # and attention's backward may sum in another order each run (tests/test_distributed.py's nccl RTOL).
    cuda = ("distill.precision=fp32",) if torch.cuda.is_available() else ()
    rtol = 1e-4 if cuda else 1e-5
    runs = {ac: distill(_cfg(tiny_cache, tmp_path / str(ac), f"distill.activation_checkpointing={str(ac).lower()}", *cuda), log=QUIET)
            for ac in (False, True)}
    plain, ac = read_metrics(tmp_path / "False", "train"), read_metrics(tmp_path / "True", "train")
    for key in ("loss", "ce", "kl", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in ac], [r[key] for r in plain], rtol=rtol, err_msg=key)
    np.testing.assert_allclose(list(runs[True]["test"]["student_after_loss"].values()),
                               list(runs[False]["test"]["student_after_loss"].values()), rtol=rtol)
    # how the run is computed, not what: a run may resume with it switched
    assert "activation_checkpointing" not in runs[True]["identity"] and "activation_checkpointing" in distill_mod.RESUMABLE_WITH_CHANGED


# ----------------------------------------------------------------------------- the optimizer


def test_no_weight_decay_on_norms_biases_and_embeddings():
    lm = _qwen2()
    decay, exempt = param_groups(lm, 0.1)
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    names = {id(p): n for n, p in lm.named_parameters()}  # the tied head is the embedding: named once
    decayed, kept = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in exempt["params"]}
    assert not decayed & kept and decayed | kept == set(names.values())
    assert "model.embed_tokens.weight" in kept
    assert {n for n in kept if n != "model.embed_tokens.weight"} == {n for n, p in lm.named_parameters() if p.ndim == 1}
    assert any(n.endswith("q_proj.bias") for n in kept) and any(n.endswith("norm.weight") for n in kept)
    assert decayed == {n for n, p in lm.named_parameters() if p.ndim == 2 and "embed" not in n}
    assert len(param_groups(lm, 0.1, decay_all=True)) == 1

    # one AdamW step on zero gradients moves only the decayed parameters, by lr * wd
    optimizer = build_optimizer(lm, lr=0.5, weight_decay=0.1)
    assert not optimizer.defaults.get("fused")  # CPU: torch's default implementation, as before
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    for p in lm.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in lm.named_parameters():
        expected = before[n] * (1 - 0.5 * 0.1) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=n)


def test_an_untied_head_decays_like_the_other_linear_maps():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, tie_word_embeddings=False))
    decay, exempt = param_groups(lm, 0.01)
    assert any(p is lm.lm_head.weight for p in decay["params"])
    assert any(p is lm.model.embed_tokens.weight for p in exempt["params"])


def test_a_run_resumed_from_a_one_group_checkpoint_keeps_its_grouping(tiny_cache, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_cache, out, "distill.steps=2")
    distill(cfg, log=QUIET)
    trainer_pt = out / "ckpt-0000002" / "trainer.pt"
    blob = torch.load(trainer_pt, weights_only=False)
    groups = blob["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    # what a checkpoint of a run trained before the split holds: one group, all decayed
    blob["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    torch.save(blob, trainer_pt)
    more = _cfg(tiny_cache, out, "distill.steps=2")
    trainer = Trainer(more, True, QUIET, DistEnv())
    try:
        assert len(trainer.optimizer.param_groups) == 1 and trainer.optimizer.param_groups[0]["weight_decay"] == cfg.distill.weight_decay
        assert trainer.optimizer.state  # the saved moments were loaded
    finally:
        trainer.close_prefetch()
        trainer.metrics.close()


# ----------------------------------------------------------------------------- FSDP2 mixed precision


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA: nccl, the Triton kernel and fused AdamW over FSDP2's shards"))])
def test_fsdp2_mixed_precision_gathers_bf16_and_reduces_fp32(monkeypatch, device):
    """One rank in this process (gloo on CPU, nccl on CUDA): FSDP2's bf16 policy (layers'
    parameters gathered in bf16, gradients and the optimizer's shards fp32), teacher
    log-probs that reach the loss unrounded (the root does not cast its inputs), and
    stage two's AdamW (fused on CUDA) stepping the shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import ddk.pipeline.objective as objective_mod

    assert distributed.fsdp_mixed_precision(None) == ({}, {})
    lm, batch = _qwen2().to(device), _batch()
    reference = _qwen2().to(device)
    reference.load_state_dict(lm.state_dict())
    if device == "cuda":
        batch = type(batch)(*(t.to(device) for t in (batch.input_ids, batch.topk_ids, batch.topk_logprobs,
                                                      batch.target_logprob, batch.tail_logmass)))
    objective = Objective(0.2)
    plain = StudentLM(reference, objective)
    with autocast_context("bf16", device):
        want = plain(batch.input_ids[:, :-1], batch)

    seen = {}
    real_loss = objective_mod.fused_linear_distill_loss

    def spy(hidden, weight, *args, **kwargs):
        seen["weight"], seen["logprobs"] = weight.dtype, args[2].dtype
        return real_loss(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(objective_mod, "fused_linear_distill_loss", spy)
    layer_dtypes = []
    if device == "cuda":
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        student = distributed.shard_model(StudentLM(lm, objective), init_device_mesh(device, (1,)), torch.bfloat16)
        optimizer = build_optimizer(student, lr=1e-3, weight_decay=0.01)
        assert bool(optimizer.defaults.get("fused")) == (device == "cuda")
        hook = lm.model.layers[0].register_forward_pre_hook(
            lambda module, _: layer_dtypes.append(module.mlp.up_proj.weight.dtype))
        student.train()
        with autocast_context("bf16", device):
            parts = student(batch.input_ids[:, :-1], batch)
        parts.loss.backward()
        hook.remove()
        assert layer_dtypes == [torch.bfloat16]
        assert seen == {"weight": torch.bfloat16, "logprobs": torch.float32}
        for name, p in student.named_parameters():
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        torch.testing.assert_close(parts.loss.detach(), want.loss.detach(), rtol=2e-2, atol=0)
        before = {n: p.detach().full_tensor().clone() for n, p in student.named_parameters()}
        optimizer.step()
        assert all(not torch.equal(p.detach().full_tensor(), before[n]) for n, p in student.named_parameters())
        # evaluation goes through the same gathering, under the same autocast
        with autocast_context("bf16", device):
            rows = student.eval()(batch.input_ids)
        assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- evaluation precision


def test_evaluation_runs_under_the_training_autocast(tiny_cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ddk.pipeline.cache.reader import TopKCacheReader
    from ddk.pipeline.evaluate import split_keys

    cfg, _ = tiny_cache
    reader = TopKCacheReader(cfg.cache_path())
    keys = split_keys(reader, "val", 2)
    student = StudentLM(AutoModelForCausalLM.from_pretrained(cfg.student_path()), Objective(0.0))
    fp32 = distributed.domain_row_losses(student, reader, keys, DistEnv(), "cpu", precision="fp32")
    auto = distributed.domain_row_losses(student, reader, keys, DistEnv(), "cpu", precision="auto")
    bf16 = distributed.domain_row_losses(student, reader, keys, DistEnv(), "cpu", precision="bf16")
    for d in keys:
        np.testing.assert_array_equal(auto[d], fp32[d])  # CPU: "auto" is fp32, the numbers of before
        np.testing.assert_allclose(bf16[d], fp32[d], rtol=3e-2)
        assert not np.array_equal(bf16[d], fp32[d])  # bf16 did run

    # the trainer evaluates (before, every interval, after) with distill.precision
    precisions = []
    real = distributed.domain_row_losses

    def spy(*args, **kwargs):
        precisions.append(kwargs.get("precision"))
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "domain_row_losses", spy)
    distill(_cfg(tiny_cache, tmp_path / "p", "distill.steps=2"), log=QUIET)
    assert precisions and set(precisions) == {"auto"}


# ----------------------------------------------------------------------------- sampled support


def test_a_tail_of_minus_infinity_is_the_same_loss_as_no_tail():
    lm, batch = _qwen2(), _batch()
    batch.tail_logmass.fill_(-float("inf"))
    with_tail, grads = _loss_and_grads(lm, batch, Objective(0.2, use_tail=True))
    without, grads_none = _loss_and_grads(lm, batch, Objective(0.2, use_tail=False))
    torch.testing.assert_close(without.loss, with_tail.loss, rtol=1e-6, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_none[n], grads[n], rtol=1e-5, atol=1e-8, msg=n)


@pytest.fixture(scope="module")
def sampled_cache(tiny_cache, tmp_path_factory):
    from ddk.stages.teacher_cache import teacher_cache

    cfg, _ = tiny_cache
    cache = tmp_path_factory.mktemp("sampled") / "cache"
    teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(cache))}", 'cache.support="sampled"', "cache.k=12",
                                                "teacher.backend=hf"]), log=QUIET)
    return cache


def test_a_sampled_cache_trains_without_the_tail_machinery(tiny_cache, sampled_cache, tmp_path, monkeypatch):
    import ddk.pipeline.objective as objective_mod

    tails = []
    real_loss = objective_mod.fused_linear_distill_loss

    def spy(hidden, weight, targets, ids, logprobs, tail, **kwargs):
        tails.append(tail)
        return real_loss(hidden, weight, targets, ids, logprobs, tail, **kwargs)

    monkeypatch.setattr(objective_mod, "fused_linear_distill_loss", spy)
    res = distill(_cfg(tiny_cache, tmp_path / "s", f"distill.cache_dir={json.dumps(str(sampled_cache))}", "distill.steps=2"), log=QUIET)
    assert res["steps"] == 2 and len(tails) == 2 and all(t is None for t in tails)
    # a top-k cache keeps its tail
    tails.clear()
    distill(_cfg(tiny_cache, tmp_path / "t", "distill.steps=1"), log=QUIET)
    assert len(tails) == 1 and tails[0] is not None


# ----------------------------------------------------------------------------- host synchronisations


def _count_host_reads(monkeypatch):
    """.item(), .tolist() and bool(tensor) by their direct caller's file: on CUDA each is a
    host synchronisation."""
    import sys
    from collections import Counter

    reads = Counter()
    for name in ("item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            reads[caller.split("/site-packages/")[-1] if "/site-packages/" in caller else caller] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_one_optimizer_step_reads_the_device_once(tiny_cache, tmp_path, monkeypatch):
    """grad_accum = 3 micro-batches, and the step loop (stages/, pipeline/) reads the
    device once: the step's numbers, after the last backward. What it calls reads too, on
    CUDA: the fused loss's id range check once per micro-batch (kernels/fused_linear_kl.py)
    and transformers' packed-sequence detection once per forward (masking_utils); on CPU
    also AdamW's step counts and the torch loss path's support check, which are host
    tensors there (fused AdamW and the Triton kernel on CUDA)."""
    import ddk

    cfg = _cfg(tiny_cache, tmp_path / "h", "distill.grad_accum=3", "distill.batch_rows=2", "distill.steps=2")
    trainer = Trainer(cfg, False, QUIET, DistEnv())
    try:
        trainer.start_interval()
        trainer.optimizer_step()  # warm: first-call work (lazy inits) is not the loop's
        with monkeypatch.context() as m:
            reads = _count_host_reads(m)
            trainer.optimizer_step()
        root = ddk.__path__[0]
        ours = {f: n for f, n in reads.items() if f.startswith((f"{root}/stages/", f"{root}/pipeline/"))}
        assert sum(ours.values()) == 1, reads
        assert reads[f"{root}/kernels/fused_linear_kl.py"] <= cfg.distill.grad_accum, reads
    finally:
        trainer.close_prefetch()
        trainer.metrics.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_one_optimizer_step_synchronises_once_in_the_step_loop_on_cuda(tiny_cache, tmp_path):
    """As above, with CUDA's own count: the step loop synchronises once per step; the fused
    loss's id check and transformers' packed-sequence detection once per micro-batch each."""
    import ddk

    cfg = _cfg(tiny_cache, tmp_path / "c", "distill.grad_accum=3", "distill.batch_rows=2", "distill.steps=2")
    trainer = Trainer(cfg, False, QUIET, DistEnv())
    try:
        trainer.start_interval()
        trainer.optimizer_step()  # warm: kernel compilation, allocator growth, pinned-memory pools
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.optimizer_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = "\n".join(f"{w.filename}:{w.lineno}" for w in syncs)
        root = ddk.__path__[0]
        assert sum(w.filename.startswith((f"{root}/stages/", f"{root}/pipeline/")) for w in syncs) == 1, where
        assert len(syncs) <= 2 * cfg.distill.grad_accum + 1, where
    finally:
        trainer.close_prefetch()
        trainer.metrics.close()
